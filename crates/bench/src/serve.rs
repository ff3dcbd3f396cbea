//! `kiln bench serve`: the function runtime's figures: a function's
//! template boot-to-snapshot time, call latency on a cold start (restore
//! from the snapshot) and on a warm instance, and the host memory of many
//! idle instances of one function (they share the snapshot's page cache).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kiln_serve::policy::PolicyConfig;
use kiln_serve::vm::VmDefaults;
use kiln_serve::{FunctionSpec, Runtime, ServeConfig};

use super::{min_median_max, ms};

/// Options of `kiln bench serve`.
pub struct ServeBenchOptions {
    /// Calls per measurement.
    pub runs: usize,
    /// Idle instances for the memory figure.
    pub instances: usize,
    /// Guest memory, MiB.
    pub mem: u64,
}

fn runtime(exe: &std::path::Path, dir: &std::path::Path, keep: Duration) -> Result<Arc<Runtime>> {
    let images = super::guest_images(kiln_vmm::DEFAULT_CMDLINE, 128)?;
    Ok(Runtime::new(ServeConfig {
        vm: VmDefaults {
            exe: exe.to_path_buf(),
            kernel: images.kernel,
            initrd: images.initrd.expect("resolved"),
            cmdline: kiln_vmm::DEFAULT_CMDLINE.to_string(),
            start_timeout: Duration::from_secs(120),
        },
        dir: dir.to_path_buf(),
        policy: PolicyConfig {
            fixed_keep_alive: keep,
            // Never learned within a benchmark.
            min_samples: u64::MAX,
            ..PolicyConfig::default()
        },
        max_instances: 10_000,
        tick: Duration::from_millis(5),
    })?)
}

fn summary(label: &str, v: Vec<f64>) {
    if let Some((min, median, max)) = min_median_max(v) {
        println!("{label:<44} min {min:>8.2}  median {median:>8.2}  max {max:>8.2} ms");
    }
}

/// Proportional set size of `pid`, KiB (its shared pages split among sharers).
fn pss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Runs the benchmark here (the caller has checked KVM runs guests).
pub fn bench_serve(o: ServeBenchOptions) -> Result<i32> {
    let exe = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("kiln-bench-serve-{}", std::process::id()));
    let r = run(&exe, &dir, &o);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn run(exe: &std::path::Path, dir: &std::path::Path, o: &ServeBenchOptions) -> Result<i32> {
    let runs = o.runs.max(1);
    let mut spec = FunctionSpec::new("cat");
    spec.mem_size_mib = o.mem;
    println!(
        "kiln bench serve: function `cat` in a {} MiB guest, {runs} calls per figure",
        o.mem
    );

    // Cold starts: no keep-alive, so every call restores an instance.
    let rt = runtime(exe, &dir.join("cold"), Duration::ZERO)?;
    let t = Instant::now();
    rt.register("cold", spec.clone())?;
    println!("template boot to snapshot: {:.0} ms", ms(t.elapsed()));
    let mut cold = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let inv = rt.invoke("cold", b"ping")?;
        let took = t.elapsed();
        if inv.result.stdout != b"ping" {
            bail!("the function answered {:?}", inv.result.stdout);
        }
        if inv.start == kiln_serve::Start::Cold {
            cold.push(ms(took));
        }
        // Let the keep-alive loop stop the instance.
        let t = Instant::now();
        while rt.live_instances() > 0 && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    rt.shutdown();
    drop(rt);
    summary("cold start (restore + call), per call", cold);

    // Warm calls and idle instances.
    let rt = runtime(exe, &dir.join("warm"), Duration::from_secs(3600))?;
    rt.register("warm", spec.clone())?;
    rt.invoke("warm", b"x")?;
    let mut warm = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let inv = rt.invoke("warm", b"ping")?;
        if inv.start == kiln_serve::Start::Warm {
            warm.push(ms(t.elapsed()));
        }
    }
    summary("warm call, per call", warm);

    let n = o.instances.max(1);
    let mut hold = FunctionSpec::new("sleep 1; cat");
    hold.mem_size_mib = o.mem;
    rt.register("hold", hold)?;
    let before = meminfo_available_kib();
    let t = Instant::now();
    std::thread::scope(|s| {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let rt = rt.clone();
                // Each call holds its instance for a second: n instances.
                s.spawn(move || rt.invoke("hold", b"x").map(|_| ()))
            })
            .collect();
        calls
            .into_iter()
            .try_for_each(|c| c.join().expect("call thread"))
    })?;
    let stats = rt.stats("hold")?;
    let pids = stats.idle_pids.clone();
    let pss: u64 = pids.iter().filter_map(|p| pss_kib(*p)).sum();
    let after = meminfo_available_kib();
    println!(
        "{} idle instances after {n} concurrent calls ({:.0} ms): PSS {:.1} MiB in all, {:.1} MiB each \
         (guest memory {} MiB each); host MemAvailable fell {:.1} MiB",
        pids.len(),
        ms(t.elapsed()),
        pss as f64 / 1024.0,
        pss as f64 / 1024.0 / pids.len().max(1) as f64,
        o.mem,
        before.saturating_sub(after) as f64 / 1024.0
    );
    rt.shutdown();
    println!("firecracker comparison: no firecracker binary here");
    Ok(0)
}

fn meminfo_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
