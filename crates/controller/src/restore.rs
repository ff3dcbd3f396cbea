//! Restoring snapshots: reading and checking one ([`prepare`]), for
//! `PUT /snapshot/load` and `kiln restore`; the VM itself is built by
//! [`crate::Controller::restore`].

use kiln_api::snapshot::{MemBackendType, SnapshotLoadParams};
use kiln_api::VmResources;
use kiln_snapshot::state::MicrovmState;
use kiln_vmm::{MemBackend, VmConfig};

use crate::config::{apply_overrides, vm_config_of};
use crate::error::RestoreError;

/// A snapshot read and checked, ready to be restored on the main thread.
pub struct Restore {
    pub(crate) state: MicrovmState,
    pub(crate) config: VmConfig,
    /// The configuration (with overrides applied) the VM is rebuilt from.
    pub res: VmResources,
    /// Where its memory comes from.
    pub mem: MemBackend,
    pub(crate) resume: bool,
}

/// Reads the state file, applies the overrides and checks the devices'
/// files. (The memory file, or the page-fault handler's socket, is checked
/// by `Vmm::restore_from`, before it builds anything.)
pub fn prepare(p: &SnapshotLoadParams) -> Result<Restore, RestoreError> {
    let mem = match p.memory_backend().map_err(RestoreError::MemBackend)? {
        (MemBackendType::File, path) => MemBackend::File(path.into()),
        (MemBackendType::Uffd, sock) => MemBackend::Uffd(sock.into()),
    };
    if p.clock_realtime {
        return Err(RestoreError::ClockRealtime);
    }
    if p.huge_pages.as_deref().is_some_and(|h| h != "None") {
        return Err(RestoreError::HugePages);
    }
    let state: MicrovmState = kiln_snapshot::read_file(std::path::Path::new(&p.snapshot_path))?;
    let mut res = VmResources::from_json(&state.config).map_err(RestoreError::Unusable)?;
    apply_overrides(&mut res, &p.network_overrides, p.vsock_override.as_ref())?;
    // As in Firecracker, the load request decides whether the restored VM
    // tracks dirty pages (for its own diff snapshots), not the snapshot.
    res.machine_config.track_dirty_pages = p.track_dirty_pages || p.enable_diff_snapshots;
    let config = vm_config_of(&res, false)?;
    Ok(Restore {
        state,
        config,
        res,
        mem,
        resume: p.resume_vm,
    })
}
