//! `kiln bench snapshot`: snapshot create time (full, and diff), and
//! restore latency (exec → VMM restored, exec → first answer from the guest
//! over vsock) for each memory backend: the file mapped privately,
//! userfaultfd served by `kiln uffd-handler`, and the same with a recorded
//! working set prefetched.
//!
//! One VM is booted from a Firecracker config with a vsock echo server in
//! the guest and dirty-page tracking on, paused and snapshotted (full)
//! through the API; it then runs for a second answering one vsock round
//! trip, and a diff snapshot is taken. The full snapshot is then restored
//! `runs` times per backend, each restore answering one vsock round trip.
//! The first Uffd restore records the working set (the pages touched up to
//! that first answer) that the prefetch runs use.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{min_median_max, ms};
use crate::vm::BenchVm;

/// Longest one step (boot, restore) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const VSOCK_PORT: u32 = 5000;

/// Connects through the hybrid vsock socket and echoes one byte; retries
/// until `deadline` while the socket or the guest is not there yet.
fn vsock_ping(uds: &Path, deadline: Instant) -> Result<()> {
    loop {
        let attempt = (|| -> std::io::Result<bool> {
            let mut s = UnixStream::connect(uds)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(format!("CONNECT {VSOCK_PORT}\n").as_bytes())?;
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b)? == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            if !line.starts_with(b"OK ") {
                return Ok(false);
            }
            s.write_all(b"k")?;
            s.read_exact(&mut b)?;
            Ok(b[0] == b'k')
        })();
        if let Ok(true) = attempt {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no vsock answer through {} ({attempt:?})", uds.display());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// How long `f` took (an API call).
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn stats(label: &str, v: Vec<f64>) {
    if let Some((min, median, max)) = min_median_max(v) {
        println!("{label}: min {min:.2}  median {median:.2}  max {max:.2}");
    }
}

/// Runs the benchmark here (the caller has checked KVM runs guests).
pub fn bench_snapshot(runs: usize, mem: u64) -> Result<i32> {
    let exe = std::env::current_exe()?;
    let args = super::guest_images(kiln_vmm::DEFAULT_CMDLINE, mem)?;
    let dir = std::env::temp_dir().join(format!("kiln-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run(&exe, &dir, &args, runs.max(1));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run(exe: &Path, dir: &Path, args: &crate::Guest, runs: usize) -> Result<i32> {
    let (kernel, initrd) = (&args.kernel, args.initrd.as_ref().expect("resolved"));
    let uds = dir.join("v.sock");
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            // The agent echoes one connection; the loop serves the diff
            // snapshot's round trip, then each restore's.
            "boot_args": format!(
                "{} -- \"while true; do kiln-agent vsock-echo {VSOCK_PORT}; done\"",
                args.cmdline
            ),
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": args.mem, "track_dirty_pages": true },
        "vsock": { "guest_cid": 3, "uds_path": uds },
    });
    println!(
        "kiln bench snapshot: {} MiB guest, {runs} restores, kernel {}",
        args.mem,
        kernel.display()
    );

    // Boot, wait for init, pause, snapshot.
    let vm = BenchVm::boot(exe, dir, &config, STEP_TIMEOUT)?;
    // Let the agent reach accept().
    std::thread::sleep(Duration::from_millis(500));
    let pause = timed(|| vm.api("PATCH", "/vm", r#"{"state":"Paused"}"#))?;
    let state = dir.join("state");
    let memf = dir.join("mem");
    let body = serde_json::json!({ "snapshot_path": state, "mem_file_path": memf }).to_string();
    let create = timed(|| vm.api("PUT", "/snapshot/create", &body))?;
    let (diff_create, diff_bytes) = diff_snapshot(&vm, &uds, dir)?;
    drop(vm);
    println!(
        "pause {:.2} ms; snapshot create (full) {:.2} ms; memory file {} MiB, {} MiB on disk",
        ms(pause),
        ms(create),
        args.mem,
        allocated(&memf)? >> 20
    );
    println!(
        "snapshot create (diff, after 1 s of an idle guest and one vsock round trip) {:.2} ms; \
         {} KiB written",
        ms(diff_create),
        diff_bytes >> 10
    );

    let ws = dir.join("ws");
    let mut rows = Vec::new();
    rows.push(variant(
        exe,
        dir,
        &state,
        runs,
        "File (MAP_PRIVATE)",
        |_| Ok((vec!["--mem-file".into(), memf.clone().into()], None)),
    )?);
    rows.push(variant(exe, dir, &state, runs, "Uffd, no prefetch", |i| {
        // The first of these runs records the working set.
        let record = (i == 0).then_some(("--record", ws.as_path()));
        handler(exe, dir, &memf, record)
    })?);
    let ws_pages = std::fs::read_to_string(&ws)
        .map(|t| t.lines().count().saturating_sub(1))
        .unwrap_or(0);
    println!("working set recorded by the first Uffd restore: {ws_pages} pages");
    rows.push(variant(exe, dir, &state, runs, "Uffd + prefetch", |_| {
        handler(exe, dir, &memf, Some(("--prefetch", ws.as_path())))
    })?);
    println!(
        "\nrestore, median of {runs} (handler started beforehand)   exec→restored   exec→first vsock answer"
    );
    for r in &rows {
        println!(
            "  {:<46} {:>10}   {:>10.2} ms{}",
            r.label,
            r.restored.map_or("?".into(), |v| format!("{v:.2} ms")),
            r.answer,
            r.note
        );
    }
    println!("live migration: see `kiln bench migrate`");
    println!("firecracker comparison: no firecracker binary here");
    Ok(0)
}

/// The medians of one way of restoring.
struct Row {
    label: &'static str,
    restored: Option<f64>,
    answer: f64,
    note: String,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied()
}

/// Starts `kiln uffd-handler` on a fresh socket (with `extra`: --record or
/// --prefetch and its file); returns the `kiln restore` arguments to use it.
fn handler(
    exe: &Path,
    dir: &Path,
    memf: &Path,
    extra: Option<(&str, &Path)>,
) -> Result<(Vec<std::ffi::OsString>, Option<Child>)> {
    let sock = dir.join("handler.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = Command::new(exe);
    cmd.arg("uffd-handler")
        .arg("--sock")
        .arg(&sock)
        .arg("--mem-file")
        .arg(memf);
    if let Some((flag, path)) = extra {
        cmd.arg(flag).arg(path);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning kiln uffd-handler")?;
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > STEP_TIMEOUT {
            kill(child);
            bail!("kiln uffd-handler never listened on {}", sock.display());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    Ok((vec!["--uffd-sock".into(), sock.into()], Some(child)))
}

/// Restores the snapshot `runs` times with the memory arguments `setup`
/// gives (and the page-fault handler it may start), timing each restore.
fn variant(
    exe: &Path,
    dir: &Path,
    state: &Path,
    runs: usize,
    label: &'static str,
    mut setup: impl FnMut(usize) -> Result<(Vec<std::ffi::OsString>, Option<Child>)>,
) -> Result<Row> {
    println!("{label}:");
    let mut to_restored = Vec::new();
    let mut to_answer = Vec::new();
    let mut prefetch_ms = Vec::new();
    for i in 0..runs {
        let clone_uds = dir.join(format!("c{i}.sock"));
        let (mem_args, handler) = setup(i)?;
        let t0 = Instant::now();
        let mut c = Command::new(exe)
            .args(["--log-level", "info", "restore", "--snapshot"])
            .arg(state)
            .args(&mem_args)
            .arg("--vsock-override")
            .arg(&clone_uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning kiln restore")?;
        let ping = vsock_ping(&clone_uds, t0 + STEP_TIMEOUT);
        let answered = t0.elapsed();
        let _ = c.kill();
        let mut err = String::new();
        if let Some(mut e) = c.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = c.wait();
        // The handler ends once its VMM is gone; its last line sums up.
        let summary = handler.map(|h| {
            let out = h.wait_with_output().map(|o| o.stderr).unwrap_or_default();
            String::from_utf8_lossy(&out).trim().to_string()
        });
        ping.with_context(|| format!("{label}, restore {}: {err}", i + 1))?;
        // "restored in 1.234ms" from the VMM's own log.
        let restored = err
            .lines()
            .find_map(|l| l.split("restored in ").nth(1))
            .and_then(parse_duration);
        if let Some(r) = restored {
            to_restored.push(ms(r));
        }
        to_answer.push(ms(answered));
        let served = summary.as_deref().and_then(|s| s.split("; ").nth(1));
        if let Some(p) = summary.as_deref().and_then(prefetch_time) {
            prefetch_ms.push(p);
        }
        println!(
            "  restore {:>2}: exec→restored {:>8}  exec→first vsock answer {:>8.2} ms{}",
            i + 1,
            restored.map_or("?".into(), |r| format!("{:.2} ms", ms(r))),
            ms(answered),
            served.map(|s| format!("  ({s})")).unwrap_or_default()
        );
        if i == 0 {
            // Where the first restore's time went, from the VMM's log.
            for phase in err.lines().filter_map(|l| l.split("restore: ").nth(1)) {
                println!("      {phase}");
            }
        }
    }
    stats("  exec→restored (ms)", to_restored.clone());
    stats("  exec→first vsock answer (ms)", to_answer.clone());
    Ok(Row {
        label,
        restored: median(to_restored),
        answer: median(to_answer).unwrap_or(f64::NAN),
        note: median(prefetch_ms)
            .map(|p| format!("  (prefetch {p:.2} ms)"))
            .unwrap_or_default(),
    })
}

/// The prefetch time in a handler's summary ("... prefetched in 1.23 ms").
fn prefetch_time(summary: &str) -> Option<f64> {
    summary
        .split("prefetched in ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Bytes of `path` on disk (holes excluded).
fn allocated(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// Resumes the VM just snapshotted, lets it run for a second with one vsock
/// round trip (device writes), pauses it and takes a diff snapshot: its
/// create time and the bytes of memory it wrote.
fn diff_snapshot(vm: &BenchVm, uds: &Path, dir: &Path) -> Result<(Duration, u64)> {
    vm.api("PATCH", "/vm", r#"{"state":"Resumed"}"#)?;
    vsock_ping(uds, Instant::now() + STEP_TIMEOUT)
        .map_err(|e| anyhow::anyhow!("{e:#}{}", vm.diagnostics()))?;
    std::thread::sleep(Duration::from_secs(1));
    vm.api("PATCH", "/vm", r#"{"state":"Paused"}"#)?;
    let memf = dir.join("diff.mem");
    let body = serde_json::json!({
        "snapshot_path": dir.join("diff.state"),
        "mem_file_path": memf,
        "snapshot_type": "Diff",
    })
    .to_string();
    let t = timed(|| vm.api("PUT", "/snapshot/create", &body))?;
    Ok((t, allocated(&memf)?))
}

/// Parses Rust's `Debug` form of a `Duration` ("1.5ms", "830µs", "2.1s").
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_alphabetic() || c == 'µ')?);
    let v: f64 = num.parse().ok()?;
    let secs = match unit {
        "s" => v,
        "ms" => v / 1e3,
        "µs" | "us" => v / 1e6,
        "ns" => v / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_from_debug_output() {
        assert_eq!(parse_duration("1.5ms"), Some(Duration::from_micros(1500)));
        assert_eq!(parse_duration("830µs"), Some(Duration::from_micros(830)));
        assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("soon"), None);
    }
}
