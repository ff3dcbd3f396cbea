//! The jailer's process steps, in order (see [`run`]).

use std::ffi::CString;
use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::args::{JailConfig, Rlimit};
use crate::journal::Journal;
use crate::{cgroup, chroot, io_err, last_err, step_err, Error, Result};

/// Firecracker's default open-file limit when none is given.
pub const DEFAULT_NO_FILE: u64 = 2048;

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Closes every inherited file descriptor but 0, 1 and 2.
pub fn close_inherited_fds() -> Result<()> {
    // SAFETY: close_range only closes descriptors; nothing in this
    // (single-threaded) process uses fds above 2 at this point.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r == 0 {
        return Ok(());
    }
    // Older kernels: close what /proc/self/fd lists.
    let fds: Vec<i32> = fs::read_dir("/proc/self/fd")
        .map_err(io_err("close inherited fds: list", "/proc/self/fd"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: as above (the read_dir fd is already closed and fails harmlessly).
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// Sets the resource limits (soft = hard); no-file defaults to 2048.
pub fn set_rlimits(limits: &[Rlimit]) -> Result<()> {
    let mut all = limits.to_vec();
    if !all.iter().any(|l| matches!(l, Rlimit::NoFile(_))) {
        all.push(Rlimit::NoFile(DEFAULT_NO_FILE));
    }
    for l in all {
        let (res, v, name) = match l {
            Rlimit::Fsize(v) => (libc::RLIMIT_FSIZE, v, "fsize"),
            Rlimit::NoFile(v) => (libc::RLIMIT_NOFILE, v, "no-file"),
        };
        let lim = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        // SAFETY: `lim` is a valid rlimit.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(Error::Invalid(format!(
                "set resource limit {name}={v}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Joins the network namespace at `path`.
pub fn join_netns(path: &Path) -> Result<()> {
    let f = fs::File::open(path).map_err(io_err("join netns: open", path))?;
    // SAFETY: `f` is an open fd for the call's duration.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(last_err("join netns", path));
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The effective and permitted capability sets of this process.
pub fn capabilities() -> Result<(u64, u64)> {
    let mut hdr = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array, as version 3 requires.
    if unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) } != 0 {
        return Err(step_err("drop privileges: capget"));
    }
    let eff = u64::from(data[0].effective) | (u64::from(data[1].effective) << 32);
    let prm = u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32);
    Ok((eff, prm))
}

/// setgroups([]), setgid, setuid; then checks that no capability is left
/// and sets no_new_privs.
pub fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    // SAFETY: plain credential syscalls.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(step_err("drop privileges: setgroups([])"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(step_err("drop privileges: setgid"));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(step_err("drop privileges: setuid"));
        }
    }
    let (eff, prm) = capabilities()?;
    if uid != 0 && (eff != 0 || prm != 0) {
        return Err(Error::Invalid(format!(
            "drop privileges: capabilities remain after setuid({uid}) (effective {eff:#x}, permitted {prm:#x})"
        )));
    }
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(step_err("drop privileges: set no_new_privs"));
    }
    Ok(())
}

/// The VMM's argv: the exec name, then (after a leading subcommand word such
/// as `vmm`) Firecracker's jailer-passed flags `--id`, `--start-time-us`,
/// `--start-time-cpu-us`, `--parent-cpu-time-us` (each unless given), then
/// the rest of the VMM arguments.
pub fn vmm_argv(
    cfg: &JailConfig,
    start_us: u64,
    start_cpu_us: u64,
    jailer_cpu_us: u64,
) -> Vec<String> {
    let mut argv = vec![cfg.exec_name.clone()];
    let mut rest = cfg.vmm_args.as_slice();
    if let Some(first) = rest.first() {
        if !first.starts_with('-') {
            argv.push(first.clone());
            rest = &rest[1..];
        }
    }
    let has = |flag: &str| {
        rest.iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    let added = [
        ("--id", cfg.id.clone()),
        ("--start-time-us", start_us.to_string()),
        ("--start-time-cpu-us", start_cpu_us.to_string()),
        ("--parent-cpu-time-us", jailer_cpu_us.to_string()),
    ];
    for (flag, value) in added {
        if !has(flag) {
            argv.push(flag.to_string());
            argv.push(value);
        }
    }
    argv.extend(rest.iter().cloned());
    argv
}

/// Execs `/<exec name>` with `argv` and an empty environment.
fn exec(path: &str, argv: &[String]) -> Error {
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let cpath = c(path);
    let cargs: Vec<CString> = argv.iter().map(|a| c(a)).collect();
    let mut ptrs: Vec<*const libc::c_char> = cargs.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: NULL-terminated arrays of valid C strings that outlive the call.
    unsafe { libc::execve(cpath.as_ptr(), ptrs.as_ptr(), envp.as_ptr()) };
    last_err("exec", path)
}

fn write_pid_file(exec_name: &str, pid: i32) {
    let p = format!("/{exec_name}.pid");
    if let Err(e) = fs::write(&p, pid.to_string()) {
        eprintln!("jailer: warning: write {p}: {e}");
    }
}

/// Runs the jail steps. Returns only on failure, or in a parent process
/// that does not become the VMM (`--daemonize`, `--new-pid-ns`), with the
/// exit code to use.
pub fn run(cfg: JailConfig) -> Result<i32> {
    let start_us = clock_us(libc::CLOCK_MONOTONIC);
    let start_cpu_us = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID);
    close_inherited_fds()?;
    // Everything that can be checked is checked before anything is created.
    let cg = cgroup::prepare(&cfg)?;
    chroot::check_free(&cfg)?;
    let mut journal = Journal::start(cg.as_ref().map(|p| p.return_procs.clone()))?;
    match jail(&cfg, cg.as_ref(), &mut journal, start_us, start_cpu_us) {
        Ok(code) => Ok(code),
        Err(e) => {
            journal.fail();
            Err(e)
        }
    }
}

fn jail(
    cfg: &JailConfig,
    cg: Option<&cgroup::CgroupPlan>,
    journal: &mut Journal,
    start_us: u64,
    start_cpu_us: u64,
) -> Result<i32> {
    let root = chroot::create_root(cfg, journal)?;
    chroot::copy_exec(cfg, &root)?;
    set_rlimits(&cfg.rlimits)?;
    if let Some(plan) = cg {
        cgroup::apply(plan, journal)?;
    }
    if let Some(ns) = &cfg.netns {
        join_netns(ns)?;
    }
    let dev_null = if cfg.daemonize {
        Some(
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(io_err("daemonize: open", "/dev/null"))?,
        )
    } else {
        None
    };
    // Device nodes from the host's side (same nodes, created before the
    // pivot so a failure is reported with host paths).
    chroot::populate(&root, cfg.uid, cfg.gid)?;
    chroot::pivot_into(&root)?;
    if let Some(null) = dev_null {
        // SAFETY: fork in this single-threaded process.
        match unsafe { libc::fork() } {
            -1 => return Err(step_err("daemonize: fork")),
            0 => {}
            _ => {
                journal.close_writer();
                return Ok(0);
            }
        }
        // SAFETY: plain syscalls on valid fds.
        unsafe {
            if libc::setsid() < 0 {
                return Err(step_err("daemonize: setsid"));
            }
            for fd in 0..3 {
                if libc::dup2(null.as_raw_fd(), fd) < 0 {
                    return Err(step_err("daemonize: redirect stdio to /dev/null"));
                }
            }
        }
    }
    let mut in_new_pid_ns = false;
    if cfg.new_pid_ns {
        // SAFETY: plain syscalls; fork in this single-threaded process.
        unsafe {
            if libc::unshare(libc::CLONE_NEWPID) != 0 {
                return Err(step_err("new pid namespace: unshare"));
            }
            match libc::fork() {
                -1 => return Err(step_err("new pid namespace: fork")),
                0 => in_new_pid_ns = true,
                child => {
                    // The parent: records the VMM's pid, steps aside and
                    // exits with the VMM's status.
                    write_pid_file(&cfg.exec_name, child);
                    journal.close_writer();
                    drop_privileges(cfg.uid, cfg.gid)?;
                    let mut status = 0;
                    while libc::waitpid(child, &mut status, 0) < 0 {
                        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                        {
                            return Err(step_err("new pid namespace: wait for the VMM"));
                        }
                    }
                    journal.wait_done();
                    return Ok(if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status)
                    } else {
                        128 + libc::WTERMSIG(status)
                    });
                }
            }
        }
    }
    if !in_new_pid_ns {
        // SAFETY: getpid cannot fail.
        write_pid_file(&cfg.exec_name, unsafe { libc::getpid() });
    }
    drop_privileges(cfg.uid, cfg.gid)?;
    if in_new_pid_ns {
        // The VMM dies with the parent standing in for it.
        // SAFETY: plain prctl (after the credential change, which clears it).
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    }
    let jailer_cpu_us = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(start_cpu_us);
    let argv = vmm_argv(cfg, start_us, start_cpu_us, jailer_cpu_us);
    journal.exec_next();
    Err(exec(&format!("/{}", cfg.exec_name), &argv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::JailerArgs;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: JailerArgs,
    }

    fn cfg(exec: &str, vmm: &[&str]) -> JailConfig {
        let mut v = vec![
            "jailer",
            "--id",
            "vm7",
            "--exec-file",
            exec,
            "--uid",
            "9",
            "--gid",
            "9",
            "--",
        ];
        v.extend_from_slice(vmm);
        Cli::try_parse_from(v).unwrap().a.validate().unwrap()
    }

    #[test]
    fn argv_after_the_subcommand() {
        let c = cfg("/bin/sh", &["vmm", "--api-sock", "/a.sock"]);
        let argv = vmm_argv(&c, 1, 2, 3);
        assert_eq!(
            argv,
            [
                "sh",
                "vmm",
                "--id",
                "vm7",
                "--start-time-us",
                "1",
                "--start-time-cpu-us",
                "2",
                "--parent-cpu-time-us",
                "3",
                "--api-sock",
                "/a.sock"
            ]
        );
        // Firecracker-style: flags first; a given --id is kept, not doubled.
        let c = cfg("/bin/sh", &["--api-sock", "/a.sock", "--id=vm7"]);
        let argv = vmm_argv(&c, 1, 2, 3);
        assert_eq!(argv[1], "--start-time-us");
        assert_eq!(argv.iter().filter(|a| a.starts_with("--id")).count(), 1);
        assert_eq!(argv.last().unwrap(), "--id=vm7");
    }

    #[test]
    fn capabilities_are_read() {
        let (eff, prm) = capabilities().unwrap();
        // Whatever this test runs as, the effective set is within the permitted one.
        assert_eq!(eff & !prm, 0);
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let cap_eff = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        assert_eq!(eff, cap_eff);
    }
}
