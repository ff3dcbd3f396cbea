//! The vsock backend: routes packets between the guest's queues and host
//! Unix sockets, Firecracker-style.
//!
//! - Host-initiated: a client connects to the device's listening socket and
//!   writes `CONNECT <port>\n`; the muxer sends the guest an OP_REQUEST from
//!   a local port it allocates, and on OP_RESPONSE writes `OK <local_port>\n`
//!   back before bridging bytes.
//! - Guest-initiated: an OP_REQUEST to host port P connects to the socket
//!   `<uds_path>_P`.
//!
//! The muxer owns an epoll set of its host fds (the listener, clients still
//! sending their CONNECT line, connection streams, a timer); the device's
//! worker watches that epoll fd along with the queue eventfds.
//!
//! Flow control: the guest never gets more data than its credit allows (the
//! muxer stops reading that host socket and asks for credit); guest data the
//! host socket cannot take yet waits in the connection's buffer, which is
//! exactly the credit the muxer advertised, so a guest that honours credit
//! stops sending on that connection instead of having data dropped.

use crate::{ChainWriter, GuestMem};
use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{connect_nonblocking, parse_connect, ConnKey, Connection, State};
use super::packet::*;
use crate::virtio::DeviceMetrics;

/// Most connections (plus clients still handshaking) at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Longest `CONNECT <port>` line a client may send.
const MAX_CONNECT_LINE: usize = 32;
/// Control packets waiting for RX buffers beyond which TX processing pauses.
const MAX_PENDING_CTRL: usize = 256;
/// How long the guest has to answer a host-initiated OP_REQUEST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long to stop accepting host clients after accept(2) fails.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Longest host clients wait for the guest to take a transport reset in.
pub const RESET_ACK_WAIT: Duration = Duration::from_secs(2);
/// First local port handed to host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const FIRST_TOKEN: u64 = 2;

/// A packet for the guest that needs no credit.
enum Ctrl {
    /// A packet for a live connection, built when sent (fresh credit).
    Conn { key: ConnKey, op: u16, flags: u32 },
    /// A ready-made header (resets for connections that are gone).
    Raw(Header),
}

/// A host client that has not finished its `CONNECT <port>\n` line.
struct Client {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The vsock backend for one activation of the device.
pub struct Muxer {
    mem: Arc<GuestMem>,
    rxq: Queue,
    txq: Queue,
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    listener_paused: bool,
    /// Host clients wait in the listener's backlog until this deadline (or
    /// until released): the guest has a transport reset to take in first.
    held_until: Option<Instant>,
    conns: HashMap<ConnKey, Connection>,
    tokens: HashMap<u64, ConnKey>,
    clients: HashMap<u64, Client>,
    next_token: u64,
    next_local_port: u32,
    ctrl: VecDeque<Ctrl>,
    rx_ready: VecDeque<ConnKey>,
    tx_stalled: bool,
    buf: Vec<u8>,
    metrics: Arc<DeviceMetrics>,
}

impl Muxer {
    /// A muxer over the RX and TX queues, accepting host clients on `listener`
    /// (which must be non-blocking).
    pub fn new(
        mem: GuestMem,
        rxq: Queue,
        txq: Queue,
        listener: UnixListener,
        guest_cid: u64,
        uds_path: PathBuf,
        metrics: Arc<DeviceMetrics>,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER_TOKEN),
        )?;
        Ok(Self {
            mem: Arc::new(mem),
            rxq,
            txq,
            guest_cid,
            uds_path,
            listener,
            epoll,
            timer,
            timer_armed: false,
            listener_paused: false,
            held_until: None,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            clients: HashMap::new(),
            next_token: FIRST_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            ctrl: VecDeque::new(),
            rx_ready: VecDeque::new(),
            tx_stalled: false,
            buf: vec![0u8; MAX_PKT_PAYLOAD],
            metrics,
        })
    }

    /// The epoll fd that becomes readable when a host fd needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Number of live connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Holds new host clients in the listener's backlog (`true`) or lets
    /// them in again. While the guest has not taken in a transport reset,
    /// a connection made now could be reset by it after it was answered.
    /// A hold ends by itself after [`RESET_ACK_WAIT`] (see [`Self::hold_expired`]).
    pub fn hold_host_clients(&mut self, hold: bool) {
        if hold == self.held_until.is_some() {
            return;
        }
        let fd = self.listener.as_raw_fd();
        if hold {
            if !self.listener_paused {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
            self.held_until = Some(Instant::now() + RESET_ACK_WAIT);
            // A timer armed for later is re-armed by on_timer for the rest.
            self.arm_timer(RESET_ACK_WAIT);
        } else {
            self.held_until = None;
            if self.listener_paused {
                // on_timer adds it back.
                self.arm_timer(ACCEPT_RETRY);
            } else {
                let ev = EpollEvent::new(EventSet::IN, LISTENER_TOKEN);
                if self.epoll.ctl(ControlOperation::Add, fd, ev).is_err() {
                    self.listener_paused = true;
                    self.arm_timer(ACCEPT_RETRY);
                }
            }
        }
    }

    /// True when a hold has outlived [`RESET_ACK_WAIT`].
    pub fn hold_expired(&self) -> bool {
        self.held_until.is_some_and(|t| Instant::now() >= t)
    }

    /// Drops every connection and pending host client (their host sockets
    /// close): the guest is told to forget its side by a transport reset.
    pub fn drop_all_connections(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.clients.clear();
        self.ctrl.clear();
        self.rx_ready.clear();
    }

    /// Handles whatever host fds are ready (never blocks).
    pub fn handle_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    log::error!("vsock: epoll_wait: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                LISTENER_TOKEN => self.accept_clients(),
                TIMER_TOKEN => self.on_timer(),
                token => {
                    if let Some(&key) = self.tokens.get(&token) {
                        self.on_conn_event(key, ev.event_set());
                    } else if self.clients.contains_key(&token) {
                        self.on_client_readable(token);
                    }
                }
            }
        }
    }

    /// Processes the TX queue and fills the RX queue; returns whether any
    /// used buffer was added (the guest should be interrupted).
    pub fn process(&mut self) -> bool {
        let mut used = false;
        loop {
            used |= self.process_tx();
            used |= self.fill_rx();
            if !self.tx_stalled || self.ctrl.len() >= MAX_PENDING_CTRL {
                return used;
            }
        }
    }

    // ---- TX: packets from the guest ----

    fn process_tx(&mut self) -> bool {
        self.tx_stalled = false;
        let mut used = false;
        let mut buf = std::mem::take(&mut self.buf);
        loop {
            if self.ctrl.len() >= MAX_PENDING_CTRL {
                // Replies would pile up: wait until the guest takes some.
                self.tx_stalled = true;
                break;
            }
            let Some(chain) = self.txq.pop_descriptor_chain(&*self.mem) else {
                break;
            };
            let head = chain.head_index();
            let parsed = read_packet(&self.mem, chain, &mut buf);
            if self.txq.add_used(&*self.mem, head, 0).is_err() {
                DeviceMetrics::add(&self.metrics.invalid_requests, 1);
            }
            used = true;
            match parsed {
                Ok((hdr, len)) => {
                    DeviceMetrics::add(&self.metrics.requests, 1);
                    DeviceMetrics::add(&self.metrics.writes, 1);
                    self.handle_packet(hdr, &buf[..len]);
                }
                Err(why) => {
                    log::debug!("vsock: malformed TX packet: {why}");
                    DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                }
            }
        }
        self.buf = buf;
        used
    }

    fn handle_packet(&mut self, hdr: Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid {
            log::debug!(
                "vsock: packet from CID {} (guest is {})",
                hdr.src_cid,
                self.guest_cid
            );
            DeviceMetrics::add(&self.metrics.invalid_requests, 1);
            return;
        }
        if hdr.kind != TYPE_STREAM || !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&hdr.op) {
            log::debug!("vsock: bad type {} or op {}", hdr.kind, hdr.op);
            DeviceMetrics::add(&self.metrics.invalid_requests, 1);
            self.reply_rst(&hdr);
            return;
        }
        if hdr.dst_cid != HOST_CID {
            self.reply_rst(&hdr);
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.op == OP_REQUEST {
            if self.conns.contains_key(&key) {
                self.kill(key);
                self.reply_rst(&hdr);
            } else {
                self.guest_connect(&hdr, key);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.reply_rst(&hdr);
            return;
        };
        c.update_peer_credit(&hdr);
        match hdr.op {
            OP_RESPONSE => {
                if !matches!(c.state, State::LocalInit(_)) {
                    self.kill(key);
                    return;
                }
                c.state = State::Established;
                let line = format!("OK {}\n", key.local_port);
                // Not guest data: keep it out of the credit count.
                c.fwd_cnt = c.fwd_cnt.wrapping_sub(line.len() as u32);
                c.last_fwd_cnt_sent = c.fwd_cnt;
                if let Err(e) = c.push_to_host(line.as_bytes()) {
                    log::debug!("vsock: client of port {} gone: {e}", key.local_port);
                    self.kill(key);
                    return;
                }
            }
            OP_RW => {
                if c.state != State::Established || c.peer_no_send {
                    DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                    self.kill(key);
                    return;
                }
                if payload.len() > c.pending_room() {
                    log::debug!("vsock: guest overran its credit on port {}", key.local_port);
                    DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                    self.kill(key);
                    return;
                }
                DeviceMetrics::add(&self.metrics.bytes_from_guest, payload.len() as u64);
                if let Err(e) = c.push_to_host(payload) {
                    log::debug!("vsock: host socket for port {}: {e}", key.local_port);
                    DeviceMetrics::add(&self.metrics.io_errors, 1);
                    self.kill(key);
                    return;
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST if !c.credit_update_queued => {
                c.credit_update_queued = true;
                self.ctrl.push_back(Ctrl::Conn {
                    key,
                    op: OP_CREDIT_UPDATE,
                    flags: 0,
                });
            }
            OP_SHUTDOWN => {
                c.peer_no_recv |= hdr.flags & SHUTDOWN_RCV != 0;
                c.peer_no_send |= hdr.flags & SHUTDOWN_SEND != 0;
            }
            OP_RST => {
                self.remove(key);
                return;
            }
            _ => {}
        }
        self.sync(key);
    }

    fn guest_connect(&mut self, hdr: &Header, key: ConnKey) {
        if self.conns.len() + self.clients.len() >= MAX_CONNECTIONS {
            self.reply_rst(hdr);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", hdr.dst_port));
        let stream = match connect_nonblocking(path.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                log::debug!(
                    "vsock: guest connect to {}: {e}",
                    PathBuf::from(&path).display()
                );
                self.reply_rst(hdr);
                return;
            }
        };
        let token = self.new_token();
        let mut c = Connection::new(stream, token, key, self.guest_cid, State::Established);
        c.update_peer_credit(hdr);
        self.conns.insert(key, c);
        self.tokens.insert(token, key);
        self.ctrl.push_back(Ctrl::Conn {
            key,
            op: OP_RESPONSE,
            flags: 0,
        });
        self.sync(key);
    }

    // ---- RX: packets to the guest ----

    fn fill_rx(&mut self) -> bool {
        let mem = self.mem.clone();
        let mut used = false;
        while !self.ctrl.is_empty() || !self.rx_ready.is_empty() {
            let Some(chain) = self.rxq.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match Writer::new(&*mem, chain) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => match self.next_packet(&mut w) {
                    Some(len) => len,
                    None => {
                        // Nothing to send after all: give the buffer back.
                        self.rxq.go_to_previous_position();
                        break;
                    }
                },
                _ => {
                    DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                    0
                }
            };
            if self.rxq.add_used(&*mem, head, len as u32).is_err() {
                DeviceMetrics::add(&self.metrics.invalid_requests, 1);
            }
            used = true;
        }
        used
    }

    /// Writes the next packet for the guest into `w`; returns its length, or
    /// None when there is nothing to send.
    fn next_packet(&mut self, w: &mut ChainWriter<'_>) -> Option<usize> {
        loop {
            if let Some(ctrl) = self.ctrl.pop_front() {
                let hdr = match ctrl {
                    Ctrl::Raw(h) => h,
                    Ctrl::Conn { key, op, flags } => {
                        let Some(c) = self.conns.get_mut(&key) else {
                            continue;
                        };
                        if op == OP_CREDIT_UPDATE {
                            c.credit_update_queued = false;
                        }
                        let sent_request = op == OP_REQUEST && c.state == State::LocalInit(None);
                        if sent_request {
                            c.state = State::LocalInit(Some(Instant::now()));
                        }
                        let h = c.header(op, flags, 0);
                        if sent_request {
                            self.arm_timer(CONNECT_TIMEOUT);
                        }
                        h
                    }
                };
                if w.write_all(&hdr.to_bytes()).is_err() {
                    DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                    return Some(0);
                }
                return Some(HDR_LEN);
            }
            let key = self.rx_ready.pop_front()?;
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.rx_queued = false;
            if !c.wants_rx() {
                if c.host_readable && c.peer_credit() == 0 && !c.credit_requested && !c.peer_no_recv
                {
                    c.credit_requested = true;
                    self.ctrl.push_back(Ctrl::Conn {
                        key,
                        op: OP_CREDIT_REQUEST,
                        flags: 0,
                    });
                }
                continue;
            }
            let room = w.available_bytes() - HDR_LEN;
            let max = room.min(c.peer_credit() as usize).min(MAX_PKT_PAYLOAD);
            if max == 0 {
                // A buffer with room for a header only: useless for data.
                c.rx_queued = true;
                self.rx_ready.push_front(key);
                DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                return Some(0);
            }
            match c.read_host(&mut self.buf[..max]) {
                Ok(0) => {
                    c.host_eof = true;
                    c.host_readable = false;
                    let flags = SHUTDOWN_SEND | if c.host_hup { SHUTDOWN_RCV } else { 0 };
                    self.ctrl.push_back(Ctrl::Conn {
                        key,
                        op: OP_SHUTDOWN,
                        flags,
                    });
                    self.sync(key);
                }
                Ok(n) => {
                    let hdr = c.header(OP_RW, 0, n as u32);
                    c.rx_cnt = c.rx_cnt.wrapping_add(n as u32);
                    let ok =
                        w.write_all(&hdr.to_bytes()).is_ok() && w.write_all(&self.buf[..n]).is_ok();
                    if !ok {
                        DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                        self.kill(key);
                        return Some(0);
                    }
                    DeviceMetrics::add(&self.metrics.bytes_to_guest, n as u64);
                    DeviceMetrics::add(&self.metrics.reads, 1);
                    self.sync(key);
                    return Some(HDR_LEN + n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.host_readable = false;
                    self.sync(key);
                }
                Err(e) => {
                    log::debug!(
                        "vsock: reading host socket for port {}: {e}",
                        key.local_port
                    );
                    DeviceMetrics::add(&self.metrics.io_errors, 1);
                    self.kill(key);
                }
            }
        }
    }

    // ---- host side ----

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.clients.len() >= MAX_CONNECTIONS {
                        log::warn!("vsock: too many connections, refusing a host client");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let token = self.new_token();
                    let ev = EpollEvent::new(EventSet::IN, token);
                    if self
                        .epoll
                        .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                        .is_ok()
                    {
                        self.clients.insert(
                            token,
                            Client {
                                stream,
                                line: vec![],
                            },
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    // Out of fds or similar: the listener would stay ready and
                    // spin the worker, so stop watching it for a while.
                    log::warn!("vsock: accept: {e}");
                    let fd = self.listener.as_raw_fd();
                    let _ = self
                        .epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    self.listener_paused = true;
                    self.arm_timer(ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    fn on_client_readable(&mut self, token: u64) {
        let Some(client) = self.clients.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match client.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) if client.line.len() < MAX_CONNECT_LINE => client.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    // EOF, error or an overlong line.
                    self.clients.remove(&token);
                    return;
                }
            }
        }
        let Some(client) = self.clients.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            client.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let Some(port) = parse_connect(&client.line) else {
            log::debug!(
                "vsock: bad handshake {:?}",
                String::from_utf8_lossy(&client.line)
            );
            return;
        };
        let Some(local_port) = self.alloc_local_port() else {
            log::warn!("vsock: no free local port");
            return;
        };
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        let c = Connection::new(
            client.stream,
            token,
            key,
            self.guest_cid,
            State::LocalInit(None),
        );
        self.conns.insert(key, c);
        self.tokens.insert(token, key);
        self.ctrl.push_back(Ctrl::Conn {
            key,
            op: OP_REQUEST,
            flags: 0,
        });
    }

    fn on_conn_event(&mut self, key: ConnKey, ev: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if ev.contains(EventSet::HANG_UP) {
            c.host_hup = true;
        }
        let registered = c.registered.unwrap_or(EventSet::empty());
        if registered.contains(EventSet::IN)
            && ev.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
        {
            c.host_readable = true;
        }
        if !c.pending.is_empty()
            && ev.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR)
        {
            if let Err(e) = c.flush() {
                log::debug!(
                    "vsock: writing host socket for port {}: {e}",
                    key.local_port
                );
                DeviceMetrics::add(&self.metrics.io_errors, 1);
                self.kill(key);
                return;
            }
        }
        self.sync(key);
    }

    fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.timer_armed = false;
        if self.listener_paused && self.held_until.is_none() {
            let ev = EpollEvent::new(EventSet::IN, LISTENER_TOKEN);
            let fd = self.listener.as_raw_fd();
            if self.epoll.ctl(ControlOperation::Add, fd, ev).is_ok() {
                self.listener_paused = false;
            } else {
                self.arm_timer(ACCEPT_RETRY);
            }
        }
        let now = Instant::now();
        let mut expired = vec![];
        let mut next: Option<Duration> = None;
        for (key, c) in &self.conns {
            if let State::LocalInit(Some(t)) = c.state {
                let age = now.saturating_duration_since(t);
                if age >= CONNECT_TIMEOUT {
                    expired.push(*key);
                } else {
                    let left = CONNECT_TIMEOUT - age;
                    next = Some(next.map_or(left, |n| n.min(left)));
                }
            }
        }
        for key in expired {
            log::debug!(
                "vsock: guest did not answer connect to port {}",
                key.peer_port
            );
            self.kill(key);
        }
        if let Some(t) = self.held_until {
            let left = t.saturating_duration_since(now);
            if !left.is_zero() {
                next = Some(next.map_or(left, |n| n.min(left)));
            }
        }
        if let Some(d) = next {
            self.arm_timer(d);
        }
    }

    fn arm_timer(&mut self, d: Duration) {
        if !self.timer_armed && self.timer.reset(d, None).is_ok() {
            self.timer_armed = true;
        }
    }

    // ---- connection bookkeeping ----

    /// Brings a connection's side effects up to date after any change:
    /// half-close towards the host, full close, credit updates, RX
    /// scheduling and epoll interest.
    fn sync(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.pending.is_empty() && c.peer_no_send {
            if c.peer_no_recv {
                // The guest closed its socket and everything reached the host.
                self.kill(key);
                return;
            }
            if !c.host_write_shut {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                c.host_write_shut = true;
            }
        }
        if c.state == State::Established
            && !c.peer_no_send
            && !c.credit_update_queued
            && c.needs_credit_update()
        {
            c.credit_update_queued = true;
            self.ctrl.push_back(Ctrl::Conn {
                key,
                op: OP_CREDIT_UPDATE,
                flags: 0,
            });
        }
        if !c.rx_queued
            && (c.wants_rx() || (c.host_readable && c.peer_credit() == 0 && !c.credit_requested))
        {
            c.rx_queued = true;
            self.rx_ready.push_back(key);
        }
        let want = c.desired_events();
        let fd = c.stream.as_raw_fd();
        let op = match (c.registered, want.is_empty()) {
            (None, true) => return,
            (None, false) => ControlOperation::Add,
            (Some(_), true) => ControlOperation::Delete,
            (Some(r), false) if r == want => return,
            (Some(_), false) => ControlOperation::Modify,
        };
        match self.epoll.ctl(op, fd, EpollEvent::new(want, c.token)) {
            Ok(()) => c.registered = (!want.is_empty()).then_some(want),
            Err(e) => {
                log::error!("vsock: epoll_ctl: {e}");
                self.kill(key);
            }
        }
    }

    /// Drops a connection and tells the guest with OP_RST.
    fn kill(&mut self, key: ConnKey) {
        if let Some(mut c) = self.conns.remove(&key) {
            self.ctrl.push_back(Ctrl::Raw(c.header(OP_RST, 0, 0)));
            self.tokens.remove(&c.token);
        }
    }

    /// Drops a connection silently (the guest reset it).
    fn remove(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            self.tokens.remove(&c.token);
        }
    }

    fn reply_rst(&mut self, hdr: &Header) {
        if hdr.op == OP_RST {
            return;
        }
        self.ctrl.push_back(Ctrl::Raw(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }));
    }

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// A host port no live connection uses (so no key can collide).
    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|k| k.local_port == p) {
                return Some(p);
            }
        }
        None
    }
}
