//! The virtio-mmio transport (virtio 1.2, section 4.2.2), version 2 only.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::BusDevice;

/// Size of one device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of QueueNotify (where the VMM registers ioeventfds).
pub const QUEUE_NOTIFY: u64 = 0x050;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4b49_4c4e; // "KILN"

#[cfg(test)]
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;

/// One device behind the MMIO register file.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`; `queue_evts` are the ioeventfds registered for its
    /// QueueNotify register (one per queue, matching the queue index) and
    /// `irqfd` its interrupt.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        queue_evts: Vec<EventFd>,
        irqfd: EventFd,
    ) -> Self {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue max size is a power of two"))
            .collect();
        Self {
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queue_evts,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    /// The device's interrupt (e.g. to signal a config change).
    pub fn interrupt(&self) -> Arc<Interrupt> {
        self.interrupt.clone()
    }

    /// The wrapped device.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The wrapped device, mutably (for post-boot updates).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change before DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits may only be added, in the order the spec gives.
        let new_bits = v & !self.status;
        if v & self.status != self.status {
            log::debug!(
                "{}: driver cleared status bits ({:#x} -> {v:#x})",
                self.device.name(),
                self.status
            );
            return;
        }
        if new_bits & STATUS_FEATURES_OK != 0 {
            // Features are final: the driver must have accepted VERSION_1.
            if self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                log::warn!(
                    "{}: driver did not accept VIRTIO_F_VERSION_1",
                    self.device.name()
                );
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
            self.device.ack_features(self.driver_features);
        }
        if new_bits & STATUS_DRIVER_OK != 0 && v & STATUS_FEATURES_OK == 0 {
            log::warn!("{}: DRIVER_OK without FEATURES_OK", self.device.name());
            return;
        }
        self.status = v;
        if new_bits & STATUS_DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                log::warn!(
                    "{}: queue {i} is not valid (addresses outside guest memory or bad size)",
                    self.device.name()
                );
                self.status |= STATUS_NEEDS_RESET;
                self.interrupt.signal_config();
                return;
            }
            let evt = match self.queue_evts.get(i).map(|e| e.try_clone()) {
                Some(Ok(e)) => e,
                _ => {
                    log::error!(
                        "{}: no notification eventfd for queue {i}",
                        self.device.name()
                    );
                    self.status |= STATUS_FAILED;
                    return;
                }
            };
            let copy = match Queue::try_from(q.state()) {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("{}: queue {i}: {e:?}", self.device.name());
                    self.status |= STATUS_NEEDS_RESET;
                    self.interrupt.signal_config();
                    return;
                }
            };
            queues.push((copy, evt));
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::error!("virtio activation failed: {e}");
                self.status |= STATUS_NEEDS_RESET;
                self.interrupt.signal_config();
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR,
            0x010 => {
                let f = self.device.features() | VIRTIO_F_VERSION_1;
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.selected().map(|q| q.max_size() as u32).unwrap_or(0),
            0x044 => self.selected().map(|q| q.ready() as u32).unwrap_or(0),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => {
                log::debug!(
                    "{}: read of unknown register {offset:#x}",
                    self.device.name()
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let cfg = self.queue_config_allowed();
        match offset {
            0x014 => self.device_features_sel = v,
            0x020 => {
                if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0 {
                    let offered = self.device.features() | VIRTIO_F_VERSION_1;
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                    // Drivers can only accept what was offered.
                    self.driver_features &= offered;
                }
            }
            0x024 => self.driver_features_sel = v,
            0x030 => self.queue_sel = v,
            0x038 if cfg => {
                if let Some(q) = self.selected() {
                    q.set_size(v as u16);
                }
            }
            0x044 if cfg => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            0x050 => {
                // Notifications normally go straight to the ioeventfd; a write
                // that reaches us (no ioeventfd) is forwarded by hand.
                if let Some(e) = self.queue_evts.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            0x064 => self.interrupt.ack(v),
            0x070 => self.set_status(v),
            0x080 if cfg => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x084 if cfg => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x090 if cfg => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x094 if cfg => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0x0a0 if cfg => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0x0a4 if cfg => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            _ => log::debug!(
                "{}: ignored write {v:#x} to register {offset:#x} (status {:#x})",
                self.device.name(),
                self.status
            ),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            if self.status & STATUS_DRIVER != 0 {
                self.device.write_config(offset - 0x100, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            log::debug!(
                "{}: ignored {}-byte write at {offset:#x}",
                self.device.name(),
                data.len()
            );
            return;
        }
        let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        self.write_reg(offset, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActivateError, DeviceMetrics};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    struct Dummy {
        acked: u64,
        activated: Arc<Mutex<Option<usize>>>,
        resets: Arc<Mutex<u32>>,
    }
    impl VirtioDevice for Dummy {
        fn name(&self) -> String {
            "dummy".into()
        }
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 5
        }
        fn ack_features(&mut self, f: u64) {
            self.acked = f;
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            super::super::read_config_bytes(&[1, 2, 3, 4], offset, data)
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            *self.activated.lock().unwrap() = Some(ctx.queues.len());
            Ok(())
        }
        fn reset(&mut self) {
            *self.resets.lock().unwrap() += 1;
        }
        fn metrics(&self) -> Arc<DeviceMetrics> {
            Arc::default()
        }
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }
    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    type Activated = Arc<Mutex<Option<usize>>>;

    fn transport() -> (MmioTransport, Activated, Arc<Mutex<u32>>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let activated = Arc::new(Mutex::new(None));
        let resets = Arc::new(Mutex::new(0));
        let dev = Dummy {
            acked: 0,
            activated: activated.clone(),
            resets: resets.clone(),
        };
        let evts = (0..2)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let t = MmioTransport::new(
            Box::new(dev),
            mem,
            evts,
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        (t, activated, resets)
    }

    #[test]
    fn identification_and_config() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), 42);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 is bit 32");
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(b, [3, 4]);
    }

    #[test]
    fn handshake_activates_ready_queues_and_reset_stops() {
        let (mut t, activated, resets) = transport();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Queue setup before FEATURES_OK is ignored.
        w(&mut t, 0x44, 1);
        assert_eq!(r(&mut t, 0x44), 0);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1); // VERSION_1
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 << 5 | 1 << 7); // bit 7 was not offered
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(&mut t, 0x70, s);
        assert_eq!(r(&mut t, 0x70), s);
        // Queue 0: 16 entries at valid addresses.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, 0x1000);
        w(&mut t, 0x90, 0x2000);
        w(&mut t, 0xa0, 0x3000);
        w(&mut t, 0x44, 1);
        assert_eq!(r(&mut t, 0x44), 1);
        w(&mut t, 0x70, s | STATUS_DRIVER_OK);
        assert_eq!(*activated.lock().unwrap(), Some(1));
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, 0x80, 0x5000);
        w(&mut t, 0x70, 0);
        assert_eq!(*resets.lock().unwrap(), 1);
        assert_eq!(r(&mut t, 0x70), 0);
        assert_eq!(r(&mut t, 0x44), 0);
    }

    #[test]
    fn missing_version_1_fails_features_ok() {
        let (mut t, activated, _) = transport();
        w(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        w(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK,
        );
        assert!(activated.lock().unwrap().is_none());
    }

    #[test]
    fn queue_outside_memory_is_not_activated() {
        let (mut t, activated, _) = transport();
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER;
        w(&mut t, 0x70, s);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, s | STATUS_FEATURES_OK);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, 0xfff_0000); // beyond 1 MiB of guest memory
        w(&mut t, 0x90, 0x2000);
        w(&mut t, 0xa0, 0x3000);
        w(&mut t, 0x44, 1);
        w(&mut t, 0x70, s | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert!(activated.lock().unwrap().is_none());
        assert_ne!(r(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    }
}
