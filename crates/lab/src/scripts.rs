//! Shell scripts baked into the initramfs images and generated per lab run.
//!
//! All scripts run under busybox `sh` (ash). They are part of the image cache
//! stamp, so editing them here triggers a rebuild of the cached images.

/// Line the guest `/init` prints once modules are loaded and the boot timer
/// has been written.
pub const GUEST_READY_MARKER: &str = "KILN-INIT-READY";
/// Prefix of the line the guest `/init` prints after running its command.
pub const GUEST_EXIT_PREFIX: &str = "KILN-EXIT=";
/// Line the lab host prints on its console right before it runs `/lab/run.sh`.
pub const LAB_READY_MARKER: &str = "KILN-LAB-READY";
/// Prefix of lab-host error lines on the console.
pub const LAB_ERROR_PREFIX: &str = "KILN-LAB-ERROR:";
/// Prefix of the line the guest initramfs `/init` prints when `root=` is
/// given but the root filesystem cannot be mounted (it then reboots).
pub const GUEST_ROOT_ERROR_PREFIX: &str = "KILN-ROOT-ERROR:";
/// File present only in the guest initramfs: its `/init` switches to the
/// `root=` device, the rootfs's `/init` (the same script) does not.
pub const INITRAMFS_MARKER_FILE: &str = "etc/kiln-initramfs";
/// File present only in the guest rootfs image (see [`ROOTFS_MARKER_TEXT`]).
pub const ROOTFS_MARKER_FILE: &str = "etc/kiln-rootfs-marker";
/// Contents of [`ROOTFS_MARKER_FILE`].
pub const ROOTFS_MARKER_TEXT: &str = "kiln guest rootfs\n";
/// How long the initramfs waits for the `root=` device, in 0.1 s polls.
pub const ROOT_WAIT_POLLS: u32 = 50;

/// Shell functions of the guest `/init` for `root=` handling. They only use
/// POSIX shell, so the unit tests run them under the host's `sh`.
///
/// * `k_cmdline WORD...` parses kernel parameters (stopping at `--`, after
///   which come the init's arguments) into `K_ROOT` (the `root=` device, empty
///   if none), `K_FSTYPE` (`rootfstype=`, default `ext4`) and `K_MODE`
///   (`ro` if `ro` is given, else `rw`; the last of `ro`/`rw` wins), and
///   for container images `K_IMAGE` (`kiln.image=`, the erofs root file
///   system's device) and `K_SPEC` (`kiln.spec=`, the process spec disk).
/// * `k_wait_dev DEV POLLS` waits up to POLLS × 0.1 s for the block device
///   DEV to appear (virtio probing is asynchronous); fails if it does not.
/// * `k_root_fail WHY` prints `KILN-ROOT-ERROR: WHY` and reboots.
/// * `k_image_root` (container images, see [`IMAGE_ROOT`]) loads
///   [`CONTAINER_MODULES`], waits for `K_IMAGE` and `K_SPEC`, mounts the
///   image read-only (erofs) with a tmpfs-backed overlay on it at
///   [`IMAGE_ROOT`], with `/proc`, `/sys` and `/dev` inside, or fails like
///   `k_switch_root`.
/// * `k_switch_root ARGS...` mounts `K_ROOT` on `/newroot`, unmounts `/proc`,
///   `/sys` and `/dev` and `exec`s `switch_root /newroot /init ARGS...`.
pub const ROOT_FUNCTIONS: &str = r#"k_cmdline() {
    K_ROOT= K_FSTYPE=ext4 K_MODE=rw K_IMAGE= K_SPEC=
    for w in "$@"; do
        case "$w" in
            --) break ;;
            kiln.image=*) K_IMAGE=${w#kiln.image=} ;;
            kiln.spec=*) K_SPEC=${w#kiln.spec=} ;;
            root=*) K_ROOT=${w#root=} ;;
            rootfstype=*) K_FSTYPE=${w#rootfstype=} ;;
            ro) K_MODE=ro ;;
            rw) K_MODE=rw ;;
        esac
    done
}
k_wait_dev() {
    k_n=0
    while [ ! -b "$1" ]; do
        [ "$k_n" -ge "$2" ] && return 1
        sleep 0.1
        k_n=$((k_n + 1))
    done
    return 0
}
k_root_fail() {
    echo "KILN-ROOT-ERROR: $1"
    sync
    reboot -f
    while :; do sleep 1; done
}
k_image_root() {
    for m in $K_IMAGE_MODULES; do
        [ -f "$M/$m" ] && insmod "$M/$m" >/dev/null 2>&1
    done
    for d in "$K_IMAGE" "$K_SPEC"; do
        k_wait_dev "$d" "$K_POLLS" ||
            k_root_fail "$d did not appear within $((K_POLLS / 10)) s"
    done
    mkdir -p /ctr/lower /ctr/rw /ctr/root
    mount -t erofs -o ro "$K_IMAGE" /ctr/lower ||
        k_root_fail "cannot mount the image $K_IMAGE (erofs) on /ctr/lower"
    { mount -t tmpfs -o mode=0755 tmpfs /ctr/rw &&
        mkdir /ctr/rw/upper /ctr/rw/work &&
        mount -t overlay overlay \
            -o lowerdir=/ctr/lower,upperdir=/ctr/rw/upper,workdir=/ctr/rw/work /ctr/root; } ||
        k_root_fail "cannot stack a writable overlay on the image"
    mkdir -p /ctr/root/proc /ctr/root/sys /ctr/root/dev &&
        mount -t proc proc /ctr/root/proc &&
        mount -t sysfs sysfs /ctr/root/sys &&
        mount -t devtmpfs devtmpfs /ctr/root/dev ||
        k_root_fail "cannot mount /proc, /sys and /dev in the image"
}
k_switch_root() {
    case "$K_ROOT" in
        /dev/*) ;;
        *) k_root_fail "root=$K_ROOT is not supported (only /dev/... paths)" ;;
    esac
    k_wait_dev "$K_ROOT" "$K_POLLS" ||
        k_root_fail "$K_ROOT did not appear within $((K_POLLS / 10)) s"
    mkdir -p /newroot
    mount -t "$K_FSTYPE" -o "$K_MODE" "$K_ROOT" /newroot ||
        k_root_fail "cannot mount $K_ROOT ($K_FSTYPE, $K_MODE) on /newroot"
    if [ ! -x /newroot/init ]; then
        umount /newroot
        k_root_fail "no executable /init on $K_ROOT"
    fi
    umount /sys
    umount /dev || umount -l /dev
    umount /proc
    exec switch_root /newroot /init "$@"
}
"#;

/// Guest modules, in load order, relative to `/lib/modules/<version>/`.
pub const GUEST_MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/drivers/char/hw_random/virtio-rng.ko",
    "kernel/drivers/virtio/virtio_balloon.ko",
    "kernel/net/vmw_vsock/vsock.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
    "kernel/drivers/misc/pvpanic/pvpanic.ko",
    "kernel/drivers/misc/pvpanic/pvpanic-mmio.ko",
];

/// Modules for container images (erofs lower layer, overlay on it), in load
/// order: in the guest initramfs, loaded only when a container image is run.
pub const CONTAINER_MODULES: &[&str] = &[
    "kernel/lib/libcrc32c.ko",
    "kernel/fs/erofs/erofs.ko",
    "kernel/fs/overlayfs/overlay.ko",
];

/// Where the guest init stacks a container image's root file system.
pub const IMAGE_ROOT: &str = "/ctr/root";

/// Lab-host modules, in load order, relative to `/lib/modules/<version>/`.
pub const LAB_MODULES: &[&str] = &[
    "kernel/virt/lib/irqbypass.ko",
    "kernel/arch/x86/kvm/kvm.ko",
    "kernel/arch/x86/kvm/kvm-amd.ko",
    "kernel/drivers/net/tun.ko",
];

/// Quotes `s` for a POSIX shell as a single-quoted word.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `/init` of the guest initramfs and of the guest rootfs (the L2 guest
/// booted by the Kiln VMM).
///
/// Protocol: mount `/proc`, `/sys`, `/dev`; load [`GUEST_MODULES`] (already
/// loaded ones fail quietly). Then, only in the initramfs (it has
/// [`INITRAMFS_MARKER_FILE`]) and only if the kernel command line has
/// `root=/dev/...`: wait for the device, mount it (`rootfstype=`, default
/// ext4; read-only with `ro`), and `switch_root` to its `/init` with the same
/// arguments, or print [`GUEST_ROOT_ERROR_PREFIX`]` <why>` and reboot. The
/// init that runs the command (exactly one per boot) writes the boot timer,
/// prints [`GUEST_READY_MARKER`], runs `"$*"` with `sh -c` (or a shell if
/// there are no arguments), prints [`GUEST_EXIT_PREFIX`]`<status>`, `sync`s
/// and reboots.
pub fn guest_init(kernel_version: &str) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
# Kiln guest init (generated by kiln-lab).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
"#,
    );
    s.push_str(&format!("M=/lib/modules/{kernel_version}\n"));
    s.push_str("for m in");
    for m in GUEST_MODULES {
        s.push_str(" \\\n    ");
        s.push_str(m);
    }
    s.push_str(
        r#"; do
    [ -f "$M/$m" ] && insmod "$M/$m" >/dev/null 2>&1
done
"#,
    );
    s.push_str("K_IMAGE_MODULES=\"");
    s.push_str(&CONTAINER_MODULES.join(" "));
    s.push_str("\"\n");
    s.push_str(ROOT_FUNCTIONS);
    s.push_str(&format!(
        "K_POLLS={ROOT_WAIT_POLLS}\nK_IMAGE=\nif [ -e /{INITRAMFS_MARKER_FILE} ]; then\n"
    ));
    s.push_str(
        r#"    read -r K_CMDLINE </proc/cmdline
    set -f
    # shellcheck disable=SC2086
    k_cmdline $K_CMDLINE
    set +f
    [ -n "$K_ROOT" ] && k_switch_root "$@"
fi
# Boot-timer write: the VMM timestamps this MMIO access.
devmem 0xd0000000 8 123 >/dev/null 2>&1
[ -n "$K_IMAGE" ] && k_image_root
echo KILN-INIT-READY
if [ -n "$K_IMAGE" ]; then
    kiln-agent oci-exec "$K_SPEC" /ctr/root
    echo "KILN-EXIT=$?"
elif [ $# -gt 0 ]; then
    sh -c "$*"
    echo "KILN-EXIT=$?"
else
    setsid cttyhack sh
fi
sync
reboot -f
# reboot -f should not return; never let PID 1 exit.
while :; do sleep 1; done
"#,
    );
    s
}

/// `/init` of the lab host: copies the initramfs into a tmpfs and
/// `switch_root`s there, so that `pivot_root(2)` (used by jailers) works.
pub const LAB_INIT_STAGE1: &str = r#"#!/bin/busybox sh
# Kiln lab init, stage 1 (generated by kiln-lab).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /newroot
mount -t tmpfs -o mode=0755 tmpfs /newroot
for e in /* ; do
    case "$e" in
        /newroot|/proc|/sys|/dev) ;;
        *) cp -a "$e" /newroot/ ;;
    esac
done
mkdir -p /newroot/proc /newroot/sys /newroot/dev
exec switch_root /newroot /kiln/lab-init
"#;

/// Stage 2 of the lab host init (runs in the tmpfs root).
pub fn lab_init_stage2(kernel_version: &str) -> String {
    let mut s = String::from(
        r#"#!/bin/sh
# Kiln lab init, stage 2 (generated by kiln-lab).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The kernel's console is ttyS2 (its log, a file on the host); what the lab
# and its commands print goes to ttyS0.
exec </dev/ttyS0 >/dev/ttyS0 2>&1
mkdir -p /sys/fs/cgroup /tmp /run
mount -t cgroup2 none /sys/fs/cgroup
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
dmesg -n 7
"#,
    );
    s.push_str(&format!("M=/lib/modules/{kernel_version}\n"));
    s.push_str("for m in");
    for m in LAB_MODULES {
        s.push_str(" \\\n    ");
        s.push_str(m);
    }
    s.push_str(
        r#"; do
    # kvm-amd without nested paging (npt=0: KVM shadows the guests' page
    # tables): QEMU's TCG emulation of nested paging now and then resumes
    # the lab kernel after a #VMEXIT with a page fault on the instruction
    # right after VMRUN, while the guest's GS base is still loaded; the
    # fault handler faults again on its per-CPU data and the lab kernel
    # dies ("stack guard page was hit"), or the whole lab freezes. Snapshot
    # restores (copy-on-write faults on file-backed guest memory) hit it
    # within a minute; see docs/design.md, "The lab".
    case "$m" in
        */kvm-amd.ko) p=npt=0 ;;
        *) p= ;;
    esac
    insmod "$M/$m" $p || echo "KILN-LAB-ERROR: insmod $m failed"
done
[ -c /dev/kvm ] || echo "KILN-LAB-ERROR: /dev/kvm missing"
# One idle KVM VM for the lab's whole life, so that the lab kernel never
# goes from no VM to one VM or back: each such step flips static keys in
# the scheduler and in KVM, the kernel patches its own code with a
# temporary int3, and QEMU's multi-threaded TCG sometimes leaves the other
# CPU running a stale translation of that int3 for ever (both lab CPUs then
# loop in the int3 handler with interrupts off; see docs/design.md).
kiln-agent kvm-hold >/tmp/.kvm-hold 2>&1 &
i=0
until grep -q holding /tmp/.kvm-hold 2>/dev/null; do
    i=$((i+1))
    if [ $i -gt 100 ] || ! kill -0 $! 2>/dev/null; then
        echo "KILN-LAB-ERROR: kiln-agent kvm-hold: $(cat /tmp/.kvm-hold)"
        break
    fi
    sleep 0.1
done
stty -F /dev/ttyS1 raw -echo 2>/dev/null || echo "KILN-LAB-ERROR: no /dev/ttyS1"
cd /
echo KILN-LAB-READY
if [ -f /lab/run.sh ]; then
    sh /lab/run.sh
else
    echo "KILN-LAB-ERROR: /lab/run.sh missing"
fi
sync
poweroff -f
while :; do sleep 1; done
"#,
    );
    s
}

/// Shell function used by `/lab/run.sh` to run one framed command.
///
/// Protocol on the results channel (`/dev/ttyS1`, raw mode, fd 3):
/// `KILN-CMD-BEGIN <i>\n`, `KILN-CMD-ALIVE <i> <secs>\n` every minute while the
/// command runs, then `KILN-CMD-OUT <i> <len>\n` followed by exactly
/// `<len>` bytes of combined stdout+stderr, then `\nKILN-CMD-END <i> <status>\n`.
/// After all commands: `KILN-RUN-DONE\n`.
const RUN_PRELUDE: &str = r#"#!/bin/sh
# Per-run script (generated by kiln-lab).
exec 3>/dev/ttyS1
printf 'KILN-RUN-START\n' >&3
k_run() {
    o=/tmp/.kiln-out.$1
    printf 'KILN-CMD-BEGIN %d\n' "$1" >&3
    : >"$o"
    # While a command runs, a heartbeat on the results channel tells the
    # host the lab is alive (a frozen lab stops it: see DEFAULT_STALL), and
    # the console shows what the command has printed so far and which
    # processes run (the host shows that tail if the run fails).
    (t=0; while sleep 60; do t=$((t+60)); printf 'KILN-CMD-ALIVE %d %d\n' "$1" $t >&3; {
        printf '\nKILN-LAB-SLOW: command %d still running after %d s; output so far (tail):\n' "$1" $t
        tail -c 1500 "$o"
        printf '\n--- processes ---\n'
        ps -o pid,stat,args 2>/dev/null | grep -v ' \[' | tail -n 25
    } >/dev/ttyS0 2>&1; done) &
    w=$!
    (cd / && sh -c "$2") >"$o" 2>&1 </dev/null
    s=$?
    kill $w 2>/dev/null; wait $w 2>/dev/null
    n=$(wc -c <"$o")
    printf 'KILN-CMD-OUT %d %d\n' "$1" $n >&3
    cat "$o" >&3
    printf '\nKILN-CMD-END %d %d\n' "$1" "$s" >&3
    rm -f "$o"
}
"#;

/// `/lab/run.sh` running each command with captured output.
pub fn run_script(commands: &[String]) -> String {
    let mut s = String::from(RUN_PRELUDE);
    for (i, c) in commands.iter().enumerate() {
        s.push_str(&format!("k_run {i} {}\n", shell_quote(c)));
    }
    s.push_str("printf 'KILN-RUN-DONE\\n' >&3\n");
    s
}

/// `/lab/run.sh` running one command with its output on the lab console.
pub fn interactive_script(command: &str) -> String {
    format!(
        r#"#!/bin/sh
# Per-run interactive script (generated by kiln-lab).
exec 3>/dev/ttyS1
printf 'KILN-RUN-START\nKILN-CMD-BEGIN 0\n' >&3
(cd / && sh -c {cmd})
s=$?
printf 'KILN-CMD-OUT 0 0\n\nKILN-CMD-END 0 %d\nKILN-RUN-DONE\n' "$s" >&3
"#,
        cmd = shell_quote(command)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn quoting_round_trips_through_sh() {
        let tricky = r#"it's "quoted" $HOME `x` \n"#;
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(tricky)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), tricky);
    }

    /// Runs `body` under the host's `sh` after [`ROOT_FUNCTIONS`], with
    /// `reboot`, `sync` and `mount` shadowed so nothing touches the host.
    fn sh_with_root_functions(body: &str) -> (String, i32) {
        let script = format!(
            "reboot() {{ echo REBOOT; exit 9; }}\nsync() {{ :; }}\nmount() {{ echo MOUNT; exit 8; }}\n{ROOT_FUNCTIONS}\n{body}"
        );
        let out = Command::new("sh").arg("-c").arg(script).output().unwrap();
        (
            String::from_utf8(out.stdout).unwrap(),
            out.status.code().unwrap_or(-1),
        )
    }

    #[test]
    fn cmdline_parsing() {
        let parse = |cmdline: &str| {
            let body = format!(
                "c={}\nset -f\nk_cmdline $c\nset +f\nprintf '%s|%s|%s' \"$K_ROOT\" \"$K_FSTYPE\" \"$K_MODE\"",
                shell_quote(cmdline)
            );
            let (out, rc) = sh_with_root_functions(&body);
            assert_eq!(rc, 0, "{cmdline}: {out}");
            out
        };
        assert_eq!(parse("console=ttyS0 quiet"), "|ext4|rw");
        assert_eq!(parse("quiet root=/dev/vda panic=-1"), "/dev/vda|ext4|rw");
        assert_eq!(parse("root=/dev/vda ro"), "/dev/vda|ext4|ro");
        assert_eq!(
            parse("ro root=/dev/vdb rootfstype=ext2 rw"),
            "/dev/vdb|ext2|rw"
        );
        // Words after `--` are the init's arguments, not kernel parameters.
        assert_eq!(
            parse("root=/dev/vda -- echo root=/dev/vdb ro"),
            "/dev/vda|ext4|rw"
        );
        assert_eq!(parse("-- root=/dev/vda"), "|ext4|rw");
        // No globbing of kernel parameters.
        assert_eq!(parse("* root=/dev/vd? /*"), "/dev/vd?|ext4|rw");
        let image = |cmdline: &str| {
            let body = format!(
                "K_IMAGE=stale\nc={}\nset -f\nk_cmdline $c\nset +f\nprintf '%s|%s' \"$K_IMAGE\" \"$K_SPEC\"",
                shell_quote(cmdline)
            );
            sh_with_root_functions(&body).0
        };
        assert_eq!(image("quiet"), "|");
        assert_eq!(
            image("quiet kiln.image=/dev/vda kiln.spec=/dev/vdb"),
            "/dev/vda|/dev/vdb"
        );
        assert_eq!(image("-- kiln.image=/dev/vda"), "|");
    }

    #[test]
    fn image_root_errors_are_reported_then_reboot() {
        let (out, rc) = sh_with_root_functions(
            "K_POLLS=1\nM=/nonexistent\nK_IMAGE_MODULES=x.ko\nk_cmdline kiln.image=/dev/kiln-no-such-disk kiln.spec=/dev/kiln-no-spec\nk_image_root",
        );
        assert_eq!(
            out,
            "KILN-ROOT-ERROR: /dev/kiln-no-such-disk did not appear within 0 s\nREBOOT\n"
        );
        assert_eq!(rc, 9);
    }

    #[test]
    fn device_wait_gives_up() {
        let t = std::time::Instant::now();
        let (out, rc) =
            sh_with_root_functions("k_wait_dev /dev/kiln-no-such-disk 2 && echo yes || echo no");
        assert_eq!((out.as_str(), rc), ("no\n", 0));
        assert!(t.elapsed() >= std::time::Duration::from_millis(200));
        // A block device that exists is found without polling (if the host has one).
        let dev = std::fs::read_dir("/dev").unwrap().find_map(|e| {
            use std::os::unix::fs::FileTypeExt;
            let e = e.ok()?;
            e.file_type().ok()?.is_block_device().then(|| e.path())
        });
        if let Some(dev) = dev {
            let (out, _) = sh_with_root_functions(&format!(
                "k_wait_dev {} 0 && echo yes",
                shell_quote(&dev.to_string_lossy())
            ));
            assert_eq!(out, "yes\n", "{}", dev.display());
        }
    }

    #[test]
    fn root_errors_are_reported_then_reboot() {
        let (out, rc) = sh_with_root_functions(
            "K_POLLS=1\nk_cmdline root=/dev/kiln-no-such-disk\nk_switch_root echo hi",
        );
        assert_eq!(
            out,
            "KILN-ROOT-ERROR: /dev/kiln-no-such-disk did not appear within 0 s\nREBOOT\n"
        );
        assert_eq!(rc, 9);
        let (out, _) =
            sh_with_root_functions("K_POLLS=1\nk_cmdline root=LABEL=x\nk_switch_root echo hi");
        assert!(
            out.starts_with("KILN-ROOT-ERROR: root=LABEL=x is not supported"),
            "{out}"
        );
        assert!(out.ends_with("REBOOT\n"), "{out}");
    }

    #[test]
    fn guest_init_is_valid_shell() {
        let g = guest_init("6.1.0-test");
        let out = Command::new("sh")
            .arg("-n")
            .arg("-c")
            .arg(&g)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Only the initramfs switches root, and only before the ready marker.
        let switch = g.find("k_switch_root \"$@\"").unwrap();
        assert!(g[..switch].contains(&format!("[ -e /{INITRAMFS_MARKER_FILE} ]")));
        assert!(switch < g.find(GUEST_READY_MARKER).unwrap());
        assert_eq!(g.matches(GUEST_READY_MARKER).count(), 1);
        assert!(g.contains("sync\nreboot -f\n"));
        assert!(g.contains(&format!("K_POLLS={ROOT_WAIT_POLLS}\n")));
        // A container image is mounted before the ready marker, and its
        // process runs instead of the command line's.
        let image = g.find("[ -n \"$K_IMAGE\" ] && k_image_root").unwrap();
        assert!(image < g.find(GUEST_READY_MARKER).unwrap());
        assert!(g.contains(&format!("kiln-agent oci-exec \"$K_SPEC\" {IMAGE_ROOT}\n")));
        for m in CONTAINER_MODULES {
            assert!(g.contains(m), "{m}");
        }
    }

    #[test]
    fn scripts_mention_markers() {
        let g = guest_init("6.1.0-test");
        assert!(g.contains(GUEST_READY_MARKER));
        assert!(g.contains(GUEST_EXIT_PREFIX));
        assert!(g.contains("/lib/modules/6.1.0-test"));
        assert!(lab_init_stage2("v").contains(LAB_READY_MARKER));
        assert!(lab_init_stage2("v").contains(LAB_ERROR_PREFIX));
        let r = run_script(&["echo a".into(), "exit 3".into()]);
        assert!(r.contains("k_run 1 'exit 3'"));
    }
}
