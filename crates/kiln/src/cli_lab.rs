//! `kiln lab`, and running `kiln run` inside the lab when the host's KVM
//! cannot run a stock kernel.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use kiln_lab::images::{default_cache_dir, ensure, Images};
use kiln_lab::lab::Lab;
use kiln_lab::scripts::shell_quote;

use crate::run_args::RunArgs;

/// Options of `kiln lab`.
#[derive(Args, Debug)]
pub struct LabArgs {
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Run here even if this host's KVM is native (default: lab only when needed).
    #[arg(long)]
    force: bool,
    /// The shell command to run.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// A lab with this `kiln` binary inside.
pub fn lab_with_kiln(images: Images, timeout: Duration) -> Result<Lab> {
    let exe = std::env::current_exe().context("locating the kiln binary")?;
    Ok(Lab::new(images).binary(exe).timeout(timeout))
}

fn needs_lab(force: bool) -> bool {
    force || crate::run_args::use_lab()
}

/// `kiln lab -- <command>`.
pub fn lab(args: LabArgs) -> Result<i32> {
    let images = ensure(&default_cache_dir()).context("building the guest images")?;
    let command = args.command.join(" ");
    if !needs_lab(args.force) {
        // Native KVM: run the command right here, with the same environment.
        let exe = std::env::current_exe()?;
        let dir = exe.parent().unwrap_or(Path::new("."));
        let path = format!(
            "{}:{}",
            dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .env("PATH", path)
            .env("KILN_KERNEL", &images.kernel)
            .env("KILN_INITRD", &images.initramfs)
            .status()
            .context("running sh")?;
        return Ok(status.code().unwrap_or(1));
    }
    let lab = lab_with_kiln(images, Duration::from_secs(args.timeout))?;
    let full = format!("{}{command}", kiln_lab::lab::kiln_env_prefix());
    Ok(lab.run_interactive(&full)?)
}

/// Re-runs `kiln run` with the same options inside the lab, streaming the
/// guest console.
pub fn run_in_lab(args: &RunArgs) -> Result<i32> {
    let images = ensure(&default_cache_dir()).context("building the guest images")?;
    let mut lab = lab_with_kiln(images, Duration::from_secs(3600))?;
    let mut cmd = vec!["kiln".to_string(), "run".to_string()];
    let mut copy = |flag: &str, host: &Option<PathBuf>, guest: &str, lab: Lab| -> Lab {
        match host {
            Some(p) => {
                cmd.push(flag.into());
                cmd.push(guest.into());
                lab.file(p.clone(), guest.to_string())
            }
            None => lab,
        }
    };
    lab = copy("--kernel", &args.kernel, "/work/kernel", lab);
    lab = copy("--initrd", &args.initrd, "/work/initrd", lab);
    lab = copy("--mmds", &args.mmds, "/work/mmds.json", lab);
    // Disks are copied into the lab: the guest's writes stay there.
    for (i, spec) in args.disks.iter().enumerate() {
        let (path, opts) = match spec.split_once(',') {
            Some((p, o)) => (p, format!(",{o}")),
            None => (spec.as_str(), String::new()),
        };
        let guest = format!("/work/disk{i}");
        lab = lab.file(PathBuf::from(path), guest.clone());
        cmd.push("--disk".into());
        cmd.push(format!("{guest}{opts}"));
    }
    for n in &args.nets {
        cmd.push("--net".into());
        cmd.push(n.clone());
    }
    if let Some(v) = &args.vsock {
        cmd.push("--vsock".into());
        cmd.push(v.clone());
    }
    if args.rng {
        cmd.push("--rng".into());
    }
    if let Some(r) = &args.rng_rate {
        cmd.push("--rng-rate".into());
        cmd.push(r.clone());
    }
    if let Some(b) = &args.balloon {
        cmd.push("--balloon".into());
        cmd.push(b.clone());
    }
    // The socket is created inside the lab, at the same path.
    if let Some(s) = &args.api_sock {
        cmd.push("--api-sock".into());
        cmd.push(s.display().to_string());
    }
    if let Some(f) = &args.seccomp.seccomp_filter {
        lab = lab.file(f.clone(), "/work/seccomp.json".to_string());
        cmd.extend(["--seccomp-filter".into(), "/work/seccomp.json".into()]);
    } else if args.seccomp.no_seccomp {
        cmd.push("--no-seccomp".into());
    }
    cmd.extend([
        "--cmdline".into(),
        args.cmdline.clone(),
        "--vcpus".into(),
        args.vcpus.to_string(),
        "--mem".into(),
        args.mem.to_string(),
    ]);
    if let Some(i) = args.image.status_disk {
        cmd.extend(["--status-disk".into(), i.to_string()]);
    }
    if !args.guest_command.is_empty() {
        cmd.push("--".into());
        cmd.extend(args.guest_command.iter().cloned());
    }
    let quoted: Vec<String> = cmd.iter().map(|a| shell_quote(a)).collect();
    // The lab console has no terminal input; the guest gets none either.
    let full = format!(
        "{}{} </dev/null",
        kiln_lab::lab::kiln_env_prefix(),
        quoted.join(" ")
    );
    Ok(lab.run_interactive(&full)?)
}
