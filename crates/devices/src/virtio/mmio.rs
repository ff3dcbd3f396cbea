//! The virtio-mmio transport (virtio 1.2, section 4.2.2), version 2 only.

use crate::GuestMem;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
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
    mem: GuestMem,
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
        mem: GuestMem,
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

/// The transport's registers and its queues' configuration, as saved in a
/// snapshot. Queue positions are not saved: every Kiln device completes the
/// requests it takes in order before it pauses, so on restore both the next
/// available and the next used positions equal the used ring's index, which
/// is in guest memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioState {
    /// The device's virtio type (checked on restore).
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Whether the device was activated (DRIVER_OK seen and accepted).
    pub activated: bool,
    /// Each queue's registers.
    pub queues: Vec<QueueRegs>,
    /// The device's own state, if it keeps any.
    pub device: Option<super::DeviceSnapshot>,
}

/// One queue's driver-written registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegs {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
}

impl MmioTransport {
    /// Pauses the device's worker (if active) so it touches neither guest
    /// memory nor its queues; false if it did not stop within `timeout`.
    pub fn pause_device(&self, timeout: std::time::Duration) -> bool {
        self.device.worker().is_none_or(|w| w.pause(timeout))
    }

    /// Lets a paused device worker go on.
    pub fn resume_device(&self) {
        if let Some(w) = self.device.worker() {
            w.resume();
        }
    }

    /// The registers to save (call with the device paused).
    pub fn save_state(&self) -> MmioState {
        MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegs {
                    size: q.size(),
                    ready: q.ready(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                })
                .collect(),
            device: self.device.save_state(),
        }
    }

    /// Loads saved registers into a fresh transport (same device type and
    /// queue count) and, if the device was active, activates it again with
    /// its queues resuming where the guest's used rings say. Raises the
    /// interrupt if one was pending.
    pub fn restore_state(&mut self, st: &MmioState) -> Result<(), String> {
        let name = self.device.name();
        if st.device_type != self.device.device_type() {
            return Err(format!(
                "{name}: the snapshot has a device of type {} here, this VM one of type {}",
                st.device_type,
                self.device.device_type()
            ));
        }
        if st.queues.len() != self.queues.len() {
            return Err(format!(
                "{name}: the snapshot has {} queues, the device {}",
                st.queues.len(),
                self.queues.len()
            ));
        }
        if let Some(d) = &st.device {
            self.device.restore_state(d)?;
        }
        for (q, r) in self.queues.iter_mut().zip(&st.queues) {
            q.set_size(r.size);
            q.set_desc_table_address(Some(r.desc as u32), Some((r.desc >> 32) as u32));
            q.set_avail_ring_address(Some(r.avail as u32), Some((r.avail >> 32) as u32));
            q.set_used_ring_address(Some(r.used as u32), Some((r.used >> 32) as u32));
            q.set_ready(r.ready);
            if r.ready && st.activated {
                let used = q
                    .used_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                    .map_err(|e| format!("{name}: reading a used ring: {e:?}"))?;
                q.set_next_avail(used.0);
                q.set_next_used(used.0);
            }
        }
        self.status = st.status;
        self.driver_features = st.driver_features & (self.device.features() | VIRTIO_F_VERSION_1);
        self.queue_sel = st.queue_sel;
        self.device_features_sel = st.device_features_sel;
        self.driver_features_sel = st.driver_features_sel;
        self.config_generation = st.config_generation;
        if st.status & STATUS_FEATURES_OK != 0 {
            self.device.ack_features(self.driver_features);
        }
        if st.activated {
            self.activate();
            if !self.activated {
                return Err(format!("{name}: the device could not be activated again"));
            }
            self.device.restored();
        }
        if st.interrupt_status != 0 {
            // Re-raise what the guest had not acknowledged yet.
            if st.interrupt_status & super::INT_CONFIG != 0 {
                self.interrupt.signal_config();
            }
            if st.interrupt_status & super::INT_USED_RING != 0 {
                self.interrupt.signal_used();
            }
        }
        Ok(())
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
        next_avail: Arc<Mutex<Vec<u16>>>,
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
            *self.next_avail.lock().unwrap() =
                ctx.queues.iter().map(|(q, _)| q.next_avail()).collect();
            Ok(())
        }
        fn reset(&mut self) {
            *self.resets.lock().unwrap() += 1;
        }
        fn worker(&self) -> Option<&crate::virtio::worker::Worker> {
            None
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
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (t, a, r, _) = transport_on(mem);
        (t, a, r)
    }

    type NextAvail = Arc<Mutex<Vec<u16>>>;

    fn transport_on(mem: GuestMem) -> (MmioTransport, Activated, Arc<Mutex<u32>>, NextAvail) {
        let activated = Arc::new(Mutex::new(None));
        let resets = Arc::new(Mutex::new(0));
        let next_avail = Arc::new(Mutex::new(Vec::new()));
        let dev = Dummy {
            acked: 0,
            activated: activated.clone(),
            resets: resets.clone(),
            next_avail: next_avail.clone(),
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
        (t, activated, resets, next_avail)
    }

    /// Drives `t` through the handshake with queue 0 at 0x1000/0x2000/0x3000.
    fn bring_up(t: &mut MmioTransport) {
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, 0x24, 1);
        w(t, 0x20, 1);
        let s = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(t, 0x70, s);
        w(t, 0x30, 0);
        w(t, 0x38, 16);
        w(t, 0x80, 0x1000);
        w(t, 0x90, 0x2000);
        w(t, 0xa0, 0x3000);
        w(t, 0x44, 1);
        w(t, 0x70, s | STATUS_DRIVER_OK);
    }

    #[test]
    fn saved_state_restores_into_a_fresh_transport() {
        use vm_memory::Bytes;
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (mut a, _, _, _) = transport_on(mem.clone());
        bring_up(&mut a);
        w(&mut a, 0x30, 1); // QueueSel left at 1
                            // The guest has seen 5 used buffers.
        mem.write_obj(5u16, GuestAddress(0x3002)).unwrap();
        a.interrupt().signal_used();
        let st = a.save_state();
        assert!(st.activated);
        assert_eq!(st.queues[0].used, 0x3000);

        let (mut b, activated, _, next_avail) = transport_on(mem.clone());
        b.restore_state(&st).unwrap();
        assert_eq!(*activated.lock().unwrap(), Some(1));
        assert_eq!(*next_avail.lock().unwrap(), vec![5]);
        assert_eq!(r(&mut b, 0x70), st.status);
        assert_eq!(r(&mut b, 0x60), 1, "the pending interrupt is raised again");
        assert_eq!(b.save_state(), st);

        // A snapshot of another kind of device is refused.
        let mut other = st.clone();
        other.device_type = 2;
        let (mut c, activated, _, _) = transport_on(mem.clone());
        assert!(c.restore_state(&other).unwrap_err().contains("type 2"));
        assert_eq!(*activated.lock().unwrap(), None);
        let mut other = st.clone();
        other.queues.pop();
        assert!(c.restore_state(&other).unwrap_err().contains("queues"));
        // So is device state for a device that keeps none.
        let mut other = st;
        other.device = crate::virtio::balloon::Balloon::new(Default::default()).save_state();
        let err = c.restore_state(&other).unwrap_err();
        assert!(err.contains("state this device does not keep"), "{err}");
        assert_eq!(*activated.lock().unwrap(), None);
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
