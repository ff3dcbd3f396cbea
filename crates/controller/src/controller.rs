//! [`Controller`]: one microVM of this process, built from its
//! configuration (booted, restored or migrated in), with its API, run on
//! the calling (main) thread.

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use kiln_api::{ServerError, VmResources};
use kiln_vmm::migration::Received;
use kiln_vmm::{ExitReason, VmConfig, Vmm, VmmError};

use crate::api::SocketGuard;
use crate::config::{apply_overrides, to_vm_config, vm_config_of, Console};
use crate::error::{ConfigError, ReceiveError, RestoreError};
use crate::restore::Restore;
use crate::running::RunningVm;

/// A built microVM and its configuration, ready to run.
pub struct Controller {
    vmm: Vmm,
    res: VmResources,
    api: Option<SocketGuard>,
}

impl Controller {
    /// Boots the VM `res` describes (files checked), its console going to
    /// `console`.
    pub fn boot(res: VmResources, console: Console, start: Instant) -> Result<Self, ConfigError> {
        let config = to_vm_config(&res)?;
        Ok(Self::build(config, res, console, start)?)
    }

    /// Boots from a configuration already translated by
    /// [`crate::config::to_vm_config`] from `res`.
    pub fn build(
        config: VmConfig,
        res: VmResources,
        console: Console,
        start: Instant,
    ) -> Result<Self, VmmError> {
        Ok(Self::of(Vmm::new(config, console, start)?, res))
    }

    fn of(vmm: Vmm, res: VmResources) -> Self {
        Self {
            vmm,
            res,
            api: None,
        }
    }

    /// Restores the VM of `r` (see [`crate::restore::prepare`]); it runs
    /// once [`Controller::run`] starts, paused unless `resume_vm` was asked.
    pub fn restore(r: Restore, start: Instant) -> Result<Self, RestoreError> {
        let vmm = Vmm::restore_from(
            r.config,
            &r.state,
            &r.mem,
            Box::new(std::io::stdout()),
            start,
        )?;
        if !r.resume {
            vmm.handle().hold_paused().map_err(RestoreError::Hold)?;
        }
        Ok(Self::of(vmm, r.res))
    }

    /// Builds the VM a migration brought in (see [`crate::migrate::receive`]),
    /// its devices pointed at other TAPs or vsock socket if asked. It is
    /// held paused until [`Controller::run`]'s `on_started` resumes it (once
    /// the source has the Ack: the guest never runs twice).
    pub fn from_migration(
        received: Received,
        network_overrides: &[kiln_api::snapshot::NetworkOverride],
        vsock_override: Option<&kiln_api::snapshot::VsockOverride>,
        start: Instant,
    ) -> Result<Self, ReceiveError> {
        let Received { state, mem, .. } = received;
        let mut res = VmResources::from_json(&state.config).map_err(ReceiveError::Unusable)?;
        apply_overrides(&mut res, network_overrides, vsock_override)?;
        let config = vm_config_of(&res, false)?;
        let vmm =
            Vmm::restore_with_memory(config, &state, mem, Box::new(std::io::stdout()), start)?;
        vmm.handle().hold_paused().map_err(ReceiveError::Hold)?;
        Ok(Self::of(vmm, res))
    }

    /// The VM.
    pub fn vmm(&self) -> &Vmm {
        &self.vmm
    }

    /// The configuration the VM was built from.
    pub fn resources(&self) -> &VmResources {
        &self.res
    }

    /// The control the API drives the VM through.
    pub fn control(&self) -> RunningVm {
        RunningVm::new(&self.vmm, self.res.clone())
    }

    /// Serves the Firecracker API of this VM on `path` (until the
    /// controller is dropped), the same API whichever way it was made.
    pub fn serve_api(&mut self, path: &Path) -> Result<(), ServerError> {
        let guard = crate::api::serve_running(path, &self.res, Arc::new(self.control()))?;
        self.api = Some(guard);
        Ok(())
    }

    /// Runs the guest until it ends, calling `on_started` with the VM's
    /// control once every vCPU thread runs. `stdin`, if given, feeds the
    /// serial port.
    pub fn run(
        mut self,
        stdin: Option<RawFd>,
        on_started: impl FnOnce(RunningVm),
    ) -> Result<ExitReason, VmmError> {
        let control = self.control();
        let reason = self.vmm.run_notify(stdin, move || on_started(control));
        drop(self.api.take());
        reason
    }
}
