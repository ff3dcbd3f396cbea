//! `kiln bench api`: how fast `kiln vmm` serves its API.
//!
//! - exec → API ready: spawn `kiln vmm --api-sock S` and time until the
//!   first connect succeeds and `GET /` is answered;
//! - call latency: `PUT /machine-config` round trips on one keep-alive
//!   connection.
//!
//! Neither needs KVM (nothing is booted), so it runs natively. With
//! `KILN_FIRECRACKER=/path/to/firecracker` the same is measured for
//! Firecracker (same flags, same API).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::Watchdog;

/// Longest the API may take to come up, or one call to be answered.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Options of `kiln bench api`.
pub struct ApiOptions {
    /// Spawns to time.
    pub runs: usize,
    /// API calls to time.
    pub calls: usize,
}

/// Sorted samples, microseconds.
struct Stats(Vec<f64>);

impl Stats {
    fn new(mut v: Vec<f64>) -> Self {
        v.sort_by(|a, b| a.total_cmp(b));
        Self(v)
    }
    /// The `p`-th percentile (nearest rank).
    fn pct(&self, p: f64) -> f64 {
        let n = self.0.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.0[rank.clamp(1, n) - 1]
    }
    fn min(&self) -> f64 {
        self.0[0]
    }
}

/// Runs the benchmark.
pub fn bench_api(opts: ApiOptions) -> Result<i32> {
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("kiln-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_all(&exe, "kiln", &["vmm"], &dir, &opts);
    let fc = std::env::var_os("KILN_FIRECRACKER").map(PathBuf::from);
    let fc_result = match &fc {
        Some(fc) if fc.is_file() => Some(run_all(fc, "firecracker", &[], &dir, &opts)),
        _ => None,
    };
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    match (fc, fc_result) {
        (_, Some(r)) => {
            r?;
        }
        (Some(fc), None) => println!(
            "firecracker comparison: KILN_FIRECRACKER={} is not a file; comparison not made",
            fc.display()
        ),
        (None, None) => println!(
            "firecracker comparison: could not be made (no firecracker binary on this machine; set KILN_FIRECRACKER=/path/to/firecracker)"
        ),
    }
    Ok(0)
}

fn run_all(exe: &Path, name: &str, pre: &[&str], dir: &Path, opts: &ApiOptions) -> Result<()> {
    println!(
        "{name} bench api: {} spawns, {} calls ({})",
        opts.runs,
        opts.calls,
        exe.display()
    );
    let sock = dir.join(format!("{name}.sock"));
    let mut ready = Vec::new();
    for i in 0..opts.runs.max(1) {
        let d = time_to_ready(exe, pre, &sock).with_context(|| format!("spawn {}", i + 1))?;
        ready.push(d.as_secs_f64() * 1e6);
    }
    let r = Stats::new(ready);
    println!(
        "  exec → API socket ready (connect + GET / answered): median {:.2} ms  p90 {:.2} ms  min {:.2} ms  (target ≤ 3 ms)",
        r.pct(50.0) / 1e3,
        r.pct(90.0) / 1e3,
        r.min() / 1e3
    );
    let calls = call_latency(exe, pre, &sock, opts.calls.max(1))?;
    let c = Stats::new(calls);
    println!(
        "  PUT /machine-config round trip (keep-alive): median {:.1} µs  p99 {:.1} µs  min {:.1} µs  (target ≤ 100 µs)",
        c.pct(50.0),
        c.pct(99.0),
        c.min()
    );
    Ok(())
}

/// A VMM process that is killed and reaped when dropped.
struct Vmm {
    child: Child,
    watchdog: Option<Watchdog>,
}

impl Vmm {
    fn spawn(exe: &Path, pre: &[&str], sock: &Path) -> Result<Self> {
        let _ = std::fs::remove_file(sock);
        let child = Command::new(exe)
            .args(pre)
            .arg("--api-sock")
            .arg(sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", exe.display()))?;
        let watchdog = Some(Watchdog::start(child.id(), READY_TIMEOUT * 6));
        Ok(Self { child, watchdog })
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(w) = self.watchdog.take() {
            w.finish();
        }
    }
}

/// Spawn → first answered `GET /`.
fn time_to_ready(exe: &Path, pre: &[&str], sock: &Path) -> Result<Duration> {
    let start = Instant::now();
    let mut vmm = Vmm::spawn(exe, pre, sock)?;
    loop {
        if let Ok(mut s) = UnixStream::connect(sock) {
            s.set_read_timeout(Some(READY_TIMEOUT))?;
            let (status, _) = call(&mut s, b"GET / HTTP/1.1\r\n\r\n")?;
            let d = start.elapsed();
            if status != 200 {
                bail!("GET / answered {status}");
            }
            return Ok(d);
        }
        if let Some(st) = vmm.child.try_wait()? {
            bail!("{} exited ({st}) before its API was ready", exe.display());
        }
        if start.elapsed() > READY_TIMEOUT {
            bail!("the API socket was not ready within {READY_TIMEOUT:?}");
        }
        std::thread::yield_now();
    }
}

/// `calls` timed `PUT /machine-config` round trips, microseconds.
fn call_latency(exe: &Path, pre: &[&str], sock: &Path, calls: usize) -> Result<Vec<f64>> {
    let _vmm = Vmm::spawn(exe, pre, sock)?;
    let start = Instant::now();
    let mut s = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < READY_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(e) => bail!("connecting to {}: {e}", sock.display()),
        }
    };
    s.set_read_timeout(Some(READY_TIMEOUT))?;
    let mut out = Vec::with_capacity(calls);
    for i in 0..calls + calls / 10 {
        let mem = 128 + (i % 64) * 2;
        let body = format!(r#"{{"vcpu_count":2,"mem_size_mib":{mem}}}"#);
        let req = format!(
            "PUT /machine-config HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let t = Instant::now();
        let (status, text) = call(&mut s, req.as_bytes())?;
        let d = t.elapsed();
        if status != 204 {
            bail!("PUT /machine-config answered {status}: {text}");
        }
        // The first tenth warms up (page faults, caches).
        if i >= calls / 10 {
            out.push(d.as_secs_f64() * 1e6);
        }
    }
    Ok(out)
}

/// Sends one request and reads its whole response: (status, text).
fn call(s: &mut UnixStream, req: &[u8]) -> Result<(u16, String)> {
    s.write_all(req)?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).context("response head")?;
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head
                    .get(9..12)
                    .and_then(|c| c.parse().ok())
                    .context("status code")?;
                let text = String::from_utf8_lossy(&buf[..end + 4 + len]).into_owned();
                return Ok((status, text));
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::Stats;

    #[test]
    fn percentiles() {
        let s = Stats::new((1..=100).rev().map(f64::from).collect());
        assert_eq!(
            (s.min(), s.pct(50.0), s.pct(90.0), s.pct(99.0)),
            (1.0, 50.0, 90.0, 99.0)
        );
        let one = Stats::new(vec![7.0]);
        assert_eq!((one.pct(50.0), one.pct(99.0)), (7.0, 7.0));
    }
}
