//! `kiln serve`: functions, each call run in a microVM of its own.
//!
//! A function is a shell command run by the in-guest agent with the call's
//! body on its stdin; its stdout is the answer. Registering a function boots
//! a template VM once and snapshots it; a call takes an idle instance of the
//! function (warm start) or restores a new one from the snapshot (cold
//! start, milliseconds on KVM). Idle instances are unloaded, and loaded
//! again ahead of the next expected call, by the learned keep-alive policy
//! in [`policy`]. The front end is HTTP/1.1 on a Unix socket (see
//! docs/serve.md).

pub mod agent;
mod http;
pub mod policy;
mod runtime;
pub mod vm;

use std::path::PathBuf;
use std::time::Duration;

pub use http::{serve, serve_tcp};
pub use runtime::{FunctionStats, Invocation, Runtime, Start};

/// Errors of the function runtime.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A bad function definition or request.
    #[error("{0}")]
    BadRequest(String),
    /// No such function.
    #[error("No function named '{0}'.")]
    NoFunction(String),
    /// The host's instance limit is reached.
    #[error("{0}")]
    Busy(String),
    /// A VM could not be started, snapshotted or reached.
    #[error("{0}")]
    Vm(String),
    /// The call did not finish in time.
    #[error("{0}")]
    Timeout(String),
    /// Files of the state directory.
    #[error("{0}")]
    Io(String),
}

impl ServeError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            ServeError::BadRequest(_) => 400,
            ServeError::NoFunction(_) => 404,
            ServeError::Busy(_) => 503,
            ServeError::Vm(_) => 502,
            ServeError::Timeout(_) => 504,
            ServeError::Io(_) => 500,
        }
    }
}

fn default_mem() -> u64 {
    128
}
fn default_vcpus() -> u8 {
    1
}
fn default_timeout_ms() -> u64 {
    60_000
}

/// A function's definition (the body of `PUT /functions/{name}`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    /// Shell command run in the guest (`sh -c`), the call's body on stdin.
    pub command: String,
    /// Guest memory, MiB.
    #[serde(default = "default_mem")]
    pub mem_size_mib: u64,
    /// vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpu_count: u8,
    /// Longest one call may run, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Shell command run once in the template VM before its snapshot (load
    /// code, warm caches): every instance starts from what it left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<String>,
    /// An ext4 image attached read-only (shared by every instance); the
    /// command and the setup run chrooted into it, with a tmpfs /tmp and
    /// /proc, /dev mounted where it has those directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<PathBuf>,
}

impl FunctionSpec {
    /// A spec with the defaults.
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            command: command.into(),
            mem_size_mib: default_mem(),
            vcpu_count: default_vcpus(),
            timeout_ms: default_timeout_ms(),
            setup: None,
            rootfs: None,
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), ServeError> {
        let bad = |m: String| Err(ServeError::BadRequest(m));
        if self.command.trim().is_empty() {
            return bad("The function's command is empty.".into());
        }
        if self.mem_size_mib < 128 {
            return bad(format!(
                "mem_size_mib {} is below the 128 MiB a guest needs.",
                self.mem_size_mib
            ));
        }
        if !(1..=32).contains(&self.vcpu_count) {
            return bad(format!("vcpu_count {} is not in 1..=32.", self.vcpu_count));
        }
        if self.timeout_ms == 0 {
            return bad("timeout_ms must be above 0.".into());
        }
        if let Some(r) = &self.rootfs {
            if !r.is_absolute() {
                return bad(format!("rootfs {}: give an absolute path.", r.display()));
            }
            match std::fs::metadata(r) {
                Ok(m) if m.is_file() => {}
                Ok(_) => return bad(format!("rootfs {}: not a file.", r.display())),
                Err(e) => return bad(format!("rootfs {}: {e}", r.display())),
            }
        }
        Ok(())
    }
}

/// Checks a function name: 1-64 of `A-Za-z0-9_-`.
pub fn validate_name(name: &str) -> Result<(), ServeError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ServeError::BadRequest(format!(
            "Invalid function name {name:?}: use 1 to 64 letters, digits, '_' or '-'."
        )))
    }
}

/// Server-wide settings.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Where the VMs come from.
    pub vm: vm::VmDefaults,
    /// State directory (a sub-directory per function).
    pub dir: PathBuf,
    /// The keep-alive policy.
    pub policy: policy::PolicyConfig,
    /// Most instances (running VMs) at once, all functions together.
    pub max_instances: usize,
    /// How often idle instances are checked for expiry and pre-warming.
    pub tick: Duration,
}
