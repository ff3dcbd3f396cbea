//! Unit tests: a hand-driven "guest" posts RX buffers and TX packets on split
//! virtqueues in a small guest memory, the [`Muxer`] runs on the test thread,
//! and real Unix sockets play the host side.

mod connect;
mod flow;

use crate::GuestMem;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::conn::CONN_BUF_ALLOC;
use super::muxer::{Muxer, FIRST_LOCAL_PORT};
use super::packet::*;
use super::*;
use crate::virtio::DeviceMetrics;

pub(super) const CID: u64 = 3;
pub(super) const QSIZE: u16 = 64;
pub(super) const RX_BUF: u32 = 4096 + HDR_LEN as u32;
pub(super) const RX_DATA: u64 = 0x10000;
pub(super) const TX_DATA: u64 = 0x100000;
pub(super) const TX_SLOT: u64 = 0x11000;
pub(super) const TX_SLOTS: u16 = QSIZE / 2;
pub(super) const F_NEXT: u16 = 1;
pub(super) const F_WRITE: u16 = 2;

/// One split virtqueue laid out in guest memory.
pub(super) struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    last_used: u16,
}

impl Ring {
    pub(super) fn new(base: u64) -> Self {
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            last_used: 0,
        }
    }

    pub(super) fn queue(&self, mem: &GuestMem) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    pub(super) fn write_desc(
        &self,
        mem: &GuestMem,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let base = self.desc + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(base)).unwrap();
        mem.write_obj(len, GuestAddress(base + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
        mem.write_obj(next, GuestAddress(base + 14)).unwrap();
    }

    pub(super) fn publish(&self, mem: &GuestMem, head: u16) {
        let idx: u16 = mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = self.avail + 4 + 2 * u64::from(idx % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub(super) fn take_used(&mut self, mem: &GuestMem) -> Vec<(u16, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = vec![];
        while self.last_used != idx {
            let e = self.used + 4 + 8 * u64::from(self.last_used % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id as u16, len));
            self.last_used = self.last_used.wrapping_add(1);
        }
        out
    }
}

/// The simulated guest driver plus a muxer under test.
pub(super) struct Guest {
    pub(super) mem: GuestMem,
    pub(super) rx: Ring,
    pub(super) tx: Ring,
    pub(super) free_tx: Vec<u16>,
    pub(super) muxer: Option<Muxer>,
    pub(super) metrics: Arc<DeviceMetrics>,
    pub(super) uds: PathBuf,
    _listener_owner: UnixListener,
}

impl Guest {
    /// A muxer listening on a fresh socket path, with every RX buffer posted.
    pub(super) fn new(name: &str) -> Self {
        let mut g = Self::bare(name);
        for i in 0..QSIZE {
            g.post_rx(i);
        }
        g
    }

    /// A muxer with no RX buffers posted.
    pub(super) fn bare(name: &str) -> Self {
        let uds = std::env::temp_dir().join(format!("kiln-vsock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&uds);
        let listener = UnixListener::bind(&uds).unwrap();
        listener.set_nonblocking(true).unwrap();
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let rx = Ring::new(0);
        let tx = Ring::new(0x4000);
        let metrics = Arc::new(DeviceMetrics::default());
        let muxer = Muxer::new(
            mem.clone(),
            rx.queue(&mem),
            tx.queue(&mem),
            listener.try_clone().unwrap(),
            CID,
            uds.clone(),
            metrics.clone(),
        )
        .unwrap();
        Self {
            mem,
            rx,
            tx,
            free_tx: (0..TX_SLOTS).rev().collect(),
            muxer: Some(muxer),
            metrics,
            uds,
            _listener_owner: listener,
        }
    }

    pub(super) fn muxer(&mut self) -> &mut Muxer {
        self.muxer.as_mut().expect("muxer")
    }

    pub(super) fn post_rx(&mut self, i: u16) {
        let addr = RX_DATA + u64::from(i) * u64::from(RX_BUF);
        self.rx.write_desc(&self.mem, i, addr, RX_BUF, F_WRITE, 0);
        self.rx.publish(&self.mem, i);
    }

    /// Runs the device: host events, then both queues.
    pub(super) fn pump(&mut self) {
        self.muxer().handle_host_events();
        self.muxer().process();
    }

    pub(super) fn reclaim_tx(&mut self) {
        for (id, _) in self.tx.take_used(&self.mem) {
            self.free_tx.push(id / 2);
        }
    }

    /// Puts a chain of raw descriptors (addr, len, writable) on the TX queue.
    pub(super) fn send_raw(&mut self, descs: &[(u64, u32, bool)]) {
        self.reclaim_tx();
        let slot = self.free_tx.pop().expect("free TX slot");
        assert!(descs.len() <= 2);
        for (k, &(addr, len, w)) in descs.iter().enumerate() {
            let i = slot * 2 + k as u16;
            let mut flags = if w { F_WRITE } else { 0 };
            if k + 1 < descs.len() {
                flags |= F_NEXT;
            }
            self.tx.write_desc(&self.mem, i, addr, len, flags, i + 1);
        }
        self.tx.publish(&self.mem, slot * 2);
    }

    /// Sends header bytes `hdr` and `payload` as a two-descriptor chain.
    pub(super) fn send_bytes(&mut self, hdr: &[u8], payload: &[u8]) {
        self.reclaim_tx();
        let slot = *self.free_tx.last().expect("free TX slot");
        let base = TX_DATA + u64::from(slot) * TX_SLOT;
        self.mem.write_slice(hdr, GuestAddress(base)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(base + 0x100))
            .unwrap();
        let mut descs = vec![(base, hdr.len() as u32, false)];
        if !payload.is_empty() {
            descs.push((base + 0x100, payload.len() as u32, false));
        }
        self.send_raw(&descs);
    }

    pub(super) fn send(&mut self, hdr: Header, payload: &[u8]) {
        self.send_bytes(&hdr.to_bytes(), payload);
    }

    pub(super) fn can_send(&mut self) -> bool {
        self.reclaim_tx();
        !self.free_tx.is_empty()
    }

    /// Packets the device put in the RX queue since the last call; their
    /// buffers are posted again.
    pub(super) fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = vec![];
        for (id, len) in self.rx.take_used(&self.mem) {
            let addr = RX_DATA + u64::from(id) * u64::from(RX_BUF);
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            self.post_rx(id);
            if b.len() < HDR_LEN {
                continue;
            }
            let hdr = Header::from_bytes(b[..HDR_LEN].try_into().unwrap());
            assert_eq!(
                hdr.len as usize,
                b.len() - HDR_LEN,
                "used length matches hdr.len"
            );
            out.push((hdr, b[HDR_LEN..].to_vec()));
        }
        out
    }

    /// Pumps until a packet arrives (or fails after 5 s).
    pub(super) fn expect_packet(&mut self) -> (Header, Vec<u8>) {
        let t = Instant::now();
        let mut buffered = vec![];
        while buffered.is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "no packet from the device"
            );
            self.pump();
            buffered = self.recv();
            if buffered.is_empty() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        assert_eq!(buffered.len(), 1, "one packet expected: {buffered:?}");
        buffered.pop().unwrap()
    }

    pub(super) fn invalid(&self) -> u64 {
        self.metrics.invalid_requests.load(Ordering::Relaxed)
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds);
    }
}

/// A guest → host header with the given guest-side credit.
pub(super) fn ghdr(
    src_port: u32,
    dst_port: u32,
    op: u16,
    len: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        kind: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

pub(super) fn pattern(seed: u32, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

pub(super) fn read_line(s: &mut UnixStream) -> String {
    let mut line = vec![];
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

/// Host client: CONNECT handshake up to the guest's OP_REQUEST.
pub(super) fn host_connect(g: &mut Guest, port: u32) -> (UnixStream, Header) {
    let mut client = UnixStream::connect(&g.uds).unwrap();
    client
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let (req, _) = g.expect_packet();
    assert_eq!(req.op, OP_REQUEST);
    (client, req)
}
