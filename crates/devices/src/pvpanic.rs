//! pvpanic over MMIO (ACPI _HID "QEMU0001"): the guest kernel's pvpanic driver
//! writes here when it panics, so the VMM can end with a clear error instead of
//! mistaking the panic's reboot for a clean one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Guest physical address of the pvpanic register.
pub const PVPANIC_ADDR: u64 = 0xd000_1000;
/// Size of the region.
pub const PVPANIC_LEN: u64 = 0x1000;

const PANICKED: u8 = 1 << 0;
const CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic device; `panicked` is shared with the VMM's exit path.
pub struct PvPanic {
    panicked: Arc<AtomicBool>,
    notify: EventFd,
}

impl PvPanic {
    /// `notify` is signalled when the guest reports a panic.
    pub fn new(panicked: Arc<AtomicBool>, notify: EventFd) -> Self {
        Self { panicked, notify }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Offset 0 advertises the events we understand.
        data.fill(0);
        if offset == 0 && !data.is_empty() {
            data[0] = PANICKED | CRASH_LOADED;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first().is_some_and(|v| v & PANICKED != 0) {
            self.panicked.store(true, Ordering::SeqCst);
            if let Err(e) = self.notify.write(1) {
                log::error!("pvpanic: cannot notify the VMM: {e}");
            }
        }
    }
}
