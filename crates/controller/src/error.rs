//! The controller's errors. Their messages are the ones users see (the
//! API's `fault_message`, the command line's last line), so each names what
//! failed and, where it helps, what to do.

use kiln_snapshot::SnapshotError;
use kiln_vmm::boot::BootError;
use kiln_vmm::VmmError;

/// Why a configuration ([`kiln_api::VmResources`]) cannot become a VM.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Nothing to boot.
    #[error("no boot source (kernel) configured")]
    NoBootSource,
    /// The kernel or initrd is unusable.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A drive's backing file cannot be opened.
    #[error("drive {id}: cannot open {path}: {error}")]
    Drive {
        /// The drive's id.
        id: String,
        /// Its backing file.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// A network interface's MAC address does not parse.
    #[error("interface {iface}: bad guest_mac {mac:?}")]
    Mac {
        /// The interface's id.
        iface: String,
        /// The address given.
        mac: String,
    },
    /// The balloon would hold all of the guest's memory.
    #[error("balloon amount_mib {amount} must be smaller than the guest's memory ({mem} MiB)")]
    Balloon {
        /// The balloon's size, MiB.
        amount: u64,
        /// The guest's memory, MiB.
        mem: u64,
    },
    /// The `/cpu-config` template does not parse.
    #[error("cpu-config: {0}")]
    CpuTemplate(String),
    /// The VM's limits (vCPUs, memory, command line).
    #[error(transparent)]
    Vm(#[from] VmmError),
    /// The serial console's output cannot be opened.
    #[error("serial_out_path {path}: {error}")]
    Console {
        /// The path given.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// A network override names an interface the configuration lacks.
    #[error("network override: the snapshot has no interface {0:?}")]
    NoInterface(String),
    /// A vsock override, but no vsock device.
    #[error("vsock override: the snapshot has no vsock device")]
    NoVsock,
}

/// Why a snapshot cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The memory backend of the load request is not usable.
    #[error("{0}")]
    MemBackend(String),
    /// `clock_realtime` was asked.
    #[error("clock_realtime is not supported by Kiln yet")]
    ClockRealtime,
    /// Huge pages were asked.
    #[error("huge pages are not supported by Kiln")]
    HugePages,
    /// The state file cannot be read.
    #[error(transparent)]
    State(#[from] SnapshotError),
    /// The configuration stored in the state file does not parse.
    #[error("the snapshot's configuration is unusable: {0}")]
    Unusable(String),
    /// The stored configuration (with overrides) cannot become a VM.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Building the VM failed.
    #[error(transparent)]
    Build(#[from] VmmError),
    /// The restored VM could not be held paused.
    #[error("{0}")]
    Hold(String),
}

/// Why a migration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The destination does not parse.
    #[error("migration destination {0}")]
    Destination(String),
    /// No pre-copy round allowed.
    #[error("max_rounds must be at least 1")]
    MaxRounds,
    /// A host name where the seccomp filters allow no name lookup.
    #[error(
        "migration destination {0}: the VMM's seccomp filters allow no name lookups; \
         give an IP address (`kiln migrate send` resolves names itself)"
    )]
    NeedsAddress(String),
    /// The migration thread could not start.
    #[error("starting the migration thread: {0}; the microVM keeps running here")]
    Thread(std::io::Error),
    /// The migration thread ended without a result.
    #[error("the migration thread ended without an answer")]
    NoAnswer,
    /// It failed before the destination ran the VM: it runs here again.
    #[error("migration to {to} failed: {error}; the microVM keeps running here")]
    Failed {
        /// The destination.
        to: String,
        /// What failed.
        error: String,
    },
    /// Everything was sent, then the connection failed before the Ack.
    #[error(
        "migration to {to}: everything was sent, then {error}: the destination may be \
         running the microVM, so it stays paused here (resume it with PATCH /vm only \
         if the destination does not run it)"
    )]
    InDoubt {
        /// The destination.
        to: String,
        /// What failed.
        error: String,
    },
}

/// Why a migrated VM cannot run here (`kiln migrate receive`).
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The migration thread could not start.
    #[error("starting the migration thread: {0}")]
    Thread(std::io::Error),
    /// The migration thread ended without a result.
    #[error("the migration thread ended without an answer")]
    NoAnswer,
    /// No source connected.
    #[error("{0}")]
    Accept(String),
    /// The source connected, then the transfer failed.
    #[error("{0}; nothing was started")]
    Transfer(String),
    /// The configuration received does not parse.
    #[error("the migrated configuration is unusable: {0}")]
    Unusable(String),
    /// The configuration (with overrides) cannot become a VM.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Building the VM failed.
    #[error(transparent)]
    Build(#[from] VmmError),
    /// The VM could not be held paused until the source's Ack.
    #[error("{0}")]
    Hold(String),
}

/// `e` and its sources, joined by ": " (as `anyhow` prints `{:#}`).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The API server went away before asking for a VM (`kiln vmm`).
#[derive(Debug, thiserror::Error)]
#[error("the API server stopped")]
pub struct ApiStopped;
