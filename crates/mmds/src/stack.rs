//! The guest's path to the MMDS on one interface.
//!
//! The net device offers every frame the guest sends to [`MmdsStack::take`]
//! first. ARP requests for the MMDS address are answered here (from the
//! MMDS MAC, whatever the asker's subnet); IPv4 packets to the address are
//! taken off the interface (they never reach the TAP): TCP to port 80 goes
//! to a smoltcp interface (IP medium) whose sockets carry the HTTP
//! exchanges, anything else is dropped, as in Firecracker. Answers are
//! Ethernet frames addressed to the MAC that last spoke to the MMDS; the
//! device delivers them like packets from the TAP ([`MmdsStack::pop`]).
//!
//! All progress is driven by guest frames: no timers. Replies wait here for
//! RX buffers (at most a socket's send buffer per connection, since a
//! request is read only once the previous answer is in the socket), ACKs
//! are not delayed and Nagle is off, so nothing waits for a timer.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::Arc;

use kiln_api::http::{Event, RequestParser, CONTINUE};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpCidr, IpProtocol, Ipv4Packet, TcpPacket,
};

use crate::guest::{answer, Answer};
use crate::Mmds;

/// The MMDS's MAC address (Firecracker's).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// The MMDS's TCP port.
pub const HTTP_PORT: u16 = 80;
/// Concurrent guest connections per interface.
const SOCKETS: usize = 8;
/// Largest guest request head, bytes; a longer one resets the connection.
const MAX_REQUEST: usize = 2500;
const RX_BUF: usize = 4096;
const TX_BUF: usize = 16384;
/// Frames kept for the guest at most (beyond that the oldest are dropped;
/// TCP sends them again).
const MAX_QUEUED: usize = 512;
const MTU: usize = 1500;

/// IP packets between smoltcp and [`MmdsStack`].
#[derive(Default)]
struct Packets {
    to_stack: VecDeque<Vec<u8>>,
    from_stack: VecDeque<Vec<u8>>,
}

struct Rx(Vec<u8>);
struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl phy::Device for Packets {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let p = self.to_stack.pop_front()?;
        Some((Rx(p), Tx(&mut self.from_stack)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.from_stack))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ip;
        c.max_transmission_unit = MTU;
        c
    }
}

/// One socket and its HTTP exchange.
struct Conn {
    handle: SocketHandle,
    parser: RequestParser,
    /// When the guest last sent on it (ms since the stack started).
    last_active: u64,
    /// Answer bytes not yet in the socket.
    out: Vec<u8>,
    close_after: bool,
}

/// The MMDS endpoint of one interface.
pub struct MmdsStack {
    mmds: Arc<Mmds>,
    ip: Ipv4Addr,
    iface: Interface,
    dev: Packets,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    frames: VecDeque<Vec<u8>>,
    guest_mac: EthernetAddress,
    epoch: std::time::Instant,
}

fn listening_socket() -> tcp::Socket<'static> {
    let mut s = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; RX_BUF]),
        tcp::SocketBuffer::new(vec![0; TX_BUF]),
    );
    s.set_ack_delay(None);
    s.set_nagle_enabled(false);
    // A listening socket on a fresh socket never fails.
    let _ = s.listen(HTTP_PORT);
    s
}

fn seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `b`.
    let _ = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    u64::from_ne_bytes(b) ^ std::process::id() as u64
}

impl MmdsStack {
    /// The endpoint for `mmds` at its configured address.
    pub fn new(mmds: Arc<Mmds>) -> Self {
        let ip = mmds.settings().ipv4;
        let mut dev = Packets::default();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = seed();
        let epoch = std::time::Instant::now();
        let mut iface = Interface::new(config, &mut dev, SmolInstant::from_micros(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(ip.into(), 32));
        });
        // Answers go back to whoever asked, wherever its subnet: with the IP
        // medium the gateway is never resolved.
        let _ = iface.routes_mut().add_default_ipv4_route(ip);
        let mut sockets = SocketSet::new(Vec::new());
        let conns = (0..SOCKETS)
            .map(|_| Conn::new(sockets.add(listening_socket())))
            .collect();
        Self {
            mmds,
            ip,
            iface,
            dev,
            sockets,
            conns,
            frames: VecDeque::new(),
            guest_mac: EthernetAddress([0xff; 6]),
            epoch,
        }
    }

    /// Offers a frame the guest sent (Ethernet, without the virtio-net
    /// header). Returns whether it was for the MMDS (then it is consumed).
    pub fn take(&mut self, frame: &[u8]) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return false;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => self.arp(&eth),
            EthernetProtocol::Ipv4 => {
                let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                    return false;
                };
                if ip.dst_addr() != self.ip {
                    return false;
                }
                let tcp = (ip.next_header() == IpProtocol::Tcp
                    && !ip.more_frags()
                    && ip.frag_offset() == 0)
                    .then(|| TcpPacket::new_checked(ip.payload()).ok())
                    .flatten()
                    .filter(|t| t.dst_port() == HTTP_PORT);
                if let Some(t) = tcp {
                    if t.syn() && !t.ack() {
                        // A new connection: make room if none is listening.
                        self.reclaim();
                    }
                    self.guest_mac = eth.src_addr();
                    let len = usize::from(ip.total_len()).min(eth.payload().len());
                    self.dev.to_stack.push_back(eth.payload()[..len].to_vec());
                    self.poll();
                }
                true
            }
            _ => false,
        }
    }

    fn arp(&mut self, eth: &EthernetFrame<&[u8]>) -> bool {
        let Ok(repr) = ArpPacket::new_checked(eth.payload()).and_then(|p| ArpRepr::parse(&p))
        else {
            return false;
        };
        let ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        } = repr
        else {
            return false;
        };
        if target_protocol_addr != self.ip {
            return false;
        }
        if operation == ArpOperation::Request && source_hardware_addr.is_unicast() {
            let reply = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: EthernetAddress(MMDS_MAC),
                source_protocol_addr: target_protocol_addr,
                target_hardware_addr: source_hardware_addr,
                target_protocol_addr: source_protocol_addr,
            };
            let mut buf = vec![0u8; 14 + reply.buffer_len()];
            let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
            EthernetRepr {
                src_addr: EthernetAddress(MMDS_MAC),
                dst_addr: source_hardware_addr,
                ethertype: EthernetProtocol::Arp,
            }
            .emit(&mut f);
            reply.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
            self.push_frame(buf);
        }
        true
    }

    fn push_frame(&mut self, f: Vec<u8>) {
        if self.frames.len() >= MAX_QUEUED {
            self.frames.pop_front();
        }
        self.frames.push_back(f);
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Runs the TCP/IP stack and the HTTP exchanges until nothing moves.
    fn poll(&mut self) {
        for _ in 0..64 {
            let now = self.now();
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            let mut moved = false;
            let ms = self.epoch.elapsed().as_millis() as u64;
            for c in &mut self.conns {
                moved |= c.service(&mut self.sockets, &self.mmds, ms);
            }
            let sent = !self.dev.from_stack.is_empty();
            while let Some(p) = self.dev.from_stack.pop_front() {
                let mut buf = vec![0u8; 14 + p.len()];
                let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
                EthernetRepr {
                    src_addr: EthernetAddress(MMDS_MAC),
                    dst_addr: self.guest_mac,
                    ethertype: EthernetProtocol::Ipv4,
                }
                .emit(&mut f);
                f.payload_mut().copy_from_slice(&p);
                self.push_frame(buf);
            }
            if !moved && !sent && self.dev.to_stack.is_empty() {
                break;
            }
        }
    }

    /// With no socket left listening, gives one up for the next guest
    /// connection: first one that has sent everything and waits only for
    /// the guest's FIN, else the quiet one idle the longest (an open
    /// connection the guest forgot, or a handshake it never finished).
    /// Nothing here runs on a timer, so without this a guest that went away
    /// would hold its sockets for ever.
    fn reclaim(&mut self) {
        use tcp::State::*;
        let sockets = &self.sockets;
        let state = |c: &Conn| sockets.get::<tcp::Socket>(c.handle).state();
        if self.conns.iter().any(|c| state(c) == Listen) {
            return;
        }
        let closing = self.conns.iter().position(|c| {
            c.out.is_empty() && matches!(state(c), FinWait2 | TimeWait | Closing | LastAck | Closed)
        });
        let victim = closing.or_else(|| {
            self.conns
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    let s = sockets.get::<tcp::Socket>(c.handle);
                    s.state() == SynReceived || c.quiet(s)
                })
                .min_by_key(|(_, c)| c.last_active)
                .map(|(i, _)| i)
        });
        if let Some(i) = victim {
            let c = &mut self.conns[i];
            let h = c.handle;
            *c = Conn::new(h);
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            // The guest learns with a reset if it ever sends on it again.
            s.abort();
            *s = listening_socket();
        }
    }

    /// The next frame for the guest (Ethernet, without the virtio-net
    /// header).
    pub fn pop(&mut self) -> Option<Vec<u8>> {
        self.frames.pop_front()
    }

    /// Whether frames wait for the guest.
    pub fn has_output(&self) -> bool {
        !self.frames.is_empty()
    }
}

impl Conn {
    fn new(handle: SocketHandle) -> Self {
        Self {
            handle,
            parser: RequestParser::new(MAX_REQUEST),
            last_active: 0,
            out: Vec::new(),
            close_after: false,
        }
    }

    /// Moves request bytes in and answer bytes out; recycles the socket
    /// once its connection is over. Returns whether anything moved.
    ///
    /// A request is read only once the previous answer has gone into the
    /// socket: a guest that sends requests without reading the answers
    /// fills its own window, not the VMM's memory.
    fn service(&mut self, sockets: &mut SocketSet<'static>, mmds: &Mmds, now: u64) -> bool {
        let s = sockets.get_mut::<tcp::Socket>(self.handle);
        let mut moved = false;
        match s.state() {
            tcp::State::Closed | tcp::State::TimeWait => {
                *self = Conn::new(self.handle);
                *s = listening_socket();
                return true;
            }
            tcp::State::Listen | tcp::State::SynReceived => return false,
            _ => {}
        }
        let mut buf = [0u8; 1024];
        loop {
            moved |= self.flush(s);
            if !self.out.is_empty() {
                break;
            }
            if self.close_after {
                // After `Connection: close`, input is ignored.
                while s.recv_slice(&mut buf).is_ok_and(|n| n > 0) {}
                break;
            }
            match self.parser.next_event() {
                Some(Event::Request(req)) => {
                    let a = answer(mmds, &req);
                    self.close_after = !req.keep_alive;
                    self.out.extend(a.to_bytes(!req.keep_alive));
                    moved = true;
                }
                Some(Event::Continue) => self.out.extend_from_slice(CONTINUE),
                Some(Event::Error(_)) => {
                    self.out
                        .extend(Answer::text(400, "Invalid request.").to_bytes(true));
                    self.close_after = true;
                }
                None if self.parser.buffered() > MAX_REQUEST => {
                    // Firecracker resets a connection whose request does
                    // not fit.
                    s.abort();
                    return true;
                }
                None => match s.recv_slice(&mut buf) {
                    Ok(n) if n > 0 => {
                        self.parser.feed(&buf[..n]);
                        self.last_active = now;
                        moved = true;
                    }
                    _ => break,
                },
            }
        }
        if self.out.is_empty() && self.close_after && s.may_send() {
            s.close();
            moved = true;
        }
        if !s.may_recv() && s.may_send() && self.out.is_empty() && !self.close_after {
            // The guest closed its side and has every answer: close ours.
            s.close();
            moved = true;
        }
        moved
    }

    /// Puts as much of the pending answer into the socket as fits.
    fn flush(&mut self, s: &mut tcp::Socket) -> bool {
        if self.out.is_empty() || !s.can_send() {
            return false;
        }
        match s.send_slice(&self.out) {
            Ok(n) if n > 0 => {
                self.out.drain(..n);
                true
            }
            _ => false,
        }
    }

    /// Whether the connection waits for nothing from the VMM: an answer is
    /// not being sent and no request is half received.
    fn quiet(&self, s: &tcp::Socket) -> bool {
        self.out.is_empty() && self.parser.is_idle() && s.send_queue() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::models::{MmdsConfig, MmdsVersion};
    use serde_json::json;
    use smoltcp::wire::IpAddress;

    /// An Ethernet device for a smoltcp "guest".
    #[derive(Default)]
    struct Wire {
        rx: VecDeque<Vec<u8>>,
        tx: VecDeque<Vec<u8>>,
    }

    impl phy::Device for Wire {
        type RxToken<'a> = Rx;
        type TxToken<'a> = Tx<'a>;
        fn receive(&mut self, _: SmolInstant) -> Option<(Rx, Tx<'_>)> {
            let p = self.rx.pop_front()?;
            Some((Rx(p), Tx(&mut self.tx)))
        }
        fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
            Some(Tx(&mut self.tx))
        }
        fn capabilities(&self) -> DeviceCapabilities {
            let mut c = DeviceCapabilities::default();
            c.medium = Medium::Ethernet;
            c.max_transmission_unit = MTU + 14;
            c
        }
    }

    struct Guest {
        iface: Interface,
        wire: Wire,
        sockets: SocketSet<'static>,
        stack: MmdsStack,
        t: i64,
        /// Frames the stack did not take.
        passed: usize,
    }

    impl Guest {
        fn new(version: MmdsVersion) -> Self {
            let m = Mmds::new(crate::DEFAULT_SIZE_LIMIT);
            m.configure(MmdsConfig {
                version,
                network_interfaces: vec!["eth0".into()],
                ipv4_address: None,
                imds_compat: false,
            });
            m.store()
                .put(json!({"latest": {"meta-data": {"id": "i-42", "big": "x".repeat(40000)}}}))
                .unwrap();
            let mut wire = Wire::default();
            let config = Config::new(HardwareAddress::Ethernet(EthernetAddress([
                0x02, 0, 0, 0, 0, 7,
            ])));
            let mut iface = Interface::new(config, &mut wire, SmolInstant::from_micros(0));
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::v4(169, 254, 10, 2), 16));
            });
            Self {
                iface,
                wire,
                sockets: SocketSet::new(Vec::new()),
                stack: MmdsStack::new(Arc::new(m)),
                t: 0,
                passed: 0,
            }
        }

        fn step(&mut self) {
            self.t += 1000;
            self.iface.poll(
                SmolInstant::from_micros(self.t),
                &mut self.wire,
                &mut self.sockets,
            );
            while let Some(f) = self.wire.tx.pop_front() {
                if !self.stack.take(&f) {
                    self.passed += 1;
                }
            }
            while let Some(f) = self.stack.pop() {
                self.wire.rx.push_back(f);
            }
        }

        /// Sends `req` on a new connection from `port`; what comes back
        /// until the stack closes the connection.
        fn exchange(&mut self, port: u16, req: &str) -> String {
            self.exchange_then(port, req, false)
        }

        /// [`Self::exchange`]; `vanish`: the guest forgets the connection
        /// without sending its FIN.
        fn exchange_then(&mut self, port: u16, req: &str, vanish: bool) -> String {
            let mut s = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 65536]),
                tcp::SocketBuffer::new(vec![0; 8192]),
            );
            s.set_ack_delay(None);
            let h = self.sockets.add(s);
            let cx = self.iface.context();
            self.sockets
                .get_mut::<tcp::Socket>(h)
                .connect(cx, (IpAddress::v4(169, 254, 169, 254), 80), port)
                .unwrap();
            let mut sent = false;
            let mut got = Vec::new();
            for _ in 0..2000 {
                self.step();
                let s = self.sockets.get_mut::<tcp::Socket>(h);
                if !sent && s.may_send() {
                    s.send_slice(req.as_bytes()).unwrap();
                    sent = true;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.recv_slice(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                if sent && !s.may_recv() {
                    s.close();
                    break;
                }
            }
            if !vanish {
                for _ in 0..5 {
                    self.step();
                }
            }
            self.sockets.remove(h);
            String::from_utf8(got).unwrap()
        }
    }

    #[test]
    fn a_guest_tcp_stack_reaches_the_mmds_over_arp_and_tcp() {
        let mut g = Guest::new(MmdsVersion::V1);
        let a = g.exchange(
            40000,
            "GET /latest/meta-data/id HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.ends_with("\r\n\r\ni-42"), "{a}");
        // A 40 kB answer crosses several windows of the guest's socket.
        let a = g.exchange(
            40001,
            "GET /latest/meta-data/big HTTP/1.1\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        );
        assert!(a.contains("Content-Type: application/json"), "{a:.200}");
        assert!(
            a.ends_with(&format!("\"{}\"", "x".repeat(40000))),
            "{}",
            a.len()
        );
        // More connections than sockets, one after another: sockets are
        // recycled.
        for p in 0..(2 * SOCKETS as u16) {
            let a = g.exchange(41000 + p, "GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n");
            assert!(a.starts_with("HTTP/1.1 404"), "{a}");
        }
        // A guest that forgets its connections without a FIN does not use
        // the sockets up either.
        for p in 0..(2 * SOCKETS as u16) {
            let a = g.exchange_then(
                42000 + p,
                "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
                true,
            );
            assert!(a.ends_with("\r\n\r\nlatest/"), "{p}: {a}");
        }
        assert_eq!(g.passed, 0, "every frame to the MMDS was taken");
    }

    /// Opens a connection from `port` and sends `req` (if any) without
    /// ever reading; returns its handle.
    fn open(g: &mut Guest, port: u16, req: &[u8], rx: usize) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; rx]),
            tcp::SocketBuffer::new(vec![0; 65536]),
        );
        s.set_ack_delay(None);
        let h = g.sockets.add(s);
        let cx = g.iface.context();
        g.sockets
            .get_mut::<tcp::Socket>(h)
            .connect(cx, (IpAddress::v4(169, 254, 169, 254), 80), port)
            .unwrap();
        let mut sent = 0;
        for _ in 0..300 {
            g.step();
            let s = g.sockets.get_mut::<tcp::Socket>(h);
            if s.may_send() && sent < req.len() {
                sent += s.send_slice(&req[sent..]).unwrap();
            }
        }
        h
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_vmm() {
        let mut g = Guest::new(MmdsVersion::V1);
        // 1,000 pipelined requests for a 40 kB value, nothing read.
        let req = "GET /latest/meta-data/big HTTP/1.1\r\n\r\n".repeat(1000);
        let _h = open(&mut g, 40000, req.as_bytes(), 2048);
        let held: usize = g
            .stack
            .conns
            .iter()
            .map(|c| c.out.len() + c.parser.buffered())
            .sum();
        assert!(held < 64 * 1024, "{held} bytes held for one connection");
        assert!(
            g.stack.frames.len() < 64,
            "{} frames queued",
            g.stack.frames.len()
        );
    }

    #[test]
    fn idle_connections_give_way_to_new_ones() {
        let mut g = Guest::new(MmdsVersion::V1);
        // Every socket taken by a connection that sends nothing.
        let idle: Vec<_> = (0..SOCKETS as u16)
            .map(|p| open(&mut g, 43000 + p, b"", 4096))
            .collect();
        let a = g.exchange(
            44000,
            "GET /latest/meta-data/id HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(a.ends_with("i-42"), "{a}");
        drop(idle);
    }

    #[test]
    fn v2_token_round_trip_and_bad_requests() {
        let mut g = Guest::new(MmdsVersion::V2);
        let a = g.exchange(
            40000,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n",
        );
        let token = a.rsplit("\r\n\r\n").next().unwrap().to_string();
        assert!(a.starts_with("HTTP/1.1 200"), "{a}");
        let a = g.exchange(
            40001,
            "GET /latest/meta-data/id HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(a.starts_with("HTTP/1.1 401"), "{a}");
        let a = g.exchange(
            40002,
            &format!("GET /latest/meta-data/id HTTP/1.1\r\nX-metadata-token: {token}\r\nConnection: close\r\n\r\n"),
        );
        assert!(a.ends_with("i-42"), "{a}");
        let a = g.exchange(40003, "NOT HTTP\r\n\r\n");
        assert!(a.starts_with("HTTP/1.1 400"), "{a}");
        // An oversized head resets the connection: nothing comes back.
        let long = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "p".repeat(3000));
        assert_eq!(g.exchange(40004, &long), "");
    }

    #[test]
    fn other_traffic_is_left_alone_or_dropped() {
        let mut s = MmdsStack::new(Arc::new(Mmds::new(1024)));
        // ARP for another address: not ours.
        let arp = |target: [u8; 4]| {
            let r = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Request,
                source_hardware_addr: EthernetAddress([2, 0, 0, 0, 0, 9]),
                source_protocol_addr: Ipv4Addr::new(10, 0, 0, 2),
                target_hardware_addr: EthernetAddress([0; 6]),
                target_protocol_addr: Ipv4Addr::from(target),
            };
            let mut buf = vec![0u8; 14 + r.buffer_len()];
            let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
            EthernetRepr {
                src_addr: EthernetAddress([2, 0, 0, 0, 0, 9]),
                dst_addr: EthernetAddress([0xff; 6]),
                ethertype: EthernetProtocol::Arp,
            }
            .emit(&mut f);
            r.emit(&mut ArpPacket::new_unchecked(f.payload_mut()));
            buf
        };
        assert!(!s.take(&arp([10, 0, 0, 1])));
        assert!(!s.has_output());
        // ARP for the MMDS from another subnet: answered from the MMDS MAC.
        assert!(s.take(&arp([169, 254, 169, 254])));
        let reply = s.pop().unwrap();
        let f = EthernetFrame::new_checked(&reply[..]).unwrap();
        assert_eq!(f.src_addr(), EthernetAddress(MMDS_MAC));
        assert_eq!(f.dst_addr(), EthernetAddress([2, 0, 0, 0, 0, 9]));
        // Garbage and short frames are not ours.
        assert!(!s.take(&[0u8; 5]));
        assert!(!s.take(&[0xffu8; 60]));
    }
}
