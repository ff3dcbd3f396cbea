//! Firecracker's pre-boot flow: the configuration a client builds with
//! `PUT /boot-source`, `/machine-config`, `/drives/{id}`, ... before
//! `PUT /actions {"action_type":"InstanceStart"}`, and the same structure read
//! from a `--config-file` (Firecracker's config-file shape).
//!
//! [`VmResources`] holds and validates that configuration (no I/O: paths are
//! checked when the VM is built). [`PreBootVm`] is the [`VmControl`] of
//! `kiln vmm`: "Not started" until `InstanceStart`, when it hands the
//! configuration to a [`Starter`] (the VMM side) and, once the VM runs,
//! forwards the runtime requests (balloon) to the running VM's control.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::models::{
    Balloon, BalloonStats, BalloonUpdate, InstanceInfo, PartialDrive, PartialNetworkInterface,
};
use crate::telemetry::{LoggerConfig, MetricsConfig, Telemetry};
use crate::{ApiError, VmControl};

/// Most vCPUs a microVM may have.
pub const MAX_VCPUS: u8 = 32;
/// Least guest memory, MiB.
pub const MIN_MEM_MIB: u64 = 128;
/// Longest drive id (the virtio-blk id the guest reads is 20 bytes).
pub const MAX_DRIVE_ID: usize = 20;

/// `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Kernel image (bzImage or ELF vmlinux) on the host.
    pub kernel_image_path: String,
    /// Optional initrd on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line; Kiln's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `GET`/`PUT /machine-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs (1..=32).
    pub vcpu_count: u8,
    /// Guest memory, MiB (at least 128).
    pub mem_size_mib: u64,
    /// Simultaneous multithreading: not supported (must be false).
    #[serde(default)]
    pub smt: bool,
    /// Log the pages the guest and the devices write (needed for diff
    /// snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
}

impl Default for MachineConfig {
    /// Firecracker's defaults: 1 vCPU, 128 MiB.
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: MIN_MEM_MIB,
            smt: false,
            track_dirty_pages: false,
        }
    }
}

/// `PATCH /machine-config`: only the given fields change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    #[allow(missing_docs)]
    pub vcpu_count: Option<u8>,
    #[allow(missing_docs)]
    pub mem_size_mib: Option<u64>,
    #[allow(missing_docs)]
    pub smt: Option<bool>,
    #[allow(missing_docs)]
    pub track_dirty_pages: Option<bool>,
}

/// One token bucket of a rate limiter (Firecracker's `TokenBucket`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Tokens when full (bytes or operations).
    pub size: u64,
    /// Extra tokens available once.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill `size` tokens.
    pub refill_time: u64,
}

/// A rate limiter (Firecracker's `RateLimiter`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bucket counting bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Bucket counting operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

impl TokenBucket {
    /// Whether it limits anything (Firecracker: size 0 or refill_time 0
    /// means no limit).
    pub fn is_limited(&self) -> bool {
        self.size > 0 && self.refill_time > 0
    }
}

impl RateLimiter {
    /// `old` after a `PATCH` with `patch`: a bucket given replaces the old
    /// one, or removes it when it limits nothing; a bucket left out is
    /// kept. `None` when no bucket is left.
    pub fn patched(old: Option<RateLimiter>, patch: &RateLimiter) -> Option<RateLimiter> {
        let merge = |o: Option<TokenBucket>, p: Option<TokenBucket>| match p {
            None => o,
            Some(b) if b.is_limited() => Some(b),
            Some(_) => None,
        };
        let old = old.unwrap_or_default();
        let new = RateLimiter {
            bandwidth: merge(old.bandwidth, patch.bandwidth),
            ops: merge(old.ops, patch.ops),
        };
        (new != RateLimiter::default()).then_some(new)
    }
}

/// A drive's I/O engine. `Async` is Kiln's io_uring engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Blocking I/O on the device thread.
    #[default]
    Sync,
    /// io_uring.
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's id (also the id the guest reads, at most 20 bytes).
    pub drive_id: String,
    /// Backing file (raw image) on the host.
    pub path_on_host: String,
    /// Attach first and add `root=/dev/vda` to the command line (unless
    /// boot_args already has a `root=`).
    pub is_root_device: bool,
    /// Refuse guest writes.
    #[serde(default)]
    pub is_read_only: bool,
    /// I/O limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// "Sync" (default) or "Async".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id.
    pub iface_id: String,
    /// The host TAP device.
    pub host_dev_name: String,
    /// `AA:BB:CC:DD:EE:FF`; random when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Limits on frames to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Limits on frames from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id (3 or more).
    pub guest_cid: u32,
    /// The host Unix socket (Firecracker's hybrid vsock).
    pub uds_path: String,
    /// Deprecated in Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /entropy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    /// Limits on the random bytes handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /serial`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    /// Host file (or named pipe) receiving the guest's serial output
    /// instead of `kiln vmm`'s stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// Not supported by Kiln (refused when present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

/// `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// What to do.
    pub action_type: ActionType,
}

/// Firecracker's action types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Build and boot the configured microVM.
    InstanceStart,
    /// Type Ctrl-Alt-Del on the guest's keyboard (post-boot only).
    SendCtrlAltDel,
    /// Write one metrics line now (after InstanceStart).
    FlushMetrics,
}

/// One pre-boot configuration request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PreBootRequest {
    /// `PUT /boot-source`.
    BootSource(BootSource),
    /// `PUT /machine-config`.
    MachineConfig(MachineConfig),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigUpdate),
    /// `PUT /drives/{id}`.
    Drive(Drive),
    /// `PUT /network-interfaces/{id}`.
    NetworkInterface(NetworkInterface),
    /// `PUT /vsock`.
    Vsock(Vsock),
    /// `PUT /entropy`.
    Entropy(Entropy),
    /// `PUT /balloon`.
    Balloon(Balloon),
    /// `PUT /logger`.
    Logger(LoggerConfig),
    /// `PUT /metrics`.
    Metrics(MetricsConfig),
    /// `PUT /serial`.
    Serial(Serial),
    /// `PUT /mmds/config`.
    MmdsConfig(crate::models::MmdsConfig),
    /// `PUT /cpu-config`.
    CpuConfig(crate::cpu_config::CpuConfig),
}

/// A whole microVM configuration: what the pre-boot requests build, what
/// `GET /vm/config` returns, and Firecracker's `--config-file` format.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmResources {
    /// The kernel; required to start.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// Disks, in the order given (the root device is attached first).
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// virtio-net interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// virtio-vsock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// virtio-balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    /// virtio-rng.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
    /// The logger (from `PUT /logger`, the config file or the flags).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    /// The metrics (from `PUT /metrics`, the config file or the flags).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// The serial console's output (`PUT /serial`; not part of
    /// Firecracker's config file or `GET /vm/config`).
    #[serde(skip)]
    pub serial: Option<Serial>,
    /// The metadata service's configuration.
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<crate::models::MmdsConfig>,
    /// The custom CPU template.
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<crate::cpu_config::CpuConfig>,
    /// Firecracker's pmem devices: only an empty list is accepted.
    #[serde(default, skip_serializing)]
    pub pmem: Option<Vec<serde_json::Value>>,
    /// Firecracker's memory hot-plugging: only `null` is accepted.
    #[serde(rename = "memory-hotplug", default, skip_serializing)]
    pub memory_hotplug: Option<serde_json::Value>,
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::Invalid(msg.into())
}

fn check_machine(m: &MachineConfig) -> Result<(), ApiError> {
    if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
        return Err(invalid(format!(
            "Invalid vCPU count: {}. It must be between 1 and {MAX_VCPUS}.",
            m.vcpu_count
        )));
    }
    if m.mem_size_mib < MIN_MEM_MIB {
        return Err(invalid(format!(
            "Invalid memory size: {} MiB. It must be at least {MIN_MEM_MIB} MiB.",
            m.mem_size_mib
        )));
    }
    if m.smt {
        return Err(invalid(
            "Simultaneous multithreading (smt) is not supported by Kiln; set smt to false.",
        ));
    }
    Ok(())
}

/// Replaces the entry with the same id, or appends.
fn upsert<T>(list: &mut Vec<T>, item: T, same: impl Fn(&T, &T) -> bool) {
    match list.iter_mut().find(|x| same(x, &item)) {
        Some(slot) => *slot = item,
        None => list.push(item),
    }
}

impl VmResources {
    /// Applies one pre-boot request, validating it first (nothing changes
    /// on error).
    pub fn apply(&mut self, req: PreBootRequest) -> Result<(), ApiError> {
        match req {
            PreBootRequest::BootSource(b) => {
                if b.kernel_image_path.is_empty() {
                    return Err(invalid("kernel_image_path is empty"));
                }
                self.boot_source = Some(b);
            }
            PreBootRequest::MachineConfig(m) => {
                check_machine(&m)?;
                self.machine_config = m;
            }
            PreBootRequest::PatchMachineConfig(u) => {
                // Firecracker refuses a PATCH that changes nothing.
                if u == MachineConfigUpdate::default() {
                    return Err(invalid("Empty PATCH request.".to_string()));
                }
                let old = &self.machine_config;
                let m = MachineConfig {
                    vcpu_count: u.vcpu_count.unwrap_or(old.vcpu_count),
                    mem_size_mib: u.mem_size_mib.unwrap_or(old.mem_size_mib),
                    smt: u.smt.unwrap_or(old.smt),
                    track_dirty_pages: u.track_dirty_pages.unwrap_or(old.track_dirty_pages),
                };
                check_machine(&m)?;
                self.machine_config = m;
            }
            PreBootRequest::Drive(d) => {
                if d.drive_id.is_empty() || d.drive_id.len() > MAX_DRIVE_ID {
                    return Err(invalid(format!(
                        "Invalid drive_id {:?}: use 1 to {MAX_DRIVE_ID} bytes.",
                        d.drive_id
                    )));
                }
                if d.path_on_host.is_empty() {
                    return Err(invalid("path_on_host is empty"));
                }
                if d.is_root_device
                    && self
                        .drives
                        .iter()
                        .any(|o| o.is_root_device && o.drive_id != d.drive_id)
                {
                    return Err(invalid("A root block device already exists!"));
                }
                upsert(&mut self.drives, d, |a, b| a.drive_id == b.drive_id);
            }
            PreBootRequest::NetworkInterface(n) => {
                if n.iface_id.is_empty() || n.host_dev_name.is_empty() {
                    return Err(invalid("iface_id and host_dev_name must not be empty"));
                }
                if let Some(mac) = &n.guest_mac {
                    if !is_mac(mac) {
                        return Err(invalid(format!(
                            "Invalid guest_mac {mac:?}: expected AA:BB:CC:DD:EE:FF"
                        )));
                    }
                }
                if let Some(o) = self
                    .network_interfaces
                    .iter()
                    .find(|o| o.iface_id != n.iface_id && o.host_dev_name == n.host_dev_name)
                {
                    return Err(invalid(format!(
                        "The host device {} is already used by interface {}",
                        n.host_dev_name, o.iface_id
                    )));
                }
                upsert(&mut self.network_interfaces, n, |a, b| {
                    a.iface_id == b.iface_id
                });
            }
            PreBootRequest::Vsock(v) => {
                if v.guest_cid < 3 {
                    return Err(invalid(format!(
                        "Invalid guest_cid {}: it must be 3 or more.",
                        v.guest_cid
                    )));
                }
                if v.uds_path.is_empty() {
                    return Err(invalid("uds_path is empty"));
                }
                self.vsock = Some(v);
            }
            PreBootRequest::Entropy(e) => self.entropy = Some(e),
            PreBootRequest::Balloon(b) => {
                if b.free_page_hinting {
                    return Err(invalid(
                        "free_page_hinting: free page hinting is not supported by Kiln \
                         (free_page_reporting is)",
                    ));
                }
                self.balloon = Some(b)
            }
            PreBootRequest::Logger(l) => {
                if l.log_path.as_deref() == Some("") {
                    return Err(invalid("log_path is empty"));
                }
                self.logger = Some(self.logger.clone().unwrap_or_default().merged(&l));
            }
            PreBootRequest::Metrics(m) => {
                if m.metrics_path.is_empty() {
                    return Err(invalid("metrics_path is empty"));
                }
                if self.metrics.is_some() {
                    return Err(invalid(
                        "The metrics system is already initialized; it can be configured only once.",
                    ));
                }
                self.metrics = Some(m);
            }
            PreBootRequest::Serial(c) => {
                if c.rate_limiter.is_some() {
                    return Err(invalid(
                        "A rate limiter on the serial console is not supported by Kiln; remove rate_limiter.",
                    ));
                }
                if c.serial_out_path.as_deref() == Some("") {
                    return Err(invalid("serial_out_path is empty"));
                }
                self.serial = Some(c);
            }
            PreBootRequest::MmdsConfig(c) => {
                c.validate().map_err(invalid)?;
                let known = |id: &String| self.network_interfaces.iter().any(|n| &n.iface_id == id);
                if !c.network_interfaces.iter().all(known) {
                    return Err(invalid(
                        "MMDS config error: The list of network interface IDs provided contains \
                         at least one ID that does not correspond to any existing network \
                         interface.",
                    ));
                }
                self.mmds_config = Some(c);
            }
            PreBootRequest::CpuConfig(c) => {
                c.parse().map_err(invalid)?;
                self.cpu_config = Some(c);
            }
        }
        Ok(())
    }

    /// Records a `PATCH /drives/{id}` the running VM accepted (a new path
    /// and/or limits; see [`RateLimiter::patched`]).
    pub fn patch_drive(&mut self, u: &PartialDrive) {
        if let Some(d) = self.drives.iter_mut().find(|d| d.drive_id == u.drive_id) {
            if let Some(p) = &u.path_on_host {
                d.path_on_host = p.clone();
            }
            if let Some(r) = &u.rate_limiter {
                d.rate_limiter = RateLimiter::patched(d.rate_limiter, r);
            }
        }
    }

    /// Records a `PATCH /network-interfaces/{id}` the running VM accepted.
    pub fn patch_network_interface(&mut self, u: &PartialNetworkInterface) {
        let found = self
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == u.iface_id);
        if let Some(n) = found {
            if let Some(r) = &u.rx_rate_limiter {
                n.rx_rate_limiter = RateLimiter::patched(n.rx_rate_limiter, r);
            }
            if let Some(r) = &u.tx_rate_limiter {
                n.tx_rate_limiter = RateLimiter::patched(n.tx_rate_limiter, r);
            }
        }
    }

    /// Checks a whole configuration (as from a config file) with the same
    /// rules as the API requests.
    pub fn validated(self) -> Result<Self, ApiError> {
        let mut r = VmResources::default();
        if let Some(b) = self.boot_source {
            r.apply(PreBootRequest::BootSource(b))?;
        }
        r.apply(PreBootRequest::MachineConfig(self.machine_config))?;
        for d in self.drives {
            let id = d.drive_id.clone();
            if r.drives.iter().any(|o| o.drive_id == id) {
                return Err(invalid(format!("Duplicate drive_id {id:?}")));
            }
            r.apply(PreBootRequest::Drive(d))?;
        }
        for n in self.network_interfaces {
            let id = n.iface_id.clone();
            if r.network_interfaces.iter().any(|o| o.iface_id == id) {
                return Err(invalid(format!("Duplicate iface_id {id:?}")));
            }
            r.apply(PreBootRequest::NetworkInterface(n))?;
        }
        if let Some(v) = self.vsock {
            r.apply(PreBootRequest::Vsock(v))?;
        }
        if let Some(e) = self.entropy {
            r.apply(PreBootRequest::Entropy(e))?;
        }
        if let Some(b) = self.balloon {
            r.apply(PreBootRequest::Balloon(b))?;
        }
        if let Some(l) = self.logger {
            r.apply(PreBootRequest::Logger(l))?;
        }
        if let Some(m) = self.metrics {
            r.apply(PreBootRequest::Metrics(m))?;
        }
        if let Some(c) = self.mmds_config {
            r.apply(PreBootRequest::MmdsConfig(c))?;
        }
        if let Some(c) = self.cpu_config {
            r.apply(PreBootRequest::CpuConfig(c))?;
        }
        if self.pmem.is_some_and(|p| !p.is_empty()) {
            return Err(invalid("pmem devices are not supported by Kiln"));
        }
        if self.memory_hotplug.is_some_and(|m| !m.is_null()) {
            return Err(invalid("memory hot-plugging is not supported by Kiln"));
        }
        Ok(r)
    }

    /// Parses and validates Firecracker's config-file JSON.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let r: VmResources = serde_json::from_str(text).map_err(|e| e.to_string())?;
        r.validated().map_err(|e| e.to_string())
    }

    /// Reads a config file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--config-file {}: {e}", path.display()))?;
        Self::from_json(&text).map_err(|e| format!("--config-file {}: {e}", path.display()))
    }
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Builds and boots the VM for [`PreBootVm`] (the VMM side implements it).
pub trait Starter: Send + Sync {
    /// Builds the VM from `res` and starts its vCPUs; returns the running
    /// VM's control (for the runtime requests), or why it could not start.
    fn start(&self, res: &VmResources) -> Result<Arc<dyn VmControl>, String>;
    /// Restores a VM from a snapshot; returns its control and the
    /// configuration it was built from. Default: not supported.
    fn restore(
        &self,
        _p: &crate::snapshot::SnapshotLoadParams,
    ) -> Result<(Arc<dyn VmControl>, VmResources), String> {
        Err("snapshots are not supported by this VMM".into())
    }
}

enum Stage {
    NotStarted,
    Running(Arc<dyn VmControl>),
}

struct State {
    res: VmResources,
    stage: Stage,
}

/// `kiln vmm`'s [`VmControl`]: pre-boot configuration, `InstanceStart`,
/// then the running VM. One lock guards the state; `InstanceStart` holds it
/// while the VM is built, so no request sees a half-started VM.
pub struct PreBootVm {
    id: String,
    version: String,
    starter: Box<dyn Starter>,
    telemetry: Option<Box<dyn Telemetry>>,
    mmds: Option<Arc<dyn crate::mmds::MmdsData>>,
    state: Mutex<State>,
}

/// The fault message of pre-boot requests once the VM runs.
pub const AFTER_START: &str =
    "The requested operation is not allowed after the microVM has started (InstanceStart).";
/// The fault message of runtime requests before the VM runs.
pub const BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

impl PreBootVm {
    /// A VM in the "Not started" state.
    pub fn new(
        id: impl Into<String>,
        version: impl Into<String>,
        starter: Box<dyn Starter>,
    ) -> Self {
        Self {
            id: id.into(),
            version: version.into(),
            starter,
            telemetry: None,
            mmds: None,
            state: Mutex::new(State {
                res: VmResources::default(),
                stage: Stage::NotStarted,
            }),
        }
    }

    /// Lets `PUT /logger`, `PUT /metrics` and `FlushMetrics` act through
    /// `telemetry` (without it they are refused).
    pub fn with_telemetry(mut self, telemetry: Box<dyn Telemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// Serves `/mmds` from `store` (without it, `/mmds` is refused).
    pub fn with_mmds(mut self, store: Arc<dyn crate::mmds::MmdsData>) -> Self {
        self.mmds = Some(store);
        self
    }

    /// Records a logger and metrics configuration the VMM applied itself
    /// (from its flags), so `GET /vm/config` reports it.
    pub fn set_telemetry_config(
        &self,
        logger: Option<LoggerConfig>,
        metrics: Option<MetricsConfig>,
    ) {
        let mut s = self.state();
        s.res.logger = logger;
        s.res.metrics = metrics;
    }

    fn telemetry(&self) -> Result<&dyn Telemetry, ApiError> {
        self.telemetry
            .as_deref()
            .ok_or_else(|| invalid("Logging and metrics are not available in this VMM"))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a VM started without the API (from a config file).
    pub fn set_running(&self, res: VmResources, running: Arc<dyn VmControl>) {
        let mut s = self.state();
        s.res = res;
        s.stage = Stage::Running(running);
    }

    /// The running VM's control, or the "before start" fault.
    fn running(&self) -> Result<Arc<dyn VmControl>, ApiError> {
        match &self.state().stage {
            Stage::Running(vm) => Ok(vm.clone()),
            Stage::NotStarted => Err(invalid(BEFORE_START)),
        }
    }

    /// Whether the VM has started.
    pub fn is_running(&self) -> bool {
        matches!(self.state().stage, Stage::Running(_))
    }
}

impl VmControl for PreBootVm {
    fn instance_info(&self) -> InstanceInfo {
        let state = match &self.state().stage {
            Stage::Running(vm) => vm.instance_info().state,
            Stage::NotStarted => "Not started".to_string(),
        };
        InstanceInfo {
            id: self.id.clone(),
            state,
            vmm_version: self.version.clone(),
            app_name: "kiln".into(),
        }
    }

    fn balloon(&self) -> Result<Balloon, ApiError> {
        let s = self.state();
        match &s.stage {
            Stage::Running(vm) => vm.balloon(),
            Stage::NotStarted => s.res.balloon.clone().ok_or(ApiError::NoBalloon),
        }
    }

    fn update_balloon(&self, update: &BalloonUpdate) -> Result<(), ApiError> {
        let mut s = self.state();
        match &s.stage {
            Stage::Running(vm) => {
                vm.update_balloon(update)?;
                if let Some(b) = s.res.balloon.as_mut() {
                    b.amount_mib = update.amount_mib;
                }
                Ok(())
            }
            Stage::NotStarted => Err(invalid(BEFORE_START)),
        }
    }

    fn update_balloon_stats(
        &self,
        update: &crate::models::BalloonStatsUpdate,
    ) -> Result<(), ApiError> {
        let mut s = self.state();
        let interval = update.stats_polling_interval_s;
        match &s.stage {
            Stage::Running(vm) => {
                vm.update_balloon_stats(update)?;
                if let Some(b) = s.res.balloon.as_mut() {
                    b.stats_polling_interval_s = interval;
                }
                Ok(())
            }
            Stage::NotStarted => {
                let b = s.res.balloon.as_mut().ok_or(ApiError::NoBalloon)?;
                b.stats_polling_interval_s = interval;
                Ok(())
            }
        }
    }

    fn set_vm_state(&self, state: crate::models::VmState) -> Result<(), ApiError> {
        // Clone the running control out so a slow pause does not hold the lock.
        let vm = match &self.state().stage {
            Stage::Running(vm) => vm.clone(),
            Stage::NotStarted => return Err(invalid(BEFORE_START)),
        };
        vm.set_vm_state(state)
    }

    fn update_drive(&self, update: &PartialDrive) -> Result<(), ApiError> {
        // The running control is cloned out: the update may wait for the
        // device's worker, and the lock must not be held meanwhile.
        let vm = self.running()?;
        vm.update_drive(update)?;
        self.state().res.patch_drive(update);
        Ok(())
    }

    fn update_network_interface(&self, update: &PartialNetworkInterface) -> Result<(), ApiError> {
        let vm = self.running()?;
        vm.update_network_interface(update)?;
        self.state().res.patch_network_interface(update);
        Ok(())
    }

    fn send_ctrl_alt_del(&self) -> Result<(), ApiError> {
        let vm = match &self.state().stage {
            Stage::Running(vm) => vm.clone(),
            Stage::NotStarted => return Err(invalid(BEFORE_START)),
        };
        vm.send_ctrl_alt_del()
    }

    fn balloon_stats(&self) -> Result<BalloonStats, ApiError> {
        match &self.state().stage {
            Stage::Running(vm) => vm.balloon_stats(),
            Stage::NotStarted => Err(invalid(BEFORE_START)),
        }
    }

    fn machine_config(&self) -> Result<MachineConfig, ApiError> {
        Ok(self.state().res.machine_config.clone())
    }

    fn configure(&self, req: PreBootRequest) -> Result<(), ApiError> {
        let mut s = self.state();
        if let Stage::Running(_) = s.stage {
            return Err(invalid(AFTER_START));
        }
        match req {
            PreBootRequest::Logger(_) | PreBootRequest::Metrics(_) => {
                // Validate on a copy, then open the files, then commit.
                let telemetry = self.telemetry()?;
                let mut next = s.res.clone();
                let is_logger = matches!(req, PreBootRequest::Logger(_));
                next.apply(req)?;
                let done = match (is_logger, &next.logger, &next.metrics) {
                    (true, Some(l), _) => telemetry.configure_logger(l),
                    (false, _, Some(m)) => telemetry.configure_metrics(m),
                    _ => Ok(()),
                };
                done.map_err(invalid)?;
                s.res = next;
                Ok(())
            }
            req => s.res.apply(req),
        }
    }

    fn start_instance(&self) -> Result<(), ApiError> {
        let mut s = self.state();
        if let Stage::Running(_) = s.stage {
            return Err(invalid(AFTER_START));
        }
        if s.res.boot_source.is_none() {
            return Err(invalid(
                "Cannot start microvm without kernel configuration (PUT /boot-source).",
            ));
        }
        let running = self
            .starter
            .start(&s.res)
            .map_err(|e| invalid(format!("Cannot start the microVM: {e}")))?;
        s.stage = Stage::Running(running);
        Ok(())
    }

    fn flush_metrics(&self) -> Result<(), ApiError> {
        if let Stage::NotStarted = self.state().stage {
            return Err(invalid(BEFORE_START));
        }
        self.telemetry()?.flush_metrics().map_err(invalid)
    }

    fn vm_config(&self) -> Result<VmResources, ApiError> {
        Ok(self.state().res.clone())
    }

    fn create_snapshot(&self, p: &crate::snapshot::SnapshotCreateParams) -> Result<(), ApiError> {
        let vm = match &self.state().stage {
            Stage::Running(vm) => vm.clone(),
            Stage::NotStarted => return Err(invalid(BEFORE_START)),
        };
        vm.create_snapshot(p)
    }

    fn migrate(
        &self,
        p: &crate::migrate::MigrateParams,
    ) -> Result<crate::migrate::MigrationReport, ApiError> {
        // Not holding the state lock: a migration takes a while.
        let vm = self.running()?;
        vm.migrate(p)
    }

    fn after_response(&self) {
        if let Ok(vm) = self.running() {
            vm.after_response();
        }
    }

    fn mmds(&self, op: crate::mmds::MmdsOp) -> Result<Option<serde_json::Value>, ApiError> {
        let store = self.mmds.as_ref().ok_or_else(|| {
            invalid("The microVM metadata service is not available from this VMM")
        })?;
        // Before the start the store takes data for later; once the VM
        // runs, only if an interface reaches the service (as Firecracker).
        let s = self.state();
        if matches!(s.stage, Stage::Running(_)) && s.res.mmds_config.is_none() {
            return Err(invalid(crate::mmds::NOT_INITIALIZED));
        }
        drop(s);
        store.apply(op)
    }

    fn load_snapshot(&self, p: &crate::snapshot::SnapshotLoadParams) -> Result<(), ApiError> {
        let mut s = self.state();
        if let Stage::Running(_) = s.stage {
            return Err(invalid(
                "Loading a microVM snapshot is not allowed after the microVM has started.",
            ));
        }
        if s.res != VmResources::default() {
            return Err(invalid(
                "Loading a microVM snapshot is not allowed after configuring boot-specific resources.",
            ));
        }
        p.memory_backend().map_err(invalid)?;
        let (running, res) = self
            .starter
            .restore(p)
            .map_err(|e| invalid(format!("Cannot load the snapshot: {e}")))?;
        s.res = res;
        s.stage = Stage::Running(running);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A running VM with a balloon at 0 MiB.
    struct Running;

    impl VmControl for Running {
        fn instance_info(&self) -> InstanceInfo {
            // PreBootVm takes only the state from the running VM.
            InstanceInfo {
                id: "inner".into(),
                state: "Running".into(),
                vmm_version: "0".into(),
                app_name: "inner".into(),
            }
        }
        fn balloon(&self) -> Result<Balloon, ApiError> {
            Ok(Balloon {
                amount_mib: 0,
                deflate_on_oom: false,
                stats_polling_interval_s: 0,
                free_page_hinting: false,
                free_page_reporting: false,
            })
        }
        fn update_balloon(&self, _: &BalloonUpdate) -> Result<(), ApiError> {
            Ok(())
        }
        fn balloon_stats(&self) -> Result<BalloonStats, ApiError> {
            Err(ApiError::StatsDisabled)
        }
        fn send_ctrl_alt_del(&self) -> Result<(), ApiError> {
            Ok(())
        }
    }

    /// Starts unless the kernel path is "/missing"; counts starts.
    struct FakeStarter(Arc<AtomicUsize>);

    impl Starter for FakeStarter {
        fn start(&self, res: &VmResources) -> Result<Arc<dyn VmControl>, String> {
            let k = &res.boot_source.as_ref().unwrap().kernel_image_path;
            if k == "/missing" {
                return Err(format!("cannot open the kernel {k}: No such file"));
            }
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(Running))
        }
    }

    fn vm() -> (PreBootVm, Arc<AtomicUsize>) {
        let n = Arc::new(AtomicUsize::new(0));
        (
            PreBootVm::new("test-vm", "0.1.0", Box::new(FakeStarter(n.clone()))),
            n,
        )
    }

    use crate::server::serve_connection;
    use crate::tests_endpoints::{fault, req};
    use crate::DEFAULT_MAX_PAYLOAD;

    const BOOT: &str = r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0"}"#;

    #[test]
    fn machine_config_validation() {
        let (v, _) = vm();
        let r = req(&v, "GET", "/machine-config", None);
        assert_eq!(
            r.body,
            r#"{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false}"#
        );
        for (body, expect) in [
            (
                r#"{"vcpu_count":0,"mem_size_mib":256}"#,
                "Invalid vCPU count: 0",
            ),
            (
                r#"{"vcpu_count":33,"mem_size_mib":256}"#,
                "between 1 and 32",
            ),
            (r#"{"vcpu_count":300,"mem_size_mib":256}"#, "invalid value"),
            (r#"{"vcpu_count":2,"mem_size_mib":64}"#, "at least 128 MiB"),
            (r#"{"vcpu_count":2,"mem_size_mib":256,"smt":true}"#, "smt"),
            (r#"{"vcpu_count":2}"#, "missing field `mem_size_mib`"),
            (
                r#"{"vcpu_count":2,"mem_size_mib":256,"cpu_template":"T2"}"#,
                "unknown field",
            ),
        ] {
            let m = fault(&req(&v, "PUT", "/machine-config", Some(body)));
            assert!(m.contains(expect), "{body}: {m}");
        }
        let r = req(
            &v,
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count":2,"mem_size_mib":256}"#),
        );
        assert_eq!(r.status, 204, "{r:?}");
        let m = fault(&req(
            &v,
            "PATCH",
            "/machine-config",
            Some(r#"{"vcpu_count":64}"#),
        ));
        assert!(m.contains("between 1 and 32"), "{m}");
        // As Firecracker: a PATCH that changes nothing is refused.
        let m = fault(&req(&v, "PATCH", "/machine-config", Some("{}")));
        assert_eq!(m, "Empty PATCH request.");
        let r = req(
            &v,
            "PATCH",
            "/machine-config",
            Some(r#"{"mem_size_mib":512}"#),
        );
        assert_eq!(r.status, 204, "{r:?}");
        let r = req(&v, "GET", "/machine-config", None);
        assert!(
            r.body.contains(r#""vcpu_count":2,"mem_size_mib":512"#),
            "{r:?}"
        );
    }

    #[test]
    fn drives_and_interfaces() {
        let (v, _) = vm();
        let d = r#"{"drive_id":"rootfs","path_on_host":"/r.img","is_root_device":true,"is_read_only":false,"io_engine":"Async","rate_limiter":{"bandwidth":{"size":1000,"refill_time":100},"ops":{"size":10,"one_time_burst":5,"refill_time":1000}}}"#;
        let m = fault(&req(&v, "PUT", "/drives/other", Some(d)));
        assert!(m.contains("does not match"), "{m}");
        assert_eq!(req(&v, "PUT", "/drives/rootfs", Some(d)).status, 204);
        // The same id again replaces it.
        assert_eq!(req(&v, "PUT", "/drives/rootfs", Some(d)).status, 204);
        let d2 = r#"{"drive_id":"data","path_on_host":"/d.img","is_root_device":true,"is_read_only":true}"#;
        let m = fault(&req(&v, "PUT", "/drives/data", Some(d2)));
        assert!(m.contains("root block device already exists"), "{m}");
        let bad_engine =
            r#"{"drive_id":"x","path_on_host":"/d","is_root_device":false,"io_engine":"Uring"}"#;
        assert!(fault(&req(&v, "PUT", "/drives/x", Some(bad_engine))).contains("unknown variant"));
        let n = r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:AC:10:00:02"}"#;
        assert!(
            fault(&req(&v, "PUT", "/network-interfaces/eth1", Some(n))).contains("does not match")
        );
        assert_eq!(
            req(&v, "PUT", "/network-interfaces/eth0", Some(n)).status,
            204
        );
        let n = r#"{"iface_id":"eth1","host_dev_name":"tap1","guest_mac":"06:00"}"#;
        assert!(fault(&req(&v, "PUT", "/network-interfaces/eth1", Some(n))).contains("guest_mac"));
        let m = fault(&req(
            &v,
            "PUT",
            "/vsock",
            Some(r#"{"guest_cid":2,"uds_path":"/v.sock"}"#),
        ));
        assert!(m.contains("guest_cid"), "{m}");
        let res = v.vm_config().unwrap();
        assert_eq!(res.drives.len(), 1);
        let rl = res.drives[0].rate_limiter.unwrap();
        assert_eq!(rl.ops.unwrap().one_time_burst, 5);
        assert_eq!(rl.bandwidth.unwrap().one_time_burst, 0);
        assert_eq!(res.drives[0].io_engine, Some(IoEngine::Async));
    }

    #[test]
    fn start_rules() {
        let (v, starts) = vm();
        let root = req(&v, "GET", "/", None);
        assert!(
            root.body
                .contains(r#""id":"test-vm","state":"Not started""#),
            "{root:?}"
        );
        let start = r#"{"action_type":"InstanceStart"}"#;
        let m = fault(&req(&v, "PUT", "/actions", Some(start)));
        assert!(m.contains("without kernel configuration"), "{m}");
        assert!(
            fault(&req(&v, "PATCH", "/balloon", Some(r#"{"amount_mib":1}"#)))
                .contains("before starting")
        );
        let cad = r#"{"action_type":"SendCtrlAltDel"}"#;
        let m = fault(&req(&v, "PUT", "/actions", Some(cad)));
        assert_eq!(m, BEFORE_START);
        assert!(fault(&req(
            &v,
            "PUT",
            "/actions",
            Some(r#"{"action_type":"Boot"}"#)
        ))
        .contains("unknown variant"));
        // A start that fails leaves the VM configurable.
        let missing = r#"{"kernel_image_path":"/missing"}"#;
        assert_eq!(req(&v, "PUT", "/boot-source", Some(missing)).status, 204);
        let m = fault(&req(&v, "PUT", "/actions", Some(start)));
        assert!(m.contains("cannot open the kernel /missing"), "{m}");
        assert!(req(&v, "GET", "/", None).body.contains("Not started"));
        assert_eq!(req(&v, "PUT", "/boot-source", Some(BOOT)).status, 204);
        let b = r#"{"amount_mib":0,"deflate_on_oom":false,"stats_polling_interval_s":0}"#;
        assert_eq!(req(&v, "PUT", "/balloon", Some(b)).status, 204);
        assert_eq!(req(&v, "PUT", "/entropy", Some("{}")).status, 204);
        assert_eq!(req(&v, "PUT", "/actions", Some(start)).status, 204);
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        assert!(req(&v, "GET", "/", None)
            .body
            .contains(r#""state":"Running""#));
        // Pre-boot requests and a second start are refused; runtime ones work.
        for (m, uri, body) in [
            ("PUT", "/boot-source", BOOT),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count":1,"mem_size_mib":256}"#,
            ),
            ("PATCH", "/machine-config", r#"{"vcpu_count":1}"#),
            (
                "PUT",
                "/drives/a",
                r#"{"drive_id":"a","path_on_host":"/a","is_root_device":false}"#,
            ),
            ("PUT", "/balloon", b),
            ("PUT", "/entropy", "{}"),
            ("PUT", "/actions", start),
        ] {
            let f = fault(&req(&v, m, uri, Some(body)));
            assert!(
                f.contains("not allowed after the microVM has started"),
                "{uri}: {f}"
            );
        }
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        assert_eq!(
            req(&v, "PATCH", "/balloon", Some(r#"{"amount_mib":3}"#)).status,
            204
        );
        // Post-boot, SendCtrlAltDel reaches the running VM.
        let r = req(&v, "PUT", "/actions", Some(cad));
        assert_eq!((r.status, r.body.as_str()), (204, ""));
        let c = req(&v, "GET", "/vm/config", None);
        assert_eq!(
            c.body,
            r#"{"boot-source":{"kernel_image_path":"/k","boot_args":"console=ttyS0"},"drives":[],"machine-config":{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false},"network-interfaces":[],"balloon":{"amount_mib":3,"deflate_on_oom":false,"stats_polling_interval_s":0,"free_page_hinting":false,"free_page_reporting":false},"entropy":{}}"#
        );
        // What GET /vm/config returns is a valid config file.
        let back = VmResources::from_json(&c.body).unwrap();
        assert_eq!(back, v.vm_config().unwrap());
    }

    /// Records what it is asked; paths named "/fail" cannot be opened.
    #[derive(Default)]
    struct FakeTelemetry {
        calls: Arc<Mutex<Vec<String>>>,
    }

    impl Telemetry for FakeTelemetry {
        fn configure_logger(&self, c: &LoggerConfig) -> Result<(), String> {
            if c.log_path.as_deref() == Some("/fail") {
                return Err("cannot open /fail".into());
            }
            self.calls.lock().unwrap().push(format!("logger {c:?}"));
            Ok(())
        }
        fn configure_metrics(&self, c: &MetricsConfig) -> Result<(), String> {
            if c.metrics_path == "/fail" {
                return Err("cannot open /fail".into());
            }
            self.calls
                .lock()
                .unwrap()
                .push(format!("metrics {}", c.metrics_path));
            Ok(())
        }
        fn flush_metrics(&self) -> Result<(), String> {
            self.calls.lock().unwrap().push("flush".into());
            Ok(())
        }
    }

    fn api_count(section: &str, field: &str) -> u64 {
        crate::metrics::API_METRICS
            .snapshot()
            .into_iter()
            .find(|(s, f, _)| *s == section && f == field)
            .unwrap()
            .2
    }

    #[test]
    fn logger_and_metrics() {
        let (plain, _) = vm();
        let m = fault(&req(&plain, "PUT", "/logger", Some(r#"{"level":"Info"}"#)));
        assert!(m.contains("not available"), "{m}");

        let t = FakeTelemetry::default();
        let calls = t.calls.clone();
        let (v, _) = vm();
        let v = v.with_telemetry(Box::new(t));
        let logger_puts = api_count("put_api_requests", "logger_count");
        let logger_fails = api_count("put_api_requests", "logger_fails");
        for (body, expect) in [
            (
                r#"{"level":"Info","colour":true}"#,
                "unknown field `colour`",
            ),
            (r#"{"level":"Loud"}"#, "Invalid log level"),
            (r#"{"show_level":"yes"}"#, "invalid type"),
            (r#"{"log_path":""}"#, "log_path is empty"),
            (r#"{"log_path":"/fail"}"#, "cannot open /fail"),
            ("", "body is empty"),
        ] {
            let m = fault(&req(&v, "PUT", "/logger", Some(body)));
            assert!(m.contains(expect), "{body}: {m}");
        }
        assert!(calls.lock().unwrap().is_empty());
        let l = r#"{"log_path":"/l.log","level":"warn","show_level":true}"#;
        assert_eq!(req(&v, "PUT", "/logger", Some(l)).status, 204);
        // A second PUT /logger (pre-boot) updates the given fields only.
        let l2 = r#"{"level":"Debug","show_log_origin":true}"#;
        assert_eq!(req(&v, "PUT", "/logger", Some(l2)).status, 204);
        // Other tests run in parallel: the counters only grow.
        assert!(api_count("put_api_requests", "logger_count") >= logger_puts + 8);
        assert!(api_count("put_api_requests", "logger_fails") >= logger_fails + 6);
        let logger = v.vm_config().unwrap().logger.unwrap();
        assert_eq!(logger.log_path.as_deref(), Some("/l.log"));
        assert_eq!(logger.level, Some(crate::LogLevel::Debug));
        assert_eq!(
            (logger.show_level, logger.show_log_origin),
            (Some(true), Some(true))
        );

        for (body, expect) in [
            ("{}", "missing field `metrics_path`"),
            (r#"{"metrics_path":"/m","x":1}"#, "unknown field `x`"),
            (r#"{"metrics_path":""}"#, "metrics_path is empty"),
            (r#"{"metrics_path":"/fail"}"#, "cannot open /fail"),
        ] {
            let m = fault(&req(&v, "PUT", "/metrics", Some(body)));
            assert!(m.contains(expect), "{body}: {m}");
        }
        assert!(v.vm_config().unwrap().metrics.is_none());
        let mb = r#"{"metrics_path":"/m.json","emit_id":true,"properties":{"k":"v"}}"#;
        assert_eq!(req(&v, "PUT", "/metrics", Some(mb)).status, 204);
        let m = fault(&req(&v, "PUT", "/metrics", Some(mb)));
        assert!(m.contains("already initialized"), "{m}");

        let flush = r#"{"action_type":"FlushMetrics"}"#;
        let m = fault(&req(&v, "PUT", "/actions", Some(flush)));
        assert!(m.contains("before starting"), "{m}");
        let config = req(&v, "GET", "/vm/config", None).body;
        assert!(
            config.contains(r#""logger":{"log_path":"/l.log","level":"Debug","show_level":true,"show_log_origin":true}"#),
            "{config}"
        );
        assert!(
            config.contains(
                r#""metrics":{"metrics_path":"/m.json","emit_id":true,"properties":{"k":"v"}}"#
            ),
            "{config}"
        );
        // GET /vm/config is a valid config file, logger and metrics included.
        assert_eq!(
            VmResources::from_json(&config).unwrap(),
            v.vm_config().unwrap()
        );

        assert_eq!(req(&v, "PUT", "/boot-source", Some(BOOT)).status, 204);
        let start = r#"{"action_type":"InstanceStart"}"#;
        assert_eq!(req(&v, "PUT", "/actions", Some(start)).status, 204);
        assert_eq!(req(&v, "PUT", "/actions", Some(flush)).status, 204);
        for (uri, body) in [("/logger", l), ("/metrics", r#"{"metrics_path":"/n"}"#)] {
            let m = fault(&req(&v, "PUT", uri, Some(body)));
            assert!(m.contains("not allowed after"), "{uri}: {m}");
        }
        let calls = calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 4, "{calls:?}");
        assert!(calls[0].contains("Warning") && calls[0].contains("/l.log"));
        assert!(calls[1].contains("Debug") && calls[1].contains("/l.log"));
        assert_eq!(calls[2..], ["metrics /m.json", "flush"]);
    }

    /// A client that went away: every write fails.
    struct Gone;

    impl std::io::Write for Gone {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn unwritable_responses_are_counted() {
        let (v, _) = vm();
        let m = &crate::metrics::API_METRICS;
        let before = m.sync_response_fails.load(Ordering::Relaxed);
        let input = "GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        serve_connection(input.as_bytes(), Gone, &v, DEFAULT_MAX_PAYLOAD);
        assert!(m.sync_response_fails.load(Ordering::Relaxed) > before);
    }

    #[test]
    fn config_files() {
        let good = r#"{
          "boot-source": {"kernel_image_path": "/k", "initrd_path": "/i", "boot_args": "console=ttyS0 -- echo hi"},
          "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": true}],
          "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
          "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
          "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"},
          "balloon": {"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1},
          "entropy": {"rate_limiter": {"bandwidth": {"size": 100, "refill_time": 10}}}
        }"#;
        let r = VmResources::from_json(good).unwrap();
        assert_eq!(r.machine_config.vcpu_count, 2);
        assert_eq!(r.boot_source.unwrap().initrd_path.as_deref(), Some("/i"));
        assert!(r.drives[0].is_read_only);
        assert_eq!(r.vsock.unwrap().guest_cid, 3);
        assert!(r.entropy.unwrap().rate_limiter.unwrap().bandwidth.is_some());
        // Only the boot source: machine-config takes Firecracker's defaults.
        let r = VmResources::from_json(r#"{"boot-source":{"kernel_image_path":"/k"}}"#).unwrap();
        assert_eq!(r.machine_config, MachineConfig::default());

        for (text, expect) in [
            (
                r#"{"boot-source":{"kernel_image_path":"/k"},"logger":{"colour":true}}"#,
                "unknown field `colour`",
            ),
            (r#"{"logger":{"level":"Loud"}}"#, "Invalid log level"),
            (r#"{"metrics":{}}"#, "missing field `metrics_path`"),
            (
                r#"{"boot-source":{"kernel_image_path":"/k","extra":1}}"#,
                "unknown field `extra`",
            ),
            (
                r#"{"machine-config":{"vcpu_count":"2","mem_size_mib":256}}"#,
                "invalid type: string \"2\", expected u8",
            ),
            (
                r#"{"machine-config":{"vcpu_count":0,"mem_size_mib":256}}"#,
                "Invalid vCPU count",
            ),
            (
                r#"{"machine-config":{"vcpu_count":2,"mem_size_mib":256,"smt":true}}"#,
                "smt",
            ),
            (
                r#"{"drives":[{"drive_id":"a","path_on_host":"/a","is_root_device":false},{"drive_id":"a","path_on_host":"/b","is_root_device":false}]}"#,
                "Duplicate drive_id",
            ),
            (r#"{"drives":{}}"#, "invalid type: map, expected a sequence"),
            ("{", "EOF"),
        ] {
            let e = VmResources::from_json(text).unwrap_err();
            assert!(e.contains(expect), "{text}: {e}");
        }

        let dir = std::env::temp_dir().join(format!("kiln-preboot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.json");
        std::fs::write(&f, r#"{"vsock":3}"#).unwrap();
        let e = VmResources::from_file(&f).unwrap_err();
        assert!(
            e.starts_with(&format!("--config-file {}: invalid type", f.display())),
            "{e}"
        );
        let e = VmResources::from_file(&dir.join("none.json")).unwrap_err();
        assert!(e.contains("none.json: No such file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
