//! [`VmResources`]: the whole configuration the pre-boot requests build
//! (and a `--config-file` holds), with Firecracker's rules.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::invalid;
use super::models::*;
use crate::models::{Balloon, PartialDrive, PartialNetworkInterface};
use crate::telemetry::{LoggerConfig, MetricsConfig};
use crate::ApiError;

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
