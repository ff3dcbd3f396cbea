//! The one configuration of a VM: Firecracker's [`VmResources`] (what the
//! API builds, what a `--config-file` holds, what `kiln run` builds from
//! its options, what snapshots and migrations carry), and its translation
//! into the VMM's [`VmConfig`].

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use kiln_api::preboot::{Drive, IoEngine, NetworkInterface, RateLimiter, Serial, TokenBucket};
use kiln_api::snapshot::{NetworkOverride, VsockOverride};
use kiln_api::{Balloon, VmResources};
use kiln_vmm::cpu_template::{CpuTemplate, CpuidModifier, MsrModifier};
use kiln_vmm::kiln_devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use kiln_vmm::kiln_devices::virtio::balloon::BalloonConfig;
use kiln_vmm::kiln_devices::virtio::block::{BlockConfig, BlockEngine};
use kiln_vmm::kiln_devices::virtio::net::{format_mac, parse_mac, NetConfig};
use kiln_vmm::kiln_devices::virtio::vsock::VsockConfig;
use kiln_vmm::VmConfig;

use crate::error::ConfigError;

/// Firecracker's rate limiter as the devices' configuration.
pub fn limiter(r: &Option<RateLimiter>) -> Option<RateLimiterConfig> {
    let bucket = |b: &TokenBucket| TokenBucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time_ms: b.refill_time,
    };
    r.as_ref().map(|r| RateLimiterConfig {
        bandwidth: r.bandwidth.as_ref().map(bucket),
        ops: r.ops.as_ref().map(bucket),
    })
}

/// A device's rate limiter as Firecracker's (the inverse of [`limiter`]).
pub fn rate_limiter_of(c: &RateLimiterConfig) -> RateLimiter {
    let bucket = |b: &TokenBucketConfig| TokenBucket {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time: b.refill_time_ms,
    };
    RateLimiter {
        bandwidth: c.bandwidth.as_ref().map(bucket),
        ops: c.ops.as_ref().map(bucket),
    }
}

/// A disk (`kiln run --disk`) as a Firecracker drive (never the root
/// device: `kiln run` boots its own initramfs).
pub fn drive_of(d: &BlockConfig) -> Drive {
    Drive {
        drive_id: d.id.clone(),
        path_on_host: d.path.to_string_lossy().into_owned(),
        is_root_device: false,
        is_read_only: d.read_only,
        rate_limiter: d.rate_limiter.as_ref().map(rate_limiter_of),
        io_engine: match d.engine {
            BlockEngine::Sync => None,
            BlockEngine::IoUring => Some(IoEngine::Async),
        },
    }
}

/// An interface (`kiln run --net`) as a Firecracker network interface.
pub fn interface_of(n: &NetConfig) -> NetworkInterface {
    NetworkInterface {
        iface_id: n.id.clone(),
        host_dev_name: n.tap.clone(),
        guest_mac: n.mac.as_ref().map(format_mac),
        rx_rate_limiter: n.rx_rate_limiter.as_ref().map(rate_limiter_of),
        tx_rate_limiter: n.tx_rate_limiter.as_ref().map(rate_limiter_of),
    }
}

/// A balloon (`kiln run --balloon`) as Firecracker's.
pub fn balloon_of(b: &BalloonConfig) -> Balloon {
    Balloon {
        amount_mib: b.target_mib,
        deflate_on_oom: b.deflate_on_oom,
        stats_polling_interval_s: b.stats_interval_s,
        free_page_hinting: false,
        free_page_reporting: b.free_page_reporting,
    }
}

/// Builds the VM configuration from Firecracker's resources, checking the
/// kernel, initrd and disk files. The root drive is attached first
/// (/dev/vda); `root=/dev/vda` (with `ro`/`rw`) is added to the command line
/// unless it already has a `root=`.
pub fn to_vm_config(res: &VmResources) -> Result<VmConfig, ConfigError> {
    vm_config_of(res, true)
}

/// [`to_vm_config`]; `check_kernel` false skips the kernel and initrd
/// checks (a restored VM does not load them).
pub fn vm_config_of(res: &VmResources, check_kernel: bool) -> Result<VmConfig, ConfigError> {
    let boot = res.boot_source.as_ref().ok_or(ConfigError::NoBootSource)?;
    let kernel = PathBuf::from(&boot.kernel_image_path);
    if check_kernel {
        kiln_vmm::boot::check_kernel_file(&kernel)?;
    }
    let initrd = boot.initrd_path.as_ref().map(PathBuf::from);
    if let Some(i) = initrd.as_ref().filter(|_| check_kernel) {
        std::fs::metadata(i).map_err(|source| kiln_vmm::boot::BootError::Initrd {
            path: i.clone(),
            source,
        })?;
    }
    let mut cmdline = boot
        .boot_args
        .clone()
        .unwrap_or_else(|| kiln_vmm::DEFAULT_CMDLINE.to_string());

    let mut drives: Vec<_> = res.drives.iter().collect();
    drives.sort_by_key(|d| !d.is_root_device); // stable: root first
    if let Some(root) = drives.first().filter(|d| d.is_root_device) {
        // Only the kernel's part of the command line (before ` -- `) counts.
        let kernel_part = cmdline.split(" -- ").next().unwrap_or_default();
        if !kernel_part
            .split_whitespace()
            .any(|w| w.starts_with("root="))
        {
            let root_arg = format!(
                "root=/dev/vda {}",
                if root.is_read_only { "ro" } else { "rw" }
            );
            cmdline = match cmdline.split_once(" -- ") {
                Some((k, init)) => format!("{k} {root_arg} -- {init}"),
                None => format!("{cmdline} {root_arg}"),
            };
        }
    }
    let mut disks = Vec::new();
    for d in drives {
        std::fs::metadata(&d.path_on_host).map_err(|error| ConfigError::Drive {
            id: d.drive_id.clone(),
            path: d.path_on_host.clone(),
            error,
        })?;
        disks.push(BlockConfig {
            path: PathBuf::from(&d.path_on_host),
            read_only: d.is_read_only,
            id: d.drive_id.clone(),
            rate_limiter: limiter(&d.rate_limiter),
            engine: match d.io_engine.unwrap_or_default() {
                IoEngine::Sync => BlockEngine::Sync,
                IoEngine::Async => BlockEngine::IoUring,
            },
        });
    }
    let nets = res
        .network_interfaces
        .iter()
        .map(|n| {
            Ok(NetConfig {
                tap: n.host_dev_name.clone(),
                mac: match &n.guest_mac {
                    Some(m) => Some(parse_mac(m).ok_or_else(|| ConfigError::Mac {
                        iface: n.iface_id.clone(),
                        mac: m.clone(),
                    })?),
                    None => None,
                },
                id: n.iface_id.clone(),
                rx_rate_limiter: limiter(&n.rx_rate_limiter),
                tx_rate_limiter: limiter(&n.tx_rate_limiter),
                mmds: res
                    .mmds_config
                    .as_ref()
                    .filter(|c| c.network_interfaces.contains(&n.iface_id))
                    .map(|c| {
                        let m = mmds();
                        m.configure(c.clone());
                        m.clone()
                    }),
            })
        })
        .collect::<Result<_, ConfigError>>()?;
    let mem_mib = res.machine_config.mem_size_mib;
    let balloon = match &res.balloon {
        Some(b) if b.amount_mib >= mem_mib => {
            return Err(ConfigError::Balloon {
                amount: b.amount_mib,
                mem: mem_mib,
            })
        }
        Some(b) => Some(BalloonConfig {
            target_mib: b.amount_mib,
            deflate_on_oom: b.deflate_on_oom,
            stats_interval_s: b.stats_polling_interval_s,
            free_page_reporting: b.free_page_reporting,
        }),
        None => None,
    };
    let config = VmConfig {
        kernel,
        initrd,
        cmdline,
        vcpus: res.machine_config.vcpu_count,
        mem_mib,
        disks,
        rng: res.entropy.is_some(),
        rng_rate_limiter: res.entropy.as_ref().and_then(|e| limiter(&e.rate_limiter)),
        nets,
        vsock: res.vsock.as_ref().map(|v| VsockConfig {
            guest_cid: u64::from(v.guest_cid),
            uds_path: PathBuf::from(&v.uds_path),
        }),
        balloon,
        track_dirty_pages: res.machine_config.track_dirty_pages,
        cpu_template: res.cpu_config.as_ref().map(cpu_template).transpose()?,
    };
    config.validate()?;
    Ok(config)
}

/// Points a saved configuration at other TAP devices and another vsock
/// socket (restore and migration).
pub fn apply_overrides(
    res: &mut VmResources,
    network_overrides: &[NetworkOverride],
    vsock_override: Option<&VsockOverride>,
) -> Result<(), ConfigError> {
    for o in network_overrides {
        let iface = res
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == o.iface_id)
            .ok_or_else(|| ConfigError::NoInterface(o.iface_id.clone()))?;
        iface.host_dev_name = o.host_dev_name.clone();
    }
    if let Some(v) = vsock_override {
        let vsock = res.vsock.as_mut().ok_or(ConfigError::NoVsock)?;
        vsock.uds_path = v.uds_path.clone();
    }
    Ok(())
}

/// Where the guest's serial output goes.
pub type Console = Box<dyn Write + Send>;

/// The serial console's output: `PUT /serial`'s `serial_out_path` (a file,
/// appended to and created if needed, or a named pipe with a reader), else
/// stdout.
pub fn open_console(serial: Option<&Serial>) -> Result<Console, ConfigError> {
    let Some(path) = serial.and_then(|s| s.serial_out_path.as_deref()) else {
        return Ok(Box::new(std::io::stdout()));
    };
    let fail = |error| ConfigError::Console {
        path: path.to_string(),
        error,
    };
    // O_NONBLOCK: opening a named pipe without a reader fails (ENXIO)
    // rather than blocking the API; the flag is cleared afterwards.
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(fail)?;
    // SAFETY: F_GETFL/F_SETFL on a descriptor `f` owns; no memory is passed.
    let ok = unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(fail(std::io::Error::last_os_error()));
    }
    Ok(Box::new(f))
}

/// The VMM's form of a `/cpu-config` template.
fn cpu_template(c: &kiln_api::cpu_config::CpuConfig) -> Result<CpuTemplate, ConfigError> {
    use kiln_api::cpu_config::CpuidRegister;
    let p = c
        .parse()
        .map_err(|e| ConfigError::CpuTemplate(e.to_string()))?;
    Ok(CpuTemplate {
        kvm_capabilities: p.kvm_capabilities,
        cpuid: p
            .cpuid
            .into_iter()
            .map(|(leaf, subleaf, flags, regs)| {
                let mut m = CpuidModifier {
                    leaf,
                    subleaf,
                    flags,
                    ..Default::default()
                };
                for (r, b) in regs {
                    let i = match r {
                        CpuidRegister::Eax => 0,
                        CpuidRegister::Ebx => 1,
                        CpuidRegister::Ecx => 2,
                        CpuidRegister::Edx => 3,
                    };
                    // 32-bit bitmaps: the values fit.
                    m.regs[i] = Some((b.mask as u32, b.value as u32));
                }
                m
            })
            .collect(),
        msrs: p
            .msrs
            .into_iter()
            .map(|(addr, b)| MsrModifier {
                addr,
                mask: b.mask,
                value: b.value,
            })
            .collect(),
    })
}

/// The process's metadata service (one per VMM, as in Firecracker).
static MMDS: OnceLock<Arc<kiln_mmds::Mmds>> = OnceLock::new();

/// The metadata service (created with the default size limit unless
/// [`init_mmds`] ran first).
pub fn mmds() -> &'static Arc<kiln_mmds::Mmds> {
    MMDS.get_or_init(|| Arc::new(kiln_mmds::Mmds::new(kiln_mmds::DEFAULT_SIZE_LIMIT)))
}

/// Creates the metadata service with this size limit (before anything
/// uses it; afterwards it keeps the limit it has).
pub fn init_mmds(limit: usize) -> &'static Arc<kiln_mmds::Mmds> {
    let _ = MMDS.set(Arc::new(kiln_mmds::Mmds::new(limit)));
    mmds()
}
#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api::preboot::Serial;
    use kiln_api::VmResources;
    use kiln_vmm::kiln_devices::virtio::block::BlockEngine;
    use std::io::Write;

    fn res(json: &str) -> VmResources {
        VmResources::from_json(json).unwrap()
    }

    #[test]
    fn serial_console_output() {
        let dir = std::env::temp_dir().join(format!("kiln-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.log");
        std::fs::write(&path, b"old\n").unwrap();
        let serial = Serial {
            serial_out_path: Some(path.display().to_string()),
            rate_limiter: None,
        };
        let mut c = open_console(Some(&serial)).unwrap();
        c.write_all(b"guest says hi\n").unwrap();
        c.flush().unwrap();
        drop(c);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "old\nguest says hi\n"
        );
        // A named pipe without a reader is an error, not a hang.
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = open_console(Some(&Serial {
            serial_out_path: Some(fifo.display().to_string()),
            rate_limiter: None,
        }))
        .err()
        .expect("no reader");
        assert!(e.to_string().contains("fifo"), "{e}");
        let e = open_console(Some(&Serial {
            serial_out_path: Some("/nonexistent-dir/x".into()),
            rate_limiter: None,
        }))
        .err()
        .expect("bad path");
        assert!(e.to_string().contains("/nonexistent-dir/x"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resources_to_vm_config() {
        let e = to_vm_config(&res("{}")).unwrap_err().to_string();
        assert!(e.contains("no boot source"), "{e}");
        let e = to_vm_config(&res(
            r#"{"boot-source":{"kernel_image_path":"/nonexistent/k"}}"#,
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/k"), "{e}");

        let dir = std::env::temp_dir().join(format!("kiln-vmm-cmd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // check_kernel_file wants a bzImage setup header (or ELF magic).
        let kernel = dir.join("k");
        let mut img = vec![0u8; 0x1000];
        img[0x1fe] = 0x55;
        img[0x1ff] = 0xaa;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        std::fs::write(&kernel, &img).unwrap();
        let disk = dir.join("d.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let json = format!(
            r#"{{"boot-source":{{"kernel_image_path":"{k}","boot_args":"console=ttyS0 -- echo hi"}},
              "drives":[{{"drive_id":"data","path_on_host":"{d}","is_root_device":false}},
                        {{"drive_id":"rootfs","path_on_host":"{d}","is_root_device":true,"is_read_only":true,
                          "io_engine":"Async","rate_limiter":{{"bandwidth":{{"size":1000,"one_time_burst":10,"refill_time":100}}}}}}],
              "machine-config":{{"vcpu_count":2,"mem_size_mib":256}},
              "network-interfaces":[{{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:00:00:00:01"}}],
              "vsock":{{"guest_cid":3,"uds_path":"/tmp/v.sock"}},
              "balloon":{{"amount_mib":64,"deflate_on_oom":true,"stats_polling_interval_s":1}},
              "entropy":{{}}}}"#,
            k = kernel.display(),
            d = disk.display()
        );
        let c = to_vm_config(&res(&json)).unwrap();
        assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda ro -- echo hi");
        assert_eq!((c.vcpus, c.mem_mib), (2, 256));
        assert_eq!(c.disks[0].id, "rootfs");
        assert_eq!(c.disks[0].engine, BlockEngine::IoUring);
        assert!(c.disks[0].read_only);
        let bw = c.disks[0].rate_limiter.unwrap().bandwidth.unwrap();
        assert_eq!(
            (bw.size, bw.one_time_burst, bw.refill_time_ms),
            (1000, 10, 100)
        );
        assert_eq!(c.disks[1].engine, BlockEngine::Sync);
        assert_eq!(c.nets[0].mac, Some([6, 0, 0, 0, 0, 1]));
        assert!(c.rng);
        assert_eq!(c.vsock.unwrap().guest_cid, 3);
        assert_eq!(c.balloon.unwrap().target_mib, 64);
        // boot_args with its own root= keeps it.
        let json2 = json.replace("console=ttyS0 -- echo hi", "root=/dev/vdb");
        assert_eq!(to_vm_config(&res(&json2)).unwrap().cmdline, "root=/dev/vdb");
        // A missing disk is named.
        let json3 = json.replace("d.img", "gone.img");
        let e = to_vm_config(&res(&json3)).unwrap_err().to_string();
        assert!(e.contains("gone.img"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overrides_point_the_configuration_elsewhere() {
        use kiln_api::snapshot::{NetworkOverride, VsockOverride};
        let mut r = res(
            r#"{"network-interfaces":[{"iface_id":"eth0","host_dev_name":"tap0"}],
                "vsock":{"guest_cid":3,"uds_path":"/old.sock"}}"#,
        );
        let tap7 = NetworkOverride {
            iface_id: "eth0".into(),
            host_dev_name: "tap7".into(),
        };
        let sock = VsockOverride {
            uds_path: "/new.sock".into(),
        };
        apply_overrides(&mut r, &[tap7], Some(&sock)).unwrap();
        assert_eq!(r.network_interfaces[0].host_dev_name, "tap7");
        assert_eq!(r.vsock.as_ref().unwrap().uds_path, "/new.sock");

        let eth1 = NetworkOverride {
            iface_id: "eth1".into(),
            host_dev_name: "tap1".into(),
        };
        let e = apply_overrides(&mut r, &[eth1], None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "network override: the snapshot has no interface \"eth1\""
        );
        let mut bare = res("{}");
        let e = apply_overrides(&mut bare, &[], Some(&sock)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vsock override: the snapshot has no vsock device"
        );
    }

    #[test]
    fn error_chains_read_like_anyhow() {
        let e = ConfigError::Boot(kiln_vmm::boot::BootError::Initrd {
            path: "/i".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        });
        let c = crate::error::chain(&e);
        assert!(c.starts_with("cannot read initrd /i: "), "{c}");
        // The OS error appears in the message and again as its source.
        assert_eq!(c.matches("No such file").count(), 2, "{c}");
    }
}
