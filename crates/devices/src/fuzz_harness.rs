//! Fuzzing harnesses for the virtio devices, shared by the `cargo fuzz`
//! targets in `fuzz/` and the corpus replay test (`tests/fuzz_corpus.rs`).
//!
//! Each harness takes arbitrary bytes, lays them out as 64 KiB of guest
//! memory (at guest address 0) holding the split virtqueue(s) of one device,
//! runs the device's queue processing and checks invariants:
//!
//! - nothing panics;
//! - every used element names a chain that was available, and its length
//!   never exceeds the writable bytes of that chain;
//! - device specific ones (TX chains are returned with length 0, a
//!   read-only disk is never modified, packets on the fake TAP have a sane
//!   length, ...).
//!
//! Guest memory accesses all go through `vm-memory`, which bounds them to
//! the one region; nothing outside it can be touched.
//!
//! # Input layout (queue targets)
//!
//! ```text
//! byte 0          flags (bit 7: VIRTIO_RING_F_EVENT_IDX; the others are per target)
//! 11 bytes/queue  log2(size) (capped at 8), desc table, avail ring, used ring
//!                 (u16 LE guest addresses, aligned down), next_avail, and how
//!                 far next_used is behind it (modulo size + 1)
//! rest            guest memory image, copied at guest address 0
//! ```

use crate::GuestMem;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::block::{self, Block, BlockConfig};
use crate::virtio::mmio::MmioTransport;
use crate::virtio::net::{NetBackend, MAX_PACKET, VNET_HDR_LEN};
use crate::virtio::vsock::muxer::Muxer;
use crate::virtio::vsock::packet::HDR_LEN as VSOCK_HDR_LEN;
use crate::virtio::{rng, ActivateContext, ActivateError, DeviceMetrics, VirtioDevice};
use crate::BusDevice;

/// Size of the fuzzed guest memory (one region at guest address 0).
pub const MEM_SIZE: usize = 64 * 1024;
/// Bytes of input header per queue.
pub const QUEUE_HDR_LEN: usize = 11;
/// Flag bit: negotiate VIRTIO_RING_F_EVENT_IDX on the queues.
pub const FLAG_EVENT_IDX: u8 = 0x80;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Where one queue lives in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    /// Queue size (a power of two, 1 to 256).
    pub size: u16,
    /// Descriptor table address.
    pub desc: u16,
    /// Available ring address.
    pub avail: u16,
    /// Used ring address.
    pub used: u16,
    /// The device's next available index.
    pub next_avail: u16,
    /// The device's next used index.
    pub next_used: u16,
}

impl QueueLayout {
    fn decode(b: &[u8]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let size = 1 << (b[0] & 0x0f).min(8);
        let next_avail = u(7);
        Self {
            size,
            desc: u(1) & !0xf,
            avail: u(3) & !1,
            used: u(5) & !3,
            next_avail,
            // A device never uses more chains than it took, nor has more
            // than `size` in flight: next_used is within `size` behind.
            next_used: next_avail.wrapping_sub(u(9) % (size + 1)),
        }
    }

    /// The input header bytes for this layout.
    pub fn encode(&self) -> [u8; QUEUE_HDR_LEN] {
        let mut b = [0u8; QUEUE_HDR_LEN];
        b[0] = self.size.trailing_zeros() as u8;
        for (i, v) in [
            self.desc,
            self.avail,
            self.used,
            self.next_avail,
            self.next_avail.wrapping_sub(self.next_used),
        ]
        .into_iter()
        .enumerate()
        {
            b[1 + 2 * i..3 + 2 * i].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn desc_range(&self) -> (u64, u64) {
        (u64::from(self.desc), 16 * u64::from(self.size))
    }
    fn avail_range(&self) -> (u64, u64) {
        (u64::from(self.avail), 6 + 2 * u64::from(self.size))
    }
    fn used_range(&self) -> (u64, u64) {
        (u64::from(self.used), 6 + 8 * u64::from(self.size))
    }
}

/// Guest memory and queues decoded from a fuzz input.
pub struct Setup {
    /// The guest memory.
    pub mem: GuestMem,
    /// The queues, ready to use.
    pub queues: Vec<Queue>,
    /// Their layouts.
    pub layouts: Vec<QueueLayout>,
    /// The flags byte.
    pub flags: u8,
}

/// Decodes `nq` queues and a guest memory image from `data`; `None` when the
/// input is too short or a queue would not pass the transport's validity
/// check (rings outside guest memory).
pub fn setup(data: &[u8], nq: usize) -> Option<Setup> {
    let hdr = 1 + QUEUE_HDR_LEN * nq;
    if data.len() < hdr {
        return None;
    }
    let flags = data[0];
    let image = &data[hdr..];
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    mem.write_slice(&image[..image.len().min(MEM_SIZE)], GuestAddress(0))
        .ok()?;
    let mut queues = Vec::new();
    let mut layouts = Vec::new();
    for i in 0..nq {
        let l = QueueLayout::decode(&data[1 + QUEUE_HDR_LEN * i..]);
        let mut q = Queue::new(256).ok()?;
        q.set_size(l.size);
        q.set_desc_table_address(Some(l.desc.into()), Some(0));
        q.set_avail_ring_address(Some(l.avail.into()), Some(0));
        q.set_used_ring_address(Some(l.used.into()), Some(0));
        q.set_next_avail(l.next_avail);
        q.set_next_used(l.next_used);
        q.set_event_idx(flags & FLAG_EVENT_IDX != 0);
        q.set_ready(true);
        if !q.is_valid(&mem) {
            return None;
        }
        // The used index in memory is the device's: start it where the
        // device's state says, so the elements it adds can be counted.
        mem.write_obj(l.next_used, GuestAddress(u64::from(l.used) + 2))
            .ok()?;
        queues.push(q);
        layouts.push(l);
    }
    Some(Setup {
        mem,
        queues,
        layouts,
        flags,
    })
}

/// What the chains available on one queue looked like before the device ran.
struct QueueSnapshot {
    layout: QueueLayout,
    /// Head index -> writable bytes of its chain.
    writable: HashMap<u16, u64>,
    /// Chains available.
    available: usize,
}

/// Snapshots of all the queues of a [`Setup`], and whether the device could
/// have changed what it parses (a writable buffer over a ring, a descriptor
/// table, or the used ring over the driver's structures). When it could, the
/// per-chain checks are skipped: only "no panic" holds.
pub struct Snapshot {
    queues: Vec<QueueSnapshot>,
    self_modifying: bool,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.1 > 0 && b.1 > 0 && a.0 < b.0.saturating_add(b.1) && b.0 < a.0.saturating_add(a.1)
}

/// Indirect descriptor tables reachable from `head` (walking the direct
/// descriptors as `virtio-queue` does).
fn indirect_tables(mem: &GuestMem, l: &QueueLayout, head: u16, out: &mut Vec<(u64, u64)>) {
    let mut idx = head;
    for _ in 0..l.size {
        if idx >= l.size {
            return;
        }
        let base = u64::from(l.desc) + 16 * u64::from(idx);
        let (Ok(addr), Ok(len), Ok(flags), Ok(next)) = (
            mem.read_obj::<u64>(GuestAddress(base)),
            mem.read_obj::<u32>(GuestAddress(base + 8)),
            mem.read_obj::<u16>(GuestAddress(base + 12)),
            mem.read_obj::<u16>(GuestAddress(base + 14)),
        ) else {
            return;
        };
        if flags & F_INDIRECT != 0 {
            out.push((addr, u64::from(len)));
            return;
        }
        if flags & F_NEXT == 0 {
            return;
        }
        idx = next;
    }
}

impl Snapshot {
    /// Snapshots the chains currently available on the queues of `s`.
    pub fn take(s: &Setup) -> Self {
        let mut queues = Vec::new();
        // (range, Some(queue) for a used ring).
        let mut protected = Vec::new();
        let mut written = Vec::new();
        for (qi, (q, l)) in s.queues.iter().zip(&s.layouts).enumerate() {
            protected.extend([(l.desc_range(), None), (l.avail_range(), None)]);
            protected.push((l.used_range(), Some(qi)));
            written.push((l.used_range(), Some(qi)));
            let mut copy = Queue::try_from(q.state()).expect("valid queue state");
            let mut snap = QueueSnapshot {
                layout: *l,
                writable: HashMap::new(),
                available: 0,
            };
            while let Some(chain) = copy.pop_descriptor_chain(&s.mem) {
                snap.available += 1;
                let head = chain.head_index();
                let mut tables = Vec::new();
                indirect_tables(&s.mem, l, head, &mut tables);
                protected.extend(tables.into_iter().map(|t| (t, None)));
                let mut total = 0u64;
                for d in chain.writable() {
                    total += u64::from(d.len());
                    written.push(((d.addr().0, u64::from(d.len())), None));
                }
                let e = snap.writable.entry(head).or_insert(0);
                *e = (*e).max(total);
            }
            queues.push(snap);
        }
        let self_modifying = written.iter().any(|(w, wq)| {
            protected
                .iter()
                .any(|(p, pq)| (wq.is_none() || wq != pq) && overlaps(*w, *p))
        });
        Self {
            queues,
            self_modifying,
        }
    }

    /// Whether the per-chain checks apply.
    pub fn strict(&self) -> bool {
        !self.self_modifying
    }

    /// Checks the used ring of queue `qi`; returns the (head, len) pairs the
    /// device added (empty when the checks do not apply).
    pub fn check_used(&self, mem: &GuestMem, qi: usize) -> Vec<(u16, u32)> {
        if self.self_modifying {
            return Vec::new();
        }
        let q = &self.queues[qi];
        let l = &q.layout;
        let used = u64::from(l.used);
        let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
        let n = idx.wrapping_sub(l.next_used);
        assert!(
            usize::from(n) <= q.available,
            "queue {qi}: {n} used elements for {} available chains",
            q.available
        );
        (0..n)
            .map(|i| {
                let slot = u64::from(l.next_used.wrapping_add(i) % l.size);
                let e = used + 4 + 8 * slot;
                let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
                let head = u16::try_from(id).expect("used id fits a u16");
                let writable = *q
                    .writable
                    .get(&head)
                    .unwrap_or_else(|| panic!("queue {qi}: used id {id} was never available"));
                assert!(
                    u64::from(len) <= writable,
                    "queue {qi}: used length {len} for head {head} with {writable} writable bytes"
                );
                (head, len)
            })
            .collect()
    }
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A fresh scratch directory on tmpfs when there is one (flushes stay cheap).
fn scratch_dir() -> PathBuf {
    let base = ["/dev/shm", "/run/shm"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let n = UNIQUE.fetch_add(1, Ordering::Relaxed);
    let dir = base.join(format!("kiln-fuzz-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Removes the directory when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------- virtio-blk

/// Disk size of the block target (8 sectors).
pub const BLK_DISK_LEN: usize = 4096;
/// Block flag bit: the disk is read-only.
pub const BLK_FLAG_RO: u8 = 1;

fn disk_pattern() -> Vec<u8> {
    (0..BLK_DISK_LEN).map(|i| (i / 512 + i) as u8).collect()
}

/// virtio-blk: one request queue over a 4 KiB temp file.
pub fn virtio_blk(data: &[u8]) {
    let Some(mut s) = setup(data, 1) else { return };
    let snap = Snapshot::take(&s);
    let scratch = Scratch(scratch_dir());
    let path = scratch.0.join("disk.img");
    let original = disk_pattern();
    std::fs::write(&path, &original).unwrap();
    let read_only = s.flags & BLK_FLAG_RO != 0;
    let dev = Block::new(BlockConfig {
        path: path.clone(),
        read_only,
        id: "fuzzdisk".into(),
        rate_limiter: None,
        engine: Default::default(),
    })
    .unwrap();
    let mut backend = dev.backend();
    block::drain_queue(&mut backend, &mut s.queues[0], &s.mem);
    snap.check_used(&s.mem, 0);
    let after = std::fs::read(&path).unwrap();
    assert_eq!(after.len(), original.len(), "disk size changed");
    if read_only {
        assert!(after == original, "read-only disk modified");
    }
}

// ---------------------------------------------------------------- virtio-net

/// Net flag bit: process the queue as the RX queue (packets from the fake
/// TAP) instead of the TX queue.
pub const NET_FLAG_RX: u8 = 1;
/// Net flag bit: the fake TAP refuses writes (EAGAIN).
pub const NET_FLAG_TAP_FULL: u8 = 2;

/// A TAP that keeps packets in memory.
#[derive(Default)]
pub struct FakeTap {
    /// Packets the device wrote.
    pub sent: Rc<RefCell<Vec<Vec<u8>>>>,
    /// Packets the device will read.
    pub incoming: VecDeque<Vec<u8>>,
    /// Writes fail with EAGAIN.
    pub full: bool,
}

impl Read for FakeTap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let p = self.incoming.pop_front().ok_or(io::ErrorKind::WouldBlock)?;
        // Like a datagram socket: the tail of a longer packet is lost.
        let n = p.len().min(buf.len());
        buf[..n].copy_from_slice(&p[..n]);
        Ok(n)
    }
}

impl Write for FakeTap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.full {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.sent.borrow_mut().push(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn net_packet(len: usize, gso: u8, tag: u8) -> Vec<u8> {
    let mut p: Vec<u8> = (0..len).map(|i| tag.wrapping_add(i as u8)).collect();
    p[..VNET_HDR_LEN.min(len)].fill(0);
    if len > 1 {
        p[1] = gso;
    }
    p
}

/// virtio-net: one queue, TX (default) or RX ([`NET_FLAG_RX`]) against a
/// [`FakeTap`].
pub fn virtio_net(data: &[u8]) {
    let Some(mut s) = setup(data, 1) else { return };
    let snap = Snapshot::take(&s);
    let mut tap = FakeTap {
        full: s.flags & NET_FLAG_TAP_FULL != 0,
        ..FakeTap::default()
    };
    let rx = s.flags & NET_FLAG_RX != 0;
    if rx {
        // Small, empty, oversized, maximal and GSO packets.
        tap.incoming.extend([
            net_packet(60 + VNET_HDR_LEN, 0, 1),
            net_packet(10, 0, 2),
            net_packet(MAX_PACKET + 1, 0, 3),
            net_packet(1514 + VNET_HDR_LEN, 0, 4),
            net_packet(100, 1, 5),
            net_packet(MAX_PACKET, 0, 6),
        ]);
    }
    let sent = tap.sent.clone();
    let mut be = NetBackend::new(tap, Arc::default());
    if rx {
        be.process_rx(&mut s.queues[0], &s.mem);
        snap.check_used(&s.mem, 0);
    } else {
        be.process_tx(&mut s.queues[0], &s.mem);
        for (head, len) in snap.check_used(&s.mem, 0) {
            assert_eq!(len, 0, "TX chain {head} returned with length {len}");
        }
    }
    for p in sent.borrow().iter() {
        assert!(
            (VNET_HDR_LEN + 14..=MAX_PACKET).contains(&p.len()),
            "{}-byte packet sent to the TAP",
            p.len()
        );
    }
}

// -------------------------------------------------------------- virtio-vsock

/// The guest CID of the vsock target.
pub const VSOCK_GUEST_CID: u64 = 3;
/// A host port with a listener: guest connections to it succeed.
pub const VSOCK_LISTEN_PORT: u32 = 1234;

/// virtio-vsock: queue 0 is RX, queue 1 TX. The muxer parses the TX
/// packets (connecting to a host listener on [`VSOCK_LISTEN_PORT`]), the
/// host answers every connection with some bytes and then hangs up, and the
/// muxer fills RX buffers in between.
pub fn virtio_vsock(data: &[u8]) {
    let Some(s) = setup(data, 2) else { return };
    let snap = Snapshot::take(&s);
    let scratch = Scratch(scratch_dir());
    let uds = scratch.0.join("v.sock");
    let listener = UnixListener::bind(&uds).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut port_path = uds.clone().into_os_string();
    port_path.push(format!("_{VSOCK_LISTEN_PORT}"));
    let port_listener = UnixListener::bind(&port_path).unwrap();
    port_listener.set_nonblocking(true).unwrap();

    let Setup { mem, queues, .. } = s;
    let mut queues = queues.into_iter();
    let (rxq, txq) = (queues.next().unwrap(), queues.next().unwrap());
    let mut muxer = Muxer::new(
        mem.clone(),
        rxq,
        txq,
        listener,
        VSOCK_GUEST_CID,
        uds,
        Arc::default(),
    )
    .unwrap();
    muxer.process();
    let mut streams: Vec<UnixStream> = std::iter::from_fn(|| port_listener.accept().ok())
        .map(|(s, _)| s)
        .collect();
    for st in &mut streams {
        st.set_nonblocking(true).unwrap();
        let _ = st.write(b"hello from the host");
        let mut buf = [0u8; 4096];
        while matches!(st.read(&mut buf), Ok(n) if n > 0) {}
    }
    muxer.handle_host_events();
    muxer.process();
    drop(streams);
    muxer.handle_host_events();
    muxer.process();
    drop(muxer);

    for (head, len) in snap.check_used(&mem, 1) {
        assert_eq!(len, 0, "TX chain {head} returned with length {len}");
    }
    for (head, len) in snap.check_used(&mem, 0) {
        assert!(
            len == 0 || len as usize >= VSOCK_HDR_LEN,
            "RX chain {head}: {len} bytes is not a packet"
        );
    }
}

// ---------------------------------------------------------------- virtio-mmio

/// The entropy device, driven synchronously: activation records the queues
/// and [`SyncRngState::poll`] answers the ones that were notified.
pub struct SyncRng {
    inner: rng::Rng,
    state: Arc<Mutex<SyncRngState>>,
}

/// What [`SyncRng`] shares with the harness.
#[derive(Default)]
pub struct SyncRngState {
    active: Option<ActivateContext>,
    metrics: DeviceMetrics,
}

impl SyncRngState {
    /// Drains every notified queue.
    pub fn poll(&mut self) {
        let Some(ctx) = self.active.as_mut() else {
            return;
        };
        for (q, evt) in &mut ctx.queues {
            if evt.read().is_ok() {
                rng::drain_queue(q, &ctx.mem, &self.metrics);
            }
        }
    }
}

impl VirtioDevice for SyncRng {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn device_type(&self) -> u32 {
        self.inner.device_type()
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        // A second queue the device ignores: exercises QueueSel.
        vec![self.inner.queue_max_sizes()[0], 8]
    }
    fn features(&self) -> u64 {
        self.inner.features()
    }
    fn ack_features(&mut self, features: u64) {
        self.inner.ack_features(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.inner.read_config(offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.inner.write_config(offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.is_empty() {
            return Err(ActivateError::Queues {
                device: self.name(),
                got: 0,
                want: 1,
            });
        }
        self.state.lock().unwrap().active = Some(ctx);
        Ok(())
    }
    fn reset(&mut self) {
        self.state.lock().unwrap().active = None;
    }
    fn worker(&self) -> Option<&crate::virtio::worker::Worker> {
        None
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.inner.metrics()
    }
}

/// Size of one MMIO operation in the input.
pub const MMIO_OP_LEN: usize = 6;

/// MMIO operations, [`MMIO_OP_LEN`] bytes each: opcode, offset byte, 4
/// value bytes (LE).
pub mod mmio_op {
    /// Read the 32-bit register at offset*4.
    pub const READ: u8 = 0;
    /// Write the value to the 32-bit register at offset*4.
    pub const WRITE: u8 = 1;
    /// Read value&7 bytes at the raw offset (odd sizes, misaligned, config).
    pub const READ_RAW: u8 = 2;
    /// Write value&7 bytes (of the value) at the raw offset.
    pub const WRITE_RAW: u8 = 3;
    /// Let the device answer notified queues.
    pub const POLL: u8 = 4;
    /// Read config space at 0x100 + offset, value&15 bytes.
    pub const READ_CONFIG: u8 = 5;
}

/// virtio-mmio: `data` is `[n: u16 LE][n operations][guest memory image]`;
/// the operations run against an [`MmioTransport`] wrapping a [`SyncRng`].
pub fn mmio_transport(data: &[u8]) {
    mmio_run(data);
}

/// [`mmio_transport`]; returns the number of entropy requests completed.
pub fn mmio_run(data: &[u8]) -> u64 {
    if data.len() < 2 {
        return 0;
    }
    let n = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let rest = &data[2..];
    let ops_len = (n * MMIO_OP_LEN).min(rest.len() / MMIO_OP_LEN * MMIO_OP_LEN);
    let (ops, image) = rest.split_at(ops_len);
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(&image[..image.len().min(MEM_SIZE)], GuestAddress(0))
        .unwrap();
    let state = Arc::new(Mutex::new(SyncRngState::default()));
    let dev = SyncRng {
        inner: rng::Rng::new(),
        state: state.clone(),
    };
    let evts = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let mut t = MmioTransport::new(
        Box::new(dev),
        mem,
        evts,
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    for op in ops.chunks_exact(MMIO_OP_LEN) {
        let off = u64::from(op[1]);
        let val = [op[2], op[3], op[4], op[5]];
        match op[0] % 6 {
            mmio_op::READ => {
                let mut b = [0u8; 4];
                t.read(off * 4, &mut b);
                match off * 4 {
                    0x000 => assert_eq!(u32::from_le_bytes(b), 0x7472_6976, "magic"),
                    0x004 => assert_eq!(u32::from_le_bytes(b), 2, "version"),
                    0x060 => assert_eq!(u32::from_le_bytes(b) & !3, 0, "interrupt status"),
                    _ => {}
                }
            }
            mmio_op::WRITE => t.write(off * 4, &val),
            mmio_op::READ_RAW => {
                let mut b = vec![0u8; usize::from(op[2] & 7)];
                t.read(off, &mut b);
            }
            mmio_op::WRITE_RAW => t.write(off, &val[..usize::from(op[2] & 3)]),
            mmio_op::POLL => state.lock().unwrap().poll(),
            _ => {
                let mut b = vec![0u8; usize::from(op[2] & 15)];
                t.read(0x100 + off, &mut b);
            }
        }
    }
    // Reset at the end, as the driver would on unload.
    t.write(0x070, &[0; 4]);
    let st = state.lock().unwrap();
    assert!(st.active.is_none(), "reset kept queues");
    st.metrics.requests.load(Ordering::Relaxed)
}

// --------------------------------------------------------------------- seeds

/// One descriptor for [`InputBuilder::chain`]: (device-writable, bytes if
/// readable, length if writable).
pub type DescSpec<'a> = (bool, &'a [u8], u32);

/// Builds well-formed inputs: queue headers and a memory image.
pub struct InputBuilder {
    flags: u8,
    layouts: Vec<QueueLayout>,
    image: Vec<u8>,
    next_data: usize,
    next_desc: Vec<u16>,
}

/// Where seed queues live: queue i at 0x400 * i; data from 0x1000.
const SEED_DATA: usize = 0x1000;

impl InputBuilder {
    /// `nq` (at most 4) queues of size 16 with empty rings.
    pub fn new(flags: u8, nq: usize) -> Self {
        let layouts = (0..nq)
            .map(|i| {
                let base = 0x400 * i as u16;
                QueueLayout {
                    size: 16,
                    desc: base,
                    avail: base + 0x100,
                    used: base + 0x200,
                    next_avail: 0,
                    next_used: 0,
                }
            })
            .collect();
        Self {
            flags,
            layouts,
            image: vec![0; SEED_DATA],
            next_data: SEED_DATA,
            next_desc: vec![0; nq],
        }
    }

    fn put(&mut self, addr: usize, bytes: &[u8]) {
        if self.image.len() < addr + bytes.len() {
            self.image.resize(addr + bytes.len(), 0);
        }
        self.image[addr..addr + bytes.len()].copy_from_slice(bytes);
    }

    /// Adds a chain to queue `qi`: (device-writable?, bytes or writable length).
    pub fn chain(&mut self, qi: usize, descs: &[DescSpec<'_>]) -> &mut Self {
        let l = self.layouts[qi];
        let head = self.next_desc[qi];
        for (k, (write, bytes, wlen)) in descs.iter().enumerate() {
            let i = self.next_desc[qi];
            self.next_desc[qi] += 1;
            let len = if *write { *wlen } else { bytes.len() as u32 };
            let addr = self.next_data;
            self.next_data += (len.max(1) as usize).next_multiple_of(16);
            if !write {
                self.put(addr, bytes);
            }
            let mut flags = if *write { F_WRITE } else { 0 };
            if k + 1 < descs.len() {
                flags |= F_NEXT;
            }
            let mut d = Vec::with_capacity(16);
            d.extend_from_slice(&(addr as u64).to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&(i + 1).to_le_bytes());
            self.put(usize::from(l.desc) + 16 * usize::from(i), &d);
        }
        let avail = usize::from(l.avail);
        let idx = u16::from_le_bytes([
            *self.image.get(avail + 2).unwrap_or(&0),
            *self.image.get(avail + 3).unwrap_or(&0),
        ]);
        self.put(
            avail + 4 + 2 * usize::from(idx % l.size),
            &head.to_le_bytes(),
        );
        self.put(avail + 2, &(idx + 1).to_le_bytes());
        self
    }

    /// Readable descriptor holding `b`.
    pub fn r(b: &[u8]) -> DescSpec<'_> {
        (false, b, 0)
    }

    /// Writable descriptor of `n` bytes.
    pub fn w(n: u32) -> DescSpec<'static> {
        (true, &[], n)
    }

    /// The input bytes.
    pub fn build(&self) -> Vec<u8> {
        let mut v = vec![self.flags];
        for l in &self.layouts {
            v.extend_from_slice(&l.encode());
        }
        v.extend_from_slice(&self.image);
        v
    }
}

/// A harness: runs one input.
pub type Harness = fn(&[u8]);

/// The fuzz targets, by name, with their harness.
pub const TARGETS: &[(&str, Harness)] = &[
    ("virtio_blk", virtio_blk),
    ("virtio_net_tx", virtio_net),
    ("virtio_vsock", virtio_vsock),
    ("mmio_transport", mmio_transport),
];

fn blk_hdr(kind: u32, sector: u64) -> Vec<u8> {
    let mut v = kind.to_le_bytes().to_vec();
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&sector.to_le_bytes());
    v
}

fn vsock_hdr(op: u16, src_port: u32, dst_port: u32, len: u32) -> Vec<u8> {
    use crate::virtio::vsock::packet::{Header, HOST_CID, TYPE_STREAM};
    Header {
        src_cid: VSOCK_GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
    .to_bytes()
    .to_vec()
}

/// Well-formed seed inputs for `target`: (file name, bytes).
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    use InputBuilder as B;
    let mut out = Vec::new();
    match target {
        "virtio_blk" => {
            for ro in [0, BLK_FLAG_RO] {
                let mut b = B::new(ro, 1);
                b.chain(0, &[B::r(&blk_hdr(0, 1)), B::w(512), B::w(1)])
                    .chain(0, &[B::r(&blk_hdr(1, 2)), B::r(&[7; 512]), B::w(1)])
                    .chain(0, &[B::r(&blk_hdr(4, 0)), B::w(1)])
                    .chain(0, &[B::r(&blk_hdr(8, 0)), B::w(20), B::w(1)])
                    .chain(0, &[B::r(&blk_hdr(0, 7)), B::w(1024), B::w(1)]);
                out.push((format!("rw-flush-id-{ro}"), b.build()));
            }
        }
        "virtio_net_tx" => {
            let mut pkt = vec![0u8; VNET_HDR_LEN];
            pkt.extend_from_slice(&[0xff; 6]);
            pkt.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x88, 0xb5]);
            pkt.extend_from_slice(&[0x42; 46]);
            let mut b = B::new(0, 1);
            b.chain(0, &[B::r(&pkt)])
                .chain(
                    0,
                    &[
                        B::r(&pkt[..VNET_HDR_LEN]),
                        B::r(&pkt[VNET_HDR_LEN..]),
                        B::w(8),
                    ],
                )
                .chain(0, &[B::r(&pkt[..20])]);
            out.push(("tx".into(), b.build()));
            let mut b = B::new(NET_FLAG_RX, 1);
            b.chain(0, &[B::w(1600)])
                .chain(0, &[B::w(12), B::w(100), B::w(2000)])
                .chain(0, &[B::w(20)])
                .chain(0, &[B::w(70000)]);
            out.push(("rx".into(), b.build()));
        }
        "virtio_vsock" => {
            use crate::virtio::vsock::packet::*;
            let p = VSOCK_LISTEN_PORT;
            let mut b = B::new(0, 2);
            for _ in 0..6 {
                b.chain(0, &[B::w(VSOCK_HDR_LEN as u32 + 256)]);
            }
            b.chain(1, &[B::r(&vsock_hdr(OP_REQUEST, 5000, p, 0))])
                .chain(1, &[B::r(&vsock_hdr(OP_RW, 5000, p, 5)), B::r(b"hello")])
                .chain(1, &[B::r(&vsock_hdr(OP_CREDIT_REQUEST, 5000, p, 0))])
                .chain(1, &[B::r(&vsock_hdr(OP_REQUEST, 5001, 99, 0))])
                .chain(1, &[B::r(&vsock_hdr(OP_SHUTDOWN, 5000, p, 0))])
                .chain(1, &[B::r(&vsock_hdr(OP_RW, 5002, p, 9000))]);
            out.push(("connect-rw".into(), b.build()));
        }
        "mmio_transport" => {
            use mmio_op::*;
            let mut ops: Vec<[u8; MMIO_OP_LEN]> = Vec::new();
            let mut w = |off: u64, v: u32| {
                let b = v.to_le_bytes();
                ops.push([WRITE, (off / 4) as u8, b[0], b[1], b[2], b[3]]);
            };
            w(0x070, 1);
            w(0x070, 3);
            w(0x024, 1);
            w(0x020, 1);
            w(0x070, 11);
            w(0x030, 0);
            w(0x038, 16);
            w(0x080, 0);
            w(0x090, 0x100);
            w(0x0a0, 0x200);
            w(0x044, 1);
            w(0x070, 15);
            w(0x050, 0);
            let mut ops2 = ops.clone();
            ops2.push([POLL, 0, 0, 0, 0, 0]);
            ops2.push([READ, 0x60 / 4, 0, 0, 0, 0]);
            ops2.push([WRITE, 0x64 / 4, 1, 0, 0, 0]);
            ops2.push([READ_CONFIG, 0, 8, 0, 0, 0]);
            ops2.push([READ_RAW, 3, 3, 0, 0, 0]);
            let mut b = B::new(0, 1);
            b.chain(0, &[B::w(64)]).chain(0, &[B::w(16), B::w(16)]);
            let image = b.build()[1 + QUEUE_HDR_LEN..].to_vec();
            let mut v = (ops2.len() as u16).to_le_bytes().to_vec();
            v.extend(ops2.iter().flatten());
            v.extend_from_slice(&image);
            out.push(("init-notify".into(), v));
        }
        _ => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seeds reach the devices: valid queues, strict checks, and the
    /// requests complete as a driver would expect.
    #[test]
    fn seeds_are_well_formed() {
        for (target, _) in TARGETS {
            for (name, bytes) in seeds(target) {
                let nq = match *target {
                    "virtio_vsock" => 2,
                    "mmio_transport" => continue,
                    _ => 1,
                };
                let s = setup(&bytes, nq).unwrap_or_else(|| panic!("{target}/{name}"));
                assert!(Snapshot::take(&s).strict(), "{target}/{name}");
            }
        }
        let (_, blk) = &seeds("virtio_blk")[0];
        let mut s = setup(blk, 1).unwrap();
        let snap = Snapshot::take(&s);
        let scratch = Scratch(scratch_dir());
        let path = scratch.0.join("disk");
        std::fs::write(&path, disk_pattern()).unwrap();
        let dev = Block::new(BlockConfig {
            path,
            read_only: false,
            id: "fuzzdisk".into(),
            rate_limiter: None,
            engine: Default::default(),
        })
        .unwrap();
        block::drain_queue(&mut dev.backend(), &mut s.queues[0], &s.mem);
        let lens: Vec<u32> = snap.check_used(&s.mem, 0).iter().map(|u| u.1).collect();
        // Read 512, write, flush, get-id (8 bytes), read past the end.
        assert_eq!(lens, [513, 1, 1, 9, 1]);

        let (_, mmio) = &seeds("mmio_transport")[0];
        assert_eq!(mmio_run(mmio), 2, "both entropy requests answered");
    }
}
