//! [`PreBootVm`]: `kiln vmm`'s API before and after `InstanceStart`, and
//! the [`Starter`] the VMM side implements.

use std::sync::{Arc, Mutex};

use super::invalid;
use super::models::*;
use super::resources::VmResources;
use crate::models::{
    Balloon, BalloonStats, BalloonUpdate, InstanceInfo, PartialDrive, PartialNetworkInterface,
};
use crate::telemetry::{LoggerConfig, MetricsConfig, Telemetry};
use crate::{ApiError, VmControl};

/// Builds and boots the VM for [`PreBootVm`] (the VMM side implements it).
pub trait Starter: Send + Sync {
    /// Builds the VM from `res` and starts its vCPUs; returns the running
    /// VM's control (for the runtime requests), or why it could not start.
    fn start(&self, res: &VmResources) -> Result<Arc<dyn VmControl>, String>;
    /// Restores a VM from a snapshot; returns its control and the
    /// configuration it was built from. Default: not supported.
    fn restore(
        &self,
        _p: &crate::snapshot::SnapshotLoadParams,
    ) -> Result<(Arc<dyn VmControl>, VmResources), String> {
        Err("snapshots are not supported by this VMM".into())
    }
}

enum Stage {
    NotStarted,
    Running(Arc<dyn VmControl>),
}

struct State {
    res: VmResources,
    stage: Stage,
}

/// `kiln vmm`'s [`VmControl`]: pre-boot configuration, `InstanceStart`,
/// then the running VM. One lock guards the state; `InstanceStart` holds it
/// while the VM is built, so no request sees a half-started VM.
pub struct PreBootVm {
    id: String,
    version: String,
    starter: Box<dyn Starter>,
    telemetry: Option<Box<dyn Telemetry>>,
    mmds: Option<Arc<dyn crate::mmds::MmdsData>>,
    state: Mutex<State>,
}

/// The fault message of pre-boot requests once the VM runs.
pub const AFTER_START: &str =
    "The requested operation is not allowed after the microVM has started (InstanceStart).";
/// The fault message of runtime requests before the VM runs.
pub const BEFORE_START: &str =
    "The requested operation is not supported before starting the microVM.";

impl PreBootVm {
    /// A VM in the "Not started" state.
    pub fn new(
        id: impl Into<String>,
        version: impl Into<String>,
        starter: Box<dyn Starter>,
    ) -> Self {
        Self {
            id: id.into(),
            version: version.into(),
            starter,
            telemetry: None,
            mmds: None,
            state: Mutex::new(State {
                res: VmResources::default(),
                stage: Stage::NotStarted,
            }),
        }
    }

    /// Lets `PUT /logger`, `PUT /metrics` and `FlushMetrics` act through
    /// `telemetry` (without it they are refused).
    pub fn with_telemetry(mut self, telemetry: Box<dyn Telemetry>) -> Self {
        self.telemetry = Some(telemetry);
        self
    }

    /// Serves `/mmds` from `store` (without it, `/mmds` is refused).
    pub fn with_mmds(mut self, store: Arc<dyn crate::mmds::MmdsData>) -> Self {
        self.mmds = Some(store);
        self
    }

    /// Records a logger and metrics configuration the VMM applied itself
    /// (from its flags), so `GET /vm/config` reports it.
    pub fn set_telemetry_config(
        &self,
        logger: Option<LoggerConfig>,
        metrics: Option<MetricsConfig>,
    ) {
        let mut s = self.state();
        s.res.logger = logger;
        s.res.metrics = metrics;
    }

    fn telemetry(&self) -> Result<&dyn Telemetry, ApiError> {
        self.telemetry
            .as_deref()
            .ok_or_else(|| invalid("Logging and metrics are not available in this VMM"))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a VM started without the API (from a config file).
    pub fn set_running(&self, res: VmResources, running: Arc<dyn VmControl>) {
        let mut s = self.state();
        s.res = res;
        s.stage = Stage::Running(running);
    }

    /// The running VM's control, or the "before start" fault.
    fn running(&self) -> Result<Arc<dyn VmControl>, ApiError> {
        match &self.state().stage {
            Stage::Running(vm) => Ok(vm.clone()),
            Stage::NotStarted => Err(invalid(BEFORE_START)),
        }
    }

    /// Whether the VM has started.
    pub fn is_running(&self) -> bool {
        matches!(self.state().stage, Stage::Running(_))
    }
}

impl VmControl for PreBootVm {
    fn instance_info(&self) -> InstanceInfo {
        let state = match &self.state().stage {
            Stage::Running(vm) => vm.instance_info().state,
            Stage::NotStarted => "Not started".to_string(),
        };
        InstanceInfo {
            id: self.id.clone(),
            state,
            vmm_version: self.version.clone(),
            app_name: "kiln".into(),
        }
    }

    fn balloon(&self) -> Result<Balloon, ApiError> {
        let s = self.state();
        match &s.stage {
            Stage::Running(vm) => vm.balloon(),
            Stage::NotStarted => s.res.balloon.clone().ok_or(ApiError::NoBalloon),
        }
    }

    fn update_balloon(&self, update: &BalloonUpdate) -> Result<(), ApiError> {
        let mut s = self.state();
        match &s.stage {
            Stage::Running(vm) => {
                vm.update_balloon(update)?;
                if let Some(b) = s.res.balloon.as_mut() {
                    b.amount_mib = update.amount_mib;
                }
                Ok(())
            }
            Stage::NotStarted => Err(invalid(BEFORE_START)),
        }
    }

    fn update_balloon_stats(
        &self,
        update: &crate::models::BalloonStatsUpdate,
    ) -> Result<(), ApiError> {
        let mut s = self.state();
        let interval = update.stats_polling_interval_s;
        match &s.stage {
            Stage::Running(vm) => {
                vm.update_balloon_stats(update)?;
                if let Some(b) = s.res.balloon.as_mut() {
                    b.stats_polling_interval_s = interval;
                }
                Ok(())
            }
            Stage::NotStarted => {
                let b = s.res.balloon.as_mut().ok_or(ApiError::NoBalloon)?;
                b.stats_polling_interval_s = interval;
                Ok(())
            }
        }
    }

    fn set_vm_state(&self, state: crate::models::VmState) -> Result<(), ApiError> {
        // Clone the running control out so a slow pause does not hold the lock.
        let vm = match &self.state().stage {
            Stage::Running(vm) => vm.clone(),
            Stage::NotStarted => return Err(invalid(BEFORE_START)),
        };
        vm.set_vm_state(state)
    }

    fn update_drive(&self, update: &PartialDrive) -> Result<(), ApiError> {
        // The running control is cloned out: the update may wait for the
        // device's worker, and the lock must not be held meanwhile.
        let vm = self.running()?;
        vm.update_drive(update)?;
        self.state().res.patch_drive(update);
        Ok(())
    }

    fn update_network_interface(&self, update: &PartialNetworkInterface) -> Result<(), ApiError> {
        let vm = self.running()?;
        vm.update_network_interface(update)?;
        self.state().res.patch_network_interface(update);
        Ok(())
    }

    fn send_ctrl_alt_del(&self) -> Result<(), ApiError> {
        let vm = match &self.state().stage {
            Stage::Running(vm) => vm.clone(),
            Stage::NotStarted => return Err(invalid(BEFORE_START)),
        };
        vm.send_ctrl_alt_del()
    }

    fn balloon_stats(&self) -> Result<BalloonStats, ApiError> {
        match &self.state().stage {
            Stage::Running(vm) => vm.balloon_stats(),
            Stage::NotStarted => Err(invalid(BEFORE_START)),
        }
    }

    fn machine_config(&self) -> Result<MachineConfig, ApiError> {
        Ok(self.state().res.machine_config.clone())
    }

    fn configure(&self, req: PreBootRequest) -> Result<(), ApiError> {
        let mut s = self.state();
        if let Stage::Running(_) = s.stage {
            return Err(invalid(AFTER_START));
        }
        match req {
            PreBootRequest::Logger(_) | PreBootRequest::Metrics(_) => {
                // Validate on a copy, then open the files, then commit.
                let telemetry = self.telemetry()?;
                let mut next = s.res.clone();
                let is_logger = matches!(req, PreBootRequest::Logger(_));
                next.apply(req)?;
                let done = match (is_logger, &next.logger, &next.metrics) {
                    (true, Some(l), _) => telemetry.configure_logger(l),
                    (false, _, Some(m)) => telemetry.configure_metrics(m),
                    _ => Ok(()),
                };
                done.map_err(invalid)?;
                s.res = next;
                Ok(())
            }
            req => s.res.apply(req),
        }
    }

    fn start_instance(&self) -> Result<(), ApiError> {
        let mut s = self.state();
        if let Stage::Running(_) = s.stage {
            return Err(invalid(AFTER_START));
        }
        if s.res.boot_source.is_none() {
            return Err(invalid(
                "Cannot start microvm without kernel configuration (PUT /boot-source).",
            ));
        }
        let running = self
            .starter
            .start(&s.res)
            .map_err(|e| invalid(format!("Cannot start the microVM: {e}")))?;
        s.stage = Stage::Running(running);
        Ok(())
    }

    fn flush_metrics(&self) -> Result<(), ApiError> {
        if let Stage::NotStarted = self.state().stage {
            return Err(invalid(BEFORE_START));
        }
        self.telemetry()?.flush_metrics().map_err(invalid)
    }

    fn vm_config(&self) -> Result<VmResources, ApiError> {
        Ok(self.state().res.clone())
    }

    fn create_snapshot(&self, p: &crate::snapshot::SnapshotCreateParams) -> Result<(), ApiError> {
        let vm = match &self.state().stage {
            Stage::Running(vm) => vm.clone(),
            Stage::NotStarted => return Err(invalid(BEFORE_START)),
        };
        vm.create_snapshot(p)
    }

    fn migrate(
        &self,
        p: &crate::migrate::MigrateParams,
    ) -> Result<crate::migrate::MigrationReport, ApiError> {
        // Not holding the state lock: a migration takes a while.
        let vm = self.running()?;
        vm.migrate(p)
    }

    fn after_response(&self) {
        if let Ok(vm) = self.running() {
            vm.after_response();
        }
    }

    fn mmds(&self, op: crate::mmds::MmdsOp) -> Result<Option<serde_json::Value>, ApiError> {
        let store = self.mmds.as_ref().ok_or_else(|| {
            invalid("The microVM metadata service is not available from this VMM")
        })?;
        // Before the start the store takes data for later; once the VM
        // runs, only if an interface reaches the service (as Firecracker).
        let s = self.state();
        if matches!(s.stage, Stage::Running(_)) && s.res.mmds_config.is_none() {
            return Err(invalid(crate::mmds::NOT_INITIALIZED));
        }
        drop(s);
        store.apply(op)
    }

    fn load_snapshot(&self, p: &crate::snapshot::SnapshotLoadParams) -> Result<(), ApiError> {
        let mut s = self.state();
        if let Stage::Running(_) = s.stage {
            return Err(invalid(
                "Loading a microVM snapshot is not allowed after the microVM has started.",
            ));
        }
        if s.res != VmResources::default() {
            return Err(invalid(
                "Loading a microVM snapshot is not allowed after configuring boot-specific resources.",
            ));
        }
        p.memory_backend().map_err(invalid)?;
        let (running, res) = self
            .starter
            .restore(p)
            .map_err(|e| invalid(format!("Cannot load the snapshot: {e}")))?;
        s.res = res;
        s.stage = Stage::Running(running);
        Ok(())
    }
}
