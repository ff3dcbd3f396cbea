//! `kiln run`: a VM configured from the command line, booted by the
//! controller (with the same API as `kiln vmm`'s, given --api-sock), here
//! or inside the lab.

use std::time::Instant;

use anyhow::Result;
use kiln_api::models::{MmdsConfig, MmdsVersion};
use kiln_api::preboot::{BootSource, Entropy, MachineConfig, Vsock};
use kiln_api::VmResources;
use kiln_controller::config::{balloon_of, drive_of, interface_of, rate_limiter_of};
use kiln_controller::Controller;
use kiln_vmm::kiln_devices::rate_limiter::RateLimiterConfig;
use kiln_vmm::VmConfig;

use crate::run_args::{
    init_args, parse_balloon, parse_disk, parse_net, parse_vsock, resolve_images, use_lab, RunArgs,
};

fn precheck(args: &RunArgs) -> Result<()> {
    if let Some(p) = &args.api_sock {
        kiln_controller::api::check_sock(p)?;
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

/// `kiln run`.
pub fn run(mut args: RunArgs, start: Instant) -> Result<i32> {
    // --image: the image's disks and command line (its spec disk goes when this returns).
    let _image = crate::image_cmd::prepare(&mut args)?;
    // Bad options fail here, with one line, wherever the VM would run.
    precheck(&args)?;
    let inside_lab = std::env::var_os("KILN_IN_LAB").is_some();
    if !inside_lab && use_lab() {
        eprintln!(
            "kiln: this host's KVM cannot run a stock kernel natively; booting the microVM inside the lab (QEMU). Set KILN_LAB=0 to force native."
        );
        return crate::cli_lab::run_in_lab(&args);
    }
    // Compiled before any VMM thread starts; bad filter files fail here.
    crate::seccomp_cmd::init(
        args.seccomp.no_seccomp,
        args.seccomp.seccomp_filter.as_deref(),
    )?;
    resolve_images(&mut args)?;
    let res = resources(&args)?;
    // Opened before the VMM's seccomp filter is on.
    let status_disk = crate::image_cmd::status_disk(&args)?;
    let mut vm = Controller::boot(res, Box::new(std::io::stdout()), start)?;
    if std::env::var_os("KILN_MEM_REPORT").is_some() {
        for (addr, len) in vm.vmm().guest_memory_host_ranges() {
            eprintln!("kiln-mem: {addr:#x} {len}");
        }
    }
    if let Some(path) = &args.api_sock {
        vm.serve_api(path)?;
    }
    let stdin = crate::term::prepare_stdin();
    let reason = vm.run(stdin, |_| {})?;
    crate::term::restore();
    crate::image_cmd::exit_code(status_disk, crate::exit::status(reason))
}

/// The VM's configuration from `kiln run`'s options (images resolved):
/// the same [`VmResources`] the API and config files build, so the VM
/// snapshots, restores and migrates like any other.
fn resources(args: &RunArgs) -> Result<VmResources> {
    let mut cmdline = args.cmdline.clone();
    if !args.guest_command.is_empty() {
        cmdline.push_str(" -- ");
        cmdline.push_str(&init_args(&args.guest_command));
    }
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let nets = args
        .nets
        .iter()
        .enumerate()
        .map(|(i, n)| parse_net(n, i))
        .collect::<Result<Vec<_>>>()?;
    let vsock = args
        .vsock
        .as_deref()
        .map(parse_vsock)
        .transpose()?
        .map(|v| {
            Ok::<_, anyhow::Error>(Vsock {
                guest_cid: u32::try_from(v.guest_cid).map_err(|_| {
                    anyhow::anyhow!("--vsock: CID {} does not fit in 32 bits", v.guest_cid)
                })?,
                uds_path: path(&v.uds_path),
                vsock_id: None,
            })
        })
        .transpose()?;
    let rng_rate = args
        .rng_rate
        .as_deref()
        .map(RateLimiterConfig::parse_opts)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--rng-rate: {e}"))?;
    let mmds_config = match &args.mmds {
        Some(file) => {
            let doc = read_mmds(file)?;
            kiln_controller::config::mmds()
                .store()
                .put(doc)
                .map_err(|e| anyhow::anyhow!("--mmds {}: {e}", file.display()))?;
            Some(MmdsConfig {
                version: MmdsVersion::V2,
                network_interfaces: nets.iter().map(|n| n.id.clone()).collect(),
                ipv4_address: None,
                imds_compat: false,
            })
        }
        None => None,
    };
    Ok(VmResources {
        boot_source: Some(BootSource {
            kernel_image_path: path(args.kernel.as_deref().expect("kernel resolved")),
            initrd_path: args.initrd.as_deref().map(path),
            boot_args: Some(cmdline),
        }),
        machine_config: MachineConfig {
            vcpu_count: args.vcpus,
            mem_size_mib: args.mem,
            ..Default::default()
        },
        drives: args
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| Ok(drive_of(&parse_disk(d, i)?)))
            .collect::<Result<_>>()?,
        network_interfaces: nets.iter().map(interface_of).collect(),
        vsock,
        entropy: (args.rng || rng_rate.is_some()).then(|| Entropy {
            rate_limiter: rng_rate.as_ref().map(rate_limiter_of),
        }),
        balloon: args
            .balloon
            .as_deref()
            .map(parse_balloon)
            .transpose()?
            .as_ref()
            .map(balloon_of),
        mmds_config,
        ..Default::default()
    })
}

/// The JSON document of `--mmds FILE`.
fn read_mmds(file: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("--mmds {}: {e}", file.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("--mmds {}: {e}", file.display()))
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use kiln_api::VmResources;
    use kiln_vmm::kiln_devices::virtio::block::BlockEngine;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: super::RunArgs,
    }

    /// `kiln run`'s options become resources a snapshot can store (they
    /// pass the API's validation after a JSON round trip) and the VM
    /// configuration the options describe.
    #[test]
    fn run_options_are_resources() {
        let dir = std::env::temp_dir().join(format!("kiln-run-res-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("d.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let d = disk.display().to_string();
        let cli = Cli::parse_from([
            "run",
            "--kernel",
            "/k/vmlinuz",
            "--initrd",
            "/k/initrd",
            "--vcpus",
            "2",
            "--mem",
            "384",
            "--disk",
            &format!("{d},ro,id=root,engine=io_uring,bw=1000:10/100"),
            "--disk",
            &d,
            "--net",
            "tap7,mac=06:00:00:00:00:01,rx_ops=5/100",
            "--vsock",
            "3,/tmp/v.sock",
            "--rng-rate",
            "bw=100/10",
            "--balloon",
            "64,deflate_on_oom,stats=2,free_page_reporting",
            "--",
            "echo",
            "hi",
        ]);
        let res = super::resources(&cli.run).unwrap();
        let json = serde_json::to_string(&res).unwrap();
        let back = VmResources::from_json(&json).unwrap();
        assert_eq!(back, res);

        let c = kiln_controller::config::vm_config_of(&res, false).unwrap();
        assert_eq!(c.kernel.to_str(), Some("/k/vmlinuz"));
        assert_eq!(
            c.initrd.as_deref().and_then(|p| p.to_str()),
            Some("/k/initrd")
        );
        assert_eq!(
            c.cmdline,
            format!("{} -- \"echo hi\"", kiln_vmm::DEFAULT_CMDLINE)
        );
        assert_eq!((c.vcpus, c.mem_mib), (2, 384));
        assert_eq!(c.disks.len(), 2);
        assert_eq!(
            (
                c.disks[0].id.as_str(),
                c.disks[0].read_only,
                c.disks[0].engine
            ),
            ("root", true, BlockEngine::IoUring)
        );
        let bw = c.disks[0].rate_limiter.unwrap().bandwidth.unwrap();
        assert_eq!(
            (bw.size, bw.one_time_burst, bw.refill_time_ms),
            (1000, 10, 100)
        );
        assert_eq!(
            (
                c.disks[1].id.as_str(),
                c.disks[1].read_only,
                c.disks[1].engine
            ),
            ("disk1", false, BlockEngine::Sync)
        );
        assert!(c.disks[1].rate_limiter.is_none());
        assert_eq!(c.nets[0].tap, "tap7");
        assert_eq!(c.nets[0].id, "eth0");
        assert_eq!(c.nets[0].mac, Some([6, 0, 0, 0, 0, 1]));
        assert_eq!(c.nets[0].rx_rate_limiter.unwrap().ops.unwrap().size, 5);
        assert!(c.nets[0].tx_rate_limiter.is_none());
        assert!(c.nets[0].mmds.is_none());
        let v = c.vsock.unwrap();
        assert_eq!((v.guest_cid, v.uds_path.to_str()), (3, Some("/tmp/v.sock")));
        assert!(c.rng);
        assert_eq!(c.rng_rate_limiter.unwrap().bandwidth.unwrap().size, 100);
        let b = c.balloon.unwrap();
        assert_eq!(
            (
                b.target_mib,
                b.deflate_on_oom,
                b.stats_interval_s,
                b.free_page_reporting
            ),
            (64, true, 2, true)
        );
        assert!(!c.track_dirty_pages);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
