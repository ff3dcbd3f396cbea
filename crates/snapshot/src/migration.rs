//! The live-migration wire protocol: framed messages over any byte stream
//! (TCP or a Unix socket).
//!
//! Every message is a 1-byte kind, a 4-byte little-endian payload length and
//! the payload. The source sends `Hello`, `Layout`, rounds of `Pages` (each
//! round ended by `RoundEnd`), then `State` (a state-file image, checksummed
//! on its own) and `Done`; the destination answers `Ack` once the VM runs
//! there, or `Error` with a reason. Lengths are bounded, so a hostile or
//! broken peer cannot make the receiver allocate without limit, and a peer
//! that disconnects mid-message is reported as such.

use std::io::{self, Read, Write};

use crate::state::MemoryLayout;
use crate::{Arch, FORMAT_VERSION};

/// First bytes of a `Hello` payload.
pub const MIGRATION_MAGIC: [u8; 8] = *b"KILNMIGR";
/// Largest payload accepted (a `Pages` message carries at most this much).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Protocol and architecture check; first message from the source.
    Hello {
        /// Snapshot format version of the sender.
        version: u32,
        /// The sender's architecture tag.
        arch: u32,
    },
    /// The guest memory layout (the destination allocates it).
    Layout(MemoryLayout),
    /// Bytes of guest memory at `offset` in memory-file space.
    Pages {
        /// Offset in the layout's file space.
        offset: u64,
        /// The bytes (whole pages).
        data: Vec<u8>,
    },
    /// End of one pre-copy round.
    RoundEnd,
    /// The VM's state (a state-file image).
    State(Vec<u8>),
    /// The source has sent everything.
    Done,
    /// The destination runs the VM.
    Ack,
    /// Something went wrong on the peer.
    Error(String),
}

/// A protocol failure.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The peer closed the connection or it broke mid-stream.
    #[error("the migration peer disconnected{0}")]
    Disconnected(String),
    /// An I/O error other than a disconnect.
    #[error("migration stream: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something that is not this protocol.
    #[error("migration protocol error: {0}")]
    Protocol(String),
    /// The peer reported an error.
    #[error("the migration peer failed: {0}")]
    Peer(String),
}

const HELLO: u8 = 1;
const LAYOUT: u8 = 2;
const PAGES: u8 = 3;
const ROUND_END: u8 = 4;
const STATE: u8 = 5;
const DONE: u8 = 6;
const ACK: u8 = 7;
const ERROR: u8 = 8;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

/// The `Hello` this build sends.
pub fn hello() -> Message {
    Message::Hello {
        version: FORMAT_VERSION,
        arch: Arch::host() as u32,
    }
}

/// Checks a peer's `Hello` against this build.
pub fn check_hello(m: &Message) -> Result<(), MigrationError> {
    match m {
        Message::Hello { version, arch } => {
            if *version != FORMAT_VERSION {
                return Err(MigrationError::Protocol(format!(
                    "peer speaks format version {version}, this Kiln {FORMAT_VERSION}"
                )));
            }
            if *arch != Arch::host() as u32 {
                return Err(MigrationError::Protocol(format!(
                    "peer is {}, this host is {}",
                    Arch::name(*arch),
                    Arch::name(Arch::host() as u32)
                )));
            }
            Ok(())
        }
        other => Err(MigrationError::Protocol(format!(
            "expected Hello, got {}",
            kind_name(other)
        ))),
    }
}

fn kind_name(m: &Message) -> &'static str {
    match m {
        Message::Hello { .. } => "Hello",
        Message::Layout(_) => "Layout",
        Message::Pages { .. } => "Pages",
        Message::RoundEnd => "RoundEnd",
        Message::State(_) => "State",
        Message::Done => "Done",
        Message::Ack => "Ack",
        Message::Error(_) => "Error",
    }
}

fn frame(w: &mut impl Write, kind: u8, parts: &[&[u8]]) -> Result<(), MigrationError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_PAYLOAD as usize {
        return Err(MigrationError::Protocol(format!(
            "message of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
        )));
    }
    let mut header = [0u8; 5];
    header[0] = kind;
    header[1..].copy_from_slice(&(len as u32).to_le_bytes());
    w.write_all(&header).map_err(disconnect_or_io)?;
    for p in parts {
        w.write_all(p).map_err(disconnect_or_io)?;
    }
    Ok(())
}

fn disconnect_or_io(e: io::Error) -> MigrationError {
    match e.kind() {
        // read_exact's "failed to fill whole buffer" says nothing more.
        io::ErrorKind::UnexpectedEof => MigrationError::Disconnected(String::new()),
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted => MigrationError::Disconnected(format!(": {e}")),
        _ => MigrationError::Io(e),
    }
}

/// Sends one message.
pub fn send(w: &mut impl Write, m: &Message) -> Result<(), MigrationError> {
    match m {
        Message::Hello { version, arch } => frame(
            w,
            HELLO,
            &[
                &MIGRATION_MAGIC,
                &version.to_le_bytes(),
                &arch.to_le_bytes(),
            ],
        ),
        Message::Layout(l) => {
            let b = bincode::serde::encode_to_vec(l, config())
                .map_err(|e| MigrationError::Protocol(e.to_string()))?;
            frame(w, LAYOUT, &[&b])
        }
        Message::Pages { offset, data } => frame(w, PAGES, &[&offset.to_le_bytes(), data]),
        Message::RoundEnd => frame(w, ROUND_END, &[]),
        Message::State(s) => frame(w, STATE, &[s]),
        Message::Done => frame(w, DONE, &[]),
        Message::Ack => frame(w, ACK, &[]),
        Message::Error(e) => frame(w, ERROR, &[e.as_bytes()]),
    }
}

/// Sends a `Pages` message for `data` at `offset` without copying it into
/// a [`Message`] first.
pub fn send_pages(w: &mut impl Write, offset: u64, data: &[u8]) -> Result<(), MigrationError> {
    frame(w, PAGES, &[&offset.to_le_bytes(), data])
}

/// Receives one message (blocking). A clean close before a message starts
/// is reported as [`MigrationError::Disconnected`] too: in this protocol
/// the peer never just hangs up.
pub fn recv(r: &mut impl Read) -> Result<Message, MigrationError> {
    let mut header = [0u8; 5];
    r.read_exact(&mut header).map_err(disconnect_or_io)?;
    let kind = header[0];
    let mut len = [0u8; 4];
    len.copy_from_slice(&header[1..]);
    let len = u32::from_le_bytes(len);
    if len > MAX_PAYLOAD {
        return Err(MigrationError::Protocol(format!(
            "message of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
        )));
    }
    let mut p = vec![0u8; len as usize];
    r.read_exact(&mut p).map_err(disconnect_or_io)?;
    let short = |what: &str| MigrationError::Protocol(format!("{what} message too short"));
    Ok(match kind {
        HELLO => {
            if p.len() != 16 {
                return Err(short("Hello"));
            }
            if p[..8] != MIGRATION_MAGIC {
                return Err(MigrationError::Protocol(
                    "the peer is not a Kiln migration endpoint".into(),
                ));
            }
            Message::Hello {
                version: u32::from_le_bytes(p[8..12].try_into().expect("4 bytes")),
                arch: u32::from_le_bytes(p[12..16].try_into().expect("4 bytes")),
            }
        }
        LAYOUT => {
            let (l, used) = bincode::serde::decode_from_slice(&p, config())
                .map_err(|e| MigrationError::Protocol(format!("bad Layout: {e}")))?;
            if used != p.len() {
                return Err(MigrationError::Protocol(
                    "bad Layout: trailing bytes".into(),
                ));
            }
            Message::Layout(l)
        }
        PAGES => {
            if p.len() < 8 {
                return Err(short("Pages"));
            }
            let offset = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
            p.drain(..8);
            Message::Pages { offset, data: p }
        }
        ROUND_END => Message::RoundEnd,
        STATE => Message::State(p),
        DONE => Message::Done,
        ACK => Message::Ack,
        ERROR => Message::Error(String::from_utf8_lossy(&p).into_owned()),
        k => {
            return Err(MigrationError::Protocol(format!(
                "unknown message kind {k}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryRegion;
    use std::os::unix::net::UnixStream;

    fn all() -> Vec<Message> {
        vec![
            hello(),
            Message::Layout(MemoryLayout {
                regions: vec![MemoryRegion {
                    guest_addr: 0,
                    size: 1 << 20,
                    file_offset: 0,
                }],
            }),
            Message::Pages {
                offset: 8192,
                data: vec![7u8; 4096],
            },
            Message::RoundEnd,
            Message::State(vec![1, 2, 3]),
            Message::Done,
            Message::Ack,
            Message::Error("disk full".into()),
        ]
    }

    #[test]
    fn every_message_crosses_a_socket_intact() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let sent = all();
        let writer = {
            let sent = sent.clone();
            std::thread::spawn(move || {
                for m in &sent {
                    send(&mut a, m).unwrap();
                }
            })
        };
        for m in &sent {
            assert_eq!(&recv(&mut b).unwrap(), m);
        }
        writer.join().unwrap();
        check_hello(&sent[0]).unwrap();
    }

    #[test]
    fn a_peer_vanishing_mid_message_is_a_disconnect() {
        let mut bytes = Vec::new();
        send(
            &mut bytes,
            &Message::Pages {
                offset: 0,
                data: vec![1; 4096],
            },
        )
        .unwrap();
        for cut in [0, 3, 5, 100, bytes.len() - 1] {
            let err = recv(&mut &bytes[..cut]).unwrap_err();
            assert!(
                matches!(err, MigrationError::Disconnected(_)),
                "cut at {cut}: {err}"
            );
        }
        // And a writer whose peer is gone gets a disconnect, not a panic.
        let (mut a, b) = UnixStream::pair().unwrap();
        drop(b);
        let err = send(&mut a, &Message::Done).unwrap_err();
        assert!(matches!(err, MigrationError::Disconnected(_)), "{err}");
    }

    #[test]
    fn hostile_frames_are_refused() {
        // Huge length: refused before allocating.
        let mut f = vec![PAGES];
        f.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            recv(&mut &f[..]),
            Err(MigrationError::Protocol(_))
        ));
        // Unknown kind.
        let f = [99u8, 0, 0, 0, 0];
        assert!(recv(&mut &f[..])
            .unwrap_err()
            .to_string()
            .contains("kind 99"));
        // Not our magic.
        let mut f = vec![HELLO, 16, 0, 0, 0];
        f.extend_from_slice(b"HTTP/1.1 200 OK\r");
        let err = recv(&mut &f[..]).unwrap_err();
        assert!(err.to_string().contains("not a Kiln"), "{err}");
        // Garbage layout.
        let f = [LAYOUT, 2, 0, 0, 0, 0xff, 0xff];
        assert!(matches!(
            recv(&mut &f[..]),
            Err(MigrationError::Protocol(_))
        ));
        // Wrong version / arch / first message.
        let bad = Message::Hello {
            version: FORMAT_VERSION + 1,
            arch: Arch::host() as u32,
        };
        assert!(check_hello(&bad)
            .unwrap_err()
            .to_string()
            .contains("version"));
        let bad = Message::Hello {
            version: FORMAT_VERSION,
            arch: 77,
        };
        assert!(check_hello(&bad)
            .unwrap_err()
            .to_string()
            .contains("unknown architecture 77"));
        assert!(check_hello(&Message::Done).is_err());
    }
}
