//! `kiln vmm`: Firecracker's command line and pre-boot flow.
//!
//! # Design
//!
//! The main thread owns the VM: it builds it ([`Vmm::new`]) and runs its
//! event loop ([`Vmm::run_notify`]). The API server runs on its own thread
//! with a [`PreBootVm`] (from `kiln-api`), which collects the pre-boot
//! configuration. On `InstanceStart`, [`ChannelStarter`] (on the API thread)
//! turns that configuration into a [`VmConfig`] (checking the files), sends
//! it to the main thread with a reply channel, and blocks. The main thread
//! answers:
//!
//! - `Err(message)` if the VM could not be built; it then waits for the
//!   next `InstanceStart` (the API answers 400 and stays "Not started");
//! - `Ok(control)` once every vCPU thread is running; the API answers 204
//!   and forwards runtime requests (balloon) to `control`.
//!
//! With `--config-file`, the main thread builds the VM itself right away and
//! marks the API (if any) as running. `kiln vmm` exits like `kiln run`.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use kiln_api::preboot::{IoEngine, RateLimiter, Serial};
use kiln_api::{
    ApiServer, LogLevel, LoggerConfig, MetricsConfig, PreBootVm, Starter, Telemetry, VmControl,
    VmResources,
};
use kiln_vmm::cpu_template::{CpuTemplate, CpuidModifier, MsrModifier};
use kiln_vmm::kiln_devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use kiln_vmm::kiln_devices::virtio::balloon::BalloonConfig;
use kiln_vmm::kiln_devices::virtio::block::{BlockConfig, BlockEngine};
use kiln_vmm::kiln_devices::virtio::net::{parse_mac, NetConfig};
use kiln_vmm::kiln_devices::virtio::vsock::VsockConfig;
use kiln_vmm::{VmConfig, Vmm};

use crate::api_glue::{KilnVm, SocketGuard};

/// Options of `kiln vmm` (Firecracker's flags).
#[derive(Args, Debug)]
pub struct VmmArgs {
    /// Serve the Firecracker API on this Unix socket.
    #[arg(long, value_name = "PATH", required_unless_present = "no_api")]
    api_sock: Option<PathBuf>,
    /// The microVM's id (letters, digits and '-', at most 64).
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Boot from a Firecracker config file (JSON) right away.
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// No API server (requires --config-file).
    #[arg(long, requires = "config_file", conflicts_with = "api_sock")]
    no_api: bool,
    /// Accepted: Kiln's boot timer device is always present.
    #[arg(long)]
    boot_timer: bool,
    /// Log level: Off, Error, Warning, Info, Debug or Trace (any case).
    #[arg(long, value_name = "LEVEL")]
    level: Option<String>,
    /// Write the log to this file (appended) or named pipe, Firecracker-style.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Write the level in each log line.
    #[arg(long)]
    show_level: bool,
    /// Write the source file and line in each log line.
    #[arg(long)]
    show_log_origin: bool,
    /// Write metrics (JSON lines) to this file or named pipe.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// Largest API request body, bytes.
    #[arg(long, value_name = "BYTES", default_value_t = kiln_api::DEFAULT_MAX_PAYLOAD)]
    http_api_max_payload_size: usize,
    // Firecracker flags accepted and ignored (the jailer passes some).
    #[arg(long, hide = true)]
    start_time_us: Option<u64>,
    #[arg(long, hide = true)]
    start_time_cpu_us: Option<u64>,
    #[arg(long, hide = true)]
    parent_cpu_time_us: Option<u64>,
    /// Run every thread without a seccomp filter (not for production).
    #[arg(long, conflicts_with = "seccomp_filter")]
    no_seccomp: bool,
    /// Per-thread seccomp filters from this JSON file (see docs/seccomp.md)
    /// instead of the built-in ones.
    #[arg(long, value_name = "FILE")]
    seccomp_filter: Option<PathBuf>,
    /// Largest MMDS document, bytes (default: --http-api-max-payload-size).
    #[arg(long, value_name = "BYTES")]
    mmds_size_limit: Option<usize>,
    /// Put this JSON file's content into the MMDS at startup.
    #[arg(long, value_name = "FILE")]
    metadata: Option<PathBuf>,
    // Firecracker flags Kiln does not support: refused with one line.
    #[arg(long, hide = true, num_args = 0..=1, default_missing_value = "")]
    describe_snapshot: Option<String>,
    #[arg(long, hide = true)]
    snapshot_version: bool,
    #[arg(long, hide = true)]
    enable_pci: bool,
}

impl VmmArgs {
    /// Refuses the Firecracker flags Kiln does not implement.
    fn check_unsupported(&self) -> Result<()> {
        let unsupported = [
            ("--describe-snapshot", self.describe_snapshot.is_some()),
            ("--snapshot-version", self.snapshot_version),
            ("--enable-pci", self.enable_pci),
        ];
        if let Some((flag, _)) = unsupported.iter().find(|(_, set)| *set) {
            anyhow::bail!("vmm: Firecracker's {flag} is not supported by Kiln");
        }
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            anyhow::bail!(
                "vmm: --id {:?}: use 1 to 64 letters, digits or '-'",
                self.id
            );
        }
        Ok(())
    }
}

/// Firecracker's `--level` as a log filter.
pub fn log_level(level: &str) -> Result<log::LevelFilter> {
    Ok(parse_level(level)?.filter())
}

fn parse_level(level: &str) -> Result<LogLevel> {
    level
        .parse::<LogLevel>()
        .map_err(|e| anyhow::anyhow!("vmm: --level: {e}"))
}

/// `PUT /logger`, `PUT /metrics` and `FlushMetrics`, for the API.
struct KilnTelemetry {
    id: String,
}

impl Telemetry for KilnTelemetry {
    fn configure_logger(&self, config: &LoggerConfig) -> Result<(), String> {
        crate::logger::configure(config)
    }

    fn configure_metrics(&self, config: &MetricsConfig) -> Result<(), String> {
        crate::metrics::configure(config, &self.id)
    }

    fn flush_metrics(&self) -> Result<(), String> {
        crate::metrics::flush()
    }
}

/// The logger and metrics the flags and the config file ask for. The config
/// file's logger fields override the flags'; metrics can be set only once.
fn telemetry_config(
    args: &VmmArgs,
    file: Option<&VmResources>,
) -> Result<(Option<LoggerConfig>, Option<MetricsConfig>)> {
    let level = args.level.as_deref().map(parse_level).transpose()?;
    let mut logger =
        (args.log_path.is_some() || args.show_level || args.show_log_origin).then(|| {
            LoggerConfig {
                log_path: args
                    .log_path
                    .as_ref()
                    .map(|p| p.to_string_lossy().into_owned()),
                level,
                show_level: Some(args.show_level),
                show_log_origin: Some(args.show_log_origin),
                module: None,
            }
        });
    let mut metrics = args.metrics_path.as_ref().map(|p| MetricsConfig {
        metrics_path: p.to_string_lossy().into_owned(),
        emit_id: false,
        properties: None,
    });
    if let Some(res) = file {
        if let Some(l) = &res.logger {
            let base = logger.unwrap_or(LoggerConfig {
                level,
                ..Default::default()
            });
            logger = Some(base.merged(l));
        }
        if let Some(m) = &res.metrics {
            if metrics.is_some() {
                anyhow::bail!(
                    "vmm: --metrics-path and the config file's \"metrics\": the metrics can be configured only once"
                );
            }
            metrics = Some(m.clone());
        }
    }
    Ok((logger, metrics))
}

/// Firecracker's rate limiter as the devices' configuration.
pub(crate) fn limiter(r: &Option<RateLimiter>) -> Option<RateLimiterConfig> {
    let bucket = |b: &kiln_api::preboot::TokenBucket| TokenBucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time_ms: b.refill_time,
    };
    r.as_ref().map(|r| RateLimiterConfig {
        bandwidth: r.bandwidth.as_ref().map(bucket),
        ops: r.ops.as_ref().map(bucket),
    })
}

/// Builds the VM configuration from Firecracker's resources, checking the
/// kernel, initrd and disk files. The root drive is attached first
/// (/dev/vda); `root=/dev/vda` (with `ro`/`rw`) is added to the command line
/// unless it already has a `root=`.
pub fn to_vm_config(res: &VmResources) -> Result<VmConfig> {
    vm_config_of(res, true)
}

/// [`to_vm_config`]; `check_kernel` false skips the kernel and initrd
/// checks (a restored VM does not load them).
pub fn vm_config_of(res: &VmResources, check_kernel: bool) -> Result<VmConfig> {
    let boot = res
        .boot_source
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no boot source (kernel) configured"))?;
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
        std::fs::metadata(&d.path_on_host).map_err(|e| {
            anyhow::anyhow!("drive {}: cannot open {}: {e}", d.drive_id, d.path_on_host)
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
                    Some(m) => Some(parse_mac(m).ok_or_else(|| {
                        anyhow::anyhow!("interface {}: bad guest_mac {m:?}", n.iface_id)
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
        .collect::<Result<_>>()?;
    let mem_mib = res.machine_config.mem_size_mib;
    let balloon = match &res.balloon {
        Some(b) if b.amount_mib >= mem_mib => anyhow::bail!(
            "balloon amount_mib {} must be smaller than the guest's memory ({mem_mib} MiB)",
            b.amount_mib
        ),
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

/// Where the guest's serial output goes.
type Console = Box<dyn Write + Send>;

/// The serial console's output: `PUT /serial`'s `serial_out_path` (a file,
/// appended to and created if needed, or a named pipe with a reader), else
/// stdout.
pub fn open_console(serial: Option<&Serial>) -> Result<Console> {
    let Some(path) = serial.and_then(|s| s.serial_out_path.as_deref()) else {
        return Ok(Box::new(std::io::stdout()));
    };
    // O_NONBLOCK: opening a named pipe without a reader fails (ENXIO)
    // rather than blocking the API; the flag is cleared afterwards.
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| anyhow::anyhow!("serial_out_path {path}: {e}"))?;
    // SAFETY: F_GETFL/F_SETFL on a descriptor `f` owns; no memory is passed.
    let ok = unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !ok {
        anyhow::bail!(
            "serial_out_path {path}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(Box::new(f))
}

/// How the main thread should make the VM.
enum Make {
    /// Boot it (`InstanceStart`), its console going to the given output.
    Boot(Box<VmConfig>, Console),
    /// Restore it (`PUT /snapshot/load`).
    Restore(Box<crate::snapshot_cmd::Restore>),
}

/// What the API thread sends the main thread: what to make, the
/// configuration it comes from, and where to answer.
type StartRequest = (Make, VmResources, Reply);

/// Where the main thread answers a [`StartRequest`].
type Reply = SyncSender<Result<KilnVm, String>>;

/// The API side of `InstanceStart` and `PUT /snapshot/load`: see the module
/// documentation.
struct ChannelStarter(Mutex<Sender<StartRequest>>);

impl ChannelStarter {
    fn ask(&self, make: Make, res: VmResources) -> Result<Arc<dyn VmControl>, String> {
        let (reply, answer) = sync_channel(1);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((make, res, reply))
            .map_err(|_| "the VMM thread has stopped".to_string())?;
        match answer.recv() {
            Ok(Ok(vm)) => Ok(Arc::new(vm)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the VM failed while starting its vCPUs".into()),
        }
    }
}

impl Starter for ChannelStarter {
    fn start(&self, res: &VmResources) -> Result<Arc<dyn VmControl>, String> {
        let config = to_vm_config(res).map_err(|e| e.to_string())?;
        let console = open_console(res.serial.as_ref()).map_err(|e| e.to_string())?;
        self.ask(Make::Boot(Box::new(config), console), res.clone())
    }

    fn restore(
        &self,
        p: &kiln_api::snapshot::SnapshotLoadParams,
    ) -> Result<(Arc<dyn VmControl>, VmResources), String> {
        let r = crate::snapshot_cmd::prepare(p).map_err(|e| format!("{e:#}"))?;
        let res = r.res.clone();
        let vm = self.ask(Make::Restore(Box::new(r)), res.clone())?;
        Ok((vm, res))
    }
}

/// The VMM's form of a `/cpu-config` template.
fn cpu_template(c: &kiln_api::cpu_config::CpuConfig) -> Result<CpuTemplate> {
    use kiln_api::cpu_config::CpuidRegister;
    let p = c.parse().map_err(|e| anyhow::anyhow!("cpu-config: {e}"))?;
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

/// Creates the metadata service with its size limit and optional initial
/// document (`--metadata`).
fn init_mmds(limit: usize, metadata: Option<&std::path::Path>) -> Result<()> {
    let _ = MMDS.set(Arc::new(kiln_mmds::Mmds::new(limit)));
    let m = mmds();
    if let Some(path) = metadata {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("vmm: --metadata {}: {e}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("vmm: --metadata {}: {e}", path.display()))?;
        m.store()
            .put(v)
            .map_err(|e| anyhow::anyhow!("vmm: --metadata {}: {e}", path.display()))?;
    }
    Ok(())
}

/// `kiln vmm`.
pub fn vmm(args: VmmArgs, start: Instant) -> Result<i32> {
    args.check_unsupported()?;
    init_mmds(
        args.mmds_size_limit
            .unwrap_or(args.http_api_max_payload_size),
        args.metadata.as_deref(),
    )?;
    // Compiled before any thread starts: a bad filter file stops here.
    crate::seccomp_cmd::init(args.no_seccomp, args.seccomp_filter.as_deref())
        .map_err(|e| anyhow::anyhow!("vmm: {e:#}"))?;
    crate::logger::set_instance_id(&args.id);
    let from_file = args
        .config_file
        .as_deref()
        .map(VmResources::from_file)
        .transpose()
        .map_err(|e| anyhow::anyhow!("vmm: {e}"))?;
    // A config file's VM is checked before the API socket appears.
    let file_config = match (&from_file, &args.config_file) {
        (Some(res), Some(path)) => Some(
            to_vm_config(res)
                .map_err(|e| anyhow::anyhow!("vmm: --config-file {}: {e}", path.display()))?,
        ),
        _ => None,
    };

    let (logger, metrics) = telemetry_config(&args, from_file.as_ref())?;
    match &logger {
        Some(l) => crate::logger::configure(l).map_err(|e| anyhow::anyhow!("vmm: {e}"))?,
        None => {
            if let Some(l) = &args.level {
                log::set_max_level(log_level(l)?);
            }
        }
    }

    let (tx, rx) = channel::<StartRequest>();
    let api = Arc::new(
        PreBootVm::new(
            args.id.clone(),
            env!("CARGO_PKG_VERSION"),
            Box::new(ChannelStarter(Mutex::new(tx))),
        )
        .with_telemetry(Box::new(KilnTelemetry {
            id: args.id.clone(),
        }))
        .with_mmds(mmds().clone()),
    );
    api.set_telemetry_config(logger.clone(), metrics.clone());
    let _socket = match (&args.api_sock, args.no_api) {
        (Some(path), false) => {
            let server = ApiServer::bind(path)?.max_payload(args.http_api_max_payload_size);
            server.spawn(api.clone())?;
            log::info!("API listening on {}", path.display());
            Some(SocketGuard(path.clone()))
        }
        _ => None,
    };
    crate::metrics::record_startup(
        start,
        args.start_time_us,
        args.start_time_cpu_us,
        args.parent_cpu_time_us,
    );
    if let Some(m) = &metrics {
        crate::metrics::configure(m, &args.id).map_err(|e| anyhow::anyhow!("vmm: {e}"))?;
    }

    let (mut vmm, reply, res) = match (file_config, from_file) {
        (Some(config), Some(mut res)) => {
            let vmm = Vmm::new(config, Box::new(std::io::stdout()), start)?;
            (res.logger, res.metrics) = (logger, metrics);
            api.set_running(res.clone(), Arc::new(KilnVm::of(&vmm).with_config(&res)));
            (vmm, None, res)
        }
        _ => {
            let (vmm, reply, res) = wait_for_start(&rx, start)?;
            (vmm, Some(reply), res)
        }
    };
    crate::metrics::set_vm(vmm.stats());
    let stdin = crate::term::prepare_stdin();
    let control = KilnVm::of(&vmm).with_config(&res);
    let reason = vmm.run_notify(stdin, move || {
        if let Some(r) = reply {
            let _ = r.send(Ok(control));
        }
    })?;
    crate::term::restore();
    // A last line with the final counters (nothing without --metrics-path).
    if let Err(e) = crate::metrics::flush() {
        log::warn!("{e}");
    }
    Ok(crate::exit_status(reason))
}

/// Builds VMs as the API asks until one builds; failures go back to the API.
fn wait_for_start(
    rx: &Receiver<StartRequest>,
    start: Instant,
) -> Result<(Vmm, Reply, VmResources)> {
    loop {
        let (make, res, reply) = rx
            .recv()
            .map_err(|_| anyhow::anyhow!("vmm: the API server stopped"))?;
        let made = match make {
            Make::Boot(config, console) => {
                Vmm::new(*config, console, start).map_err(|e| format!("{e}"))
            }
            Make::Restore(r) => crate::snapshot_cmd::restore(*r, start),
        };
        match made {
            Ok(vmm) => return Ok((vmm, reply, res)),
            Err(e) => {
                log::warn!("starting the microVM failed: {e}");
                let _ = reply.send(Err(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn levels() {
        assert_eq!(log_level("Warning").unwrap(), log::LevelFilter::Warn);
        assert_eq!(log_level("Off").unwrap(), log::LevelFilter::Off);
        assert_eq!(log_level("debug").unwrap(), log::LevelFilter::Debug);
        assert!(log_level("loud").is_err());
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
}
