//! Live migration: the source's pre-copy rounds and the destination's
//! receiving side, over the wire protocol of [`kiln_snapshot::migration`].
//!
//! The source logs dirty pages, sends every non-zero page while the guest
//! runs (round 0), then the pages dirtied meanwhile, round after round,
//! until what is left can cross the link within the downtime target (the
//! link's speed is measured on the earlier rounds) or a round cap is hit.
//! It then pauses the VM, sends the last dirty pages and the VM's state, and
//! waits for the destination's `Ack`. Whatever fails before everything is
//! sent, or when the destination answers with an `Error`, the source stops
//! logging (if it started it), resumes the guest (if it paused it) and
//! reports one line: the guest goes on running at the source. If the
//! connection fails once everything is sent but before the `Ack` arrives,
//! the destination may or may not run the guest: the source cannot tell,
//! so it keeps its copy paused ([`SendError::InDoubt`]) rather than risk
//! the guest running twice on the same disks.
//!
//! The destination ([`receive`]) allocates anonymous memory for the layout
//! it is sent, writes the pages into it and returns the memory with the
//! state once `Done` arrives; the caller builds the VM
//! ([`crate::Vmm::restore_with_memory`]), starts it and sends the `Ack`.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kiln_devices::virtio::mmio::MmioState;
use kiln_devices::GuestMem;
use kiln_snapshot::migration::{self as wire, Message, MigrationError};
use kiln_snapshot::state::{MemoryLayout, MicrovmState};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::dirty::count_dirty;
use crate::memory_file::{self, PAGE};
use crate::vm::VmHandle;

/// Largest `Pages` message the source sends.
const CHUNK: usize = 4 << 20;
/// How long a peer may keep the other waiting between messages.
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting to the destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address (`HOST:PORT`; `[v6]:PORT` for IPv6).
    Tcp(String),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected tcp:HOST:PORT or unix:PATH");
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let addr = s.strip_prefix("tcp:").ok_or_else(bad)?;
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad());
        }
        Ok(Self::Tcp(addr.to_string()))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A connection between the two sides.
pub enum Stream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl Stream {
    fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Self::Tcp(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
            Self::Unix(s) => {
                s.set_read_timeout(Some(t))?;
                s.set_write_timeout(Some(t))
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.flush(),
            Self::Unix(s) => s.flush(),
        }
    }
}

impl Endpoint {
    /// Whether connecting needs no name lookup (a Unix path, or an IP
    /// address and port). A VMM under its seccomp filters resolves no
    /// names.
    pub fn is_literal(&self) -> bool {
        match self {
            Self::Tcp(a) => a.parse::<std::net::SocketAddr>().is_ok(),
            Self::Unix(_) => true,
        }
    }

    /// The same destination with a host name resolved to its first
    /// address.
    pub fn resolved(&self) -> Result<Endpoint, String> {
        match self {
            Self::Tcp(a) if !self.is_literal() => {
                let addr = a
                    .to_socket_addrs()
                    .map_err(|e| format!("resolving {self}: {e}"))?
                    .next()
                    .ok_or_else(|| format!("resolving {self}: no address"))?;
                Ok(Self::Tcp(addr.to_string()))
            }
            _ => Ok(self.clone()),
        }
    }

    /// Connects to a destination that listens here.
    pub fn connect(&self) -> Result<Stream, String> {
        let fail = |e: io::Error| format!("cannot connect to {self}: {e}");
        let s = match self {
            Self::Tcp(a) => {
                let mut last = io::Error::other("the name resolves to no address");
                let mut found = None;
                for addr in a.to_socket_addrs().map_err(fail)? {
                    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or_else(|| fail(last))?;
                s.set_nodelay(true).map_err(fail)?;
                Stream::Tcp(s)
            }
            Self::Unix(p) => Stream::Unix(UnixStream::connect(p).map_err(fail)?),
        };
        s.set_timeouts(STREAM_TIMEOUT).map_err(fail)?;
        Ok(s)
    }

    /// Listens here (a Unix socket path must not exist yet).
    pub fn listen(&self) -> Result<Listener, String> {
        let fail = |e: io::Error| format!("cannot listen on {self}: {e}");
        Ok(match self {
            Self::Tcp(a) => Listener::Tcp(TcpListener::bind(a.as_str()).map_err(fail)?),
            Self::Unix(p) => Listener::Unix(UnixListener::bind(p).map_err(fail)?, p.clone()),
        })
    }
}

/// A destination waiting for its source. A Unix socket is removed when it
/// is dropped.
pub enum Listener {
    /// On TCP.
    Tcp(TcpListener),
    /// On a Unix socket (and its path).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Where it listens (with the port chosen when 0 was asked).
    pub fn endpoint(&self) -> String {
        match self {
            Self::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:?".into(),
            },
            Self::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Waits for the source to connect.
    pub fn accept(&self) -> Result<Stream, String> {
        let fail = |e: io::Error| format!("accepting on {}: {e}", self.endpoint());
        let s = match self {
            Self::Tcp(l) => {
                let (s, _) = l.accept().map_err(fail)?;
                s.set_nodelay(true).map_err(fail)?;
                Stream::Tcp(s)
            }
            Self::Unix(l, _) => Stream::Unix(l.accept().map_err(fail)?.0),
        };
        s.set_timeouts(STREAM_TIMEOUT).map_err(fail)?;
        Ok(s)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Self::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// How the source migrates.
#[derive(Debug, Clone, Copy)]
pub struct SendOptions {
    /// Stop pre-copying once the rest can be sent within this time.
    pub downtime: Duration,
    /// Stop pre-copying after this many rounds (round 0 included).
    pub max_rounds: u32,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            downtime: Duration::from_millis(100),
            max_rounds: 30,
        }
    }
}

/// What a finished migration did (source side).
#[derive(Debug, Clone, Copy, Default)]
pub struct SendStats {
    /// Pre-copy rounds (round 0 included; the final stop-and-copy round is
    /// not counted).
    pub rounds: u32,
    /// Guest memory bytes sent in all.
    pub bytes: u64,
    /// Guest memory bytes sent while the VM was paused.
    pub final_bytes: u64,
    /// From the start to the destination's `Ack`.
    pub total: Duration,
    /// From pausing the VM to the destination's `Ack` (the guest runs at
    /// the destination then).
    pub downtime: Duration,
}

/// Turns a protocol error into the line reported.
fn describe(e: MigrationError) -> String {
    match e {
        MigrationError::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            format!(
                "the migration peer did not answer within {}s",
                STREAM_TIMEOUT.as_secs()
            )
        }
        other => other.to_string(),
    }
}

/// The host bytes of one guest region.
fn region_bytes(r: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>) -> &[u8] {
    // SAFETY: the region maps `len()` bytes at `as_ptr()` for as long as the
    // region (borrowed here) lives. The guest may write them concurrently
    // during pre-copy; a page changed while it is read is in the dirty log
    // and sent again later, so a torn read is never what the destination
    // keeps, and reading plain bytes is never unsafe for the host.
    unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) }
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bytes are a valid u64; align_to only splits the slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

fn bit(bitmap: &[u64], page: usize) -> bool {
    bitmap
        .get(page / 64)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

fn set_bit(bitmap: &mut [u64], page: usize) {
    if let Some(w) = bitmap.get_mut(page / 64) {
        *w |= 1 << (page % 64);
    }
}

/// The link as the source measured it.
#[derive(Default)]
struct Link {
    bytes: u64,
    time: Duration,
}

impl Link {
    /// How long `bytes` take at the speed seen so far (zero before any
    /// measurement: nothing to go by).
    fn estimate(&self, bytes: u64) -> Duration {
        if self.bytes == 0 || self.time.is_zero() {
            return Duration::ZERO;
        }
        self.time.mul_f64(bytes as f64 / self.bytes as f64)
    }
}

/// Sends the runs of pages of `mem` that `selected(region, page, bytes)`
/// picks, in messages of at most [`CHUNK`] bytes, and counts the time the
/// writes took in `link`. Returns the bytes sent.
fn send_pages(
    w: &mut Stream,
    mem: &GuestMem,
    layout: &MemoryLayout,
    link: &mut Link,
    selected: impl Fn(usize, usize, &[u8]) -> bool,
) -> Result<u64, MigrationError> {
    let mut sent = 0u64;
    for (ri, (r, l)) in mem.iter().zip(&layout.regions).enumerate() {
        let bytes = region_bytes(r);
        let pages = bytes.len().div_ceil(PAGE);
        let page_bytes = |p: usize| &bytes[p * PAGE..((p + 1) * PAGE).min(bytes.len())];
        let mut p = 0;
        while p < pages {
            if !selected(ri, p, page_bytes(p)) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && (p - start) * PAGE < CHUNK && selected(ri, p, page_bytes(p)) {
                p += 1;
            }
            let (from, to) = (start * PAGE, (p * PAGE).min(bytes.len()));
            let t = Instant::now();
            wire::send_pages(w, l.file_offset + from as u64, &bytes[from..to])?;
            link.time += t.elapsed();
            sent += (to - from) as u64;
        }
    }
    w.flush().map_err(MigrationError::Io)?;
    link.bytes += sent;
    Ok(sent)
}

/// Marks the pages of the used rings of the virtio devices in `state` in
/// `bitmaps`: the devices write those rings, and the restored devices read
/// their positions from them.
fn mark_device_rings(mem: &GuestMem, state: &MicrovmState, bitmaps: &mut [Vec<u64>]) {
    for d in &state.devices {
        let Ok(st) = kiln_snapshot::from_bytes::<MmioState>(&d.data) else {
            continue;
        };
        for q in st.queues.iter().filter(|q| q.ready) {
            // flags, idx, size entries of (id, len), avail_event.
            let len = 4 + 8 * u64::from(q.size) + 2;
            let mut addr = q.used & !(PAGE as u64 - 1);
            while addr < q.used + len {
                for (ri, r) in mem.iter().enumerate() {
                    let start = r.start_addr().0;
                    if addr >= start && addr < start + r.len() {
                        set_bit(&mut bitmaps[ri], ((addr - start) / PAGE as u64) as usize);
                    }
                }
                addr += PAGE as u64;
            }
        }
    }
}

/// Why a migration did not complete at the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// It failed before the destination could run the VM (or the
    /// destination said it failed): the VM runs here again.
    #[error("{0}")]
    Failed(String),
    /// Everything was sent, then the connection failed before the
    /// destination's `Ack`: it may run the VM, so the VM stays paused here.
    #[error("{0}")]
    InDoubt(String),
}

impl From<String> for SendError {
    fn from(e: String) -> Self {
        Self::Failed(e)
    }
}

impl VmHandle {
    /// Migrates this VM over `stream` (see the module documentation).
    /// `config` is the configuration the destination rebuilds it from. On
    /// success the VM stays paused here and the destination runs it; on
    /// [`SendError::Failed`] the VM runs here as before; on
    /// [`SendError::InDoubt`] it stays paused here.
    pub fn migrate_send(
        &self,
        stream: &mut Stream,
        config: &str,
        opts: &SendOptions,
    ) -> Result<SendStats, SendError> {
        let was_logging = self.dirty_log_enabled();
        let mut paused_by_us = false;
        let r = self.send_all(stream, config, opts, &mut paused_by_us);
        if let Err(SendError::Failed(e)) = &r {
            if !was_logging {
                if let Err(e) = self.stop_dirty_log() {
                    log::warn!("migration: stopping the dirty log: {e}");
                }
            }
            if paused_by_us {
                self.resume();
            }
            // Tell the destination, if it still listens (briefly).
            let _ = stream.set_timeouts(Duration::from_secs(1));
            let _ = wire::send(stream, &Message::Error(e.clone()));
        }
        r
    }

    fn send_all(
        &self,
        s: &mut Stream,
        config: &str,
        opts: &SendOptions,
        paused_by_us: &mut bool,
    ) -> Result<SendStats, SendError> {
        let t0 = Instant::now();
        let mem = self.guest_memory();
        let layout = memory_file::layout(mem);
        // A peer that fails while we write says why before closing: read it.
        let peer_said = |s: &mut Stream, e: MigrationError| -> String {
            if matches!(e, MigrationError::Disconnected(_) | MigrationError::Io(_)) {
                let _ = s.set_timeouts(Duration::from_millis(500));
                if let Ok(Message::Error(why)) = wire::recv(s) {
                    return describe(MigrationError::Peer(why));
                }
            }
            describe(e)
        };

        wire::send(s, &wire::hello()).map_err(describe)?;
        wire::send(s, &Message::Layout(layout.clone())).map_err(describe)?;
        match wire::recv(s).map_err(describe)? {
            m @ Message::Hello { .. } => wire::check_hello(&m).map_err(describe)?,
            Message::Error(e) => return Err(describe(MigrationError::Peer(e)).into()),
            _ => {
                return Err(
                    String::from("the destination answered the layout with something else").into(),
                )
            }
        }

        self.start_dirty_log()?;
        // Round 0 sends every non-zero page: earlier marks are not needed.
        self.take_dirty_bitmaps()?;
        let mut link = Link::default();
        let mut stats = SendStats::default();
        stats.bytes += send_pages(s, mem, &layout, &mut link, |_, _, b| !is_zero(b))
            .map_err(|e| peer_said(s, e))?;
        wire::send(s, &Message::RoundEnd).map_err(|e| peer_said(s, e))?;
        stats.rounds = 1;
        let mut dirty = self.take_dirty_bitmaps()?;
        loop {
            let left = count_dirty(&dirty) * PAGE as u64;
            let eta = link.estimate(left);
            log::debug!(
                "migration: round {} left {} KiB dirty (about {eta:?})",
                stats.rounds,
                left >> 10
            );
            if eta <= opts.downtime || stats.rounds >= opts.max_rounds {
                break;
            }
            stats.bytes += send_pages(s, mem, &layout, &mut link, |r, p, _| bit(&dirty[r], p))
                .map_err(|e| peer_said(s, e))?;
            wire::send(s, &Message::RoundEnd).map_err(|e| peer_said(s, e))?;
            stats.rounds += 1;
            dirty = self.take_dirty_bitmaps()?;
        }

        // Stop and copy the rest.
        if !self.is_paused() {
            self.pause()?;
            *paused_by_us = true;
        }
        let paused_at = Instant::now();
        let state = self.capture_state(config)?;
        for (d, last) in dirty.iter_mut().zip(self.take_dirty_bitmaps()?) {
            for (w, l) in d.iter_mut().zip(last) {
                *w |= l;
            }
        }
        mark_device_rings(mem, &state, &mut dirty);
        stats.final_bytes = send_pages(s, mem, &layout, &mut link, |r, p, _| bit(&dirty[r], p))
            .map_err(|e| peer_said(s, e))?;
        stats.bytes += stats.final_bytes;
        let image = kiln_snapshot::encode(&state).map_err(|e| e.to_string())?;
        wire::send(s, &Message::State(image)).map_err(|e| peer_said(s, e))?;
        wire::send(s, &Message::Done).map_err(|e| peer_said(s, e))?;
        match wire::recv(s) {
            Ok(Message::Ack) => {}
            Ok(Message::Error(e)) => return Err(describe(MigrationError::Peer(e)).into()),
            Ok(_) => {
                return Err(SendError::InDoubt(
                    "the destination answered Done with something else than Ack".into(),
                ))
            }
            Err(e) => return Err(SendError::InDoubt(describe(e))),
        }
        stats.downtime = paused_at.elapsed();
        stats.total = t0.elapsed();
        Ok(stats)
    }
}

/// What a destination received.
pub struct Received {
    /// The VM's state.
    pub state: MicrovmState,
    /// Its memory, filled.
    pub mem: GuestMem,
    /// Pre-copy rounds seen.
    pub rounds: u32,
    /// Guest memory bytes received.
    pub bytes: u64,
}

/// Receives a VM over `stream` (up to the source's `Done`). On failure the
/// source is told why (if it still listens).
pub fn receive(stream: &mut Stream) -> Result<Received, String> {
    let r = receive_all(stream);
    if let Err(e) = &r {
        let _ = stream.set_timeouts(Duration::from_secs(1));
        let _ = wire::send(stream, &Message::Error(e.clone()));
    }
    r
}

/// Guest memory for `layout`: anonymous, zero-filled, regions back to back
/// in the layout's file space.
fn allocate(layout: &MemoryLayout) -> Result<GuestMem, String> {
    let bad = |m: String| format!("unusable memory layout from the source: {m}");
    if layout.regions.is_empty() {
        return Err(bad("no regions".into()));
    }
    for r in &layout.regions {
        if r.size == 0 || r.size % PAGE as u64 != 0 || r.guest_addr % PAGE as u64 != 0 {
            return Err(bad(format!(
                "region at {:#x} of {:#x} bytes is not whole pages",
                r.guest_addr, r.size
            )));
        }
    }
    let ranges: Vec<(GuestAddress, usize)> = layout
        .regions
        .iter()
        .map(|r| {
            usize::try_from(r.size)
                .map(|size| (GuestAddress(r.guest_addr), size))
                .map_err(|_| bad(format!("region of {:#x} bytes", r.size)))
        })
        .collect::<Result<_, _>>()?;
    let mem = GuestMem::from_ranges(&ranges).map_err(|e| bad(e.to_string()))?;
    if memory_file::layout(&mem) != *layout {
        return Err(bad("its regions are not back to back in order".into()));
    }
    Ok(mem)
}

/// Copies `data` to `offset` of `layout`'s file space in `mem`.
fn write_pages(
    mem: &GuestMem,
    layout: &MemoryLayout,
    offset: u64,
    data: &[u8],
) -> Result<(), String> {
    let end = offset
        .checked_add(data.len() as u64)
        .ok_or("page offset overflows")?;
    let (region, l) = mem
        .iter()
        .zip(&layout.regions)
        .find(|(_, l)| offset >= l.file_offset && end <= l.file_offset + l.size)
        .ok_or_else(|| {
            format!(
                "the source sent {} bytes at {offset:#x}, outside guest memory",
                data.len()
            )
        })?;
    let at = (offset - l.file_offset) as usize;
    // SAFETY: the region maps `len()` writable bytes at `as_ptr()`, and
    // `at + data.len() <= len()` was checked above; no vCPU runs on this
    // memory yet, so nothing else accesses it.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), region.as_ptr().add(at), data.len());
    }
    Ok(())
}

fn receive_all(s: &mut Stream) -> Result<Received, String> {
    let first = wire::recv(s).map_err(describe)?;
    wire::check_hello(&first).map_err(describe)?;
    let layout = match wire::recv(s).map_err(describe)? {
        Message::Layout(l) => l,
        Message::Error(e) => return Err(describe(MigrationError::Peer(e))),
        _ => return Err("the source did not send its memory layout".into()),
    };
    let mem = allocate(&layout)?;
    wire::send(s, &wire::hello()).map_err(describe)?;
    let (mut rounds, mut bytes, mut state) = (0u32, 0u64, None);
    loop {
        match wire::recv(s).map_err(describe)? {
            Message::Pages { offset, data } => {
                write_pages(&mem, &layout, offset, &data)?;
                bytes += data.len() as u64;
            }
            Message::RoundEnd => rounds += 1,
            Message::State(image) => {
                let st: MicrovmState = kiln_snapshot::decode(&image)
                    .map_err(|e| format!("the VM state from the source: {e}"))?;
                if st.memory != layout {
                    return Err(
                        "the VM state's memory layout differs from the one announced".into(),
                    );
                }
                state = Some(st);
            }
            Message::Done => break,
            Message::Error(e) => return Err(describe(MigrationError::Peer(e))),
            _ => return Err("the source sent an unexpected message".into()),
        }
    }
    let state = state.ok_or("the source sent Done without the VM state")?;
    Ok(Received {
        state,
        mem,
        rounds,
        bytes,
    })
}

/// Tells the source the VM runs here.
pub fn send_ack(stream: &mut Stream) -> Result<(), String> {
    wire::send(stream, &Message::Ack).map_err(describe)?;
    stream.flush().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_snapshot::state::MemoryRegion;
    use vm_memory::Bytes;

    #[test]
    fn names_resolve_to_literals() {
        let e: Endpoint = "tcp:localhost:4000".parse().unwrap();
        assert!(!e.is_literal());
        let r = e.resolved().unwrap();
        assert!(r.is_literal(), "{r}");
        assert!(r.to_string().ends_with(":4000"), "{r}");
        for lit in ["tcp:127.0.0.1:1", "tcp:[::1]:2", "unix:/x"] {
            let e: Endpoint = lit.parse().unwrap();
            assert!(e.is_literal(), "{lit}");
            assert_eq!(e.resolved().unwrap(), e);
        }
        let bad: Endpoint = "tcp:no-such-host.invalid:1".parse().unwrap();
        assert!(bad
            .resolved()
            .unwrap_err()
            .starts_with("resolving tcp:no-such-host.invalid:1: "));
    }

    #[test]
    fn endpoints_parse_and_print() {
        for s in ["tcp:127.0.0.1:4000", "tcp:[::1]:4000", "unix:/tmp/m.sock"] {
            assert_eq!(s.parse::<Endpoint>().unwrap().to_string(), s);
        }
        for s in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "unix:",
            "udp:x:1",
        ] {
            let e = s.parse::<Endpoint>().unwrap_err();
            assert!(e.contains("tcp:HOST:PORT or unix:PATH"), "{s}: {e}");
        }
    }

    fn layout() -> MemoryLayout {
        MemoryLayout {
            regions: vec![
                MemoryRegion {
                    guest_addr: 0,
                    size: 16 * PAGE as u64,
                    file_offset: 0,
                },
                MemoryRegion {
                    guest_addr: 0x10_0000,
                    size: 8 * PAGE as u64,
                    file_offset: 16 * PAGE as u64,
                },
            ],
        }
    }

    fn pair() -> (Stream, Stream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::Unix(a), Stream::Unix(b))
    }

    #[test]
    fn pages_land_where_the_layout_says_and_stray_ones_are_refused() {
        let l = layout();
        let mem = allocate(&l).unwrap();
        write_pages(&mem, &l, 17 * PAGE as u64, b"high").unwrap();
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, GuestAddress(0x10_0000 + PAGE as u64))
            .unwrap();
        assert_eq!(&buf, b"high");
        // Across the end of a region, past the end, overflowing.
        for (off, len) in [
            (15 * PAGE as u64, 2 * PAGE),
            (24 * PAGE as u64, 1),
            (u64::MAX, 2),
        ] {
            let e = write_pages(&mem, &l, off, &vec![1; len]).unwrap_err();
            assert!(e.contains("outside") || e.contains("overflows"), "{e}");
        }
        // Layouts that are not whole pages or not back to back.
        let mut odd = l.clone();
        odd.regions[1].size = 100;
        assert!(allocate(&odd).unwrap_err().contains("whole pages"));
        let mut gap = l.clone();
        gap.regions[1].file_offset += PAGE as u64;
        assert!(allocate(&gap).unwrap_err().contains("back to back"));
        assert!(allocate(&MemoryLayout::default()).is_err());
    }

    #[test]
    fn a_source_vanishing_before_done_is_a_clear_error() {
        let (mut src, mut dst) = pair();
        let t = std::thread::spawn(move || {
            wire::send(&mut src, &wire::hello()).unwrap();
            wire::send(&mut src, &Message::Layout(layout())).unwrap();
            assert!(matches!(
                wire::recv(&mut src).unwrap(),
                Message::Hello { .. }
            ));
            wire::send_pages(&mut src, 0, &[7u8; PAGE]).unwrap();
            wire::send(&mut src, &Message::RoundEnd).unwrap();
            // Gone before State and Done.
        });
        let err = receive(&mut dst).err().expect("must fail");
        t.join().unwrap();
        assert!(err.contains("disconnected"), "{err}");
    }

    #[test]
    fn done_without_state_and_source_errors_are_refused() {
        let (mut src, mut dst) = pair();
        let t = std::thread::spawn(move || {
            wire::send(&mut src, &wire::hello()).unwrap();
            wire::send(&mut src, &Message::Layout(layout())).unwrap();
            wire::recv(&mut src).unwrap();
            wire::send(&mut src, &Message::Done).unwrap();
            // The destination says why it gave up.
            wire::recv(&mut src).unwrap()
        });
        let err = receive(&mut dst).err().expect("must fail");
        assert!(err.contains("without the VM state"), "{err}");
        assert_eq!(t.join().unwrap(), Message::Error(err));

        let (mut src, mut dst) = pair();
        let t = std::thread::spawn(move || {
            wire::send(&mut src, &wire::hello()).unwrap();
            wire::send(&mut src, &Message::Error("disk full".into())).unwrap();
        });
        let err = receive(&mut dst).err().expect("must fail");
        t.join().unwrap();
        assert!(
            err.contains("the migration peer failed: disk full"),
            "{err}"
        );
    }

    #[test]
    fn tcp_and_unix_listeners_accept() {
        let dir = std::env::temp_dir().join(format!("kiln-mig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let unix = Endpoint::Unix(dir.join("m.sock"));
        for ep in [Endpoint::Tcp("127.0.0.1:0".into()), unix.clone()] {
            let l = ep.listen().unwrap();
            let at: Endpoint = l.endpoint().parse().unwrap();
            let t = std::thread::spawn(move || {
                let mut s = at.connect().unwrap();
                wire::send(&mut s, &Message::Ack).unwrap();
            });
            let mut s = l.accept().unwrap();
            assert_eq!(wire::recv(&mut s).unwrap(), Message::Ack);
            t.join().unwrap();
        }
        assert!(!dir.join("m.sock").exists(), "the socket is removed");
        let e = Endpoint::Unix(dir.join("none.sock"))
            .connect()
            .err()
            .unwrap();
        assert!(e.contains("cannot connect to unix:"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zero_pages_and_bitmaps() {
        assert!(is_zero(&[0u8; PAGE]));
        let mut p = [0u8; PAGE];
        p[PAGE - 1] = 1;
        assert!(!is_zero(&p));
        let mut b = vec![0u64; 2];
        set_bit(&mut b, 70);
        assert!(bit(&b, 70) && !bit(&b, 69) && !bit(&b, 500));
        let link = Link {
            bytes: 1000,
            time: Duration::from_millis(10),
        };
        assert_eq!(link.estimate(5000), Duration::from_millis(50));
        assert_eq!(Link::default().estimate(5000), Duration::ZERO);
    }
}
