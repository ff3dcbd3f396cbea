//! `kiln run --image`: OCI images built here from busybox with `umoci` (no
//! registry) run in microVMs booted from Debian's stock kernel (natively,
//! or in the lab): the image's command with its Env and WorkingDir, a
//! command given after `--` instead, its exit status as Kiln's (7 passes
//! through, a command not found is 127), stdin forwarded over the console,
//! a writable layer on the read-only image, the root file system built once
//! and then reused. Bad images (truncated, not OCI, no command) fail with
//! one clear line before any VM starts and leave nothing behind. The guest
//! side's last step (`kiln-agent oci-exec`) also runs here as a host
//! process in a chroot, with no VM.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use common::{guest_lines, Batch};

/// The test images' directory (rebuilt once per test run).
fn work_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("run_image")
}

fn sh(script: &str, dir: &Path) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the images once: `kiln-test-busybox.tar` (an oci-layout archive
/// with two manifests: `latest`, whose config has Cmd, Env and WorkingDir,
/// and `bare`, the same layer with no command), the layout directory
/// `layout/` it was made from, and the busybox root `bundle/rootfs`.
fn images() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = work_dir();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let busybox = common::guest_images().busybox;
        sh(
            &format!(
                "umoci init --layout layout
                 umoci new --image layout:latest
                 umoci unpack --image layout:latest bundle >/dev/null
                 mkdir -p bundle/rootfs/bin bundle/rootfs/etc
                 cp {bb} bundle/rootfs/bin/busybox
                 for a in $(bundle/rootfs/bin/busybox --list); do
                     [ \"$a\" = busybox ] || ln -s busybox bundle/rootfs/bin/$a
                 done
                 echo image-file > bundle/rootfs/etc/kiln-test
                 umoci repack --image layout:latest bundle
                 umoci tag --image layout:latest bare
                 umoci config --image layout:latest \
                     --config.cmd /bin/sh --config.cmd -c \
                     --config.cmd 'echo hello from $GREETING in $(pwd) as $(id -u)' \
                     --config.env GREETING=kiln --config.workingdir /srv
                 umoci gc --layout layout
                 (cd layout && tar cf ../kiln-test-busybox.tar .)
                 chmod 755 kiln-test-busybox.tar",
                bb = busybox.display()
            ),
            &dir,
        );
        dir
    })
}

/// Host binaries the commands need: mkfs.erofs (kiln builds the root file
/// system where it runs) and the image archive (on the PATH like a
/// binary: in the lab, /usr/local/bin).
fn extra() -> Vec<PathBuf> {
    let mkfs = [
        "/usr/bin/mkfs.erofs",
        "/usr/sbin/mkfs.erofs",
        "/sbin/mkfs.erofs",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("mkfs.erofs (erofs-utils; scripts/setup.sh installs it)");
    vec![mkfs, images().join("kiln-test-busybox.tar")]
}

const IMG: &str = "IMG=$(command -v kiln-test-busybox.tar); ";

fn cases() -> Vec<(&'static str, String)> {
    let t = "timeout 300";
    vec![
        ("cmd", format!("{IMG}{t} kiln run --image \"$IMG:latest\"")),
        (
            "override",
            format!(
                "{IMG}KILN_LOG=info {t} kiln run --image \"$IMG:latest\" -- sh -c \
                 'echo over $GREETING $HOME; echo written > /new; cat /new /etc/kiln-test; \
                  rm /etc/kiln-test && echo removed'"
            ),
        ),
        (
            "exit7",
            format!("{IMG}{t} kiln run --image \"$IMG:latest\" -- sh -c 'exit 7'"),
        ),
        (
            "missing",
            format!("{IMG}{t} kiln run --image \"$IMG:bare\" -- no-such-command"),
        ),
        (
            "stdin",
            format!(
                "{IMG}rm -f /tmp/iin /tmp/iout; mkfifo /tmp/iin; \
                 ({t} kiln run --image \"$IMG:latest\" -- sh -c 'read l; echo got-$l' \
                   </tmp/iin >/tmp/iout 2>&1; echo status=$? >>/tmp/iout) & \
                 exec 3>/tmp/iin; i=0; \
                 until grep -q KILN-INIT-READY /tmp/iout || [ $i -gt 1200 ]; do sleep 0.1; i=$((i+1)); done; \
                 printf 'typed\\n' >&3; exec 3>&-; wait; cat /tmp/iout; \
                 echo spec-files=$(ls /tmp | grep -c kiln-spec)"
            ),
        ),
    ]
}

static BATCH: Batch = Batch::with_binaries(cases, Duration::from_secs(1200), extra);

#[test]
fn the_image_command_runs_with_its_env_and_workdir() {
    let out = BATCH.get("cmd");
    assert_eq!(out.status, 0, "{}", out.output);
    assert_eq!(
        guest_lines(out),
        ["hello from kiln in /srv as 0"],
        "{}",
        out.output
    );
}

#[test]
fn a_command_after_dashes_replaces_cmd_on_a_writable_layer() {
    let out = BATCH.get("override");
    assert_eq!(out.status, 0, "{}", out.output);
    // (KILN_LOG=info: Kiln's own log lines may come in between.)
    let lines: Vec<String> = guest_lines(out)
        .into_iter()
        .filter(|l| !l.starts_with("[kiln "))
        .collect();
    assert_eq!(
        lines,
        ["over kiln /root", "written", "image-file", "removed"],
        "{}",
        out.output
    );
    // The root file system was built by the first case and reused here.
    assert!(out.output.contains(".erofs (cached)"), "{}", out.output);
}

#[test]
fn the_exit_status_passes_through() {
    let out = BATCH.get("exit7");
    assert_eq!(out.status, 7, "{}", out.output);
}

#[test]
fn a_command_not_found_exits_127() {
    let out = BATCH.get("missing");
    assert_eq!(out.status, 127, "{}", out.output);
    assert!(
        out.output
            .contains("no-such-command: executable file not found in $PATH"),
        "{}",
        out.output
    );
}

#[test]
fn stdin_reaches_the_process() {
    let out = BATCH.get("stdin");
    assert_eq!(out.status, 0, "{}", out.output);
    assert!(
        guest_lines(out).iter().any(|l| l == "got-typed"),
        "{}",
        out.output
    );
    assert!(out.output.contains("status=0\n"), "{}", out.output);
    // The spec disk went with the run.
    assert!(out.output.contains("spec-files=0\n"), "{}", out.output);
}

/// Runs `kiln run --image ARGS` here with a fresh cache and temp dir and
/// checks it fails with one line containing `want`, boots nothing and
/// leaves nothing behind.
fn fails_cleanly(name: &str, image: &str, command: &[&str], want: &str) {
    let base = work_dir().join(format!("bad-{name}"));
    let _ = std::fs::remove_dir_all(&base);
    let (cache, tmp) = (base.join("cache"), base.join("tmp"));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut args = vec!["run", "--image", image];
    if !command.is_empty() {
        args.push("--");
        args.extend(command);
    }
    let out = Command::new(common::kiln_bin())
        .args(&args)
        .env("KILN_CACHE_DIR", &cache)
        .env("TMPDIR", &tmp)
        .env("KILN_LAB", "0")
        .output()
        .expect("running kiln");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{name}: {stderr}");
    assert!(stderr.starts_with("kiln: "), "{name}: {stderr}");
    assert!(stderr.contains(want), "{name}: {stderr}");
    // No VM: nothing on stdout (no console), no lab.
    assert!(
        out.stdout.is_empty(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let left = |d: &Path| -> Vec<String> {
        walk(d)
            .into_iter()
            .map(|p| p.display().to_string())
            .collect()
    };
    assert_eq!(left(&tmp), Vec::<String>::new(), "{name}");
    let cached: Vec<String> = left(&cache);
    assert!(cached.is_empty(), "{name}: {cached:?}");
    std::fs::remove_dir_all(&base).unwrap();
}

/// Every file under `d` (none if it does not exist).
fn walk(d: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd {
            let p = e.unwrap().path();
            if p.is_dir() {
                v.extend(walk(&p));
            } else {
                v.push(p);
            }
        }
    }
    v
}

#[test]
fn bad_images_fail_with_one_line_before_any_vm() {
    let dir = images();
    let archive = std::fs::read(dir.join("kiln-test-busybox.tar")).unwrap();
    let cut = dir.join("cut.tar");
    std::fs::write(&cut, &archive[..archive.len() / 2]).unwrap();
    fails_cleanly(
        "truncated",
        cut.to_str().unwrap(),
        &[],
        "the archive is truncated",
    );
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not an image\n".repeat(100)).unwrap();
    fails_cleanly("text", text.to_str().unwrap(), &[], "not an OCI image");
    let img = dir.join("kiln-test-busybox.tar");
    fails_cleanly(
        "nocmd",
        &format!("{}:bare", img.display()),
        &[],
        "the image has no Entrypoint or Cmd; give the command after `--`",
    );
    fails_cleanly(
        "noname",
        &format!("{}:nope", img.display()),
        &[],
        "has no manifest named \"nope\"",
    );
    fails_cleanly(
        "twoimages",
        img.to_str().unwrap(),
        &["true"],
        "lists 2 manifests; choose one as PATH:NAME",
    );
}

/// The guest's last step with no VM: `kiln-agent oci-exec` (the guest
/// images' static build) on a spec from kiln-oci, chrooted into the image's
/// unpacked root. Needs root (chroot).
#[test]
fn the_agent_runs_the_spec_in_a_chroot() {
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata("/proc/self").map(|m| m.uid()).ok(),
        Some(0),
        "the suite runs as root (chroot needs it; see README)"
    );
    let root = images().join("bundle/rootfs");
    let agent = common::guest_images().agent;
    let run = |name: &str, args: &[&str], cwd: &str| -> (Option<i32>, String, Option<i32>) {
        let p = kiln_oci::Process {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec!["PATH=/bin".into(), "GREETING=hi there".into()],
            cwd: cwd.into(),
            uid: 0,
            gid: 0,
        };
        let spec = work_dir().join(format!("{name}.spec"));
        std::fs::write(&spec, p.to_spec_bytes().unwrap()).unwrap();
        let out = Command::new(&agent)
            .arg("oci-exec")
            .arg(&spec)
            .arg(&root)
            .output()
            .unwrap();
        let status = kiln_oci::spec::read_status(&spec).unwrap();
        std::fs::remove_file(&spec).unwrap();
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text, status)
    };
    let (code, text, status) = run(
        "env",
        &[
            "sh",
            "-c",
            "echo \"$GREETING\" $(pwd) $(cat /etc/kiln-test); exit 7",
        ],
        "/made/by/agent",
    );
    assert_eq!((code, status), (Some(7), Some(7)), "{text}");
    assert_eq!(text, "hi there /made/by/agent image-file\n");
    assert!(root.join("made/by/agent").is_dir());
    let (code, text, status) = run("missing", &["no-such-command"], "/");
    assert_eq!((code, status), (Some(127), Some(127)), "{text}");
    assert!(
        text.contains("no-such-command: executable file not found"),
        "{text}"
    );
    let (code, text, status) = run("noexec", &["/etc/kiln-test"], "/");
    assert_eq!((code, status), (Some(126), Some(126)), "{text}");
    let (code, _, status) = run("signal", &["sh", "-c", "kill -9 $$"], "/");
    assert_eq!((code, status), (Some(137), Some(137)));
}
