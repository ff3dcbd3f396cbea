//! virtio-net backed by a Linux TAP device: one RX and one TX queue, the
//! virtio 1.x net header (`virtio_net_hdr_v1`, 12 bytes) passed through the
//! TAP (IFF_VNET_HDR), no offloads, no mergeable RX buffers.
//!
//! The worker thread waits on the two queue eventfds and on the TAP
//! (edge-triggered). TX copies each chain (header + frame) out of guest memory
//! and writes it to the TAP in one write. RX pops a buffer first and only then
//! reads a frame from the TAP, so when the guest has no buffers the frames stay
//! queued in the kernel until the guest adds buffers and kicks the RX queue.

use crate::{ChainReader, GuestMem};
use kiln_seccomp::ThreadKind;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    virtio_net_hdr_v1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmm_sys_util::epoll::EventSet;

use super::live::Live;
use super::worker::{Next, Worker};
use super::{
    read_config_bytes, ActivateContext, ActivateError, DeviceMetrics, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::rate_limiter::{self, RateLimiter, RateLimiterConfig, RateLimiterUpdate};

/// Size of the virtio net header (`virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize = std::mem::size_of::<virtio_net_hdr_v1>();
/// Largest packet (net header + Ethernet frame) the device moves either way.
pub const MAX_PACKET: usize = 65562;
const ETH_HLEN: usize = 14;
const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: u64 = 0;
const TX_QUEUE: u64 = 1;
const TAP: u64 = 2;
const RX_LIMITER: u64 = 3;
const TX_LIMITER: u64 = 4;
/// [`NetHandle::update`] changed a limiter.
const UPDATE: u64 = 5;
const IFNAMSIZ: usize = 16;

const _: () = assert!(VNET_HDR_LEN == 12);

/// A network interface to attach.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// Name of the host TAP device (created by the kernel if it does not
    /// exist and the VMM may create it).
    pub tap: String,
    /// The guest's MAC address; `None` derives a stable, locally
    /// administered one from `tap` and `id`.
    pub mac: Option<[u8; 6]>,
    /// The interface's ID (for logs and the generated MAC).
    pub id: String,
    /// Limits on what the guest receives (bandwidth: Ethernet frame bytes,
    /// without the virtio-net header; ops: frames). `None`: unlimited.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on what the guest sends, counted the same way.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// The metadata service, when this interface may reach it: the guest's
    /// frames to its address are answered by the VMM, not sent to the TAP.
    pub mmds: Option<Arc<kiln_mmds::Mmds>>,
}

/// Errors setting up a network interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP name is not a valid interface name.
    #[error("invalid TAP name {tap:?}: it must be 1 to 15 bytes without '/', ' ' or NUL")]
    Name {
        /// The name.
        tap: String,
    },
    /// The MAC address is multicast or all zeros.
    #[error("network {id}: MAC {mac} is not a unicast address")]
    Mac {
        /// Interface ID.
        id: String,
        /// The MAC, formatted.
        mac: String,
    },
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun for TAP {tap}: {source} (is the tun module loaded?)")]
    TunDevice {
        /// The TAP name.
        tap: String,
        /// OS error.
        source: io::Error,
    },
    /// The TAP cannot be attached or configured.
    #[error("cannot open TAP {tap}: {op}: {source}{hint}", hint = tap_hint(.tap, .source))]
    Tap {
        /// The TAP name.
        tap: String,
        /// The failing step.
        op: &'static str,
        /// OS error.
        source: io::Error,
    },
}

fn tap_hint(tap: &str, e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => format!(
            " (create it first, e.g. `ip tuntap add {tap} mode tap user $USER`, or run as root)"
        ),
        Some(libc::EBUSY) => " (another process is attached to it)".into(),
        Some(libc::EINVAL) => " (is it a TAP, not a TUN, and without multi_queue?)".into(),
        _ => String::new(),
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags, padded to
/// the kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

/// Opens TAP `name` (non-blocking, with a 12-byte vnet header); returns the
/// file and the interface's name as the kernel reports it.
fn open_tap(name: &str) -> Result<(File, String), NetError> {
    if name.is_empty()
        || name.len() >= IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
    {
        return Err(NetError::Name { tap: name.into() });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|source| NetError::TunDevice {
            tap: name.into(),
            source,
        })?;
    let tap_err = |op| NetError::Tap {
        tap: name.into(),
        op,
        source: io::Error::last_os_error(),
    };
    let mut ifr = IfReq {
        name: [0; IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    ifr.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes back a 40-byte `struct ifreq`; `ifr`
    // is exactly that layout and outlives the call. The fd is ours.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(tap_err("TUNSETIFF"));
    }
    let hdr_len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which points
    // at `hdr_len`, alive for the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(tap_err("TUNSETVNETHDRSZ"));
    }
    let len = ifr.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
    let actual = String::from_utf8_lossy(&ifr.name[..len]).into_owned();
    Ok((file, actual))
}

/// Parses `aa:bb:cc:dd:ee:ff` (hex, case-insensitive).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// A stable, locally administered unicast MAC derived from the TAP name and
/// the interface ID (FNV-1a).
pub fn generated_mac(tap: &str, id: &str) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tap.bytes().chain([0]).chain(id.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// The rate limiters in effect (no buckets: unlimited), which
/// [`NetHandle::update`] changes while the VM runs.
#[derive(Clone, Copy, Default)]
struct NetLive {
    rx: RateLimiterConfig,
    tx: RateLimiterConfig,
}

/// Changes an interface's rate limiters while the VM runs
/// (`PATCH /network-interfaces/{id}`); cheap to clone.
#[derive(Clone)]
pub struct NetHandle {
    live: Arc<Live<NetLive>>,
    id: String,
}

impl NetHandle {
    /// The interface's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The RX and TX limiters in effect.
    pub fn rate_limiters(&self) -> (RateLimiterConfig, RateLimiterConfig) {
        self.live.with(|l| (l.rx, l.tx))
    }

    /// Changes the RX and/or TX limiter; returns once the device's worker
    /// uses them (or at once if the device is not active yet).
    pub fn update(&self, rx: Option<&RateLimiterUpdate>, tx: Option<&RateLimiterUpdate>) {
        let r: Result<(), std::convert::Infallible> = self.live.update(|l| {
            if let Some(u) = rx {
                l.rx.apply_update(u);
            }
            if let Some(u) = tx {
                l.tx.apply_update(u);
            }
            Ok(())
        });
        let Ok(()) = r;
    }
}

/// The virtio-net device.
pub struct Net {
    config: NetConfig,
    live: Arc<Live<NetLive>>,
    tap_name: String,
    tap: File,
    mac: [u8; 6],
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
}

impl Net {
    /// Opens the TAP and checks the configuration.
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let mac = config
            .mac
            .unwrap_or_else(|| generated_mac(&config.tap, &config.id));
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::Mac {
                id: config.id.clone(),
                mac: format_mac(&mac),
            });
        }
        let (tap, tap_name) = open_tap(&config.tap)?;
        let live = Live::new(NetLive {
            rx: config.rx_rate_limiter.unwrap_or_default(),
            tx: config.tx_rate_limiter.unwrap_or_default(),
        })
        .map_err(|source| NetError::Tap {
            tap: config.tap.clone(),
            op: "eventfd",
            source,
        })?;
        Ok(Self {
            live: Arc::new(live),
            config,
            tap_name,
            tap,
            mac,
            worker: None,
            metrics: Arc::default(),
        })
    }

    /// A handle for changing the rate limiters while the VM runs.
    pub fn handle(&self) -> NetHandle {
        NetHandle {
            live: self.live.clone(),
            id: self.config.id.clone(),
        }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The TAP's name as the kernel reports it.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }
}

/// The configuration space: mac, status, max_virtqueue_pairs.
fn config_space(mac: &[u8; 6]) -> [u8; 10] {
    let mut cfg = [0u8; 10];
    cfg[..6].copy_from_slice(mac);
    cfg[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
    cfg
}

/// Whether `chain` ends with a descriptor without NEXT, rather than being cut
/// short (silently, by the iterator) by a loop, an index beyond the queue or
/// a descriptor table outside guest memory.
fn well_formed(chain: &DescriptorChain<&GuestMem>) -> bool {
    chain.clone().last().is_some_and(|d| !d.has_next())
}

/// Whether `n` bytes can be a packet: net header + Ethernet header at least.
fn packet_len_ok(n: usize) -> bool {
    (VNET_HDR_LEN + ETH_HLEN..=MAX_PACKET).contains(&n)
}

/// The part of the device that runs on the worker: moves packets between the
/// queues and `tap` (anything that reads and writes whole packets, one per
/// call, non-blocking).
pub struct NetBackend<T> {
    tap: T,
    tx_buf: Vec<u8>,
    rx_buf: Vec<u8>,
    metrics: Arc<DeviceMetrics>,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    /// Length of a packet read from the TAP into `rx_buf` that the RX
    /// limiter refused: delivered first when RX resumes.
    rx_pending: Option<usize>,
    /// The MMDS endpoint of this interface, if enabled.
    mmds: Option<kiln_mmds::MmdsStack>,
}

impl<T: Read + Write> NetBackend<T> {
    /// A backend over `tap`.
    pub fn new(tap: T, metrics: Arc<DeviceMetrics>) -> Self {
        Self {
            tap,
            tx_buf: vec![0; MAX_PACKET],
            // One spare byte tells an oversized packet from a maximal one.
            rx_buf: vec![0; MAX_PACKET + 1],
            metrics,
            rx_limiter: None,
            tx_limiter: None,
            rx_pending: None,
            mmds: None,
        }
    }

    /// Answers the guest's traffic to the MMDS address from `mmds`.
    pub fn with_mmds(mut self, mmds: Option<kiln_mmds::MmdsStack>) -> Self {
        self.mmds = mmds;
        self
    }

    /// Whether the MMDS has frames for the guest (process RX then).
    pub fn mmds_pending(&self) -> bool {
        self.mmds.as_ref().is_some_and(|m| m.has_output())
    }

    /// Puts RX and TX under these limiters (their timerfds must be watched:
    /// see [`Self::limiter_event`]).
    pub fn with_rate_limiters(mut self, rx: Option<RateLimiter>, tx: Option<RateLimiter>) -> Self {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        self
    }

    /// Applies run-time limiter updates (to the limiters it has).
    pub fn update_rate_limiters(&mut self, rx: &RateLimiterUpdate, tx: &RateLimiterUpdate) {
        if let Some(l) = self.rx_limiter.as_mut() {
            l.update(rx);
        }
        if let Some(l) = self.tx_limiter.as_mut() {
            l.update(tx);
        }
    }

    /// Call when the RX (`rx`) or TX limiter's timerfd is readable; then
    /// process that queue again.
    pub fn limiter_event(&mut self, rx: bool) {
        let l = if rx {
            &mut self.rx_limiter
        } else {
            &mut self.tx_limiter
        };
        if let Some(l) = l {
            l.event_handler();
        }
    }

    /// Sends every available TX chain to the TAP; malformed chains are
    /// dropped and counted. Every chain is returned with length 0. Returns
    /// whether any chain was used.
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let ok = well_formed(&chain);
            match Reader::new(mem, chain) {
                Ok(r) if ok && packet_len_ok(r.available_bytes()) => {
                    let frame = (r.available_bytes() - VNET_HDR_LEN) as u64;
                    let limiter = self.tx_limiter.as_mut();
                    if !rate_limiter::admit(limiter, 1, frame, &self.metrics.throttled) {
                        queue.go_to_previous_position();
                        break;
                    }
                    self.send(r)
                }
                _ => {
                    log::debug!("net: dropped a malformed TX chain (head {head})");
                    DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                }
            }
            if queue.add_used(mem, head, 0).is_err() {
                DeviceMetrics::add(&self.metrics.invalid_requests, 1);
            }
            used = true;
        }
        used
    }

    fn send(&mut self, mut reader: ChainReader<'_>) {
        let n = reader.available_bytes();
        if reader.read_exact(&mut self.tx_buf[..n]).is_err() {
            DeviceMetrics::add(&self.metrics.invalid_requests, 1);
            return;
        }
        if let Some(m) = self.mmds.as_mut() {
            if m.take(&self.tx_buf[VNET_HDR_LEN..n]) {
                return;
            }
        }
        let written = loop {
            match self.tap.write(&self.tx_buf[..n]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match written {
            Ok(w) if w == n => {
                DeviceMetrics::add(&self.metrics.requests, 1);
                DeviceMetrics::add(&self.metrics.writes, 1);
                DeviceMetrics::add(&self.metrics.bytes_from_guest, n as u64);
            }
            // Short write or error (EAGAIN too: like a full NIC ring, the
            // frame is lost).
            r => {
                log::debug!("net: TAP write of {n} bytes: {r:?}");
                DeviceMetrics::add(&self.metrics.io_errors, 1);
            }
        }
    }

    /// Reads the next deliverable packet from the TAP into `rx_buf`; returns
    /// its length (header included), or `None` when the TAP has nothing
    /// more (or fails). Packets the guest cannot take are dropped here.
    fn recv(&mut self) -> Option<usize> {
        if let Some(f) = self.mmds.as_mut().and_then(|m| m.pop()) {
            let n = VNET_HDR_LEN + f.len();
            if packet_len_ok(n) {
                self.rx_buf[..VNET_HDR_LEN].fill(0);
                self.rx_buf[VNET_HDR_LEN - 2..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
                self.rx_buf[VNET_HDR_LEN..n].copy_from_slice(&f);
                return Some(n);
            }
        }
        loop {
            let n = match self.tap.read(&mut self.rx_buf) {
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    log::debug!("net: TAP read: {e}");
                    DeviceMetrics::add(&self.metrics.io_errors, 1);
                    return None;
                }
            };
            let (flags, gso) = (self.rx_buf[0], self.rx_buf[1]);
            if !packet_len_ok(n)
                || u32::from(gso) != VIRTIO_NET_HDR_GSO_NONE
                || u32::from(flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
            {
                // Offloads are off, so the TAP should never hand these out.
                log::debug!("net: dropped a {n}-byte TAP packet (flags {flags:#x}, gso {gso})");
                DeviceMetrics::add(&self.metrics.io_errors, 1);
                continue;
            }
            // No offloads negotiated: flags and GSO fields zero, and one
            // buffer per packet (num_buffers = 1, required with VERSION_1).
            self.rx_buf[..VNET_HDR_LEN - 2].fill(0);
            self.rx_buf[VNET_HDR_LEN - 2..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
            return Some(n);
        }
    }

    /// Delivers packets from the TAP into RX chains until the TAP is empty or
    /// the guest has no buffers left. A packet is read only once a buffer is
    /// in hand; a packet larger than that buffer is dropped (and counted) and
    /// the buffer kept for the next one. Returns whether any chain was used.
    ///
    /// Under an RX limiter, a packet the limiter refuses stays in the device
    /// (the next one delivered) and the buffer stays available; nothing more
    /// is read from the TAP until the limiter's timer fires.
    pub fn process_rx(&mut self, queue: &mut Queue, mem: &GuestMem) -> bool {
        if self
            .rx_limiter
            .as_ref()
            .is_some_and(RateLimiter::is_blocked)
        {
            return false;
        }
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let ok = well_formed(&chain);
            let mut writer = match Writer::new(mem, chain) {
                Ok(w) if ok && w.available_bytes() >= VNET_HDR_LEN + ETH_HLEN => w,
                _ => {
                    log::debug!("net: malformed RX chain (head {head})");
                    DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                    let _ = queue.add_used(mem, head, 0);
                    used = true;
                    continue;
                }
            };
            let room = writer.available_bytes();
            let len = loop {
                match self.rx_pending.take().or_else(|| self.recv()) {
                    Some(n) if n <= room => break Some(n),
                    Some(n) => {
                        log::debug!("net: dropped a {n}-byte packet: RX buffer holds {room}");
                        DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                    }
                    None => break None,
                }
            };
            let Some(n) = len else {
                // Nothing to deliver: hand the buffer back for later.
                queue.go_to_previous_position();
                break;
            };
            let frame = (n - VNET_HDR_LEN) as u64;
            let limiter = self.rx_limiter.as_mut();
            if !rate_limiter::admit(limiter, 1, frame, &self.metrics.throttled) {
                // Keep the packet and the buffer for when the timer fires.
                self.rx_pending = Some(n);
                queue.go_to_previous_position();
                break;
            }
            // The Writer only covers validated guest memory with room >= n.
            let n = match writer.write_all(&self.rx_buf[..n]) {
                Ok(()) => {
                    DeviceMetrics::add(&self.metrics.requests, 1);
                    DeviceMetrics::add(&self.metrics.reads, 1);
                    DeviceMetrics::add(&self.metrics.bytes_to_guest, n as u64);
                    n as u32
                }
                Err(_) => {
                    DeviceMetrics::add(&self.metrics.invalid_requests, 1);
                    0
                }
            };
            let _ = queue.add_used(mem, head, n);
            used = true;
        }
        used
    }
}

impl VirtioDevice for Net {
    fn name(&self) -> String {
        format!("net {}", self.config.id)
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC | 1 << VIRTIO_NET_F_STATUS
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&config_space(&self.mac), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let (mem, interrupt, got) = (ctx.mem, ctx.interrupt, ctx.queues.len());
        let mut queues = ctx.queues.into_iter();
        let (Some((mut rxq, rx_evt)), Some((mut txq, tx_evt))) = (queues.next(), queues.next())
        else {
            return Err(ActivateError::Queues {
                device: self.name(),
                got,
                want: 2,
            });
        };
        let io_err = |source| ActivateError::Io {
            device: self.name(),
            source,
        };
        let tap = self.tap.try_clone().map_err(io_err)?;
        // The TAP is edge-triggered: RX reads until the TAP is empty or the
        // guest has no buffers; in the latter case the RX kick resumes it.
        let tap_events = EventSet::IN | EventSet::EDGE_TRIGGERED;
        let fds = vec![
            (rx_evt.as_raw_fd(), RX_QUEUE, EventSet::IN),
            (tx_evt.as_raw_fd(), TX_QUEUE, EventSet::IN),
            (tap.as_raw_fd(), TAP, tap_events),
        ];
        // Always limiters (without buckets they admit everything), so a
        // later update has timers to use.
        let (current, mut seen) = self.live.snapshot();
        let rx_limiter = RateLimiter::new(&current.rx).map_err(io_err)?;
        let tx_limiter = RateLimiter::new(&current.tx).map_err(io_err)?;
        let mut fds = fds;
        fds.push((rx_limiter.as_raw_fd(), RX_LIMITER, EventSet::IN));
        fds.push((tx_limiter.as_raw_fd(), TX_LIMITER, EventSet::IN));
        let live = self.live.clone();
        fds.push((live.as_raw_fd(), UPDATE, EventSet::IN));
        let mut applied = current;
        let (rx_limiter, tx_limiter) = (Some(rx_limiter), Some(tx_limiter));
        let mut backend = NetBackend::new(tap, self.metrics.clone())
            .with_rate_limiters(rx_limiter, tx_limiter)
            .with_mmds(self.config.mmds.clone().map(kiln_mmds::MmdsStack::new));
        let worker = Worker::spawn(
            format!("kiln_net_{}", self.config.id),
            ThreadKind::Net,
            fds,
            move |token, _| {
                let used = match token {
                    RX_QUEUE => {
                        let _ = rx_evt.read();
                        backend.process_rx(&mut rxq, &mem)
                    }
                    TX_QUEUE => {
                        let _ = tx_evt.read();
                        let tx = backend.process_tx(&mut txq, &mem);
                        // The MMDS answers at once: deliver what it sent.
                        let rx = backend.mmds_pending() && backend.process_rx(&mut rxq, &mem);
                        tx | rx
                    }
                    RX_LIMITER => {
                        backend.limiter_event(true);
                        backend.process_rx(&mut rxq, &mem)
                    }
                    TX_LIMITER => {
                        backend.limiter_event(false);
                        let tx = backend.process_tx(&mut txq, &mem);
                        let rx = backend.mmds_pending() && backend.process_rx(&mut rxq, &mem);
                        tx | rx
                    }
                    UPDATE => {
                        if let Some(new) = live.fetch(&mut seen) {
                            backend.update_rate_limiters(
                                &RateLimiterUpdate::between(&applied.rx, &new.rx),
                                &RateLimiterUpdate::between(&applied.tx, &new.tx),
                            );
                            applied = new;
                            live.applied(seen);
                        }
                        // An unblocked limiter may let queued work through.
                        let tx = backend.process_tx(&mut txq, &mem);
                        backend.process_rx(&mut rxq, &mem) | tx
                    }
                    _ => backend.process_rx(&mut rxq, &mem),
                };
                if used {
                    interrupt.signal_used();
                }
                Next::Continue
            },
        )
        .map_err(io_err)?;
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

#[cfg(test)]
mod tests {
    use super::super::Interrupt;
    use super::*;
    use crate::virtio::testing::{ChainBuilder, Desc};
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::sync::atomic::Ordering::Relaxed;
    use vmm_sys_util::eventfd::EventFd;

    /// A backend over one end of a non-blocking SOCK_SEQPACKET socketpair (a
    /// fake TAP that keeps packet boundaries), and the other end.
    fn backend() -> (NetBackend<File>, File) {
        let mut fds = [0; 2];
        let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // SAFETY: socketpair writes two fds into the 2-int array we pass.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both fds were just created and are owned by nobody else.
        let [ours, peer] = fds.map(|fd| File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        (NetBackend::new(ours, Arc::default()), peer)
    }

    /// A packet as the TAP or the guest sees it: header + Ethernet frame.
    fn packet(hdr_flags: u8, payload_len: usize, tag: u8) -> Vec<u8> {
        let mut p = vec![0u8; VNET_HDR_LEN];
        p[0] = hdr_flags;
        p.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        p.extend((0..payload_len).map(|i| tag.wrapping_add(i as u8)));
        p
    }

    /// What the guest must see for `p` from the TAP: clean header, num_buffers 1.
    fn delivered(p: &[u8]) -> Vec<u8> {
        let mut v = p.to_vec();
        v[..VNET_HDR_LEN].fill(0);
        v[VNET_HDR_LEN - 2] = 1;
        v
    }

    fn recv_all(peer: &mut File) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; MAX_PACKET + 16];
        std::iter::from_fn(|| peer.read(&mut buf).ok().map(|n| buf[..n].to_vec())).collect()
    }

    /// requests, invalid_requests, io_errors.
    fn counts(m: &DeviceMetrics) -> [u64; 3] {
        [&m.requests, &m.invalid_requests, &m.io_errors].map(|c| c.load(Relaxed))
    }

    #[test]
    fn tx_chains_reach_the_tap_as_single_packets() {
        let (mut be, mut peer) = backend();
        let (a, b) = (packet(0, 46, 1), packet(0, 1000, 7));
        let mut q = ChainBuilder::new();
        q.push(&[Desc::r(&a)]);
        // Split over three descriptors, then a writable one (ignored).
        let (h, f) = b.split_at(VNET_HDR_LEN);
        q.push(&[
            Desc::r(h),
            Desc::r(&f[..88]),
            Desc::r(&f[88..]),
            Desc::w(64),
        ]);
        let used = q.run(|mem, queue| be.process_tx(queue, mem));
        assert_eq!(used, vec![(0, 0), (1, 0)]);
        assert_eq!(recv_all(&mut peer), vec![a.clone(), b.clone()]);
        assert_eq!(counts(&be.metrics), [2, 0, 0]);
        let bytes = be.metrics.bytes_from_guest.load(Relaxed);
        assert_eq!(bytes, (a.len() + b.len()) as u64);
    }

    #[test]
    fn malformed_tx_chains_are_dropped_and_returned() {
        let (mut be, mut peer) = backend();
        let good = packet(0, 46, 3);
        let mut q = ChainBuilder::new();
        q.push(&[Desc::w(64)]); // nothing readable
        q.push(&[Desc::raw(0xfff0_0000, 64, false)]); // outside guest memory
        q.push(&[Desc::r(&good[..VNET_HDR_LEN + 4])]); // shorter than the headers
        q.push(&[Desc::r(&[0; 40_000]), Desc::r(&[0; 40_000])]); // > MAX_PACKET
        q.push_loop();
        q.push(&[Desc::r(&good)]); // the device still works afterwards
        let used = q.run(|mem, queue| be.process_tx(queue, mem));
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0; 6]);
        assert_eq!(recv_all(&mut peer), vec![good]);
        assert_eq!(counts(&be.metrics), [1, 5, 0]);

        drop(peer); // writes now fail (EPIPE): counted, not fatal
        let mut q = ChainBuilder::new();
        q.push(&[Desc::r(&packet(0, 46, 0))]);
        assert_eq!(q.run(|mem, queue| be.process_tx(queue, mem)), vec![(0, 0)]);
        assert_eq!(counts(&be.metrics), [1, 5, 1]);
    }

    #[test]
    fn rx_delivers_packets_with_a_clean_header() {
        let (mut be, mut peer) = backend();
        // DATA_VALID (2) from the host must not reach a guest without GUEST_CSUM.
        let (a, b) = (packet(2, 46, 5), packet(0, 1400, 9));
        peer.write_all(&a).unwrap();
        peer.write_all(&b).unwrap();
        let mut q = ChainBuilder::new();
        q.push(&[Desc::w(1526)]);
        q.push(&[Desc::w(VNET_HDR_LEN as u32), Desc::w(500), Desc::w(1014)]);
        q.push(&[Desc::w(1526)]); // left for later
        let used = q.run(|mem, queue| be.process_rx(queue, mem));
        assert_eq!(used, vec![(0, a.len() as u32), (1, b.len() as u32)]);
        assert_eq!(q.written(0, 0)[..a.len()], delivered(&a)[..]);
        let got: Vec<u8> = (0..3).flat_map(|d| q.written(1, d)).collect();
        assert_eq!(got[..b.len()], delivered(&b)[..]);
        assert_eq!(counts(&be.metrics), [2, 0, 0]);
        let bytes = be.metrics.bytes_to_guest.load(Relaxed);
        assert_eq!(bytes, (a.len() + b.len()) as u64);
    }

    #[test]
    fn malformed_rx_chains_and_oversized_packets() {
        let (mut be, mut peer) = backend();
        let (big, small, mut gso) = (packet(0, 1000, 1), packet(0, 46, 2), packet(0, 46, 3));
        gso[1] = 1; // a GSO packet the guest did not negotiate
        for p in [&big, &small, &vec![0u8; 20], &gso] {
            peer.write_all(p).unwrap();
        }
        let mut q = ChainBuilder::new();
        q.push(&[Desc::r(&[0; 64])]); // nothing writable
        q.push(&[Desc::raw(0xfff0_0000, 2048, true)]); // outside guest memory
        q.push(&[Desc::w(10)]); // cannot even hold the headers
        q.push_loop();
        q.push(&[Desc::w(200)]); // too small for `big` (dropped), `small` fits
        q.push(&[Desc::w(2048)]); // only host garbage left: stays available
        let used = q.run(|mem, queue| be.process_rx(queue, mem));
        let want = vec![(0, 0), (1, 0), (2, 0), (3, 0), (5, small.len() as u32)];
        assert_eq!(used, want);
        assert_eq!(q.written(4, 0)[..small.len()], delivered(&small)[..]);
        assert_eq!(counts(&be.metrics), [1, 5, 2]);
    }

    #[test]
    fn rx_without_buffers_leaves_packets_queued_until_buffers_come() {
        let (mut be, mut peer) = backend();
        let p: Vec<_> = (0..3).map(|i| packet(0, 60 + i, i as u8)).collect();
        p.iter().for_each(|x| peer.write_all(x).unwrap());
        let mut q = ChainBuilder::new();
        // No buffers: nothing is read, nothing is used.
        assert!(q.run(|mem, queue| be.process_rx(queue, mem)).is_empty());
        // Two buffers for three packets: the third stays queued.
        q.push(&[Desc::w(256)]);
        q.push(&[Desc::w(256)]);
        let mut state = None;
        let used = q.run(|mem, queue| {
            let r = be.process_rx(queue, mem);
            state = Some(queue.state());
            r
        });
        assert_eq!(used.len(), 2);
        // The guest adds a buffer and kicks: the third packet arrives, in order.
        q.push(&[Desc::w(256)]);
        let used = q.run(|mem, queue| {
            *queue = Queue::try_from(state.unwrap()).unwrap();
            be.process_rx(queue, mem)
        });
        let lens: Vec<_> = p.iter().map(|x| x.len() as u32).collect();
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), lens);
        for (i, x) in p.iter().enumerate() {
            assert_eq!(q.written(i, 0)[..x.len()], delivered(x)[..]);
        }
        assert_eq!(counts(&be.metrics), [3, 0, 0]);
    }

    /// Runs `f` on the queue of `q`, carrying the queue's state over from
    /// the previous call (`state`).
    fn run_again(
        q: &mut ChainBuilder,
        state: &mut Option<virtio_queue::QueueState>,
        f: impl FnOnce(&mut Queue, &GuestMem) -> bool,
    ) -> Vec<(u16, u32)> {
        q.run(|mem, queue| {
            if let Some(s) = state.take() {
                *queue = Queue::try_from(s).unwrap();
            }
            let r = f(queue, mem);
            *state = Some(queue.state());
            r
        })
    }

    fn limiter(opts: &str) -> Option<RateLimiter> {
        Some(RateLimiter::new(&RateLimiterConfig::parse_opts(opts).unwrap()).unwrap())
    }

    #[test]
    fn tx_rate_limit_holds_frames_back_in_order() {
        use crate::rate_limiter::tests::wait_for_timer;
        let (be, mut peer) = backend();
        // One frame per 40 ms.
        let mut be = be.with_rate_limiters(None, limiter("ops=1/40"));
        let p: Vec<_> = (0..3).map(|i| packet(0, 46, i as u8)).collect();
        let mut q = ChainBuilder::new();
        p.iter().for_each(|x| q.push(&[Desc::r(x)]));
        let start = std::time::Instant::now();
        let mut st = None;
        let used = run_again(&mut q, &mut st, |qu, mem| be.process_tx(qu, mem));
        assert_eq!(used, vec![(0, 0)], "served partially");
        assert_eq!(recv_all(&mut peer), vec![p[0].clone()]);
        assert_eq!(be.metrics.throttled.load(Relaxed), 1);
        // Kicks while throttled send nothing.
        let used = run_again(&mut q, &mut st, |qu, mem| be.process_tx(qu, mem));
        assert_eq!(used.len(), 1);
        let mut got = vec![];
        while got.len() < 2 {
            wait_for_timer(be.tx_limiter.as_mut().unwrap());
            run_again(&mut q, &mut st, |qu, mem| be.process_tx(qu, mem));
            got.extend(recv_all(&mut peer));
        }
        assert_eq!(got, p[1..]);
        let waited = start.elapsed();
        assert!(waited >= std::time::Duration::from_millis(75), "{waited:?}");
        assert_eq!(counts(&be.metrics), [3, 0, 0]);
    }

    #[test]
    fn runtime_limiter_updates_throttle_and_release_tx() {
        use crate::rate_limiter::{BucketUpdate, RateLimiterUpdate};
        let (be, mut peer) = backend();
        let unlimited = RateLimiter::new(&RateLimiterConfig::default()).unwrap();
        let mut be = be.with_rate_limiters(None, Some(unlimited));
        let p: Vec<_> = (0..4).map(|i| packet(0, 46, i as u8)).collect();
        let mut q = ChainBuilder::new();
        p.iter().for_each(|x| q.push(&[Desc::r(x)]));
        let mut st = None;
        // One frame a minute from now on: the first goes, the rest wait.
        let cfg = RateLimiterConfig::parse_opts("ops=1/60000").unwrap();
        let limit = RateLimiterUpdate::between(&RateLimiterConfig::default(), &cfg);
        be.update_rate_limiters(&RateLimiterUpdate::default(), &limit);
        let used = run_again(&mut q, &mut st, |qu, mem| be.process_tx(qu, mem));
        assert_eq!(used.len(), 1);
        assert_eq!(recv_all(&mut peer), vec![p[0].clone()]);
        assert!(be.tx_limiter.as_ref().unwrap().is_blocked());
        // Removing the limit releases the rest at once (no timer wait).
        let unlimit = RateLimiterUpdate {
            bandwidth: BucketUpdate::Keep,
            ops: BucketUpdate::Disable,
        };
        be.update_rate_limiters(&RateLimiterUpdate::default(), &unlimit);
        let used = run_again(&mut q, &mut st, |qu, mem| be.process_tx(qu, mem));
        assert_eq!(used.len(), 4);
        assert_eq!(recv_all(&mut peer), p[1..]);
        assert_eq!(be.metrics.throttled.load(Relaxed), 1);
    }

    #[test]
    fn rx_rate_limit_keeps_the_refused_packet_for_later() {
        use crate::rate_limiter::tests::wait_for_timer;
        let (be, mut peer) = backend();
        // 60-byte frames (72 bytes with the header); two frames per 60 ms.
        let mut be = be.with_rate_limiters(limiter("bw=120/60"), None);
        let p: Vec<_> = (0..4).map(|i| packet(0, 46, 10 * i as u8)).collect();
        p[..3].iter().for_each(|x| peer.write_all(x).unwrap());
        let mut q = ChainBuilder::new();
        (0..4).for_each(|_| q.push(&[Desc::w(256)]));
        let mut st = None;
        let used = run_again(&mut q, &mut st, |qu, mem| be.process_rx(qu, mem));
        assert_eq!(used.len(), 2, "served partially");
        assert!(be.rx_pending.is_some(), "the third packet is held");
        // A packet arriving while throttled queues behind the held one.
        peer.write_all(&p[3]).unwrap();
        let used = run_again(&mut q, &mut st, |qu, mem| be.process_rx(qu, mem));
        assert_eq!(used.len(), 2);
        let mut used = used;
        while used.len() < 4 {
            wait_for_timer(be.rx_limiter.as_mut().unwrap());
            used = run_again(&mut q, &mut st, |qu, mem| be.process_rx(qu, mem));
        }
        for (i, x) in p.iter().enumerate() {
            assert_eq!(used[i], (i as u16, x.len() as u32));
            assert_eq!(q.written(i, 0)[..x.len()], delivered(x)[..], "packet {i}");
        }
        assert_eq!(counts(&be.metrics), [4, 0, 0]);
        assert!(be.metrics.throttled.load(Relaxed) >= 1);
    }

    #[test]
    fn macs_config_space_and_setup_errors() {
        assert_eq!(
            parse_mac("02:AB:cd:00:11:ff"),
            Some([2, 0xab, 0xcd, 0, 0x11, 0xff])
        );
        for bad in [
            "",
            "02:ab:cd:00:11",
            "02:ab:cd:00:11:ff:00",
            "+2:ab:cd:00:11:ff",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 1]), "02:ab:00:00:00:01");
        let m = generated_mac("tap0", "eth0");
        assert_eq!(m, generated_mac("tap0", "eth0"), "stable");
        assert_ne!(m, generated_mac("tap1", "eth0"));
        assert_eq!(m[0] & 3, 2, "locally administered unicast");
        let mut data = [0xffu8; 12];
        read_config_bytes(&config_space(&m), 0, &mut data);
        assert_eq!(data[..6], m);
        assert_eq!(data[6..], [1, 0, 1, 0, 0, 0]);

        let cfg = |tap: &str, mac| NetConfig {
            tap: tap.into(),
            mac,
            id: "eth0".into(),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            mmds: None,
        };
        let e = Net::new(cfg("a-very-long-tap-name", None)).err().unwrap();
        assert!(e.to_string().contains("a-very-long-tap-name"), "{e}");
        let e = Net::new(cfg("tap0", Some([1, 0, 0, 0, 0, 1])))
            .err()
            .unwrap();
        assert!(matches!(e, NetError::Mac { .. }), "{e}");
    }

    fn readable(fd: &impl AsRawFd) -> bool {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, and the count says one.
        unsafe { libc::poll(&mut p, 1, 5000) == 1 }
    }

    /// A raw AF_PACKET socket on interface `name`: it sees what the host side
    /// of the TAP receives, and what it sends the TAP's fd reads.
    fn packet_socket(name: &str) -> File {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let idx = std::ffi::CString::new(name).unwrap();
        // SAFETY: socket(2) and bind(2) with a zero-initialized (valid)
        // sockaddr_ll and its exact size; the fd is checked, then owned.
        unsafe {
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto.into());
            assert!(fd >= 0, "AF_PACKET: {}", io::Error::last_os_error());
            let sock = File::from(OwnedFd::from_raw_fd(fd));
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = libc::if_nametoindex(idx.as_ptr()) as i32;
            let len = std::mem::size_of_val(&sll) as u32;
            let r = libc::bind(fd, (&sll as *const libc::sockaddr_ll).cast(), len);
            assert_eq!(r, 0, "bind: {}", io::Error::last_os_error());
            sock
        }
    }

    /// The whole device on a real TAP (root only; skipped otherwise): worker
    /// thread, epoll, TUNSETIFF and the 12-byte header, both directions.
    #[test]
    fn real_tap_round_trip_through_the_worker() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
            eprintln!("skipped: needs root and /dev/net/tun");
            return;
        }
        // The kernel creates the TAP and removes it when `net` is dropped.
        let name = format!("kilnnet{}", std::process::id() % 10_000_000);
        let cfg = NetConfig {
            tap: name.clone(),
            mac: None,
            id: "t".into(),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            mmds: None,
        };
        let mut net = Net::new(cfg).unwrap();
        assert_eq!(net.tap_name(), name);
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        let up = std::process::Command::new("ip")
            .args(["link", "set", &name, "up"])
            .status();
        assert!(up.unwrap().success());
        let mut pkt = packet_socket(&name);
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (rx_evt, tx_evt, irq) = (evt(), evt(), evt());
        // (Re)starts the device with `q` as its RX or TX queue.
        let mut activate = |q: &mut ChainBuilder, rx: bool| {
            let mut st = None;
            q.run(|_, queue| {
                st = Some(queue.state());
                false
            });
            let ours = Queue::try_from(st.unwrap()).unwrap();
            let idle = Queue::new(QUEUE_SIZE).unwrap();
            let (rxq, txq) = if rx { (ours, idle) } else { (idle, ours) };
            let clone = |e: &EventFd| e.try_clone().unwrap();
            net.reset();
            net.activate(ActivateContext {
                mem: q.mem().clone(),
                queues: vec![(rxq, clone(&rx_evt)), (txq, clone(&tx_evt))],
                interrupt: Arc::new(Interrupt::new(clone(&irq))),
            })
            .unwrap();
        };

        // Host → guest: a frame sent on the interface lands in an RX buffer.
        let mut q = ChainBuilder::new();
        (0..4).for_each(|_| q.push(&[Desc::w(2048)]));
        activate(&mut q, true);
        let p = packet(0, 50, 0x40);
        pkt.write_all(&p[VNET_HDR_LEN..]).unwrap();
        assert!(readable(&irq), "no RX interrupt");
        irq.read().unwrap();
        let used = q.run(|_, _| false);
        let hit = (0..used.len()).find(|&i| q.written(i, 0)[..p.len()] == delivered(&p)[..]);
        assert_eq!(used[hit.expect("frame not delivered")].1 as usize, p.len());

        // Guest → host: a TX chain comes out of the interface.
        let p = packet(0, 70, 0x80);
        let mut q = ChainBuilder::new();
        q.push(&[Desc::r(&p[..VNET_HDR_LEN]), Desc::r(&p[VNET_HDR_LEN..])]);
        activate(&mut q, false);
        tx_evt.write(1).unwrap();
        assert!(readable(&irq), "no TX interrupt");
        assert_eq!(q.run(|_, _| false), vec![(0, 0)]);
        let mut buf = [0u8; 2048];
        loop {
            assert!(readable(&pkt), "TX frame never reached the host");
            let n = pkt.read(&mut buf).unwrap();
            if buf[..n] == p[VNET_HDR_LEN..] {
                break;
            }
        }
        assert_eq!(counts(&net.metrics())[1], 0);
    }
}
