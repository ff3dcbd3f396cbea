//! `kiln jailer`: starts the Kiln VMM in an isolated, unprivileged
//! environment, with Firecracker's jailer flags as the interface.
//!
//! The steps (see [`run`]), in order: validate the flags; close inherited
//! file descriptors; create `<base>/<exec name>/<id>/root`; copy the VMM
//! binary (and, for a dynamically linked one, its shared libraries) into it;
//! set resource limits; create and join a cgroup v2 leaf; join a network
//! namespace; enter a new mount namespace and `pivot_root` into the chroot;
//! create the device nodes; optionally daemonize and enter a new PID
//! namespace; drop to the given uid/gid (no capabilities left); exec the VMM.
//!
//! Everything the jailer creates is journaled to a small privileged cleaner
//! process (forked before anything is created, see [`journal`]). If a step
//! fails, even after the pivot or after dropping privileges, the cleaner
//! removes what was created (chroot tree, cgroup leaf) before the jailer
//! exits with the error. A finished jail is removed with [`cleanup`].

pub mod args;
pub mod cgroup;
pub mod chroot;
pub mod journal;
pub mod process;

use std::io;
use std::path::PathBuf;

pub use args::{JailConfig, JailerArgs};

/// A jailer failure: one line naming the step and the path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad flags or values.
    #[error("jailer: {0}")]
    Invalid(String),
    /// A step failed on a path.
    #[error("jailer: {step} {}: {err}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    /// A step failed (no path involved).
    #[error("jailer: {step}: {err}")]
    Step { step: &'static str, err: io::Error },
}

/// Result of the jailer's steps.
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(
    step: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |err| Error::Io { step, path, err }
}

pub(crate) fn last_err(step: &'static str, path: impl Into<PathBuf>) -> Error {
    Error::Io {
        step,
        path: path.into(),
        err: io::Error::last_os_error(),
    }
}

pub(crate) fn step_err(step: &'static str) -> Error {
    Error::Step {
        step,
        err: io::Error::last_os_error(),
    }
}

/// Runs the jailer (or, with `--cleanup`, removes a finished jail). On
/// success in jail mode this does not return: the process has become the VMM.
/// Returns the exit code to use otherwise.
pub fn main(args: JailerArgs) -> Result<i32> {
    let cfg = args.validate()?;
    if cfg.cleanup {
        cleanup(&cfg)?;
        return Ok(0);
    }
    process::run(cfg)
}

/// Removes a finished jail: `<base>/<exec name>/<id>` (the chroot tree) and
/// its cgroup leaf. Refuses while processes are still in the leaf.
pub fn cleanup(cfg: &JailConfig) -> Result<()> {
    let id_dir = cfg.id_dir();
    let leaf = cgroup::find_leaf(cfg)?.filter(|l| l.is_dir());
    if leaf.is_none() && !id_dir.exists() {
        return Err(Error::Invalid(format!(
            "cleanup: no jail {:?} found (neither {} nor its cgroup exists)",
            cfg.id,
            id_dir.display()
        )));
    }
    if let Some(leaf) = leaf {
        let procs_path = leaf.join("cgroup.procs");
        let procs =
            std::fs::read_to_string(&procs_path).map_err(io_err("cleanup: read", &procs_path))?;
        if !procs.trim().is_empty() {
            return Err(Error::Invalid(format!(
                "cleanup: cgroup {} still has processes ({}): stop the VMM first",
                leaf.display(),
                procs.split_whitespace().collect::<Vec<_>>().join(" ")
            )));
        }
        std::fs::remove_dir(&leaf).map_err(io_err("cleanup: remove cgroup", &leaf))?;
        if let Some(parent) = leaf.parent() {
            // The shared parent goes only once it is empty.
            let _ = std::fs::remove_dir(parent);
        }
    }
    if id_dir.exists() {
        std::fs::remove_dir_all(&id_dir).map_err(io_err("cleanup: remove chroot", &id_dir))?;
    }
    if let Some(parent) = id_dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}
