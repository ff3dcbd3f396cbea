//! A minimal, deterministic writer for the cpio "newc" (`070701`) format.
//!
//! This is the format the Linux kernel unpacks as an initramfs. Every entry is
//! written with uid/gid 0 and mtime 0 so that the same inputs always produce the
//! same bytes. Device nodes are not supported (the kernel's built-in initramfs
//! already provides `/dev/console`, and the init scripts mount devtmpfs).
//!
//! Paths are given as absolute or relative guest paths; they are stored relative
//! (without the leading `/`), as GNU cpio does. Parent directories that have not
//! been written yet are emitted automatically with mode 0755, because the
//! kernel's unpacker does not create missing parents.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

/// File type bits (`S_IFDIR`, `S_IFREG`, `S_IFLNK`) as stored in the header.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Magic of the "new ASCII" format without checksums.
const MAGIC: &[u8; 6] = b"070701";
/// Size of a newc header: magic plus 13 fields of 8 hex digits.
const HEADER_LEN: usize = 6 + 13 * 8;
/// Name of the final entry that ends an archive.
const TRAILER: &str = "TRAILER!!!";

/// Streaming writer for a newc cpio archive.
pub struct CpioWriter<W: Write> {
    out: W,
    /// Bytes written so far (needed for 4-byte alignment).
    offset: u64,
    /// Next inode number to hand out.
    next_ino: u32,
    /// Directories already present in the archive (normalized, no leading `/`).
    dirs: BTreeSet<String>,
}

/// Strips leading `/` and `./` and collapses duplicate slashes.
fn normalize(path: &str) -> io::Result<String> {
    let parts: Vec<&str> = path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid cpio path {path:?}"),
        ));
    }
    Ok(parts.join("/"))
}

impl<W: Write> CpioWriter<W> {
    /// Creates a writer that emits the archive into `out`.
    pub fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    /// Pads the output with zero bytes to a multiple of `align`.
    fn pad(&mut self, align: u64) -> io::Result<()> {
        let rem = self.offset % align;
        if rem != 0 {
            let zeros = vec![0u8; (align - rem) as usize];
            self.write_all(&zeros)?;
        }
        Ok(())
    }

    /// Writes one header followed by the (NUL-terminated, padded) name.
    fn header(&mut self, name: &str, mode: u32, nlink: u32, size: u64) -> io::Result<()> {
        let size = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: file too large for newc (max 4 GiB)"),
            )
        })?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let namesize = name.len() as u32 + 1;
        let fields = [
            ino, mode, 0, // uid
            0, // gid
            nlink, 0, // mtime
            size, 0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            namesize, 0, // check
        ];
        let mut hdr = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        hdr.extend_from_slice(MAGIC);
        for f in fields {
            hdr.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        hdr.extend_from_slice(name.as_bytes());
        hdr.push(0);
        self.write_all(&hdr)?;
        self.pad(4)
    }

    /// Emits any missing parent directories of `path` (already normalized).
    fn parents(&mut self, path: &str) -> io::Result<()> {
        let mut acc = String::new();
        let comps: Vec<&str> = path.split('/').collect();
        for c in &comps[..comps.len() - 1] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(c);
            if !self.dirs.contains(&acc) {
                let d = acc.clone();
                self.header(&d, S_IFDIR | 0o755, 2, 0)?;
                self.dirs.insert(d);
            }
        }
        Ok(())
    }

    /// Adds a directory (and its missing parents). Adding the same directory
    /// twice is a no-op.
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let path = normalize(path)?;
        if self.dirs.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.header(&path, S_IFDIR | (mode & 0o7777), 2, 0)?;
        self.dirs.insert(path);
        Ok(())
    }

    /// Adds a regular file with the given permission bits and contents.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.header(&path, S_IFREG | (mode & 0o7777), 1, data.len() as u64)?;
        self.write_all(data)?;
        self.pad(4)
    }

    /// Adds a regular file whose contents are streamed from `host` (symlinks
    /// on the host are followed).
    pub fn file_from_host(&mut self, path: &str, mode: u32, host: &Path) -> io::Result<()> {
        let path = normalize(path)?;
        let mut f = File::open(host)?;
        let len = f.metadata()?.len();
        self.parents(&path)?;
        self.header(&path, S_IFREG | (mode & 0o7777), 1, len)?;
        let copied = io::copy(&mut (&mut f).take(len), &mut self.out)?;
        self.offset += copied;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: file shrank while archiving", host.display()),
            ));
        }
        self.pad(4)
    }

    /// Adds a symbolic link at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let path = normalize(path)?;
        self.parents(&path)?;
        self.header(&path, S_IFLNK | 0o777, 1, target.len() as u64)?;
        self.write_all(target.as_bytes())?;
        self.pad(4)
    }

    /// Writes the trailer, pads the archive to 512 bytes and returns the sink.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(TRAILER, 0, 1, 0)?;
        self.pad(512)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/bin", 0o755).unwrap();
        w.file("/bin/hello.sh", 0o755, b"#!/bin/sh\necho hi\n")
            .unwrap();
        w.file("etc/deep/conf", 0o644, b"x").unwrap();
        w.symlink("/bin/sh", "busybox").unwrap();
        w.finish().unwrap()
    }

    fn field(bytes: &[u8], off: usize, idx: usize) -> u32 {
        let s = std::str::from_utf8(&bytes[off + 6 + idx * 8..off + 14 + idx * 8]).unwrap();
        u32::from_str_radix(s, 16).unwrap()
    }

    #[test]
    fn header_layout() {
        let a = sample();
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 512, 0);
        // First entry: "bin" directory.
        assert_eq!(field(&a, 0, 1), S_IFDIR | 0o755); // mode
        assert_eq!(field(&a, 0, 2), 0); // uid
        assert_eq!(field(&a, 0, 5), 0); // mtime
        assert_eq!(field(&a, 0, 11), 4); // namesize "bin\0"
        assert_eq!(&a[HEADER_LEN..HEADER_LEN + 4], b"bin\0");
        // Second header is 4-byte aligned: 110 + 4 = 114 -> 116.
        assert_eq!(&a[116..122], b"070701");
        assert_eq!(field(&a, 116, 1), S_IFREG | 0o755);
        assert_eq!(field(&a, 116, 6), 18); // filesize
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("TRAILER!!!"));
        // Deterministic.
        assert_eq!(a, sample());
    }

    #[test]
    fn parents_are_emitted_once() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/a/b/c", 0o600, b"1").unwrap();
        w.file("/a/b/d", 0o600, b"2").unwrap();
        w.dir("/a", 0o700).unwrap();
        let a = w.finish().unwrap();
        let text = String::from_utf8_lossy(&a);
        assert_eq!(text.matches("a/b\0").count(), 1);
        assert!(normalize("../x").is_err());
        assert!(normalize("/").is_err());
    }

    #[test]
    fn gnu_cpio_lists_and_extracts() {
        if Command::new("cpio").arg("--version").output().is_err() {
            eprintln!("cpio not installed; skipping");
            return;
        }
        let a = sample();
        let mut child = Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&a).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8(out.stdout).unwrap();
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/hello.sh",
                "etc",
                "etc/deep",
                "etc/deep/conf",
                "bin/sh"
            ]
        );

        let dir = std::env::temp_dir().join(format!("kiln-cpio-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new("cpio")
            .args(["-id", "--quiet"])
            .current_dir(&dir)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&a).unwrap();
        assert!(child.wait().unwrap().success());
        let content = std::fs::read(dir.join("bin/hello.sh")).unwrap();
        assert_eq!(content, b"#!/bin/sh\necho hi\n");
        let link = std::fs::read_link(dir.join("bin/sh")).unwrap();
        assert_eq!(link, Path::new("busybox"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
