//! Kiln's Firecracker-compatible REST API: a small HTTP/1.1 server over a
//! Unix socket (std only), the request router, the JSON models (Firecracker's
//! field names) and a tiny client.
//!
//! The server talks to the VM through [`VmControl`], so this crate does not
//! depend on KVM or the device models.

pub mod client;
pub mod cpu_config;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzz_harness;
pub mod http;
pub mod metrics;
pub mod migrate;
pub mod mmds;
pub mod models;
pub mod preboot;
pub mod router;
pub mod server;
pub mod snapshot;
pub mod telemetry;

pub use models::{
    Balloon, BalloonStats, BalloonStatsUpdate, BalloonUpdate, FirecrackerVersion, InstanceInfo,
    PartialDrive, PartialNetworkInterface, VmState, VmStateUpdate,
};
pub use preboot::{PreBootRequest, PreBootVm, Starter, VmResources};
pub use server::{ApiServer, ServerError};
pub use telemetry::{LogLevel, LoggerConfig, MetricsConfig, Telemetry};

/// Largest request body accepted by default (Firecracker's default).
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;

/// An operation the VM refused; its text becomes the `fault_message`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    /// The VM has no balloon device.
    #[error("No balloon device configured")]
    NoBalloon,
    /// Balloon statistics were not enabled at start.
    #[error("Balloon statistics are not enabled")]
    StatsDisabled,
    /// The request is well-formed but its values are not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The result would exceed a size limit (HTTP 413).
    #[error("{0}")]
    PayloadTooLarge(String),
}

impl ApiError {
    /// The HTTP status of the fault.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::PayloadTooLarge(_) => 413,
            _ => 400,
        }
    }
}

/// What the API server may ask of the running VM. Implemented by the VMM
/// side (the `kiln` binary); every method is called from the API thread.
pub trait VmControl: Send + Sync {
    /// `GET /`.
    fn instance_info(&self) -> InstanceInfo;
    /// `GET /balloon`: the balloon's current configuration.
    fn balloon(&self) -> Result<Balloon, ApiError>;
    /// `PATCH /balloon`: a new target size.
    fn update_balloon(&self, update: &BalloonUpdate) -> Result<(), ApiError>;
    /// `GET /balloon/statistics`.
    fn balloon_stats(&self) -> Result<BalloonStats, ApiError>;
    /// `PATCH /balloon/statistics`: a new statistics polling interval.
    /// Default: no balloon.
    fn update_balloon_stats(&self, _update: &BalloonStatsUpdate) -> Result<(), ApiError> {
        Err(ApiError::NoBalloon)
    }
    /// `GET /machine-config`. Default: not available.
    fn machine_config(&self) -> Result<preboot::MachineConfig, ApiError> {
        Err(ApiError::Invalid(
            "The machine configuration is not available from this VMM".into(),
        ))
    }
    /// A pre-boot `PUT`/`PATCH`. Default: the VM already runs (`kiln run`).
    fn configure(&self, _req: PreBootRequest) -> Result<(), ApiError> {
        Err(ApiError::Invalid(preboot::AFTER_START.into()))
    }
    /// `PUT /actions {"action_type":"InstanceStart"}`. Default: already running.
    fn start_instance(&self) -> Result<(), ApiError> {
        Err(ApiError::Invalid(preboot::AFTER_START.into()))
    }
    /// `PUT /actions {"action_type":"SendCtrlAltDel"}`: type Ctrl-Alt-Del on
    /// the guest's keyboard. Default: not before the VM runs.
    fn send_ctrl_alt_del(&self) -> Result<(), ApiError> {
        Err(ApiError::Invalid(preboot::BEFORE_START.into()))
    }
    /// `PATCH /vm`: pause or resume. Default: not possible.
    fn set_vm_state(&self, _state: models::VmState) -> Result<(), ApiError> {
        Err(ApiError::Invalid(
            "The microVM cannot be paused or resumed in its current state".into(),
        ))
    }
    /// `PATCH /drives/{id}` on the running VM. Default: not possible.
    fn update_drive(&self, _update: &PartialDrive) -> Result<(), ApiError> {
        Err(ApiError::Invalid(
            "Drives cannot be updated by this VMM".into(),
        ))
    }
    /// `PATCH /network-interfaces/{id}` on the running VM. Default: not
    /// possible.
    fn update_network_interface(&self, _update: &PartialNetworkInterface) -> Result<(), ApiError> {
        Err(ApiError::Invalid(
            "Network interfaces cannot be updated by this VMM".into(),
        ))
    }
    /// `PUT /actions {"action_type":"FlushMetrics"}`. Default: not available.
    fn flush_metrics(&self) -> Result<(), ApiError> {
        Err(ApiError::Invalid(
            "FlushMetrics is not supported by this VMM".into(),
        ))
    }
    /// `GET /vm/config`. Default: not available.
    fn vm_config(&self) -> Result<VmResources, ApiError> {
        Err(ApiError::Invalid(
            "The VM configuration is not available from this VMM".into(),
        ))
    }
    /// `PUT /snapshot/create`. Default: not possible.
    fn create_snapshot(&self, _p: &snapshot::SnapshotCreateParams) -> Result<(), ApiError> {
        Err(ApiError::Invalid(
            "This microVM cannot be snapshotted (start it with `kiln vmm`)".into(),
        ))
    }
    /// `PUT /snapshot/load`. Default: not possible.
    fn load_snapshot(&self, _p: &snapshot::SnapshotLoadParams) -> Result<(), ApiError> {
        Err(ApiError::Invalid(preboot::AFTER_START.into()))
    }
    /// `PUT /migrate` (Kiln extension): migrates the running VM, returning
    /// once the destination runs it. Default: not possible.
    fn migrate(&self, _p: &migrate::MigrateParams) -> Result<migrate::MigrationReport, ApiError> {
        Err(ApiError::Invalid(
            "This microVM cannot be migrated (start it with `kiln vmm`)".into(),
        ))
    }
    /// Called by the server once a response has been handed to the
    /// connection (after a migration, the VMM exits from here).
    fn after_response(&self) {}
    /// `PUT`, `PATCH` or `GET /mmds`. Default: no metadata service.
    fn mmds(&self, _op: mmds::MmdsOp) -> Result<Option<serde_json::Value>, ApiError> {
        Err(ApiError::Invalid(
            "The microVM metadata service is not available from this VMM".into(),
        ))
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_endpoints;
