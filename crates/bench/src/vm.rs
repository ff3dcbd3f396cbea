//! A `kiln vmm` booted from a Firecracker config file for the benchmarks
//! that drive a running VM through its API (snapshot, migrate).
//!
//! The console is read to the end on a thread: the guest's ready marker
//! ends the boot, and the last lines are kept so a failure later on can
//! show what the guest printed (a VMM whose console pipe closes would end
//! at the guest's next line, so it is never dropped early).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kiln_lab::scripts::GUEST_READY_MARKER;

use super::Watchdog;

/// Console lines kept for error reports.
const TAIL: usize = 30;

/// A VMM process with a booted guest and its API socket.
pub struct BenchVm {
    child: Option<Child>,
    /// The API socket.
    pub sock: PathBuf,
    stderr: PathBuf,
    console: Arc<Mutex<VecDeque<String>>>,
}

impl BenchVm {
    /// Writes `config` to `dir`/vm.json, starts `exe vmm` on `dir`/api.sock
    /// and waits (at most `timeout`) for the guest's ready marker.
    pub fn boot(
        exe: &Path,
        dir: &Path,
        config: &serde_json::Value,
        timeout: Duration,
    ) -> Result<Self> {
        let cfg = dir.join("vm.json");
        std::fs::write(&cfg, config.to_string())?;
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let stderr = dir.join("vmm.err");
        let mut child = Command::new(exe)
            .args(["vmm", "--api-sock"])
            .arg(&sock)
            .arg("--config-file")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()
            .context("spawning kiln vmm")?;
        let out = child.stdout.take().expect("piped");
        let console = Arc::new(Mutex::new(VecDeque::new()));
        let tail = console.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if line.trim_end() == GUEST_READY_MARKER {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });
        let watchdog = Watchdog::start(child.id(), timeout);
        let ready = rx.recv().is_ok();
        watchdog.finish();
        let vm = Self {
            child: Some(child),
            sock,
            stderr,
            console,
        };
        if !ready {
            bail!(
                "the guest never printed {GUEST_READY_MARKER}{}",
                vm.diagnostics()
            );
        }
        Ok(vm)
    }

    /// The VMM's stderr and the console's last lines, for an error message.
    pub fn diagnostics(&self) -> String {
        // Give the console thread a moment to read what the VMM wrote last.
        std::thread::sleep(Duration::from_millis(100));
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let console: Vec<String> = self
            .console
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let mut s = String::new();
        if !err.trim().is_empty() {
            s += &format!("\nthe VMM's stderr:\n{}", err.trim_end());
        }
        if !console.is_empty() {
            s += &format!("\nthe console's last lines:\n{}", console.join("\n"));
        }
        s
    }

    /// Calls the API; a failure carries the VMM's diagnostics.
    pub fn api(
        &self,
        method: &str,
        uri: &str,
        body: &str,
    ) -> Result<kiln_api::client::ClientResponse> {
        let r = kiln_api::client::request_timeout(
            &self.sock,
            method,
            uri,
            Some(body),
            Some(Duration::from_secs(600)),
        )
        .with_context(|| format!("{method} {uri}"));
        match r {
            Ok(r) if (200..300).contains(&r.status) => Ok(r),
            Ok(r) => bail!(
                "{method} {uri}: {} {}{}",
                r.status_line,
                r.body,
                self.diagnostics()
            ),
            Err(e) => bail!("{e:#}{}", self.diagnostics()),
        }
    }

    /// Waits for the VMM to exit by itself (after a migration).
    pub fn wait(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for BenchVm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
