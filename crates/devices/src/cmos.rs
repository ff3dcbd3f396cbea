//! A minimal MC146818 CMOS RTC on ports 0x70/0x71: the wall clock (UTC, BCD,
//! 24-hour) and status registers that report "no update in progress" and
//! "battery good". Without it the guest's rtc_cmos driver spins for seconds
//! on a floating bus before giving up.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Register A: 32.768 kHz time base, 1024 Hz rate, UIP clear.
const A_DEFAULT: u8 = 0x26;
/// Register B: 24-hour mode, BCD.
const B_24H: u8 = 0x02;
/// Register D: valid RAM and time (battery good).
const D_VRT: u8 = 0x80;

/// The CMOS device, registered at port 0x70 with length 2.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Cmos {
    /// A CMOS with empty NVRAM.
    pub fn new() -> Self {
        Self {
            index: 0,
            ram: [0; 128],
        }
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Civil date (year, month, day) from days since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The clock registers for `secs` seconds since the epoch.
pub fn time_registers(secs: u64) -> [(u8, u8); 8] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
    let weekday = ((days + 4).rem_euclid(7) + 1) as u64;
    [
        (REG_SECONDS, bcd(rem % 60)),
        (REG_MINUTES, bcd((rem / 60) % 60)),
        (REG_HOURS, bcd(rem / 3600)),
        (REG_WEEKDAY, bcd(weekday)),
        (REG_DAY, bcd(day)),
        (REG_MONTH, bcd(month)),
        (REG_YEAR, bcd((year % 100) as u64)),
        (REG_CENTURY, bcd((year / 100) as u64)),
    ]
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != 1 || data.len() != 1 {
            data.fill(0xff);
            return;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        data[0] = match self.index {
            REG_A => A_DEFAULT,
            REG_B => B_24H,
            REG_C => 0,
            REG_D => D_VRT,
            i => time_registers(now)
                .iter()
                .find(|(r, _)| *r == i)
                .map(|(_, v)| *v)
                .unwrap_or(self.ram[i as usize & 0x7f]),
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask; ignore it.
            0 => self.index = v & 0x7f,
            1 => match self.index {
                // The clock and status registers are read-only here.
                REG_SECONDS..=REG_D | REG_CENTURY => {}
                i => self.ram[i as usize] = v,
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        // 2026-11-24 01:02:03 UTC, a Tuesday.
        let t = time_registers(1_795_482_123);
        let get = |r| t.iter().find(|(x, _)| *x == r).unwrap().1;
        assert_eq!(get(REG_YEAR), 0x26);
        assert_eq!(get(REG_CENTURY), 0x20);
        assert_eq!(get(REG_MONTH), 0x11);
        assert_eq!(get(REG_DAY), 0x24);
        assert_eq!(get(REG_HOURS), 0x01);
        assert_eq!(get(REG_MINUTES), 0x02);
        assert_eq!(get(REG_SECONDS), 0x03);
        assert_eq!(get(REG_WEEKDAY), 3);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn status_and_nvram() {
        let mut c = Cmos::new();
        let mut b = [0u8];
        c.write(0, &[0x80 | REG_A]);
        c.read(1, &mut b);
        assert_eq!(b[0] & 0x80, 0, "update-in-progress must be clear");
        c.write(0, &[REG_D]);
        c.read(1, &mut b);
        assert_eq!(b[0], D_VRT);
        c.write(0, &[0x40]);
        c.write(1, &[0x5a]);
        c.read(1, &mut b);
        assert_eq!(b[0], 0x5a);
    }
}
