//! `kiln`: run microVMs, build guest images, use the lab, run benchmarks.

mod api_glue;
mod bench;
mod cli_lab;
mod image_cmd;
mod logger;
mod metrics;
mod migrate_cmd;
mod seccomp_cmd;
mod serve_cmd;
mod snapshot_cmd;
mod term;
mod uffd_cmd;
mod vmm_cmd;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use kiln_vmm::kiln_devices::rate_limiter::RateLimiterConfig;
use kiln_vmm::kiln_devices::virtio::balloon::BalloonConfig;
use kiln_vmm::kiln_devices::virtio::block::{BlockConfig, BlockEngine};
use kiln_vmm::kiln_devices::virtio::net::{parse_mac, NetConfig};
use kiln_vmm::kiln_devices::virtio::vsock::VsockConfig;
use kiln_vmm::{ExitReason, VmConfig, Vmm};

/// Exit status when the guest kernel panicked.
pub const EXIT_GUEST_PANIC: i32 = 2;
/// Exit status when a vCPU failed.
pub const EXIT_VCPU_ERROR: i32 = 3;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Kiln: microVMs on KVM")]
struct Cli {
    /// Log level: error, warn, info, debug, trace (or KILN_LOG).
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM. Without --kernel, boots Kiln's own guest images
    /// (built on first use). Words after `--` are run by the guest's init.
    Run(RunArgs),
    /// Build (if needed) and list the guest images.
    Images,
    /// Tell whether this host's KVM runs guests natively.
    Probe,
    /// Run a shell command inside the lab (QEMU with nested KVM), with
    /// `kiln` on its PATH and the guest images at /images.
    Lab(cli_lab::LabArgs),
    /// Benchmarks.
    Bench(bench::BenchArgs),
    /// Send one request to a running VM's API socket (see `run --api-sock`).
    Api(api_glue::ApiArgs),
    /// Firecracker-compatible VMM: configure over the API (--api-sock) or
    /// from a Firecracker config file (--config-file), then boot.
    Vmm(vmm_cmd::VmmArgs),
    /// Restore a snapshot (from PUT /snapshot/create) and run it.
    Restore(snapshot_cmd::RestoreArgs),
    /// Pause a running VM (PATCH /vm over its API socket).
    Pause(snapshot_cmd::SockArgs),
    /// Resume a paused VM.
    Resume(snapshot_cmd::SockArgs),
    /// Pause a running VM and write a (full or diff) snapshot of it.
    Snapshot(snapshot_cmd::SnapshotArgs),
    /// Serve a restored VM's memory from a memory file over userfaultfd
    /// (the page-fault handler of Firecracker's Uffd memory backend), with
    /// optional working-set recording and prefetch.
    UffdHandler(uffd_cmd::UffdHandlerArgs),
    /// Apply a diff snapshot's memory file onto the memory file of the
    /// snapshot before it (like Firecracker's rebase-snap).
    SnapshotRebase(snapshot_cmd::RebaseArgs),
    /// Live migration: `receive` waits for a VM, `send` asks a running VM
    /// (over its API socket) to move there.
    Migrate(migrate_cmd::MigrateArgs),
    /// Serve functions: each call runs in a microVM of its own, restored
    /// from the function's snapshot or kept warm by a learned keep-alive
    /// policy (API on a Unix socket; see docs/serve.md).
    Serve(serve_cmd::ServeArgs),
    /// Firecracker-compatible jailer: start the VMM chrooted, in its own
    /// namespaces and cgroup, as an unprivileged uid/gid (see docs/jailer.md).
    Jailer(kiln_jailer::JailerArgs),
    /// Test command: one syscall on a thread under a kind's seccomp filter.
    #[command(hide = true)]
    SeccompProbe(seccomp_cmd::ProbeArgs),
}

/// Options of `kiln run`.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Kernel image (bzImage or ELF vmlinux). Default: $KILN_KERNEL or Kiln's guest kernel.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initrd. Default: $KILN_INITRD or Kiln's guest initramfs (when --kernel is not given).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = kiln_vmm::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs (1-32).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB (at least 128).
    #[arg(long, default_value_t = 256)]
    pub mem: u64,
    /// Attach a virtio-blk disk (repeatable; /dev/vda, /dev/vdb, ...):
    /// PATH[,ro][,id=NAME][,engine=sync|io_uring][,bw=BYTES[:BURST]/MS][,ops=N[:BURST]/MS].
    #[arg(long = "disk", value_name = "PATH[,ro][,id=NAME][,bw=..][,ops=..]")]
    pub disks: Vec<String>,
    /// Attach a virtio-net interface on host TAP device TAP (repeatable):
    /// TAP[,mac=AA:BB:CC:DD:EE:FF][,rx_bw=..|rx_ops=..|tx_bw=..|tx_ops=..] with
    /// rate limits as BYTES_OR_OPS[:BURST]/REFILL_MS.
    #[arg(long = "net", value_name = "TAP[,mac=MAC][,rx_bw=..]")]
    pub nets: Vec<String>,
    /// Attach a virtio-vsock device: CID,UDS (Firecracker's hybrid design: host
    /// connects to UDS and sends "CONNECT <port>"; the guest's connections to
    /// port P go to UDS_P).
    #[arg(long, value_name = "CID,UDS")]
    pub vsock: Option<String>,
    /// Attach a virtio-rng entropy device.
    #[arg(long)]
    pub rng: bool,
    /// Rate-limit the entropy device: bw=BYTES[:BURST]/MS[,ops=N[:BURST]/MS] (implies --rng).
    #[arg(long, value_name = "bw=..[,ops=..]")]
    pub rng_rate: Option<String>,
    /// Attach a virtio-balloon inflated to MIB: MIB[,deflate_on_oom][,stats=SECONDS][,free_page_reporting].
    #[arg(
        long,
        value_name = "MIB[,deflate_on_oom][,stats=S][,free_page_reporting]"
    )]
    pub balloon: Option<String>,
    /// Serve this JSON document to the guest as Firecracker's metadata
    /// service (V2, at 169.254.169.254) on every --net interface.
    #[arg(long, value_name = "FILE")]
    pub mmds: Option<PathBuf>,
    /// Serve the Firecracker-compatible REST API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    #[command(flatten)]
    pub seccomp: seccomp_cmd::SeccompArgs,
    #[command(flatten)]
    pub image: image_cmd::ImageArgs,
    /// Command for the guest's init (appended to the command line after `--`).
    #[arg(last = true)]
    pub guest_command: Vec<String>,
}

/// `kiln` run under the name `firecracker` (e.g. a symlink): Firecracker's
/// command line, handled exactly like `kiln vmm`.
#[derive(Parser)]
#[command(
    name = "firecracker",
    about = "Kiln under Firecracker's name: the same as `kiln vmm`",
    disable_version_flag = true
)]
struct FirecrackerCli {
    #[command(flatten)]
    vmm: vmm_cmd::VmmArgs,
}

/// Whether `argv0` (the program's name as run) is `firecracker`.
fn is_firecracker_name(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == "firecracker")
}

/// What `firecracker --version` prints.
fn firecracker_version() -> String {
    let v = env!("CARGO_PKG_VERSION");
    format!("Firecracker v{v} (Kiln {v}, a Firecracker-compatible VMM)")
}

/// `kiln` run under the name `jailer` (e.g. a symlink): Firecracker's
/// jailer command line, handled exactly like `kiln jailer`.
#[derive(Parser)]
#[command(
    name = "jailer",
    about = "Kiln under the jailer's name: the same as `kiln jailer`",
    version
)]
struct JailerCli {
    #[command(flatten)]
    jailer: kiln_jailer::JailerArgs,
}

/// Whether `argv0` (the program's name as run) is `jailer`.
fn is_jailer_name(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .is_some_and(|n| n == "jailer")
}

fn main() {
    let start = Instant::now();
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let command = if is_firecracker_name(&argv0) {
        // Like Firecracker, --version answers whatever else is given.
        if args.any(|a| a == "--version") {
            println!("{}", firecracker_version());
            std::process::exit(0);
        }
        logger::init(None);
        Command::Vmm(FirecrackerCli::parse().vmm)
    } else if is_jailer_name(&argv0) {
        logger::init(None);
        Command::Jailer(JailerCli::parse().jailer)
    } else {
        let cli = Cli::parse();
        logger::init(cli.log_level.as_deref());
        cli.command
    };
    let _ = kiln_vmm::uffd::ON_HANDLER_LOST.set(term::restore);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        metrics::on_panic();
        default_hook(info);
    }));
    let code = match dispatch(command, start) {
        Ok(code) => code,
        Err(e) => {
            term::restore();
            eprintln!("kiln: {e:#}");
            1
        }
    };
    term::restore();
    std::process::exit(code);
}

fn dispatch(cmd: Command, start: Instant) -> Result<i32> {
    match cmd {
        Command::Run(args) => run(args, start),
        Command::Jailer(args) => Ok(kiln_jailer::main(args)?),
        Command::Images => {
            let images = kiln_lab::images::ensure(&kiln_lab::images::default_cache_dir())?;
            println!("kernel     {}", images.kernel.display());
            println!("initramfs  {}", images.initramfs.display());
            println!("lab        {}", images.lab_initramfs.display());
            Ok(0)
        }
        Command::Probe => {
            let p = kiln_vmm::probe::probe();
            println!("{p:?}");
            Ok(if matches!(p, kiln_vmm::probe::KvmProbe::Native(_)) {
                0
            } else {
                1
            })
        }
        Command::Lab(args) => cli_lab::lab(args),
        Command::Bench(args) => bench::bench(args),
        Command::Api(args) => api_glue::api(args),
        Command::Vmm(args) => vmm_cmd::vmm(args, start),
        Command::Restore(args) => snapshot_cmd::restore_cmd(args, start),
        Command::Pause(args) => snapshot_cmd::set_state(args, true),
        Command::Resume(args) => snapshot_cmd::set_state(args, false),
        Command::Snapshot(args) => snapshot_cmd::snapshot(args),
        Command::SeccompProbe(args) => seccomp_cmd::probe(args),
        Command::UffdHandler(args) => uffd_cmd::uffd_handler(args),
        Command::SnapshotRebase(args) => snapshot_cmd::rebase(args),
        Command::Migrate(args) => migrate_cmd::migrate(args, start),
        Command::Serve(args) => serve_cmd::serve(args),
    }
}

/// Where `kiln run` should boot: here, or inside the lab.
fn use_lab() -> bool {
    match kiln_lab::lab::mode_from_env() {
        Some(kiln_lab::lab::LabMode::Lab) => true,
        Some(kiln_lab::lab::LabMode::Native) => false,
        None => !matches!(
            kiln_vmm::probe::probe(),
            kiln_vmm::probe::KvmProbe::Native(_)
        ),
    }
}

/// Fills in the default kernel and initrd.
fn resolve_images(args: &mut RunArgs) -> Result<()> {
    if args.kernel.is_none() {
        args.kernel = std::env::var_os("KILN_KERNEL").map(PathBuf::from);
        if args.initrd.is_none() {
            args.initrd = std::env::var_os("KILN_INITRD").map(PathBuf::from);
        }
    }
    if args.kernel.is_none() {
        let images = kiln_lab::images::ensure(&kiln_lab::images::default_cache_dir())
            .context("building Kiln's guest images")?;
        args.kernel = Some(images.kernel);
        if args.initrd.is_none() {
            args.initrd = Some(images.initramfs);
        }
    }
    Ok(())
}

/// The guest command as init arguments: one double-quoted word when it can
/// be (the kernel passes at most 32 words to init and splits on spaces).
pub fn init_args(words: &[String]) -> String {
    let joined = words.join(" ");
    if joined.contains('"') {
        joined
    } else {
        format!("\"{joined}\"")
    }
}

/// Parses `PATH[,ro][,id=NAME]`.
pub fn parse_disk(spec: &str, index: usize) -> Result<BlockConfig> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| anyhow::anyhow!("--disk {spec:?}: expected PATH[,ro][,id=NAME]"))?;
    let mut cfg = BlockConfig {
        path: PathBuf::from(path),
        read_only: false,
        id: format!("disk{index}"),
        rate_limiter: None,
        engine: BlockEngine::Sync,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => cfg.read_only = true,
            None if opt == "rw" => cfg.read_only = false,
            Some(("id", v)) if !v.is_empty() && v.len() <= 20 => cfg.id = v.to_string(),
            Some(("engine", v)) => {
                cfg.engine = v
                    .parse::<BlockEngine>()
                    .map_err(|e| anyhow::anyhow!("--disk {spec:?}: {e}"))?
            }
            Some((k @ ("bw" | "ops"), v)) => cfg
                .rate_limiter
                .get_or_insert_with(Default::default)
                .apply_opt(k, v)
                .map_err(|e| anyhow::anyhow!("--disk {spec:?}: {e}"))?,
            _ => anyhow::bail!(
                "--disk {spec:?}: unknown option {opt:?} (expected ro, rw, id=NAME of at most 20 bytes, engine=sync|io_uring, bw=BYTES[:BURST]/MS, ops=N[:BURST]/MS)"
            ),
        }
    }
    Ok(cfg)
}

/// Parses `TAP[,mac=MAC]`.
pub fn parse_net(spec: &str, index: usize) -> Result<NetConfig> {
    let mut parts = spec.split(',');
    let tap = parts
        .next()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| anyhow::anyhow!("--net {spec:?}: expected TAP[,mac=MAC]"))?;
    let mut cfg = NetConfig {
        tap: tap.to_string(),
        mac: None,
        id: format!("eth{index}"),
        rx_rate_limiter: None,
        tx_rate_limiter: None,
        mmds: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            Some((k @ ("rx_bw" | "rx_ops" | "tx_bw" | "tx_ops"), v)) => {
                let (dir, key) = k.split_once('_').expect("prefixed key");
                let slot = if dir == "rx" {
                    &mut cfg.rx_rate_limiter
                } else {
                    &mut cfg.tx_rate_limiter
                };
                slot.get_or_insert_with(Default::default)
                    .apply_opt(key, v)
                    .map_err(|e| anyhow::anyhow!("--net {spec:?}: {e}"))?
            }
            Some(("mac", m)) => {
                cfg.mac = Some(parse_mac(m).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--net {spec:?}: {m:?} is not a MAC address (AA:BB:CC:DD:EE:FF)"
                    )
                })?)
            }
            _ => anyhow::bail!("--net {spec:?}: unknown option {opt:?}"),
        }
    }
    Ok(cfg)
}

/// Parses `CID,UDS`.
pub fn parse_vsock(spec: &str) -> Result<VsockConfig> {
    let (cid, path) = spec
        .split_once(',')
        .ok_or_else(|| anyhow::anyhow!("--vsock {spec:?}: expected CID,UDS_PATH"))?;
    let guest_cid = cid
        .parse::<u64>()
        .map_err(|_| anyhow::anyhow!("--vsock {spec:?}: {cid:?} is not a CID number"))?;
    if path.is_empty() {
        anyhow::bail!("--vsock {spec:?}: empty socket path");
    }
    Ok(VsockConfig {
        guest_cid,
        uds_path: PathBuf::from(path),
    })
}

/// Parses `MIB[,deflate_on_oom][,stats=SECONDS][,free_page_reporting]`.
pub fn parse_balloon(spec: &str) -> Result<BalloonConfig> {
    let mut parts = spec.split(',');
    let mib = parts
        .next()
        .and_then(|m| m.parse::<u64>().ok())
        .ok_or_else(|| {
            anyhow::anyhow!("--balloon {spec:?}: expected MIB[,deflate_on_oom][,stats=SECONDS][,free_page_reporting]")
        })?;
    let mut cfg = BalloonConfig {
        target_mib: mib,
        ..Default::default()
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "deflate_on_oom" => cfg.deflate_on_oom = true,
            None if opt == "free_page_reporting" => cfg.free_page_reporting = true,
            Some(("stats", v)) => {
                cfg.stats_interval_s = v.parse().map_err(|_| {
                    anyhow::anyhow!("--balloon {spec:?}: stats={v:?} is not a number of seconds")
                })?
            }
            _ => anyhow::bail!("--balloon {spec:?}: unknown option {opt:?}"),
        }
    }
    Ok(cfg)
}

fn precheck(args: &RunArgs) -> Result<()> {
    if let Some(p) = &args.api_sock {
        api_glue::check_sock(p)?;
    }
    if let Some(v) = &args.vsock {
        parse_vsock(v)?;
    }
    for (i, n) in args.nets.iter().enumerate() {
        parse_net(n, i)?;
    }
    if let Some(f) = &args.mmds {
        if args.nets.is_empty() {
            anyhow::bail!(
                "--mmds {}: the guest reaches the metadata service through a --net interface; add one",
                f.display()
            );
        }
        read_mmds(f)?;
    }
    if let Some(b) = &args.balloon {
        let cfg = parse_balloon(b)?;
        if cfg.target_mib >= args.mem {
            anyhow::bail!(
                "--balloon {} MiB must be smaller than the guest's memory ({} MiB)",
                cfg.target_mib,
                args.mem
            );
        }
    }
    for (i, d) in args.disks.iter().enumerate() {
        let cfg = parse_disk(d, i)?;
        std::fs::metadata(&cfg.path)
            .map_err(|e| anyhow::anyhow!("cannot open disk {}: {e}", cfg.path.display()))?;
    }
    let mut c = VmConfig::new(args.kernel.clone().unwrap_or_default());
    c.vcpus = args.vcpus;
    c.mem_mib = args.mem;
    c.cmdline = args.cmdline.clone();
    c.validate()?;
    if let Some(k) = &args.kernel {
        kiln_vmm::boot::check_kernel_file(k)?;
    }
    if let Some(i) = &args.initrd {
        std::fs::metadata(i).map_err(|source| kiln_vmm::boot::BootError::Initrd {
            path: i.clone(),
            source,
        })?;
    }
    Ok(())
}

fn run(mut args: RunArgs, start: Instant) -> Result<i32> {
    // --image: the image's disks and command line (its spec disk goes when this returns).
    let _image = image_cmd::prepare(&mut args)?;
    // Bad options fail here, with one line, wherever the VM would run.
    precheck(&args)?;
    let inside_lab = std::env::var_os("KILN_IN_LAB").is_some();
    if !inside_lab && use_lab() {
        eprintln!(
            "kiln: this host's KVM cannot run a stock kernel natively; booting the microVM inside the lab (QEMU). Set KILN_LAB=0 to force native."
        );
        return cli_lab::run_in_lab(&args);
    }
    // Compiled before any VMM thread starts; bad filter files fail here.
    seccomp_cmd::init(
        args.seccomp.no_seccomp,
        args.seccomp.seccomp_filter.as_deref(),
    )?;
    resolve_images(&mut args)?;
    let mut cmdline = args.cmdline.clone();
    if !args.guest_command.is_empty() {
        cmdline.push_str(" -- ");
        cmdline.push_str(&init_args(&args.guest_command));
    }
    let config = VmConfig {
        kernel: args.kernel.clone().expect("kernel resolved"),
        initrd: args.initrd.clone(),
        cmdline,
        vcpus: args.vcpus,
        mem_mib: args.mem,
        disks: args
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| parse_disk(d, i))
            .collect::<Result<_>>()?,
        rng: args.rng || args.rng_rate.is_some(),
        rng_rate_limiter: args
            .rng_rate
            .as_deref()
            .map(RateLimiterConfig::parse_opts)
            .transpose()
            .map_err(|e| anyhow::anyhow!("--rng-rate: {e}"))?,
        nets: with_mmds(
            args.mmds.as_deref(),
            args.nets
                .iter()
                .enumerate()
                .map(|(i, n)| parse_net(n, i))
                .collect::<Result<_>>()?,
        )?,
        balloon: args.balloon.as_deref().map(parse_balloon).transpose()?,
        vsock: args.vsock.as_deref().map(parse_vsock).transpose()?,
        track_dirty_pages: false,
        cpu_template: None,
    };
    let status_disk = image_cmd::status_disk(&args)?;
    let mut vmm = Vmm::new(config, Box::new(std::io::stdout()), start)?;
    if std::env::var_os("KILN_MEM_REPORT").is_some() {
        for (addr, len) in vmm.guest_memory_host_ranges() {
            eprintln!("kiln-mem: {addr:#x} {len}");
        }
    }
    let _api = args
        .api_sock
        .as_deref()
        .map(|p| api_glue::start(p, &vmm))
        .transpose()?;
    let stdin = term::prepare_stdin();
    let reason = vmm.run(stdin)?;
    term::restore();
    image_cmd::exit_code(status_disk, exit_status(reason))
}

/// The JSON document of `--mmds FILE`.
fn read_mmds(file: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("--mmds {}: {e}", file.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--mmds {}: {e}", file.display()))
}

/// `kiln run --mmds FILE`: the document in the metadata service (V2) and
/// every interface reaching it.
fn with_mmds(file: Option<&std::path::Path>, mut nets: Vec<NetConfig>) -> Result<Vec<NetConfig>> {
    let Some(file) = file else {
        return Ok(nets);
    };
    let doc = read_mmds(file)?;
    let m = vmm_cmd::mmds();
    m.store()
        .put(doc)
        .map_err(|e| anyhow::anyhow!("--mmds {}: {e}", file.display()))?;
    m.configure(kiln_api::models::MmdsConfig {
        version: kiln_api::models::MmdsVersion::V2,
        network_interfaces: nets.iter().map(|n| n.id.clone()).collect(),
        ipv4_address: None,
        imds_compat: false,
    });
    for n in &mut nets {
        n.mmds = Some(m.clone());
    }
    Ok(nets)
}

/// The exit status of `kiln run` and `kiln vmm` when the guest ended.
pub fn exit_status(reason: ExitReason) -> i32 {
    match reason {
        ExitReason::Reboot | ExitReason::Poweroff => {
            log::info!("guest ended: {reason:?}");
            0
        }
        ExitReason::GuestPanic => {
            eprintln!("kiln: the guest kernel panicked");
            EXIT_GUEST_PANIC
        }
        ExitReason::VcpuError(e) => {
            eprintln!("kiln: vCPU error: {e}");
            EXIT_VCPU_ERROR
        }
        ExitReason::Migrated => {
            eprintln!("kiln: the microVM was migrated; it runs at the destination now");
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_disk;
    use clap::Parser;
    use kiln_vmm::kiln_devices::virtio::block::BlockEngine;

    #[test]
    fn firecracker_name_takes_firecracker_flags() {
        use std::ffi::OsStr;
        assert!(super::is_firecracker_name(OsStr::new("firecracker")));
        assert!(super::is_firecracker_name(OsStr::new(
            "/usr/bin/firecracker"
        )));
        assert!(!super::is_firecracker_name(OsStr::new("/usr/bin/kiln")));
        assert!(!super::is_firecracker_name(OsStr::new("firecracker-v1")));
        let ok = super::FirecrackerCli::try_parse_from([
            "firecracker",
            "--api-sock",
            "/tmp/fc.sock",
            "--id",
            "vm-1",
            "--level",
            "Debug",
            "--boot-timer",
            "--http-api-max-payload-size",
            "4096",
        ]);
        assert!(ok.is_ok(), "{:?}", ok.err());
        // The same rules as `kiln vmm`: an API socket or --no-api is required.
        assert!(super::FirecrackerCli::try_parse_from(["firecracker"]).is_err());
        assert!(super::firecracker_version().starts_with("Firecracker v"));
    }

    #[test]
    fn guest_command_is_one_quoted_word() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            super::init_args(&w(&["echo", "a b; ls"])),
            "\"echo a b; ls\""
        );
        assert_eq!(super::init_args(&w(&["echo", "\"x\""])), "echo \"x\"");
    }

    #[test]
    fn disk_specs() {
        let d = parse_disk("/a/b.img", 3).unwrap();
        assert_eq!(
            (d.path.to_str().unwrap(), d.read_only, d.id.as_str()),
            ("/a/b.img", false, "disk3")
        );
        let d = parse_disk("/x,ro,id=root", 0).unwrap();
        assert!(d.read_only);
        assert_eq!(d.id, "root");
        assert!(parse_disk("/x,bogus", 0).is_err());
        assert!(parse_disk(",ro", 0).is_err());
        assert!(parse_disk("/x,id=012345678901234567890", 0).is_err());
        let d = parse_disk("/x,bw=1048576/100,ops=50:10/1000", 0).unwrap();
        let rl = d.rate_limiter.unwrap();
        assert_eq!(rl.bandwidth.unwrap().size, 1048576);
        assert_eq!(rl.ops.unwrap().one_time_burst, 10);
        assert!(parse_disk("/x,bw=1M/100", 0).is_err());
        assert_eq!(
            parse_disk("/x,engine=io_uring", 0).unwrap().engine,
            BlockEngine::IoUring
        );
        assert!(parse_disk("/x,engine=aio", 0).is_err());
        let n = super::parse_net("tap0,rx_bw=1000/10,tx_ops=5/100", 0).unwrap();
        assert_eq!(n.rx_rate_limiter.unwrap().bandwidth.unwrap().size, 1000);
        assert_eq!(n.tx_rate_limiter.unwrap().ops.unwrap().size, 5);
    }
}
