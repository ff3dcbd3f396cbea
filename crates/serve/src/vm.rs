//! The microVMs behind functions: a template VM booted once per function
//! and snapshotted once its agent answers, and instances restored from that
//! snapshot (each a `kiln restore` process mapping the memory file
//! privately, so all instances of a function share its page cache).
//!
//! Every VMM process is started by one long-lived spawner thread with
//! `PR_SET_PDEATHSIG`: the signal follows the thread that forked the child,
//! so children forked from short-lived request threads would die with
//! them, and children of a killed `kiln serve` must not outlive it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::agent::AgentConn;
use crate::ServeError;

/// Where the VMs come from.
#[derive(Clone, Debug)]
pub struct VmDefaults {
    /// The `kiln` executable.
    pub exe: PathBuf,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initrd (must hold `kiln-agent` on its PATH).
    pub initrd: PathBuf,
    /// Kernel command line (the agent command is appended after `--`).
    pub cmdline: String,
    /// Longest a template boot or an instance restore may take.
    pub start_timeout: Duration,
}

type SpawnReply = mpsc::Sender<std::io::Result<Child>>;

/// Starts child processes from one thread that lives as long as the server.
pub struct Spawner {
    tx: Mutex<mpsc::Sender<(Command, SpawnReply)>>,
}

impl Spawner {
    /// Starts the spawner thread.
    pub fn new() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<(Command, SpawnReply)>();
        std::thread::Builder::new()
            .name("kiln_serve_spawn".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // SAFETY: the closure runs in the forked child before
                    // exec and only calls prctl, which is async-signal-safe.
                    unsafe {
                        cmd.pre_exec(|| {
                            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            Ok(())
                        });
                    }
                    let _ = reply.send(cmd.spawn());
                }
            })?;
        Ok(Self { tx: Mutex::new(tx) })
    }

    /// Spawns `cmd` from the spawner thread.
    pub fn spawn(&self, cmd: Command) -> std::io::Result<Child> {
        let (rtx, rrx) = mpsc::channel();
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send((cmd, rtx));
        if sent.is_err() {
            return Err(std::io::Error::other("the spawner thread is gone"));
        }
        rrx.recv()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawner thread is gone")))
    }
}

/// The last line of a log file, for errors.
pub fn last_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Retries connecting to the agent behind `uds` until `deadline`, while
/// `child` runs.
fn connect_agent(
    child: &mut Child,
    uds: &Path,
    deadline: Instant,
    errlog: &Path,
    what: &str,
) -> Result<AgentConn, ServeError> {
    loop {
        let attempt = AgentConn::connect(uds, Duration::from_secs(10)).and_then(|mut c| {
            c.ping()?;
            Ok(c)
        });
        match attempt {
            Ok(c) => return Ok(c),
            Err(e) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(ServeError::Vm(format!(
                        "{what} ended ({status}) before its agent answered: {}",
                        last_lines(errlog, 3)
                    )));
                }
                if Instant::now() > deadline {
                    return Err(ServeError::Vm(format!(
                        "{what}: no answer from the agent through {} ({e})",
                        uds.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A function's snapshot files.
#[derive(Clone, Debug)]
pub struct Template {
    /// The state file.
    pub state: PathBuf,
    /// The memory file.
    pub mem: PathBuf,
}

/// Boots a template VM in `dir` (vcpus, mem MiB), waits for its agent,
/// runs `setup` in it (if any), pauses and snapshots it, and stops it.
pub fn build_template(
    spawner: &Spawner,
    d: &VmDefaults,
    dir: &Path,
    vcpus: u8,
    mem: u64,
    setup: Option<&str>,
    rootfs: Option<&Path>,
) -> Result<Template, ServeError> {
    let io = |what: &str, e: std::io::Error| ServeError::Vm(format!("{what}: {e}"));
    let uds = dir.join("template.vsock");
    let api = dir.join("template.api");
    for p in [&uds, &api] {
        let _ = std::fs::remove_file(p);
    }
    let root = if rootfs.is_some() {
        " --root /dev/vda"
    } else {
        ""
    };
    let mut config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": d.kernel,
            "initrd_path": d.initrd,
            "boot_args": format!(
                "{} -- \"kiln-agent fn-serve {}{root}\"",
                d.cmdline,
                crate::agent::AGENT_PORT
            ),
        },
        "machine-config": { "vcpu_count": vcpus, "mem_size_mib": mem },
        "vsock": { "guest_cid": 3, "uds_path": uds },
    });
    if let Some(r) = rootfs {
        config["drives"] = serde_json::json!([{
            "drive_id": "rootfs",
            "path_on_host": r,
            "is_root_device": false,
            "is_read_only": true,
        }]);
    }
    let cfg = dir.join("template.json");
    std::fs::write(&cfg, config.to_string()).map_err(|e| io("writing the VM config", e))?;
    let console = dir.join("template.console");
    let errlog = dir.join("template.err");
    let mut cmd = Command::new(&d.exe);
    cmd.arg("vmm")
        .arg("--api-sock")
        .arg(&api)
        .arg("--config-file")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&console).map_err(|e| io("console log", e))?)
        .stderr(std::fs::File::create(&errlog).map_err(|e| io("error log", e))?);
    let mut child = spawner
        .spawn(cmd)
        .map_err(|e| io(&format!("starting {}", d.exe.display()), e))?;
    let result = (|| {
        let deadline = Instant::now() + d.start_timeout;
        let mut conn = connect_agent(&mut child, &uds, deadline, &errlog, "the template VM")
            .map_err(|e| ServeError::Vm(format!("{e}; console: {}", last_lines(&console, 3))))?;
        if let Some(cmd) = setup {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = conn
                .call(cmd, b"", left.max(Duration::from_secs(1)))
                .map_err(|e| ServeError::Vm(format!("setup: {e}")))?;
            if r.code != 0 {
                return Err(ServeError::BadRequest(format!(
                    "setup exited with status {}: {}",
                    r.code,
                    String::from_utf8_lossy(&r.stderr).trim()
                )));
            }
        }
        drop(conn);
        // Let the guest see the connection close before it is frozen: the
        // snapshot then holds an agent waiting in accept().
        std::thread::sleep(Duration::from_millis(300));
        let state = dir.join("snapshot.state");
        let mem = dir.join("snapshot.mem");
        api_call(&api, "PATCH", "/vm", r#"{"state":"Paused"}"#)?;
        let body = serde_json::json!({ "snapshot_path": state, "mem_file_path": mem });
        api_call(&api, "PUT", "/snapshot/create", &body.to_string())?;
        Ok(Template { state, mem })
    })();
    kill(&mut child);
    for p in [&uds, &api] {
        let _ = std::fs::remove_file(p);
    }
    result
}

fn api_call(sock: &Path, method: &str, uri: &str, body: &str) -> Result<(), ServeError> {
    let r = kiln_api::client::request(sock, method, uri, Some(body))
        .map_err(|e| ServeError::Vm(format!("{method} {uri} on the template VM: {e}")))?;
    if !(200..300).contains(&r.status) {
        return Err(ServeError::Vm(format!(
            "{method} {uri} on the template VM: {} {}",
            r.status_line, r.body
        )));
    }
    Ok(())
}

/// A running instance: a restored VMM process and the connection to its agent.
#[derive(Debug)]
pub struct Instance {
    /// Serial number (unique per server).
    pub id: u64,
    child: Child,
    /// The agent connection.
    pub conn: AgentConn,
    uds: PathBuf,
    errlog: PathBuf,
}

impl Instance {
    /// Restores `t` as instance `id` (files in `dir`).
    pub fn restore(
        spawner: &Spawner,
        d: &VmDefaults,
        t: &Template,
        dir: &Path,
        id: u64,
    ) -> Result<Self, ServeError> {
        let uds = dir.join(format!("i{id}.vsock"));
        let errlog = dir.join(format!("i{id}.err"));
        let _ = std::fs::remove_file(&uds);
        let mut cmd = Command::new(&d.exe);
        cmd.arg("restore")
            .arg("--snapshot")
            .arg(&t.state)
            .arg("--mem-file")
            .arg(&t.mem)
            .arg("--vsock-override")
            .arg(&uds)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&errlog)
                    .map_err(|e| ServeError::Vm(format!("{}: {e}", errlog.display())))?,
            );
        let mut child = spawner
            .spawn(cmd)
            .map_err(|e| ServeError::Vm(format!("starting {}: {e}", d.exe.display())))?;
        let deadline = Instant::now() + d.start_timeout;
        match connect_agent(&mut child, &uds, deadline, &errlog, "the restored VM") {
            Ok(conn) => Ok(Self {
                id,
                child,
                conn,
                uds,
                errlog,
            }),
            Err(e) => {
                kill(&mut child);
                let _ = std::fs::remove_file(&uds);
                let _ = std::fs::remove_file(&errlog);
                Err(e)
            }
        }
    }

    /// The VMM's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the VMM (kill and reap) and removes its files; idempotent.
    pub fn stop(&mut self) {
        kill(&mut self.child);
        let _ = std::fs::remove_file(&self.uds);
        let _ = std::fs::remove_file(&self.errlog);
    }

    /// Why the VMM ended, if it did (for errors).
    pub fn exit_note(&mut self) -> String {
        match self.child.try_wait() {
            Ok(Some(s)) => format!("the VMM ended ({s}): {}", last_lines(&self.errlog, 2)),
            _ => String::new(),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop();
    }
}
