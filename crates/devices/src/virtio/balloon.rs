//! virtio-balloon: the host sets a target, the guest gives that many pages
//! back (inflate) and the VMM drops them from its RSS with
//! MADV_DONTNEED; deflate hands them back (they fault in again on use).
//! Optional deflate-on-OOM and a statistics queue.

use crate::GuestMem;
use kiln_seccomp::ThreadKind;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
use virtio_queue::{Queue, QueueT, Reader};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::worker::{Next, Worker};
use super::{
    read_config_bytes, ActivateContext, ActivateError, DeviceMetrics, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Feature bit: statistics virtqueue.
pub const F_STATS_VQ: u64 = 1 << 1;
/// Feature bit: the guest deflates when it runs out of memory.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Feature bit: free page reporting (virtio 1.2, 5.5.6.7).
pub const F_REPORTING: u64 = 1 << 5;
const PAGE_SHIFT: u64 = 12;
const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
const QUEUE_SIZE: u16 = 256;

/// Balloon settings.
#[derive(Clone, Debug, Default)]
pub struct BalloonConfig {
    /// Initial target size of the balloon, MiB.
    pub target_mib: u64,
    /// Let the guest take pages back under memory pressure.
    pub deflate_on_oom: bool,
    /// Seconds between statistics refreshes (0: no statistics queue).
    pub stats_interval_s: u32,
    /// The guest reports free memory blocks, which the VMM then drops from
    /// its memory (Firecracker's `free_page_reporting`).
    pub free_page_reporting: bool,
}

/// Guest memory statistics (virtio 1.2, 5.5.6.3), in bytes where applicable.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    /// Target size, MiB.
    pub target_mib: u64,
    /// Current size, MiB.
    pub actual_mib: u64,
    /// (tag, value) pairs as the guest last reported them.
    pub raw: Vec<(u16, u64)>,
}

impl BalloonStats {
    /// The value of statistic `tag`, if reported.
    pub fn get(&self, tag: u16) -> Option<u64> {
        self.raw.iter().find(|(t, _)| *t == tag).map(|(_, v)| *v)
    }
}

/// Statistic tags.
pub mod tags {
    /// Free memory, bytes.
    pub const MEMFREE: u16 = 4;
    /// Total memory, bytes.
    pub const MEMTOT: u16 = 5;
    /// Available memory, bytes.
    pub const AVAIL: u16 = 6;
}

struct Shared {
    /// Seconds between statistics refreshes (0: statistics disabled).
    stats_interval_s: AtomicU32,
    /// Tells the worker the interval changed (while activated).
    interval_changed: Mutex<Option<Arc<EventFd>>>,
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    stats: Mutex<Vec<(u16, u64)>>,
    interrupt: Mutex<Option<Arc<Interrupt>>>,
}

/// Statistics were asked to be turned on or off after the device was built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "Balloon statistics cannot be enabled or disabled after boot \
     (stats_polling_interval_s {old} -> {new})"
)]
pub struct StatsIntervalError {
    /// The current interval.
    pub old: u32,
    /// The requested one.
    pub new: u32,
}

/// A handle the VMM keeps to steer the balloon after boot.
#[derive(Clone)]
pub struct BalloonHandle(Arc<Shared>);

impl BalloonHandle {
    /// Sets a new target and tells the guest.
    pub fn set_target_mib(&self, mib: u64) {
        let pages = ((mib << 20) >> PAGE_SHIFT).min(u64::from(u32::MAX)) as u32;
        self.0.target_pages.store(pages, Ordering::SeqCst);
        if let Some(i) = self.0.interrupt.lock().expect("balloon lock").as_ref() {
            i.signal_config();
        }
    }

    /// The current statistics polling interval, seconds (0: disabled).
    pub fn stats_interval_s(&self) -> u32 {
        self.0.stats_interval_s.load(Ordering::SeqCst)
    }

    /// Changes the statistics polling interval of a balloon that has
    /// statistics; the next refresh is asked for at once. Statistics cannot
    /// be turned on or off (the statistics queue exists or not).
    pub fn set_stats_interval_s(&self, secs: u32) -> Result<(), StatsIntervalError> {
        let old = self.stats_interval_s();
        if (old == 0) != (secs == 0) {
            return Err(StatsIntervalError { old, new: secs });
        }
        self.0.stats_interval_s.store(secs, Ordering::SeqCst);
        if let Some(e) = self
            .0
            .interval_changed
            .lock()
            .expect("balloon lock")
            .as_ref()
        {
            let _ = e.write(1);
        }
        Ok(())
    }

    /// Current numbers and the guest's last statistics.
    pub fn stats(&self) -> BalloonStats {
        BalloonStats {
            target_mib: (u64::from(self.0.target_pages.load(Ordering::SeqCst)) << PAGE_SHIFT) >> 20,
            actual_mib: (u64::from(self.0.actual_pages.load(Ordering::SeqCst)) << PAGE_SHIFT) >> 20,
            raw: self.0.stats.lock().expect("balloon lock").clone(),
        }
    }
}

/// What a snapshot keeps of a balloon beyond its configuration: the target
/// and statistics interval as last set (through the API after boot), the
/// size the guest last reported and its last statistics.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonSnapshot {
    target_pages: u32,
    actual_pages: u32,
    stats_interval_s: u32,
    stats: Vec<(u16, u64)>,
}

/// The balloon device.
pub struct Balloon {
    config: BalloonConfig,
    shared: Arc<Shared>,
    acked: u64,
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
}

impl Balloon {
    /// A balloon with `config`.
    pub fn new(config: BalloonConfig) -> Self {
        let shared = Arc::new(Shared {
            stats_interval_s: AtomicU32::new(config.stats_interval_s),
            interval_changed: Mutex::new(None),
            target_pages: AtomicU32::new(
                ((config.target_mib << 20) >> PAGE_SHIFT).min(u64::from(u32::MAX)) as u32,
            ),
            actual_pages: AtomicU32::new(0),
            stats: Mutex::new(Vec::new()),
            interrupt: Mutex::new(None),
        });
        Self {
            config,
            shared,
            acked: 0,
            worker: None,
            metrics: Arc::default(),
        }
    }

    /// A handle for changing the target and reading statistics.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle(self.shared.clone())
    }
}

fn on_off(interval_s: u32) -> String {
    match interval_s {
        0 => "off".into(),
        s => format!("every {s} s"),
    }
}

/// Drops the guest pages named by the PFN arrays in `queue` from the host's
/// memory (inflate) or just acknowledges them (deflate).
pub fn drain_page_queue(
    queue: &mut Queue,
    mem: &GuestMem,
    release: bool,
    metrics: &DeviceMetrics,
) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        match Reader::new(mem, chain) {
            Ok(mut r) => {
                let mut buf = [0u8; 4];
                while r.read_exact(&mut buf).is_ok() {
                    let pfn = u64::from(u32::from_le_bytes(buf));
                    if release && !release_page(mem, pfn) {
                        DeviceMetrics::add(&metrics.invalid_requests, 1);
                    }
                }
                DeviceMetrics::add(&metrics.requests, 1);
                DeviceMetrics::add(
                    if release {
                        &metrics.writes
                    } else {
                        &metrics.reads
                    },
                    1,
                );
            }
            Err(_) => DeviceMetrics::add(&metrics.invalid_requests, 1),
        }
        let _ = queue.add_used(mem, head, 0);
        used = true;
    }
    used
}

/// Drops the free page blocks the guest reports in `queue` (each
/// descriptor one block) from the host's memory. Returns whether any chain
/// was used.
pub fn drain_reports(queue: &mut Queue, mem: &GuestMem, metrics: &DeviceMetrics) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut ok = true;
        let mut n = 0;
        for d in chain {
            n += 1;
            if n > usize::from(QUEUE_SIZE) || !release_range(mem, d.addr().0, u64::from(d.len())) {
                ok = false;
                break;
            }
        }
        DeviceMetrics::add(
            if ok {
                &metrics.writes
            } else {
                &metrics.invalid_requests
            },
            1,
        );
        DeviceMetrics::add(&metrics.requests, 1);
        let _ = queue.add_used(mem, head, 0);
        used = true;
    }
    used
}

/// Drops `len` bytes of guest memory at `addr` (page-aligned, inside one
/// RAM region) from the host's memory; false (and nothing done) otherwise.
fn release_range(mem: &GuestMem, addr: u64, len: u64) -> bool {
    if len == 0 || !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return false;
    }
    let Some((region, offset)) = mem.to_region_addr(GuestAddress(addr)) else {
        return false;
    };
    if offset
        .raw_value()
        .checked_add(len)
        .is_none_or(|end| end > region.len())
    {
        return false;
    }
    let Ok(host) = region.get_host_address(offset) else {
        return false;
    };
    // SAFETY: [host, host + len) lies inside one guest memory mapping owned
    // by the VMM (checked against the region above); MADV_DONTNEED only
    // drops the contents of pages the guest reported free.
    let dropped = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) == 0 };
    crate::dirty::mark(mem, GuestAddress(addr), len as usize);
    dropped
}

fn release_page(mem: &GuestMem, pfn: u64) -> bool {
    let Some(addr) = pfn.checked_mul(PAGE_SIZE) else {
        return false;
    };
    // The page must lie wholly inside one guest RAM region.
    let Ok(host) = mem.get_host_address(GuestAddress(addr)) else {
        return false;
    };
    if mem
        .get_host_address(GuestAddress(addr + PAGE_SIZE - 1))
        .is_err()
    {
        return false;
    }
    // SAFETY: `host` is the start of a 4 KiB page inside a guest memory
    // mapping owned by the VMM; MADV_DONTNEED only drops its contents (the
    // guest gave the page up), it does not unmap it.
    let dropped =
        unsafe { libc::madvise(host.cast(), PAGE_SIZE as usize, libc::MADV_DONTNEED) == 0 };
    // The page now reads as zeros (or the snapshot file's page): its
    // contents changed behind vm-memory's back.
    crate::dirty::mark(mem, GuestAddress(addr), PAGE_SIZE as usize);
    dropped
}

/// Parses a statistics buffer: 10-byte (tag u16, value u64) entries.
pub fn parse_stats(bytes: &[u8]) -> Vec<(u16, u64)> {
    bytes
        .chunks_exact(10)
        .map(|c| {
            let tag = u16::from_le_bytes([c[0], c[1]]);
            let val = u64::from_le_bytes(c[2..10].try_into().expect("8 bytes"));
            (tag, val)
        })
        .collect()
}

impl VirtioDevice for Balloon {
    fn name(&self) -> String {
        "balloon".into()
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let n = 2
            + usize::from(self.config.stats_interval_s > 0)
            + usize::from(self.config.free_page_reporting);
        vec![QUEUE_SIZE; n]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1;
        if self.config.deflate_on_oom {
            f |= F_DEFLATE_ON_OOM;
        }
        if self.config.stats_interval_s > 0 {
            f |= F_STATS_VQ;
        }
        if self.config.free_page_reporting {
            f |= F_REPORTING;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        cfg[..4].copy_from_slice(
            &self
                .shared
                .target_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        cfg[4..].copy_from_slice(
            &self
                .shared
                .actual_pages
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        read_config_bytes(&cfg, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The guest reports its current size in `actual`.
        if offset == 4 && data.len() == 4 {
            let v = u32::from_le_bytes(data.try_into().expect("4 bytes"));
            self.shared.actual_pages.store(v, Ordering::SeqCst);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            queues,
            interrupt,
        } = ctx;
        let want = self.queue_max_sizes().len();
        if queues.len() < 2 {
            return Err(ActivateError::Queues {
                device: self.name(),
                got: queues.len(),
                want,
            });
        }
        *self.shared.interrupt.lock().expect("balloon lock") = Some(interrupt.clone());
        let io = |source: std::io::Error| ActivateError::Io {
            device: "balloon".into(),
            source,
        };
        let errno =
            |e: vmm_sys_util::errno::Error| io(std::io::Error::from_raw_os_error(e.errno()));
        let mut it = queues.into_iter();
        let (mut inflate, inflate_evt) = it.next().expect("checked");
        let (mut deflate, deflate_evt) = it.next().expect("checked");
        // The driver sets up the queues of the features it took, in order.
        let mut stats_q = if self.acked & F_STATS_VQ != 0 {
            it.next()
        } else {
            None
        };
        let mut report_q = if self.acked & F_REPORTING != 0 {
            it.next()
        } else {
            None
        };
        let mut fds = vec![
            (inflate_evt.as_raw_fd(), 0, EventSet::IN),
            (deflate_evt.as_raw_fd(), 1, EventSet::IN),
        ];
        if let Some((_, e)) = &report_q {
            fds.push((e.as_raw_fd(), 5, EventSet::IN));
        }
        let mut timer = if let Some((_, e)) = &stats_q {
            fds.push((e.as_raw_fd(), 2, EventSet::IN));
            let mut t = TimerFd::new().map_err(errno)?;
            let secs = self.shared.stats_interval_s.load(Ordering::SeqCst).max(1);
            let period = std::time::Duration::from_secs(u64::from(secs));
            t.reset(period, Some(period)).map_err(errno)?;
            fds.push((t.as_raw_fd(), 3, EventSet::IN));
            let changed = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io)?);
            fds.push((changed.as_raw_fd(), 4, EventSet::IN));
            *self.shared.interval_changed.lock().expect("balloon lock") = Some(changed);
            Some(t)
        } else {
            None
        };
        let metrics = self.metrics.clone();
        let shared = self.shared.clone();
        let mut pending_stats: Option<u16> = None;
        let worker = Worker::spawn(
            "kiln_balloon".into(),
            ThreadKind::Balloon,
            fds,
            move |token, _| {
                let signal = match token {
                    0 => {
                        let _ = inflate_evt.read();
                        drain_page_queue(&mut inflate, &mem, true, &metrics)
                    }
                    1 => {
                        let _ = deflate_evt.read();
                        drain_page_queue(&mut deflate, &mem, false, &metrics)
                    }
                    2 => {
                        let Some((q, e)) = stats_q.as_mut() else {
                            return Next::Continue;
                        };
                        let _ = e.read();
                        // Keep the newest buffer: it is returned when we want fresh numbers.
                        while let Some(chain) = q.pop_descriptor_chain(&mem) {
                            let head = chain.head_index();
                            if let Ok(mut r) = Reader::new(&mem, chain) {
                                let mut bytes = vec![0u8; r.available_bytes().min(4096)];
                                if r.read_exact(&mut bytes).is_ok() {
                                    *shared.stats.lock().expect("balloon lock") =
                                        parse_stats(&bytes);
                                }
                            }
                            if let Some(old) = pending_stats.replace(head) {
                                let _ = q.add_used(&mem, old, 0);
                            }
                        }
                        false
                    }
                    3 => {
                        if let Some(t) = timer.as_mut() {
                            let _ = t.wait();
                        }
                        match (stats_q.as_mut(), pending_stats.take()) {
                            (Some((q, _)), Some(head)) => q.add_used(&mem, head, 0).is_ok(),
                            _ => false,
                        }
                    }
                    4 => {
                        // A new interval: refresh now, then every `secs`.
                        if let Some(e) = shared
                            .interval_changed
                            .lock()
                            .expect("balloon lock")
                            .as_ref()
                        {
                            let _ = e.read();
                        }
                        let secs = shared.stats_interval_s.load(Ordering::SeqCst).max(1);
                        let period = std::time::Duration::from_secs(u64::from(secs));
                        if let Some(t) = timer.as_mut() {
                            let _ = t.reset(std::time::Duration::from_millis(1), Some(period));
                        }
                        false
                    }
                    5 => match report_q.as_mut() {
                        Some((q, e)) => {
                            let _ = e.read();
                            drain_reports(q, &mem, &metrics)
                        }
                        None => false,
                    },
                    _ => false,
                };
                if signal {
                    interrupt.signal_used();
                }
                Next::Continue
            },
        )
        .map_err(io)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn save_state(&self) -> Option<super::DeviceSnapshot> {
        let sh = &self.shared;
        Some(super::DeviceSnapshot::Balloon(BalloonSnapshot {
            target_pages: sh.target_pages.load(Ordering::SeqCst),
            actual_pages: sh.actual_pages.load(Ordering::SeqCst),
            stats_interval_s: sh.stats_interval_s.load(Ordering::SeqCst),
            stats: sh.stats.lock().expect("balloon lock").clone(),
        }))
    }

    fn restore_state(&mut self, state: &super::DeviceSnapshot) -> Result<(), String> {
        let super::DeviceSnapshot::Balloon(s) = state;
        // The statistics queue exists or not by configuration.
        if (s.stats_interval_s == 0) != (self.config.stats_interval_s == 0) {
            return Err(format!(
                "balloon: the snapshot has statistics {}, the configuration {}",
                on_off(s.stats_interval_s),
                on_off(self.config.stats_interval_s)
            ));
        }
        let sh = &self.shared;
        sh.target_pages.store(s.target_pages, Ordering::SeqCst);
        sh.actual_pages.store(s.actual_pages, Ordering::SeqCst);
        sh.stats_interval_s
            .store(s.stats_interval_s, Ordering::SeqCst);
        *sh.stats.lock().expect("balloon lock") = s.stats.clone();
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        *self.shared.interrupt.lock().expect("balloon lock") = None;
        *self.shared.interval_changed.lock().expect("balloon lock") = None;
    }

    fn worker(&self) -> Option<&super::worker::Worker> {
        self.worker.as_ref()
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{ChainBuilder, Desc};
    use vm_memory::Bytes;

    #[test]
    fn inflate_drops_page_contents_and_skips_bad_pfns() {
        let m = DeviceMetrics::default();
        let mut q = ChainBuilder::new();
        // Page 0x80 (0x80000) holds data the guest gave up.
        q.mem()
            .write_slice(&[0xaa; 16], GuestAddress(0x80000))
            .unwrap();
        let mut pfns = Vec::new();
        for p in [0x80u32, 0xffff_fff0] {
            pfns.extend_from_slice(&p.to_le_bytes());
        }
        q.push(&[Desc::r(&pfns)]);
        q.push(&[Desc::raw(0xfff0_0000, 8, false)]);
        crate::dirty::clear(q.mem());
        let used = q.run(|mem, queue| drain_page_queue(queue, mem, true, &m));
        assert_eq!(used.len(), 2);
        let dirty = crate::dirty::take(q.mem()).unwrap();
        assert!(
            dirty[0][0x80 / 64] & (1 << (0x80 % 64)) != 0,
            "a released page changed: it is dirty"
        );
        let mut b = [0u8; 16];
        q.mem().read_slice(&mut b, GuestAddress(0x80000)).unwrap();
        assert_eq!(b, [0u8; 16], "released page reads back as zero");
        assert_eq!(m.invalid_requests.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn reported_blocks_are_dropped_and_bad_ones_refused() {
        let m = DeviceMetrics::default();
        let mut q = ChainBuilder::new();
        q.mem()
            .write_slice(&[0xbb; 16], GuestAddress(0x80000))
            .unwrap();
        q.mem()
            .write_slice(&[0xcc; 16], GuestAddress(0x90000))
            .unwrap();
        // Two 8 KiB blocks; then one past guest memory, one misaligned.
        q.push(&[
            Desc::raw(0x80000, 0x2000, true),
            Desc::raw(0x90000, 0x2000, true),
        ]);
        q.push(&[Desc::raw(0xff000, 0x2000, true)]);
        q.push(&[Desc::raw(0xa0800, 0x1000, true)]);
        crate::dirty::clear(q.mem());
        let used = q.run(|mem, queue| drain_reports(queue, mem, &m));
        assert_eq!(used.len(), 3);
        let mut b = [0u8; 16];
        for a in [0x80000, 0x90000] {
            q.mem().read_slice(&mut b, GuestAddress(a)).unwrap();
            assert_eq!(b, [0u8; 16], "reported block at {a:#x} reads back as zero");
        }
        let dirty = crate::dirty::take(q.mem()).unwrap();
        assert!(dirty[0][0x81 / 64] & (1 << (0x81 % 64)) != 0);
        assert_eq!(m.invalid_requests.load(Ordering::Relaxed), 2);
        assert_eq!(m.writes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn reporting_adds_a_queue_and_a_feature() {
        let b = Balloon::new(BalloonConfig {
            stats_interval_s: 1,
            free_page_reporting: true,
            ..Default::default()
        });
        assert_eq!(b.queue_max_sizes().len(), 4);
        assert_ne!(b.features() & F_REPORTING, 0);
        let b = Balloon::new(BalloonConfig::default());
        assert_eq!(b.queue_max_sizes().len(), 2);
        assert_eq!(b.features() & F_REPORTING, 0);
    }

    #[test]
    fn stats_interval_changes_but_never_toggles() {
        let with = Balloon::new(BalloonConfig {
            stats_interval_s: 5,
            ..Default::default()
        });
        let h = with.handle();
        assert_eq!(h.stats_interval_s(), 5);
        h.set_stats_interval_s(1).unwrap();
        assert_eq!(h.stats_interval_s(), 1);
        assert_eq!(
            h.set_stats_interval_s(0),
            Err(StatsIntervalError { old: 1, new: 0 })
        );
        assert_eq!(h.stats_interval_s(), 1);
        let without = Balloon::new(BalloonConfig::default()).handle();
        let e = without.set_stats_interval_s(3).unwrap_err();
        assert!(
            e.to_string().contains("cannot be enabled or disabled"),
            "{e}"
        );
        assert_eq!(without.stats_interval_s(), 0);
        without.set_stats_interval_s(0).unwrap();
    }

    #[test]
    fn stats_parse_and_config_space() {
        let mut raw = Vec::new();
        raw.extend_from_slice(&tags::MEMFREE.to_le_bytes());
        raw.extend_from_slice(&(123u64 << 20).to_le_bytes());
        raw.extend_from_slice(&tags::MEMTOT.to_le_bytes());
        raw.extend_from_slice(&(512u64 << 20).to_le_bytes());
        raw.push(9); // trailing partial entry is ignored
        let s = parse_stats(&raw);
        assert_eq!(
            s,
            vec![(tags::MEMFREE, 123 << 20), (tags::MEMTOT, 512 << 20)]
        );

        let mut b = Balloon::new(BalloonConfig {
            target_mib: 64,
            ..Default::default()
        });
        let mut cfg = [0u8; 8];
        b.read_config(0, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg[..4].try_into().unwrap()), 64 * 256);
        b.write_config(4, &(1024u32).to_le_bytes());
        let h = b.handle();
        assert_eq!(h.stats().actual_mib, 4);
        h.set_target_mib(16);
        b.read_config(0, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg[..4].try_into().unwrap()), 16 * 256);
    }

    #[test]
    fn target_and_stats_set_after_boot_survive_save_and_restore() {
        let config = BalloonConfig {
            target_mib: 8,
            stats_interval_s: 5,
            ..Default::default()
        };
        let mut a = Balloon::new(config.clone());
        let h = a.handle();
        h.set_target_mib(48);
        h.set_stats_interval_s(2).unwrap();
        a.write_config(4, &(3 * 256u32).to_le_bytes()); // the guest gave 3 MiB
        *a.shared.stats.lock().unwrap() = vec![(tags::MEMFREE, 7 << 20)];
        let saved = a.save_state().expect("a balloon keeps state");

        // A balloon built from the configuration starts at the old values...
        let mut b = Balloon::new(config);
        let hb = b.handle();
        assert_eq!((hb.stats().target_mib, hb.stats_interval_s()), (8, 5));
        // ...and takes the saved ones.
        b.restore_state(&saved).unwrap();
        let st = hb.stats();
        assert_eq!((st.target_mib, st.actual_mib), (48, 3));
        assert_eq!(st.get(tags::MEMFREE), Some(7 << 20));
        assert_eq!(hb.stats_interval_s(), 2);
        let mut cfg = [0u8; 8];
        b.read_config(0, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg[..4].try_into().unwrap()), 48 * 256);
        assert_eq!(b.save_state(), Some(saved.clone()));

        // Statistics on in the snapshot, off in the configuration: refused,
        // nothing changed.
        let mut c = Balloon::new(BalloonConfig {
            target_mib: 1,
            ..Default::default()
        });
        let err = c.restore_state(&saved).unwrap_err();
        assert!(
            err.contains("statistics every 2 s, the configuration off"),
            "{err}"
        );
        assert_eq!(c.handle().stats().target_mib, 1);
    }
}
