//! Counters the VMM keeps for the metrics (`kiln vmm --metrics-path`).
//!
//! Every counter is cumulative (a relaxed atomic that only grows); whoever
//! reports them computes the increase since its previous report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kiln_devices::virtio::DeviceMetrics;
use kiln_devices::BusDevice;

/// Adds one to `c`.
pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// vCPU exits, summed over every vCPU.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    /// Port reads (IN).
    pub exit_io_in: AtomicU64,
    /// Port writes (OUT).
    pub exit_io_out: AtomicU64,
    /// MMIO reads.
    pub exit_mmio_read: AtomicU64,
    /// MMIO writes.
    pub exit_mmio_write: AtomicU64,
    /// vCPUs that stopped because KVM failed (not a guest reset or power-off).
    pub failures: AtomicU64,
    /// KVM_KVMCLOCK_CTRL failures when parking a vCPU for a pause.
    pub kvmclock_ctrl_fails: AtomicU64,
}

/// Guest accesses to a legacy (port I/O) device.
#[derive(Debug, Default)]
pub struct BusCounters {
    /// Reads.
    pub reads: AtomicU64,
    /// Writes.
    pub writes: AtomicU64,
}

/// Counts the accesses to `dev`, then forwards them.
pub(crate) struct Counted<D> {
    pub(crate) dev: D,
    pub(crate) counters: Arc<BusCounters>,
}

impl<D: BusDevice> BusDevice for Counted<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        inc(&self.counters.reads);
        self.dev.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        inc(&self.counters.writes);
        self.dev.write(offset, data);
    }
}

/// A device the VMM also uses directly (the serial port), as a bus device.
pub(crate) struct Shared<T>(pub(crate) Arc<Mutex<T>>);

impl<T: BusDevice> BusDevice for Shared<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(offset, data);
    }
}

/// The kind of a virtio device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net,
    /// virtio-vsock.
    Vsock,
    /// virtio-rng.
    Rng,
    /// virtio-balloon.
    Balloon,
}

/// One virtio device's counters.
#[derive(Clone, Debug)]
pub struct DeviceStats {
    /// What the device is.
    pub kind: DeviceKind,
    /// Its id (drive_id, iface_id; empty for the others).
    pub id: String,
    /// Its counters.
    pub metrics: Arc<DeviceMetrics>,
}

/// Every counter of a VM, shared with the VM's threads.
#[derive(Clone, Debug, Default)]
pub struct VmStats {
    /// vCPU exits.
    pub vcpu: Arc<VcpuCounters>,
    /// The serial port (COM1).
    pub uart: Arc<BusCounters>,
    /// The i8042 keyboard controller.
    pub i8042: Arc<BusCounters>,
    /// The CMOS real-time clock.
    pub rtc: Arc<BusCounters>,
    /// Events the VMM's event loop handled.
    pub device_events: Arc<AtomicU64>,
    /// The virtio devices, in attachment order.
    pub devices: Vec<DeviceStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u8>);

    impl BusDevice for Echo {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(7);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    #[test]
    fn counted_forwards_and_counts() {
        let counters = Arc::new(BusCounters::default());
        let inner = Arc::new(Mutex::new(Echo(Vec::new())));
        let mut dev = Counted {
            dev: Shared(inner.clone()),
            counters: counters.clone(),
        };
        let mut b = [0u8; 2];
        dev.read(0, &mut b);
        dev.write(1, &[1, 2]);
        dev.write(1, &[3]);
        assert_eq!(b, [7, 7]);
        assert_eq!(inner.lock().unwrap().0, vec![1, 2, 3]);
        assert_eq!(counters.reads.load(Ordering::Relaxed), 1);
        assert_eq!(counters.writes.load(Ordering::Relaxed), 2);
    }
}
