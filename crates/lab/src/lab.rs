//! The lab harness: boots the lab host in QEMU/TCG (emulated AMD-V, nested
//! paging) and runs shell commands inside it, where `/dev/kvm` works.
//!
//! A run boots the kernel with the cached lab initramfs plus a per-run cpio
//! archive appended to it (Linux unpacks concatenated archives as one). The
//! per-run archive carries `/lab/run.sh`, the requested binaries under
//! `/usr/local/bin` with their shared libraries (at the paths `ldd` reports),
//! and extra files. Results come back over a dedicated serial port (the lab's
//! `/dev/ttyS1`, a file on the host) framed as described in [`crate::framing`];
//! the kernel console (`ttyS0`) is QEMU's stdout and only used for progress
//! and diagnostics.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cpio::CpioWriter;
use crate::framing::{self, Parsed};
use crate::images::Images;
use crate::scripts;

/// Name of the QEMU binary (overridable with `KILN_QEMU`).
const QEMU: &str = "qemu-system-x86_64";
/// Kernel command line of the lab host.
/// The kernel log goes to its own serial port (`ttyS2`, a file on the host:
/// see [`LabError`]), so the lab's console (`ttyS0`, where commands print)
/// carries only what the commands print. A stall leaves evidence there:
/// the soft-lockup, hung-task and RCU-stall detectors print to it, and an
/// NMI from the host ([`crate::monitor::diagnose`]) makes the kernel panic
/// with every CPU's stack (`unknown_nmi_panic`, `panic_print=0x40`).
/// (`lapic=notscdeadline`: the lab kernel programs its LAPIC timer in
/// one-shot mode; TCG's emulated TSC-deadline timer is the suspect in rare
/// lab stalls where the whole emulated machine sat idle.)
const LAB_CMDLINE: &str = "console=ttyS2 reboot=k panic=-1 quiet lapic=notscdeadline \
                           unknown_nmi_panic panic_print=0x40 softlockup_all_cpu_backtrace=1";
/// After an NMI, how long the lab kernel gets to print its stacks.
const NMI_GRACE: Duration = Duration::from_secs(8);
/// A run whose results channel shows no progress for this long is stalled
/// (the lab froze: a running command sends a heartbeat every minute, so a
/// slow command is not a stall; only the run's timeout ends it).
const DEFAULT_STALL: Duration = Duration::from_secs(200);
/// How much console output to include in errors.
const TAIL_BYTES: usize = 6000;

/// Where tests and the CLI should run things that need a working `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabMode {
    /// Use the host's `/dev/kvm` directly.
    Native,
    /// Run inside the QEMU lab.
    Lab,
}

/// Reads `KILN_LAB`: `1`/`lab` → [`LabMode::Lab`], `0`/`native` →
/// [`LabMode::Native`], unset/empty/other → `None` (caller probes KVM itself).
pub fn mode_from_env() -> Option<LabMode> {
    let v = std::env::var("KILN_LAB").ok()?;
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "lab" => Some(LabMode::Lab),
        "0" | "native" => Some(LabMode::Native),
        _ => None,
    }
}

/// Whether commands that boot guests should go to the lab: as `KILN_LAB`
/// says, else when this host's KVM does not run guests natively
/// (`native_kvm`, asked only then).
pub fn wanted(native_kvm: impl FnOnce() -> bool) -> bool {
    match mode_from_env() {
        Some(LabMode::Lab) => true,
        Some(LabMode::Native) => false,
        None => !native_kvm(),
    }
}

/// Where the lab puts the guest kernel.
pub const LAB_KERNEL: &str = "/images/vmlinuz";
/// Where the lab puts the guest initramfs.
pub const LAB_INITRD: &str = "/images/initramfs.img";

/// Environment every `kiln` command in the lab starts with: it knows it
/// is in the lab and finds its images.
pub fn kiln_env_prefix() -> String {
    format!("export KILN_IN_LAB=1 KILN_KERNEL={LAB_KERNEL} KILN_INITRD={LAB_INITRD}; ")
}

/// The QEMU binary to use: `$KILN_QEMU` or `qemu-system-x86_64` from `PATH`.
fn qemu_path() -> Option<PathBuf> {
    let executable = |p: &Path| {
        fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if let Some(q) = std::env::var_os("KILN_QEMU").filter(|q| !q.is_empty()) {
        let q = PathBuf::from(q);
        return executable(&q).then_some(q);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(QEMU))
        .find(|p| executable(p))
}

/// Whether `qemu-system-x86_64` (or `$KILN_QEMU`) is available.
pub fn qemu_available() -> bool {
    qemu_path().is_some()
}

/// Result of one command run in the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// The command as given.
    pub command: String,
    /// Combined stdout and stderr.
    pub output: String,
    /// Exit status (`sh -c` semantics: 128+N for signal N).
    pub status: i32,
}

/// Outputs of a run plus timings.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// One entry per command, in order.
    pub outputs: Vec<CommandOutput>,
    /// QEMU start until the lab was ready to run `/lab/run.sh`.
    pub boot_time: Option<Duration>,
    /// QEMU start until QEMU exited.
    pub total_time: Duration,
}

/// Errors from running the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// QEMU is not installed.
    #[error("qemu-system-x86_64 not found in PATH or at $KILN_QEMU: install qemu-system-x86")]
    QemuMissing,
    /// An I/O failure on the host.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Shared libraries of a binary could not be determined.
    #[error("cannot collect libraries of {binary}: {message}")]
    Libraries {
        /// The binary.
        binary: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The lab did not finish in time, or froze; QEMU was killed.
    #[error(
        "lab timed out after {timeout:?} ({progress})\n--- lab CPUs when it was stopped ---\n{diagnosis}\n--- lab console tail ---\n{console_tail}\n--- lab kernel log tail ---\n{kernel_log}"
    )]
    Timeout {
        /// The configured timeout.
        timeout: Duration,
        /// How far the run got.
        progress: String,
        /// Where the lab's CPUs were (see [`crate::monitor::diagnose`]).
        diagnosis: String,
        /// Last part of the lab console.
        console_tail: String,
        /// Last part of the lab kernel's log.
        kernel_log: String,
    },
    /// QEMU exited before all commands finished.
    #[error("lab exited early, QEMU {qemu_status} ({progress})\n--- lab console tail ---\n{console_tail}\n--- lab kernel log tail ---\n{kernel_log}\n--- qemu stderr ---\n{qemu_stderr}")]
    Incomplete {
        /// QEMU's exit status.
        qemu_status: String,
        /// How far the run got.
        progress: String,
        /// Last part of the lab console.
        console_tail: String,
        /// Last part of the lab kernel's log.
        kernel_log: String,
        /// QEMU's standard error (warnings included).
        qemu_stderr: String,
    },
    /// The results channel was garbled.
    #[error("lab results channel protocol error: {0}")]
    Protocol(String),
}

fn io_ctx<T>(r: io::Result<T>, context: impl FnOnce() -> String) -> Result<T, LabError> {
    r.map_err(|source| LabError::Io {
        context: context(),
        source,
    })
}

/// A configured lab; see the crate docs for an example.
#[derive(Debug, Clone)]
pub struct Lab {
    images: Images,
    binaries: Vec<PathBuf>,
    files: Vec<(PathBuf, String)>,
    timeout: Duration,
    mem_mib: u32,
    cpus: u32,
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, LabError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("kiln-lab-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        io_ctx(fs::create_dir_all(&p), || {
            format!("creating {}", p.display())
        })?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `ldd` on `binary` and returns the absolute library paths it lists
/// (including the ELF interpreter). Static binaries yield an empty list.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, LabError> {
    let err = |message: String| LabError::Libraries {
        binary: binary.to_path_buf(),
        message,
    };
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| err(format!("running ldd: {e}")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stdout.contains("not a dynamic executable")
        || stderr.contains("not a dynamic executable")
        || stdout.contains("statically linked")
    {
        return Ok(Vec::new());
    }
    if !out.status.success() {
        return Err(err(format!("ldd failed: {}", stderr.trim())));
    }
    let mut libs = Vec::new();
    for l in stdout.lines() {
        let l = l.trim();
        let target = match l.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(err(format!("library {} not found", name.trim())));
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => l.split_whitespace().next().unwrap_or(""),
        };
        if target.starts_with('/') {
            libs.push(PathBuf::from(target));
        }
    }
    Ok(libs)
}

/// Shared console capture: all bytes, plus when the ready marker appeared.
#[derive(Default)]
struct Console {
    bytes: Vec<u8>,
    ready_at: Option<Instant>,
}

impl Console {
    fn tail(&self) -> String {
        tail_text(&self.bytes)
    }
}

/// Reads QEMU's stdout (the lab console) into `console`; once the ready
/// marker has been seen, optionally echoes everything after it to stdout.
fn spawn_console_reader(
    mut src: impl Read + Send + 'static,
    console: Arc<Mutex<Console>>,
    echo: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let marker = scripts::LAB_READY_MARKER.as_bytes();
        let mut buf = [0u8; 4096];
        // While true, echo output is dropped up to the end of the marker line.
        let mut skip_line = false;
        loop {
            let n = match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut c = console.lock().unwrap_or_else(|e| e.into_inner());
            let old_len = c.bytes.len();
            c.bytes.extend_from_slice(&buf[..n]);
            let mut echo_from = None;
            if c.ready_at.is_none() {
                let from = old_len.saturating_sub(marker.len());
                if let Some(i) = c.bytes[from..]
                    .windows(marker.len())
                    .position(|w| w == marker)
                {
                    c.ready_at = Some(Instant::now());
                    echo_from = Some(from + i + marker.len());
                    skip_line = true;
                }
            } else {
                echo_from = Some(old_len);
            }
            let Some(mut from) = echo_from.filter(|_| echo) else {
                continue;
            };
            if skip_line {
                match c.bytes[from..].iter().position(|&b| b == b'\n') {
                    Some(p) => {
                        from += p + 1;
                        skip_line = false;
                    }
                    None => continue,
                }
            }
            let mut out = io::stdout().lock();
            let _ = out.write_all(&c.bytes[from..]);
            let _ = out.flush();
        }
    })
}

impl Lab {
    /// A lab using `images`, with a 300 s timeout, 4096 MiB and 2 vCPUs.
    pub fn new(images: Images) -> Self {
        Self {
            images,
            binaries: Vec::new(),
            files: Vec::new(),
            timeout: Duration::from_secs(300),
            mem_mib: 4096,
            cpus: 2,
        }
    }

    /// Copies a host binary to `/usr/local/bin/<file name>` in the lab, with
    /// the shared libraries `ldd` lists (at the same paths).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binaries.push(path.into());
        self
    }

    /// Copies a host file to `guest_path` in the lab (mode preserved).
    pub fn file(mut self, host: impl Into<PathBuf>, guest_path: impl Into<String>) -> Self {
        self.files.push((host.into(), guest_path.into()));
        self
    }

    /// Sets the timeout for a whole run (boot plus all commands).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the lab's memory size in MiB.
    pub fn mem_mib(mut self, mem_mib: u32) -> Self {
        self.mem_mib = mem_mib;
        self
    }

    /// Sets the lab's vCPU count.
    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus;
        self
    }

    /// The images this lab boots.
    pub fn images(&self) -> &Images {
        &self.images
    }

    /// Runs all commands in one lab boot, each as `sh -c` with stdout and
    /// stderr captured. Fails if any command did not run to completion.
    pub fn run(&self, commands: &[String]) -> Result<Vec<CommandOutput>, LabError> {
        Ok(self.run_report(commands)?.outputs)
    }

    /// Like [`Lab::run`], but when the lab itself fails (stalls, times out or
    /// dies), the commands that did not finish run once more in a fresh lab;
    /// results of commands that finished are kept. A command's own failure is
    /// a result, not a lab failure, and is never retried.
    pub fn run_resilient(&self, commands: &[String]) -> Result<Vec<CommandOutput>, LabError> {
        let (parsed, err) = match self.boot(&scripts::run_script(commands), commands, false) {
            Ok((parsed, _, _)) => (parsed, None),
            Err(b) => {
                let (e, parsed) = *b;
                (parsed, Some(e))
            }
        };
        let done: Vec<CommandOutput> = parsed
            .frames
            .into_iter()
            .enumerate()
            .take_while(|(i, f)| f.index == *i)
            .map(|(i, f)| CommandOutput {
                command: commands[i].clone(),
                output: f.output,
                status: f.status,
            })
            .collect();
        let Some(first) = err else { return Ok(done) };
        let rest = &commands[done.len()..];
        eprintln!(
            "kiln-lab: warning: the lab failed after {}/{} commands; running the other {} in a fresh lab. First failure: {first}",
            done.len(),
            commands.len(),
            rest.len()
        );
        let mut out = done;
        out.extend(self.run(rest)?);
        Ok(out)
    }

    /// Runs one command; see [`Lab::run`].
    pub fn run_one(&self, cmd: &str) -> Result<CommandOutput, LabError> {
        let mut v = self.run(&[cmd.to_string()])?;
        v.pop()
            .ok_or_else(|| LabError::Protocol("no result for the command".into()))
    }

    /// Like [`Lab::run`], also returning boot and total timings.
    pub fn run_report(&self, commands: &[String]) -> Result<RunReport, LabError> {
        let (parsed, boot_time, total_time) = self
            .boot(&scripts::run_script(commands), commands, false)
            .map_err(|b| b.0)?;
        let outputs = parsed
            .frames
            .into_iter()
            .zip(commands)
            .map(|(f, c)| CommandOutput {
                command: c.clone(),
                output: f.output,
                status: f.status,
            })
            .collect();
        Ok(RunReport {
            outputs,
            boot_time,
            total_time,
        })
    }

    /// Runs one command with the lab console streamed live to stdout (from
    /// the moment the lab is ready) and returns the command's exit status.
    pub fn run_interactive(&self, command: &str) -> Result<i32, LabError> {
        let cmds = [command.to_string()];
        let (parsed, _, _) = self
            .boot(&scripts::interactive_script(command), &cmds, true)
            .map_err(|b| b.0)?;
        Ok(parsed.frames[0].status)
    }

    /// Builds the per-run initramfs: lab initramfs + per-run archive.
    fn build_initrd(&self, dest: &Path, run_sh: &str) -> Result<(), LabError> {
        let lab = &self.images.lab_initramfs;
        io_ctx(fs::copy(lab, dest), || {
            format!("copying {} (run images::ensure first)", lab.display())
        })?;
        let f = io_ctx(fs::OpenOptions::new().append(true).open(dest), || {
            format!("opening {}", dest.display())
        })?;
        let mut w = CpioWriter::new(BufWriter::new(f));
        let wctx = |what: &Path| format!("adding {} to the run archive", what.display());
        let mut libs = BTreeSet::new();
        for b in &self.binaries {
            let name = b.file_name().ok_or_else(|| LabError::Libraries {
                binary: b.clone(),
                message: "not a file path".into(),
            })?;
            let guest = format!("usr/local/bin/{}", name.to_string_lossy());
            io_ctx(w.file_from_host(&guest, 0o755, b), || wctx(b))?;
            libs.extend(shared_libraries(b)?);
        }
        for l in &libs {
            io_ctx(w.file_from_host(&l.to_string_lossy(), 0o755, l), || wctx(l))?;
        }
        for (host, guest) in &self.files {
            let mode = io_ctx(fs::metadata(host), || wctx(host))?
                .permissions()
                .mode();
            io_ctx(w.file_from_host(guest, mode & 0o7777, host), || wctx(host))?;
        }
        io_ctx(w.file("lab/run.sh", 0o755, run_sh.as_bytes()), || {
            "writing /lab/run.sh".into()
        })?;
        io_ctx(w.finish().and_then(|mut b| b.flush()), || {
            format!("writing {}", dest.display())
        })?;
        Ok(())
    }

    /// Boots the lab with `run_sh`, waits for it, and parses the results.
    fn boot(&self, run_sh: &str, commands: &[String], echo: bool) -> BootResult {
        let none = || framing::parse(b"");
        let qemu = qemu_path().ok_or_else(|| Box::new((LabError::QemuMissing, none())))?;
        let tmp = TempDir::new().map_err(|e| Box::new((e, none())))?;
        let initrd = tmp.0.join("initrd.img");
        let results = tmp.0.join("results.log");
        let kernel_log = tmp.0.join("kernel.log");
        let qmp = tmp.0.join("qmp.sock");
        self.build_initrd(&initrd, run_sh)
            .map_err(|e| Box::new((e, none())))?;

        let mut cmd = Command::new(&qemu);
        cmd.args(["-M", "q35", "-accel", "tcg,thread=multi"])
            .args(["-cpu", "EPYC,+svm,+npt"])
            .args(["-m", &self.mem_mib.to_string()])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-serial", "stdio"])
            .arg("-serial")
            .arg(format!("file:{}", results.display()))
            .arg("-serial")
            .arg(format!("file:{}", kernel_log.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-kernel")
            .arg(&self.images.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", LAB_CMDLINE, "-no-reboot"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // QEMU dies with the thread that waits for it: a killed test or
        // `kiln` process never leaves a lab running (it would starve the
        // next one of CPU).
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let start = Instant::now();
        let mut child = io_ctx(cmd.spawn(), || format!("starting {}", qemu.display()))
            .map_err(|e| Box::new((e, none())))?;
        let console = Arc::new(Mutex::new(Console::default()));
        let out_thread = child
            .stdout
            .take()
            .map(|s| spawn_console_reader(s, console.clone(), echo));
        let stderr_buf = Arc::new(Mutex::new(Vec::new()));
        let err_thread = child.stderr.take().map(|mut s| {
            let buf = stderr_buf.clone();
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = s.read_to_end(&mut v);
                *buf.lock().unwrap_or_else(|e| e.into_inner()) = v;
            })
        });

        // An interactive run may sit quietly for as long as its user likes.
        let stall = if echo { self.timeout } else { DEFAULT_STALL };
        let status = match wait_deadline(&mut child, start + self.timeout, &results, stall) {
            Waited::Exited(s) => Ok(s),
            Waited::Stopped => {
                // Ask QEMU where the CPUs are and let the lab kernel print
                // its stacks before the lab is killed.
                let d = crate::monitor::diagnose(&qmp);
                let until = Instant::now() + NMI_GRACE;
                while Instant::now() < until && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
                Err(d)
            }
        };
        let total_time = start.elapsed();
        let kernel_tail = file_tail(&kernel_log);
        for t in [out_thread, err_thread].into_iter().flatten() {
            let _ = t.join();
        }
        let (tail, ready_at) = {
            let c = console.lock().unwrap_or_else(|e| e.into_inner());
            (c.tail(), c.ready_at)
        };
        let boot_time = ready_at.map(|t| t - start);
        if let Some(b) = boot_time {
            log::info!("kiln-lab: lab ready after {:.2} s", b.as_secs_f64());
        }
        let raw = fs::read(&results).unwrap_or_default();
        let parsed = framing::parse(&raw);
        let progress = describe(&parsed, commands, boot_time);
        let status = match status {
            Ok(s) => s,
            Err(diagnosis) => {
                let timeout = if start.elapsed() >= self.timeout {
                    self.timeout
                } else {
                    DEFAULT_STALL
                };
                return Err(Box::new((
                    LabError::Timeout {
                        timeout,
                        progress,
                        diagnosis,
                        console_tail: tail,
                        kernel_log: kernel_tail,
                    },
                    parsed,
                )));
            }
        };
        if let Some(e) = &parsed.error {
            let e = LabError::Protocol(format!("{e} ({progress})"));
            return Err(Box::new((e, parsed)));
        }
        let complete = parsed.done
            && parsed.frames.len() == commands.len()
            && parsed.frames.iter().enumerate().all(|(i, f)| f.index == i);
        if !complete {
            let stderr = stderr_buf.lock().unwrap_or_else(|e| e.into_inner());
            let e = LabError::Incomplete {
                qemu_status: status,
                progress,
                console_tail: tail,
                kernel_log: kernel_tail,
                qemu_stderr: String::from_utf8_lossy(&stderr).trim().to_string(),
            };
            return Err(Box::new((e, parsed)));
        }
        Ok((parsed, boot_time, total_time))
    }
}

/// A boot's results, boot time and total time; or the failure with whatever
/// results arrived before it.
type BootResult = Result<(Parsed, Option<Duration>, Duration), Box<(LabError, Parsed)>>;

/// How waiting for QEMU ended.
enum Waited {
    /// QEMU exited with this status.
    Exited(String),
    /// The deadline passed or the lab stalled; QEMU still runs.
    Stopped,
}

/// The last [`TAIL_BYTES`] of `bytes`, as text.
fn tail_text(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&bytes[start..]).replace('\r', "")
}

/// The last [`TAIL_BYTES`] of a file, as text (empty if unreadable).
fn file_tail(path: &Path) -> String {
    tail_text(&fs::read(path).unwrap_or_default())
}

/// Waits for `child` until `deadline`, or until `progress` (the results
/// file) has not grown for `stall`.
fn wait_deadline(child: &mut Child, deadline: Instant, progress: &Path, stall: Duration) -> Waited {
    let mut last_len = 0u64;
    let mut last_change = Instant::now();
    loop {
        let len = fs::metadata(progress).map(|m| m.len()).unwrap_or(0);
        if len != last_len {
            last_len = len;
            last_change = Instant::now();
        }
        if last_change.elapsed() >= stall {
            return Waited::Stopped;
        }
        match child.try_wait() {
            Ok(Some(s)) => return Waited::Exited(s.to_string()),
            Ok(None) => {}
            Err(e) => return Waited::Exited(format!("unknown status ({e})")),
        }
        if Instant::now() >= deadline {
            return Waited::Stopped;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Human-readable summary of how far a run got.
fn describe(p: &Parsed, commands: &[String], boot: Option<Duration>) -> String {
    let mut s = match boot {
        Some(b) => format!("lab ready after {:.1} s", b.as_secs_f64()),
        None => "lab never became ready".to_string(),
    };
    if !p.started {
        s.push_str(", /lab/run.sh did not start");
        return s;
    }
    s.push_str(&format!(
        ", {}/{} commands finished",
        p.frames.len(),
        commands.len()
    ));
    if let Some(i) = p.running {
        let c = commands.get(i).map_or("?", |c| c.as_str());
        s.push_str(&format!(", command {i} `{c}` was running"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_of_dynamic_and_static() {
        let env = Path::new("/usr/bin/env");
        if env.exists() {
            let libs = shared_libraries(env).unwrap();
            assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc")));
            assert!(libs.iter().all(|l| l.is_absolute()));
        }
    }

    #[test]
    fn progress_description() {
        let cmds = vec!["a".to_string(), "b".to_string()];
        let p = framing::parse(b"KILN-RUN-START\nKILN-CMD-BEGIN 0\n");
        let d = describe(&p, &cmds, Some(Duration::from_secs(3)));
        assert!(d.contains("0/2"), "{d}");
        assert!(d.contains("`a` was running"), "{d}");
        let d = describe(&Parsed::default(), &cmds, None);
        assert!(d.contains("never became ready"));
    }
}
