//! `kiln bench io`: virtio-blk, virtio-net and vsock throughput, measured in
//! the guest by `kiln-agent`, with the host CPU time the VMM spent.
//!
//! Every test boots a fresh microVM (`kiln run`, Kiln's guest images) whose
//! init runs one agent command. The agent prints `phase <name>` as each
//! measured phase starts and `phase end` after the last; the bench samples
//! `/proc/<kiln pid>/stat` (utime + stime of all threads, and guest_time, the
//! part of it the vCPUs spent running guest code) at each marker, so a
//! figure's CPU time covers that phase only, not the boot.
//!
//! - blk: `kiln-agent blk-bench /dev/vda` on a sparse raw file, once per disk
//!   engine the VMM offers (`sync`, and `io_uring` when `kiln run --help`
//!   mentions engines).
//! - net: a TAP with 172.30.9.1/24 on the host; the guest sends to a TCP sink
//!   in this process (`tcp-send`), then receives from it (`tcp-recv`).
//! - vsock: the guest connects to host port 6000 (`vsock-send`), which the
//!   device bridges to `<uds>_6000`, where this process echoes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use kiln_lab::scripts::GUEST_EXIT_PREFIX;

/// What `kiln bench io` measures.
#[derive(Clone, Debug)]
pub struct IoOptions {
    /// Boots per test.
    pub runs: usize,
    /// MiB per transfer (disk sequential span, TCP and vsock payloads).
    pub size_mib: u64,
    /// 4 KiB random reads per disk run.
    pub rand_ops: u64,
    /// Guest memory in MiB.
    pub mem: u64,
    /// Run everything with seccomp on and off and compare.
    pub seccomp_compare: bool,
}

/// Longest one benchmark VM may run (the lab is an emulated machine).
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);
/// Host-side sockets give up this long after the VM ended.
const POLL: Duration = Duration::from_millis(20);
const TAP_NAME: &str = "kbench0";
const HOST_IP: &str = "172.30.9.1";
const GUEST_IP: &str = "172.30.9.2";
const SINK_PORT: u16 = 5001;
const GUEST_PORT: u16 = 5002;
const VSOCK_PORT: u32 = 6000;

/// `kiln bench io`: here, or inside the lab when this host's KVM is not native.
pub fn bench_io(o: IoOptions) -> Result<i32> {
    let here = std::env::var_os("KILN_IN_LAB").is_some() || !crate::use_lab();
    if here {
        return run_here(&o);
    }
    eprintln!("kiln: host KVM is not native; running the benchmark inside the lab");
    let images = kiln_lab::images::ensure(&kiln_lab::images::default_cache_dir())?;
    let mut lab = crate::lab_with_kiln(images, Duration::from_secs(3600))?;
    // iproute2 for `ip tuntap`: the lab's busybox `ip` lacks it.
    if let Some(ip) = ["/usr/sbin/ip", "/sbin/ip", "/bin/ip", "/usr/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    {
        lab = lab.binary(ip);
    }
    let cmd = format!(
        "{}kiln bench io --runs {} --size {} --rand-ops {} --mem {}{}",
        kiln_lab::lab::kiln_env_prefix(),
        o.runs,
        o.size_mib,
        o.rand_ops,
        o.mem,
        if o.seccomp_compare {
            " --seccomp-compare"
        } else {
            ""
        }
    );
    Ok(lab.run_interactive(&cmd)?)
}

/// CPU time of a process, in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Cpu {
    /// utime + stime, all threads.
    busy: u64,
    /// guest_time: the part of `busy` spent running guest code.
    guest: u64,
}

impl Cpu {
    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            busy: self.busy.saturating_sub(earlier.busy),
            guest: self.guest.saturating_sub(earlier.guest),
        }
    }
}

/// Parses `/proc/<pid>/stat`: utime (14), stime (15), guest_time (43).
fn parse_stat(stat: &str) -> Option<Cpu> {
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(Cpu {
        busy: field(14)? + field(15)?,
        guest: field(43).unwrap_or(0),
    })
}

fn read_cpu(pid: u32) -> Option<Cpu> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn ticks_to_ms(ticks: u64) -> u64 {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    ticks * 1000 / hz
}

/// The `key=value` pairs of a result line whose first word is `tag`.
fn parse_kv(line: &str, tag: &str) -> Option<Vec<(String, f64)>> {
    let mut words = line.split_whitespace();
    if words.next()? != tag {
        return None;
    }
    Some(
        words
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect(),
    )
}

fn kv_get(kv: &[(String, f64)], key: &str) -> Result<f64> {
    kv.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| *v)
        .ok_or_else(|| anyhow!("no {key}= in the agent's report"))
}

/// Parses the agent's `sent N X recv M Y (R MB/s)`: checks that the round
/// trip was intact and returns R.
fn parse_round_trip(line: &str, bytes: u64) -> Result<f64> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let bad = || anyhow!("unexpected vsock report {line:?}");
    if f.len() < 7 || f[0] != "sent" || f[3] != "recv" {
        return Err(bad());
    }
    let (sent, recv): (u64, u64) = (
        f[1].parse().map_err(|_| bad())?,
        f[4].parse().map_err(|_| bad())?,
    );
    if sent != bytes || recv != bytes || f[2] != f[5] {
        bail!("vsock round trip not intact: {line:?}");
    }
    f[6].trim_start_matches('(').parse().map_err(|_| bad())
}

/// One benchmark VM's console and CPU samples.
struct GuestRun {
    lines: Vec<String>,
    /// (phase name, CPU when its marker arrived).
    marks: Vec<(String, Cpu)>,
}

impl GuestRun {
    /// CPU from the `phase name` marker to the next marker.
    fn phase_cpu(&self, name: &str) -> Option<Cpu> {
        let i = self.marks.iter().position(|(n, _)| n == name)?;
        let (_, next) = self.marks.get(i + 1)?;
        Some(next.since(self.marks[i].1))
    }

    /// The first console line starting with `prefix`.
    fn line(&self, prefix: &str) -> Result<&str> {
        self.lines
            .iter()
            .map(String::as_str)
            .find(|l| l.starts_with(prefix))
            .ok_or_else(|| anyhow!("the guest printed no {prefix:?} line"))
    }
}

/// Boots a VM with `devices` (extra `kiln run` options) that runs `guest`.
fn run_guest(
    exe: &Path,
    flags: &[&str],
    mem: u64,
    devices: &[String],
    guest: &str,
) -> Result<GuestRun> {
    let mut child = Command::new(exe)
        .arg("run")
        .args(flags)
        .args([
            "--mem",
            &mem.to_string(),
            "--cmdline",
            kiln_vmm::DEFAULT_CMDLINE,
        ])
        .args(devices)
        .args(["--", guest])
        .env("KILN_LAB", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning kiln run")?;
    let pid = child.id();
    let watchdog = super::Watchdog::start(pid, GUEST_TIMEOUT);
    let mut stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut run = GuestRun {
        lines: Vec::new(),
        marks: Vec::new(),
    };
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
        let line = line.trim_matches(|c: char| c == '\r' || c.is_whitespace());
        if let Some(name) = line.strip_prefix("phase ") {
            if let Some(cpu) = read_cpu(pid) {
                run.marks.push((name.to_string(), cpu));
            }
        }
        if run.lines.len() < 2000 {
            run.lines.push(line.to_string());
        }
    }
    let status = child.wait()?;
    let timed_out = watchdog.finish();
    let errtext = err_thread.join().unwrap_or_default();
    let tail = || {
        let n = run.lines.len().saturating_sub(15);
        run.lines[n..].join("\n")
    };
    if timed_out {
        bail!(
            "the VM did not finish within {GUEST_TIMEOUT:?}; console:\n{}\n{errtext}",
            tail()
        );
    }
    let guest_status = run
        .lines
        .iter()
        .find_map(|l| l.strip_prefix(GUEST_EXIT_PREFIX))
        .map(str::to_string);
    if !status.success() || guest_status.as_deref() != Some("0") {
        bail!(
            "kiln run {status}, guest command status {}; console:\n{}\n{}",
            guest_status.as_deref().unwrap_or("unknown"),
            tail(),
            errtext.trim_end()
        );
    }
    Ok(run)
}

/// One line of the result table, with a sample per run.
struct Row {
    test: String,
    unit: &'static str,
    values: Vec<f64>,
    cpu: Vec<Cpu>,
    errors: usize,
}

#[derive(Default)]
struct Rows(Vec<Row>);

impl Rows {
    fn row(&mut self, test: &str, unit: &'static str) -> &mut Row {
        if let Some(i) = self.0.iter().position(|r| r.test == test) {
            return &mut self.0[i];
        }
        self.0.push(Row {
            test: test.to_string(),
            unit,
            values: Vec::new(),
            cpu: Vec::new(),
            errors: 0,
        });
        self.0.last_mut().expect("just pushed")
    }

    /// Records and prints one figure with its phase's CPU time.
    fn add(&mut self, test: &str, unit: &'static str, value: f64, cpu: Option<Cpu>) {
        let cpu = cpu.unwrap_or_default();
        println!(
            "    {test:<28} {value:>10.1} {unit:<5} cpu_ms={} guest_ms={}",
            ticks_to_ms(cpu.busy),
            ticks_to_ms(cpu.guest)
        );
        let r = self.row(test, unit);
        r.values.push(value);
        r.cpu.push(cpu);
    }

    fn fail(&mut self, tests: &[(&str, &'static str)], e: &anyhow::Error) {
        println!("    error: {e:#}");
        for (t, u) in tests {
            self.row(t, u).errors += 1;
        }
    }
}

fn median<T: Copy + PartialOrd>(v: &[T]) -> Option<T> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    s.get(s.len().saturating_sub(1) / 2).copied()
}

/// The summary table: medians over the runs.
fn format_table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<28} {:>16} {:>8} {:>8} {:>6}\n",
        "test", "median", "cpu_ms", "guest_ms", "runs"
    );
    for r in rows {
        let runs = if r.errors > 0 {
            format!("{}+{}err", r.values.len(), r.errors)
        } else {
            r.values.len().to_string()
        };
        let figure = median(&r.values)
            .map(|v| format!("{v:.1} {}", r.unit))
            .unwrap_or_else(|| "-".into());
        let busy: Vec<u64> = r.cpu.iter().map(|c| c.busy).collect();
        let guest: Vec<u64> = r.cpu.iter().map(|c| c.guest).collect();
        let ms = |v: &[u64]| {
            median(v)
                .map(|t| ticks_to_ms(t).to_string())
                .unwrap_or_else(|| "-".into())
        };
        out.push_str(&format!(
            "{:<28} {:>16} {:>8} {:>8} {:>6}\n",
            r.test,
            figure,
            ms(&busy),
            ms(&guest),
            runs
        ));
    }
    out
}

/// Disk engines the VMM offers (`sync` always; `io_uring` when `kiln run
/// --help` mentions engines).
fn disk_engines(exe: &Path) -> Vec<&'static str> {
    let help = Command::new(exe)
        .args(["run", "--help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut v = vec!["sync"];
    if help.contains("engine") {
        v.push("io_uring");
    }
    v
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// iproute2's `ip`: in the lab busybox's applet would shadow a PATH lookup.
fn ip_tool() -> &'static str {
    if Path::new("/usr/local/bin/ip").exists() {
        "/usr/local/bin/ip"
    } else {
        "ip"
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new(ip_tool())
        .args(args)
        .output()
        .with_context(|| format!("running {}", ip_tool()))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A host TAP device with an address, deleted on drop.
struct Tap(&'static str);

impl Tap {
    fn create(name: &'static str) -> Result<Tap> {
        let _ = ip(&["link", "del", name]);
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        let tap = Tap(name);
        ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(tap)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", self.0]);
    }
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Retries `f` while it would block, until `stop` is set.
fn poll<T>(stop: &AtomicBool, mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if is_retry(&e) && !stop.load(Ordering::Acquire) => std::thread::sleep(POLL),
            r => return r,
        }
    }
}

/// Reads to EOF (the stream has a read timeout), giving up once `stop` is set.
fn drain(r: &mut impl Read, stop: &AtomicBool) -> io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match poll(stop, || r.read(&mut buf))? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

fn write_all(w: &mut impl Write, mut data: &[u8], stop: &AtomicBool) -> io::Result<()> {
    while !data.is_empty() {
        let n = poll(stop, || w.write(data))?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}

/// Blocking with timeouts, so `stop` is seen.
fn timeouts(s: &impl AsTimeouts) -> io::Result<()> {
    s.set_timeouts(Some(Duration::from_millis(500)))
}

trait AsTimeouts {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()>;
}

impl AsTimeouts for TcpStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

impl AsTimeouts for std::os::unix::net::UnixStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_nonblocking(false)?;
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

/// The host side of the network test: the sink for the guest's upload, then
/// the upload to the guest. Returns (bytes received, guest's count of ours).
fn net_host(sink: TcpListener, bytes: u64, stop: &AtomicBool) -> io::Result<(u64, u64)> {
    sink.set_nonblocking(true)?;
    let (mut s, _) = poll(stop, || sink.accept())?;
    timeouts(&s)?;
    let got = drain(&mut s, stop)?;
    write_all(&mut s, &got.to_le_bytes(), stop)?;
    drop(s);

    let addr: SocketAddr = format!("{GUEST_IP}:{GUEST_PORT}").parse().expect("address");
    let mut c = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(c) => break c,
            Err(e) if !stop.load(Ordering::Acquire) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    };
    timeouts(&c)?;
    let chunk: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 31 + 7) as u8).collect();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        write_all(&mut c, &chunk[..n], stop)?;
        left -= n as u64;
    }
    c.shutdown(Shutdown::Write)?;
    let mut ack = Vec::new();
    let mut buf = [0u8; 8];
    while ack.len() < 8 {
        match poll(stop, || c.read(&mut buf))? {
            0 => break,
            n => ack.extend_from_slice(&buf[..n]),
        }
    }
    let ack: [u8; 8] = ack
        .get(..8)
        .and_then(|a| a.try_into().ok())
        .ok_or_else(|| io::Error::other("the guest closed without its count"))?;
    Ok((got, u64::from_le_bytes(ack)))
}

/// Echoes one connection to `<uds>_<port>` (the guest's vsock connection).
fn vsock_host(l: UnixListener, stop: &AtomicBool) -> io::Result<u64> {
    l.set_nonblocking(true)?;
    let (mut s, _) = poll(stop, || l.accept())?;
    timeouts(&s)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        let n = poll(stop, || s.read(&mut buf))?;
        if n == 0 {
            return Ok(total);
        }
        write_all(&mut s, &buf[..n], stop)?;
        total += n as u64;
    }
}

/// Runs `host` on a thread while the VM runs, then stops and joins it.
fn with_host<T: Send + 'static>(
    host: impl FnOnce(&AtomicBool) -> io::Result<T> + Send + 'static,
    vm: impl FnOnce() -> Result<GuestRun>,
) -> Result<(GuestRun, T)> {
    let stop = Arc::new(AtomicBool::new(false));
    let h = {
        let stop = stop.clone();
        std::thread::spawn(move || host(&stop))
    };
    let run = vm();
    stop.store(true, Ordering::Release);
    let host = h
        .join()
        .map_err(|_| anyhow!("the host-side thread panicked"))?;
    let run = run?;
    Ok((run, host.context("host side of the transfer")?))
}

fn run_here(o: &IoOptions) -> Result<i32> {
    let exe = std::env::current_exe()?;
    let dir = TempDir(std::env::temp_dir().join(format!("kiln-bench-io-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).with_context(|| format!("creating {}", dir.0.display()))?;
    let engines = disk_engines(&exe);
    let disk_mib = o.size_mib.max(256);
    println!(
        "kiln bench io: {} run(s), {} MiB transfers, {} MiB disk, {} random 4 KiB reads, guest {} MiB; disk engines: {}",
        o.runs,
        o.size_mib,
        disk_mib,
        o.rand_ops,
        o.mem,
        engines.join(", ")
    );
    println!("  cpu_ms: the kiln process's CPU time (all threads) during the phase; guest_ms: the part of it spent running guest code");
    if !o.seccomp_compare {
        let rows = run_set(o, &exe, &dir.0, &engines, &[])?;
        println!(
            "\nkiln bench io results (median of {} run(s), the lower one for an even count, per column; MB = 10^6 bytes; figures measured in the guest by kiln-agent):",
            o.runs
        );
        print!("{}", format_table(&rows.0));
        return Ok(status(&rows));
    }
    println!("== seccomp on (the default)");
    let on = run_set(o, &exe, &dir.0, &engines, &[])?;
    println!("== seccomp off (--no-seccomp)");
    let off = run_set(o, &exe, &dir.0, &engines, &["--no-seccomp"])?;
    println!("\nseccomp on:\n{}", format_table(&on.0));
    println!("seccomp off:\n{}", format_table(&off.0));
    print!("{}", format_compare(&on.0, &off.0));
    Ok(status(&on).max(status(&off)))
}

fn status(rows: &Rows) -> i32 {
    if rows.0.iter().any(|r| r.errors > 0) {
        1
    } else {
        0
    }
}

/// Throughput with seccomp on against off, per test: the cost is how much
/// lower the figure is with the filters (negative: higher).
fn format_compare(on: &[Row], off: &[Row]) -> String {
    let mut out = format!(
        "{:<28} {:>14} {:>14} {:>9}\n",
        "seccomp cost (medians)", "on", "off", "cost"
    );
    for r in on {
        let Some(o) = off.iter().find(|o| o.test == r.test) else {
            continue;
        };
        let (Some(a), Some(b)) = (median(&r.values), median(&o.values)) else {
            continue;
        };
        let cost = if b > 0.0 { (b - a) / b * 100.0 } else { 0.0 };
        out.push_str(&format!(
            "{:<28} {:>9.1} {:<4} {:>9.1} {:<4} {:>8.2}%\n",
            r.test, a, r.unit, b, o.unit, cost
        ));
    }
    out.push_str("(target: under 2%)\n");
    out
}

/// Every test once per run, `kiln run` given `flags`.
fn run_set(
    o: &IoOptions,
    exe: &Path,
    dir: &Path,
    engines: &[&'static str],
    flags: &[&str],
) -> Result<Rows> {
    let bytes = o.size_mib << 20;
    let disk_mib = o.size_mib.max(256);
    let mut rows = Rows::default();

    for engine in engines {
        let names = [
            (
                format!("blk {engine} seq read 1M"),
                "MB/s",
                "seq_read",
                "seq_read_mbps",
            ),
            (
                format!("blk {engine} seq write 1M"),
                "MB/s",
                "seq_write",
                "seq_write_mbps",
            ),
            (
                format!("blk {engine} rand read 4K"),
                "IOPS",
                "rand4k_read",
                "rand4k_read_iops",
            ),
        ];
        for i in 0..o.runs {
            println!("  blk, engine {engine}, run {}:", i + 1);
            let disk = dir.join(format!("disk-{engine}-{i}.img"));
            let result = (|| -> Result<GuestRun> {
                let f = std::fs::File::create(&disk)?;
                f.set_len(disk_mib << 20)?;
                drop(f);
                let mut spec = disk.display().to_string();
                if *engine != "sync" {
                    spec.push_str(&format!(",engine={engine}"));
                }
                let guest = format!(
                    "kiln-agent blk-bench /dev/vda --seq-mib {} --rand-4k-ops {}",
                    o.size_mib, o.rand_ops
                );
                run_guest(exe, flags, o.mem, &["--disk".into(), spec], &guest)
            })();
            let _ = std::fs::remove_file(&disk);
            let parsed = result.and_then(|run| {
                let line = run.line("blk ")?.to_string();
                let kv = parse_kv(&line, "blk").expect("prefix checked");
                println!("    guest: {line}");
                let v: Vec<f64> = names
                    .iter()
                    .map(|(_, _, _, key)| kv_get(&kv, key))
                    .collect::<Result<_>>()?;
                Ok((run, v))
            });
            match parsed {
                Ok((run, v)) => {
                    for ((test, unit, phase, _), value) in names.iter().zip(v) {
                        rows.add(test, unit, value, run.phase_cpu(phase));
                    }
                }
                Err(e) => rows.fail(
                    &names
                        .iter()
                        .map(|(t, u, _, _)| (t.as_str(), *u))
                        .collect::<Vec<_>>(),
                    &e,
                ),
            }
        }
    }

    let net_tests = [
        ("net tcp guest→host", "MB/s"),
        ("net tcp host→guest", "MB/s"),
    ];
    match Tap::create(TAP_NAME) {
        Err(e) => rows.fail(&net_tests, &e.context("creating the TAP device")),
        Ok(tap) => {
            for i in 0..o.runs {
                println!("  net (TAP {}), run {}:", tap.0, i + 1);
                let r = (|| -> Result<()> {
                    let sink = TcpListener::bind((HOST_IP, SINK_PORT))
                        .with_context(|| format!("binding {HOST_IP}:{SINK_PORT}"))?;
                    let guest = format!(
                        "ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && \
                         kiln-agent tcp-send {HOST_IP} {SINK_PORT} {bytes} && kiln-agent tcp-recv {GUEST_PORT}"
                    );
                    let devices = ["--net".to_string(), tap.0.to_string()];
                    let (run, (got, acked)) = with_host(
                        move |stop| net_host(sink, bytes, stop),
                        || run_guest(exe, flags, o.mem, &devices, &guest),
                    )?;
                    if got != bytes || acked != bytes {
                        bail!("sent {bytes} bytes each way; the host got {got}, the guest {acked}");
                    }
                    let tx = run.line("tcp-send ")?.to_string();
                    let rx = run.line("tcp-recv ")?.to_string();
                    println!("    guest: {tx}\n    guest: {rx}");
                    let tx_v = kv_get(&parse_kv(&tx, "tcp-send").unwrap_or_default(), "mbps")?;
                    let rx_v = kv_get(&parse_kv(&rx, "tcp-recv").unwrap_or_default(), "mbps")?;
                    rows.add(net_tests[0].0, "MB/s", tx_v, run.phase_cpu("tcp_tx"));
                    rows.add(net_tests[1].0, "MB/s", rx_v, run.phase_cpu("tcp_rx"));
                    Ok(())
                })();
                if let Err(e) = r {
                    rows.fail(&net_tests, &e);
                }
            }
        }
    }

    let vsock_test = [("vsock echo (tx+rx)", "MB/s")];
    for i in 0..o.runs {
        println!("  vsock, run {}:", i + 1);
        let r = (|| -> Result<()> {
            let uds = dir.join(format!("v{i}.sock"));
            let port_path = format!("{}_{VSOCK_PORT}", uds.display());
            // An earlier pass (--seccomp-compare runs everything twice) left
            // its listening socket's file behind.
            let _ = std::fs::remove_file(&port_path);
            let _ = std::fs::remove_file(&uds);
            let l =
                UnixListener::bind(&port_path).with_context(|| format!("binding {port_path}"))?;
            let guest = format!(
                "echo phase vsock && kiln-agent vsock-send 2 {VSOCK_PORT} {bytes} && echo phase end"
            );
            let devices = ["--vsock".to_string(), format!("3,{}", uds.display())];
            let (run, echoed) = with_host(
                move |stop| vsock_host(l, stop),
                || run_guest(exe, flags, o.mem, &devices, &guest),
            )?;
            let line = run.line("sent ")?.to_string();
            println!("    guest: {line}");
            let v = parse_round_trip(&line, bytes)?;
            if echoed != bytes {
                bail!("the host echoed {echoed} of {bytes} bytes");
            }
            rows.add(vsock_test[0].0, "MB/s", v, run.phase_cpu("vsock"));
            Ok(())
        })();
        if let Err(e) = r {
            rows.fail(&vsock_test, &e);
        }
    }

    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        // pid (comm with spaces) state ppid ... utime=14 stime=15 ... guest_time=43
        let mut fields: Vec<String> = (3..=52).map(|i| i.to_string()).collect();
        fields[0] = "S".into();
        let stat = format!("1234 (kiln (x) y) {}", fields.join(" "));
        assert_eq!(
            parse_stat(&stat),
            Some(Cpu {
                busy: 14 + 15,
                guest: 43
            })
        );
        assert_eq!(parse_stat("1 (short) S 1 2"), None);
        let a = Cpu { busy: 10, guest: 4 };
        assert_eq!(
            Cpu { busy: 25, guest: 9 }.since(a),
            Cpu { busy: 15, guest: 5 }
        );
    }

    #[test]
    fn result_lines() {
        let kv = parse_kv(
            "blk seq_read_mbps=812.5 seq_write_mbps=300.0 rand4k_read_iops=12345 seq_bytes=67108864",
            "blk",
        )
        .unwrap();
        assert_eq!(kv_get(&kv, "seq_read_mbps").unwrap(), 812.5);
        assert_eq!(kv_get(&kv, "rand4k_read_iops").unwrap(), 12345.0);
        assert!(kv_get(&kv, "nope").is_err());
        assert!(parse_kv("blkx a=1", "blk").is_none());
        let l = "sent 1048576 00aa recv 1048576 00aa (42.5 MB/s)";
        assert_eq!(parse_round_trip(l, 1 << 20).unwrap(), 42.5);
        assert!(
            parse_round_trip("sent 1048576 00aa recv 1048576 00bb (42.5 MB/s)", 1 << 20).is_err()
        );
        assert!(parse_round_trip(l, 2 << 20).is_err());
    }

    #[test]
    fn phases_and_table() {
        let c = |busy| Cpu { busy, guest: 1 };
        let run = GuestRun {
            lines: vec!["x".into(), "tcp-send bytes=1 mbps=2".into()],
            marks: vec![
                ("tcp_tx".into(), c(100)),
                ("end".into(), c(130)),
                ("tcp_rx".into(), c(131)),
                ("end".into(), c(150)),
            ],
        };
        assert_eq!(run.phase_cpu("tcp_tx").unwrap().busy, 30);
        assert_eq!(run.phase_cpu("tcp_rx").unwrap().busy, 19);
        assert!(run.phase_cpu("end").is_some());
        assert!(run.phase_cpu("none").is_none());
        assert!(run.line("tcp-send").is_ok() && run.line("tcp-recv").is_err());

        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4u64, 1]), Some(1));
        assert_eq!(median::<u64>(&[]), None);

        let mut rows = Rows::default();
        rows.row("blk sync seq read 1M", "MB/s")
            .values
            .extend([10.0, 30.0, 20.0]);
        rows.row("net tcp guest→host", "MB/s").errors = 1;
        let t = format_table(&rows.0);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("test"));
        assert!(lines[1].contains("20.0 MB/s"), "{t}");
        assert!(lines[1].trim_end().ends_with('3'), "{t}");
        assert!(
            lines[2].contains(" - ") && lines[2].contains("0+1err"),
            "{t}"
        );
    }
}
