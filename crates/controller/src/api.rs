//! Serving the Firecracker API of a VM that already runs (`kiln run`,
//! `kiln restore`, `kiln migrate receive`): the same [`PreBootVm`] as
//! `kiln vmm`'s, in its running state, so every runtime request works the
//! same whichever command started the VM.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_api::{ApiServer, PreBootVm, ServerError, Starter, VmControl, VmResources};

/// Removes the API socket when the VMM ends.
pub struct SocketGuard(pub PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Fails early (one line) if `path` is taken by something other than a socket.
pub fn check_sock(path: &Path) -> Result<(), ServerError> {
    ApiServer::check_path(path)?;
    Ok(())
}

/// The API of a VM that runs already never boots or restores anything.
pub struct NoStarter;

impl Starter for NoStarter {
    fn start(&self, _: &VmResources) -> Result<Arc<dyn VmControl>, String> {
        Err("the microVM already runs".into())
    }
}

/// Serves the API of the running VM `vm` (built from `res`) on `path`; the
/// guard removes the socket when dropped.
pub fn serve_running(
    path: &Path,
    res: &VmResources,
    vm: Arc<dyn VmControl>,
) -> Result<SocketGuard, ServerError> {
    let api = PreBootVm::new(
        "anonymous-instance",
        env!("CARGO_PKG_VERSION"),
        Box::new(NoStarter),
    )
    .with_mmds(crate::config::mmds().clone());
    api.set_running(res.clone(), vm);
    ApiServer::bind(path)?.spawn(Arc::new(api))?;
    log::info!("API listening on {}", path.display());
    Ok(SocketGuard(path.to_path_buf()))
}
