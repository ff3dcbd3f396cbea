//! The journal of what the jailer created, kept by a privileged cleaner.
//!
//! Before creating anything, the jailer forks a cleaner (detached: its own
//! session, standard I/O on /dev/null) that stays in the host's mount
//! namespace as root. The jailer then sends it, over a close-on-exec pipe,
//! one record per thing it creates, then `E` just before the exec:
//!
//! - the pipe reaches end-of-file after `E`: the exec succeeded (close-on-exec
//!   closed the pipe), the cleaner exits;
//! - `F` (a step failed), or end-of-file without `E` (the jailer died): the
//!   cleaner moves any process still in the cgroup leaf back to the jailer's
//!   original cgroup, removes the leaf and the chroot tree (newest first) and
//!   exits. The failing jailer waits for that (a second pipe reaching
//!   end-of-file) before it exits, so nothing is left behind.
//!
//! This works even after `pivot_root` or after dropping privileges, when the
//! jailer itself can no longer reach or remove those paths.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{step_err, Result};

const TREE: u8 = b't';
const DIR: u8 = b'd';
const CGROUP: u8 = b'c';
const EXEC: u8 = b'E';
const FAIL: u8 = b'F';

/// The jailer's side of the journal.
pub struct Journal {
    /// Records go here (close-on-exec).
    writer: Option<fs::File>,
    /// Reaches end-of-file when the cleaner exits (close-on-exec).
    done: Option<fs::File>,
}

fn pipe() -> Result<(fs::File, fs::File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(step_err("journal: create a pipe"));
    }
    // SAFETY: pipe2 succeeded: both fds are open and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((fs::File::from(r), fs::File::from(w)))
}

impl Journal {
    /// Forks the cleaner. `return_procs` is the `cgroup.procs` file to move
    /// leftover processes to before removing a cgroup leaf.
    pub fn start(return_procs: Option<PathBuf>) -> Result<Self> {
        let (rec_r, rec_w) = pipe()?;
        let (done_r, done_w) = pipe()?;
        // SAFETY: the jailer is single-threaded here; the child only calls
        // fork/exit or runs the cleaner (plain file-system calls).
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(step_err("journal: fork the cleaner"));
        }
        if pid == 0 {
            drop(rec_w);
            drop(done_r);
            // Double fork: the cleaner is reparented away from the jailer
            // (which becomes the VMM and never reaps it).
            // SAFETY: as above.
            let pid2 = unsafe { libc::fork() };
            if pid2 != 0 {
                // SAFETY: leaving the intermediate child without running
                // the parent's destructors or atexit handlers.
                unsafe { libc::_exit(0) };
            }
            detach();
            cleaner(rec_r, done_w, return_procs);
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: `pid` is our child; `status` is a valid out pointer.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        drop(rec_r);
        drop(done_w);
        Ok(Self {
            writer: Some(rec_w),
            done: Some(done_r),
        })
    }

    fn send(&self, tag: u8, path: &Path) {
        if let Some(mut w) = self.writer.as_ref() {
            let mut rec = vec![tag];
            rec.extend_from_slice(path.as_os_str().as_bytes());
            rec.push(0);
            // A record is far smaller than PIPE_BUF: written at once.
            let _ = w.write_all(&rec);
        }
    }

    /// A directory was created: remove it on failure if empty.
    pub fn dir(&self, path: &Path) {
        self.send(DIR, path);
    }

    /// A directory tree was created: remove it and its contents on failure.
    pub fn tree(&self, path: &Path) {
        self.send(TREE, path);
    }

    /// A cgroup was created: empty it and remove it on failure.
    pub fn cgroup(&self, path: &Path) {
        self.send(CGROUP, path);
    }

    /// The exec comes next (success if the pipe then closes).
    pub fn exec_next(&self) {
        self.send(EXEC, Path::new(""));
    }

    /// Closes this process's end (a parent that keeps no part in the jail).
    pub fn close_writer(&mut self) {
        self.writer = None;
    }

    /// A step failed: the cleaner undoes everything; returns once it is done.
    pub fn fail(&mut self) {
        self.send(FAIL, Path::new(""));
        self.writer = None;
        self.wait_done();
    }

    /// Waits until the cleaner has exited; prints what it could not undo.
    pub fn wait_done(&mut self) {
        if let Some(mut d) = self.done.take() {
            let mut msg = String::new();
            let _ = d.read_to_string(&mut msg);
            for l in msg.lines() {
                eprintln!("jailer: {l}");
            }
        }
    }
}

/// The cleaner's own session, on /dev/null, deaf to SIGPIPE.
fn detach() {
    // SAFETY: plain syscalls on this (single-threaded) child.
    unsafe {
        libc::setsid();
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            for fd in 0..3 {
                libc::dup2(null, fd);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
}

/// The cleaner: reads records until `F` or end-of-file, then undoes.
fn cleaner(mut rec: fs::File, mut done: fs::File, return_procs: Option<PathBuf>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut records: Vec<(u8, PathBuf)> = Vec::new();
    let mut exec = false;
    let failed = loop {
        let n = match rec.read(&mut chunk) {
            Ok(0) => break !exec,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break !exec,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut fail = false;
        while let Some(end) = buf.iter().position(|&b| b == 0) {
            let r: Vec<u8> = buf.drain(..=end).collect();
            let (tag, path) = (r[0], PathBuf::from(OsStr::from_bytes(&r[1..r.len() - 1])));
            match tag {
                EXEC => exec = true,
                FAIL => fail = true,
                _ => records.push((tag, path)),
            }
        }
        if fail {
            break true;
        }
    };
    if !failed {
        return;
    }
    for (tag, path) in records.iter().rev() {
        let res = match *tag {
            TREE => fs::remove_dir_all(path),
            DIR => {
                // Shared parents go only if empty (another jail may use them).
                let _ = fs::remove_dir(path);
                Ok(())
            }
            CGROUP => remove_cgroup(path, return_procs.as_deref()),
            _ => Ok(()),
        };
        if let Err(e) = res {
            let _ = writeln!(done, "cleanup: could not remove {}: {e}", path.display());
        }
    }
}

/// Moves every process out of the cgroup `leaf`, then removes it.
fn remove_cgroup(leaf: &Path, return_procs: Option<&Path>) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let (Some(ret), Ok(procs)) =
            (return_procs, fs::read_to_string(leaf.join("cgroup.procs")))
        {
            for pid in procs.split_whitespace() {
                let _ = fs::write(ret, pid);
            }
        }
        match fs::remove_dir(leaf) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
