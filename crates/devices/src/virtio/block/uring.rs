//! The io_uring engine for virtio-blk.
//!
//! Reads and writes go to the kernel as `READV`/`WRITEV` whose iovecs point
//! straight into guest memory (the host addresses of the descriptor buffers,
//! every one bounds-checked against guest memory first); flushes are `FSYNC`
//! with `IORING_FSYNC_DATASYNC`. Completions raise an eventfd registered with
//! the ring, which the device worker polls next to the queue's notification
//! eventfd; each completion writes the request's status byte, adds the chain
//! to the used ring and the worker signals the interrupt.
//!
//! At most `depth` requests are in flight; the engine stops popping chains
//! when all slots are taken and resumes when completions free some.
//! Requests that need no I/O, or that are malformed (GET_ID, bad chains,
//! writes to a read-only disk, sectors past the end, unsupported types) are
//! answered synchronously by [`BlockBackend::process`], exactly as in the
//! sync engine. The rate limiter admits each request before it is submitted.
//!
//! Before the device worker pauses (pause, snapshot) it completes every
//! request in flight ([`IoUringEngine::complete_in_flight`]), so a paused
//! disk has no request outstanding and its used ring is in order.
//!
//! Dropping the engine (device reset, worker exit) waits for every in-flight
//! request to complete and discards the completions, so nothing touches
//! guest memory (buffers, status bytes, used ring) after the worker is gone.

use crate::GuestMem;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring, Probe};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice,
};
use vmm_sys_util::eventfd::EventFd;

use super::{request_bytes, BlockBackend, RequestHeader};
use crate::rate_limiter::{self, RateLimiter};
use crate::virtio::DeviceMetrics;

/// Requests in flight at most per disk (and the ring's submission size).
pub const QUEUE_DEPTH: u32 = 128;
/// Most iovecs one READV/WRITEV takes (Linux UIO_MAXIOV); longer requests
/// (which a queue of 256 cannot produce) go to the sync path.
const IOV_MAX: usize = 1024;

/// Checks that io_uring works here and has the operations the engine uses.
/// The error says why not (e.g. ENOSYS on kernels without io_uring, EPERM
/// under seccomp or `kernel.io_uring_disabled`).
pub fn probe() -> io::Result<()> {
    let ring = IoUring::new(8).map_err(|e| annotate(e, "io_uring_setup"))?;
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    ring.submitter()
        .register_eventfd(evt.as_raw_fd())
        .map_err(|e| annotate(e, "io_uring_register(EVENTFD)"))?;
    let mut probe = Probe::new();
    // IORING_REGISTER_PROBE needs Linux 5.6; READV, WRITEV and FSYNC are
    // older than it, so a kernel without the probe has them.
    if ring.submitter().register_probe(&mut probe).is_ok() {
        for (name, code) in [
            ("READV", opcode::Readv::CODE),
            ("WRITEV", opcode::Writev::CODE),
            ("FSYNC", opcode::Fsync::CODE),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("the kernel's io_uring does not support {name}"),
                ));
            }
        }
    }
    Ok(())
}

fn annotate(e: io::Error, call: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{call}: {e}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

/// One submitted request.
struct InFlight {
    head: u16,
    /// The backing file the request was admitted on: a resubmitted
    /// remainder goes to the same file even if the disk's file was replaced
    /// meanwhile, and the descriptor stays open until the request completes.
    file: Arc<File>,
    op: Op,
    /// The status byte (last byte of the device-writable buffers).
    status: GuestAddress,
    /// Host addresses of the data buffers still to transfer. The kernel may
    /// read this array until the request completes, so it is never touched
    /// while the request is in flight.
    iovecs: Vec<libc::iovec>,
    /// File offset of `iovecs[0]`.
    offset: u64,
    /// Guest ranges the kernel writes for a read (its device-writable
    /// buffers), marked dirty once the read is over: vm-memory does not see
    /// these writes.
    dest: Vec<(GuestAddress, usize)>,
    /// Data bytes of the request.
    total: usize,
    /// Data bytes transferred so far (a short read/write is resubmitted).
    done: usize,
}

// SAFETY: the raw pointers in `iovecs` point into guest memory, which the
// engine keeps mapped (it owns a `GuestMem` handle) and which is
// shared with the guest anyway; the engine only moves between threads as a
// whole, inside the worker's handler.
unsafe impl Send for InFlight {}

impl InFlight {
    /// Marks the guest pages a finished read may have written dirty (also
    /// after a failure or a partial transfer: some data may have landed).
    fn mark_written(&self, mem: &GuestMem) {
        for &(addr, len) in &self.dest {
            crate::dirty::mark(mem, addr, len);
        }
    }
}

/// What a completion means for its request.
enum Outcome {
    /// Finished with this status.
    Done(u8),
    /// Partially transferred: submit the rest.
    Again,
}

/// The io_uring engine of one disk: the ring, its completion eventfd and the
/// table of in-flight requests.
pub struct IoUringEngine {
    ring: IoUring,
    completion_evt: EventFd,
    /// Guest memory, held so its mappings outlive every in-flight request.
    mem: Arc<GuestMem>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    peak: usize,
    cqes: Vec<(u64, i32)>,
}

impl IoUringEngine {
    /// A ring for at most `depth` requests in flight over guest memory `mem`,
    /// with its completion eventfd registered.
    pub fn new(mem: GuestMem, depth: u32) -> io::Result<Self> {
        let depth = depth.clamp(1, 4096);
        let ring = IoUring::new(depth).map_err(|e| annotate(e, "io_uring_setup"))?;
        let completion_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        ring.submitter()
            .register_eventfd(completion_evt.as_raw_fd())
            .map_err(|e| annotate(e, "io_uring_register(EVENTFD)"))?;
        let depth = depth as usize;
        Ok(Self {
            ring,
            completion_evt,
            mem: Arc::new(mem),
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            peak: 0,
            cqes: Vec::with_capacity(depth),
        })
    }

    /// The eventfd that becomes readable when requests complete.
    pub fn completion_fd(&self) -> RawFd {
        self.completion_evt.as_raw_fd()
    }

    /// Consumes a completion notification (call when the eventfd is ready).
    pub fn clear_notification(&self) {
        // Non-blocking: EAGAIN (nothing pending) is harmless.
        let _ = self.completion_evt.read();
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The most requests that were in flight at once.
    pub fn peak_in_flight(&self) -> usize {
        self.peak
    }

    /// Pops available requests while there is room in flight and the limiter
    /// admits them: submits reads, writes and flushes to the ring and
    /// answers the others at once. Returns whether any chain was added to
    /// the used ring (the caller then signals the interrupt).
    pub fn drain_queue(
        &mut self,
        backend: &mut BlockBackend,
        queue: &mut Queue,
        mut limiter: Option<&mut RateLimiter>,
    ) -> bool {
        let mem = self.mem.clone();
        let mem = &*mem;
        let mut used = false;
        let mut pushed = false;
        while !self.free.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let throttled = &backend.metrics.throttled;
            if !rate_limiter::admit(limiter.as_deref_mut(), 1, request_bytes(&chain), throttled) {
                queue.go_to_previous_position();
                break;
            }
            let head = chain.head_index();
            let Some(req) = prepare(mem, backend, &chain) else {
                let len = backend.process(mem, chain);
                add_used(queue, mem, head, len, &backend.metrics);
                used = true;
                continue;
            };
            let slot = self.free.pop().expect("a free slot");
            self.slots[slot] = Some(req);
            self.peak = self.peak.max(self.slots.len() - self.free.len());
            if self.push(slot) {
                pushed = true;
            } else {
                used |= self.finish(backend, queue, slot, VIRTIO_BLK_S_IOERR as u8);
            }
        }
        if pushed {
            self.submit();
        }
        used
    }

    /// Handles every completion the ring holds: finished requests get their
    /// status byte and go to the used ring, short transfers are resubmitted.
    /// Returns whether any chain was added to the used ring.
    pub fn process_completions(&mut self, backend: &mut BlockBackend, queue: &mut Queue) -> bool {
        let mut used = false;
        loop {
            self.cqes.clear();
            self.cqes
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            if self.cqes.is_empty() {
                return used;
            }
            let mut pushed = false;
            for i in 0..self.cqes.len() {
                let (slot, res) = self.cqes[i];
                let slot = slot as usize;
                let Some(req) = self.slots.get_mut(slot).and_then(|s| s.as_mut()) else {
                    log::error!("block: io_uring completion for unknown request {slot}");
                    continue;
                };
                match outcome(req, res) {
                    Outcome::Done(status) => used |= self.finish(backend, queue, slot, status),
                    Outcome::Again => {
                        if self.push(slot) {
                            pushed = true;
                        } else {
                            used |= self.finish(backend, queue, slot, VIRTIO_BLK_S_IOERR as u8);
                        }
                    }
                }
            }
            if pushed {
                self.submit();
            }
        }
    }

    /// Waits for every request in flight and completes it (status byte, used
    /// ring) without popping new ones: afterwards the used ring accounts for
    /// every chain the engine took, as a paused device for a snapshot must
    /// (restore resumes each queue at its used index). Returns whether any
    /// chain was added to the used ring.
    pub fn complete_in_flight(
        &mut self,
        backend: &mut BlockBackend,
        queue: &mut Queue,
    ) -> io::Result<bool> {
        let mut used = false;
        while self.in_flight() > 0 {
            self.wait_for_completion()?;
            used |= self.process_completions(backend, queue);
        }
        Ok(used)
    }

    /// Blocks until at least one request completes (or none is in flight).
    pub fn wait_for_completion(&mut self) -> io::Result<()> {
        if self.in_flight() == 0 {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map(|_| ()),
            }
        }
    }

    /// Queues the SQE for `slot`'s request (or its remainder). False if the
    /// submission queue has no room even after submitting what it holds.
    fn push(&mut self, slot: usize) -> bool {
        let req = self.slots[slot].as_ref().expect("slot in use");
        let fd = types::Fd(req.file.as_raw_fd());
        let entry = match req.op {
            Op::Read => opcode::Readv::new(fd, req.iovecs.as_ptr(), req.iovecs.len() as u32)
                .offset(req.offset)
                .build(),
            Op::Write => opcode::Writev::new(fd, req.iovecs.as_ptr(), req.iovecs.len() as u32)
                .offset(req.offset)
                .build(),
            Op::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(slot as u64);
        for attempt in 0..2 {
            // SAFETY: the entry's iovec array (`req.iovecs`, a heap buffer
            // owned by the slot) and every buffer it describes stay valid
            // until the request's completion is reaped:
            // - each iovec was built by `prepare` from a `VolatileSlice` that
            //   vm-memory returned only after checking the whole range lies
            //   inside one mapped region of guest memory (`get_slices`), with
            //   the direction the descriptor allows (the kernel writes only
            //   into device-writable buffers);
            // - the engine owns a handle on that guest memory (`self.mem`), so
            //   the mappings cannot be unmapped while it lives, and its `Drop`
            //   waits for every in-flight request before releasing it (and
            //   leaks the handle if it cannot wait);
            // - a slot's `InFlight` is neither modified nor dropped until its
            //   completion arrives (`process_completions`, `Drop`);
            // - the file descriptor is kept open by `req.file` (an `Arc` the
            //   slot holds until the request's completion is reaped).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return true;
            }
            if attempt == 0 {
                self.submit();
            }
        }
        log::error!("block: io_uring submission queue full");
        false
    }

    /// Submits every queued SQE. On failure they stay queued and the next
    /// event retries.
    fn submit(&mut self) {
        loop {
            match self.ring.submit() {
                Ok(_) if self.ring.submission().is_empty() => return,
                Ok(0) => return,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("block: io_uring submit: {e}");
                    return;
                }
            }
        }
    }

    /// Completes `slot`'s request with `status`: writes the status byte,
    /// adds the chain to the used ring, frees the slot.
    fn finish(
        &mut self,
        backend: &BlockBackend,
        queue: &mut Queue,
        slot: usize,
        status: u8,
    ) -> bool {
        let Some(req) = self.slots[slot].take() else {
            return false;
        };
        self.free.push(slot);
        req.mark_written(&self.mem);
        let m = &backend.metrics;
        let ok = status == VIRTIO_BLK_S_OK as u8;
        if !ok {
            DeviceMetrics::add(&m.io_errors, 1);
        }
        let written = match (req.op, ok) {
            (Op::Read, true) => req.total,
            _ => 0,
        };
        let len = if self.mem.write_obj(status, req.status).is_ok() {
            DeviceMetrics::add(&m.requests, 1);
            match (req.op, ok) {
                (Op::Read, true) => {
                    DeviceMetrics::add(&m.bytes_to_guest, req.total as u64);
                    DeviceMetrics::add(&m.reads, 1);
                }
                (Op::Write, true) => {
                    DeviceMetrics::add(&m.bytes_from_guest, req.total as u64);
                    DeviceMetrics::add(&m.writes, 1);
                }
                (Op::Flush, true) => DeviceMetrics::add(&m.flushes, 1),
                _ => {}
            }
            written + 1
        } else {
            written
        };
        add_used(queue, &self.mem, req.head, len as u32, m);
        true
    }

    /// Waits for every in-flight request and discards the completions.
    fn quiesce(&mut self) -> io::Result<()> {
        while self.in_flight() > 0 {
            self.wait_for_completion()?;
            for cqe in self.ring.completion() {
                let slot = cqe.user_data() as usize;
                if let Some(s) = self.slots.get_mut(slot) {
                    if let Some(req) = s.take() {
                        req.mark_written(&self.mem);
                        self.free.push(slot);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Drop for IoUringEngine {
    fn drop(&mut self) {
        let n = self.in_flight();
        if let Err(e) = self.quiesce() {
            // The kernel may still write into guest memory: keep it mapped
            // for the life of the process rather than risk a write into
            // whatever would be mapped there next.
            log::error!(
                "block: cannot wait for {n} in-flight io_uring requests ({e}); \
                 guest memory stays mapped"
            );
            std::mem::forget(Arc::clone(&self.mem));
        }
    }
}

fn add_used(queue: &mut Queue, mem: &GuestMem, head: u16, len: u32, m: &DeviceMetrics) {
    if queue.add_used(mem, head, len).is_err() {
        DeviceMetrics::add(&m.invalid_requests, 1);
    }
}

/// Advances a request by a completion result.
fn outcome(req: &mut InFlight, res: i32) -> Outcome {
    if res < 0 {
        log::debug!(
            "block: io_uring {:?} failed: {}",
            req.op,
            io::Error::from_raw_os_error(-res)
        );
        return Outcome::Done(VIRTIO_BLK_S_IOERR as u8);
    }
    if req.op == Op::Flush {
        return Outcome::Done(VIRTIO_BLK_S_OK as u8);
    }
    let n = res as usize;
    req.done += n;
    if req.done >= req.total {
        return Outcome::Done(VIRTIO_BLK_S_OK as u8);
    }
    if n == 0 {
        // End of file (the backing file shrank) or no progress.
        return Outcome::Done(VIRTIO_BLK_S_IOERR as u8);
    }
    advance(&mut req.iovecs, n);
    req.offset += n as u64;
    Outcome::Again
}

/// Drops the first `n` bytes from `iovecs`.
fn advance(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut whole = 0;
    for iov in iovecs.iter_mut() {
        if n < iov.iov_len {
            iov.iov_base = iov.iov_base.wrapping_add(n);
            iov.iov_len -= n;
            break;
        }
        n -= iov.iov_len;
        whole += 1;
    }
    iovecs.drain(..whole);
}

/// Host segments covering `len` bytes of `slices` after the first `skip`.
fn iovecs<B: BitmapSlice>(
    slices: &[VolatileSlice<'_, B>],
    mut skip: usize,
    mut len: usize,
) -> Vec<libc::iovec> {
    let mut out = Vec::new();
    for s in slices {
        if len == 0 {
            break;
        }
        if skip >= s.len() {
            skip -= s.len();
            continue;
        }
        let n = (s.len() - skip).min(len);
        out.push(libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().wrapping_add(skip).cast(),
            iov_len: n,
        });
        len -= n;
        skip = 0;
    }
    out
}

/// Turns a chain into a request to submit, or `None` when the sync path must
/// answer it (no I/O needed, or anything malformed: it then fails exactly as
/// in the sync engine).
fn prepare(
    mem: &GuestMem,
    backend: &BlockBackend,
    chain: &DescriptorChain<&GuestMem>,
) -> Option<InFlight> {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut dest = Vec::new();
    let (mut rlen, mut wlen) = (0usize, 0usize);
    let mut status = None;
    for desc in chain.clone() {
        let len = desc.len() as usize;
        let (list, total, perm) = if desc.is_write_only() {
            if len > 0 {
                status = Some(desc.addr().checked_add(len as u64 - 1)?);
                dest.push((desc.addr(), len));
            }
            (&mut writable, &mut wlen, Permissions::Write)
        } else {
            (&mut readable, &mut rlen, Permissions::Read)
        };
        *total = total.checked_add(len)?;
        for s in mem.get_slices(desc.addr(), len, perm).ok()? {
            list.push(s.ok()?);
        }
    }
    let hdr_len = std::mem::size_of::<RequestHeader>();
    if rlen < hdr_len || wlen == 0 {
        return None;
    }
    let mut hdr = RequestHeader::default();
    let mut got = 0;
    for s in &readable {
        let n = s.len().min(hdr_len - got);
        got += s
            .subslice(0, n)
            .ok()?
            .copy_to(&mut hdr.as_mut_slice()[got..got + n]);
        if got == hdr_len {
            break;
        }
    }
    let (op, iovecs, total, offset) = match hdr.kind {
        VIRTIO_BLK_T_IN => {
            let len = wlen - 1;
            let off = backend.in_range(hdr.sector, len)?;
            (Op::Read, iovecs(&writable, 0, len), len, off)
        }
        VIRTIO_BLK_T_OUT if !backend.read_only => {
            let len = rlen - hdr_len;
            let off = backend.in_range(hdr.sector, len)?;
            (Op::Write, iovecs(&readable, hdr_len, len), len, off)
        }
        VIRTIO_BLK_T_FLUSH if !backend.read_only => (Op::Flush, Vec::new(), 0, 0),
        _ => return None,
    };
    if op != Op::Read {
        dest.clear();
    }
    if (op != Op::Flush && total == 0) || iovecs.len() > IOV_MAX {
        return None;
    }
    Some(InFlight {
        head: chain.head_index(),
        file: backend.file.clone(),
        op,
        status: status?,
        iovecs,
        offset,
        dest,
        total,
        done: 0,
    })
}
