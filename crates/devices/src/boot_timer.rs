//! Boot timer: the guest's init writes the magic byte to this MMIO page when
//! user space is up, and the VMM logs how long the boot took. Same address and
//! magic as Firecracker's, so existing guest images work unchanged.

use std::time::{Duration, Instant};

use crate::BusDevice;

/// Guest physical address of the boot timer page.
pub const BOOT_TIMER_ADDR: u64 = 0xd000_0000;
/// Size of the region.
pub const BOOT_TIMER_LEN: u64 = 0x1000;
/// The value that marks "init reached".
pub const MAGIC: u8 = 123;

/// Records the first magic write relative to the VMM's start.
pub struct BootTimer {
    start: Instant,
    reported: Option<Duration>,
}

impl BootTimer {
    /// `start` is when the VMM process began.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            reported: None,
        }
    }

    /// The boot time, once the guest reported it.
    pub fn boot_time(&self) -> Option<Duration> {
        self.reported
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&MAGIC) && self.reported.is_none() {
            let t = self.start.elapsed();
            self.reported = Some(t);
            log::info!(
                "Guest-boot-time = {:>6} us {} ms",
                t.as_micros(),
                t.as_millis()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_magic_at_offset_zero_counts() {
        let mut t = BootTimer::new(Instant::now());
        t.write(0, &[1]);
        t.write(4, &[MAGIC]);
        assert!(t.boot_time().is_none());
        t.write(0, &[MAGIC]);
        let first = t.boot_time().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        t.write(0, &[MAGIC]);
        assert_eq!(t.boot_time(), Some(first));
    }
}
