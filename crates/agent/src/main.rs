//! kiln-agent: a dependency-free helper that runs inside guests (built as a
//! static binary by kiln-lab with plain `rustc`) and on hosts, to move data
//! over vsock and over Kiln's hybrid vsock Unix socket.
//!
//! ```text
//! kiln-agent vsock-echo PORT               guest: echo one vsock connection
//! kiln-agent vsock-send CID PORT BYTES     connect over vsock, send, read the echo
//! kiln-agent uds-echo PATH                 host: echo one Unix-socket connection
//! kiln-agent uds-send PATH PORT BYTES      host: CONNECT PORT through PATH, send, read the echo
//! ```
//!
//! Senders print `sent <n> <fnv64> recv <m> <fnv64>`; equal pairs mean the
//! data made the round trip intact.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const SOCK_CLOEXEC: i32 = 0o2000000;
const VMADDR_CID_ANY: u32 = u32::MAX;

#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved1: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

extern "C" {
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn bind(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
    fn listen(fd: i32, backlog: i32) -> i32;
    fn accept4(fd: i32, addr: *mut u8, len: *mut u32, flags: i32) -> i32;
    fn shutdown(fd: i32, how: i32) -> i32;
}

fn vm_addr(cid: u32, port: u32) -> SockaddrVm {
    SockaddrVm {
        family: AF_VSOCK as u16,
        reserved1: 0,
        port,
        cid,
        flags: 0,
        zero: [0; 3],
    }
}

fn check(r: i32, what: &str) -> io::Result<i32> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = check(
        unsafe { socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0) },
        "socket(AF_VSOCK)",
    )?;
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn raw(fd: &OwnedFd) -> RawFd {
    std::os::fd::AsRawFd::as_raw_fd(fd)
}

fn vsock_connect(cid: u32, port: u32) -> io::Result<std::fs::File> {
    let fd = vsock_socket()?;
    let addr = vm_addr(cid, port);
    let len = std::mem::size_of::<SockaddrVm>() as u32;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    check(unsafe { connect(raw(&fd), &addr, len) }, "connect(vsock)")?;
    Ok(std::fs::File::from(fd))
}

fn vsock_accept_one(port: u32) -> io::Result<std::fs::File> {
    let fd = vsock_socket()?;
    let addr = vm_addr(VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<SockaddrVm>() as u32;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    check(unsafe { bind(raw(&fd), &addr, len) }, "bind(vsock)")?;
    // SAFETY: listen on our own socket.
    check(unsafe { listen(raw(&fd), 1) }, "listen(vsock)")?;
    // SAFETY: null address pointers are allowed by accept4.
    let c = check(
        unsafe {
            accept4(
                raw(&fd),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                SOCK_CLOEXEC,
            )
        },
        "accept(vsock)",
    )?;
    // SAFETY: `c` is a new descriptor that nothing else owns.
    Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(c) }))
}

/// FNV-1a, 64 bit.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn fill(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn echo<S: Read + Write>(mut s: S) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        s.write_all(&buf[..n])?;
        total += n as u64;
    }
    s.flush()?;
    Ok(total)
}

/// Sends `bytes` on a writer thread while reading the echo here.
fn send_and_check(
    mut reader: impl Read,
    mut writer: impl Write + Send + 'static,
    shut: impl FnOnce() + Send + 'static,
    bytes: u64,
) -> io::Result<()> {
    let start = Instant::now();
    let sender = std::thread::spawn(move || -> io::Result<(u64, u64)> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut sum = Fnv::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            fill(&mut state, &mut buf[..n]);
            sum.update(&buf[..n]);
            writer.write_all(&buf[..n])?;
            left -= n as u64;
        }
        writer.flush()?;
        shut();
        Ok((bytes, sum.0))
    });
    let mut sum = Fnv::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sum.update(&buf[..n]);
        got += n as u64;
    }
    let (sent, sent_sum) = sender
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))??;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "sent {sent} {sent_sum:016x} recv {got} {:016x} ({:.1} MB/s)",
        sum.0,
        (sent + got) as f64 / secs / 1e6
    );
    Ok(())
}

fn uds_connect(path: &str, port: u32) -> io::Result<UnixStream> {
    // The guest may not be listening yet: retry for a while.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let attempt = (|| -> io::Result<UnixStream> {
            let mut s = UnixStream::connect(path)?;
            s.write_all(format!("CONNECT {port}\n").as_bytes())?;
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while line.last() != Some(&b'\n') {
                if s.read(&mut b)? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        "closed before OK",
                    ));
                }
                line.push(b[0]);
            }
            if !line.starts_with(b"OK ") {
                return Err(io::Error::other(format!(
                    "unexpected reply {:?}",
                    String::from_utf8_lossy(&line)
                )));
            }
            Ok(s)
        })();
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e),
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: kiln-agent vsock-echo PORT | vsock-send CID PORT BYTES | uds-echo PATH | uds-send PATH PORT BYTES");
    std::process::exit(2)
}

fn num<T: std::str::FromStr>(s: Option<&String>) -> T {
    s.and_then(|v| v.parse().ok()).unwrap_or_else(|| usage())
}

fn run(args: &[String]) -> io::Result<()> {
    match args.first().map(String::as_str) {
        Some("vsock-echo") => {
            let s = vsock_accept_one(num(args.get(1)))?;
            let n = echo(&s)?;
            println!("echoed {n}");
            Ok(())
        }
        Some("vsock-send") => {
            let s = vsock_connect(num(args.get(1)), num(args.get(2)))?;
            let w = s.try_clone()?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
            // SAFETY: shutdown(SHUT_WR) on a socket `s` keeps open until the reader finishes.
            let shut = move || unsafe {
                shutdown(fd, 1);
            };
            send_and_check(s, w, shut, num(args.get(3)))
        }
        Some("uds-echo") => {
            let path = args.get(1).unwrap_or_else(|| usage());
            let _ = std::fs::remove_file(path);
            let l = UnixListener::bind(path)?;
            let (s, _) = l.accept()?;
            let n = echo(&s)?;
            let _ = std::fs::remove_file(path);
            println!("echoed {n}");
            Ok(())
        }
        Some("uds-send") => {
            let path = args.get(1).unwrap_or_else(|| usage());
            let s = uds_connect(path, num(args.get(2)))?;
            let w = s.try_clone()?;
            let sh = s.try_clone()?;
            let shut = move || {
                let _ = sh.shutdown(std::net::Shutdown::Write);
            };
            send_and_check(s, w, shut, num(args.get(3)))
        }
        _ => usage(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = run(&args) {
        eprintln!("kiln-agent: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uds_echo_round_trip_matches() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || echo(&b).unwrap());
        let w = a.try_clone().unwrap();
        let sh = a.try_clone().unwrap();
        send_and_check(
            a,
            w,
            move || {
                let _ = sh.shutdown(std::net::Shutdown::Write);
            },
            1 << 20,
        )
        .unwrap();
        assert_eq!(t.join().unwrap(), 1 << 20);
    }

    #[test]
    fn fnv_and_fill_are_deterministic() {
        let mut s1 = 1u64;
        let mut s2 = 1u64;
        let (mut a, mut b) = ([0u8; 13], [0u8; 13]);
        fill(&mut s1, &mut a);
        fill(&mut s2, &mut b);
        assert_eq!(a, b);
        let mut f = Fnv::new();
        f.update(b"a");
        assert_eq!(f.0, 0xaf63_dc4c_8601_ec8c);
    }
}
