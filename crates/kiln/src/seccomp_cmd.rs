//! The seccomp flags of the VMM commands, and `kiln seccomp-probe` (a
//! hidden test command: one syscall on a thread of a given kind, under that
//! kind's production filter).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use kiln_seccomp::{Filters, Mode, ThreadKind};

/// `--no-seccomp` and `--seccomp-filter` (`kiln run`, `kiln restore`).
#[derive(Args, Clone, Debug, Default)]
pub struct SeccompArgs {
    /// Run every thread without a seccomp filter (not for production).
    #[arg(long, conflicts_with = "seccomp_filter")]
    pub no_seccomp: bool,
    /// Per-thread seccomp filters from this JSON file (see docs/seccomp.md)
    /// instead of the built-in ones.
    #[arg(long, value_name = "FILE")]
    pub seccomp_filter: Option<PathBuf>,
}

/// The filters the flags (and `KILN_SECCOMP`) ask for, compiled.
pub fn filters(no_seccomp: bool, file: Option<&Path>) -> Result<Filters> {
    if no_seccomp {
        return Ok(Filters::none());
    }
    let mode = Mode::from_env()?;
    Ok(match file {
        Some(f) => Filters::from_file(f, mode)?,
        None => Filters::builtin(mode)?,
    })
}

/// Compiles the filters and makes them the process's, before any VMM
/// thread starts.
pub fn init(no_seccomp: bool, file: Option<&Path>) -> Result<()> {
    let f = filters(no_seccomp, file)?;
    if !f.any() {
        log::warn!("seccomp filters are off (--no-seccomp)");
    }
    kiln_seccomp::init(f)?;
    Ok(())
}

/// Options of `kiln seccomp-probe`.
#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// The thread kind whose built-in filter the probe thread installs.
    kind: String,
    /// The syscall number.
    nr: i64,
    /// Its arguments (decimal, negative or 0x hex; missing ones are 0).
    #[arg(allow_hyphen_values = true)]
    args: Vec<String>,
    /// Use this custom filter set instead of the built-in one.
    #[arg(long, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
}

fn number(s: &str) -> Result<u64> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => s
            .parse::<u64>()
            .or_else(|_| s.parse::<i64>().map(|v| v as u64)),
    };
    r.map_err(|_| anyhow::anyhow!("seccomp-probe: {s:?} is not a number"))
}

/// `kiln seccomp-probe KIND NR [ARGS...]`: starts a thread of `KIND`
/// exactly as the VMM does (its production filter installed first, through
/// the spawner) and makes syscall `NR` there. A refused syscall kills the
/// process (`SIGSYS`); an allowed one prints `allowed: ret=R errno=E` and
/// the probe exits 0.
pub fn probe(args: ProbeArgs) -> Result<i32> {
    let kind = ThreadKind::from_name(&args.kind)
        .ok_or_else(|| anyhow::anyhow!("seccomp-probe: unknown thread kind {:?}", args.kind))?;
    let mut a = [0u64; 6];
    if args.args.len() > a.len() {
        anyhow::bail!("seccomp-probe: at most 6 syscall arguments");
    }
    for (slot, s) in a.iter_mut().zip(&args.args) {
        *slot = number(s)?;
    }
    init(false, args.seccomp_filter.as_deref())?;
    // Started as the VMM starts threads of that kind: those started at
    // run time from a filtered thread (device workers and metrics from the
    // main thread or a vCPU, the migration sender from the API thread), so
    // through their spawner; the others (vCPUs, API, userfaultfd, ...)
    // from the unfiltered main thread.
    match kiln_seccomp::spawner_for(kind) {
        Some(ThreadKind::MigrationSpawner) => kiln_seccomp::apply(ThreadKind::Api)?,
        Some(_) => kiln_seccomp::apply(ThreadKind::Vmm)?,
        None => {}
    }
    let nr = args.nr;
    let (tx, rx) = std::sync::mpsc::channel();
    let t = kiln_seccomp::spawn(kind, "kiln_probe".into(), move || {
        // SAFETY: a raw syscall with caller-chosen numbers, in a test
        // command: the probe exists to make exactly this call.
        let ret = unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5]) };
        let errno = if ret < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        };
        let _ = tx.send((ret, errno));
    })?;
    let (ret, errno) = rx
        .recv()
        .map_err(|_| anyhow::anyhow!("seccomp-probe: the probe thread ended"))?;
    let _ = t.join();
    println!("allowed: ret={ret} errno={errno}");
    Ok(0)
}
