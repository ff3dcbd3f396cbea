//! userfaultfd: guest memory whose pages a page-fault handler provides.
//!
//! With the `Uffd` memory backend of `PUT /snapshot/load` (Firecracker's),
//! a restored VM's memory is anonymous and registered with a userfaultfd in
//! "missing" mode: the first touch of each page — by a vCPU, by KVM or by a
//! device thread — blocks until a handler fills the page (`UFFDIO_COPY` or
//! `UFFDIO_ZEROPAGE`). The handler is another process listening on a Unix
//! socket: the VMM connects and sends, in one message, the userfaultfd (as
//! `SCM_RIGHTS`) and a JSON array describing the regions, each
//! `{"base_host_virt_addr", "size", "offset", "page_size", "page_size_kib"}`
//! (host address of the region, its length, its offset in the memory file,
//! its page size in bytes and in KiB, as Firecracker's versions send them).
//! Kiln's own handler (`kiln uffd-handler`) is [`crate::uffd_handler`]; it
//! also runs as a thread of the VMM ([`MemBackend::UffdThread`]).
//!
//! A handler that dies leaves the guest's next missing page unserved: its
//! vCPU would wait forever. The VMM keeps its own copy of the userfaultfd
//! (closing it would let the kernel fill the missing pages with zeros, a
//! silently corrupted guest) and watches the handler process (a pidfd from
//! the socket's peer credentials; the socket itself when the pid is not
//! visible): when it exits, the VMM stops with a one-line error.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kiln_devices::GuestMem;
use kiln_snapshot::state::MemoryLayout;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::memory_file::PAGE;
use crate::uffd_handler::{HandlerOptions, PageServer, WorkingSet};

// The userfaultfd ABI (linux/userfaultfd.h), x86_64.

const UFFD_API: u64 = 0xAA;
const UFFDIO_TYPE: u32 = 0xAA;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, nr: u32, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u32) << 16) | (UFFDIO_TYPE << 8) | nr) as libc::c_ulong
}

const UFFDIO_API: libc::c_ulong = ioc(IOC_READ | IOC_WRITE, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: libc::c_ulong = ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<UffdioRegister>());
const UFFDIO_WAKE: libc::c_ulong = ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
const UFFDIO_COPY: libc::c_ulong = ioc(IOC_READ | IOC_WRITE, 0x03, size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: libc::c_ulong = ioc(IOC_READ | IOC_WRITE, 0x04, size_of::<UffdioZeropage>());
/// `/dev/userfaultfd`'s ioctl making a new userfaultfd (Linux 6.1+).
const USERFAULTFD_IOC_NEW: libc::c_ulong = ioc(0, 0x00, 0);

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// Bits of `UffdioRegister::ioctls`: the range supports these.
const HAS_COPY: u64 = 1 << 3;
const HAS_ZEROPAGE: u64 = 1 << 4;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_WRITE: u64 = 1;
const UFFD_EVENT_REMOVE: u8 = 0x15;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: an event code and three words of arguments (for a
/// page fault: flags, address; for a removal: start, end).
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

/// Something the userfaultfd reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread touched a missing page at this address (`true`: to write).
    PageFault(u64, bool),
    /// The range `[start, end)` was discarded (`MADV_DONTNEED`, e.g. by a
    /// balloon); its pages read as zeros from now on.
    Remove(u64, u64),
    /// Another event (not asked for by Kiln).
    Other(u8),
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Uffd {
    /// A new userfaultfd (non-blocking, close-on-exec) that handles the
    /// kernel's faults too (KVM's), after the API handshake. Uses the
    /// syscall, or `/dev/userfaultfd` where the syscall is refused.
    pub fn create() -> io::Result<Self> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: the syscall takes only flags and returns a new descriptor
        // or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        let fd = if fd >= 0 {
            fd as RawFd
        } else {
            let err = io::Error::last_os_error();
            let dev = File::options()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
                .map_err(|_| err)?;
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and
            // returns a new descriptor or -1; no memory is passed.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            fd
        };
        let uffd = Self {
            // SAFETY: `fd` is a new descriptor nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
        // `UffdioApi` lays out.
        unsafe { uffd.ioctl(UFFDIO_API, &mut api) }?;
        Ok(uffd)
    }

    /// Takes a userfaultfd received from elsewhere (its handshake done
    /// there), making it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory passed.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self { fd })
    }

    /// A second descriptor of the same userfaultfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
        })
    }

    /// # Safety
    /// `req` must be a userfaultfd ioctl whose argument is a `T`.
    unsafe fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        // SAFETY: the caller guarantees `arg` is what `req` reads and
        // writes; it is a valid, exclusive reference for the call.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), req, arg as *mut T) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Registers `[addr, addr + len)` (page aligned, mapped anonymous
    /// memory) for missing-page faults.
    pub fn register_missing(&self, addr: u64, len: u64) -> io::Result<()> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`. The
        // range only changes how faults on it are handled.
        unsafe { self.ioctl(UFFDIO_REGISTER, &mut reg) }?;
        if reg.ioctls & (HAS_COPY | HAS_ZEROPAGE) != HAS_COPY | HAS_ZEROPAGE {
            return Err(io::Error::other(
                "the registered memory does not support UFFDIO_COPY and UFFDIO_ZEROPAGE",
            ));
        }
        Ok(())
    }

    /// Copies `len` bytes from `src` into the registered range at `dst`
    /// (both page aligned) and wakes the threads waiting there. Returns
    /// the bytes copied, which may be fewer than `len` (the page after them
    /// failed: call again); an error when not even the first page could be.
    ///
    /// # Safety
    /// `src` must be readable for `len` bytes.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: usize) -> io::Result<usize> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len: len as u64,
            ..Default::default()
        };
        // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`; the kernel reads
        // `len` bytes at `src`, readable by the caller's guarantee, and
        // writes only pages of the registered range.
        let r = unsafe { self.ioctl(UFFDIO_COPY, &mut c) };
        filled(r, c.copy)
    }

    /// Maps the zero page at `[dst, dst + len)` (page aligned) in the
    /// registered range and wakes the threads waiting there. Returns the
    /// bytes done, as [`Uffd::copy`].
    pub fn zeropage(&self, dst: u64, len: usize) -> io::Result<usize> {
        let mut z = UffdioZeropage {
            range: UffdioRange {
                start: dst,
                len: len as u64,
            },
            ..Default::default()
        };
        // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage` and
        // touches only missing pages of the registered range.
        let r = unsafe { self.ioctl(UFFDIO_ZEROPAGE, &mut z) };
        filled(r, z.zeropage)
    }

    /// Wakes the threads waiting on `[addr, addr + len)` (they retry their
    /// access).
    pub fn wake(&self, addr: u64, len: usize) -> io::Result<()> {
        let mut r = UffdioRange {
            start: addr,
            len: len as u64,
        };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        unsafe { self.ioctl(UFFDIO_WAKE, &mut r) }
    }

    /// Appends the pending events to `out` without blocking; returns how
    /// many were read (0: none pending).
    pub fn read_events(&self, out: &mut Vec<Event>) -> io::Result<usize> {
        let mut msgs = [UffdMsg::default(); 32];
        // SAFETY: reads at most size_of_val(&msgs) bytes into `msgs`, plain
        // data with the kernel's `struct uffd_msg` layout.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr().cast(),
                size_of_val(&msgs),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(e),
            };
        }
        let count = n as usize / size_of::<UffdMsg>();
        out.extend(msgs[..count].iter().map(|m| match m.event {
            UFFD_EVENT_PAGEFAULT => {
                Event::PageFault(m.arg[1], m.arg[0] & PAGEFAULT_FLAG_WRITE != 0)
            }
            UFFD_EVENT_REMOVE => Event::Remove(m.arg[0], m.arg[1]),
            other => Event::Other(other),
        }));
        Ok(count)
    }
}

/// The result of a fill ioctl: the count it reports, else its error.
fn filled(r: io::Result<()>, done: i64) -> io::Result<usize> {
    match r {
        Ok(()) => Ok(done.max(0) as usize),
        Err(_) if done > 0 => Ok(done as usize),
        Err(_) if done < 0 => Err(io::Error::from_raw_os_error(-done as i32)),
        Err(e) => Err(e),
    }
}

/// One guest memory region as the handler sees it (Firecracker's message
/// shape; `page_size_kib` is what older Firecracker versions send).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UffdRegion {
    /// Where the region starts in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where its contents start in the memory file.
    pub offset: u64,
    /// Its page size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Its page size in KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

impl UffdRegion {
    /// The page size in bytes (4 KiB when the message does not say).
    pub fn page_bytes(&self) -> u64 {
        self.page_size
            .or(self.page_size_kib.map(|k| k << 10))
            .unwrap_or(PAGE as u64)
    }
}

/// The userfaultfd backend failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The handover message is not what the protocol says.
    #[error("page-fault handler handover: {0}")]
    Protocol(String),
    /// The page server cannot serve (see [`crate::uffd_handler`]).
    #[error(transparent)]
    Handler(#[from] crate::uffd_handler::HandlerError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> UffdError {
    let what = what.into();
    move |source| UffdError::Io { what, source }
}

/// How a restored VM gets its memory.
#[derive(Debug, Clone)]
pub enum MemBackend {
    /// Map the memory file privately (copy-on-write, lazily).
    File(PathBuf),
    /// Firecracker's `Uffd` backend: a page-fault handler process listens
    /// on this Unix socket.
    Uffd(PathBuf),
    /// A page-fault handler thread in this process serves the memory file.
    UffdThread {
        /// The memory file.
        mem_file: PathBuf,
        /// Working-set recording and prefetch.
        options: HandlerOptions,
    },
}

impl std::fmt::Display for MemBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "{} (mapped)", p.display()),
            Self::Uffd(s) => write!(f, "the page-fault handler at {}", s.display()),
            Self::UffdThread { mem_file, .. } => {
                write!(
                    f,
                    "{} (userfaultfd, in-process handler)",
                    mem_file.display()
                )
            }
        }
    }
}

/// Fresh anonymous guest memory laid out as `layout`, registered with a new
/// userfaultfd; returns both and the regions as a handler sees them.
fn registered_memory(
    layout: &MemoryLayout,
) -> Result<(GuestMem, Uffd, Vec<UffdRegion>), UffdError> {
    let ranges: Vec<(vm_memory::GuestAddress, usize)> = layout
        .regions
        .iter()
        .map(|r| (vm_memory::GuestAddress(r.guest_addr), r.size as usize))
        .collect();
    let mem = GuestMem::from_ranges(&ranges)
        .map_err(|e| io_err("allocating guest memory")(io::Error::other(e.to_string())))?;
    let uffd = Uffd::create().map_err(io_err(
        "userfaultfd (needs CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1 or access to /dev/userfaultfd)",
    ))?;
    let mut regions = Vec::with_capacity(layout.regions.len());
    for (r, l) in mem.iter().zip(&layout.regions) {
        let base = r.as_ptr() as u64;
        uffd.register_missing(base, r.len())
            .map_err(io_err("registering guest memory with userfaultfd"))?;
        regions.push(UffdRegion {
            base_host_virt_addr: base,
            size: r.len(),
            offset: l.file_offset,
            page_size: Some(PAGE as u64),
            page_size_kib: Some(PAGE as u64 >> 10),
        });
    }
    Ok((mem, uffd, regions))
}

/// The VMM's side of an external page-fault handler: kept for as long as
/// the VM may fault (see [`HandlerLink::watch`]).
#[derive(Debug)]
pub struct HandlerLink {
    sock: PathBuf,
    /// The VMM's own reference, so faults keep waiting for the handler.
    _uffd: Uffd,
    stream: UnixStream,
    pid: Option<i32>,
    pidfd: Option<OwnedFd>,
}

/// Connects to the page-fault handler listening at `sock`.
pub fn connect(sock: &Path) -> Result<UnixStream, UffdError> {
    UnixStream::connect(sock).map_err(io_err(format!(
        "page-fault handler socket {}",
        sock.display()
    )))
}

/// Sends `uffd` and `regions` to the handler connected on `stream` (from
/// [`connect`] to `sock`).
pub fn hand_over(
    stream: UnixStream,
    sock: &Path,
    uffd: Uffd,
    regions: &[UffdRegion],
) -> Result<HandlerLink, UffdError> {
    let what = || format!("page-fault handler socket {}", sock.display());
    let body = serde_json::to_vec(regions).map_err(|e| UffdError::Protocol(e.to_string()))?;
    let sent = stream
        .send_with_fd(&body[..], uffd.as_raw_fd())
        .map_err(|e| io_err(what())(io::Error::from_raw_os_error(e.errno())))?;
    if sent != body.len() {
        return Err(UffdError::Protocol(format!(
            "sent {sent} of {} bytes",
            body.len()
        )));
    }
    let pid = peer_pid(&stream);
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; no memory is passed.
    let pidfd = pid.and_then(
        |pid| match unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } {
            fd if fd >= 0 => {
                // SAFETY: a new descriptor nothing else owns.
                Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
            }
            _ => None,
        },
    );
    log::info!(
        "guest memory handed to the page-fault handler at {} (pid {})",
        sock.display(),
        pid.map_or("unknown".into(), |p| p.to_string())
    );
    Ok(HandlerLink {
        sock: sock.to_path_buf(),
        _uffd: uffd,
        stream,
        pid,
        pidfd,
    })
}

/// The pid of the process at the other end of `s`, if visible here.
fn peer_pid(s: &UnixStream) -> Option<i32> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

/// Called before the VMM stops because its page-fault handler is lost
/// (Kiln's CLI restores the terminal there).
pub static ON_HANDLER_LOST: OnceLock<fn()> = OnceLock::new();

fn handler_lost(msg: &str) -> ! {
    log::error!("{msg}");
    if let Some(f) = ON_HANDLER_LOST.get() {
        f();
    }
    eprintln!("kiln: {msg}");
    // SAFETY: ends the process at once: vCPU threads blocked on missing
    // pages can never finish, so nothing is waited for.
    unsafe { libc::_exit(1) }
}

impl HandlerLink {
    /// Watches the handler for the rest of the process: when it exits (or,
    /// when its pid is not visible here, closes the socket), the VMM stops
    /// with an error instead of leaving the guest hung on a missing page.
    pub fn watch(self) {
        // Under the userfaultfd threads' filter, like the handler thread.
        let spawned = kiln_seccomp::spawn(
            kiln_seccomp::ThreadKind::Uffd,
            "uffd-watch".into(),
            move || self.watch_loop(),
        );
        if let Err(e) = spawned {
            log::warn!("cannot watch the page-fault handler: {e}");
        }
    }

    fn watch_loop(self) {
        let who = format!(
            "the page-fault handler at {} (pid {})",
            self.sock.display(),
            self.pid.map_or("unknown".into(), |p| p.to_string())
        );
        let mut stream_fd = self.stream.as_raw_fd();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.pidfd.as_ref().map_or(-1, |f| f.as_raw_fd()),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stream_fd,
                    events: libc::POLLIN | libc::POLLRDHUP,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfds.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                log::warn!("watching {who}: {}", io::Error::last_os_error());
                return;
            }
            if fds[0].revents != 0 {
                handler_lost(&format!(
                    "{who} exited: the guest's memory can no longer be served; stopping the microVM"
                ));
            }
            if fds[1].revents != 0 {
                let mut buf = [0u8; 256];
                // SAFETY: reads at most 256 bytes into `buf`.
                let got = unsafe {
                    libc::recv(
                        stream_fd,
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                let closed = got == 0
                    || (got < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN));
                if closed {
                    if self.pidfd.is_none() {
                        handler_lost(&format!(
                            "{who} closed its socket: the guest's memory can no longer be served; stopping the microVM"
                        ));
                    }
                    // Firecracker's protocol lets a handler close the
                    // socket once it has the userfaultfd: watch the process.
                    log::debug!("{who} closed its socket");
                    stream_fd = -1;
                }
            }
        }
    }
}

/// Receives a handover on `stream` (the handler's side of [`hand_over`]):
/// the userfaultfd and the regions.
pub fn receive(stream: &UnixStream) -> Result<(Uffd, Vec<UffdRegion>), UffdError> {
    let mut buf = vec![0u8; 64 << 10];
    let (mut n, file) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| io_err("receiving the handover")(io::Error::from_raw_os_error(e.errno())))?;
    let file = file.ok_or_else(|| {
        UffdError::Protocol(if n == 0 {
            "the VMM closed the connection without sending anything".into()
        } else {
            "the message carried no userfaultfd".into()
        })
    })?;
    // The JSON normally comes whole with the descriptor; read on if not.
    let regions: Vec<UffdRegion> = loop {
        match serde_json::from_slice(&buf[..n]) {
            Ok(r) => break r,
            Err(e) if e.is_eof() && n < buf.len() => {
                let more = io::Read::read(&mut &*stream, &mut buf[n..])
                    .map_err(io_err("receiving the handover"))?;
                if more == 0 {
                    return Err(UffdError::Protocol(format!("truncated region list: {e}")));
                }
                n += more;
            }
            Err(e) => return Err(UffdError::Protocol(format!("bad region list: {e}"))),
        }
    };
    if regions.is_empty() {
        return Err(UffdError::Protocol("no memory regions".into()));
    }
    let uffd = Uffd::from_fd(OwnedFd::from(file)).map_err(io_err("the received userfaultfd"))?;
    Ok((uffd, regions))
}

/// Guest memory for a restore through a userfaultfd `backend` (not
/// [`MemBackend::File`]): registered, handed to its handler (or handler
/// thread) before anything touches it. An external handler's link is
/// returned, to be watched once the VM is built ([`HandlerLink::watch`]);
/// dropping it instead closes the connection (the handler then ends).
pub fn guest_memory(
    backend: &MemBackend,
    layout: &MemoryLayout,
) -> Result<(GuestMem, Option<HandlerLink>), UffdError> {
    match backend {
        MemBackend::File(_) => Err(UffdError::Protocol("not a userfaultfd backend".into())),
        MemBackend::Uffd(sock) => {
            // A missing handler fails before any memory is set up.
            let stream = connect(sock)?;
            let (mem, uffd, regions) = registered_memory(layout)?;
            let link = hand_over(stream, sock, uffd, &regions)?;
            Ok((mem, Some(link)))
        }
        MemBackend::UffdThread { mem_file, options } => {
            let prefetch = options
                .prefetch
                .as_deref()
                .map(WorkingSet::read)
                .transpose()?;
            let (mem, uffd, regions) = registered_memory(layout)?;
            let mut server = PageServer::new(uffd, &regions, mem_file, options.record.as_deref())?;
            // Its filter is on before it touches the guest's memory.
            kiln_seccomp::spawn(
                kiln_seccomp::ThreadKind::Uffd,
                "uffd-handler".into(),
                move || {
                    let r = match &prefetch {
                        Some(ws) => server.prefetch(ws).map(|_| ()),
                        None => Ok(()),
                    };
                    if let Err(e) = r.and_then(|_| server.serve(None)) {
                        handler_lost(&format!("the page-fault handler thread failed: {e}"));
                    }
                },
            )
            .map_err(io_err("starting the page-fault handler thread"))?;
            Ok((mem, None))
        }
    }
}

impl crate::Vmm {
    /// Rebuilds a VM from `state` (taken from a VM built from `config`) with
    /// its memory from `backend`: [`crate::Vmm::restore`] for a memory
    /// file; else fresh memory registered with a userfaultfd and handed to
    /// its handler before anything touches it. A lost handler stops the VMM
    /// from then on (see [`HandlerLink::watch`]).
    pub fn restore_from(
        config: crate::VmConfig,
        state: &kiln_snapshot::state::MicrovmState,
        backend: &MemBackend,
        console: Box<dyn std::io::Write + Send>,
        start: std::time::Instant,
    ) -> Result<Self, crate::VmmError> {
        if let MemBackend::File(path) = backend {
            return Self::restore(config, state, path, console, start);
        }
        crate::snapshot::check_restorable(&config, state)?;
        let (mem, link) = guest_memory(backend, &state.memory)
            .map_err(|e| crate::VmmError::Config(e.to_string()))?;
        log::info!(
            "restore: guest memory from {backend} at {:?}",
            start.elapsed()
        );
        let vmm = Self::restore_with_memory(config, state, mem, console, start)?;
        if let Some(link) = link {
            link.watch();
        }
        Ok(vmm)
    }
}

#[cfg(test)]
mod tests;
