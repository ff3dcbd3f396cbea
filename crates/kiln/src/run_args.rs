//! `kiln run`'s options: their parsing into device configurations, and
//! the default guest images.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kiln_vmm::kiln_devices::virtio::balloon::BalloonConfig;
use kiln_vmm::kiln_devices::virtio::block::{BlockConfig, BlockEngine};
use kiln_vmm::kiln_devices::virtio::net::{parse_mac, NetConfig};
use kiln_vmm::kiln_devices::virtio::vsock::VsockConfig;

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
    pub seccomp: crate::seccomp_cmd::SeccompArgs,
    #[command(flatten)]
    pub image: crate::image_cmd::ImageArgs,
    /// Command for the guest's init (appended to the command line after `--`).
    #[arg(last = true)]
    pub guest_command: Vec<String>,
}

/// Where `kiln run` should boot: here, or inside the lab.
pub fn use_lab() -> bool {
    kiln_lab::wanted(|| {
        matches!(
            kiln_vmm::probe::probe(),
            kiln_vmm::probe::KvmProbe::Native(_)
        )
    })
}

/// Fills in the default kernel and initrd.
pub fn resolve_images(args: &mut RunArgs) -> Result<()> {
    kiln_lab::images::resolve_guest(&mut args.kernel, &mut args.initrd)
        .context("building Kiln's guest images")
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

#[cfg(test)]
mod tests {
    use super::parse_disk;
    use kiln_vmm::kiln_devices::virtio::block::BlockEngine;

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
