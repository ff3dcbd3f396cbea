//! Virtio devices over the virtio-mmio transport (virtio 1.x, modern only).
//!
//! Every device implements [`VirtioDevice`]; the [`mmio::MmioTransport`]
//! emulates the register file on the vCPU threads and, when the driver sets
//! DRIVER_OK, hands the device its queues, their notification eventfds
//! (KVM ioeventfds) and an [`Interrupt`] (a KVM irqfd). The device then does
//! all its work on its own thread ([`worker`]), never on a vCPU thread.

pub mod balloon;
pub mod block;
pub mod live;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub(crate) mod testing;
pub mod vsock;
pub mod worker;

use crate::GuestMem;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// VIRTIO_F_VERSION_1: every Kiln device is a modern device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: the device used buffers.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the MMIO InterruptStatus register plus the
/// irqfd that injects the GSI.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// An interrupt raising `irqfd`.
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Signals "used buffers".
    pub fn signal_used(&self) {
        self.signal(INT_USED_RING);
    }

    /// Signals "configuration changed".
    pub fn signal_config(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            log::error!("virtio: cannot raise interrupt: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver is ready.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMem,
    /// Queues in index order, each with its notification eventfd.
    pub queues: Vec<(Queue, EventFd)>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
}

/// Errors from activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer queues than the device needs.
    #[error("{device}: driver enabled {got} queues, the device needs {want}")]
    Queues {
        /// Device name.
        device: String,
        /// Queues enabled.
        got: usize,
        /// Queues needed.
        want: usize,
    },
    /// The worker could not start.
    #[error("{device}: {source}")]
    Io {
        /// Device name.
        device: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Counters every device keeps; bad requests from the guest are counted here
/// (and logged at debug level), never fatal.
#[derive(Default, Debug)]
pub struct DeviceMetrics {
    /// Requests completed.
    pub requests: AtomicU64,
    /// Malformed requests or descriptor chains (too short, wrong direction,
    /// outside guest memory, looping) rejected.
    pub invalid_requests: AtomicU64,
    /// Backend I/O errors reported to the guest.
    pub io_errors: AtomicU64,
    /// Bytes the device read from guest memory.
    pub bytes_from_guest: AtomicU64,
    /// Bytes the device wrote to guest memory.
    pub bytes_to_guest: AtomicU64,
    /// Times a rate limiter stopped a queue (one per throttling episode).
    pub throttled: AtomicU64,
    /// Completed operations that moved data to the guest: block reads,
    /// frames delivered to the guest, balloon deflations.
    pub reads: AtomicU64,
    /// Completed operations that moved data from the guest: block writes,
    /// frames the guest sent, balloon inflations.
    pub writes: AtomicU64,
    /// Completed block flushes.
    pub flushes: AtomicU64,
}

impl DeviceMetrics {
    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A device's own state in a snapshot (see [`VirtioDevice::save_state`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceSnapshot {
    /// The balloon's target, reported size and statistics settings.
    Balloon(balloon::BalloonSnapshot),
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// Short name for logs (e.g. "block rootfs").
    fn name(&self) -> String;
    /// The virtio device ID.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Features the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of [`Self::features`]).
    fn ack_features(&mut self, features: u64);
    /// Reads device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device's work.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device's work and returns it to its initial state.
    fn reset(&mut self);
    /// The device's counters.
    fn metrics(&self) -> Arc<DeviceMetrics>;
    /// Called once the device was activated again from a snapshot, in a new
    /// VMM: what the guest's driver knew of the old backend is stale.
    fn restored(&mut self) {}
    /// State of the device's own a snapshot keeps besides the transport's
    /// registers and guest memory (most devices have none).
    fn save_state(&self) -> Option<DeviceSnapshot> {
        None
    }
    /// Loads what [`Self::save_state`] gave, before the device is activated
    /// again.
    fn restore_state(&mut self, _state: &DeviceSnapshot) -> Result<(), String> {
        Err(format!(
            "{}: the snapshot has state this device does not keep",
            self.name()
        ))
    }
    /// The worker thread, while the device is active (to pause it for a
    /// snapshot).
    fn worker(&self) -> Option<&worker::Worker>;
}

/// Reads `data.len()` bytes of a config structure `config` at `offset`,
/// filling with zero beyond its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let off = offset as usize;
    if off < config.len() {
        let n = data.len().min(config.len() - off);
        data[..n].copy_from_slice(&config[off..off + n]);
    }
}
