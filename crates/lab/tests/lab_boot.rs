//! Boots the lab once and runs several commands in that single boot.
//!
//! Needs `qemu-system-x86_64`, `apt-get`/`dpkg-deb` and network access on the
//! first run (images are cached afterwards).

use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use kiln_lab::{images, qemu_available, Lab, LabError};

/// Serializes QEMU boots: TCG runs on a 2-core host slow each other down.
static BOOT: Mutex<()> = Mutex::new(());

/// Returns the images (building them on first use).
fn setup() -> Option<images::Images> {
    assert!(
        qemu_available(),
        "qemu-system-x86_64 missing: install qemu-system-x86"
    );
    Some(images::ensure(&images::default_cache_dir()).expect("images"))
}

#[test]
fn lab_boots_and_runs_commands() {
    let Some(imgs) = setup() else { return };
    let _boot = BOOT.lock().unwrap_or_else(|e| e.into_inner());
    // A dynamically linked host binary exercises library copying.
    let env_bin = ["/usr/bin/env", "/bin/env"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("env binary");
    let note = std::env::temp_dir().join(format!("kiln-lab-note-{}", std::process::id()));
    std::fs::write(&note, "lab file ok\n").unwrap();
    let lab = Lab::new(imgs)
        .binary(env_bin)
        .file(&note, "/etc/kiln/note.txt")
        .timeout(Duration::from_secs(900));
    let cmds: Vec<String> = [
        "test -c /dev/kvm",
        "grep -c svm /proc/cpuinfo",
        "exit 3",
        "echo hello",
        "test -s /images/vmlinuz && test -s /images/initramfs.img",
        "/usr/local/bin/env true && echo env-ok",
        "cat /etc/kiln/note.txt",
        "echo to-stderr >&2; printf 'no newline'",
        "test -c /dev/net/tun && mount | grep -c cgroup2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let report = lab.run_report(&cmds).expect("lab run");
    std::fs::remove_file(&note).ok();
    eprintln!(
        "lab boot time: {:?}, total: {:?}",
        report.boot_time, report.total_time
    );
    let o = &report.outputs;
    assert_eq!(o.len(), cmds.len());
    for (c, r) in cmds.iter().zip(o) {
        assert_eq!(&r.command, c);
    }
    assert_eq!(o[0].status, 0, "/dev/kvm missing: {o:?}");
    assert_eq!(o[1].status, 0);
    assert!(
        o[1].output.trim().parse::<u32>().unwrap() >= 1,
        "{:?}",
        o[1]
    );
    assert_eq!(o[2].status, 3);
    assert_eq!(o[3].output, "hello\n");
    assert_eq!(o[3].status, 0);
    assert_eq!(o[4].status, 0);
    assert_eq!((o[5].status, o[5].output.as_str()), (0, "env-ok\n"));
    assert_eq!(o[6].output, "lab file ok\n");
    assert_eq!(o[7].output, "to-stderr\nno newline");
    assert_eq!(o[8].status, 0, "{:?}", o[8]);
    assert!(report.boot_time.is_some());
}

#[test]
fn lab_death_is_an_error_not_a_result() {
    let Some(imgs) = setup() else { return };
    let _boot = BOOT.lock().unwrap_or_else(|e| e.into_inner());
    let cmds: Vec<String> = ["echo a", "poweroff -f", "echo never"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let err = Lab::new(imgs)
        .timeout(Duration::from_secs(600))
        .run(&cmds)
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, LabError::Incomplete { .. }), "{msg}");
    assert!(msg.contains("1/3 commands finished"), "{msg}");
    assert!(msg.contains("`poweroff -f` was running"), "{msg}");
}

#[test]
fn lab_timeout_kills_qemu() {
    let Some(imgs) = setup() else { return };
    let _boot = BOOT.lock().unwrap_or_else(|e| e.into_inner());
    let err = Lab::new(imgs)
        .timeout(Duration::from_secs(1))
        .run_one("sleep 60")
        .unwrap_err();
    assert!(matches!(err, LabError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("never became ready"), "{err}");
}

/// The direct TCG boots below run the guest's clocks on executed
/// instructions (`-icount`), not on the host's wall clock: on a loaded host
/// the kernel's PIT calibration of the TSC failed ("Unable to calibrate
/// against PIT", then "could not calculate TSC khz") and the boot hung in
/// the next calibration for good (10 minutes without a line). With icount
/// the guest sees the same machine however busy the host is, and
/// `sleep=off` lets it skip its idle waits (the 5 s root-device wait).
const ICOUNT: [&str; 2] = ["-icount", "shift=0,sleep=off"];

/// Boots the guest initramfs directly under QEMU/TCG (no KVM, no VMM) to
/// check the guest /init protocol: ready marker, "$@" command, exit marker.
#[test]
fn guest_initramfs_protocol() {
    let Some(imgs) = setup() else { return };
    let _boot = BOOT.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("qemu-system-x86_64")
        .args(["-M", "q35", "-accel", "tcg", "-cpu", "EPYC", "-m", "512"])
        .args(ICOUNT)
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-no-reboot", "-kernel"])
        .arg(&imgs.kernel)
        .arg("-initrd")
        .arg(&imgs.initramfs)
        .args([
            "-append",
            "console=ttyS0 reboot=k panic=-1 quiet -- echo guest-says-hi; test -e /sys/module/virtio_mmio && exit 7",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("qemu");
    let console = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let lines: Vec<&str> = console.lines().collect();
    let ready = lines.iter().position(|l| *l == "KILN-INIT-READY");
    let ready = ready.unwrap_or_else(|| panic!("no ready marker:\n{console}"));
    assert_eq!(lines[ready + 1], "guest-says-hi", "{console}");
    assert_eq!(lines[ready + 2], "KILN-EXIT=7", "{console}");
}

/// Boots the guest initramfs directly under QEMU/TCG on the `microvm`
/// machine (virtio-mmio declared in ACPI, as with Kiln) with the guest rootfs
/// as a virtio-blk disk (writes go to a throw-away overlay), and returns the
/// console with `\r` removed. `microvm` has no i8042, so the guest reboots by
/// triple fault (`reboot=t`), which `-no-reboot` turns into QEMU exiting;
/// QEMU is killed after 600 s in any case (a loaded machine runs TCG
/// several times slower).
fn boot_guest_with_rootfs(imgs: &images::Images, cmdline: &str) -> String {
    // An emulated machine on a loaded host can stall; one stall (a boot that
    // that has not ended after 600 s) is retried, a wrong result never is.
    match try_boot_guest_with_rootfs(imgs, cmdline) {
        Ok(c) => c,
        Err(first) => {
            eprintln!("warning: {first}; retrying once");
            try_boot_guest_with_rootfs(imgs, cmdline)
                .unwrap_or_else(|e| panic!("{e} (first: {first})"))
        }
    }
}

fn try_boot_guest_with_rootfs(imgs: &images::Images, cmdline: &str) -> Result<String, String> {
    use std::io::Read;
    let start = std::time::Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=on", "-accel", "tcg", "-cpu", "EPYC"])
        .args(ICOUNT)
        .args(["-m", "256", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&imgs.kernel)
        .arg("-initrd")
        .arg(&imgs.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 reboot=t panic=-1 quiet lapic=notscdeadline {cmdline}"
        ))
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=raw,snapshot=on",
            imgs.rootfs.display()
        ))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(600) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let console = String::from_utf8_lossy(&reader.join().unwrap()).replace('\r', "");
    eprintln!("guest boot ({cmdline}): {:?}", start.elapsed());
    match status {
        Some(s) if s.success() => Ok(console),
        Some(s) => panic!("qemu {s}:\n{console}"),
        None => Err(format!("qemu timed out:\n{console}")),
    }
}

/// `root=/dev/vda`: the initramfs switches to the rootfs, whose /init runs
/// the command (once), and the rootfs is writable (`ro` makes it read-only).
#[test]
fn guest_switches_to_rootfs_on_virtio_blk() {
    let Some(imgs) = setup() else { return };
    let size = std::fs::metadata(&imgs.rootfs).expect("rootfs").len();
    assert_eq!(size, images::ROOTFS_SIZE);
    assert_eq!(size % 512, 0);
    let _boot = BOOT.lock().unwrap_or_else(|e| e.into_inner());
    let console = boot_guest_with_rootfs(
        &imgs,
        "root=/dev/vda -- cat /etc/kiln-rootfs-marker; test -e /etc/kiln-initramfs && echo in-initramfs; \
         grep -c '^/dev/vda / ext4 rw' /proc/mounts; echo data >/written && cat /written; exit 5",
    );
    let lines: Vec<&str> = console.lines().collect();
    let ready: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i] == "KILN-INIT-READY")
        .collect();
    assert_eq!(ready.len(), 1, "ready marker not exactly once:\n{console}");
    let r = ready[0];
    assert_eq!(
        lines[r + 1..r + 5],
        ["kiln guest rootfs", "1", "data", "KILN-EXIT=5"],
        "{console}"
    );
    assert!(!console.contains("KILN-ROOT-ERROR"), "{console}");
}

/// `root=` naming a device that never appears: a clear error, then reboot.
#[test]
fn guest_reports_missing_root_device() {
    let Some(imgs) = setup() else { return };
    let _boot = BOOT.lock().unwrap_or_else(|e| e.into_inner());
    let console = boot_guest_with_rootfs(&imgs, "root=/dev/vdz ro -- echo never");
    assert!(
        console
            .lines()
            .any(|l| l == "KILN-ROOT-ERROR: /dev/vdz did not appear within 5 s"),
        "{console}"
    );
    assert!(!console.contains("KILN-INIT-READY"), "{console}");
    assert!(!console.contains("never"), "{console}");
}
