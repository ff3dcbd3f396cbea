//! One vsock stream connection bridged to a host Unix socket: its state, the
//! credit accounting in both directions, and the bytes waiting for the host.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{Header, HOST_CID, TYPE_STREAM};

/// Receive buffer the device advertises to the guest for each connection
/// (`buf_alloc`): at most this many guest bytes wait for a slow host socket.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// Send a credit update once the host has consumed this many bytes since
/// the guest last heard our `fwd_cnt`.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// Identifies a connection: the host-side port and the guest-side port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    /// Port on the host (CID 2) side.
    pub local_port: u32,
    /// Port on the guest side.
    pub peer_port: u32,
}

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: OP_REQUEST queued or sent, waiting for OP_RESPONSE.
    /// Holds when the request reached the guest, if it has.
    LocalInit(Option<Instant>),
    /// Both sides agreed; data flows.
    Established,
}

/// What a write of pending data to the host achieved.
#[derive(Debug, PartialEq, Eq)]
pub enum Flush {
    /// Everything pending was written.
    Done,
    /// The socket would block; data remains.
    Blocked,
}

/// A stream connection.
pub struct Connection {
    /// The host end.
    pub stream: UnixStream,
    /// Its epoll token.
    pub token: u64,
    /// Life-cycle state.
    pub state: State,
    /// Ports.
    pub key: ConnKey,
    /// The guest's CID.
    pub guest_cid: u64,

    // Host → guest direction.
    /// Payload bytes sent to the guest, ever (wrapping).
    pub rx_cnt: u32,
    /// The guest's receive buffer size (from its last packet).
    pub peer_buf_alloc: u32,
    /// The guest's consumed-byte counter (from its last packet).
    pub peer_fwd_cnt: u32,
    /// A credit request was sent and not yet answered.
    pub credit_requested: bool,
    /// The host socket may have data (or EOF) to read; EPOLLIN is off.
    pub host_readable: bool,
    /// The connection is in the muxer's RX ready list.
    pub rx_queued: bool,
    /// The host end sent EOF.
    pub host_eof: bool,
    /// epoll reported a hang-up: the host end closed both directions.
    pub host_hup: bool,
    /// The guest said it will receive no more (SHUTDOWN with RCV).
    pub peer_no_recv: bool,

    // Guest → host direction.
    /// Guest bytes not yet written to the host socket.
    pub pending: VecDeque<u8>,
    /// Guest payload bytes written to the host, ever (wrapping).
    pub fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard.
    pub last_fwd_cnt_sent: u32,
    /// A credit update is already queued.
    pub credit_update_queued: bool,
    /// The guest said it will send no more (SHUTDOWN with SEND).
    pub peer_no_send: bool,
    /// We shut down the write side of the host socket.
    pub host_write_shut: bool,

    /// Events currently registered with epoll (None: not registered).
    pub registered: Option<EventSet>,
}

impl Connection {
    /// A new connection over `stream` (set non-blocking by the caller).
    pub fn new(stream: UnixStream, token: u64, key: ConnKey, guest_cid: u64, state: State) -> Self {
        Self {
            stream,
            token,
            state,
            key,
            guest_cid,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            credit_requested: false,
            host_readable: false,
            rx_queued: false,
            host_eof: false,
            host_hup: false,
            peer_no_recv: false,
            pending: VecDeque::new(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            credit_update_queued: false,
            peer_no_send: false,
            host_write_shut: false,
            registered: None,
        }
    }

    /// Records the guest's buffer state from one of its packets.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Bytes the guest can still take on this connection.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether this connection should be in the RX ready list.
    pub fn wants_rx(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && !self.peer_no_recv
            && self.peer_credit() > 0
    }

    /// The epoll events this connection needs now.
    pub fn desired_events(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.state == State::Established
            && !self.host_readable
            && !self.host_eof
            && !self.peer_no_recv
        {
            ev |= EventSet::IN;
        }
        if !self.pending.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// A header from the host end to the guest end, carrying our credit.
    /// Marks `fwd_cnt` as heard by the guest.
    pub fn header(&mut self, op: u16, flags: u32, len: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Whether the guest should be told about consumed bytes.
    pub fn needs_credit_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Space left in the guest → host buffer; a guest that honours our
    /// credit never exceeds it.
    pub fn pending_room(&self) -> usize {
        (CONN_BUF_ALLOC as usize).saturating_sub(self.pending.len())
    }

    /// Queues guest data for the host, writing as much as possible at once.
    pub fn push_to_host(&mut self, data: &[u8]) -> io::Result<Flush> {
        if self.pending.is_empty() {
            let n = match send_nosignal(&self.stream, data) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
            self.pending.extend(&data[n..]);
        } else {
            self.pending.extend(data);
        }
        if self.pending.is_empty() {
            Ok(Flush::Done)
        } else {
            self.flush()
        }
    }

    /// Writes pending guest data to the host socket.
    pub fn flush(&mut self) -> io::Result<Flush> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Flush::Blocked),
                Err(e) => return Err(e),
            }
        }
        Ok(Flush::Done)
    }

    /// Reads host data for the guest into `buf`.
    pub fn read_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.stream.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
}

/// `send(2)` with MSG_NOSIGNAL: a peer that went away gives EPIPE, never a
/// SIGPIPE that would kill the VMM.
pub fn send_nosignal(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length describe `data`, which outlives the
        // call; the fd is owned by `stream`; send(2) does not keep the buffer.
        let r = unsafe {
            libc::send(
                stream.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Connects to the Unix socket at `path` without ever blocking: a listener
/// whose backlog is full refuses (EAGAIN) instead of stalling the device.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad Unix socket path",
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    loop {
        // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(UnixStream::from(fd));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Parses `CONNECT <port>` (the newline already stripped).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut words = line.split_whitespace();
    if words.next()? != "CONNECT" {
        return None;
    }
    let port = words.next()?.parse().ok()?;
    words.next().is_none().then_some(port)
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn vsock_connect_line_parsing() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT 52 x"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }
}
