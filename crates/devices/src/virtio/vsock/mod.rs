//! virtio-vsock with Firecracker's hybrid Unix-socket design.
//!
//! The guest talks AF_VSOCK stream sockets; the host talks Unix sockets:
//!
//! - **Host → guest**: connect to `uds_path`, write `CONNECT <port>\n`, read
//!   `OK <local_port>\n`, then the socket is a byte stream to the guest's
//!   listener on `<port>`. If nothing listens, the socket is closed.
//! - **Guest → host**: a guest `connect(2)` to CID 2, port P reaches the Unix
//!   socket `<uds_path>_P`, which a host program listens on.
//!
//! Only stream sockets (no SEQPACKET). Queues: RX (0), TX (1), event (2:
//! a transport reset after a restore, see `restored`). Configuration space: the
//! guest CID as a little-endian u64. The data path runs on a worker thread
//! ([`muxer::Muxer`]); see there for flow control.

mod conn;
pub mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;

use crate::GuestMem;
use kiln_seccomp::ThreadKind;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::worker::{Next, Worker};
use super::{
    read_config_bytes, ActivateContext, ActivateError, DeviceMetrics, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use muxer::Muxer;

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const NUM_QUEUES: usize = 3;

/// A vsock device to attach.
#[derive(Clone, Debug)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u64,
    /// Where to listen for host-initiated connections; guest-initiated ones
    /// go to `<uds_path>_<port>`.
    pub uds_path: PathBuf,
}

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved (0, 1, 2, or does not fit 32 bits).
    #[error("invalid guest CID {0}: it must be between 3 and 4294967294")]
    Cid(u64),
    /// Something other than a socket is in the way.
    #[error("vsock socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process is listening on the path.
    #[error("vsock socket {0} is in use by another process")]
    InUse(PathBuf),
    /// The listening socket could not be created.
    #[error("cannot listen on vsock socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The virtio-vsock device.
pub struct Vsock {
    config: VsockConfig,
    listener: UnixListener,
    /// (device, inode) of the socket file we created, to remove it on drop.
    socket_id: Option<(u64, u64)>,
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
    /// A transport reset event is owed to the guest (after a restore).
    reset_pending: Arc<AtomicBool>,
    /// Wakes the worker to send it.
    event_kick: Option<EventFd>,
}

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Puts a transport reset event in the first buffer of the event queue;
/// false if the guest has posted none yet (retried on its next kick).
fn send_transport_reset(mem: &GuestMem, evq: &mut Queue, interrupt: &Interrupt) -> bool {
    let Some(chain) = evq.pop_descriptor_chain(mem) else {
        return false;
    };
    let head = chain.head_index();
    let mut written = 0;
    for d in chain {
        if d.is_write_only() && d.len() >= 4 {
            if mem
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                .is_ok()
            {
                written = 4;
            }
            break;
        }
    }
    if written == 0 {
        log::debug!("vsock: the event buffer is not a writable 4-byte buffer");
    }
    let _ = evq.add_used(mem, head, written);
    interrupt.signal_used();
    true
}

impl Vsock {
    /// Binds the listening socket at `config.uds_path`. A stale socket file
    /// (nobody listening) is replaced; any other existing file is an error.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        if config.guest_cid < 3 || config.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::Cid(config.guest_cid));
        }
        let path = &config.uds_path;
        let bind_err = |source| VsockError::Bind {
            path: path.clone(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(VsockError::NotASocket(path.clone()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(VsockError::InUse(path.clone()));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let socket_id = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(Self {
            config,
            listener,
            socket_id,
            worker: None,
            metrics: Arc::default(),
            reset_pending: Arc::default(),
            event_kick: None,
        })
    }

    /// The device's configuration.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.worker = None;
        // Remove our socket file, unless someone replaced it meanwhile.
        if let Ok(m) = std::fs::symlink_metadata(&self.config.uds_path) {
            if Some((m.dev(), m.ino())) == self.socket_id {
                let _ = std::fs::remove_file(&self.config.uds_path);
            }
        }
    }
}

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const EVENT_TOKEN: u64 = 2;
const HOST_TOKEN: u64 = 3;

impl VirtioDevice for Vsock {
    fn name(&self) -> String {
        format!("vsock cid={}", self.config.guest_cid)
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config.guest_cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            queues,
            interrupt,
        } = ctx;
        if queues.len() < NUM_QUEUES {
            return Err(ActivateError::Queues {
                device: self.name(),
                got: queues.len(),
                want: NUM_QUEUES,
            });
        }
        let io_err = |source| ActivateError::Io {
            device: self.name(),
            source,
        };
        let mut queues = queues.into_iter();
        let (Some((rxq, rx_evt)), Some((txq, tx_evt)), Some((mut evq, ev_evt))) =
            (queues.next(), queues.next(), queues.next())
        else {
            unreachable!("length checked above");
        };
        let listener = self.listener.try_clone().map_err(io_err)?;
        let event_kick = ev_evt.try_clone().map_err(io_err)?;
        let reset_pending = self.reset_pending.clone();
        let ev_mem = mem.clone();
        let mut muxer = Muxer::new(
            mem,
            rxq,
            txq,
            listener,
            self.config.guest_cid,
            self.config.uds_path.clone(),
            self.metrics.clone(),
        )
        .map_err(io_err)?;
        let fds = vec![
            (rx_evt.as_raw_fd(), RX_TOKEN, EventSet::IN),
            (tx_evt.as_raw_fd(), TX_TOKEN, EventSet::IN),
            (ev_evt.as_raw_fd(), EVENT_TOKEN, EventSet::IN),
            (muxer.epoll_fd(), HOST_TOKEN, EventSet::IN),
        ];
        // The event queue's avail index when the reset went out.
        let mut reset_sent_at: Option<std::num::Wrapping<u16>> = None;
        let mut gave_up = false;
        let worker = Worker::spawn(
            format!("kiln_vsock_{}", self.config.guest_cid),
            ThreadKind::Vsock,
            fds,
            move |token, _| {
                // From a restore until the guest has taken in the transport
                // reset (it posts a new event buffer after handling it), new
                // host clients wait: a connection the guest answered before
                // handling the reset would be reset by it. At most
                // RESET_ACK_WAIT: then they are let in whatever the guest did.
                match token {
                    RX_TOKEN => {
                        let _ = rx_evt.read();
                    }
                    TX_TOKEN => {
                        let _ = tx_evt.read();
                    }
                    EVENT_TOKEN => {
                        let _ = ev_evt.read();
                    }
                    _ => muxer.handle_host_events(),
                }
                if muxer.process() {
                    interrupt.signal_used();
                }
                if let Some(at) = reset_sent_at {
                    let now = evq.avail_idx(&ev_mem, Ordering::Acquire).ok();
                    if now.is_some_and(|i| i != at) {
                        reset_sent_at = None;
                    }
                }
                if reset_pending.swap(false, Ordering::AcqRel) {
                    if send_transport_reset(&ev_mem, &mut evq, &interrupt) {
                        muxer.drop_all_connections();
                        reset_sent_at = evq.avail_idx(&ev_mem, Ordering::Acquire).ok();
                    } else {
                        reset_pending.store(true, Ordering::Release);
                    }
                }
                let waiting = reset_sent_at.is_some() || reset_pending.load(Ordering::Acquire);
                if waiting && !gave_up && muxer.hold_expired() {
                    log::warn!(
                        "vsock: the guest did not take in the transport reset; letting host clients in"
                    );
                    gave_up = true;
                }
                muxer.hold_host_clients(waiting && !gave_up);
                Next::Continue
            },
        )
        .map_err(io_err)?;
        self.worker = Some(worker);
        self.event_kick = Some(event_kick);
        Ok(())
    }

    fn reset(&mut self) {
        // Dropping the worker drops the muxer: every connection closes.
        self.worker = None;
        self.event_kick = None;
        self.reset_pending.store(false, Ordering::Release);
    }

    fn restored(&mut self) {
        // The guest's connections belonged to the old VMM's sockets: tell it
        // to drop them (listening sockets survive).
        self.reset_pending.store(true, Ordering::Release);
        if let Some(k) = &self.event_kick {
            let _ = k.write(1);
        }
    }

    fn worker(&self) -> Option<&crate::virtio::worker::Worker> {
        self.worker.as_ref()
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }
}
