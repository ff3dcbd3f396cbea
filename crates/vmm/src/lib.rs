//! Kiln's VMM core: a KVM virtual machine that boots a Linux kernel.
//!
//! [`Vmm::new`] validates a [`VmConfig`], creates the VM, its memory and
//! legacy devices, loads the kernel and writes the boot tables; [`Vmm::run`]
//! starts one thread per vCPU and waits on the event loop until the guest
//! reboots, powers off, panics or fails.

pub mod acpi;
pub mod boot;
pub mod cpu_template;
pub mod cpuid;
pub mod dirty;
pub mod kvm_state;
pub mod layout;
pub mod memory_file;
pub mod migration;
pub mod mptable;
pub mod probe;
pub mod regs;
mod snapshot;
pub mod stats;
pub mod uffd;
pub mod uffd_handler;
mod vcpu;
mod vm;

pub use kiln_devices;
pub use snapshot::SnapshotStats;
pub use uffd::MemBackend;
pub use vcpu::VcpuStop;
pub use vm::{ExitReason, VmHandle, Vmm};

use std::path::PathBuf;

/// Default kernel command line: serial console, keyboard-controller reboot,
/// reboot one second after a panic, no PCI probing.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd quiet";

/// What to boot and with how much.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Kernel image (bzImage or ELF vmlinux).
    pub kernel: PathBuf,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs (1..=32).
    pub vcpus: u8,
    /// Guest memory in MiB (>= 128).
    pub mem_mib: u64,
    /// virtio-blk disks, in order (/dev/vda, /dev/vdb, ...).
    pub disks: Vec<kiln_devices::virtio::block::BlockConfig>,
    /// Attach a virtio-rng device.
    pub rng: bool,
    /// Rate limit for the virtio-rng device.
    pub rng_rate_limiter: Option<kiln_devices::rate_limiter::RateLimiterConfig>,
    /// virtio-net interfaces backed by TAP devices.
    pub nets: Vec<kiln_devices::virtio::net::NetConfig>,
    /// A virtio-vsock device bridged to a Unix socket.
    pub vsock: Option<kiln_devices::virtio::vsock::VsockConfig>,
    /// Attach a virtio-balloon device.
    pub balloon: Option<kiln_devices::virtio::balloon::BalloonConfig>,
    /// Log the pages the guest writes from boot on (diff snapshots, live
    /// migration); Firecracker's `track_dirty_pages`.
    pub track_dirty_pages: bool,
    /// A custom CPU template (Firecracker's `/cpu-config`).
    pub cpu_template: Option<cpu_template::CpuTemplate>,
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            mem_mib: 256,
            disks: Vec::new(),
            rng: false,
            rng_rate_limiter: None,
            balloon: None,
            track_dirty_pages: false,
            cpu_template: None,
            nets: Vec::new(),
            vsock: None,
        }
    }

    /// Checks values that need no I/O.
    pub fn validate(&self) -> Result<(), VmmError> {
        if self.vcpus == 0 || self.vcpus > layout::MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "vCPU count {} is out of range: use 1 to {}",
                self.vcpus,
                layout::MAX_VCPUS
            )));
        }
        if self.mem_mib < layout::MIN_MEM_MIB {
            return Err(VmmError::Config(format!(
                "guest memory {} MiB is too small: use at least {} MiB",
                self.mem_mib,
                layout::MIN_MEM_MIB
            )));
        }
        // 1 TiB is far beyond what a microVM needs, and keeps sizes in range.
        if self.mem_mib > 1 << 20 {
            return Err(VmmError::Config(format!(
                "guest memory {} MiB is too large: use at most 1048576 MiB",
                self.mem_mib
            )));
        }
        if self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.balloon.is_some())
            + usize::from(self.vsock.is_some())
            > layout::MAX_VIRTIO_DEVICES
        {
            return Err(VmmError::Config(format!(
                "too many virtio devices: at most {}",
                layout::MAX_VIRTIO_DEVICES
            )));
        }
        if self.cmdline.len() >= layout::CMDLINE_MAX {
            return Err(VmmError::Config(format!(
                "kernel command line is {} bytes; the limit is {}",
                self.cmdline.len(),
                layout::CMDLINE_MAX - 1
            )));
        }
        Ok(())
    }
}

/// Errors from building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error("{0}")]
    Config(String),
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM enabled and accessible to this user?)")]
    KvmOpen(kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The step.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory: {detail}")]
    Memory {
        /// Requested size.
        mib: u64,
        /// Details.
        detail: String,
    },
    /// Loading the kernel or writing boot data failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// vCPU register setup failed.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// ACPI tables could not be built.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// A device could not be registered.
    #[error("device setup: {0}")]
    Device(String),
    /// An OS resource (eventfd, epoll, thread) failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The error.
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_limits() {
        let mut c = VmConfig::new("/k");
        assert!(c.validate().is_ok());
        c.vcpus = 0;
        assert!(c.validate().unwrap_err().to_string().contains("1 to 32"));
        c.vcpus = 33;
        assert!(c.validate().is_err());
        c.vcpus = 32;
        c.mem_mib = 127;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("at least 128"));
        c.mem_mib = 128;
        c.cmdline = "x".repeat(5000);
        assert!(c.validate().is_err());
    }
}
