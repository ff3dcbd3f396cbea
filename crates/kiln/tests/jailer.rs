//! `kiln jailer`, natively (no guest needed; needs root and cgroup v2): a
//! jailed pre-boot `kiln vmm` serves its API as an unprivileged uid from a
//! chroot in its own cgroup; bad input leaves nothing behind; `--cleanup`
//! removes a finished jail.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const UID: u32 = 1234;

fn kiln() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}

fn require_root() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the jailer tests need root");
}

/// The cgroup2 mount (from mountinfo), mounted in a temp dir if there is none.
fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    for l in info.lines() {
        if let Some((left, right)) = l.split_once(" - ") {
            if right.starts_with("cgroup2 ") {
                return PathBuf::from(left.split_whitespace().nth(4).unwrap());
            }
        }
    }
    let dir = PathBuf::from("/tmp/kiln-test-cgroup2");
    fs::create_dir_all(&dir).unwrap();
    let st = Command::new("mount")
        .args(["-t", "cgroup2", "none"])
        .arg(&dir)
        .status()
        .unwrap();
    assert!(st.success(), "mount -t cgroup2 failed");
    dir
}

/// cgroup files to set: memory.max and pids.max when cgroup v2 has those
/// controllers, else (a host whose memory/pids are on cgroup v1) a hugetlb
/// limit. The lab test checks memory.max and pids.max.
fn cgroup_values(mount: &Path) -> Vec<(&'static str, &'static str)> {
    let ctl = fs::read_to_string(mount.join("cgroup.controllers")).unwrap();
    let has = |c: &str| ctl.split_whitespace().any(|x| x == c);
    if has("memory") && has("pids") {
        vec![("memory.max", "268435456"), ("pids.max", "100")]
    } else if has("hugetlb") {
        vec![("hugetlb.2MB.max", "6291456")]
    } else {
        panic!(
            "cgroup v2 at {} has no usable controller: {ctl}",
            mount.display()
        )
    }
}

/// A fresh chroot base dir and parent cgroup name for one test.
struct Scratch {
    base: PathBuf,
    parent: String,
    mount: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        require_root();
        let base = std::env::temp_dir().join(format!("kiln-jail-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        // Let the unprivileged VMM reach its chroot under the base.
        fs::set_permissions(&base, fs::Permissions::from_mode(0o755)).unwrap();
        Scratch {
            base,
            parent: format!("kiln-test-{}-{name}", std::process::id()),
            mount: cgroup2_mount(),
        }
    }

    fn root(&self, id: &str) -> PathBuf {
        self.base.join("kiln").join(id).join("root")
    }

    fn leaf(&self, id: &str) -> PathBuf {
        self.mount.join(&self.parent).join(id)
    }

    /// `kiln jailer --id ID --exec-file kiln --chroot-base-dir BASE --parent-cgroup P` + extra.
    fn jailer(&self, id: &str, extra: &[&str]) -> Command {
        self.jailer_exec(id, &kiln(), extra)
    }

    /// [`Scratch::jailer`] jailing `exec` instead of kiln.
    fn jailer_exec(&self, id: &str, exec: &Path, extra: &[&str]) -> Command {
        let mut c = Command::new(kiln());
        c.arg("jailer")
            .args(["--id", id, "--exec-file"])
            .arg(exec)
            .arg("--chroot-base-dir")
            .arg(&self.base)
            .args(["--parent-cgroup", &self.parent])
            .args(extra);
        c
    }

    /// Nothing on disk under the base, nothing in the cgroup tree.
    fn assert_empty(&self, what: &str) {
        let left: Vec<_> = fs::read_dir(&self.base).unwrap().collect();
        assert!(
            left.is_empty(),
            "{what}: left behind in {}: {left:?}",
            self.base.display()
        );
        let p = self.mount.join(&self.parent);
        assert!(!p.exists(), "{what}: cgroup {} left behind", p.display());
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.base);
        if let Ok(rd) = fs::read_dir(self.mount.join(&self.parent)) {
            for e in rd.flatten() {
                if e.path().is_dir() {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        let _ = fs::remove_dir(self.mount.join(&self.parent));
    }
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET / on the API socket: the response.
fn api_get(sock: &Path) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.push_str(&String::from_utf8_lossy(&buf[..n]));
        if out.contains("}") {
            break;
        }
    }
    out
}

fn status_field(pid: i32, field: &str) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks a running jailed VMM (pid `pid`, jail `id`).
fn check_jailed_vmm(s: &Scratch, id: &str, pid: i32, values: &[(&str, &str)]) {
    let root = s.root(id);
    let sock = root.join("api.sock");
    wait_for("the API socket", || sock.exists());
    let resp = api_get(&sock);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(&format!(r#""id":"{id}""#)), "{resp}");
    assert!(resp.contains(r#""state":"Not started""#), "{resp}");

    // Unprivileged, no capabilities.
    assert_eq!(status_field(pid, "Uid"), "1234 1234 1234 1234");
    assert_eq!(status_field(pid, "Gid"), "1234 1234 1234 1234");
    assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");

    // Its root is the chroot, which holds only what the jailer made.
    let proc_root = PathBuf::from(format!("/proc/{pid}/root"));
    let (a, b) = (
        fs::metadata(&proc_root).unwrap(),
        fs::metadata(&root).unwrap(),
    );
    assert_eq!(
        (a.dev(), a.ino()),
        (b.dev(), b.ino()),
        "/proc/{pid}/root is not the chroot"
    );
    let seen: BTreeSet<String> = fs::read_dir(&proc_root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let allowed = [
        "kiln", "kiln.pid", "api.sock", "dev", "run", "lib", "lib64", "usr",
    ];
    for e in &seen {
        assert!(
            allowed.contains(&e.as_str()),
            "unexpected {e} in the jail: {seen:?}"
        );
    }
    for e in ["kiln", "dev", "api.sock"] {
        assert!(seen.contains(e), "no {e} in the jail: {seen:?}");
    }
    for host in ["etc", "proc", "tmp", "work", "bin", "root"] {
        assert!(
            !proc_root.join(host).exists(),
            "the jail sees the host's /{host}"
        );
    }
    let copied = fs::metadata(root.join("kiln")).unwrap();
    assert_eq!(copied.nlink(), 1, "the VMM binary is linked, not copied");
    assert_ne!(copied.mode() & 0o111, 0, "the copied VMM is not executable");
    assert_eq!(fs::metadata(&root).unwrap().uid(), UID);

    // Device nodes: the host's major/minor, owned by the jail's uid:gid.
    for dev in ["dev/kvm", "dev/net/tun", "dev/urandom", "dev/userfaultfd"] {
        let host = Path::new("/").join(dev);
        let Ok(h) = fs::metadata(&host) else {
            assert!(
                !root.join(dev).exists(),
                "{dev} made though the host has none"
            );
            continue;
        };
        let j = fs::metadata(root.join(dev)).unwrap_or_else(|e| panic!("{dev}: {e}"));
        assert_eq!(j.rdev(), h.rdev(), "{dev}: wrong major/minor");
        assert_eq!((j.uid(), j.gid()), (UID, UID), "{dev}: wrong owner");
    }
    assert!(root.join("dev/kvm").exists());

    // The cgroup leaf and its values.
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!("0::/{}/{id}", s.parent);
    assert!(cg.lines().any(|l| l == want), "{want} not in {cg}");
    for (file, value) in values {
        let got = fs::read_to_string(s.leaf(id).join(file)).unwrap();
        assert_eq!(got.trim(), *value, "{file}");
    }
}

fn cleanup(s: &Scratch, id: &str) -> Output {
    s.jailer(id, &["--cleanup"]).output().unwrap()
}

#[test]
fn jailed_vmm_serves_its_api_unprivileged_and_cleanup_removes_it() {
    let s = Scratch::new("run");
    let id = "jail-run-1";
    let values = cgroup_values(&s.mount);
    let mut cmd = s.jailer(id, &["--uid", "1234", "--gid", "1234"]);
    for (f, v) in &values {
        cmd.args(["--cgroup", &format!("{f}={v}")]);
    }
    cmd.args([
        "--resource-limit",
        "no-file=512",
        "--resource-limit",
        "fsize=1048576",
    ]);
    cmd.args(["--", "vmm", "--api-sock", "/api.sock"]);
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Without --new-pid-ns the jailer execs the VMM: same pid.
    let pid = child.id() as i32;
    wait_for("the pid file", || s.root(id).join("kiln.pid").exists());
    assert_eq!(
        fs::read_to_string(s.root(id).join("kiln.pid"))
            .unwrap()
            .trim(),
        pid.to_string()
    );
    check_jailed_vmm(&s, id, pid, &values);
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 512 ")),
        "{limits}"
    );
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max file size") && l.contains(" 1048576 ")),
        "{limits}"
    );

    // While it runs, cleanup refuses (the cgroup has a process).
    let busy = cleanup(&s, id);
    assert_eq!(busy.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("still has processes"));
    assert!(s.root(id).exists());

    child.kill().unwrap();
    child.wait().unwrap();
    let out = cleanup(&s, id);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.assert_empty("after --cleanup");
    // A second cleanup finds nothing.
    let again = cleanup(&s, id);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("no jail"));
}

#[test]
fn new_pid_ns_and_daemonize() {
    let s = Scratch::new("pidns");
    let id = "jail-pidns";
    let values = cgroup_values(&s.mount);
    let mut cmd = s.jailer(
        id,
        &[
            "--uid",
            "1234",
            "--gid",
            "1234",
            "--new-pid-ns",
            "--daemonize",
        ],
    );
    for (f, v) in &values {
        cmd.args(["--cgroup", &format!("{f}={v}")]);
    }
    cmd.args(["--", "vmm", "--api-sock", "/api.sock"]);
    // The daemonized jailer's first process exits 0 right away.
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pidfile = s.root(id).join("kiln.pid");
    wait_for("the pid file", || {
        fs::read_to_string(&pidfile).is_ok_and(|p| !p.trim().is_empty())
    });
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    check_jailed_vmm(&s, id, pid, &values);
    // PID 1 of its own PID namespace, in its own session.
    let nspid = status_field(pid, "NSpid");
    assert_eq!(nspid, format!("{pid} 1"));
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let sid: i32 = after.split_whitespace().nth(3).unwrap().parse().unwrap();
    // SAFETY: getsid on our own process.
    let our_sid = unsafe { libc::getsid(0) };
    assert_ne!(sid, our_sid, "not detached from our session");
    // SAFETY: signalling the VMM we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_for("the jail's processes to exit", || {
        fs::read_to_string(s.leaf(id).join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty())
    });
    let out = cleanup(&s, id);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.assert_empty("after --cleanup");
}

/// Runs a jailer that must fail: exit 1, one clear line, nothing left.
fn refused(s: &Scratch, what: &str, cmd: &mut Command, expect: &str) {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{what}: not one line: {err}");
    assert!(err.starts_with("kiln: jailer: "), "{what}: {err}");
    assert!(err.contains(expect), "{what}: {err:?} lacks {expect:?}");
    s.assert_empty(what);
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    let s = Scratch::new("bad");
    let ok = ["--uid", "1234", "--gid", "1234"];
    let (f, v) = cgroup_values(&s.mount)[0];
    let cg = format!("{f}={v}");
    let with_cg = |id: &str, extra: &[&str]| {
        let mut c = s.jailer(id, &ok);
        c.args(["--cgroup", &cg])
            .args(extra)
            .args(["--", "vmm", "--api-sock", "/api.sock"]);
        c
    };
    refused(&s, "id with /", &mut with_cg("a/b", &[]), "--id \"a/b\"");
    refused(&s, "id ..", &mut with_cg("..", &[]), "--id \"..\"");
    refused(
        &s,
        "long id",
        &mut with_cg(&"a".repeat(65), &[]),
        "1 to 64 letters",
    );
    let mut missing = s.jailer_exec("x1", Path::new("/no/such/kiln"), &ok);
    missing.args(["--cgroup", &cg]);
    refused(&s, "missing exec file", &mut missing, "/no/such/kiln");
    let mut root = s.jailer("x2", &["--uid", "0", "--gid", "0", "--cgroup", &cg]);
    refused(&s, "uid 0", &mut root, "--allow-root");
    refused(
        &s,
        "unknown controller",
        &mut with_cg("x3", &["--cgroup", "nosuch.max=1"]),
        "controller \"nosuch\" is not available",
    );
    refused(
        &s,
        "unknown cgroup file",
        &mut with_cg(
            "x4",
            &[
                "--cgroup",
                &format!("{}.nosuch=1", f.split('.').next().unwrap()),
            ],
        ),
        "does not exist",
    );
    refused(
        &s,
        "cgroup v1",
        &mut with_cg("x5", &["--cgroup-version", "1"]),
        "only cgroup v2",
    );
    refused(
        &s,
        "bad rlimit",
        &mut with_cg("x6", &["--resource-limit", "cpu=1"]),
        "fsize or no-file",
    );

    // An existing chroot dir: refused, and left exactly as it was.
    let existing = s.root("x7");
    fs::create_dir_all(&existing).unwrap();
    fs::write(existing.join("marker"), "mine").unwrap();
    let out = with_cg("x7", &[]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(fs::read_to_string(existing.join("marker")).unwrap(), "mine");
    assert_eq!(fs::read_dir(&existing).unwrap().count(), 1);
    assert!(
        !s.mount.join(&s.parent).exists(),
        "cgroup made for a refused jail"
    );
    fs::remove_dir_all(s.base.join("kiln")).unwrap();

    // A failure after pivot_root and the privilege drop (the exec itself:
    // a script whose interpreter is not in the jail) is undone too.
    let script_dir = std::env::temp_dir().join(format!("kiln-jail-script-{}", std::process::id()));
    fs::create_dir_all(&script_dir).unwrap();
    let script = script_dir.join("script");
    fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let jail_script = |id: &str, extra: &[&str]| {
        s.jailer_exec(id, &script, &ok)
            .args(["--cgroup", &cg])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = jail_script("x8", &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("exec /script"), "{err}");
    s.assert_empty("failed exec");

    // The same in a new PID namespace: the failing child is PID 1 there; the
    // parent waits for it and for the cleanup, and exits with its status.
    let out = jail_script("x9", &["--new-pid-ns"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("exec /script"), "{err}");
    s.assert_empty("failed exec in a new pid namespace");

    // Daemonized: the jailer's first process has already exited 0 when the
    // exec fails; the cleaner still removes everything.
    let out = jail_script("x10", &["--daemonize"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for("the cleanup of a failed daemon", || {
        fs::read_dir(&s.base).unwrap().count() == 0 && !s.mount.join(&s.parent).exists()
    });
    fs::remove_dir_all(&script_dir).unwrap();
}

#[test]
fn jailer_name_dispatch() {
    require_root();
    // kiln run under the name `jailer` takes the jailer's flags directly.
    let dir = std::env::temp_dir().join(format!("kiln-jailer-name-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let link = dir.join("jailer");
    let _ = fs::remove_file(&link);
    std::os::unix::fs::symlink(kiln(), &link).unwrap();
    let out = Command::new(&link)
        .args([
            "--id",
            "bad/id",
            "--exec-file",
            "/bin/true",
            "--uid",
            "5",
            "--gid",
            "5",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--id \"bad/id\""), "{err}");
    let help = Command::new(&link).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--chroot-base-dir") && text.contains("--new-pid-ns"),
        "{text}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn exec_named_firecracker_takes_firecracker_flags() {
    // A copy of kiln named `firecracker` is Kiln under Firecracker's name:
    // the jailer runs it with argv[0] `firecracker` and Firecracker's flags
    // (no `vmm` subcommand), as Firecracker's jailer would.
    let s = Scratch::new("fc");
    let dir = std::env::temp_dir().join(format!("kiln-jail-fcbin-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let fc = dir.join("firecracker");
    fs::copy(kiln(), &fc).unwrap();
    let id = "jail-fc";
    let mut child = Command::new(kiln())
        .args(["jailer", "--id", id, "--exec-file"])
        .arg(&fc)
        .arg("--chroot-base-dir")
        .arg(&s.base)
        .args([
            "--uid",
            "1234",
            "--gid",
            "1234",
            "--",
            "--api-sock",
            "/run/firecracker.socket",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let root = s.base.join("firecracker").join(id).join("root");
    let sock = root.join("run/firecracker.socket");
    wait_for("the API socket", || sock.exists());
    let resp = api_get(&sock);
    assert!(resp.contains(&format!(r#""id":"{id}""#)), "{resp}");
    assert!(root.join("firecracker").exists());
    child.kill().unwrap();
    child.wait().unwrap();
    let out = Command::new(kiln())
        .args(["jailer", "--cleanup", "--id", id, "--exec-file"])
        .arg(&fc)
        .arg("--chroot-base-dir")
        .arg(&s.base)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!s.base.join("firecracker").exists());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn without_cgroup_values_an_existing_parent_cgroup_is_joined() {
    // Firecracker's v2 behaviour: no --cgroup, an existing --parent-cgroup:
    // the VMM joins it and no leaf is made.
    let s = Scratch::new("join");
    let parent = s.mount.join(&s.parent);
    fs::create_dir(&parent).unwrap();
    let id = "jail-join";
    let mut child = s
        .jailer(
            id,
            &[
                "--uid",
                "1234",
                "--gid",
                "1234",
                "--",
                "vmm",
                "--api-sock",
                "/api.sock",
            ],
        )
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for("the API socket", || s.root(id).join("api.sock").exists());
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!("0::/{}", s.parent);
    assert!(cg.lines().any(|l| l == want), "{want} not in {cg}");
    assert!(!s.leaf(id).exists(), "a leaf was made without --cgroup");
    child.kill().unwrap();
    child.wait().unwrap();
    let out = cleanup(&s, id);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!s.base.join("kiln").exists());
    // The operator's own cgroup is not removed by the cleanup.
    assert!(parent.is_dir());
    fs::remove_dir(&parent).unwrap();
}
