//! Kiln's benchmarks, run by `kiln bench ...` (they time the `kiln`
//! binary that calls them, as separate processes): `boot` (exec → guest
//! init marker, and the VMM's own memory, here), `io` ([`io`]), `api`
//! ([`api`]), `api-flood` ([`flood`]), `snapshot` ([`snapshot`]), `serve`
//! ([`serve`]) and `migrate` ([`migrate`]).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use kiln_lab::scripts::{shell_quote, GUEST_READY_MARKER};

pub mod api;
pub mod flood;
pub mod io;
pub mod migrate;
pub mod serve;
pub mod snapshot;
pub mod vm;

/// Options of `kiln bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchKind,
}

#[derive(Subcommand, Debug)]
enum BenchKind {
    /// Boot time (exec → init marker) and VMM memory overhead.
    Boot {
        /// Number of boots.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        mem: u64,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Kernel command line.
        #[arg(long, default_value = kiln_vmm::DEFAULT_CMDLINE)]
        cmdline: String,
        /// Boot with seccomp on and off, alternately, and compare.
        #[arg(long)]
        seccomp_compare: bool,
    },
    /// virtio-blk, virtio-net and vsock throughput measured in the guest,
    /// with the VMM's host CPU time per phase.
    Io {
        /// Boots per test (the table shows medians).
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// MiB per transfer: disk sequential span, TCP and vsock payloads.
        #[arg(long, default_value_t = 64)]
        size: u64,
        /// 4 KiB random disk reads per run.
        #[arg(long, default_value_t = 2000)]
        rand_ops: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        mem: u64,
        /// Run every test with seccomp on and off and compare.
        #[arg(long)]
        seccomp_compare: bool,
    },
    /// `kiln vmm`'s API: exec → socket ready, and call latency (no guest).
    Api {
        /// `kiln vmm` spawns to time.
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// `PUT /machine-config` calls to time.
        #[arg(long, default_value_t = 5000)]
        calls: usize,
    },
    /// Hostile clients against a running API (`--api-sock` of `kiln run` or
    /// `kiln vmm`): fails if `GET /` slows down or bad requests go unanswered.
    ApiFlood {
        /// The API socket.
        #[arg(long)]
        sock: PathBuf,
        /// Hostile connections.
        #[arg(long, default_value_t = 200)]
        conns: usize,
        /// Seconds to keep them busy.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Slowest acceptable `GET /` probe, milliseconds.
        #[arg(long, default_value_t = 1000)]
        max_probe_ms: u64,
    },
    /// Snapshot create time and restore latency (to the VMM restored, to
    /// the guest's first answer over vsock).
    Snapshot {
        /// Number of restores.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        mem: u64,
    },
    /// `kiln serve`: template boot to snapshot, cold and warm call latency,
    /// host memory of many idle instances of one function.
    Serve {
        /// Calls per latency figure.
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Instances for the memory figure.
        #[arg(long, default_value_t = 10)]
        instances: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 128)]
        mem: u64,
    },
    /// Live migration total time and downtime, idle and memory-writing guest.
    Migrate {
        /// Migrations per guest.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        mem: u64,
        /// Downtime target, milliseconds.
        #[arg(long, default_value_t = kiln_api::migrate::DEFAULT_DOWNTIME_MS)]
        downtime_ms: u64,
    },
}

/// When this host's KVM cannot run guests natively (and we are not in the
/// lab already), runs `kiln bench ARGS` inside the lab and returns its exit
/// status; `None` means: run it here.
fn in_lab(args: &str) -> Result<Option<i32>> {
    if std::env::var_os("KILN_IN_LAB").is_some() || !use_lab() {
        return Ok(None);
    }
    eprintln!("kiln: host KVM is not native; running the benchmark inside the lab");
    let images = kiln_lab::images::ensure(&kiln_lab::images::default_cache_dir())?;
    let lab = lab_with_kiln(images, Duration::from_secs(3600))?;
    let cmd = format!("{}kiln bench {args}", kiln_lab::lab::kiln_env_prefix());
    Ok(Some(lab.run_interactive(&cmd)?))
}

/// Runs a benchmark.
pub fn bench(args: BenchArgs) -> Result<i32> {
    match args.what {
        BenchKind::Boot {
            runs,
            mem,
            vcpus,
            cmdline,
            seccomp_compare,
        } => {
            let args = format!(
                "boot --runs {runs} --mem {mem} --vcpus {vcpus} --cmdline {}{}",
                shell_quote(&cmdline),
                if seccomp_compare {
                    " --seccomp-compare"
                } else {
                    ""
                }
            );
            if let Some(status) = in_lab(&args)? {
                return Ok(status);
            }
            if seccomp_compare {
                return boot_seccomp_compare(runs, mem, vcpus, &cmdline);
            }
            boot_bench(runs, mem, vcpus, &cmdline)
        }
        BenchKind::Snapshot { runs, mem } => {
            if let Some(status) = in_lab(&format!("snapshot --runs {runs} --mem {mem}"))? {
                return Ok(status);
            }
            snapshot::bench_snapshot(runs, mem)
        }
        BenchKind::Serve {
            runs,
            instances,
            mem,
        } => {
            let args = format!("serve --runs {runs} --instances {instances} --mem {mem}");
            if let Some(status) = in_lab(&args)? {
                return Ok(status);
            }
            serve::bench_serve(serve::ServeBenchOptions {
                runs,
                instances,
                mem,
            })
        }
        BenchKind::Migrate {
            runs,
            mem,
            downtime_ms,
        } => {
            let args = format!("migrate --runs {runs} --mem {mem} --downtime-ms {downtime_ms}");
            if let Some(status) = in_lab(&args)? {
                return Ok(status);
            }
            migrate::bench_migrate(runs, mem, downtime_ms)
        }
        BenchKind::Io {
            runs,
            size,
            rand_ops,
            mem,
            seccomp_compare,
        } => io::bench_io(io::IoOptions {
            runs: runs.max(1),
            size_mib: size.max(1),
            rand_ops,
            mem,
            seccomp_compare,
        }),
        BenchKind::ApiFlood {
            sock,
            conns,
            secs,
            max_probe_ms,
        } => flood::flood(flood::FloodOptions {
            sock,
            conns,
            secs,
            max_probe: Duration::from_millis(max_probe_ms),
        }),
        BenchKind::Api { runs, calls } => api::bench_api(api::ApiOptions { runs, calls }),
    }
}

/// Whether benchmarks that boot guests run in the lab.
fn use_lab() -> bool {
    kiln_lab::wanted(|| {
        matches!(
            kiln_vmm::probe::probe(),
            kiln_vmm::probe::KvmProbe::Native(_)
        )
    })
}

/// A lab with the running `kiln` binary inside.
fn lab_with_kiln(images: kiln_lab::Images, timeout: Duration) -> Result<kiln_lab::Lab> {
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    Ok(kiln_lab::Lab::new(images).binary(exe).timeout(timeout))
}

/// A bare guest of Kiln's images (kernel and initrd resolved as `kiln run`
/// does).
pub struct Guest {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initrd.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest memory, MiB.
    pub mem: u64,
}

/// The [`Guest`] of Kiln's images (or `$KILN_KERNEL`/`$KILN_INITRD`).
pub fn guest_images(cmdline: &str, mem: u64) -> Result<Guest> {
    let (mut kernel, mut initrd) = (None, None);
    kiln_lab::images::resolve_guest(&mut kernel, &mut initrd)
        .context("building Kiln's guest images")?;
    Ok(Guest {
        kernel: kernel.expect("resolved"),
        initrd,
        cmdline: cmdline.to_string(),
        mem,
    })
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Minimum, median (the upper one for an even count) and maximum of `v`.
pub fn min_median_max(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    v.sort_by(|a, b| a.total_cmp(b));
    Some((*v.first()?, v[v.len() / 2], *v.last()?))
}

/// Kills a child process that outlives its time limit.
pub struct Watchdog {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<bool>,
}

impl Watchdog {
    /// Starts watching `pid`: SIGKILL after `limit` unless finished first.
    pub fn start(pid: u32, limit: Duration) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if flag.load(Ordering::Acquire) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // SAFETY: kill(2) on our child's pid; at worst it already exited.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            true
        });
        Self { done, thread }
    }

    /// Stops watching (call after the child was reaped); returns whether
    /// the child was killed for running too long.
    pub fn finish(self) -> bool {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        self.thread.join().unwrap_or(false)
    }
}

/// Longest a single benchmark boot may take.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

struct Sample {
    to_marker: Duration,
    overhead_kib: u64,
    guest_kib: u64,
    /// The overhead by kind of mapping, KiB.
    parts: Vec<(&'static str, u64)>,
    threads: u64,
}

fn boot_bench(runs: usize, mem: u64, vcpus: u8, cmdline: &str) -> Result<i32> {
    let exe = std::env::current_exe()?;
    let args = guest_images(cmdline, mem)?;
    let kernel = args.kernel;
    let initrd = args.initrd.expect("resolved");
    println!(
        "kiln bench boot: {runs} runs, {vcpus} vCPU, {mem} MiB, kernel {}\n  cmdline: {cmdline}",
        kernel.display()
    );
    let mut samples = Vec::new();
    for i in 0..runs {
        let s = one_boot(&exe, &kernel, &initrd, cmdline, mem, vcpus, &[])
            .with_context(|| format!("boot {}", i + 1))?;
        println!(
            "  run {:>2}: exec→init {:>8.1} ms   VMM overhead RSS {:>6} KiB   guest RSS {:>7} KiB",
            i + 1,
            s.to_marker.as_secs_f64() * 1e3,
            s.overhead_kib,
            s.guest_kib
        );
        samples.push(s);
    }
    let mut t: Vec<f64> = samples
        .iter()
        .map(|s| s.to_marker.as_secs_f64() * 1e3)
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    let mut o: Vec<u64> = samples.iter().map(|s| s.overhead_kib).collect();
    o.sort();
    if t.is_empty() {
        bail!("no runs");
    }
    println!(
        "exec→init-marker ms: min {:.1}  median {:.1}  max {:.1}",
        t[0],
        t[t.len() / 2],
        t[t.len() - 1]
    );
    println!(
        "VMM memory overhead (RSS not backed by guest memory) KiB: min {}  median {}  max {}  (target ≤ 3072)",
        o[0],
        o[o.len() / 2],
        o[o.len() - 1]
    );
    let median = samples
        .iter()
        .find(|s| s.overhead_kib == o[o.len() / 2])
        .expect("the median is a sample");
    let parts: Vec<String> = median
        .parts
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    println!(
        "  of which (median run, KiB): {}; {} threads",
        parts.join(", "),
        median.threads
    );
    if median.parts.iter().any(|&(k, v)| k == "libs" && v > 0) {
        println!(
            "  (a dynamically linked kiln: the C library's mapped pages count; \
             `cargo build-static -p kiln` builds the static binary Kiln ships)"
        );
    }
    match std::env::var_os("KILN_FIRECRACKER") {
        Some(fc) => println!(
            "firecracker comparison: KILN_FIRECRACKER={} is set, but side-by-side runs are not implemented yet",
            PathBuf::from(fc).display()
        ),
        None => println!("firecracker comparison: no firecracker binary here (set KILN_FIRECRACKER)"),
    }
    Ok(0)
}

/// Boot time with seccomp on and off, boots alternating (so that drift
/// on a shared host hits both alike).
fn boot_seccomp_compare(runs: usize, mem: u64, vcpus: u8, cmdline: &str) -> Result<i32> {
    let exe = std::env::current_exe()?;
    let args = guest_images(cmdline, mem)?;
    let kernel = args.kernel;
    let initrd = args.initrd.expect("resolved");
    println!(
        "kiln bench boot --seccomp-compare: {runs} boots each way, alternating, {vcpus} vCPU, {mem} MiB\n  cmdline: {cmdline}"
    );
    let (mut on, mut off) = (Vec::new(), Vec::new());
    for i in 0..runs {
        for (flags, times) in [(&[][..], &mut on), (&["--no-seccomp"][..], &mut off)] {
            let s = one_boot(&exe, &kernel, &initrd, cmdline, mem, vcpus, flags)
                .with_context(|| format!("boot {} {flags:?}", i + 1))?;
            times.push(s.to_marker.as_secs_f64() * 1e3);
        }
        println!(
            "  run {:>2}: seccomp on {:>8.1} ms   off {:>8.1} ms",
            i + 1,
            on[i],
            off[i]
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
    };
    let (a, b) = (median(&mut on), median(&mut off));
    if b <= 0.0 {
        bail!("no runs");
    }
    println!(
        "exec→init-marker median ms: seccomp on {a:.1}, off {b:.1}; cost {:+.2}% (target: under 2%)",
        (a - b) / b * 100.0
    );
    Ok(0)
}

fn one_boot(
    exe: &PathBuf,
    kernel: &PathBuf,
    initrd: &PathBuf,
    cmdline: &str,
    mem: u64,
    vcpus: u8,
    flags: &[&str],
) -> Result<Sample> {
    let start = Instant::now();
    let mut child = Command::new(exe)
        .arg("run")
        .args(flags)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--cmdline")
        .arg(cmdline)
        .args(["--mem", &mem.to_string(), "--vcpus", &vcpus.to_string()])
        .args(["--", "true"])
        .env("KILN_LAB", "0")
        .env("KILN_MEM_REPORT", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning kiln run")?;
    let pid = child.id();
    // A boot that hangs is killed, and reported with its console.
    let watchdog = Watchdog::start(pid, BOOT_TIMEOUT);
    let mut console = String::new();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut ranges = Vec::new();
        let mut text = String::new();
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            if let Some(rest) = line.strip_prefix("kiln-mem: ") {
                let mut it = rest.split_whitespace();
                if let (Some(a), Some(l)) = (it.next(), it.next()) {
                    if let (Ok(a), Ok(l)) = (
                        u64::from_str_radix(a.trim_start_matches("0x"), 16),
                        l.parse::<u64>(),
                    ) {
                        ranges.push((a, a + l));
                    }
                }
            } else {
                text.push_str(&line);
                text.push('\n');
            }
        }
        (ranges, text)
    });
    let mut to_marker = None;
    let mut sample_mem = None;
    for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
        if console.len() < 64 * 1024 {
            console.push_str(&line);
            console.push('\n');
        }
        if to_marker.is_none() && line.trim_end() == GUEST_READY_MARKER {
            to_marker = Some(start.elapsed());
            let read = |f: &str| std::fs::read_to_string(format!("/proc/{pid}/{f}"));
            sample_mem = Some((
                read("smaps").unwrap_or_default(),
                read("status").unwrap_or_default(),
            ));
        }
    }
    let status = child.wait()?;
    let timed_out = watchdog.finish();
    let (ranges, errtext) = err_thread.join().expect("stderr reader");
    if timed_out {
        bail!(
            "kiln run did not finish within {BOOT_TIMEOUT:?}; console:\n{console}\nstderr:\n{errtext}"
        );
    }
    let Some(to_marker) = to_marker else {
        bail!("the guest never printed {GUEST_READY_MARKER} (status {status}): {errtext}");
    };
    if !status.success() {
        bail!("kiln run failed ({status}): {errtext}");
    }
    let (smaps, status) = sample_mem.unwrap_or_default();
    let (overhead_kib, guest_kib) = rss_split(&smaps, &ranges);
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    Ok(Sample {
        to_marker,
        overhead_kib,
        guest_kib,
        parts: rss_kinds(&smaps, &ranges, exe),
        threads,
    })
}

/// The RSS in `smaps` outside guest memory by kind of mapping, KiB: the
/// binary `exe` (code, then data), other files (shared libraries), the
/// heap, the main stack, anonymous memory (thread stacks, malloc arenas,
/// buffers) and the rest (vDSO, ...).
pub fn rss_kinds(
    smaps: &str,
    guest: &[(u64, u64)],
    exe: &std::path::Path,
) -> Vec<(&'static str, u64)> {
    const KINDS: [&str; 7] = ["text", "data", "libs", "heap", "stack", "anon", "other"];
    let exe = exe.to_string_lossy();
    let mut kib = [0u64; KINDS.len()];
    let mut current: Option<usize> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                let perms = words.next().unwrap_or("");
                let path = words.nth(3).unwrap_or("");
                current = if guest.iter().any(|(s, e)| a < *e && *s < b) {
                    None
                } else {
                    Some(match path {
                        p if p == exe && perms.contains('x') => 0,
                        p if p == exe => 1,
                        "[heap]" => 3,
                        "[stack]" => 4,
                        "" => 5,
                        p if p.starts_with('/') => 2,
                        _ => 6,
                    })
                };
                continue;
            }
        }
        if let (Some(k), Some(v)) = (current, line.strip_prefix("Rss:")) {
            kib[k] += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    KINDS.into_iter().zip(kib).collect()
}

/// Splits the RSS in `smaps` into (not guest memory, guest memory) KiB.
pub fn rss_split(smaps: &str, guest: &[(u64, u64)]) -> (u64, u64) {
    let mut other = 0;
    let mut in_guest = 0;
    let mut current_is_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                current_is_guest = guest.iter().any(|(s, e)| a < *e && *s < b);
                continue;
            }
        }
        if let Some(v) = line.strip_prefix("Rss:") {
            let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            if current_is_guest {
                in_guest += kib;
            } else {
                other += kib;
            }
        }
    }
    (other, in_guest)
}

#[cfg(test)]
mod tests {
    use super::{min_median_max, rss_kinds, rss_split};

    #[test]
    fn min_median_max_of_odd_even_and_empty() {
        assert_eq!(min_median_max(vec![3.0, 1.0, 2.0]), Some((1.0, 2.0, 3.0)));
        assert_eq!(min_median_max(vec![4.0, 1.0]), Some((1.0, 4.0, 4.0)));
        assert_eq!(min_median_max(vec![]), None);
    }

    #[test]
    fn smaps_split_by_guest_ranges() {
        let smaps = "\
55d0a0000000-55d0a0100000 r-xp 00000000 08:01 1 /kiln
Size:               1024 kB
Rss:                 300 kB
7f0000000000-7f0010000000 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               20000 kB
7f0010000000-7f0010021000 rw-p 00000000 00:00 0
Rss:                 132 kB
";
        let (other, guest) = rss_split(smaps, &[(0x7f00_0000_0000, 0x7f00_1000_0000)]);
        assert_eq!((other, guest), (432, 20000));
        let kinds = rss_kinds(
            smaps,
            &[(0x7f00_0000_0000, 0x7f00_1000_0000)],
            std::path::Path::new("/kiln"),
        );
        assert_eq!(kinds[0], ("text", 300));
        assert_eq!(kinds[5], ("anon", 132));
        assert_eq!(kinds.iter().map(|k| k.1).sum::<u64>(), 432);
    }
}
