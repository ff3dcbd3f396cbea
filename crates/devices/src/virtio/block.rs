//! virtio-blk backed by a raw file: read, write, flush (fdatasync), get-id,
//! read-only disks. Requests run on the device's worker thread.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::worker::{Next, Worker};
use super::{
    read_config_bytes, ActivateContext, ActivateError, DeviceMetrics, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::rate_limiter::{self, RateLimiter, RateLimiterConfig};

/// Sector size the protocol counts in.
pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const CHUNK: usize = 1 << 20;

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
}

/// The virtio-blk device.
pub struct Block {
    config: BlockConfig,
    file: Arc<File>,
    capacity: u64,
    acked: u64,
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
}

impl Block {
    /// Opens the backing file.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(!config.read_only)
                .open(p)
        };
        let file = open(&config.path).map_err(|source| BlockError::Open {
            path: config.path.clone(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| BlockError::Open {
                path: config.path.clone(),
                source,
            })?
            .len();
        if size == 0 || size % SECTOR_SIZE != 0 {
            return Err(BlockError::Size {
                path: config.path.clone(),
                size,
            });
        }
        Ok(Self {
            config,
            file: Arc::new(file),
            capacity: size / SECTOR_SIZE,
            acked: 0,
            worker: None,
            metrics: Arc::default(),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
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
    pub fn process(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
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
        mut reader: Reader<'_>,
        writer: &mut Writer<'_>,
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
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.read_only {
                    // SAFETY: fdatasync on a file descriptor we own.
                    if unsafe { libc::fdatasync(self.file.as_raw_fd()) } != 0 {
                        return Err(Failure::Status(VIRTIO_BLK_S_IOERR as u8));
                    }
                }
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
pub fn drain_queue(backend: &mut BlockBackend, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    drain_queue_limited(backend, queue, mem, None)
}

/// Data bytes of a request for the bandwidth limit: its buffers minus the
/// 16-byte header and the status byte (0 for flush).
fn request_bytes(chain: &DescriptorChain<&GuestMemoryMmap>) -> u64 {
    let total: u64 = chain.clone().map(|d| u64::from(d.len())).sum();
    total.saturating_sub(std::mem::size_of::<RequestHeader>() as u64 + 1)
}

/// [`drain_queue`] under `limiter`: stops at the first request the limiter
/// refuses, leaving it (and those after it) available for when the
/// limiter's timer fires.
pub fn drain_queue_limited(
    backend: &mut BlockBackend,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
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
        cfg.extend_from_slice(&self.capacity.to_le_bytes());
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
        let mut id = self.config.id.as_bytes().to_vec();
        id.truncate(VIRTIO_BLK_ID_BYTES as usize);
        let mut backend = BlockBackend {
            file: self.file.clone(),
            capacity: self.capacity,
            read_only: self.config.read_only,
            id,
            metrics: self.metrics.clone(),
        };
        let io_err = |source| ActivateError::Io {
            device: self.name(),
            source,
        };
        let mut limiter = rate_limiter::build(self.config.rate_limiter.as_ref()).map_err(io_err)?;
        let mut fds = vec![(evt.as_raw_fd(), 0, EventSet::IN)];
        fds.extend(limiter.as_ref().map(|l| (l.as_raw_fd(), 1, EventSet::IN)));
        let worker = Worker::spawn(
            format!("kiln_blk_{}", self.config.id),
            fds,
            move |token, _| {
                match (token, limiter.as_mut()) {
                    (1, Some(l)) => l.event_handler(),
                    _ => {
                        let _ = evt.read();
                    }
                }
                if drain_queue_limited(&mut backend, &mut queue, &mem, limiter.as_mut()) {
                    signal(&interrupt);
                }
                Next::Continue
            },
        )
        .map_err(|source| ActivateError::Io {
            device: self.name(),
            source,
        })?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }
}

fn signal(interrupt: &Interrupt) {
    interrupt.signal_used();
}

// ---- Public constructor for the fuzz harness (crate::fuzz_harness) ----

impl Block {
    /// The backend [`VirtioDevice::activate`] would run on the worker: for
    /// driving [`drain_queue`] without a worker thread (fuzzing).
    #[doc(hidden)]
    pub fn backend(&self) -> BlockBackend {
        let mut id = self.config.id.as_bytes().to_vec();
        id.truncate(VIRTIO_BLK_ID_BYTES as usize);
        BlockBackend {
            file: self.file.clone(),
            capacity: self.capacity,
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

    fn backend(data: &[u8], read_only: bool) -> (BlockBackend, PathBuf) {
        let p = std::env::temp_dir().join(format!(
            "kiln-blk-{}-{}",
            std::process::id(),
            data.len() + read_only as usize
        ));
        std::fs::write(&p, data).unwrap();
        let b = Block::new(BlockConfig {
            path: p.clone(),
            read_only,
            id: "disk0".into(),
            rate_limiter: None,
        })
        .unwrap();
        let be = BlockBackend {
            file: b.file.clone(),
            capacity: b.capacity,
            read_only,
            id: b"disk0".to_vec(),
            metrics: b.metrics.clone(),
        };
        (be, p)
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

    #[test]
    fn read_write_flush_and_id() {
        let mut disk = vec![0u8; 4096];
        disk[512..516].copy_from_slice(b"kiln");
        let (mut be, path) = backend(&disk, false);
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
        let used = q.run(|mem, queue| drain_queue(&mut be, queue, mem));
        assert_eq!(used.len(), 5);
        assert_eq!(used[0].1, 513);
        assert_eq!(&q.written(0, 1)[..4], b"kiln");
        assert_eq!(q.written(0, 2), vec![VIRTIO_BLK_S_OK as u8]);
        assert_eq!(q.written(1, 2), vec![VIRTIO_BLK_S_OK as u8]);
        assert_eq!(q.written(2, 1), vec![VIRTIO_BLK_S_OK as u8]);
        assert_eq!(&q.written(3, 1)[..5], b"disk0");
        assert_eq!(used[3].1, 6);
        assert_eq!(q.written(4, 1), vec![VIRTIO_BLK_S_UNSUPP as u8]);
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[1024..1536], &[7u8; 512][..]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn rate_limited_requests_wait_for_the_refill_in_order() {
        use crate::rate_limiter::tests::wait_for_timer;
        use std::sync::atomic::Ordering::Relaxed;
        let (mut be, path) = backend(&[5u8; 8192], false);
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
        let used = q.run(|mem, queue| {
            let r = drain_queue_limited(&mut be, queue, mem, Some(&mut rl));
            state = Some(queue.state());
            r
        });
        assert_eq!(used.len(), 2, "served partially");
        assert!(rl.is_blocked());
        assert_eq!(be.metrics.throttled.load(Relaxed), 1);
        // A kick while throttled serves nothing and counts nothing more.
        let used = q.run(|mem, queue| {
            *queue = Queue::try_from(state.unwrap()).unwrap();
            let r = drain_queue_limited(&mut be, queue, mem, Some(&mut rl));
            state = Some(queue.state());
            r
        });
        assert_eq!(used.len(), 2);
        assert_eq!(be.metrics.throttled.load(Relaxed), 1);
        let mut used = used;
        while used.len() < 4 {
            wait_for_timer(&mut rl);
            used = q.run(|mem, queue| {
                *queue = Queue::try_from(state.unwrap()).unwrap();
                let r = drain_queue_limited(&mut be, queue, mem, Some(&mut rl));
                state = Some(queue.state());
                r
            });
        }
        let waited = start.elapsed();
        assert!(waited >= std::time::Duration::from_millis(95), "{waited:?}");
        let heads: Vec<u16> = used.iter().map(|u| u.0).collect();
        assert_eq!(heads, vec![0, 3, 6, 9], "in order, none lost");
        for i in 0..4 {
            assert_eq!(q.written(i, 2), vec![VIRTIO_BLK_S_OK as u8]);
        }
        assert_eq!(be.metrics.requests.load(Relaxed), 4);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_refuses_writes_and_leaves_file_alone() {
        let (mut be, path) = backend(&[1u8; 1024], true);
        let mut q = ChainBuilder::new();
        q.push(&[
            Desc::r(&header(VIRTIO_BLK_T_OUT, 0)),
            Desc::r(&[9u8; 512]),
            Desc::w(1),
        ]);
        q.run(|mem, queue| drain_queue(&mut be, queue, mem));
        assert_eq!(q.written(0, 2), vec![VIRTIO_BLK_S_IOERR as u8]);
        assert_eq!(std::fs::read(&path).unwrap(), vec![1u8; 1024]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn malformed_chains_fail_without_touching_outside_memory() {
        let (mut be, path) = backend(&[0u8; 1024], false);
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
        let used = q.run(|mem, queue| drain_queue(&mut be, queue, mem));
        assert_eq!(q.written(0, 2), vec![VIRTIO_BLK_S_IOERR as u8]);
        assert_eq!(q.written(1, 2), vec![VIRTIO_BLK_S_IOERR as u8]);
        assert_eq!(q.written(2, 1), vec![VIRTIO_BLK_S_IOERR as u8]);
        assert_eq!(q.written(3, 1), vec![VIRTIO_BLK_S_IOERR as u8]);
        assert_eq!(used[4].1, 0);
        assert_eq!(used[5].1, 0);
        assert!(used.len() >= 6);
        let m = be
            .metrics
            .invalid_requests
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(m >= 6, "invalid requests counted: {m}");
        std::fs::remove_file(path).unwrap();
    }
}
