//! The i8042 keyboard controller: only what a guest needs to reset the machine
//! (`reboot=k` writes 0xfe to port 0x64).

use crate::{BusDevice, EventFdTrigger};

/// i8042 on ports 0x60..=0x64 (registered at 0x60, length 5).
pub struct I8042 {
    inner: vm_superio::I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// `reset` is signalled when the guest asks for a CPU reset.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            inner: vm_superio::I8042Device::new(reset),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Only the data (0x60) and status/command (0x64) ports exist.
        let v = if data.len() == 1 && (offset == 0 || offset == 4) {
            self.inner.read(offset as u8)
        } else {
            0xff
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && (offset == 0 || offset == 4) {
            if let Err(e) = self.inner.write(offset as u8, data[0]) {
                log::error!("i8042: failed to signal reset: {e}");
            }
        }
    }
}
