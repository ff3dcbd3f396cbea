//! Connects the API server (`kiln-api`) to the running VM, and `kiln api`,
//! the command-line client.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use clap::Args;
use kiln_api::preboot::RateLimiter;
use kiln_api::snapshot::{SnapshotCreateParams, SnapshotType};
use kiln_api::{
    ApiError, ApiServer, Balloon, BalloonStats, BalloonStatsUpdate, BalloonUpdate, InstanceInfo,
    PartialDrive, PartialNetworkInterface, VmControl, VmState,
};
use kiln_vmm::kiln_devices::rate_limiter::RateLimiterUpdate;
use kiln_vmm::kiln_devices::virtio::balloon::{BalloonConfig, BalloonHandle};
use kiln_vmm::kiln_devices::virtio::block::BlockHandle;
use kiln_vmm::kiln_devices::virtio::net::NetHandle;
use kiln_vmm::{VmHandle, Vmm};

/// What the API can reach of a running VM.
pub struct KilnVm {
    handle: VmHandle,
    mem_mib: u64,
    balloon: Option<(BalloonHandle, BalloonConfig)>,
    drives: Vec<BlockHandle>,
    nets: Vec<NetHandle>,
    /// The Firecracker-shaped configuration (JSON), stored in snapshots;
    /// kept up to date by the drive and interface updates.
    config_json: Mutex<Option<String>>,
    /// Set once the VM was migrated away: the VMM ends after the answer.
    migrated: std::sync::atomic::AtomicBool,
}

impl KilnVm {
    /// The control of `vmm` (built, before or while it runs).
    pub fn of(vmm: &Vmm) -> Self {
        let config = vmm.config();
        Self {
            handle: vmm.handle(),
            mem_mib: config.mem_mib,
            balloon: vmm.balloon().zip(config.balloon.clone()),
            drives: vmm.drives(),
            nets: vmm.nets(),
            config_json: Mutex::new(None),
            migrated: false.into(),
        }
    }

    /// Adds the configuration a snapshot stores to rebuild this VM.
    pub fn with_config(self, res: &kiln_api::VmResources) -> Self {
        *self.config() = serde_json::to_string(res).ok();
        self
    }

    fn config(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.config_json.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `change` to the stored configuration (if there is one).
    fn patch_config(&self, change: impl FnOnce(&mut kiln_api::VmResources)) {
        let mut json = self.config();
        let Some(mut res) = json
            .as_deref()
            .and_then(|j| serde_json::from_str::<kiln_api::VmResources>(j).ok())
        else {
            return;
        };
        change(&mut res);
        *json = serde_json::to_string(&res).ok();
    }

    fn balloon_parts(&self) -> Result<&(BalloonHandle, BalloonConfig), ApiError> {
        self.balloon.as_ref().ok_or(ApiError::NoBalloon)
    }
}

/// A `PATCH` body's rate limiter as an update of a device's limiter.
fn limiter_update(r: &Option<RateLimiter>) -> Option<RateLimiterUpdate> {
    crate::vmm_cmd::limiter(r).map(|c| RateLimiterUpdate::from_patch(&c))
}

impl VmControl for KilnVm {
    fn update_drive(&self, u: &PartialDrive) -> Result<(), ApiError> {
        let drive = self
            .drives
            .iter()
            .find(|d| d.id() == u.drive_id)
            .ok_or_else(|| {
                ApiError::Invalid(format!(
                    "drive update (patch): no drive with id {:?}",
                    u.drive_id
                ))
            })?;
        let path = u.path_on_host.as_deref().map(Path::new);
        drive
            .update(path, limiter_update(&u.rate_limiter).as_ref())
            .map_err(|e| ApiError::Invalid(format!("drive update (patch): {e}")))?;
        // A snapshot must restore the drive as it is now.
        self.patch_config(|res| res.patch_drive(u));
        Ok(())
    }

    fn update_network_interface(&self, u: &PartialNetworkInterface) -> Result<(), ApiError> {
        let net = self
            .nets
            .iter()
            .find(|n| n.id() == u.iface_id)
            .ok_or_else(|| {
                ApiError::Invalid(format!(
                    "network interface update (patch): no interface with id {:?}",
                    u.iface_id
                ))
            })?;
        net.update(
            limiter_update(&u.rx_rate_limiter).as_ref(),
            limiter_update(&u.tx_rate_limiter).as_ref(),
        );
        self.patch_config(|res| res.patch_network_interface(u));
        Ok(())
    }

    fn send_ctrl_alt_del(&self) -> Result<(), ApiError> {
        self.handle.send_ctrl_alt_del().map_err(ApiError::Invalid)
    }

    fn create_snapshot(&self, p: &SnapshotCreateParams) -> Result<(), ApiError> {
        let diff = p.snapshot_type == SnapshotType::Diff;
        if diff && !self.handle.dirty_log_enabled() {
            return Err(ApiError::Invalid(
                kiln_vmm::dirty::DIFF_NEEDS_TRACKING.into(),
            ));
        }
        let config = self.config().clone();
        let config = config.as_deref().ok_or_else(|| {
            ApiError::Invalid(
                "This microVM cannot be snapshotted: start it with `kiln vmm` (API or --config-file)"
                    .into(),
            )
        })?;
        let (state, mem) = (Path::new(&p.snapshot_path), Path::new(&p.mem_file_path));
        let stats = if diff {
            self.handle.snapshot_diff(config, state, mem)
        } else {
            self.handle.snapshot(config, state, mem)
        }
        .map_err(ApiError::Invalid)?;
        log::info!(
            "{} snapshot {} + {}: {} KiB of memory written in {:?}",
            if diff { "diff" } else { "full" },
            p.snapshot_path,
            p.mem_file_path,
            stats.mem_bytes_written >> 10,
            stats.elapsed
        );
        Ok(())
    }

    fn migrate(
        &self,
        p: &kiln_api::migrate::MigrateParams,
    ) -> Result<kiln_api::migrate::MigrationReport, ApiError> {
        let config = self.config().clone().ok_or_else(|| {
            ApiError::Invalid(
                "This microVM cannot be migrated: start it with `kiln vmm` (API or --config-file)"
                    .into(),
            )
        })?;
        let report = crate::migrate_cmd::send(&self.handle, &config, p).map_err(|e| {
            eprintln!("kiln: {e}");
            ApiError::Invalid(e)
        })?;
        self.migrated
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(report)
    }

    fn after_response(&self) {
        if self.migrated.load(std::sync::atomic::Ordering::SeqCst) {
            if let Err(e) = self.handle.end_migrated() {
                log::error!("{e}");
            }
        }
    }

    fn set_vm_state(&self, state: VmState) -> Result<(), ApiError> {
        if self.migrated.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ApiError::Invalid(
                "The microVM was migrated: it runs at the destination now".into(),
            ));
        }
        let t0 = std::time::Instant::now();
        let (result, latency) = match state {
            VmState::Paused => (
                self.handle.pause().map_err(ApiError::Invalid),
                &crate::metrics::PAUSE_US,
            ),
            VmState::Resumed => {
                self.handle.resume();
                (Ok(()), &crate::metrics::RESUME_US)
            }
        };
        if result.is_ok() {
            let us = t0.elapsed().as_micros() as u64;
            latency.store(us, std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            id: "anonymous-instance".into(),
            state: if self.handle.is_paused() {
                "Paused".into()
            } else {
                "Running".into()
            },
            vmm_version: env!("CARGO_PKG_VERSION").into(),
            app_name: "kiln".into(),
        }
    }

    fn balloon(&self) -> Result<Balloon, ApiError> {
        let (h, cfg) = self.balloon_parts()?;
        Ok(Balloon {
            amount_mib: h.stats().target_mib,
            deflate_on_oom: cfg.deflate_on_oom,
            stats_polling_interval_s: h.stats_interval_s(),
            free_page_hinting: false,
            free_page_reporting: cfg.free_page_reporting,
        })
    }

    fn update_balloon(&self, u: &BalloonUpdate) -> Result<(), ApiError> {
        let (h, _) = self.balloon_parts()?;
        if u.amount_mib >= self.mem_mib {
            return Err(ApiError::Invalid(format!(
                "amount_mib {} must be smaller than the guest's memory ({} MiB)",
                u.amount_mib, self.mem_mib
            )));
        }
        h.set_target_mib(u.amount_mib);
        Ok(())
    }

    fn update_balloon_stats(&self, u: &BalloonStatsUpdate) -> Result<(), ApiError> {
        let (h, _) = self.balloon_parts()?;
        h.set_stats_interval_s(u.stats_polling_interval_s)
            .map_err(|e| ApiError::Invalid(e.to_string()))
    }

    fn balloon_stats(&self) -> Result<BalloonStats, ApiError> {
        let (h, _) = self.balloon_parts()?;
        if h.stats_interval_s() == 0 {
            return Err(ApiError::StatsDisabled);
        }
        let s = h.stats();
        Ok(BalloonStats::from_device(
            s.target_mib,
            s.actual_mib,
            &s.raw,
        ))
    }
}

/// Fails early (one line) if `path` is taken by something other than a socket.
pub fn check_sock(path: &Path) -> Result<()> {
    ApiServer::check_path(path)?;
    Ok(())
}

/// Removes the API socket when `kiln run` ends.
pub struct SocketGuard(pub PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Starts the API server for `vmm` on `path` (before the vCPUs run).
pub fn start(path: &Path, vmm: &Vmm) -> Result<SocketGuard> {
    let vm = KilnVm::of(vmm);
    let server = ApiServer::bind(path)?;
    server.spawn(Arc::new(vm))?;
    log::info!("API listening on {}", path.display());
    Ok(SocketGuard(path.to_path_buf()))
}

/// Options of `kiln api`.
#[derive(Args, Debug)]
pub struct ApiArgs {
    /// The API socket of a running `kiln run --api-sock`.
    #[arg(long)]
    sock: PathBuf,
    /// GET, PUT, PATCH, ...
    method: String,
    /// E.g. /balloon.
    uri: String,
    /// JSON body.
    json: Option<String>,
}

/// `kiln api`: prints the status line and body; 0 on 2xx, else 1.
pub fn api(args: ApiArgs) -> Result<i32> {
    let r = kiln_api::client::request(&args.sock, &args.method, &args.uri, args.json.as_deref())
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.sock.display()))?;
    println!("{}", r.status_line);
    if !r.body.is_empty() {
        println!("{}", r.body);
    }
    Ok(if (200..300).contains(&r.status) { 0 } else { 1 })
}
