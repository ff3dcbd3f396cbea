//! `kiln bench migrate`: live migration total time and downtime (the VM
//! paused at the source → running at the destination) for an idle guest
//! and for one rewriting 64 MiB of memory in a loop.
//!
//! Each run boots a `kiln vmm` from a Firecracker config, starts a
//! `kiln migrate receive` on a Unix socket, calls `PUT /migrate` and reads
//! the figures it answers; then the destination is stopped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_api::migrate::MigrationReport;

use crate::vm::BenchVm;

/// Longest one boot may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

/// The guests measured: name and init command.
const GUESTS: [(&str, &str); 2] = [
    ("idle", "while true; do sleep 1; done"),
    (
        "writing 64 MiB in a loop",
        "while true; do dd if=/dev/zero of=/dirty.bin bs=1M count=64 conv=notrunc 2>/dev/null; done",
    ),
];

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn stats(label: &str, v: Vec<f64>) {
    if let Some((min, median, max)) = super::min_median_max(v) {
        println!("  {label}: min {min:.1}  median {median:.1}  max {max:.1}");
    }
}

/// Runs the benchmark here (the caller has checked KVM runs guests).
pub fn bench_migrate(runs: usize, mem: u64, downtime_ms: u64) -> Result<i32> {
    let exe = std::env::current_exe()?;
    let args = super::guest_images(kiln_vmm::DEFAULT_CMDLINE, mem)?;
    let dir = std::env::temp_dir().join(format!("kiln-bench-mig-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    println!(
        "kiln bench migrate: {mem} MiB guest, 1 vCPU, {runs} runs each, downtime target {downtime_ms} ms, over a Unix socket"
    );
    let result = (|| {
        for (name, command) in GUESTS {
            println!("{name}:");
            let (mut total, mut down, mut rounds) = (Vec::new(), Vec::new(), Vec::new());
            for i in 0..runs.max(1) {
                let r = one(&exe, &dir, &args, command, downtime_ms)
                    .with_context(|| format!("{name}, run {}", i + 1))?;
                println!(
                    "  run {:>2}: total {:>8.1} ms  downtime {:>7.1} ms  {:>2} rounds  {:>6.1} MiB sent, {:>6.2} MiB paused",
                    i + 1,
                    r.total_ms,
                    r.downtime_ms,
                    r.rounds,
                    r.bytes_sent as f64 / (1 << 20) as f64,
                    r.final_bytes as f64 / (1 << 20) as f64,
                );
                total.push(r.total_ms);
                down.push(r.downtime_ms);
                rounds.push(f64::from(r.rounds));
            }
            stats("total (ms)", total);
            stats("downtime (ms)", down);
            stats("rounds", rounds);
        }
        Ok(0)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Boots a guest running `command`, migrates it once, returns the figures.
fn one(
    exe: &Path,
    dir: &Path,
    args: &crate::Guest,
    command: &str,
    downtime_ms: u64,
) -> Result<MigrationReport> {
    let (kernel, initrd) = (&args.kernel, args.initrd.as_ref().expect("resolved"));
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "initrd_path": initrd,
            "boot_args": format!("{} -- \"{command}\"", args.cmdline),
        },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": args.mem },
    });
    let mig = dir.join("mig.sock");
    let _ = std::fs::remove_file(&mig);
    let vm = BenchVm::boot(exe, dir, &config, STEP_TIMEOUT)?;
    // Let the guest's loop get going.
    std::thread::sleep(Duration::from_secs(1));

    let mut dst = Command::new(exe)
        .args(["migrate", "receive", "--listen"])
        .arg(format!("unix:{}", mig.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning kiln migrate receive")?;
    let mut line = String::new();
    BufReader::new(dst.stderr.take().expect("piped")).read_line(&mut line)?;
    if !line.contains("waiting for a migration") {
        kill(dst);
        bail!("kiln migrate receive: {line}");
    }
    let body = serde_json::json!({
        "destination": format!("unix:{}", mig.display()),
        "downtime_ms": downtime_ms,
    })
    .to_string();
    let r = vm.api("PUT", "/migrate", &body);
    kill(dst);
    let r = r?;
    // The source VMM exits once the VM runs at the destination.
    vm.wait();
    Ok(serde_json::from_str(&r.body)?)
}
