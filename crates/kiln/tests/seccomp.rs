//! Seccomp: every thread of a running VMM has a filter (lab boot with
//! every device kind and the API server), and each thread kind's
//! production filter stops what it must (`kiln seccomp-probe`, native: no
//! KVM needed to install a filter). Bad filter files fail with one line.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::time::Duration;

use common::{kiln_bin, section, Batch};

const SIGSYS: i32 = libc::SIGSYS;

/// `kiln seccomp-probe KIND NR ARGS...` (natively).
fn probe(kind: &str, nr: i64, args: &[&str]) -> Output {
    probe_with(&[], kind, nr, args)
}

fn probe_with(flags: &[&str], kind: &str, nr: i64, args: &[&str]) -> Output {
    Command::new(kiln_bin())
        .arg("seccomp-probe")
        .args(flags)
        .arg(kind)
        .arg(nr.to_string())
        .args(args)
        .env_remove("KILN_SECCOMP")
        .output()
        .expect("running kiln seccomp-probe")
}

fn assert_killed(kind: &str, nr: i64, args: &[&str]) {
    let out = probe(kind, nr, args);
    assert_eq!(
        out.status.signal(),
        Some(SIGSYS),
        "{kind}: syscall {nr} {args:?} was not stopped: {:?} {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts the syscall ran (allowed), returning the errno it got.
fn assert_allowed(kind: &str, nr: i64, args: &[&str]) -> i32 {
    let out = probe(kind, nr, args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{kind}: syscall {nr} {args:?} was refused: {:?} {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let errno = stdout
        .trim()
        .rsplit("errno=")
        .next()
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    errno
}

const KINDS: [&str; 14] = [
    "vmm",
    "api",
    "vcpu",
    "block",
    "block_io_uring",
    "net",
    "vsock",
    "rng",
    "balloon",
    "metrics",
    "spawner",
    "uffd",
    "migration",
    "migration_spawner",
];

const AF_INET: &str = "2";
const AF_UNIX: &str = "1";
const AF_INET6: &str = "10";
const AF_NETLINK: &str = "16";
const SOCK_STREAM: &str = "1";
const KVM_RUN: &str = "0xae80";
/// mmap(NULL, 4096, PROT_READ|PROT_EXEC, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)
const MMAP_EXEC: [&str; 6] = ["0", "4096", "5", "0x22", "-1", "0"];
const MMAP_RW: [&str; 6] = ["0", "4096", "3", "0x22", "-1", "0"];

#[test]
fn no_thread_kind_may_exec_ptrace_open_inet_sockets_or_map_executable_memory() {
    for kind in KINDS {
        assert_killed(kind, libc::SYS_execve, &["0", "0", "0"]);
        assert_killed(kind, libc::SYS_ptrace, &["0", "0", "0", "0"]);
        if !kind.starts_with("migration") {
            assert_killed(kind, libc::SYS_socket, &[AF_INET, SOCK_STREAM, "0"]);
        }
        assert_killed(kind, libc::SYS_socket, &[AF_NETLINK, SOCK_STREAM, "0"]);
        assert_killed(kind, libc::SYS_mmap, &MMAP_EXEC);
        assert_killed(kind, libc::SYS_mprotect, &["0", "4096", "4"]);
        // Signals only to threads of its own process.
        assert_killed(kind, libc::SYS_tgkill, &["1", "1", "0"]);
        // What every kind needs still works.
        assert_eq!(
            assert_allowed(kind, libc::SYS_write, &["-1", "0", "0"]),
            libc::EBADF
        );
        assert_eq!(assert_allowed(kind, libc::SYS_mmap, &MMAP_RW), 0);
    }
}

#[test]
fn only_vcpus_run_guests_and_only_the_api_and_vsock_open_sockets() {
    assert_eq!(
        assert_allowed("vcpu", libc::SYS_ioctl, &["-1", KVM_RUN]),
        libc::EBADF
    );
    for kind in KINDS.iter().filter(|k| !matches!(**k, "vcpu")) {
        assert_killed(kind, libc::SYS_ioctl, &["-1", KVM_RUN]);
    }
    // Non-blocking accepted sockets (ioctl FIONBIO) on the API and vsock.
    for kind in ["api", "vsock"] {
        assert_eq!(
            assert_allowed(kind, libc::SYS_ioctl, &["-1", "0x5421"]),
            libc::EBADF
        );
    }
    assert_killed("vcpu", libc::SYS_ioctl, &["-1", "0x5421"]);
    for kind in ["api", "vsock"] {
        let errno = assert_allowed(kind, libc::SYS_socket, &[AF_UNIX, SOCK_STREAM, "0"]);
        assert_eq!(errno, 0, "{kind}");
    }
    for kind in [
        "vmm", "vcpu", "block", "net", "rng", "balloon", "metrics", "uffd",
    ] {
        assert_killed(kind, libc::SYS_socket, &[AF_UNIX, SOCK_STREAM, "0"]);
    }
}

/// UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE (linux/userfaultfd.h).
const UFFDIO: [&str; 3] = ["0xc028aa03", "0xc020aa04", "0x8010aa02"];
/// KVM_GET_DIRTY_LOG, KVM_SET_USER_MEMORY_REGION.
const DIRTY_LOG: [&str; 2] = ["0x4010ae42", "0x4020ae46"];

#[test]
fn tcp_for_migration_threads_only_and_page_faults_for_uffd_threads_only() {
    // Migration (the sender through its own spawner, as PUT /migrate
    // starts it from the API thread): TCP over IPv4 and IPv6, Unix.
    for family in [AF_INET, AF_INET6, AF_UNIX] {
        let errno = assert_allowed("migration", libc::SYS_socket, &[family, SOCK_STREAM, "0"]);
        assert!(
            errno == 0 || errno == libc::EAFNOSUPPORT,
            "{family}: {errno}"
        );
    }
    assert_eq!(
        assert_allowed("migration", libc::SYS_connect, &["-1", "0", "0"]),
        libc::EBADF
    );
    // The API thread that takes PUT /migrate stays Unix-only; so does the
    // device workers' spawner.
    for kind in ["api", "spawner", "vsock"] {
        assert_killed(kind, libc::SYS_socket, &[AF_INET6, SOCK_STREAM, "0"]);
    }
    // The dirty log: the API (diff snapshots) and migration threads.
    for ioctl in DIRTY_LOG {
        for kind in ["api", "migration"] {
            assert_eq!(
                assert_allowed(kind, libc::SYS_ioctl, &["-1", ioctl]),
                libc::EBADF
            );
        }
        for kind in ["vcpu", "vmm", "block", "uffd"] {
            assert_killed(kind, libc::SYS_ioctl, &["-1", ioctl]);
        }
    }
    // Filling pages: the userfaultfd threads only.
    for ioctl in UFFDIO {
        assert_eq!(
            assert_allowed("uffd", libc::SYS_ioctl, &["-1", ioctl]),
            libc::EBADF
        );
        for kind in ["api", "vcpu", "migration", "balloon"] {
            assert_killed(kind, libc::SYS_ioctl, &["-1", ioctl]);
        }
    }
    // No new userfaultfds, no KVM, no files on them.
    assert_killed("uffd", libc::SYS_userfaultfd, &["0"]);
    assert_killed("uffd", libc::SYS_ioctl, &["-1", KVM_RUN]);
    assert_killed("uffd", libc::SYS_openat, &["-100", "0", "0"]);
    assert_killed("migration", libc::SYS_openat, &["-100", "0", "0"]);
}

#[test]
fn files_and_io_uring_only_where_needed() {
    // Opening files: the API (drives, snapshots, logs) only.
    assert_eq!(
        assert_allowed("api", libc::SYS_openat, &["-100", "0", "0"]),
        libc::EFAULT
    );
    for kind in [
        "vmm",
        "vcpu",
        "block",
        "block_io_uring",
        "net",
        "vsock",
        "rng",
        "balloon",
    ] {
        assert_killed(kind, libc::SYS_openat, &["-100", "0", "0"]);
    }
    // io_uring: the io_uring block worker only.
    assert_eq!(
        assert_allowed("block_io_uring", libc::SYS_io_uring_setup, &["0", "0"]),
        libc::EFAULT
    );
    for kind in ["vcpu", "block", "api", "vmm", "net"] {
        assert_killed(kind, libc::SYS_io_uring_setup, &["0", "0"]);
    }
    // madvise: only the advice values the allocator and the balloon use
    // (not MADV_REMOVE, which punches holes in files).
    assert_allowed("balloon", libc::SYS_madvise, &["0", "0", "4"]);
    assert_killed("balloon", libc::SYS_madvise, &["0", "0", "9"]);
}

#[test]
fn trap_mode_reports_the_syscall_instead_of_killing() {
    let out = Command::new(kiln_bin())
        .args([
            "seccomp-probe",
            "rng",
            &libc::SYS_socket.to_string(),
            AF_INET,
            "1",
            "0",
        ])
        .env("KILN_SECCOMP", "trap")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!(
            "kiln: seccomp: blocked syscall {} on a rng thread",
            libc::SYS_socket
        )),
        "{err}"
    );
    // ENOSYS for the caller.
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("errno={}", libc::ENOSYS)),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_custom_filter_file_replaces_the_named_kinds_only() {
    // rng: only what a thread needs to start and end, plus getpid.
    let file = common::temp_file(
        "rng-filter.json",
        br#"{"rng": {"default_action": "kill_process", "filter_action": "allow", "filter": [
            {"syscall": "getpid"}, {"syscall": "futex"}, {"syscall": "exit"},
            {"syscall": "munmap"}, {"syscall": "madvise"}, {"syscall": "rt_sigprocmask"},
            {"syscall": "sigaltstack"}, {"syscall": "write", "args": [
                {"index": 0, "type": "dword", "op": "eq", "val": 1}]}]}}"#,
    );
    let f = ["--seccomp-filter", file.to_str().unwrap()];
    let ok = probe_with(&f, "rng", libc::SYS_getpid, &[]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    // getrandom is in the built-in rng list, not in this one.
    let killed = probe_with(&f, "rng", libc::SYS_getrandom, &["0", "0", "0"]);
    assert_eq!(killed.status.signal(), Some(SIGSYS), "{killed:?}");
    // Argument conditions from the file: write to fd 1 only.
    let killed = probe_with(&f, "rng", libc::SYS_write, &["2", "0", "0"]);
    assert_eq!(killed.status.signal(), Some(SIGSYS), "{killed:?}");
    // Other kinds keep the built-in filter.
    let ok = probe_with(&f, "vcpu", libc::SYS_ioctl, &["-1", KVM_RUN]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
}

#[test]
fn bad_filter_files_fail_with_one_line_before_anything_starts() {
    let dir = std::env::temp_dir().join(format!("kiln-seccomp-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let malformed = write("malformed.json", "{\"vcpu\": {\"default_action\": ");
    let unknown = write(
        "unknown.json",
        r#"{"vcpus": {"default_action": "kill_process", "filter_action": "allow", "filter": []}}"#,
    );
    let bad_syscall = write(
        "syscall.json",
        r#"{"vcpu": {"default_action": "kill_process", "filter_action": "allow", "filter": [{"syscall": "no_such_call"}]}}"#,
    );
    let sock = dir.join("api.sock");
    let sock = sock.to_str().unwrap();
    for (file, expect) in [
        ("/nonexistent/seccomp.json", "No such file or directory"),
        (malformed.as_str(), "EOF while parsing"),
        (unknown.as_str(), "unknown thread kind \"vcpus\""),
        (bad_syscall.as_str(), "no_such_call"),
    ] {
        for args in [
            vec!["vmm", "--api-sock", sock, "--seccomp-filter", file],
            vec!["run", "--seccomp-filter", file],
        ] {
            let out = common::kiln_here(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert!(err.starts_with("kiln: "), "{args:?}: {err}");
            assert!(err.contains(file), "{args:?}: {err}");
            assert!(err.contains(expect), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(
                !std::path::Path::new(sock).exists(),
                "the API socket appeared"
            );
        }
    }
    let out = Command::new(kiln_bin())
        .args(["vmm", "--api-sock", sock])
        .env("KILN_SECCOMP", "loud")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("KILN_SECCOMP=\"loud\""), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The guest of the lab case (no quotes of either kind: it goes, as one
/// double-quoted init argument, into a JSON string inside a single-quoted
/// shell word): it uses every device, says it is ready, then stays up
/// until the host, done looking at the VMM's threads and API, connects over
/// vsock (no fixed lifetime: a slow host gets all the time it needs).
const GUEST: &str = "head -c 4096 /dev/vda | wc -c; \
    dd if=/dev/zero of=/dev/vdb bs=4096 count=64 conv=fsync 2>/dev/null && echo uring-write-ok; \
    head -c 512 /dev/hwrng | wc -c; ip link set eth0 up && echo net-up; \
    echo guest-ready; kiln-agent vsock-echo 52; echo guest-done";

/// kiln vmm's configuration: every device kind (@K@, @I@: kernel, initrd).
fn config() -> String {
    format!(
        r#"{{"boot-source":{{"kernel_image_path":"@K@","initrd_path":"@I@","boot_args":"{} -- \"{GUEST}\""}},"drives":[{{"drive_id":"d1","path_on_host":"/tmp/s1.img","is_root_device":false}},{{"drive_id":"d2","path_on_host":"/tmp/s2.img","is_root_device":false,"io_engine":"Async"}}],"network-interfaces":[{{"iface_id":"eth0","host_dev_name":"kt5"}}],"vsock":{{"guest_cid":3,"uds_path":"/tmp/sv.sock"}},"entropy":{{}},"balloon":{{"amount_mib":16,"deflate_on_oom":false,"stats_polling_interval_s":1}},"machine-config":{{"vcpu_count":2,"mem_size_mib":256}}}}"#,
        kiln_vmm::DEFAULT_CMDLINE
    )
}

fn cases() -> Vec<(&'static str, String)> {
    let api = "kiln api --sock /tmp/sc.sock";
    vec![(
        "threads",
        // kiln vmm with every device kind, the API server and metrics.
        format!(
            "IP=/usr/local/bin/ip; [ -x $IP ] || IP=ip; cd /tmp; rm -f sc.sock sv.sock sc.log m.json; \
             dd if=/dev/zero of=s1.img bs=1M count=4 2>/dev/null; dd if=/dev/zero of=s2.img bs=1M count=4 2>/dev/null; \
             $IP tuntap add dev kt5 mode tap && $IP link set kt5 up; \
             printf '%s' '{config}' | sed -e \"s|@K@|$KILN_KERNEL|\" -e \"s|@I@|$KILN_INITRD|\" > sc.json; \
             (timeout 300 kiln vmm --api-sock /tmp/sc.sock --config-file /tmp/sc.json --metrics-path /tmp/m.json > sc.log 2>&1; echo kiln-status=$? >> sc.log) & \
             i=0; until grep -q guest-ready sc.log || [ $i -gt 600 ]; do sleep 0.5; i=$((i+1)); done; \
             PID=$(pidof kiln); echo pid=$PID; \
             echo '== threads'; for t in /proc/$PID/task/*; do c=$(cat $t/comm 2>/dev/null) && m=$(grep ^Seccomp: $t/status 2>/dev/null) || continue; echo \"TASK $c $(echo $m | tr -dc 0-9)\"; echo \"TID ${{t##*/}} $c\"; done; \
             echo '== api'; {api} GET /; echo; \
             {api} PATCH /vm '{{\"state\":\"Paused\"}}'; echo pause-status=$?; \
             {api} PATCH /vm '{{\"state\":\"Resumed\"}}'; echo resume-status=$?; \
             {api} PUT /actions '{{\"action_type\":\"FlushMetrics\"}}'; echo flush-status=$?; \
             n=0; until kiln-agent uds-send /tmp/sv.sock 52 4096 || [ $n -gt 100 ]; do sleep 0.2; n=$((n+1)); done; echo release-status=$n; \
             wait; echo '== log'; cat sc.log; $IP link del kt5; true",
            config = config()
        ),
    )]
}

static BATCH: Batch = Batch::new(cases, Duration::from_secs(900));

#[test]
fn every_thread_of_a_running_vmm_has_a_filter() {
    let out = BATCH.get("threads");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    let threads: Vec<(&str, &str)> = section(&o, "threads")
        .lines()
        .filter_map(|l| l.strip_prefix("TASK "))
        .filter_map(|l| l.rsplit_once(' '))
        .collect();
    for want in [
        "kiln",
        "kiln_api",
        "kiln_spawner",
        "kiln_vcpu0",
        "kiln_vcpu1",
        "kiln_blk_d1",
        "kiln_blk_d2",
        "kiln_net_eth0",
        "kiln_vsock_3",
        "kiln_rng",
        "kiln_balloon",
        "kiln_metrics",
    ] {
        assert!(
            threads.iter().any(|(name, _)| *name == want),
            "no thread {want}: {o}"
        );
    }
    for (name, mode) in &threads {
        assert_eq!(*mode, "2", "thread {name} has no seccomp filter: {o}");
    }
    // The guest used every device, and the API worked under its filter.
    for line in [
        "4096",
        "uring-write-ok",
        "512",
        "net-up",
        "echoed 4096",
        "guest-done",
        "kiln-status=0",
    ] {
        assert!(o.lines().any(|l| l.trim() == line), "no {line:?}: {o}");
    }
    assert!(
        o.contains("pause-status=0") && o.contains("resume-status=0"),
        "{o}"
    );
    assert!(o.contains("flush-status=0"), "{o}");
    // The guest was listening (it printed guest-ready just before) well
    // before the host was done; a few refused tries are fine, 100 are not.
    assert!(!o.contains("release-status=101"), "{o}");
    assert!(!o.contains("blocked syscall"), "{o}");
}
