//! The process a container runs, and how it travels to the guest.
//!
//! The host writes a small *spec disk* (a raw file attached as a writable
//! virtio-blk device). Its layout, read by `kiln-agent oci-exec` in the guest:
//!
//! ```text
//! bytes 0..512     status sector: zeros; the guest writes
//!                  "kiln-oci-status <code>\n" there when the process ends
//! bytes 512..      "kiln-oci-spec 1\n", then records "KEY=VALUE\0" in order:
//!                  arg= (one per argument), env= (one per variable),
//!                  cwd=, uid=, gid=; zeros after the last record
//! ```
//!
//! The file is padded with zeros to a multiple of 4096 bytes.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

/// Size of the status sector at the start of the spec disk.
pub const STATUS_BYTES: usize = 512;
/// First line of the spec proper (after the status sector).
pub const SPEC_MAGIC: &str = "kiln-oci-spec 1\n";
/// Prefix of the status the guest writes into the status sector.
pub const STATUS_PREFIX: &str = "kiln-oci-status ";
/// `PATH` given to processes whose image sets none (as Docker and runc do).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A process to run in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    /// Program and arguments (`args[0]` is looked up in `PATH` when it has no `/`).
    pub args: Vec<String>,
    /// Environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory (absolute; created if missing, as runc does).
    pub cwd: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl Process {
    /// The spec disk's contents (see the module docs).
    pub fn to_spec_bytes(&self) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; STATUS_BYTES];
        v.extend_from_slice(SPEC_MAGIC.as_bytes());
        let mut record = |key: &str, value: &str| -> io::Result<()> {
            if value.contains('\0') {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{key} {value:?} contains a NUL byte"),
                ));
            }
            v.extend_from_slice(key.as_bytes());
            v.push(b'=');
            v.extend_from_slice(value.as_bytes());
            v.push(0);
            Ok(())
        };
        for a in &self.args {
            record("arg", a)?;
        }
        for e in &self.env {
            record("env", e)?;
        }
        record("cwd", &self.cwd)?;
        record("uid", &self.uid.to_string())?;
        record("gid", &self.gid.to_string())?;
        let padded = v.len().div_ceil(4096) * 4096;
        v.resize(padded, 0);
        Ok(v)
    }

    /// Parses a spec written by [`Process::to_spec_bytes`] (the inverse;
    /// the guest agent has its own copy of this parser).
    pub fn from_spec_bytes(data: &[u8]) -> Option<Self> {
        let body = data
            .get(STATUS_BYTES..)?
            .strip_prefix(SPEC_MAGIC.as_bytes())?;
        let mut p = Process {
            args: Vec::new(),
            env: Vec::new(),
            cwd: "/".into(),
            uid: 0,
            gid: 0,
        };
        for rec in body.split(|&b| b == 0).take_while(|r| !r.is_empty()) {
            let rec = std::str::from_utf8(rec).ok()?;
            let (k, v) = rec.split_once('=')?;
            match k {
                "arg" => p.args.push(v.into()),
                "env" => p.env.push(v.into()),
                "cwd" => p.cwd = v.into(),
                "uid" => p.uid = v.parse().ok()?,
                "gid" => p.gid = v.parse().ok()?,
                _ => return None,
            }
        }
        Some(p)
    }
}

/// Reads the exit status the guest wrote into a spec disk, if it did.
pub fn read_status(spec_disk: &Path) -> io::Result<Option<i32>> {
    read_status_from(&mut std::fs::File::open(spec_disk)?)
}

/// [`read_status`] from a spec disk opened earlier (only `lseek` and
/// `read`: a VMM's main thread may do no more once its seccomp filter is
/// on).
pub fn read_status_from(f: &mut std::fs::File) -> io::Result<Option<i32>> {
    f.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; STATUS_BYTES];
    f.read_exact(&mut buf)?;
    Ok(parse_status(&buf))
}

/// The code in a status sector.
pub fn parse_status(sector: &[u8]) -> Option<i32> {
    let end = sector.iter().position(|&b| b == b'\n')?;
    std::str::from_utf8(&sector[..end])
        .ok()?
        .strip_prefix(STATUS_PREFIX)?
        .trim()
        .parse()
        .ok()
}

/// The uid and gid of an image's `User` field: empty, `root`, `UID` or
/// `UID:GID` (numbers or `root`). Names would need the image's user
/// database: `None`.
pub fn parse_user(user: &str) -> Option<(u32, u32)> {
    let id = |s: &str| -> Option<u32> {
        match s {
            "root" => Some(0),
            _ => s.parse().ok(),
        }
    };
    match user.split_once(':') {
        _ if user.is_empty() => Some((0, 0)),
        None => Some((id(user)?, 0)),
        Some((u, g)) => Some((id(u)?, id(g)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_and_is_padded() {
        let p = Process {
            args: vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo a=b; exit 7".into(),
                String::new(),
            ],
            env: vec!["PATH=/bin".into(), "GREETING=hello world".into()],
            cwd: "/srv/app".into(),
            uid: 1000,
            gid: 100,
        };
        let bytes = p.to_spec_bytes().unwrap();
        assert_eq!(bytes.len() % 4096, 0);
        assert!(bytes[..STATUS_BYTES].iter().all(|&b| b == 0));
        // An empty argument is a record "arg=" (only an empty record ends them).
        let back = Process::from_spec_bytes(&bytes).unwrap();
        assert_eq!(back.args, p.args);
        assert_eq!(
            (back.env, back.cwd, back.uid, back.gid),
            (p.env.clone(), p.cwd.clone(), 1000, 100)
        );
        let mut nul = p.clone();
        nul.args = vec!["a\0b".into()];
        assert!(nul.to_spec_bytes().is_err());
        assert!(Process::from_spec_bytes(b"short").is_none());
    }

    #[test]
    fn status_sector() {
        let mut s = vec![0u8; STATUS_BYTES];
        assert_eq!(parse_status(&s), None);
        s[..19].copy_from_slice(b"kiln-oci-status 7\n\0");
        assert_eq!(parse_status(&s), Some(7));
        assert_eq!(parse_status(b"kiln-oci-status x\n"), None);
        assert_eq!(parse_status(b"other 7\n"), None);
    }

    #[test]
    fn users() {
        assert_eq!(parse_user(""), Some((0, 0)));
        assert_eq!(parse_user("root"), Some((0, 0)));
        assert_eq!(parse_user("1000"), Some((1000, 0)));
        assert_eq!(parse_user("1000:100"), Some((1000, 100)));
        assert_eq!(parse_user("0:root"), Some((0, 0)));
        assert_eq!(parse_user("nobody"), None);
        assert_eq!(parse_user("1000:staff"), None);
    }
}
