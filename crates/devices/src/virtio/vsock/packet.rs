//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and protocol constants.
//!
//! Every packet on the RX and TX queues starts with a 44-byte little-endian
//! `virtio_vsock_hdr`; only `VIRTIO_VSOCK_OP_RW` packets carry a payload.

use crate::GuestMem;
use std::io::Read;

use virtio_queue::{DescriptorChain, Reader};

/// Largest payload accepted from, or sent to, the guest in one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// Size of `struct virtio_vsock_hdr` on the wire.
pub const HDR_LEN: usize = 44;

/// The host's well-known CID.
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`: the only socket type this device offers.
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection refused or torn down.
pub const OP_RST: u16 = 3;
/// One or both directions closed (see [`SHUTDOWN_RCV`], [`SHUTDOWN_SEND`]).
pub const OP_SHUTDOWN: u16 = 4;
/// Data.
pub const OP_RW: u16 = 5;
/// The sender's receive buffer state changed.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for an [`OP_CREDIT_UPDATE`].
pub const OP_CREDIT_REQUEST: u16 = 7;

/// Shutdown flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// A decoded `virtio_vsock_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`VIRTIO_VSOCK_TYPE_*`).
    pub kind: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (shutdown flags for [`OP_SHUTDOWN`]).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever.
    pub fwd_cnt: u32,
}

impl Header {
    /// Encodes the header in wire (little-endian) order.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Decodes a header from wire order.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// Reads one TX packet; the payload of OP_RW lands in `buf`. Returns the
/// header and the payload length.
pub fn read_packet(
    mem: &GuestMem,
    chain: DescriptorChain<&GuestMem>,
    buf: &mut [u8],
) -> Result<(Header, usize), &'static str> {
    let mut r = Reader::new(mem, chain).map_err(|_| "buffer outside guest memory")?;
    if r.available_bytes() < HDR_LEN {
        return Err("short header");
    }
    let mut raw = [0u8; HDR_LEN];
    r.read_exact(&mut raw)
        .map_err(|_| "buffer outside guest memory")?;
    let hdr = Header::from_bytes(&raw);
    if hdr.op != OP_RW {
        return Ok((hdr, 0));
    }
    let len = hdr.len as usize;
    if len > MAX_PKT_PAYLOAD || len > buf.len() {
        return Err("payload too long");
    }
    if r.available_bytes() < len {
        return Err("len larger than the buffer");
    }
    r.read_exact(&mut buf[..len])
        .map_err(|_| "buffer outside guest memory")?;
    Ok((hdr, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_header_round_trips_in_little_endian() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x0102_0304,
            dst_port: 52,
            len: 7,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: 256 * 1024,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[16..20], &[4, 3, 2, 1]);
        assert_eq!(&b[28..32], &[1, 0, 5, 0]);
        assert_eq!(Header::from_bytes(&b), h);
    }
}
