//! An address bus: a sorted map of non-overlapping ranges, each owned by a device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through port I/O or MMIO.
///
/// `offset` is relative to the base address the device was registered at.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from registering devices on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A range of length zero, or one that wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus of devices keyed by base address.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let mut ranges = self.ranges.write().expect("bus lock poisoned");
        // The closest range starting at or below the new one must end before it...
        if let Some((b, e)) = ranges.range(..=base).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        // ...and the next range must start at or after its end.
        if let Some((b, _)) = ranges.range(base..).next() {
            if *b < end {
                return Err(BusError::Overlap { base, len });
            }
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().expect("bus lock poisoned");
        let (base, entry) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        if offset.checked_add(size as u64)? <= entry.len {
            Some((offset, entry.device.clone()))
        } else {
            None
        }
    }

    /// Dispatches a read; returns false (and leaves `data` alone) when no
    /// device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock().expect("device lock poisoned").read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .expect("device lock poisoned")
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn overlap_rejected_and_dispatch_by_offset() {
        let bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf8, 0x9),
            Err(BusError::Overlap { base: 0xf8, len: 9 })
        );
        assert!(bus.insert(dev.clone(), 0x110, 0x10).is_ok());
        assert!(bus.insert(dev.clone(), 0xf0, 0x10).is_ok());
        assert_eq!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::BadRange {
                base: u64::MAX,
                len: 2
            })
        );

        let mut buf = [0u8; 2];
        assert!(bus.read(0x105, &mut buf));
        assert_eq!(buf, [5, 5]);
        // An access straddling the end of a device is not dispatched.
        assert!(!bus.read(0x11f, &mut buf));
        assert!(!bus.read(0x200, &mut buf));
        assert!(bus.write(0x103, &[7]));
        assert_eq!(dev.lock().unwrap().0, vec![(3, vec![7])]);
    }
}
