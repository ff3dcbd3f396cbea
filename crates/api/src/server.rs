//! The API server: one thread running an event loop (poll(2)) over the
//! listening Unix socket and every open connection, all non-blocking.
//!
//! # Design
//!
//! Each connection has an incremental [`RequestParser`] and an output
//! buffer. Requests are executed one at a time against [`VmControl`], on
//! the API thread, in the order they complete (like Firecracker's API
//! thread); a connection's next request is only executed once the previous
//! response has been fully written, which keeps pipelined responses in order
//! and stops reading from a client that does not read its responses. A slow
//! client therefore only delays itself:
//!
//! - every response is built in one buffer and handed to one `send(2)`;
//!   what the socket does not take waits for `POLLOUT`;
//! - a connection with no progress for the idle timeout, or a request that
//!   is not complete within it, is closed;
//! - a framing error (bad request line or header, non-UTF-8 head, body over
//!   the payload limit, ...) is answered with 400 and `Connection: close`;
//!   the server then shuts its side down and discards what the client still
//!   sends for a short while (so the client reads the 400 rather than a
//!   broken pipe) before closing;
//! - at most [`DEFAULT_MAX_CONNECTIONS`] connections are open; a client
//!   beyond that is answered `503` with a fault message and closed at once.

use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::http::{Event, RequestParser, Response, CONTINUE};
use crate::router::route;
use crate::{VmControl, DEFAULT_MAX_PAYLOAD};

/// How long a connection may take to send one request, or to take its
/// response, before it is closed. A connection idle between requests has no
/// time limit (like Firecracker's, whose clients keep one connection for a
/// VM's life); when the connection cap is reached, the longest-idle such
/// connection makes room for a new one.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections open at once, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// How long a connection closed after an error keeps discarding input.
const LINGER: Duration = Duration::from_secs(2);
/// Bytes read from one connection per readiness event.
const READ_CHUNK: usize = 16 * 1024;
/// Requests executed for one connection per turn of the loop, so a client
/// pipelining thousands of requests takes turns with the others.
const REQUESTS_PER_TURN: usize = 16;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Something that is not a socket is in the way.
    #[error("--api-sock {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    /// A stale socket could not be removed.
    #[error("--api-sock {path}: cannot remove the stale socket: {source}")]
    Remove {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// bind(2) failed.
    #[error("--api-sock {path}: cannot listen: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The thread could not be started.
    #[error("cannot start the API thread: {0}")]
    Spawn(io::Error),
}

/// A bound API socket, not serving yet.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    max_payload: usize,
    max_connections: usize,
    idle_timeout: Duration,
}

impl ApiServer {
    /// Listens on `path`, replacing a stale socket there. Anything else at
    /// `path` is an error (it is never removed).
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        if Self::check_path(path)? {
            std::fs::remove_file(path).map_err(|source| ServerError::Remove {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: IDLE_TIMEOUT,
        })
    }

    /// Fails if something other than a socket is at `path`; tells whether a
    /// (stale) socket is there.
    pub fn check_path(path: &Path) -> Result<bool, ServerError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => Ok(true),
            Ok(_) => Err(ServerError::NotASocket(path.to_path_buf())),
            Err(_) => Ok(false),
        }
    }

    /// Changes the largest accepted body.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Changes the most connections open at once (at least 1).
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// Changes the idle timeout.
    pub fn idle_timeout(mut self, t: Duration) -> Self {
        self.idle_timeout = t;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves forever on a new thread named `kiln_api`.
    pub fn spawn(self, vm: Arc<dyn VmControl>) -> Result<JoinHandle<()>, ServerError> {
        // The server's seccomp filter is in place before its first request.
        kiln_seccomp::spawn(
            kiln_seccomp::ThreadKind::Api,
            "kiln_api".into(),
            move || self.serve(vm.as_ref()),
        )
        .map_err(ServerError::Spawn)
    }

    /// Serves every connection, forever.
    pub fn serve(&self, vm: &dyn VmControl) {
        if let Err(e) = self.listener.set_nonblocking(true) {
            log::error!("api: cannot make the socket non-blocking: {e}");
            return;
        }
        let mut el = EventLoop {
            conns: Vec::new(),
            pollfds: Vec::new(),
            scratch: vec![0; READ_CHUNK],
            accept_paused_until: None,
        };
        loop {
            el.turn(self, vm);
        }
    }
}

/// The state of the loop between turns.
struct EventLoop {
    conns: Vec<Conn>,
    pollfds: Vec<libc::pollfd>,
    scratch: Vec<u8>,
    /// Set when accept(2) ran out of file descriptors.
    accept_paused_until: Option<Instant>,
}

impl EventLoop {
    /// One poll(2) and the work it reports.
    fn turn(&mut self, server: &ApiServer, vm: &dyn VmControl) {
        let now = Instant::now();
        let listen = !matches!(self.accept_paused_until, Some(t) if now < t);
        if listen {
            self.accept_paused_until = None;
        }
        self.pollfds.clear();
        self.pollfds.push(libc::pollfd {
            fd: server.listener.as_raw_fd(),
            events: if listen { libc::POLLIN } else { 0 },
            revents: 0,
        });
        let mut next_deadline = self.accept_paused_until;
        let mut more = false;
        for c in &self.conns {
            more |= c.more;
            self.pollfds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events: c.interest(),
                revents: 0,
            });
            if let Some(d) = c.deadline(server.idle_timeout) {
                next_deadline = Some(next_deadline.map_or(d, |n| n.min(d)));
            }
        }
        let timeout_ms = match next_deadline {
            // Buffered requests wait for their turn: do not sleep.
            _ if more => 0,
            None => -1,
            Some(d) => {
                let ms = d.saturating_duration_since(now).as_millis();
                // Round up so the deadline has passed when poll returns.
                i32::try_from(ms + 1).unwrap_or(i32::MAX)
            }
        };
        // SAFETY: `pollfds` is a valid, initialized array of `len` pollfd
        // structs that lives across the call; poll(2) only writes `revents`.
        let n = unsafe {
            libc::poll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                log::warn!("api: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            return;
        }
        let now = Instant::now();
        for (i, c) in self.conns.iter_mut().enumerate() {
            let revents = self.pollfds[i + 1].revents;
            if revents != 0 {
                c.on_ready(revents, &mut self.scratch, vm, now);
            } else if c.more {
                c.pump(vm, now);
            }
            if !c.dead && c.deadline(server.idle_timeout).is_some_and(|d| now >= d) {
                log::debug!("api: closing a connection that timed out");
                c.dead = true;
            }
        }
        self.conns.retain(|c| !c.dead);
        if self.pollfds[0].revents != 0 {
            self.accept(server, now);
        }
    }

    /// Accepts every pending connection.
    fn accept(&mut self, server: &ApiServer, now: Instant) {
        loop {
            match server.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("api: {e}");
                        continue;
                    }
                    if self.conns.len() >= server.max_connections {
                        // Make room by closing the longest-idle connection.
                        let oldest = self
                            .conns
                            .iter()
                            .enumerate()
                            .filter(|(_, c)| c.is_idle())
                            .min_by_key(|(_, c)| c.last_progress)
                            .map(|(i, _)| i);
                        match oldest {
                            Some(i) => {
                                log::debug!("api: connection cap reached: closing an idle one");
                                self.conns.swap_remove(i);
                            }
                            None => {
                                refuse(&stream, server.max_connections);
                                continue;
                            }
                        }
                    }
                    self.conns.push(Conn::new(stream, server.max_payload, now));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS: retry a little later rather
                    // than spinning on a listener that stays readable.
                    log::warn!("api: accept failed: {e}");
                    self.accept_paused_until = Some(now + Duration::from_millis(50));
                    return;
                }
            }
        }
    }
}

/// Answers a connection over the limit with 503 and closes it.
fn refuse(stream: &UnixStream, max: usize) {
    log::warn!("api: more than {max} open connections: refusing one");
    let mut out = Vec::new();
    Response::fault(
        503,
        format!("Too many open API connections (the limit is {max}); try again later"),
    )
    .encode(&mut out, true);
    // Best effort: a fresh socket's send buffer takes this at once.
    let _ = send(stream, &out);
    let _ = stream.shutdown(Shutdown::Both);
}

/// send(2) without SIGPIPE.
fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid readable slice for the whole call and the
        // fd is an open socket owned by `stream`.
        let n = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Serving requests.
    Open,
    /// Close once the output is written; `linger`: then discard input.
    Closing { linger: bool },
    /// Our side is shut down; discarding input until EOF or the deadline.
    Lingering { until: Instant },
}

/// One client connection.
struct Conn {
    stream: UnixStream,
    parser: RequestParser,
    /// Bytes to send; `out[sent..]` is pending.
    out: Vec<u8>,
    sent: usize,
    phase: Phase,
    /// The client closed its side.
    eof: bool,
    dead: bool,
    last_progress: Instant,
    /// When the request being received started.
    request_started: Option<Instant>,
    /// Complete requests may be buffered beyond this turn's budget.
    more: bool,
}

impl Conn {
    fn new(stream: UnixStream, max_payload: usize, now: Instant) -> Self {
        Self {
            stream,
            parser: RequestParser::new(max_payload),
            out: Vec::new(),
            sent: 0,
            phase: Phase::Open,
            eof: false,
            dead: false,
            last_progress: now,
            request_started: None,
            more: false,
        }
    }

    fn pending_out(&self) -> bool {
        self.sent < self.out.len()
    }

    fn interest(&self) -> i16 {
        if self.pending_out() {
            libc::POLLOUT
        } else if self.eof || self.more {
            0
        } else {
            libc::POLLIN
        }
    }

    /// When the connection is closed if nothing happens.
    fn deadline(&self, idle: Duration) -> Option<Instant> {
        match self.phase {
            Phase::Lingering { until } => Some(until),
            _ if self.is_idle() => None,
            _ => {
                let d = self.last_progress + idle;
                Some(self.request_started.map_or(d, |s| d.min(s + idle)))
            }
        }
    }

    /// Between requests: nothing half-received, nothing left to send.
    fn is_idle(&self) -> bool {
        self.request_started.is_none() && !self.pending_out() && !self.more
    }

    fn on_ready(&mut self, revents: i16, scratch: &mut [u8], vm: &dyn VmControl, now: Instant) {
        if revents & libc::POLLNVAL != 0 {
            self.dead = true;
            return;
        }
        if self.pending_out() {
            self.flush(now);
        } else if !self.eof && !self.more {
            self.read(scratch, now);
        }
        self.pump(vm, now);
    }

    /// Reads what is available (one chunk) into the parser.
    fn read(&mut self, scratch: &mut [u8], now: Instant) {
        match (&self.stream).read(scratch) {
            Ok(0) => self.eof = true,
            Ok(n) => {
                self.last_progress = now;
                if let Phase::Open = self.phase {
                    if self.parser.is_idle() {
                        self.request_started = Some(now);
                    }
                    self.parser.feed(&scratch[..n]);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                log::debug!("api: read failed: {e}");
                self.dead = true;
            }
        }
    }

    /// Writes pending output; true once all of it is written.
    fn flush(&mut self, now: Instant) -> bool {
        while self.pending_out() {
            match send(&self.stream, &self.out[self.sent..]) {
                Ok(n) => {
                    self.sent += n;
                    self.last_progress = now;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    crate::metrics::API_METRICS.response_failed();
                    log::debug!("api: cannot write the response: {e}");
                    self.dead = true;
                    return false;
                }
            }
        }
        self.out.clear();
        self.sent = 0;
        true
    }

    /// Queues `bytes` and tries to send them at once (one send(2) for a
    /// whole response when the socket takes it).
    fn respond(&mut self, bytes: impl FnOnce(&mut Vec<u8>), now: Instant) {
        bytes(&mut self.out);
        self.flush(now);
    }

    /// Executes the requests that are complete, in order, while the
    /// previous responses are written; handles closing.
    fn pump(&mut self, vm: &dyn VmControl, now: Instant) {
        self.more = false;
        let mut budget = REQUESTS_PER_TURN;
        while !self.dead && !self.pending_out() {
            match self.phase {
                Phase::Closing { linger: false } => {
                    self.dead = true;
                    return;
                }
                Phase::Closing { linger: true } => {
                    let _ = self.stream.shutdown(Shutdown::Write);
                    self.phase = Phase::Lingering {
                        until: now + LINGER,
                    };
                    self.dead = self.eof;
                    return;
                }
                Phase::Lingering { .. } => {
                    self.dead = self.eof;
                    return;
                }
                Phase::Open => {}
            }
            let event = match self.parser.next_event() {
                Some(ev) => ev,
                None if self.eof => match self.parser.finish() {
                    Some(e) => Event::Error(e),
                    None => {
                        self.dead = true;
                        return;
                    }
                },
                None => {
                    if self.parser.is_idle() {
                        self.request_started = None;
                    }
                    return;
                }
            };
            match event {
                Event::Continue => self.respond(|o| o.extend_from_slice(CONTINUE), now),
                Event::Request(req) => {
                    budget -= 1;
                    log::debug!("api: {} {}", req.method, req.path);
                    let resp = route(&req, vm);
                    log_fault(&resp);
                    if !req.keep_alive {
                        self.phase = Phase::Closing { linger: false };
                    }
                    self.request_started = (!self.parser.is_idle()).then_some(now);
                    self.respond(|o| resp.encode(o, !req.keep_alive), now);
                    vm.after_response();
                    if budget == 0 && self.phase == Phase::Open && !self.parser.is_idle() {
                        // The rest next turn (reading waits until then).
                        self.more = true;
                        return;
                    }
                }
                Event::Error(e) => {
                    let resp = Response::bad_request(e.to_string());
                    log_fault(&resp);
                    self.phase = Phase::Closing { linger: !self.eof };
                    self.respond(|o| resp.encode(o, true), now);
                }
            }
        }
    }
}

fn log_fault(resp: &Response) {
    if resp.status >= 400 {
        log::info!(
            "api: {} {}",
            resp.status,
            resp.body.as_deref().unwrap_or("")
        );
    }
}

/// Serves the requests of one blocking stream until the client closes it,
/// asks to close it, or sends something unparseable (answered with 400
/// first). Used by tests and tools; the server itself multiplexes
/// connections in its event loop with the same parser.
pub fn serve_connection(
    mut reader: impl Read,
    mut writer: impl io::Write,
    vm: &dyn VmControl,
    max_payload: usize,
) {
    let mut parser = RequestParser::new(max_payload);
    let mut buf = vec![0; READ_CHUNK];
    let mut eof = false;
    let mut out = Vec::new();
    loop {
        let event = match parser.next_event() {
            Some(ev) => ev,
            None if eof => match parser.finish() {
                Some(e) => Event::Error(e),
                None => return,
            },
            None => {
                match reader.read(&mut buf) {
                    Ok(0) => eof = true,
                    Ok(n) => parser.feed(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::debug!("api: connection error: {e}");
                        return;
                    }
                }
                continue;
            }
        };
        out.clear();
        let close = match event {
            Event::Continue => {
                out.extend_from_slice(CONTINUE);
                false
            }
            Event::Request(req) => {
                let resp = route(&req, vm);
                log_fault(&resp);
                resp.encode(&mut out, !req.keep_alive);
                !req.keep_alive
            }
            Event::Error(e) => {
                let resp = Response::bad_request(e.to_string());
                log_fault(&resp);
                resp.encode(&mut out, true);
                true
            }
        };
        if let Err(e) = writer.write_all(&out).and_then(|()| writer.flush()) {
            crate::metrics::API_METRICS.response_failed();
            log::debug!("api: cannot write the response: {e}");
            return;
        }
        vm.after_response();
        if close {
            return;
        }
    }
}
