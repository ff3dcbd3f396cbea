//! `kiln`: run microVMs, build guest images, use the lab, run benchmarks.

mod bench;
mod cli_lab;
mod logger;
mod term;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
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
    /// Command for the guest's init (appended to the command line after `--`).
    #[arg(last = true)]
    pub guest_command: Vec<String>,
}

fn main() {
    let start = Instant::now();
    let cli = Cli::parse();
    logger::init(cli.log_level.as_deref());
    let code = match dispatch(cli.command, start) {
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

fn precheck(args: &RunArgs) -> Result<()> {
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
    // Bad options fail here, with one line, wherever the VM would run.
    precheck(&args)?;
    let inside_lab = std::env::var_os("KILN_IN_LAB").is_some();
    if !inside_lab && use_lab() {
        eprintln!(
            "kiln: this host's KVM cannot run a stock kernel natively; booting the microVM inside the lab (QEMU). Set KILN_LAB=0 to force native."
        );
        return cli_lab::run_in_lab(&args);
    }
    resolve_images(&mut args)?;
    let mut cmdline = args.cmdline.clone();
    if !args.guest_command.is_empty() {
        cmdline.push_str(" -- ");
        cmdline.push_str(&args.guest_command.join(" "));
    }
    let config = VmConfig {
        kernel: args.kernel.clone().expect("kernel resolved"),
        initrd: args.initrd.clone(),
        cmdline,
        vcpus: args.vcpus,
        mem_mib: args.mem,
    };
    let mut vmm = Vmm::new(config, Box::new(std::io::stdout()), start)?;
    if std::env::var_os("KILN_MEM_REPORT").is_some() {
        for (addr, len) in vmm.guest_memory_host_ranges() {
            eprintln!("kiln-mem: {addr:#x} {len}");
        }
    }
    let stdin = term::prepare_stdin();
    let reason = vmm.run(stdin)?;
    term::restore();
    Ok(match reason {
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
    })
}
