//! Kiln device models.
//!
//! Every device the guest can reach sits behind the [`BusDevice`] trait and is
//! registered on a [`Bus`] (one for port I/O, one for MMIO). The vCPU threads
//! dispatch their I/O exits through the bus; devices never see guest memory
//! unless they are given it explicitly.

pub mod boot_timer;
pub mod bus;
pub mod cmos;
pub mod dirty;
pub mod i8042;
pub mod power;
pub mod pvpanic;
pub mod rate_limiter;
pub mod serial;
pub mod virtio;

#[doc(hidden)]
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz_harness;

pub use bus::{Bus, BusDevice, BusError};

/// Guest memory as the VMM and every device see it: mmap'd regions, each
/// with a dirty-page bitmap (one bit per 4 KiB page) that vm-memory sets on
/// every write made through its `Bytes`/`VolatileSlice` API. Together with
/// KVM's dirty log (vCPU writes) it tells diff snapshots and live migration
/// which pages changed. Use this alias, never `vm_memory::GuestMemoryMmap`
/// (whose default `()` bitmap tracks nothing).
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// One region of [`GuestMem`].
pub type GuestRegion = vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>;

/// The bitmap slice carried by views into [`GuestMem`].
pub type GuestBitmapSlice<'a> = vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>;

/// A virtqueue chain reader over [`GuestMem`].
pub type ChainReader<'a> = virtio_queue::Reader<'a, GuestBitmapSlice<'a>>;

/// A virtqueue chain writer over [`GuestMem`] (its writes mark pages dirty).
pub type ChainWriter<'a> = virtio_queue::Writer<'a, GuestBitmapSlice<'a>>;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line or notification backed by an eventfd (irqfd in KVM).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps an eventfd.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// A second handle on the same eventfd.
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }

    /// The underlying eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
