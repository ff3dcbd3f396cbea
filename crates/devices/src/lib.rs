//! Kiln device models.
//!
//! Every device the guest can reach sits behind the [`BusDevice`] trait and is
//! registered on a [`Bus`] (one for port I/O, one for MMIO). The vCPU threads
//! dispatch their I/O exits through the bus; devices never see guest memory
//! unless they are given it explicitly.

pub mod boot_timer;
pub mod bus;
pub mod cmos;
pub mod i8042;
pub mod power;
pub mod pvpanic;
pub mod rate_limiter;
pub mod serial;
pub mod virtio;

#[doc(hidden)]
pub mod fuzz_harness;

pub use bus::{Bus, BusDevice, BusError};

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
