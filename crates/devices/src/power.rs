//! The ACPI hardware-reduced sleep control register: the guest writes
//! SLP_TYP|SLP_EN here to power off (the DSDT names \_S5 with type 5).

use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Signals `poweroff` when the guest enters sleep state `s5_type`.
pub struct SleepControl {
    s5_type: u8,
    poweroff: EventFd,
}

impl SleepControl {
    /// A register that signals `poweroff` for sleep type `s5_type`.
    pub fn new(s5_type: u8, poweroff: EventFd) -> Self {
        Self { s5_type, poweroff }
    }
}

impl BusDevice for SleepControl {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Wake status is never set: the guest does not wake up.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        if offset == 0 && v & SLP_EN != 0 && (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK == self.s5_type {
            if let Err(e) = self.poweroff.write(1) {
                log::error!("power: cannot signal poweroff: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_enable_powers_off() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = SleepControl::new(5, evt.try_clone().unwrap());
        d.write(0, &[5 << 2]); // no SLP_EN
        d.write(0, &[(3 << 2) | SLP_EN]); // S3
        assert!(evt.read().is_err());
        d.write(0, &[(5 << 2) | SLP_EN]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
