//! Kiln's page-fault handler: serves a restored VM's missing pages from a
//! snapshot memory file through its userfaultfd ([`crate::uffd`]).
//!
//! The memory file is mapped read-only; a page with data is copied into the
//! guest (`UFFDIO_COPY`), a page in a hole of the sparse file gets the zero
//! page (`UFFDIO_ZEROPAGE`, no copy; the guest's first write then takes an
//! ordinary private page), as does a page the VMM discarded (a removal
//! event, e.g. from a balloon).
//!
//! A *working set* is the list of memory-file pages a restored guest
//! faulted on, in first-fault order: [`PageServer`] records it while it
//! serves, and given one, copies those pages in ahead of the faults
//! ([`PageServer::prefetch`]), in sorted runs, serving any fault that
//! arrives meanwhile first. The file is text: a header line, then one page
//! number (file offset / 4096) per line.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::memory_file::PAGE;
use crate::uffd::{Event, Uffd, UffdRegion};

const PAGE_U64: u64 = PAGE as u64;
/// The first line of a working-set file.
pub const WS_HEADER: &str =
    "# kiln working set v1: 4096-byte pages of the memory file, in first-fault order";
/// Longest run copied by one prefetch ioctl (faults are served between runs).
const MAX_RUN_PAGES: usize = 64;
/// A recording is written out once faults pause this long.
const RECORD_FLUSH_MS: i32 = 50;

/// What a handler does besides serving faults.
#[derive(Debug, Clone, Default)]
pub struct HandlerOptions {
    /// Record the working set to this file.
    pub record: Option<PathBuf>,
    /// Prefetch the working set recorded in this file.
    pub prefetch: Option<PathBuf>,
}

/// The page server cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The memory file cannot be used.
    #[error("memory file {path}: {detail}")]
    File {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// A working-set file cannot be read or written.
    #[error("working set {path}: {detail}")]
    WorkingSet {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The VMM described a region this handler cannot serve.
    #[error("memory region at {base:#x}: {detail}")]
    Region {
        /// The region's host address.
        base: u64,
        /// What is wrong.
        detail: String,
    },
    /// A fault outside every region.
    #[error("page fault at {0:#x}, outside the guest memory regions")]
    Foreign(u64),
    /// A userfaultfd operation failed.
    #[error("{what}: {source}")]
    Uffd {
        /// The operation.
        what: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The VMM's address space is gone (it exited).
    #[error("the VMM has exited")]
    VmGone,
}

fn file_err(path: &Path) -> impl Fn(String) -> HandlerError + '_ {
    move |detail| HandlerError::File {
        path: path.display().to_string(),
        detail,
    }
}

fn ws_err(path: &Path) -> impl Fn(String) -> HandlerError + '_ {
    move |detail| HandlerError::WorkingSet {
        path: path.display().to_string(),
        detail,
    }
}

/// A recorded working set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkingSet {
    /// Memory-file page numbers, in first-fault order.
    pub pages: Vec<u64>,
}

impl WorkingSet {
    /// Reads a working-set file.
    pub fn read(path: &Path) -> Result<Self, HandlerError> {
        let text = std::fs::read_to_string(path).map_err(|e| ws_err(path)(e.to_string()))?;
        Self::parse(&text).map_err(ws_err(path))
    }

    /// Parses the text of a working-set file.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines();
        if lines.next() != Some(WS_HEADER) {
            return Err("not a Kiln working-set file (no header line)".into());
        }
        let pages = lines
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|(i, l)| {
                l.trim()
                    .parse()
                    .map_err(|_| format!("line {}: {l:?} is not a page number", i + 2))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { pages })
    }
}

/// The memory file mapped read-only.
struct FileMap {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value alone; reading
// it from another thread is as safe as from this one.
unsafe impl Send for FileMap {}

impl FileMap {
    fn new(file: &File, len: usize) -> io::Result<Self> {
        // SAFETY: a new private read-only mapping of `len` bytes of a file
        // we hold open; no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, used by no one
        // after this.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

/// The extents of `file` that hold data (`SEEK_DATA`/`SEEK_HOLE`); the
/// whole file when the filesystem cannot tell.
fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on a descriptor we hold; no memory involved.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole after `pos`
            }
            return vec![(0, len)];
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return vec![(0, len)];
        }
        out.push((data as u64, hole as u64));
        pos = hole;
    }
    out
}

/// A bitmap over the memory file's pages.
struct PageBits(Vec<u64>);

impl PageBits {
    fn new(pages: u64) -> Self {
        Self(vec![0; pages.div_ceil(64) as usize])
    }
    /// Sets the bit; returns whether it was clear.
    fn set(&mut self, page: u64) -> bool {
        let (w, b) = ((page / 64) as usize, page % 64);
        let Some(word) = self.0.get_mut(w) else {
            return false;
        };
        let was = *word & (1 << b) == 0;
        *word |= 1 << b;
        was
    }
    fn get(&self, page: u64) -> bool {
        self.0
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }
}

struct Recorder {
    path: PathBuf,
    out: BufWriter<File>,
    seen: PageBits,
    pending: bool,
}

impl Recorder {
    fn flush(&mut self) -> Result<(), HandlerError> {
        self.pending = false;
        self.out
            .flush()
            .map_err(|e| ws_err(&self.path)(e.to_string()))
    }
}

/// What a page server did.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServeStats {
    /// Page faults served.
    pub faults: u64,
    /// Pages copied from the file (faults and prefetch).
    pub copied: u64,
    /// Zero pages mapped (holes and removed pages).
    pub zeroed: u64,
    /// Pages prefetched (copied or zeroed) ahead of any fault.
    pub prefetched: u64,
    /// Time the prefetch took.
    pub prefetch_time: Duration,
    /// Pages recorded to the working set.
    pub recorded: u64,
}

impl std::fmt::Display for ServeStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} faults served; {} pages copied, {} zero pages",
            self.faults, self.copied, self.zeroed
        )?;
        if self.prefetched > 0 {
            write!(
                f,
                "; {} pages prefetched in {:.2} ms",
                self.prefetched,
                self.prefetch_time.as_secs_f64() * 1e3
            )?;
        }
        if self.recorded > 0 {
            write!(f, "; {} pages recorded", self.recorded)?;
        }
        Ok(())
    }
}

/// Serves the missing pages of guest memory registered with a userfaultfd
/// from a memory file.
pub struct PageServer {
    uffd: Uffd,
    regions: Vec<UffdRegion>,
    file: FileMap,
    data: Vec<(u64, u64)>,
    removed: PageBits,
    record: Option<Recorder>,
    events: Vec<Event>,
    /// What it did so far.
    pub stats: ServeStats,
}

impl PageServer {
    /// A server for `regions` (as the VMM sent them) from `mem_file`,
    /// recording the working set to `record` if given. Checks that every
    /// region lies in the file and uses 4 KiB pages.
    pub fn new(
        uffd: Uffd,
        regions: &[UffdRegion],
        mem_file: &Path,
        record: Option<&Path>,
    ) -> Result<Self, HandlerError> {
        let bad = file_err(mem_file);
        let file = File::open(mem_file).map_err(|e| bad(e.to_string()))?;
        let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
        for r in regions {
            let region = |detail: String| HandlerError::Region {
                base: r.base_host_virt_addr,
                detail,
            };
            if r.page_bytes() != PAGE_U64 {
                return Err(region(format!(
                    "page size {} bytes: only 4 KiB pages are supported",
                    r.page_bytes()
                )));
            }
            if (r.base_host_virt_addr | r.size | r.offset) % PAGE_U64 != 0 || r.size == 0 {
                return Err(region("not page aligned".into()));
            }
            if r.offset.checked_add(r.size).is_none_or(|end| end > len) {
                return Err(bad(format!(
                    "is {len} bytes; the region at offset {:#x} needs {:#x} more",
                    r.offset, r.size
                )));
            }
        }
        if len == 0 {
            return Err(bad("is empty".into()));
        }
        let map = FileMap::new(&file, len as usize).map_err(|e| bad(e.to_string()))?;
        let pages = len.div_ceil(PAGE_U64);
        let record = match record {
            None => None,
            Some(path) => {
                let f = File::create(path).map_err(|e| ws_err(path)(e.to_string()))?;
                let mut out = BufWriter::new(f);
                writeln!(out, "{WS_HEADER}").map_err(|e| ws_err(path)(e.to_string()))?;
                out.flush().map_err(|e| ws_err(path)(e.to_string()))?;
                Some(Recorder {
                    path: path.to_path_buf(),
                    out,
                    seen: PageBits::new(pages),
                    pending: false,
                })
            }
        };
        Ok(Self {
            uffd,
            regions: regions.to_vec(),
            data: data_extents(&file, len),
            file: map,
            removed: PageBits::new(pages),
            record,
            events: Vec::new(),
            stats: ServeStats::default(),
        })
    }

    /// The page holding host address `addr`: its address and file offset.
    fn locate(&self, addr: u64) -> Option<(u64, u64)> {
        let page = addr & !(PAGE_U64 - 1);
        self.regions
            .iter()
            .find(|r| page >= r.base_host_virt_addr && page - r.base_host_virt_addr < r.size)
            .map(|r| (page, r.offset + page - r.base_host_virt_addr))
    }

    /// The host address of file offset `off`.
    fn host_of(&self, off: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| off >= r.offset && off - r.offset < r.size)
            .map(|r| r.base_host_virt_addr + off - r.offset)
    }

    /// Whether the file page at `off` is served as a zero page.
    fn is_zero(&self, off: u64) -> bool {
        if self.removed.get(off / PAGE_U64) {
            return true;
        }
        let i = self.data.partition_point(|&(start, _)| start <= off);
        i == 0 || off >= self.data[i - 1].1
    }

    /// Fills `[dst, dst + len)` with the file's pages from `off` (copies,
    /// zero pages for holes). Pages already present are skipped.
    fn fill(&mut self, dst: u64, off: u64, len: u64) -> Result<(), HandlerError> {
        let mut at = 0;
        while at < len {
            let zero = self.is_zero(off + at);
            let mut end = at + PAGE_U64;
            while end < len && self.is_zero(off + end) == zero {
                end += PAGE_U64;
            }
            self.fill_run(dst + at, off + at, end - at, zero)?;
            at = end;
        }
        Ok(())
    }

    fn fill_run(&mut self, dst: u64, off: u64, len: u64, zero: bool) -> Result<(), HandlerError> {
        let mut done = 0;
        while done < len {
            let rest = (len - done) as usize;
            let r = if zero {
                self.uffd.zeropage(dst + done, rest)
            } else {
                // SAFETY: `off + len` lies in the file (regions were checked
                // against its length in `new`), all of which is mapped.
                unsafe {
                    let src = self.file.ptr.add((off + done) as usize);
                    self.uffd.copy(dst + done, src, rest)
                }
            };
            match r {
                Ok(n) if n > 0 => {
                    let pages = n as u64 / PAGE_U64;
                    if zero {
                        self.stats.zeroed += pages;
                    } else {
                        self.stats.copied += pages;
                    }
                    done += n as u64;
                }
                Ok(_) => return self.retry_later(dst + done, rest),
                Err(e) => match e.raw_os_error() {
                    // Already there (served before, or a racing fault and
                    // prefetch): make sure no one still waits, go on.
                    Some(libc::EEXIST) => {
                        self.uffd
                            .wake(dst + done, PAGE)
                            .map_err(uffd_err("UFFDIO_WAKE"))?;
                        done += PAGE_U64;
                    }
                    Some(libc::EAGAIN) => return self.retry_later(dst + done, rest),
                    Some(libc::ESRCH) => return Err(HandlerError::VmGone),
                    _ => {
                        return Err(uffd_err(if zero {
                            "UFFDIO_ZEROPAGE"
                        } else {
                            "UFFDIO_COPY"
                        })(e))
                    }
                },
            }
        }
        Ok(())
    }

    /// The VMM's memory map is changing: the waiting threads retry their
    /// access, which reports the fault again if the page is still missing.
    fn retry_later(&self, dst: u64, len: usize) -> Result<(), HandlerError> {
        match self.uffd.wake(dst, len) {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Err(HandlerError::VmGone),
            r => r.map_err(uffd_err("UFFDIO_WAKE")),
        }
    }

    /// Serves one fault at host address `addr`. A write to a zero page
    /// gets a copied page of zeros at once (the zero page would take a
    /// second, copy-on-write fault).
    fn serve_fault(&mut self, addr: u64, write: bool) -> Result<(), HandlerError> {
        self.stats.faults += 1;
        let (dst, off) = self.locate(addr).ok_or(HandlerError::Foreign(addr))?;
        if let Some(r) = &mut self.record {
            if r.seen.set(off / PAGE_U64) {
                writeln!(r.out, "{}", off / PAGE_U64)
                    .map_err(|e| ws_err(&r.path)(e.to_string()))?;
                r.pending = true;
                self.stats.recorded += 1;
            }
        }
        if write && self.is_zero(off) {
            return self.copy_zeros(dst);
        }
        self.fill(dst, off, PAGE_U64)
    }

    fn copy_zeros(&mut self, dst: u64) -> Result<(), HandlerError> {
        static ZEROS: [u8; PAGE] = [0; PAGE];
        // SAFETY: ZEROS is readable for PAGE bytes.
        match unsafe { self.uffd.copy(dst, ZEROS.as_ptr(), PAGE) } {
            Ok(PAGE) => {
                self.stats.zeroed += 1;
                Ok(())
            }
            Ok(_) => self.retry_later(dst, PAGE),
            Err(e) => match e.raw_os_error() {
                Some(libc::EEXIST) => self.uffd.wake(dst, PAGE).map_err(uffd_err("UFFDIO_WAKE")),
                Some(libc::EAGAIN) => self.retry_later(dst, PAGE),
                Some(libc::ESRCH) => Err(HandlerError::VmGone),
                _ => Err(uffd_err("UFFDIO_COPY")(e)),
            },
        }
    }

    /// Serves every pending event without waiting; returns how many.
    pub fn drain(&mut self) -> Result<usize, HandlerError> {
        let mut total = 0;
        loop {
            let mut events = std::mem::take(&mut self.events);
            events.clear();
            let n = self
                .uffd
                .read_events(&mut events)
                .map_err(uffd_err("reading userfaultfd events"))?;
            let r = events.iter().try_for_each(|e| match *e {
                Event::PageFault(addr, write) => self.serve_fault(addr, write),
                Event::Remove(start, end) => {
                    // Discarded pages read as zeros from now on.
                    let mut a = start & !(PAGE_U64 - 1);
                    while a < end {
                        if let Some((_, off)) = self.locate(a) {
                            self.removed.set(off / PAGE_U64);
                        }
                        a += PAGE_U64;
                    }
                    Ok(())
                }
                Event::Other(code) => {
                    log::debug!("userfaultfd event {code:#x} ignored");
                    Ok(())
                }
            });
            self.events = events;
            r?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }

    /// Copies the pages of `ws` in ahead of their faults (sorted, in runs;
    /// faults arriving meanwhile are served first). Returns the pages done.
    pub fn prefetch(&mut self, ws: &WorkingSet) -> Result<u64, HandlerError> {
        let t0 = Instant::now();
        let file_pages = (self.file.len as u64).div_ceil(PAGE_U64);
        let mut pages: Vec<u64> = ws
            .pages
            .iter()
            .copied()
            .filter(|&p| p < file_pages)
            .collect();
        pages.sort_unstable();
        pages.dedup();
        let mut done = 0;
        let mut i = 0;
        while i < pages.len() {
            let off = pages[i] * PAGE_U64;
            let Some(dst) = self.host_of(off) else {
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < pages.len()
                && j - i < MAX_RUN_PAGES
                && pages[j] == pages[j - 1] + 1
                && self.host_of(pages[j] * PAGE_U64) == Some(dst + (j - i) as u64 * PAGE_U64)
            {
                j += 1;
            }
            self.drain()?;
            self.fill(dst, off, (j - i) as u64 * PAGE_U64)?;
            done += (j - i) as u64;
            i = j;
        }
        self.stats.prefetched += done;
        self.stats.prefetch_time += t0.elapsed();
        Ok(done)
    }

    /// Serves faults until `peer` (the VMM's connection) closes or the VMM
    /// exits; without a peer, for as long as the process lives. A recorded
    /// working set is written out whenever faults pause.
    pub fn serve(&mut self, peer: Option<&UnixStream>) -> Result<(), HandlerError> {
        let r = self.serve_loop(peer);
        let flushed = match &mut self.record {
            Some(rec) => rec.flush(),
            None => Ok(()),
        };
        match r {
            Err(HandlerError::VmGone) | Ok(()) => flushed,
            Err(e) => Err(e),
        }
    }

    fn serve_loop(&mut self, peer: Option<&UnixStream>) -> Result<(), HandlerError> {
        let peer_fd = peer.map_or(-1, |p| p.as_raw_fd());
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: peer_fd,
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            let pending = self.record.as_ref().is_some_and(|r| r.pending);
            let timeout = if pending { RECORD_FLUSH_MS } else { -1 };
            // SAFETY: `fds` is a valid array of two pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(uffd_err("poll")(e));
            }
            if n == 0 {
                if let Some(r) = &mut self.record {
                    r.flush()?;
                }
                continue;
            }
            if fds[0].revents != 0 {
                self.drain()?;
            }
            if fds[1].revents != 0 {
                let mut buf = [0u8; 256];
                // SAFETY: reads at most 256 bytes into `buf`.
                let got = unsafe {
                    libc::recv(
                        peer_fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if got == 0
                    || (got < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN))
                {
                    // The VMM is gone: serve what it left queued, then end.
                    let _ = self.drain();
                    return Ok(());
                }
            }
        }
    }
}

fn uffd_err(what: &'static str) -> impl FnOnce(io::Error) -> HandlerError {
    move |source| HandlerError::Uffd { what, source }
}
