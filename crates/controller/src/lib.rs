//! Kiln's VM controller: one microVM's configuration and lifecycle.
//!
//! The configuration is Firecracker's [`kiln_api::VmResources`], whoever
//! builds it (the API, a `--config-file`, `kiln run`'s options, a snapshot,
//! a migration); [`config`] turns it into the VMM's
//! [`kiln_vmm::VmConfig`]. A [`Controller`] builds the VM (boot, restore,
//! migration), serves its API and runs it; its [`RunningVm`] is what the
//! API drives at run time (pause, snapshot, migrate, balloon, updates).
//! [`starter`] is the API's pre-boot flow (`kiln vmm`). The `kiln` binary
//! only adapts its command line to these.
//!
//! Modules, each depending only on those listed before it:
//! [`error`], [`config`], [`migrate`], [`running`], [`restore`], [`api`],
//! [`controller`], [`starter`].

pub mod api;
pub mod config;
pub mod controller;
pub mod error;
pub mod migrate;
pub mod restore;
pub mod running;
pub mod starter;

pub use controller::Controller;
pub use error::{ApiStopped, ConfigError, MigrateError, ReceiveError, RestoreError};
pub use running::RunningVm;
