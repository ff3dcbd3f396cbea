//! `kiln`: run microVMs, build guest images, use the lab, run benchmarks.

mod api_cmd;
mod cli_lab;
mod exit;
mod image_cmd;
mod logger;
mod metrics;
mod migrate_cmd;
mod run_args;
mod run_cmd;
mod seccomp_cmd;
mod serve_cmd;
mod snapshot_cmd;
mod term;
mod uffd_cmd;
mod vmm_cmd;

use std::time::Instant;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::run_args::RunArgs;

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
    Bench(kiln_bench::BenchArgs),
    /// Send one request to a running VM's API socket (see `run --api-sock`).
    Api(api_cmd::ApiArgs),
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
        Command::Run(args) => run_cmd::run(args, start),
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
        Command::Bench(args) => kiln_bench::bench(args),
        Command::Api(args) => api_cmd::api(args),
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

#[cfg(test)]
mod tests {
    use clap::Parser;

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
}
