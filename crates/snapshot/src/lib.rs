//! Kiln's snapshot state file.
//!
//! A state file is a fixed header followed by a payload:
//!
//! | bytes | field                                          |
//! |-------|------------------------------------------------|
//! | 8     | magic `KILNSNAP`                               |
//! | 4     | format version (little endian)                 |
//! | 4     | architecture tag ([`Arch`])                    |
//! | 8     | payload length in bytes                        |
//! | 32    | SHA-256 of the payload                         |
//! | n     | payload: the state, serde-encoded with bincode |
//!
//! [`decode`] checks each field in that order and names the first one that
//! is wrong, so a truncated, corrupted, foreign or future file is refused
//! with a clear error before anything is built from it. The guest memory is
//! not in this file: it lives in a separate memory file (see [`state`]).

pub mod migration;
pub mod state;

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The first bytes of every state file.
pub const MAGIC: [u8; 8] = *b"KILNSNAP";
/// The format version this build writes and reads. 2: virtio devices keep
/// their own state (the balloon's) besides the transport's registers.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 32;

/// The CPU architecture a snapshot was taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Arch {
    /// x86_64.
    X86_64 = 1,
    /// aarch64.
    Aarch64 = 2,
}

impl Arch {
    /// The architecture of this build.
    pub const fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            Arch::Aarch64
        } else {
            Arch::X86_64
        }
    }

    fn name(tag: u32) -> String {
        match tag {
            1 => "x86_64".into(),
            2 => "aarch64".into(),
            t => format!("unknown architecture {t}"),
        }
    }
}

/// Why a state file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Shorter than its header or than the payload the header announces.
    #[error("the snapshot file is truncated: {have} bytes, {need} needed")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Not a Kiln state file.
    #[error("not a Kiln snapshot file (bad magic number)")]
    BadMagic,
    /// Written by another format version.
    #[error(
        "snapshot format version {found} is not supported (this Kiln reads version {supported})"
    )]
    Version {
        /// The file's version.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// Taken on another architecture.
    #[error("the snapshot was taken on {found}, this host is {host}")]
    Arch {
        /// The file's architecture.
        found: String,
        /// This host's architecture.
        host: String,
    },
    /// Longer than the header says.
    #[error("the snapshot file has {0} unexpected bytes after its payload")]
    TrailingBytes(usize),
    /// The payload does not match its checksum.
    #[error("the snapshot file is corrupted (checksum mismatch)")]
    Checksum,
    /// The payload could not be decoded into the expected state.
    #[error("the snapshot state cannot be decoded: {0}")]
    Decode(String),
    /// The state could not be encoded.
    #[error("the snapshot state cannot be encoded: {0}")]
    Encode(String),
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

/// Encodes `state` into a state file image (header + payload).
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, SnapshotError> {
    let payload = bincode::serde::encode_to_vec(state, bincode_config())
        .map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(Arch::host() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Encodes a part of a state (e.g. one device's) without a header; the
/// state file's checksum covers it.
pub fn to_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>, SnapshotError> {
    bincode::serde::encode_to_vec(v, bincode_config())
        .map_err(|e| SnapshotError::Encode(e.to_string()))
}

/// Decodes what [`to_bytes`] encoded; every byte must be used.
pub fn from_bytes<T: DeserializeOwned>(b: &[u8]) -> Result<T, SnapshotError> {
    let (v, used) = bincode::serde::decode_from_slice(b, bincode_config())
        .map_err(|e| SnapshotError::Decode(e.to_string()))?;
    if used != b.len() {
        return Err(SnapshotError::Decode(format!(
            "{} trailing bytes",
            b.len() - used
        )));
    }
    Ok(v)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

/// Checks a state file image and decodes its state.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SnapshotError> {
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        // A file too short to hold the magic is reported as truncated only
        // if what is there is a prefix of the magic.
        if bytes.len() < MAGIC.len() && MAGIC.starts_with(bytes) {
            return Err(SnapshotError::Truncated {
                have: bytes.len(),
                need: HEADER_LEN,
            });
        }
        return Err(SnapshotError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            have: bytes.len(),
            need: HEADER_LEN,
        });
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let arch = u32_at(bytes, 12);
    if arch != Arch::host() as u32 {
        return Err(SnapshotError::Arch {
            found: Arch::name(arch),
            host: Arch::name(Arch::host() as u32),
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len);
    let have = (bytes.len() - HEADER_LEN) as u64;
    if have < len {
        return Err(SnapshotError::Truncated {
            have: bytes.len(),
            need: HEADER_LEN.saturating_add(len as usize),
        });
    }
    if have > len {
        return Err(SnapshotError::TrailingBytes((have - len) as usize));
    }
    let payload = &bytes[HEADER_LEN..];
    if Sha256::digest(payload).as_slice() != &bytes[24..HEADER_LEN] {
        return Err(SnapshotError::Checksum);
    }
    let (state, used) = bincode::serde::decode_from_slice(payload, bincode_config())
        .map_err(|e| SnapshotError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(SnapshotError::Decode(format!(
            "{} bytes of the payload were not used",
            payload.len() - used
        )));
    }
    Ok(state)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `state` to `path` atomically: a temporary file next to it is
/// written, synced and renamed over `path`, so a crash never leaves a
/// half-written state file under the final name.
pub fn write_file<T: Serialize>(path: &Path, state: &T) -> Result<(), SnapshotError> {
    let image = encode(state)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&image)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// Reads and checks the state file at `path`.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, SnapshotError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    decode(&bytes)
}

#[cfg(test)]
mod tests;
