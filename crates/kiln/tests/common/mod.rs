//! Shared harness for tests that boot real guests.
//!
//! Every command a test needs runs on a "KVM host": this machine when its KVM
//! runs guests natively, else the lab (QEMU/TCG with nested KVM). All commands
//! of a test binary run in one batch (one lab boot); each test then looks up
//! its own result. `KILN_LAB=1`/`0` forces the lab or native.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use kiln_lab::{images, CommandOutput, Lab, LabMode};

/// The kiln binary under test.
pub fn kiln_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

/// Guest images, built on first use.
pub fn guest_images() -> images::Images {
    images::ensure(&images::default_cache_dir()).expect("building guest images")
}

/// Whether commands go to the lab.
pub fn use_lab() -> bool {
    match kiln_lab::mode_from_env() {
        Some(LabMode::Lab) => true,
        Some(LabMode::Native) => false,
        None => !matches!(
            kiln_vmm::probe::probe(),
            kiln_vmm::probe::KvmProbe::Native(_)
        ),
    }
}

/// An example program of this package (built by `cargo test`, or by
/// `cargo build --example NAME`), next to the kiln binary.
pub fn example_bin(name: &str) -> PathBuf {
    let p = kiln_bin().parent().unwrap().join("examples").join(name);
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build -p kiln --example {name}` \
         (plain `cargo test -p kiln` builds it too)",
        p.display()
    );
    p
}

/// Runs `cases` (name, shell command) on the KVM host, all in one batch.
/// A lab failure is returned as an error message (shared by every test).
pub fn run_batch(
    cases: &[(&str, String)],
    timeout: Duration,
) -> Result<HashMap<String, CommandOutput>, String> {
    run_batch_with(cases, timeout, &[])
}

/// [`run_batch`] with `extra` host binaries on the commands' PATH (in the
/// lab: copied to /usr/local/bin with their libraries).
pub fn run_batch_with(
    cases: &[(&str, String)],
    timeout: Duration,
    extra: &[PathBuf],
) -> Result<HashMap<String, CommandOutput>, String> {
    let imgs = guest_images();
    let outputs: Vec<CommandOutput> = if use_lab() {
        let prefix = "export KILN_IN_LAB=1 KILN_KERNEL=/images/vmlinuz \
            KILN_INITRD=/images/initramfs.img KILN_ROOTFS=/images/rootfs.ext4 \
            KILN_AGENT=/usr/bin/kiln-agent KILN_VMLINUX=/images/vmlinux; ";
        // KILN_SECCOMP (trap or log, to find syscalls a filter misses)
        // reaches the VMMs in the lab too.
        let seccomp = match std::env::var("KILN_SECCOMP") {
            Ok(m) if m.bytes().all(|b| b.is_ascii_lowercase()) => {
                format!("export KILN_SECCOMP={m}; ")
            }
            _ => String::new(),
        };
        let cmds: Vec<String> = cases
            .iter()
            .map(|(_, c)| format!("{prefix}{seccomp}{c}"))
            .collect();
        let rootfs = imgs.rootfs.clone();
        let vmlinux = imgs.vmlinux.clone();
        let mut lab = Lab::new(imgs).binary(kiln_bin());
        for b in extra {
            lab = lab.binary(b);
        }
        // iproute2 (for `ip tuntap`): the lab's busybox `ip` lacks it.
        if let Some(ip) = ["/usr/sbin/ip", "/sbin/ip", "/bin/ip"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        {
            lab = lab.binary(ip);
        }
        if cases.iter().any(|(_, c)| c.contains("KILN_ROOTFS")) {
            lab = lab.file(rootfs, "/images/rootfs.ext4");
        }
        if cases.iter().any(|(_, c)| c.contains("KILN_VMLINUX")) {
            lab = lab.file(vmlinux, "/images/vmlinux");
        }
        let lab = lab.timeout(timeout);
        // The lab is an emulated machine; if it stalls, the unfinished
        // commands run again in a fresh lab (see Lab::run_resilient).
        lab.run_resilient(&cmds)
            .map_err(|e| format!("the lab run failed: {e}"))?
    } else {
        let mut dirs = vec![kiln_bin().parent().unwrap().to_path_buf()];
        dirs.extend(
            extra
                .iter()
                .filter_map(|b| b.parent().map(Path::to_path_buf)),
        );
        let mut path = std::env::join_paths(dirs)
            .expect("binary directories")
            .into_string()
            .expect("UTF-8 binary directories");
        path.push(':');
        path.push_str(&std::env::var("PATH").unwrap_or_default());
        cases
            .iter()
            .map(|(_, c)| {
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(c)
                    .env("PATH", &path)
                    .env("KILN_LAB", "0")
                    .env("KILN_KERNEL", &imgs.kernel)
                    .env("KILN_INITRD", &imgs.initramfs)
                    .env("KILN_ROOTFS", &imgs.rootfs)
                    .env("KILN_AGENT", &imgs.agent)
                    .env("KILN_VMLINUX", &imgs.vmlinux)
                    .output()
                    .expect("sh");
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                CommandOutput {
                    command: c.clone(),
                    output: text,
                    status: out.status.code().unwrap_or(128),
                }
            })
            .collect()
    };
    // With KILN_SECCOMP=trap, every syscall a filter refused (shown with
    // `cargo test -- --nocapture`).
    for ((n, _), o) in cases.iter().zip(&outputs) {
        for l in o
            .output
            .lines()
            .filter(|l| l.contains("kiln: seccomp: blocked syscall"))
        {
            eprintln!("{n}: {}", l.trim_end());
        }
    }
    Ok(cases
        .iter()
        .map(|(n, _)| n.to_string())
        .zip(outputs)
        .collect())
}

/// A lazily-run batch shared by the tests of one binary.
pub struct Batch {
    cell: OnceLock<Result<HashMap<String, CommandOutput>, String>>,
    cases: fn() -> Vec<(&'static str, String)>,
    timeout: Duration,
    extra: fn() -> Vec<PathBuf>,
}

impl Batch {
    /// A batch of `cases`.
    pub const fn new(cases: fn() -> Vec<(&'static str, String)>, timeout: Duration) -> Self {
        Self::with_binaries(cases, timeout, Vec::new)
    }

    /// A batch of `cases` that also needs the host binaries `extra` (see
    /// [`run_batch_with`]).
    pub const fn with_binaries(
        cases: fn() -> Vec<(&'static str, String)>,
        timeout: Duration,
        extra: fn() -> Vec<PathBuf>,
    ) -> Self {
        Self {
            cell: OnceLock::new(),
            cases,
            timeout,
            extra,
        }
    }

    /// The result of case `name` (running the batch on first use; a failed
    /// batch fails every test with the same message, without re-running).
    pub fn get(&self, name: &str) -> &CommandOutput {
        let all = self
            .cell
            .get_or_init(|| {
                // KILN_TEST_ONLY=a,b runs only those cases (for development,
                // together with a cargo test name filter).
                let only = std::env::var("KILN_TEST_ONLY").ok();
                let cases: Vec<_> = (self.cases)()
                    .into_iter()
                    .filter(|(n, _)| {
                        only.as_deref()
                            .is_none_or(|o| o.split(',').any(|x| x == *n))
                    })
                    .collect();
                run_batch_with(&cases, self.timeout, &(self.extra)())
            })
            .as_ref()
            .unwrap_or_else(|e| panic!("{e}"));
        all.get(name)
            .unwrap_or_else(|| panic!("no case named {name}"))
    }
}

/// Lines the guest printed between the init marker and its exit marker.
pub fn guest_lines(out: &CommandOutput) -> Vec<String> {
    let mut lines = Vec::new();
    let mut inside = false;
    for l in out.output.lines() {
        let l = l.trim_end_matches('\r');
        if l == "KILN-INIT-READY" {
            inside = true;
        } else if l.starts_with("KILN-EXIT=") {
            inside = false;
        } else if inside {
            lines.push(l.to_string());
        }
    }
    lines
}

/// The guest command's exit status from the `KILN-EXIT=` line.
pub fn guest_status(out: &CommandOutput) -> Option<i32> {
    out.output
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("KILN-EXIT="))
        .and_then(|s| s.trim().parse().ok())
}

/// Runs kiln directly on this machine (no KVM needed for error paths).
pub fn kiln_here(args: &[&str]) -> std::process::Output {
    Command::new(kiln_bin())
        .args(args)
        .env("KILN_LAB", "0")
        .output()
        .expect("running kiln")
}

/// A temp file with `contents`.
pub fn temp_file(name: &str, contents: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

/// True if `p` exists.
pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// The text of the section after a `== name` line in a command's output.
pub fn section<'a>(out: &'a str, name: &str) -> &'a str {
    let start = out
        .find(&format!("== {name}\n"))
        .unwrap_or_else(|| panic!("no section {name}: {out}"));
    let rest = &out[start + name.len() + 4..];
    &rest[..rest.find("\n== ").unwrap_or(rest.len())]
}

/// Shell functions for scripts that watch a counting guest's console log
/// (lines "count=N ..."): `wait_counts LOG N` waits (up to 10 min) for N
/// count lines, `counts LOG` prints the numbers, `wait_sock PATH` waits
/// (up to 120 s) for a socket to appear.
/// Only `count=` followed by a number is a count (a log line quoting the
/// guest's command, `echo count=$i`, is not).
/// (The waits are bounded generously: a loaded machine runs the lab's
/// guests several times slower; a bound only ends a run that went wrong.)
pub const COUNTING_SH: &str = r#"wait_counts() { n=0; while [ "$(grep -c 'count=[0-9]' "$1" 2>/dev/null)" -lt "$2" ] && [ $n -lt 3000 ]; do sleep 0.2; n=$((n+1)); done; }
counts() { grep -o 'count=[0-9][0-9]*' "$1" | sed 's/count=//'; }
wait_sock() { n=0; until [ -S "$1" ] || [ $n -gt 1200 ]; do sleep 0.1; n=$((n+1)); done; }
"#;

/// The first counter value in "count=N ..." lines.
pub fn first_count(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.split("count=").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in: {text}"))
}

/// Checks `kiln-agent vsock-send`'s report ("sent N SUM recv N SUM ...")
/// in `text`: `bytes` went out and all came back unchanged. `all` is the
/// whole output, for the failure message.
pub fn assert_echoed(text: &str, bytes: u64, all: &str) {
    let f: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with("sent "))
        .unwrap_or_else(|| panic!("no vsock report: {all}"))
        .split_whitespace()
        .collect();
    let n = bytes.to_string();
    assert_eq!((f[1], f[4]), (n.as_str(), n.as_str()), "{all}");
    assert_eq!(f[2], f[5], "{all}");
}

/// Bytes as a printf(1) format of octal escapes (binary data written by a
/// lab shell command).
pub fn octal(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:03o}")).collect()
}
