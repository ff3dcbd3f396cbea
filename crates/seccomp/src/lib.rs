//! Kiln's seccomp filters: one BPF allow-list per kind of VMM thread.
//!
//! # Design
//!
//! - [`ThreadKind`] names every kind of thread a Kiln VMM runs; the
//!   built-in allow-list of each is data in [`lists`] (syscall numbers with
//!   optional argument conditions), compiled with `seccompiler`.
//! - [`Filters`] holds the compiled programs. It is built once, at startup,
//!   before any thread is spawned: from the built-in lists, or from a
//!   custom JSON set (seccompiler's format, see docs/seccomp.md), or empty
//!   (`--no-seccomp`). [`init`] makes it the process's set.
//! - Every thread installs its own filter before it handles any guest- or
//!   API-driven input: [`apply`] for threads Kiln starts itself before the
//!   guest runs (vCPUs, the API server, the main thread once its event loop
//!   starts), and [`spawn`] for threads started later (device workers, the
//!   metrics flusher).
//! - A thread inherits its parent's filter, and filters stack. A device
//!   worker started by a vCPU (when the guest activates the device) would
//!   run under the vCPU's filter too, which would then have to allow all
//!   the device's syscalls. So threads started from a filtered thread are
//!   started by a dedicated *spawner* thread, whose filter is the union of
//!   the lists of the threads it starts; each then adds its own.
//! - When a thread breaks its filter the process is killed (`SIGSYS`).
//!   `KILN_SECCOMP=trap` instead traps: a `SIGSYS` handler writes the
//!   syscall number and thread kind to stderr and the syscall fails with
//!   `ENOSYS`; `KILN_SECCOMP=log` lets the syscall run and has the kernel
//!   log it (audit). Both are for finding missing syscalls, not production.

mod lists;
mod spawn;
mod trap;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use lists::{spawner_for, Allow, SPAWNED};
pub use spawn::spawn;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The custom filter file could not be read.
    #[error("seccomp filter file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The custom filter set is not valid (JSON or BPF).
    #[error("seccomp filter file {path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A built-in list does not compile (a bug).
    #[error("seccomp: built-in filter {kind}: {message}")]
    Builtin {
        /// The thread kind.
        kind: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Installing a filter failed.
    #[error("seccomp: installing the {kind} filter: {message}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// Why.
        message: String,
    },
    /// `KILN_SECCOMP` has a value this crate does not know.
    #[error("KILN_SECCOMP={0:?}: expected kill, trap or log")]
    Mode(String),
}

/// The kinds of threads a Kiln VMM runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The main thread once the guest runs: its event loop (reset, power
    /// off, panic, serial input), then tear-down.
    Vmm,
    /// The API server.
    Api,
    /// A vCPU: `KVM_RUN` and the port and MMIO exits (legacy devices and
    /// virtio transports) it handles.
    Vcpu,
    /// A virtio-blk worker with the synchronous engine.
    Block,
    /// A virtio-blk worker with the io_uring engine.
    BlockIoUring,
    /// A virtio-net worker (TAP).
    Net,
    /// A virtio-vsock worker (Unix sockets on the host side).
    Vsock,
    /// A virtio-rng worker.
    Rng,
    /// A virtio-balloon worker.
    Balloon,
    /// The periodic metrics flusher.
    Metrics,
    /// The thread that starts threads for filtered threads (see the crate
    /// documentation).
    Spawner,
    /// A restored VM's userfaultfd threads: the in-process page-fault
    /// handler (`kiln restore --uffd`) and the watch on an external
    /// handler.
    Uffd,
    /// Live migration: the sender (`PUT /migrate`) and the receiver
    /// (`kiln migrate receive`). The only kind that may use TCP.
    Migration,
    /// The spawner of migration threads (kept apart from [`Spawner`], so
    /// that the device workers' spawner has no TCP).
    ///
    /// [`Spawner`]: ThreadKind::Spawner
    MigrationSpawner,
}

impl ThreadKind {
    /// Every kind.
    pub const ALL: [ThreadKind; 14] = [
        ThreadKind::Vmm,
        ThreadKind::Api,
        ThreadKind::Vcpu,
        ThreadKind::Block,
        ThreadKind::BlockIoUring,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Rng,
        ThreadKind::Balloon,
        ThreadKind::Metrics,
        ThreadKind::Spawner,
        ThreadKind::Uffd,
        ThreadKind::Migration,
        ThreadKind::MigrationSpawner,
    ];

    /// The kind's name in custom filter files and messages.
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "block",
            ThreadKind::BlockIoUring => "block_io_uring",
            ThreadKind::Net => "net",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Rng => "rng",
            ThreadKind::Balloon => "balloon",
            ThreadKind::Metrics => "metrics",
            ThreadKind::Spawner => "spawner",
            ThreadKind::Uffd => "uffd",
            ThreadKind::Migration => "migration",
            ThreadKind::MigrationSpawner => "migration_spawner",
        }
    }

    /// The kind called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|k| *k == self)
            .expect("every kind is in ALL")
    }
}

/// What happens when a thread makes a syscall its filter does not allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// The process is killed by `SIGSYS` (the default).
    #[default]
    Kill,
    /// `SIGSYS` is caught: its handler writes the syscall number to stderr
    /// and the syscall fails with `ENOSYS`.
    Trap,
    /// The kernel logs the syscall and lets it run.
    Log,
}

impl Mode {
    /// The mode `KILN_SECCOMP` asks for (kill when unset).
    pub fn from_env() -> Result<Self, Error> {
        match std::env::var("KILN_SECCOMP") {
            Err(_) => Ok(Mode::Kill),
            Ok(v) => match v.as_str() {
                "" | "kill" => Ok(Mode::Kill),
                "trap" => Ok(Mode::Trap),
                "log" => Ok(Mode::Log),
                _ => Err(Error::Mode(v)),
            },
        }
    }

    fn action(self) -> SeccompAction {
        match self {
            Mode::Kill => SeccompAction::KillProcess,
            Mode::Trap => SeccompAction::Trap,
            Mode::Log => SeccompAction::Log,
        }
    }
}

fn arch() -> TargetArch {
    TargetArch::x86_64
}

/// The compiled filter of every thread kind.
#[derive(Clone, Debug)]
pub struct Filters {
    /// Indexed by [`ThreadKind::index`]; `None`: no filter for that kind.
    programs: Vec<Option<BpfProgram>>,
    mode: Mode,
}

impl Filters {
    /// No filters at all (`--no-seccomp`).
    pub fn none() -> Self {
        Self {
            programs: vec![None; ThreadKind::ALL.len()],
            mode: Mode::Kill,
        }
    }

    /// Kiln's built-in allow-lists, breaking one doing what `mode` says.
    pub fn builtin(mode: Mode) -> Result<Self, Error> {
        let mut programs = Vec::new();
        for kind in ThreadKind::ALL {
            let program = compile(&lists::allowed(kind), mode).map_err(|e| Error::Builtin {
                kind: kind.name(),
                message: e,
            })?;
            programs.push(Some(program));
        }
        Ok(Self { programs, mode })
    }

    /// A custom set from JSON (seccompiler's format: thread kind ->
    /// `{default_action, filter_action, filter: [...]}`). Kinds the file
    /// does not name keep their built-in filter (breaking it does what
    /// `mode` says); a name that is not a [`ThreadKind`] is an error.
    pub fn from_json(json: &[u8], path: &str, mode: Mode) -> Result<Self, Error> {
        let invalid = |message: String| Error::Invalid {
            path: path.to_string(),
            message,
        };
        // seccompiler's own errors; the kinds are checked first so that a
        // typo in a name is reported as such.
        let names: BTreeMap<String, serde_json_value::Ignored> =
            serde_json_value::parse_keys(json).map_err(&invalid)?;
        if let Some(bad) = names.keys().find(|n| ThreadKind::from_name(n).is_none()) {
            let known: Vec<&str> = ThreadKind::ALL.iter().map(|k| k.name()).collect();
            return Err(invalid(format!(
                "unknown thread kind {bad:?} (known: {})",
                known.join(", ")
            )));
        }
        let map =
            seccompiler::compile_from_json(json, arch()).map_err(|e| invalid(e.to_string()))?;
        let mut filters = Self::builtin(mode)?;
        for (name, program) in map {
            let kind = ThreadKind::from_name(&name).expect("checked above");
            filters.programs[kind.index()] = Some(program);
        }
        Ok(filters)
    }

    /// [`Filters::from_json`] on the file at `path`.
    pub fn from_file(path: &std::path::Path, mode: Mode) -> Result<Self, Error> {
        let shown = path.display().to_string();
        let json = std::fs::read(path).map_err(|source| Error::Read {
            path: shown.clone(),
            source,
        })?;
        Self::from_json(&json, &shown, mode)
    }

    /// The program of `kind`, if it has one.
    pub fn program(&self, kind: ThreadKind) -> Option<&BpfProgram> {
        self.programs[kind.index()].as_ref()
    }

    /// Whether any kind has a filter.
    pub fn any(&self) -> bool {
        self.programs.iter().any(Option::is_some)
    }
}

/// Compiles an allow-list: syscalls in `allow` are allowed (with their
/// argument conditions), everything else does what `mode` says.
pub fn compile(allow: &[Allow], mode: Mode) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // A syscall allowed without conditions anywhere is allowed outright.
    let mut outright = std::collections::BTreeSet::new();
    for a in allow {
        let (nr, alternatives) = a.rules();
        if alternatives.is_empty() {
            outright.insert(nr);
            rules.insert(nr, Vec::new());
        } else if !outright.contains(&nr) {
            for conds in alternatives {
                let rule = SeccompRule::new(conds).map_err(|e| e.to_string())?;
                rules.entry(nr).or_default().push(rule);
            }
        }
    }
    let filter = SeccompFilter::new(rules, mode.action(), SeccompAction::Allow, arch())
        .map_err(|e| e.to_string())?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

pub(crate) fn condition(index: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .expect("argument index below 6")
}

/// The process's filters ([`init`]); none until then.
static FILTERS: OnceLock<Filters> = OnceLock::new();

thread_local! {
    /// The kind whose filter this thread runs under, if any.
    static INSTALLED: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Makes `filters` the process's set. Call it once, early in `main`,
/// before any thread is spawned: it installs the `SIGSYS` handler (trap
/// mode) and starts the spawner thread. A second call is an error-free
/// no-op that keeps the first set.
pub fn init(filters: Filters) -> Result<(), Error> {
    let any = filters.any();
    let mode = filters.mode;
    if FILTERS.set(filters).is_err() {
        return Ok(());
    }
    if !any {
        return Ok(());
    }
    fix_malloc_arena_limit();
    if mode == Mode::Trap {
        trap::install_handler().map_err(|e| Error::Install {
            kind: "SIGSYS handler",
            message: e.to_string(),
        })?;
    }
    for kind in [ThreadKind::Spawner, ThreadKind::MigrationSpawner] {
        spawn::start_spawner(kind).map_err(|e| Error::Install {
            kind: kind.name(),
            message: e.to_string(),
        })?;
    }
    Ok(())
}

/// glibc's malloc computes its arena limit the first time a thread needs
/// a new arena, from the number of CPUs, which it reads from
/// `/sys/devices/system/cpu/online` (then `/proc/stat`): `openat` on
/// whatever (filtered) thread that is, typically a device worker starting
/// when the guest probes its devices. Fixing the limit here, to the value
/// glibc would compute (8 arenas per CPU on 64-bit), before any thread is
/// filtered, keeps glibc from ever reading those files.
fn fix_malloc_arena_limit() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: sysconf (glibc's get_nprocs) only reads sysfs/procfs;
        // mallopt sets a malloc parameter (before filtered threads exist).
        unsafe {
            let cpus = libc::sysconf(libc::_SC_NPROCESSORS_ONLN).clamp(1, 1 << 16) as libc::c_int;
            libc::mallopt(libc::M_ARENA_MAX, cpus * 8);
        }
    }
}

/// Whether [`init`] was given filters.
pub fn enabled() -> bool {
    FILTERS.get().is_some_and(Filters::any)
}

/// Installs `kind`'s filter on the calling thread (nothing if [`init`] was
/// not called or `kind` has no filter). From then on the thread and any
/// thread it starts directly run under it.
pub fn apply(kind: ThreadKind) -> Result<(), Error> {
    let Some(program) = FILTERS.get().and_then(|f| f.program(kind)) else {
        return Ok(());
    };
    if program.is_empty() {
        return Ok(());
    }
    seccompiler::apply_filter(program).map_err(|e| Error::Install {
        kind: kind.name(),
        message: e.to_string(),
    })?;
    INSTALLED.with(|c| c.set(Some(kind)));
    trap::set_thread_kind(kind);
    Ok(())
}

/// How many refused syscalls were trapped (trap mode; in kill mode the
/// first one ends the process).
pub fn faults() -> u64 {
    trap::FAULTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The kind whose filter the calling thread runs under.
pub fn current() -> Option<ThreadKind> {
    INSTALLED.with(Cell::get)
}

/// Minimal JSON key reading for [`Filters::from_json`]: the top-level
/// object's keys, so that unknown thread kinds get their own message.
mod serde_json_value {
    use std::collections::BTreeMap;

    /// A value that is parsed and dropped.
    pub struct Ignored;

    impl<'de> serde::Deserialize<'de> for Ignored {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            serde::de::IgnoredAny::deserialize(d).map(|_| Ignored)
        }
    }

    pub fn parse_keys(json: &[u8]) -> Result<BTreeMap<String, Ignored>, String> {
        serde_json::from_slice(json).map_err(|e| format!("not a JSON object of filters: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_list_compiles_in_every_mode() {
        for mode in [Mode::Kill, Mode::Trap, Mode::Log] {
            let f = Filters::builtin(mode).unwrap();
            for kind in ThreadKind::ALL {
                assert!(!f.program(kind).unwrap().is_empty(), "{kind:?}");
            }
        }
        assert!(!Filters::none().any());
    }

    #[test]
    fn the_spawners_allow_what_the_threads_they_start_need() {
        for kind in ThreadKind::ALL {
            let Some(spawner) = spawner_for(kind) else {
                continue;
            };
            let allowed: Vec<i64> = lists::allowed(spawner).iter().map(Allow::syscall).collect();
            for a in lists::allowed(kind) {
                assert!(allowed.contains(&a.syscall()), "{kind:?}: {a:?}");
            }
        }
        assert_eq!(spawner_for(ThreadKind::Rng), Some(ThreadKind::Spawner));
        assert_eq!(
            spawner_for(ThreadKind::Migration),
            Some(ThreadKind::MigrationSpawner)
        );
        assert_eq!(spawner_for(ThreadKind::Uffd), None);
        // Only migration threads (and their spawner) may open TCP sockets.
        for kind in ThreadKind::ALL {
            let inet = lists::allowed(kind).iter().any(|a| {
                matches!(a, Allow::ArgIn(nr, 0, v) if *nr == libc::SYS_socket
                    && v.contains(&(libc::AF_INET as u64)))
            });
            let may = matches!(kind, ThreadKind::Migration | ThreadKind::MigrationSpawner);
            assert_eq!(inet, may, "{kind:?}");
        }
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in ThreadKind::ALL {
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(ThreadKind::from_name("vcpus"), None);
    }

    #[test]
    fn custom_sets_replace_named_kinds_and_refuse_unknown_ones() {
        let json = br#"{"rng": {"default_action": "trap", "filter_action": "allow",
            "filter": [{"syscall": "read"}, {"syscall": "ioctl", "args": [
              {"index": 1, "type": "dword", "op": "eq", "val": 44672, "comment": "KVM_RUN"}]}]}}"#;
        let custom = Filters::from_json(json, "f.json", Mode::Kill).unwrap();
        let builtin = Filters::builtin(Mode::Kill).unwrap();
        assert_ne!(
            custom.program(ThreadKind::Rng),
            builtin.program(ThreadKind::Rng)
        );
        assert_eq!(
            custom.program(ThreadKind::Vcpu),
            builtin.program(ThreadKind::Vcpu)
        );
        let e = Filters::from_json(br#"{"vcpus": {}}"#, "f.json", Mode::Kill)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "seccomp filter file f.json: unknown thread kind \"vcpus\" (known: vmm, api,"
            ),
            "{e}"
        );
        let e = Filters::from_json(b"[1, 2]", "f.json", Mode::Kill)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a JSON object of filters"), "{e}");
        let e = Filters::from_json(
            br#"{"api": {"default_action": "allow", "filter_action": "allow", "filter": []}}"#,
            "f.json",
            Mode::Kill,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("seccomp filter file f.json: "), "{e}");
        let e = Filters::from_json(
            br#"{"api": {"default_action": "kill_process", "filter_action": "allow", "filter": [{"syscall": "nope"}]}}"#,
            "f.json",
            Mode::Kill,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nope"), "{e}");
    }
}
