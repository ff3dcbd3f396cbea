//! kiln-agent: a dependency-free helper that runs inside guests (built as a
//! static binary by kiln-lab with plain `rustc`) and on hosts, to move data
//! over vsock and over Kiln's hybrid vsock Unix socket.
//!
//! ```text
//! kiln-agent vsock-echo PORT               guest: echo one vsock connection
//! kiln-agent fn-serve PORT [--root DEV]  guest: run function calls from the host (kiln serve),
//!                                          chrooted into the ext4 file system DEV if given
//! kiln-agent vsock-send CID PORT BYTES     connect over vsock, send, read the echo
//! kiln-agent uds-echo PATH                 host: echo one Unix-socket connection
//! kiln-agent uds-send PATH PORT BYTES      host: CONNECT PORT through PATH, send, read the echo
//! kiln-agent blk-bench DEV [--seq-mib N] [--rand-4k-ops N]
//!                                          guest: O_DIRECT sequential write/read, 4 KiB random read
//! kiln-agent tcp-send HOST PORT BYTES      send BYTES over TCP, wait for the peer's 8-byte count
//! kiln-agent tcp-recv PORT                 accept one TCP connection, read to EOF, answer the count
//! kiln-agent kvm-hold                      lab: keep one idle KVM VM (irqchip, one vCPU) for ever
//! kiln-agent oci-exec SPEC ROOT            guest: run a container's process (from the spec disk
//!                                          SPEC, written by kiln-oci) chrooted in ROOT; its
//!                                          exit status goes into SPEC's status sector
//! ```
//!
//! Senders print `sent <n> <fnv64> recv <m> <fnv64>`; equal pairs mean the
//! data made the round trip intact. The benchmarks print `phase <name>` when a
//! measured phase starts and `phase end` after the last one (so a host can
//! sample the VMM's CPU time per phase), then one `key=value` result line:
//! `blk seq_read_mbps=.. seq_write_mbps=.. rand4k_read_iops=..`,
//! `tcp-send bytes=.. secs=.. mbps=..`, `tcp-recv bytes=.. secs=.. mbps=..`
//! (MB = 10^6 bytes).

use std::io::{self, Read, Seek, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

const AF_VSOCK: i32 = 40;
const SOCK_STREAM: i32 = 1;
const SOCK_CLOEXEC: i32 = 0o2000000;
const VMADDR_CID_ANY: u32 = u32::MAX;
/// `O_DIRECT` on x86_64 (and most architectures).
const O_DIRECT: i32 = 0o40000;
const MIB: usize = 1 << 20;
const BLOCK: usize = 4096;

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
    fn chroot(path: *const std::ffi::c_char) -> i32;
    fn chdir(path: *const std::ffi::c_char) -> i32;
    fn ioctl(fd: i32, req: u64, ...) -> i32;
}

/// `KVM_CREATE_VM`, `KVM_CREATE_IRQCHIP`, `KVM_CREATE_VCPU` (`_IO(0xAE, n)`).
const KVM_CREATE_VM: u64 = 0xAE01;
const KVM_CREATE_IRQCHIP: u64 = 0xAE60;
const KVM_CREATE_VCPU: u64 = 0xAE41;

/// Creates one KVM VM with an in-kernel irqchip and one vCPU that never
/// runs, and keeps it until killed.
///
/// The lab's init runs this so that the lab kernel's KVM never goes from no
/// VM to one VM or back. Each such transition flips static keys (the
/// scheduler's preempt-notifier key, KVM's "APIC software-disabled" key),
/// and the kernel rewrites its own code for it with int3-based text
/// patching; QEMU's multi-threaded TCG sometimes keeps running the other
/// CPU's stale translation of the temporary int3, and both lab CPUs then
/// loop in the int3 handler with interrupts off for ever (see
/// docs/design.md, "The lab").
fn kvm_hold() -> io::Result<()> {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")?;
    let check = |rc: i32| {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    // SAFETY: KVM_CREATE_VM takes an integer machine type (0) and returns a
    // new descriptor; no memory is passed to the kernel.
    let vm = check(unsafe { ioctl(std::os::fd::AsRawFd::as_raw_fd(&kvm), KVM_CREATE_VM, 0u64) })?;
    // SAFETY: `vm` is the descriptor just returned (owned from here on).
    let vm = unsafe { OwnedFd::from_raw_fd(vm) };
    let vmfd = std::os::fd::AsRawFd::as_raw_fd(&vm);
    // SAFETY: KVM_CREATE_IRQCHIP takes no argument.
    check(unsafe { ioctl(vmfd, KVM_CREATE_IRQCHIP, 0u64) })?;
    // SAFETY: KVM_CREATE_VCPU takes the vCPU id (0) and returns a descriptor.
    let vcpu = check(unsafe { ioctl(vmfd, KVM_CREATE_VCPU, 0u64) })?;
    // SAFETY: `vcpu` is the descriptor just returned (owned from here on).
    let _vcpu = unsafe { OwnedFd::from_raw_fd(vcpu) };
    println!("kvm-hold: holding one idle VM");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
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

fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    let fd = vsock_socket()?;
    let addr = vm_addr(VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<SockaddrVm>() as u32;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes.
    check(unsafe { bind(raw(&fd), &addr, len) }, "bind(vsock)")?;
    // SAFETY: listen on our own socket.
    check(unsafe { listen(raw(&fd), 1) }, "listen(vsock)")?;
    Ok(fd)
}

fn vsock_accept(listener: &OwnedFd) -> io::Result<std::fs::File> {
    // SAFETY: null address pointers are allowed by accept4.
    let c = check(
        unsafe {
            accept4(
                raw(listener),
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

fn vsock_accept_one(port: u32) -> io::Result<std::fs::File> {
    vsock_accept(&vsock_listen(port)?)
}

/// Largest command, input or output of one function call, bytes.
const FN_MAX: usize = 64 * MIB;

/// Reads one `\n`-terminated header line (without the `\n`); `None` at EOF.
fn read_line(r: &mut impl Read) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match r.read(&mut b) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 256 => line.push(b[0]),
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "header too long",
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "header is not UTF-8"))
}

fn read_exact_vec(r: &mut impl Read, len: usize) -> io::Result<Vec<u8>> {
    if len > FN_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request too large",
        ));
    }
    let mut v = vec![0u8; len];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// Where a function's root file system is mounted (`fn-serve --root`).
const FN_ROOT: &str = "/fn";

/// Mounts the function's root file system `dev` read-only at [`FN_ROOT`],
/// with a tmpfs /tmp, /proc and /dev inside when it has those directories.
fn mount_fn_root(dev: &str) -> io::Result<()> {
    let script = format!(
        "mkdir -p {FN_ROOT} && mount -t ext4 -o ro {dev} {FN_ROOT} || exit 1; \
         for d in tmp:tmpfs proc:proc dev:devtmpfs; do \
           [ -d {FN_ROOT}/${{d%%:*}} ] && mount -t ${{d#*:}} ${{d#*:}} {FN_ROOT}/${{d%%:*}}; \
         done; true"
    );
    let st = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .status()?;
    if !st.success() {
        return Err(io::Error::other(format!("cannot mount {dev} at {FN_ROOT}")));
    }
    Ok(())
}

/// Runs `cmd` with `sh -c` (chrooted into [`FN_ROOT`] when `chrooted`),
/// `input` on its stdin: exit code, stdout, stderr.
fn run_function(cmd: &[u8], input: Vec<u8>, chrooted: bool) -> (i32, Vec<u8>, Vec<u8>) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::process::{Command, Stdio};
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(std::ffi::OsStr::from_bytes(cmd))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if chrooted {
        // SAFETY: between fork and exec the closure only makes two
        // syscalls on static NUL-terminated paths (no allocation).
        unsafe {
            command.pre_exec(|| {
                if chroot(c"/fn".as_ptr()) != 0 || chdir(c"/".as_ptr()) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = command.spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            return (
                127,
                Vec::new(),
                format!("kiln-agent: sh: {e}\n").into_bytes(),
            )
        }
    };
    let stdin = child.stdin.take();
    // A command that does not read all of its input must not block us.
    let feeder = std::thread::spawn(move || {
        if let Some(mut s) = stdin {
            let _ = s.write_all(&input);
        }
    });
    let out = child.wait_with_output();
    let _ = feeder.join();
    match out {
        Ok(o) => {
            let code = o
                .status
                .code()
                .unwrap_or(128 + o.status.signal().unwrap_or(0));
            let mut err = o.stderr;
            err.truncate(FN_MAX);
            let mut stdout = o.stdout;
            stdout.truncate(FN_MAX);
            (code, stdout, err)
        }
        Err(e) => (
            127,
            Vec::new(),
            format!("kiln-agent: wait: {e}\n").into_bytes(),
        ),
    }
}

/// Serves function calls on one connection until the host closes it:
/// `PING\n` → `PONG\n`; `RUN <cmd bytes> <input bytes>\n<cmd><input>` →
/// `EXIT <code> <stdout bytes> <stderr bytes>\n<stdout><stderr>`.
fn fn_connection<S: Read + Write>(mut s: S, chrooted: bool) -> io::Result<u64> {
    let mut calls = 0;
    while let Some(line) = read_line(&mut s)? {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["PING"] => s.write_all(b"PONG\n")?,
            ["RUN", c, i] => {
                let parse = |w: &str| {
                    w.parse::<usize>()
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad length"))
                };
                let cmd = read_exact_vec(&mut s, parse(c)?)?;
                let input = read_exact_vec(&mut s, parse(i)?)?;
                let (code, out, err) = run_function(&cmd, input, chrooted);
                let mut reply = format!("EXIT {code} {} {}\n", out.len(), err.len()).into_bytes();
                reply.extend_from_slice(&out);
                reply.extend_from_slice(&err);
                s.write_all(&reply)?;
                calls += 1;
            }
            _ => {
                s.write_all(b"ERROR unknown request\n")?;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "unknown request",
                ));
            }
        }
    }
    Ok(calls)
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

/// A zeroed heap buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), BLOCK).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, layout }
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` owns `layout.size()` initialized (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// xorshift64: the next pseudo-random number.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// A 4 KiB-aligned random offset below `size` (at least one block).
fn rand_block_offset(state: &mut u64, size: u64) -> u64 {
    let blocks = (size / BLOCK as u64).max(1);
    (xorshift(state) % blocks) * BLOCK as u64
}

fn phase(name: &str) {
    println!("phase {name}");
}

fn rate(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e6
}

/// O_DIRECT benchmark of a block device: sequential 1 MiB writes (then
/// fdatasync) and reads over the first `seq_mib` MiB, then `rand_ops` 4 KiB
/// reads at random aligned offsets over the whole device.
fn blk_bench(dev: &str, seq_mib: u64, rand_ops: u64) -> io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(O_DIRECT)
        .open(dev)
        .map_err(|e| io::Error::new(e.kind(), format!("open {dev} O_DIRECT: {e}")))?;
    let size = f.seek(io::SeekFrom::End(0))?;
    let seq = (seq_mib * MIB as u64).min(size / MIB as u64 * MIB as u64);
    if seq == 0 || size < BLOCK as u64 {
        return Err(io::Error::other(format!("{dev}: too small ({size} bytes)")));
    }
    let mut buf = AlignedBuf::new(MIB);
    let mut state = 0x2545_f491_4f6c_dd1du64;
    fill(&mut state, buf.as_mut_slice());

    phase("seq_write");
    let t = Instant::now();
    let mut off = 0;
    while off < seq {
        f.write_all_at(buf.as_slice(), off)?;
        off += MIB as u64;
    }
    f.sync_data()?;
    let write_secs = t.elapsed().as_secs_f64();

    phase("seq_read");
    let t = Instant::now();
    let mut off = 0;
    while off < seq {
        f.read_exact_at(buf.as_mut_slice(), off)?;
        off += MIB as u64;
    }
    let read_secs = t.elapsed().as_secs_f64();

    phase("rand4k_read");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let t = Instant::now();
    for _ in 0..rand_ops {
        let off = rand_block_offset(&mut rng, size);
        f.read_exact_at(&mut buf.as_mut_slice()[..BLOCK], off)?;
    }
    let rand_secs = t.elapsed().as_secs_f64();
    phase("end");

    println!(
        "blk seq_read_mbps={:.1} seq_write_mbps={:.1} rand4k_read_iops={:.0} seq_bytes={seq} rand_ops={rand_ops} dev_bytes={size}",
        rate(seq, read_secs),
        rate(seq, write_secs),
        rand_ops as f64 / rand_secs.max(1e-9)
    );
    Ok(())
}

/// Writes `bytes` of pseudo-random data to `w` in 64 KiB pieces.
fn send_bytes(w: &mut impl Write, bytes: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut state = 0x0123_4567_89ab_cdefu64;
    fill(&mut state, &mut buf);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    w.flush()
}

/// Reads `r` to EOF and returns how many bytes came.
fn drain(r: &mut impl Read) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Connects to HOST:PORT, sends `bytes`, half-closes and waits for the
/// receiver's 8-byte little-endian count, so the time covers delivery.
fn tcp_send(host: &str, port: u16, bytes: u64) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut s = loop {
        match TcpStream::connect((host, port)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("connect {host}:{port}: {e}"),
                ))
            }
        }
    };
    phase("tcp_tx");
    let t = Instant::now();
    send_bytes(&mut s, bytes)?;
    s.shutdown(Shutdown::Write)?;
    let mut ack = [0u8; 8];
    s.read_exact(&mut ack)?;
    let secs = t.elapsed().as_secs_f64();
    phase("end");
    let got = u64::from_le_bytes(ack);
    if got != bytes {
        return Err(io::Error::other(format!(
            "the receiver got {got} of {bytes} bytes"
        )));
    }
    println!(
        "tcp-send bytes={bytes} secs={secs:.3} mbps={:.1}",
        rate(bytes, secs)
    );
    Ok(())
}

/// Accepts one connection on PORT, reads it to EOF (timed from the accept)
/// and answers the byte count.
fn tcp_recv(port: u16) -> io::Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port))?;
    phase("tcp_rx");
    let (mut s, _) = l.accept()?;
    let t = Instant::now();
    let got = drain(&mut s)?;
    let secs = t.elapsed().as_secs_f64();
    s.write_all(&got.to_le_bytes())?;
    let _ = s.shutdown(Shutdown::Write);
    phase("end");
    println!(
        "tcp-recv bytes={got} secs={secs:.3} mbps={:.1}",
        rate(got, secs)
    );
    Ok(())
}

/// The value of `--name N` in `args`, or `default`.
fn flag(args: &[String], name: &str, default: u64) -> u64 {
    match args.iter().position(|a| a == name) {
        Some(i) => num(args.get(i + 1)),
        None => default,
    }
}

/// The process of a container, from the spec disk kiln-oci writes (see
/// `kiln_oci::spec`; this is the guest's copy of its parser).
#[derive(Debug, PartialEq)]
struct OciProcess {
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    uid: u32,
    gid: u32,
}

/// Size of the status sector at the start of a spec disk.
const OCI_STATUS_BYTES: usize = 512;
/// First line of the spec, after the status sector.
const OCI_SPEC_MAGIC: &[u8] = b"kiln-oci-spec 1\n";
/// `PATH` searched when the spec's environment has none.
const OCI_DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Parses a spec disk's contents: records `KEY=VALUE\0` after the magic
/// line, ended by an empty record (the zero padding).
fn parse_oci_spec(data: &[u8]) -> Option<OciProcess> {
    let body = data.get(OCI_STATUS_BYTES..)?.strip_prefix(OCI_SPEC_MAGIC)?;
    let mut p = OciProcess {
        args: Vec::new(),
        env: Vec::new(),
        cwd: "/".into(),
        uid: 0,
        gid: 0,
    };
    for rec in body.split(|&b| b == 0).take_while(|r| !r.is_empty()) {
        let (k, v) = std::str::from_utf8(rec).ok()?.split_once('=')?;
        match k {
            "arg" => p.args.push(v.into()),
            "env" => p.env.push(v.into()),
            "cwd" => p.cwd = v.into(),
            "uid" => p.uid = v.parse().ok()?,
            "gid" => p.gid = v.parse().ok()?,
            _ => return None,
        }
    }
    (!p.args.is_empty()).then_some(p)
}

/// Finds `prog` as `execvp` would, in `path` (colon-separated): the first
/// executable regular file. A name with a `/` is used as it is.
fn find_program(prog: &str, path: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if prog.contains('/') {
        return Some(prog.into());
    }
    path.split(':')
        .map(|d| std::path::Path::new(if d.is_empty() { "." } else { d }).join(prog))
        .find(|c| {
            std::fs::metadata(c).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs the spec's process chrooted in `root` (with its environment,
/// working directory, created if missing as runc does, and uid/gid), waits
/// for it and returns its status: its exit code, 128+N for signal N, 127
/// when the program is not found and 126 when it cannot be executed (as
/// runc and shells answer). The status also goes into `spec`'s status
/// sector, for the host.
fn oci_exec(spec: &str, root: &str) -> io::Result<i32> {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    let data = std::fs::read(spec)?;
    let p = parse_oci_spec(&data)
        .ok_or_else(|| io::Error::other(format!("{spec}: not a kiln-oci spec")))?;
    let status_dev = std::fs::OpenOptions::new().write(true).open(spec)?;
    std::os::unix::fs::chroot(root)?;
    std::env::set_current_dir("/")?;
    if let Err(e) = std::fs::create_dir_all(&p.cwd) {
        eprintln!("kiln-agent: working directory {}: {e}", p.cwd);
    }
    let path = p
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(OCI_DEFAULT_PATH);
    let code = match find_program(&p.args[0], path) {
        None => {
            eprintln!(
                "kiln-agent: {}: executable file not found in $PATH",
                p.args[0]
            );
            127
        }
        Some(prog) => {
            let spawned = std::process::Command::new(&prog)
                .arg0(&p.args[0])
                .args(&p.args[1..])
                .env_clear()
                .envs(p.env.iter().filter_map(|e| e.split_once('=')))
                .current_dir(&p.cwd)
                .gid(p.gid)
                .uid(p.uid)
                .spawn();
            match spawned.and_then(|mut c| c.wait()) {
                Ok(st) => st.code().unwrap_or(128 + st.signal().unwrap_or(0)),
                Err(e) => {
                    eprintln!("kiln-agent: cannot run {}: {e}", prog.display());
                    if e.kind() == io::ErrorKind::NotFound {
                        127
                    } else {
                        126
                    }
                }
            }
        }
    };
    let line = format!("kiln-oci-status {code}\n");
    if let Err(e) = status_dev
        .write_all_at(line.as_bytes(), 0)
        .and_then(|_| status_dev.sync_all())
    {
        eprintln!("kiln-agent: writing the exit status to {spec}: {e}");
    }
    Ok(code)
}

fn usage() -> ! {
    eprintln!("usage: kiln-agent oci-exec SPEC ROOT | fn-serve PORT [--root DEV] | vsock-echo PORT | vsock-send CID PORT BYTES | uds-echo PATH | uds-send PATH PORT BYTES | blk-bench DEV [--seq-mib N] [--rand-4k-ops N] | tcp-send HOST PORT BYTES | tcp-recv PORT | cpuid LEAF [SUBLEAF] | kvm-hold");
    std::process::exit(2)
}

fn num<T: std::str::FromStr>(s: Option<&String>) -> T {
    s.and_then(|v| v.parse().ok()).unwrap_or_else(|| usage())
}

fn run(args: &[String]) -> io::Result<()> {
    match args.first().map(String::as_str) {
        Some("fn-serve") => {
            // One connection at a time, for ever: the host keeps one open
            // per instance (and none while it snapshots the guest).
            let root = match args.get(2).map(String::as_str) {
                Some("--root") => Some(args.get(3).unwrap_or_else(|| usage())),
                Some(_) => usage(),
                None => None,
            };
            if let Some(dev) = root {
                mount_fn_root(dev)?;
            }
            let l = vsock_listen(num(args.get(1)))?;
            loop {
                // A connection reset while queued (the transport reset a
                // restored guest gets) fails accept(): wait for the next.
                let c = match vsock_accept(&l) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("kiln-agent: fn-serve: {e}");
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                };
                if let Err(e) = fn_connection(&c, root.is_some()) {
                    eprintln!("kiln-agent: fn-serve: {e}");
                }
            }
        }
        Some("oci-exec") => {
            let spec = args.get(1).unwrap_or_else(|| usage());
            let root = args.get(2).unwrap_or_else(|| usage());
            let code = oci_exec(spec, root)?;
            std::process::exit(code)
        }
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
        Some("blk-bench") => {
            let dev = args.get(1).unwrap_or_else(|| usage());
            blk_bench(
                dev,
                flag(args, "--seq-mib", 64),
                flag(args, "--rand-4k-ops", 2000),
            )
        }
        Some("tcp-send") => {
            let host = args.get(1).unwrap_or_else(|| usage());
            tcp_send(host, num(args.get(2)), num(args.get(3)))
        }
        Some("tcp-recv") => tcp_recv(num(args.get(1))),
        Some("kvm-hold") => kvm_hold(),
        Some("cpuid") => {
            let n = |s: Option<&String>| -> u32 {
                let s = s.map_or("0", |s| s.as_str());
                match s.strip_prefix("0x") {
                    Some(h) => u32::from_str_radix(h, 16).unwrap_or_else(|_| usage()),
                    None => s.parse().unwrap_or_else(|_| usage()),
                }
            };
            let (leaf, sub) = (n(args.get(1)), n(args.get(2)));
            let r = std::arch::x86_64::__cpuid_count(leaf, sub);
            println!("{:08x} {:08x} {:08x} {:08x}", r.eax, r.ebx, r.ecx, r.edx);
            Ok(())
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
    fn oci_spec_records() {
        let mut d = vec![0u8; OCI_STATUS_BYTES];
        d.extend_from_slice(
            b"kiln-oci-spec 1\narg=/bin/sh\0arg=-c\0arg=\0env=A=b=c\0cwd=/srv\0uid=5\0gid=6\0",
        );
        d.resize(4096, 0);
        let p = parse_oci_spec(&d).unwrap();
        assert_eq!(p.args, ["/bin/sh", "-c", ""]);
        assert_eq!(p.env, ["A=b=c"]);
        assert_eq!((p.cwd.as_str(), p.uid, p.gid), ("/srv", 5, 6));
        assert!(parse_oci_spec(&d[..OCI_STATUS_BYTES]).is_none());
        d[OCI_STATUS_BYTES] = b'X';
        assert!(parse_oci_spec(&d).is_none());
    }

    #[test]
    fn programs_are_found_as_execvp_would() {
        assert_eq!(find_program("/x/y", ""), Some("/x/y".into()));
        assert_eq!(
            find_program("sh", "/nonexistent:/bin"),
            Some("/bin/sh".into())
        );
        assert_eq!(find_program("kiln-no-such-program", "/bin:/usr/bin"), None);
        // Not executable: skipped.
        assert_eq!(find_program("passwd", "/etc"), None);
    }

    #[test]
    fn function_calls_run_in_order_on_one_connection() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || fn_connection(&b, false).unwrap());
        a.write_all(b"PING\n").unwrap();
        let cmd = b"tr a-z A-Z; echo oops >&2; exit 3";
        a.write_all(format!("RUN {} 5\n", cmd.len()).as_bytes())
            .unwrap();
        a.write_all(cmd).unwrap();
        a.write_all(b"hello").unwrap();
        assert_eq!(read_line(&mut a).unwrap().unwrap(), "PONG");
        assert_eq!(read_line(&mut a).unwrap().unwrap(), "EXIT 3 5 5");
        assert_eq!(read_exact_vec(&mut a, 10).unwrap(), b"HELLOoops\n");
        a.shutdown(Shutdown::Write).unwrap();
        assert_eq!(t.join().unwrap(), 1);
    }

    #[test]
    fn an_unknown_request_ends_the_connection() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || fn_connection(&b, false));
        a.write_all(b"HELLO\n").unwrap();
        assert_eq!(read_line(&mut a).unwrap().unwrap(), "ERROR unknown request");
        assert!(t.join().unwrap().is_err());
    }

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
    fn random_offsets_are_aligned_and_in_range() {
        let mut st = 42u64;
        let size = 10 * BLOCK as u64 + 100;
        let offs: Vec<u64> = (0..1000)
            .map(|_| rand_block_offset(&mut st, size))
            .collect();
        assert!(offs
            .iter()
            .all(|o| o % BLOCK as u64 == 0 && o + BLOCK as u64 <= size));
        // All ten blocks get hit.
        let mut seen: Vec<u64> = offs.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 10);
        assert_eq!(AlignedBuf::new(MIB).as_slice().as_ptr() as usize % BLOCK, 0);
    }

    #[test]
    fn blk_bench_on_a_file() {
        // O_DIRECT may be refused by the temp file system (tmpfs): then skip.
        let p = std::env::temp_dir().join(format!("kiln-agent-blk-{}", std::process::id()));
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(4 * MIB as u64).unwrap();
        drop(f);
        let r = blk_bench(p.to_str().unwrap(), 2, 50);
        let _ = std::fs::remove_file(&p);
        if let Err(e) = r {
            assert!(e.to_string().contains("O_DIRECT"), "{e}");
        }
    }

    #[test]
    fn tcp_send_and_recv_agree() {
        let l = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let sink = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let n = drain(&mut s).unwrap();
            s.write_all(&n.to_le_bytes()).unwrap();
            n
        });
        tcp_send("127.0.0.1", port, 3 * MIB as u64 + 5).unwrap();
        assert_eq!(sink.join().unwrap(), 3 * MIB as u64 + 5);
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
