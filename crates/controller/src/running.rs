//! [`RunningVm`]: what the API can do to a running VM (the runtime half of
//! Firecracker's API: pause, snapshot, migrate, balloon, drive and
//! interface updates).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use kiln_api::preboot::RateLimiter;
use kiln_api::snapshot::{SnapshotCreateParams, SnapshotType};
use kiln_api::{
    ApiError, Balloon, BalloonStats, BalloonStatsUpdate, BalloonUpdate, InstanceInfo, PartialDrive,
    PartialNetworkInterface, VmControl, VmResources, VmState,
};
use kiln_vmm::kiln_devices::rate_limiter::RateLimiterUpdate;
use kiln_vmm::kiln_devices::virtio::balloon::{BalloonConfig, BalloonHandle};
use kiln_vmm::kiln_devices::virtio::block::BlockHandle;
use kiln_vmm::kiln_devices::virtio::net::NetHandle;
use kiln_vmm::{VmHandle, Vmm};

/// The last `PATCH /vm` pause's latency, microseconds (a metric).
pub static PAUSE_US: AtomicU64 = AtomicU64::new(0);
/// The last `PATCH /vm` resume's latency, microseconds (a metric).
pub static RESUME_US: AtomicU64 = AtomicU64::new(0);

/// The control of a running VM, handed to the API (see [`VmControl`]).
pub struct RunningVm {
    handle: VmHandle,
    mem_mib: u64,
    balloon: Option<(BalloonHandle, BalloonConfig)>,
    drives: Vec<BlockHandle>,
    nets: Vec<NetHandle>,
    /// The configuration the VM was built from, stored in its snapshots
    /// and migrations; kept up to date by the drive and interface updates.
    res: Mutex<VmResources>,
    /// Set once the VM was migrated away: the VMM ends after the answer.
    migrated: AtomicBool,
}

impl RunningVm {
    /// The control of `vmm` (built, before or while it runs), built from
    /// `res`.
    pub fn new(vmm: &Vmm, res: VmResources) -> Self {
        let config = vmm.config();
        Self {
            handle: vmm.handle(),
            mem_mib: config.mem_mib,
            balloon: vmm.balloon().zip(config.balloon.clone()),
            drives: vmm.drives(),
            nets: vmm.nets(),
            res: Mutex::new(res),
            migrated: false.into(),
        }
    }

    /// The VM's configuration as it is now.
    pub fn resources(&self) -> VmResources {
        self.res().clone()
    }

    fn res(&self) -> MutexGuard<'_, VmResources> {
        self.res.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configuration as stored in a snapshot or sent to a destination.
    fn config_json(&self) -> Result<String, ApiError> {
        serde_json::to_string(&*self.res()).map_err(|e| ApiError::Invalid(e.to_string()))
    }

    fn balloon_parts(&self) -> Result<&(BalloonHandle, BalloonConfig), ApiError> {
        self.balloon.as_ref().ok_or(ApiError::NoBalloon)
    }
}

/// A `PATCH` body's rate limiter as an update of a device's limiter.
fn limiter_update(r: &Option<RateLimiter>) -> Option<RateLimiterUpdate> {
    crate::config::limiter(r).map(|c| RateLimiterUpdate::from_patch(&c))
}

impl VmControl for RunningVm {
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
        self.res().patch_drive(u);
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
        self.res().patch_network_interface(u);
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
        let config = self.config_json()?;
        let (state, mem) = (Path::new(&p.snapshot_path), Path::new(&p.mem_file_path));
        let stats = if diff {
            self.handle.snapshot_diff(&config, state, mem)
        } else {
            self.handle.snapshot(&config, state, mem)
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
        let config = self.config_json()?;
        let report = crate::migrate::send(&self.handle, &config, p).map_err(|e| {
            eprintln!("kiln: {e}");
            ApiError::Invalid(e.to_string())
        })?;
        self.migrated.store(true, Ordering::SeqCst);
        Ok(report)
    }

    fn after_response(&self) {
        if self.migrated.load(Ordering::SeqCst) {
            if let Err(e) = self.handle.end_migrated() {
                log::error!("{e}");
            }
        }
    }

    fn set_vm_state(&self, state: VmState) -> Result<(), ApiError> {
        if self.migrated.load(Ordering::SeqCst) {
            return Err(ApiError::Invalid(
                "The microVM was migrated: it runs at the destination now".into(),
            ));
        }
        let t0 = std::time::Instant::now();
        let (result, latency) = match state {
            VmState::Paused => (self.handle.pause().map_err(ApiError::Invalid), &PAUSE_US),
            VmState::Resumed => {
                self.handle.resume();
                (Ok(()), &RESUME_US)
            }
        };
        if result.is_ok() {
            let us = t0.elapsed().as_micros() as u64;
            latency.store(us, Ordering::Relaxed);
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
