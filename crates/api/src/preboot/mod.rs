//! Firecracker's pre-boot flow: the configuration a client builds with
//! `PUT /boot-source`, `/machine-config`, `/drives/{id}`, ... before
//! `PUT /actions {"action_type":"InstanceStart"}`, and the same structure read
//! from a `--config-file` (Firecracker's config-file shape).
//!
//! [`VmResources`] holds and validates that configuration (no I/O: paths are
//! checked when the VM is built). [`PreBootVm`] is the [`crate::VmControl`] of
//! `kiln vmm`: "Not started" until `InstanceStart`, when it hands the
//! configuration to a [`Starter`] (the VMM side) and, once the VM runs,
//! forwards the runtime requests (balloon) to the running VM's control.
//!
//! By concern: [`models`] (the request bodies), [`resources`] (the
//! configuration they build and its rules), [`vm`] (the pre-boot state
//! machine and its [`Starter`]).

pub mod models;
pub mod resources;
pub mod vm;

pub use models::*;
pub use resources::VmResources;
pub use vm::{PreBootVm, Starter, AFTER_START, BEFORE_START};

use crate::ApiError;

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::Invalid(msg.into())
}

#[cfg(test)]
mod tests;
