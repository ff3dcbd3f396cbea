//! The pre-boot requests' bodies (Firecracker's field names) and limits.

use serde::{Deserialize, Serialize};

use crate::models::Balloon;
use crate::telemetry::{LoggerConfig, MetricsConfig};

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
