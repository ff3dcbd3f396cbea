//! virtio-blk backed by a raw file: read, write, flush (fdatasync), get-id,
//! read-only disks. Requests run on the device's worker thread, with one of
//! two engines ([`BlockEngine`]): `sync` executes each request with blocking
//! `pread`/`pwrite`/`fdatasync` on the worker; `io_uring` ([`uring`]) submits
//! them to an io_uring and completes them as the kernel finishes them.

use crate::{ChainReader, ChainWriter, GuestMem};
use kiln_seccomp::ThreadKind;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::ByteValued;
use vmm_sys_util::epoll::EventSet;

use super::live::Live;
use super::worker::{Handler, Next, Worker};
use super::{
    read_config_bytes, ActivateContext, ActivateError, DeviceMetrics, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::rate_limiter::{self, RateLimiter, RateLimiterConfig, RateLimiterUpdate};

pub mod uring;

/// Sector size the protocol counts in.
pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const CHUNK: usize = 1 << 20;

/// How a disk executes requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BlockEngine {
    /// Blocking `pread`/`pwrite`/`fdatasync` on the device's worker thread,
    /// one request at a time.
    #[default]
    Sync,
    /// Asynchronous I/O through an io_uring (Linux 5.1 and later; up to
    /// [`uring::QUEUE_DEPTH`] requests in flight).
    IoUring,
}

/// An engine name other than `sync`, `io_uring` or `io-uring`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown disk engine {0:?} (expected sync or io_uring)")]
pub struct BlockEngineParseError(pub String);

impl FromStr for BlockEngine {
    type Err = BlockEngineParseError;

    /// `sync`, or `io_uring` (also spelled `io-uring`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(Self::Sync),
            "io_uring" | "io-uring" => Ok(Self::IoUring),
            _ => Err(BlockEngineParseError(s.to_string())),
        }
    }
}

impl std::fmt::Display for BlockEngine {
    /// The name [`BlockEngine::from_str`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sync => "sync",
            Self::IoUring => "io_uring",
        })
    }
}

/// Parses the value of a disk's `engine=` option (for CLI parsers):
/// `sync`, `io_uring` or `io-uring`.
pub fn parse_engine(s: &str) -> Result<BlockEngine, BlockEngineParseError> {
    s.parse()
}

/// A disk to attach.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// Backing file (raw image).
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// The ID the guest reads with VIRTIO_BLK_T_GET_ID (at most 20 bytes).
    pub id: String,
    /// I/O limits: bandwidth counts the request's data bytes, ops one per
    /// request. `None`: unlimited.
    pub rate_limiter: Option<RateLimiterConfig>,
    /// How requests are executed.
    pub engine: BlockEngine,
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The backing file is empty or not a multiple of 512 bytes.
    #[error("disk {path} is {size} bytes: it must be a non-empty multiple of 512")]
    Size {
        /// Path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The disk asks for the io_uring engine and this host cannot run it
    /// (kernel without io_uring, seccomp, `kernel.io_uring_disabled`, ...).
    #[error("disk {path}: the io_uring engine is not available on this host ({source}); use engine=sync")]
    IoUringUnavailable {
        /// Path.
        path: PathBuf,
        /// Why (the failing call and its OS error).
        source: std::io::Error,
    },
}

/// What can change while the disk runs ([`BlockHandle::update`]): the
/// backing file (and so the capacity) and the rate limiter.
#[derive(Clone)]
struct BlockLive {
    file: Arc<File>,
    path: PathBuf,
    /// In sectors.
    capacity: u64,
    /// Bumped whenever the file is replaced (even by the same path).
    file_generation: u64,
    limiter: RateLimiterConfig,
}

/// The virtio-blk device.
pub struct Block {
    config: BlockConfig,
    live: Arc<Live<BlockLive>>,
    acked: u64,
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
}

/// Opens a backing file (for writing too unless `read_only`) and checks its
/// size; returns it and its capacity in sectors.
fn open_disk(path: &Path, read_only: bool) -> Result<(File, u64), BlockError> {
    let err = |source| BlockError::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(err)?;
    let size = file.metadata().map_err(err)?.len();
    if size == 0 || size % SECTOR_SIZE != 0 {
        return Err(BlockError::Size {
            path: path.to_path_buf(),
            size,
        });
    }
    Ok((file, size / SECTOR_SIZE))
}

impl Block {
    /// Opens the backing file.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let (file, capacity) = open_disk(&config.path, config.read_only)?;
        if config.engine == BlockEngine::IoUring {
            // No silent fallback: the user asked for io_uring.
            uring::probe().map_err(|source| BlockError::IoUringUnavailable {
                path: config.path.clone(),
                source,
            })?;
        }
        let live = Live::new(BlockLive {
            file: Arc::new(file),
            path: config.path.clone(),
            capacity,
            file_generation: 0,
            limiter: config.rate_limiter.unwrap_or_default(),
        })
        .map_err(|source| BlockError::Open {
            path: config.path.clone(),
            source,
        })?;
        Ok(Self {
            config,
            live: Arc::new(live),
            acked: 0,
            worker: None,
            metrics: Arc::default(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.live.with(|l| l.capacity)
    }

    /// A handle for changing the disk while the VM runs.
    pub fn handle(&self) -> BlockHandle {
        BlockHandle {
            live: self.live.clone(),
            id: self.config.id.clone(),
            read_only: self.config.read_only,
        }
    }
}

/// Changes a disk while the VM runs (`PATCH /drives/{id}`); cheap to clone.
#[derive(Clone)]
pub struct BlockHandle {
    live: Arc<Live<BlockLive>>,
    id: String,
    read_only: bool,
}

impl BlockHandle {
    /// The drive's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The backing file in use.
    pub fn path(&self) -> PathBuf {
        self.live.with(|l| l.path.clone())
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.live.with(|l| l.capacity)
    }

    /// The rate limiter in effect (no buckets: unlimited).
    pub fn rate_limiter(&self) -> RateLimiterConfig {
        self.live.with(|l| l.limiter)
    }

    /// Replaces the backing file by `path` (opened read-only if the drive
    /// is) and/or changes the rate limiter. The new file is opened and
    /// checked first: on error nothing changes. Requests the worker already
    /// took finish on the old file; the guest is told of the new capacity
    /// with a configuration-change interrupt. Returns once the device's
    /// worker uses the new settings (or at once if the driver has not
    /// activated the device yet: it starts with them).
    pub fn update(
        &self,
        path: Option<&Path>,
        limiter: Option<&RateLimiterUpdate>,
    ) -> Result<(), BlockError> {
        let opened = path
            .map(|p| open_disk(p, self.read_only).map(|(f, c)| (p.to_path_buf(), f, c)))
            .transpose()?;
        self.live.update(|l| {
            if let Some((path, file, capacity)) = opened {
                l.file = Arc::new(file);
                l.path = path;
                l.capacity = capacity;
                l.file_generation += 1;
            }
            if let Some(u) = limiter {
                l.limiter.apply_update(u);
            }
            Ok(())
        })
    }
}

/// The request header the driver puts first (virtio 1.2, 5.2.6).
#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
pub struct RequestHeader {
    /// VIRTIO_BLK_T_*.
    pub kind: u32,
    /// Priority (ignored).
    pub reserved: u32,
    /// First sector.
    pub sector: u64,
}

// SAFETY: RequestHeader is plain old data with no padding (4 + 4 + 8 bytes).
unsafe impl ByteValued for RequestHeader {}

/// The part of the device that runs on the worker: executes requests.
pub struct BlockBackend {
    file: Arc<File>,
    capacity: u64,
    read_only: bool,
    id: Vec<u8>,
    metrics: Arc<DeviceMetrics>,
}

/// Why a request could not be executed as asked.
#[derive(Debug, PartialEq, Eq)]
enum Failure {
    /// Status to report.
    Status(u8),
}

impl BlockBackend {
    fn in_range(&self, sector: u64, len: usize) -> Option<u64> {
        let off = sector.checked_mul(SECTOR_SIZE)?;
        let end = off.checked_add(len as u64)?;
        (end <= self.capacity * SECTOR_SIZE).then_some(off)
    }

    /// Executes one request; returns the number of bytes written to guest
    /// memory (the used length).
    pub fn process(&mut self, mem: &GuestMem, chain: DescriptorChain<&GuestMem>) -> u32 {
        let (reader, writer) = match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                // A descriptor points outside guest memory or the lengths overflow.
                DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                return 0;
            }
        };
        let mut writer = writer;
        let wlen = writer.available_bytes();
        if wlen == 0 {
            DeviceMetrics::add(&self.metrics.invalid_requests, 1);
            return 0;
        }
        let mut status_w = match writer.split_at(wlen - 1) {
            Ok(s) => s,
            Err(_) => return 0,
        };
        let (status, written) = match self.execute(reader, &mut writer) {
            Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
            Err(Failure::Status(s)) => (s, 0),
        };
        if status == VIRTIO_BLK_S_IOERR as u8 {
            DeviceMetrics::add(&self.metrics.io_errors, 1);
        }
        if status_w.write_all(&[status]).is_err() {
            return written as u32;
        }
        DeviceMetrics::add(&self.metrics.requests, 1);
        (written + 1) as u32
    }

    fn execute(
        &mut self,
        mut reader: ChainReader<'_>,
        writer: &mut ChainWriter<'_>,
    ) -> Result<usize, Failure> {
        let invalid = |m: &DeviceMetrics| {
            DeviceMetrics::add(&m.invalid_requests, 1);
            Failure::Status(VIRTIO_BLK_S_IOERR as u8)
        };
        let hdr: RequestHeader = reader.read_obj().map_err(|_| invalid(&self.metrics))?;
        match hdr.kind {
            VIRTIO_BLK_T_IN => {
                let len = writer.available_bytes();
                let mut off = self
                    .in_range(hdr.sector, len)
                    .ok_or_else(|| invalid(&self.metrics))?;
                let mut buf = vec![0u8; len.min(CHUNK)];
                let mut left = len;
                while left > 0 {
                    let n = left.min(CHUNK);
                    self.file
                        .read_exact_at(&mut buf[..n], off)
                        .map_err(|_| Failure::Status(VIRTIO_BLK_S_IOERR as u8))?;
                    writer
                        .write_all(&buf[..n])
                        .map_err(|_| invalid(&self.metrics))?;
                    off += n as u64;
                    left -= n;
                }
                DeviceMetrics::add(&self.metrics.bytes_to_guest, len as u64);
                DeviceMetrics::add(&self.metrics.reads, 1);
                Ok(len)
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(Failure::Status(VIRTIO_BLK_S_IOERR as u8));
                }
                let len = reader.available_bytes();
                let mut off = self
                    .in_range(hdr.sector, len)
                    .ok_or_else(|| invalid(&self.metrics))?;
                let mut buf = vec![0u8; len.min(CHUNK)];
                let mut left = len;
                while left > 0 {
                    let n = left.min(CHUNK);
                    reader
                        .read_exact(&mut buf[..n])
                        .map_err(|_| invalid(&self.metrics))?;
                    self.file
                        .write_all_at(&buf[..n], off)
                        .map_err(|_| Failure::Status(VIRTIO_BLK_S_IOERR as u8))?;
                    off += n as u64;
                    left -= n;
                }
                DeviceMetrics::add(&self.metrics.bytes_from_guest, len as u64);
                DeviceMetrics::add(&self.metrics.writes, 1);
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    // SAFETY: fdatasync on a file descriptor we own.
                    if unsafe { libc::fdatasync(self.file.as_raw_fd()) } != 0 {
                        return Err(Failure::Status(VIRTIO_BLK_S_IOERR as u8));
                    }
                }
                DeviceMetrics::add(&self.metrics.flushes, 1);
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = writer.available_bytes().min(self.id.len());
                writer
                    .write_all(&self.id[..n])
                    .map_err(|_| invalid(&self.metrics))?;
                Ok(n)
            }
            _ => Err(Failure::Status(VIRTIO_BLK_S_UNSUPP as u8)),
        }
    }
}

/// Pops and executes every available request; returns whether any completed.
pub fn drain_queue(backend: &mut BlockBackend, queue: &mut Queue, mem: &GuestMem) -> bool {
    drain_queue_limited(backend, queue, mem, None)
}

/// Data bytes of a request for the bandwidth limit: its buffers minus the
/// 16-byte header and the status byte (0 for flush).
fn request_bytes(chain: &DescriptorChain<&GuestMem>) -> u64 {
    let total: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
    total.saturating_sub(std::mem::size_of::<RequestHeader>() as u64 + 1)
}

/// [`drain_queue`] under `limiter`: stops at the first request the limiter
/// refuses, leaving it (and those after it) available for when the
/// limiter's timer fires.
pub fn drain_queue_limited(
    backend: &mut BlockBackend,
    queue: &mut Queue,
    mem: &GuestMem,
    mut limiter: Option<&mut RateLimiter>,
) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let throttled = &backend.metrics.throttled;
        if !rate_limiter::admit(limiter.as_deref_mut(), 1, request_bytes(&chain), throttled) {
            virtio_queue::QueueOwnedT::go_to_previous_position(queue);
            break;
        }
        let head = chain.head_index();
        let len = backend.process(mem, chain);
        if queue.add_used(mem, head, len).is_err() {
            DeviceMetrics::add(&backend.metrics.invalid_requests, 1);
        }
        used = true;
    }
    used
}

impl VirtioDevice for Block {
    fn name(&self) -> String {
        format!("block {}", self.config.id)
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX;
        if self.config.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64), size_max (u32), seg_max (u32).
        let mut cfg = Vec::with_capacity(16);
        cfg.extend_from_slice(&self.capacity().to_le_bytes());
        cfg.extend_from_slice(&0u32.to_le_bytes());
        cfg.extend_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            queues,
            interrupt,
        } = ctx;
        let Some((mut queue, evt)) = queues.into_iter().next() else {
            return Err(ActivateError::Queues {
                device: self.name(),
                got: 0,
                want: 1,
            });
        };
        let (current, mut seen) = self.live.snapshot();
        let mut backend = self.backend_with(&current);
        let io_err = |source| ActivateError::Io {
            device: self.name(),
            source,
        };
        // Always a limiter (possibly without buckets, then it admits
        // everything at no cost), so a later update has a timer to use.
        let mut limiter = RateLimiter::new(&current.limiter).map_err(io_err)?;
        let mut live_state = current;
        let live = self.live.clone();
        let fds = vec![
            (evt.as_raw_fd(), TOKEN_QUEUE, EventSet::IN),
            (limiter.as_raw_fd(), TOKEN_LIMITER, EventSet::IN),
            (live.as_raw_fd(), TOKEN_UPDATE, EventSet::IN),
        ];
        // Takes a pending update; a new file is announced to the guest (a
        // configuration change: the capacity) before the update counts as
        // applied.
        let config_irq = interrupt.clone();
        let mut take_update = move |backend: &mut BlockBackend, limiter: &mut RateLimiter| {
            let Some(new) = live.fetch(&mut seen) else {
                return;
            };
            if new.file_generation != live_state.file_generation {
                backend.file = new.file.clone();
                backend.capacity = new.capacity;
                config_irq.signal_config();
            }
            limiter.update(&RateLimiterUpdate::between(
                &live_state.limiter,
                &new.limiter,
            ));
            live_state = new;
            live.applied(seen);
        };
        let name = format!("kiln_blk_{}", self.config.id);
        let worker = match self.config.engine {
            BlockEngine::Sync => Worker::spawn(name, ThreadKind::Block, fds, move |token, _| {
                match token {
                    TOKEN_LIMITER => limiter.event_handler(),
                    TOKEN_UPDATE => take_update(&mut backend, &mut limiter),
                    _ => {
                        let _ = evt.read();
                    }
                }
                if drain_queue_limited(&mut backend, &mut queue, &mem, Some(&mut limiter)) {
                    interrupt.signal_used();
                }
                Next::Continue
            }),
            BlockEngine::IoUring => {
                // The ring is set up on the worker thread, under its filter:
                // only that thread may create and drive io_uring instances.
                let setup = move || -> std::io::Result<(Vec<_>, Handler)> {
                    let mut engine =
                        uring::IoUringEngine::new(mem, uring::QUEUE_DEPTH).map_err(|e| {
                            std::io::Error::new(e.kind(), format!("io_uring engine: {e}"))
                        })?;
                    let fds = vec![(engine.completion_fd(), TOKEN_COMPLETION, EventSet::IN)];
                    // The engine is moved into the handler: when the worker
                    // stops (reset, drop) the handler is dropped on the
                    // worker thread, and the engine's Drop waits for the
                    // requests in flight.
                    let handler = move |token, _| {
                        match token {
                            // Pausing: complete what is in flight, take nothing new.
                            super::worker::QUIESCE => {
                                match engine.complete_in_flight(&mut backend, &mut queue) {
                                    Ok(true) => interrupt.signal_used(),
                                    Ok(false) => {}
                                    Err(e) => log::error!(
                                        "block: waiting for io_uring requests before pausing: {e}"
                                    ),
                                }
                                return Next::Continue;
                            }
                            TOKEN_LIMITER => limiter.event_handler(),
                            TOKEN_COMPLETION => engine.clear_notification(),
                            // Requests in flight keep their own handle on the
                            // old file and complete on it.
                            TOKEN_UPDATE => take_update(&mut backend, &mut limiter),
                            _ => {
                                let _ = evt.read();
                            }
                        }
                        let mut used = engine.process_completions(&mut backend, &mut queue);
                        used |= engine.drain_queue(&mut backend, &mut queue, Some(&mut limiter));
                        if used {
                            interrupt.signal_used();
                        }
                        Next::Continue
                    };
                    Ok((fds, Box::new(handler) as Handler))
                };
                Worker::spawn_with(name, ThreadKind::BlockIoUring, fds, Box::new(setup), true)
            }
        }
        .map_err(|source| ActivateError::Io {
            device: self.name(),
            source,
        })?;
        self.worker = Some(worker);
        self.live.worker_started();
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        self.live.worker_stopped();
    }

    fn worker(&self) -> Option<&super::worker::Worker> {
        self.worker.as_ref()
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.worker = None;
        self.live.worker_stopped();
    }
}

/// Worker tokens: the queue's notification, the rate limiter's timer, the
/// io_uring completion eventfd.
const TOKEN_QUEUE: u64 = 0;
const TOKEN_LIMITER: u64 = 1;
const TOKEN_COMPLETION: u64 = 2;
/// [`BlockHandle::update`] changed the file or the limiter.
const TOKEN_UPDATE: u64 = 3;

// ---- Public constructor for the fuzz harness (crate::fuzz_harness) ----

impl Block {
    /// The backend [`VirtioDevice::activate`] would run on the worker: for
    /// driving [`drain_queue`] without a worker thread (fuzzing, tests).
    #[doc(hidden)]
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn backend(&self) -> BlockBackend {
        self.live.with(|l| self.backend_with(l))
    }

    fn backend_with(&self, live: &BlockLive) -> BlockBackend {
        let mut id = self.config.id.as_bytes().to_vec();
        id.truncate(VIRTIO_BLK_ID_BYTES as usize);
        BlockBackend {
            file: live.file.clone(),
            capacity: live.capacity,
            read_only: self.config.read_only,
            id,
            metrics: self.metrics.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{ChainBuilder, Desc};
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use vm_memory::{Bytes, GuestAddress};

    /// Every test runs against both engines.
    const ENGINES: [BlockEngine; 2] = [BlockEngine::Sync, BlockEngine::IoUring];

    fn temp_disk(data: &[u8]) -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "kiln-blk-{}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        std::fs::write(&p, data).unwrap();
        p
    }

    fn config(path: &Path, read_only: bool, engine: BlockEngine) -> BlockConfig {
        BlockConfig {
            path: path.to_path_buf(),
            read_only,
            id: "disk0".into(),
            rate_limiter: None,
            engine,
        }
    }

    /// Opens a disk with `engine`; an io_uring that does not work here fails
    /// the test with the reason (never a silent skip or fallback).
    fn open(cfg: BlockConfig) -> Block {
        Block::new(cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    fn backend(data: &[u8], read_only: bool, engine: BlockEngine) -> (BlockBackend, PathBuf) {
        let p = temp_disk(data);
        let b = open(config(&p, read_only, engine));
        (b.backend(), p)
    }

    /// Serves `queue` with `engine` until no request is in flight (and no
    /// more can be popped); returns the most requests in flight at once.
    fn serve(
        engine: BlockEngine,
        be: &mut BlockBackend,
        mem: &GuestMem,
        queue: &mut Queue,
        mut limiter: Option<&mut RateLimiter>,
        depth: u32,
    ) -> usize {
        match engine {
            BlockEngine::Sync => {
                drain_queue_limited(be, queue, mem, limiter);
                1
            }
            BlockEngine::IoUring => {
                let mut eng = uring::IoUringEngine::new(mem.clone(), depth)
                    .unwrap_or_else(|e| panic!("io_uring engine unavailable: {e}"));
                loop {
                    eng.drain_queue(be, queue, limiter.as_deref_mut());
                    if eng.in_flight() == 0 {
                        break;
                    }
                    eng.wait_for_completion().unwrap();
                    eng.process_completions(be, queue);
                }
                eng.peak_in_flight()
            }
        }
    }

    fn run(engine: BlockEngine, be: &mut BlockBackend, q: &mut ChainBuilder) -> Vec<(u16, u32)> {
        q.run(|mem, queue| {
            serve(engine, be, mem, queue, None, uring::QUEUE_DEPTH);
            true
        })
    }

    fn header(kind: u32, sector: u64) -> Vec<u8> {
        RequestHeader {
            kind,
            reserved: 0,
            sector,
        }
        .as_slice()
        .to_vec()
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

    #[test]
    fn block_engine_names_parse() {
        assert_eq!("sync".parse(), Ok(BlockEngine::Sync));
        assert_eq!("io_uring".parse(), Ok(BlockEngine::IoUring));
        assert_eq!(parse_engine("io-uring"), Ok(BlockEngine::IoUring));
        assert_eq!(BlockEngine::default(), BlockEngine::Sync);
        for e in ENGINES {
            assert_eq!(e.to_string().parse(), Ok(e));
        }
        let err = "aio".parse::<BlockEngine>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown disk engine \"aio\" (expected sync or io_uring)"
        );
        let e = BlockError::IoUringUnavailable {
            path: "/d.img".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSYS),
        };
        let msg = e.to_string();
        assert!(msg.starts_with("disk /d.img: the io_uring engine is not available"));
        assert!(msg.contains("use engine=sync"), "{msg}");
    }

    /// Not a skip: if io_uring cannot run here, every io_uring test fails
    /// and this one says why.
    #[test]
    fn block_io_uring_is_available_in_this_sandbox() {
        if let Err(e) = uring::probe() {
            panic!("io_uring does not work here, so the io_uring engine cannot be tested: {e}");
        }
    }

    /// A host where io_uring_setup fails (here: a seccomp filter on this
    /// thread answering EPERM, as a sandbox would) refuses the disk with a
    /// message naming it; no fallback to the sync engine.
    #[test]
    fn block_io_uring_unavailable_is_a_clear_error() {
        let path = temp_disk(&[0u8; 4096]);
        let p = path.clone();
        let res = std::thread::spawn(move || {
            let k = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
            let mut filter = [
                // seccomp_data.nr is at offset 0.
                k((libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, 0, 0, 0),
                k(
                    (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                    0,
                    1,
                    libc::SYS_io_uring_setup as u32,
                ),
                k(
                    (libc::BPF_RET | libc::BPF_K) as u16,
                    0,
                    0,
                    libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
                ),
                k(
                    (libc::BPF_RET | libc::BPF_K) as u16,
                    0,
                    0,
                    libc::SECCOMP_RET_ALLOW,
                ),
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_mut_ptr(),
            };
            // SAFETY: prctl and seccomp on this thread only (no TSYNC); the
            // program outlives the call, which copies it.
            unsafe {
                assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
                assert_eq!(
                    libc::syscall(
                        libc::SYS_seccomp,
                        libc::SECCOMP_SET_MODE_FILTER,
                        0,
                        &prog as *const libc::sock_fprog
                    ),
                    0,
                    "seccomp: {}",
                    std::io::Error::last_os_error()
                );
            }
            Block::new(config(&p, false, BlockEngine::IoUring)).map(|_| ())
        })
        .join()
        .unwrap();
        let err = res.expect_err("io_uring blocked: Block::new must fail");
        assert!(
            matches!(err, BlockError::IoUringUnavailable { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("io_uring_setup"), "{msg}");
        assert!(msg.contains("use engine=sync"), "{msg}");
        // The sync engine is unaffected (and io_uring works elsewhere).
        open(config(&path, false, BlockEngine::Sync));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_write_flush_and_id() {
        for engine in ENGINES {
            let mut disk = vec![0u8; 4096];
            disk[512..516].copy_from_slice(b"kiln");
            let (mut be, path) = backend(&disk, false, engine);
            let mut q = ChainBuilder::new();

            // Read sector 1.
            q.push(&[
                Desc::r(&header(VIRTIO_BLK_T_IN, 1)),
                Desc::w(512),
                Desc::w(1),
            ]);
            // Write sector 2.
            q.push(&[
                Desc::r(&header(VIRTIO_BLK_T_OUT, 2)),
                Desc::r(&[7u8; 512]),
                Desc::w(1),
            ]);
            q.push(&[Desc::r(&header(VIRTIO_BLK_T_FLUSH, 0)), Desc::w(1)]);
            q.push(&[
                Desc::r(&header(VIRTIO_BLK_T_GET_ID, 0)),
                Desc::w(20),
                Desc::w(1),
            ]);
            q.push(&[Desc::r(&header(99, 0)), Desc::w(1)]);
            let mut used = run(engine, &mut be, &mut q);
            assert_eq!(used.len(), 5, "{engine}");
            // The io_uring engine completes in any order.
            used.sort();
            assert_eq!(used[0].1, 513, "{engine}");
            assert_eq!(&q.written(0, 1)[..4], b"kiln", "{engine}");
            assert_eq!(q.written(0, 2), vec![OK], "{engine}");
            assert_eq!(q.written(1, 2), vec![OK], "{engine}");
            assert_eq!(used[1].1, 1, "{engine}");
            assert_eq!(q.written(2, 1), vec![OK], "{engine}");
            assert_eq!(used[2].1, 1, "{engine}");
            assert_eq!(&q.written(3, 1)[..5], b"disk0", "{engine}");
            assert_eq!(used[3].1, 6, "{engine}");
            assert_eq!(q.written(4, 1), vec![VIRTIO_BLK_S_UNSUPP as u8], "{engine}");
            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(&on_disk[1024..1536], &[7u8; 512][..], "{engine}");
            let m = &be.metrics;
            assert_eq!(m.requests.load(Relaxed), 5, "{engine}");
            assert_eq!(m.bytes_to_guest.load(Relaxed), 512, "{engine}");
            assert_eq!(m.bytes_from_guest.load(Relaxed), 512, "{engine}");
            assert_eq!(m.io_errors.load(Relaxed), 0, "{engine}");
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn rate_limited_requests_wait_for_the_refill_in_order() {
        use crate::rate_limiter::tests::wait_for_timer;
        for engine in ENGINES {
            let (mut be, path) = backend(&[5u8; 8192], false, engine);
            // 1024 bytes per 100 ms: two 512-byte reads now, then one per 50 ms.
            let cfg = RateLimiterConfig::parse_opts("bw=1024/100,ops=100/100").unwrap();
            let mut rl = RateLimiter::new(&cfg).unwrap();
            let mut q = ChainBuilder::new();
            for s in 0..4 {
                q.push(&[
                    Desc::r(&header(VIRTIO_BLK_T_IN, s)),
                    Desc::w(512),
                    Desc::w(1),
                ]);
            }
            let start = std::time::Instant::now();
            let mut state = None;
            let mut serve_once =
                |q: &mut ChainBuilder, rl: &mut RateLimiter, be: &mut BlockBackend| {
                    q.run(|mem, queue| {
                        if let Some(s) = state.take() {
                            *queue = Queue::try_from(s).unwrap();
                        }
                        serve(engine, be, mem, queue, Some(rl), uring::QUEUE_DEPTH);
                        state = Some(queue.state());
                        true
                    })
                };
            let used = serve_once(&mut q, &mut rl, &mut be);
            assert_eq!(used.len(), 2, "{engine}: served partially");
            assert!(rl.is_blocked(), "{engine}");
            assert_eq!(be.metrics.throttled.load(Relaxed), 1, "{engine}");
            // A kick while throttled serves nothing and counts nothing more.
            let mut used = serve_once(&mut q, &mut rl, &mut be);
            assert_eq!(used.len(), 2, "{engine}");
            assert_eq!(be.metrics.throttled.load(Relaxed), 1, "{engine}");
            while used.len() < 4 {
                wait_for_timer(&mut rl);
                used = serve_once(&mut q, &mut rl, &mut be);
            }
            let waited = start.elapsed();
            assert!(
                waited >= std::time::Duration::from_millis(95),
                "{engine}: {waited:?}"
            );
            // Admission (and so submission) is in order; each refill admits
            // one request, so completions are in order too.
            let heads: Vec<u16> = used.iter().map(|u| u.0).collect();
            assert_eq!(heads, vec![0, 3, 6, 9], "{engine}: in order, none lost");
            for i in 0..4 {
                assert_eq!(q.written(i, 2), vec![OK], "{engine}");
                assert_eq!(q.written(i, 1), vec![5u8; 512], "{engine}");
            }
            assert_eq!(be.metrics.requests.load(Relaxed), 4, "{engine}");
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn read_only_refuses_writes_and_leaves_file_alone() {
        for engine in ENGINES {
            let (mut be, path) = backend(&[1u8; 1024], true, engine);
            let mut q = ChainBuilder::new();
            q.push(&[
                Desc::r(&header(VIRTIO_BLK_T_OUT, 0)),
                Desc::r(&[9u8; 512]),
                Desc::w(1),
            ]);
            // Flush on a read-only disk succeeds without syncing.
            q.push(&[Desc::r(&header(VIRTIO_BLK_T_FLUSH, 0)), Desc::w(1)]);
            // Reads still work.
            q.push(&[
                Desc::r(&header(VIRTIO_BLK_T_IN, 1)),
                Desc::w(512),
                Desc::w(1),
            ]);
            let mut used = run(engine, &mut be, &mut q);
            used.sort();
            assert_eq!(used.len(), 3, "{engine}");
            assert_eq!(q.written(0, 2), vec![IOERR], "{engine}");
            assert_eq!(q.written(1, 1), vec![OK], "{engine}");
            assert_eq!(q.written(2, 2), vec![OK], "{engine}");
            assert_eq!(q.written(2, 1), vec![1u8; 512], "{engine}");
            assert_eq!(std::fs::read(&path).unwrap(), vec![1u8; 1024], "{engine}");
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn malformed_chains_fail_without_touching_outside_memory() {
        for engine in ENGINES {
            let (mut be, path) = backend(&[0u8; 1024], false, engine);
            let mut q = ChainBuilder::new();
            // Past the end of the disk.
            q.push(&[
                Desc::r(&header(VIRTIO_BLK_T_IN, 2)),
                Desc::w(512),
                Desc::w(1),
            ]);
            // Sector number that overflows when scaled.
            q.push(&[
                Desc::r(&header(VIRTIO_BLK_T_IN, u64::MAX / 2)),
                Desc::w(512),
                Desc::w(1),
            ]);
            // Header too short.
            q.push(&[Desc::r(&[0u8; 8]), Desc::w(1)]);
            // Header in a device-writable descriptor (wrong direction).
            q.push(&[Desc::w(16), Desc::w(1)]);
            // No writable status byte at all.
            q.push(&[Desc::r(&header(VIRTIO_BLK_T_IN, 0)), Desc::r(&[0u8; 512])]);
            // A buffer outside guest memory.
            q.push(&[
                Desc::r(&header(VIRTIO_BLK_T_IN, 0)),
                Desc::raw(0xffff_0000, 512, true),
                Desc::w(1),
            ]);
            // A descriptor loop.
            q.push_loop();
            let used = run(engine, &mut be, &mut q);
            assert_eq!(q.written(0, 2), vec![IOERR], "{engine}");
            assert_eq!(q.written(1, 2), vec![IOERR], "{engine}");
            assert_eq!(q.written(2, 1), vec![IOERR], "{engine}");
            assert_eq!(q.written(3, 1), vec![IOERR], "{engine}");
            assert_eq!(used[4].1, 0, "{engine}");
            assert_eq!(used[5].1, 0, "{engine}");
            assert!(used.len() >= 6, "{engine}");
            let m = be.metrics.invalid_requests.load(Relaxed);
            assert!(m >= 6, "{engine}: invalid requests counted: {m}");
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn scatter_gather_buffers_and_split_header() {
        for engine in ENGINES {
            let (mut be, path) = backend(&[0u8; 4096], false, engine);
            let hdr = header(VIRTIO_BLK_T_OUT, 1);
            let mut data = vec![0u8; 2048];
            for (i, b) in data.iter_mut().enumerate() {
                *b = (i * 7 % 251) as u8;
            }
            let mut q = ChainBuilder::new();
            // Header in two halves, data in three pieces.
            q.push(&[
                Desc::r(&hdr[..8]),
                Desc::r(&hdr[8..]),
                Desc::r(&data[..512]),
                Desc::r(&data[512..1536]),
                Desc::r(&data[1536..]),
                Desc::w(1),
            ]);
            let used = run(engine, &mut be, &mut q);
            assert_eq!(used, vec![(0, 1)], "{engine}");
            assert_eq!(q.written(0, 5), vec![OK], "{engine}");
            let on_disk = std::fs::read(&path).unwrap();
            assert_eq!(&on_disk[512..2560], &data[..], "{engine}");

            // Read it back into two buffers, the status byte sharing the last.
            let mut q = ChainBuilder::new();
            q.push(&[
                Desc::r(&header(VIRTIO_BLK_T_IN, 1)),
                Desc::w(1536),
                Desc::w(513),
            ]);
            let used = run(engine, &mut be, &mut q);
            assert_eq!(used, vec![(0, 2049)], "{engine}");
            let mut got = q.written(0, 1);
            got.extend(q.written(0, 2));
            assert_eq!(&got[..2048], &data[..], "{engine}");
            assert_eq!(got[2048], OK, "{engine}");
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn block_file_shrunk_underneath_reports_ioerr() {
        for engine in ENGINES {
            let (mut be, path) = backend(&[3u8; 4096], false, engine);
            // The guest still sees 8 sectors; the file now has 4.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(2048)
                .unwrap();
            let mut q = ChainBuilder::new();
            // Wholly past the new end.
            q.push(&[
                Desc::r(&header(VIRTIO_BLK_T_IN, 6)),
                Desc::w(512),
                Desc::w(1),
            ]);
            // Across it: a short read, then end of file.
            q.push(&[
                Desc::r(&header(VIRTIO_BLK_T_IN, 3)),
                Desc::w(1024),
                Desc::w(1),
            ]);
            let mut used = run(engine, &mut be, &mut q);
            used.sort();
            assert_eq!(used, vec![(0, 1), (3, 1)], "{engine}");
            assert_eq!(q.written(0, 2), vec![IOERR], "{engine}");
            assert_eq!(q.written(1, 2), vec![IOERR], "{engine}");
            assert_eq!(be.metrics.io_errors.load(Relaxed), 2, "{engine}");
            std::fs::remove_file(path).unwrap();
        }
    }

    /// A 256-entry split queue in 8 MiB of guest memory, for many requests
    /// at once (the shared `ChainBuilder` has 16 entries).
    struct BigQueue {
        mem: GuestMem,
        next_desc: u16,
        next_data: u64,
        avail: u16,
    }

    enum Buf {
        R(Vec<u8>),
        W(u32),
    }

    impl BigQueue {
        const SIZE: u16 = 256;
        const DESC: u64 = 0x1000;
        const AVAIL: u64 = 0x2000;
        const USED: u64 = 0x3000;

        fn new() -> Self {
            Self {
                mem: GuestMem::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap(),
                next_desc: 0,
                next_data: 0x10000,
                avail: 0,
            }
        }

        /// Adds a chain and makes it available; returns its head and the
        /// guest address of each buffer.
        fn push(&mut self, bufs: &[Buf]) -> (u16, Vec<u64>) {
            let head = self.next_desc;
            let mut addrs = vec![];
            for (k, b) in bufs.iter().enumerate() {
                let i = self.next_desc;
                self.next_desc += 1;
                let addr = self.next_data;
                let (len, flags) = match b {
                    Buf::R(d) => {
                        self.mem.write_slice(d, GuestAddress(addr)).unwrap();
                        (d.len() as u32, 0u16)
                    }
                    Buf::W(n) => (*n, 2u16),
                };
                self.next_data += u64::from(len).next_multiple_of(16);
                let flags = flags | if k + 1 < bufs.len() { 1 } else { 0 };
                let d = Self::DESC + 16 * u64::from(i);
                self.mem.write_obj(addr, GuestAddress(d)).unwrap();
                self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
                self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
                self.mem.write_obj(i + 1, GuestAddress(d + 14)).unwrap();
                addrs.push(addr);
            }
            let slot = Self::AVAIL + 4 + 2 * u64::from(self.avail % Self::SIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail = self.avail.wrapping_add(1);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            self.mem
                .write_obj(self.avail, GuestAddress(Self::AVAIL + 2))
                .unwrap();
            (head, addrs)
        }

        fn queue(&self) -> Queue {
            let mut q = Queue::new(Self::SIZE).unwrap();
            q.set_size(Self::SIZE);
            q.set_desc_table_address(Some(Self::DESC as u32), Some(0));
            q.set_avail_ring_address(Some(Self::AVAIL as u32), Some(0));
            q.set_used_ring_address(Some(Self::USED as u32), Some(0));
            q.set_ready(true);
            assert!(q.is_valid(&self.mem));
            q
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(Self::USED + 2)).unwrap()
        }

        /// (head, len) of every used entry.
        fn used(&self) -> Vec<(u16, u32)> {
            (0..self.used_idx())
                .map(|i| {
                    let e = Self::USED + 4 + 8 * u64::from(i % Self::SIZE);
                    let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
                    let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
                    (id as u16, len)
                })
                .collect()
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    const BLOCKS: usize = 80;
    const BLOCK: usize = 4096;

    fn pattern(i: usize) -> Vec<u8> {
        (0..BLOCK).map(|k| (i * 31 + k / 512) as u8).collect()
    }

    /// 80 4-KiB writes, then 80 reads of them: with a depth of 16 the ring
    /// fills and refills five times; with 128 all 80 reads are in flight at
    /// once.
    #[test]
    fn block_many_requests_in_flight() {
        for engine in ENGINES {
            let (mut be, path) = backend(&vec![0u8; BLOCKS * BLOCK], false, engine);
            let mut bq = BigQueue::new();
            let mut status = vec![];
            for i in 0..BLOCKS {
                let sector = (i * BLOCK) as u64 / SECTOR_SIZE;
                let (_, a) = bq.push(&[
                    Buf::R(header(VIRTIO_BLK_T_OUT, sector)),
                    Buf::R(pattern(i)),
                    Buf::W(1),
                ]);
                status.push(a[2]);
            }
            let mut queue = bq.queue();
            let peak = serve(engine, &mut be, &bq.mem, &mut queue, None, 16);
            let used = bq.used();
            assert_eq!(used.len(), BLOCKS, "{engine}");
            assert!(used.iter().all(|u| u.1 == 1), "{engine}");
            for a in &status {
                assert_eq!(bq.read(*a, 1), vec![OK], "{engine}");
            }
            if engine == BlockEngine::IoUring {
                assert_eq!(peak, 16, "the ring filled up to its depth");
            }
            let on_disk = std::fs::read(&path).unwrap();
            for i in 0..BLOCKS {
                assert!(
                    on_disk[i * BLOCK..(i + 1) * BLOCK] == pattern(i)[..],
                    "{engine}: block {i}"
                );
            }

            let mut bq = BigQueue::new();
            let mut bufs = vec![];
            for i in (0..BLOCKS).rev() {
                let sector = (i * BLOCK) as u64 / SECTOR_SIZE;
                let (head, a) = bq.push(&[
                    Buf::R(header(VIRTIO_BLK_T_IN, sector)),
                    Buf::W(BLOCK as u32),
                    Buf::W(1),
                ]);
                bufs.push((i, head, a));
            }
            let mut queue = bq.queue();
            let peak = serve(engine, &mut be, &bq.mem, &mut queue, None, 128);
            if engine == BlockEngine::IoUring {
                assert_eq!(peak, BLOCKS, "all reads in flight at once");
            }
            let mut used = bq.used();
            used.sort();
            let mut heads: Vec<(u16, u32)> = bufs
                .iter()
                .map(|(_, h, _)| (*h, BLOCK as u32 + 1))
                .collect();
            heads.sort();
            assert_eq!(used, heads, "{engine}: each read used once, 4097 bytes");
            for (i, _, a) in &bufs {
                assert!(bq.read(a[1], BLOCK) == pattern(*i), "{engine}: read {i}");
                assert_eq!(bq.read(a[2], 1), vec![OK], "{engine}");
            }
            let m = &be.metrics;
            assert_eq!(m.requests.load(Relaxed), 2 * BLOCKS as u64, "{engine}");
            assert_eq!(
                m.bytes_to_guest.load(Relaxed),
                (BLOCKS * BLOCK) as u64,
                "{engine}"
            );
            std::fs::remove_file(path).unwrap();
        }
    }

    /// Reads put disk data into guest memory behind KVM's back: the pages
    /// must be in the device dirty bitmap with either engine (io_uring's
    /// kernel-side writes are marked explicitly), with the used ring's page.
    #[test]
    fn block_reads_mark_guest_pages_dirty() {
        for engine in ENGINES {
            let (mut be, path) = backend(&vec![0x5au8; 4 * BLOCK], false, engine);
            let mut bq = BigQueue::new();
            let (_, a) = bq.push(&[
                Buf::R(header(VIRTIO_BLK_T_IN, 0)),
                Buf::W(2 * BLOCK as u32),
                Buf::W(1),
            ]);
            let mut queue = bq.queue();
            crate::dirty::clear(&bq.mem);
            serve(engine, &mut be, &bq.mem, &mut queue, None, 16);
            assert_eq!(bq.used().len(), 1, "{engine}");
            assert!(bq.read(a[1], 2 * BLOCK).iter().all(|&b| b == 0x5a));
            let dirty = crate::dirty::take(&bq.mem).unwrap();
            let set = |addr: u64| {
                let p = (addr / crate::dirty::PAGE as u64) as usize;
                dirty[0][p / 64] & (1 << (p % 64)) != 0
            };
            let data_pages = a[1] / 4096..=(a[1] + 2 * BLOCK as u64 - 1) / 4096;
            assert_eq!(data_pages.clone().count(), 3);
            for p in data_pages {
                assert!(set(p * 4096), "{engine}: data page {p:#x} not dirty");
            }
            assert!(set(BigQueue::USED), "{engine}: used ring");
            assert!(!set(BigQueue::DESC), "{engine}: descriptors are only read");
            std::fs::remove_file(path).unwrap();
        }
    }

    /// Before a pause, the io_uring engine completes every request it has in
    /// flight, popping no new one: the used ring then holds every chain taken.
    #[test]
    fn block_io_uring_completes_in_flight_requests() {
        let (mut be, path) = backend(&vec![7u8; BLOCKS * BLOCK], false, BlockEngine::IoUring);
        let mut bq = BigQueue::new();
        for i in 0..BLOCKS {
            let sector = (i * BLOCK) as u64 / SECTOR_SIZE;
            let kind = [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT][i % 2];
            let data = if i % 2 == 0 {
                Buf::W(BLOCK as u32)
            } else {
                Buf::R(pattern(i))
            };
            bq.push(&[Buf::R(header(kind, sector)), data, Buf::W(1)]);
        }
        let mut queue = bq.queue();
        let mut eng = uring::IoUringEngine::new(bq.mem.clone(), 32).unwrap();
        eng.drain_queue(&mut be, &mut queue, None);
        let taken = usize::from(bq.used_idx()) + eng.in_flight();
        assert_eq!(taken, 32, "the ring took its depth");
        eng.complete_in_flight(&mut be, &mut queue).unwrap();
        assert_eq!(eng.in_flight(), 0);
        assert_eq!(
            usize::from(bq.used_idx()),
            taken,
            "each taken chain is used"
        );
        assert_eq!(queue.next_avail(), bq.used_idx(), "nothing new was popped");
        // Heads are 3 * i: reads (even i) return the data and the status.
        let want = |h: u16| {
            if (h / 3).is_multiple_of(2) {
                BLOCK as u32 + 1
            } else {
                1
            }
        };
        assert!(bq.used().iter().all(|&(h, len)| len == want(h)));
        std::fs::remove_file(path).unwrap();
    }

    /// Through the device and its worker thread: requests complete and
    /// raise the interrupt; a reset with requests in flight returns only
    /// when nothing can write to guest memory any more.
    #[test]
    fn block_worker_serves_requests_and_reset_quiesces() {
        use std::os::fd::AsRawFd;
        use vmm_sys_util::eventfd::EventFd;
        for engine in ENGINES {
            let path = temp_disk(&vec![0u8; BLOCKS * BLOCK]);
            let mut dev = open(config(&path, false, engine));
            let mut bq = BigQueue::new();
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            dev.activate(ActivateContext {
                mem: bq.mem.clone(),
                queues: vec![(bq.queue(), kick.try_clone().unwrap())],
                interrupt: Arc::new(crate::virtio::Interrupt::new(irq.try_clone().unwrap())),
            })
            .unwrap();
            for i in 0..BLOCKS / 2 {
                let sector = (i * BLOCK) as u64 / SECTOR_SIZE;
                bq.push(&[
                    Buf::R(header(VIRTIO_BLK_T_OUT, sector)),
                    Buf::R(pattern(i)),
                    Buf::W(1),
                ]);
            }
            kick.write(1).unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            let wait_used = |bq: &BigQueue, n: usize| {
                while usize::from(bq.used_idx()) < n {
                    assert!(std::time::Instant::now() < deadline, "{engine}: timed out");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            };
            // Nothing completes, nothing writes guest memory, for 100 ms.
            let still = |bq: &BigQueue, when: &str| {
                let idx = bq.used_idx();
                let before = bq.read(0, 8 << 20);
                std::thread::sleep(std::time::Duration::from_millis(100));
                assert_eq!(bq.used_idx(), idx, "{engine}: a completion {when}");
                assert!(
                    bq.read(0, 8 << 20) == before,
                    "{engine}: guest memory written {when}"
                );
            };
            wait_used(&bq, BLOCKS / 2);
            let mut pfd = libc::pollfd {
                fd: irq.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert_eq!(n, 1, "{engine}: interrupt raised");
            assert!(bq.used().iter().all(|u| u.1 == 1), "{engine}");

            // (head, data buffer) of each read.
            let reads = |bq: &mut BigQueue| {
                let r: Vec<(u16, u64)> = (0..BLOCKS / 4)
                    .map(|i| {
                        let sector = (i * BLOCK) as u64 / SECTOR_SIZE;
                        let (head, a) = bq.push(&[
                            Buf::R(header(VIRTIO_BLK_T_IN, sector)),
                            Buf::W(BLOCK as u32),
                            Buf::W(1),
                        ]);
                        (head, a[1])
                    })
                    .collect();
                kick.write(1).unwrap();
                r
            };
            // Reads kicked and paused at once: each read the device did is in
            // the used ring when the pause returns, and nothing (not even the
            // kernel's io_uring) writes guest memory while it is paused.
            let paused_reads = reads(&mut bq);
            let worker = dev.worker().expect("active");
            assert!(worker.pause(std::time::Duration::from_secs(5)), "{engine}");
            let used: Vec<u16> = bq.used().iter().map(|u| u.0).collect();
            for (i, (head, data)) in paused_reads.iter().enumerate() {
                if bq.read(*data, BLOCK) == pattern(i) {
                    assert!(used.contains(head), "{engine}: read {i} done, not used");
                }
            }
            still(&bq, "while paused");
            worker.resume();
            wait_used(&bq, BLOCKS / 2 + BLOCKS / 4);

            // Reads kicked and reset at once: some may be in flight.
            reads(&mut bq);
            dev.reset();
            still(&bq, "after reset");
            drop(dev);
            std::fs::remove_file(path).unwrap();
        }
    }

    /// In block/tests/update.rs.
    mod update;
}
