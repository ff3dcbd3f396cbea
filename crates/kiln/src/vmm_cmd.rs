//! `kiln vmm`: Firecracker's command line. The main thread owns the VM
//! (a [`Controller`]); the API server runs on its own thread with a
//! [`PreBootVm`] whose starter ([`kiln_controller::starter`]) hands the
//! VM to build to the main thread. With `--config-file`, the main thread
//! builds the VM itself right away and marks the API (if any) as running.
//! `kiln vmm` exits like `kiln run`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Args;
use kiln_api::{
    ApiServer, LogLevel, LoggerConfig, MetricsConfig, PreBootVm, Telemetry, VmResources,
};
use kiln_controller::api::SocketGuard;
use kiln_controller::config::{init_mmds, to_vm_config};
use kiln_controller::Controller;

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

/// Creates the metadata service with its size limit and optional initial
/// document (`--metadata`).
fn init_metadata(limit: usize, metadata: Option<&std::path::Path>) -> Result<()> {
    let m = init_mmds(limit);
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
    init_metadata(
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

    let (starter, requests) = kiln_controller::starter::channel();
    let api = Arc::new(
        PreBootVm::new(args.id.clone(), env!("CARGO_PKG_VERSION"), starter)
            .with_telemetry(Box::new(KilnTelemetry {
                id: args.id.clone(),
            }))
            .with_mmds(kiln_controller::config::mmds().clone()),
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

    let (vm, reply) = match (file_config, from_file) {
        (Some(config), Some(mut res)) => {
            (res.logger, res.metrics) = (logger, metrics);
            let vm = Controller::build(config, res, Box::new(std::io::stdout()), start)?;
            api.set_running(vm.resources().clone(), Arc::new(vm.control()));
            (vm, None)
        }
        _ => {
            let (vm, reply) = requests
                .wait(start)
                .map_err(|e| anyhow::anyhow!("vmm: {e}"))?;
            (vm, Some(reply))
        }
    };
    crate::metrics::set_vm(vm.vmm().stats());
    let stdin = crate::term::prepare_stdin();
    let reason = vm.run(stdin, move |control| {
        if let Some(r) = reply {
            r.started(control);
        }
    })?;
    crate::term::restore();
    // A last line with the final counters (nothing without --metrics-path).
    if let Err(e) = crate::metrics::flush() {
        log::warn!("{e}");
    }
    Ok(crate::exit::status(reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        assert_eq!(log_level("Warning").unwrap(), log::LevelFilter::Warn);
        assert_eq!(log_level("Off").unwrap(), log::LevelFilter::Off);
        assert_eq!(log_level("debug").unwrap(), log::LevelFilter::Debug);
        assert!(log_level("loud").is_err());
    }
}
