//! A jailed VMM boots a guest (lab; one boot): `kiln jailer` starts
//! `kiln vmm` as uid/gid 1234 in a chroot with memory.max and pids.max set;
//! the host copies the kernel and initrd into the chroot, configures the VM
//! over the API socket and starts it; the guest's console shows it ran;
//! `kiln jailer --cleanup` then removes the jail.

mod common;

use std::time::Duration;

use common::{section, Batch};

fn cases() -> Vec<(&'static str, String)> {
    let cmdline = kiln_vmm::DEFAULT_CMDLINE;
    let api = "kiln api --sock $R/api.sock";
    vec![(
        "jailed_boot",
        format!(
            "grep -q ' cgroup2 ' /proc/self/mounts || {{ mkdir -p /sys/fs/cgroup; mount -t cgroup2 none /sys/fs/cgroup; }}; \
             CG=$(awk '$3 == \"cgroup2\" {{ print $2; exit }}' /proc/self/mounts); \
             K=$(command -v kiln); B=/tmp/jails; rm -rf $B; mkdir -p $B; chmod 755 $B; \
             R=$B/kiln/jboot/root; \
             (timeout 400 kiln jailer --id jboot --exec-file $K --uid 1234 --gid 1234 --chroot-base-dir $B \
                --cgroup memory.max=1073741824 --cgroup pids.max=100 \
                -- vmm --api-sock /api.sock > /tmp/jb.log 2>&1; echo jailer-status=$? >> /tmp/jb.log) & \
             i=0; until [ -S $R/api.sock ] || [ $i -gt 300 ]; do sleep 0.1; i=$((i+1)); done; \
             cp $KILN_KERNEL $R/vmlinuz; cp $KILN_INITRD $R/initrd; chown 1234:1234 $R/vmlinuz $R/initrd; \
             echo '== boot-source'; {api} PUT /boot-source \
               \"{{\\\"kernel_image_path\\\":\\\"/vmlinuz\\\",\\\"initrd_path\\\":\\\"/initrd\\\",\\\"boot_args\\\":\\\"{cmdline} -- echo jailed-guest-ran; id -u; sleep 3\\\"}}\"; \
             echo '== machine-config'; {api} PUT /machine-config '{{\"vcpu_count\":1,\"mem_size_mib\":128}}'; \
             echo '== start'; {api} PUT /actions '{{\"action_type\":\"InstanceStart\"}}'; \
             P=$(cat $R/kiln.pid); \
             echo '== proc'; grep -E '^(Uid|Gid|CapEff):' /proc/$P/status; grep '^0::' /proc/$P/cgroup; \
             echo \"memory.max=$(cat $CG/kiln/jboot/memory.max)\"; echo \"pids.max=$(cat $CG/kiln/jboot/pids.max)\"; \
             echo \"root=$(ls /proc/$P/root | tr '\\n' ' ')\"; \
             wait; echo '== log'; cat /tmp/jb.log; \
             echo '== cleanup'; kiln jailer --cleanup --id jboot --exec-file $K --chroot-base-dir $B; echo cleanup-status=$?; \
             test -e $B/kiln/jboot && echo chroot-left-behind; test -e $CG/kiln/jboot && echo cgroup-left-behind; true"
        ),
    )]
}

static BATCH: Batch = Batch::new(cases, Duration::from_secs(900));

#[test]
fn jailed_vmm_boots_a_guest_unprivileged() {
    let out = BATCH.get("jailed_boot");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    for s in ["boot-source", "machine-config", "start"] {
        assert!(section(&o, s).starts_with("HTTP/1.1 204 "), "{s}: {o}");
    }
    let proc_ = section(&o, "proc");
    assert!(proc_.contains("Uid:\t1234\t1234\t1234\t1234"), "{o}");
    assert!(proc_.contains("Gid:\t1234\t1234\t1234\t1234"), "{o}");
    assert!(proc_.contains("CapEff:\t0000000000000000"), "{o}");
    assert!(proc_.lines().any(|l| l == "0::/kiln/jboot"), "{o}");
    assert!(proc_.contains("memory.max=1073741824"), "{o}");
    assert!(proc_.contains("pids.max=100"), "{o}");
    let root = proc_
        .lines()
        .find_map(|l| l.strip_prefix("root="))
        .unwrap_or_else(|| panic!("{o}"));
    for e in ["kiln", "dev", "api.sock", "vmlinuz", "initrd"] {
        assert!(
            root.split_whitespace().any(|x| x == e),
            "no {e} in the jail: {root}"
        );
    }
    for host in ["etc", "proc", "tmp", "images", "bin"] {
        assert!(
            !root.split_whitespace().any(|x| x == host),
            "host /{host} in the jail: {root}"
        );
    }
    let log = section(&o, "log");
    assert!(
        log.lines().any(|l| l.trim() == "jailed-guest-ran"),
        "the guest did not run its command: {o}"
    );
    assert!(log.contains("jailer-status=0"), "{o}");
    let cleanup = section(&o, "cleanup");
    assert!(cleanup.contains("cleanup-status=0"), "{o}");
    assert!(!o.contains("left-behind"), "{o}");
}
