//! Trap mode (`KILN_SECCOMP=trap`): a `SIGSYS` handler that reports the
//! refused syscall on stderr and makes it fail with `ENOSYS`.
//!
//! The handler only reads the signal information and a thread-local
//! number, formats into a stack buffer and calls `write(2)`: it is
//! async-signal-safe. (If `write` itself is what the filter refuses, the
//! nested `SIGSYS` kills the process, as in kill mode.)

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ThreadKind;

thread_local! {
    /// The installed kind's index + 1 (0: none), read by the handler.
    static KIND: Cell<u8> = const { Cell::new(0) };
}

/// Remembers the calling thread's kind for the handler's message.
pub(crate) fn set_thread_kind(kind: ThreadKind) {
    KIND.with(|k| k.set(kind.index() as u8 + 1));
}

/// Syscalls trapped so far (the metrics' `seccomp.num_faults`).
pub(crate) static FAULTS: AtomicU64 = AtomicU64::new(0);

/// Byte offset of `si_syscall` in `siginfo_t` on x86_64 (after signo,
/// errno, code, padding and the `_call_addr` pointer of `_sigsys`).
const SI_SYSCALL_OFFSET: usize = 24;

/// Formats `n` in decimal at the end of `buf`; returns where it starts.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return i;
        }
    }
}

/// Builds the report line for syscall `nr` on a thread of kind index+1
/// `kind` into `out`; returns its length.
pub(crate) fn report(nr: i32, kind: u8, tid: u64, out: &mut [u8; 128]) -> usize {
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(out.len() - len);
        out[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"kiln: seccomp: blocked syscall ");
    let mut num = [0u8; 20];
    let start = decimal(u64::from(nr.unsigned_abs()), &mut num);
    put(&num[start..]);
    put(b" on a ");
    let name = match kind {
        0 => "unfiltered",
        k => ThreadKind::ALL
            .get(usize::from(k - 1))
            .map_or("unknown", |k| k.name()),
    };
    put(name.as_bytes());
    put(b" thread (tid ");
    let start = decimal(tid, &mut num);
    put(&num[start..]);
    put(b")\n");
    len
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS (SA_SIGINFO);
    // for a seccomp trap, si_syscall is the i32 at SI_SYSCALL_OFFSET.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    FAULTS.fetch_add(1, Ordering::Relaxed);
    let kind = KIND.with(Cell::get);
    // SAFETY: gettid has no preconditions (and is on every list).
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u64;
    let mut line = [0u8; 128];
    let mut len = report(nr, kind, tid, &mut line);
    // The path of a refused open/openat names what wanted it.
    // SAFETY: `ctx` is the ucontext_t the kernel passed (SA_SIGINFO).
    let path = unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        match i64::from(nr) {
            libc::SYS_open => (*uc).uc_mcontext.gregs[libc::REG_RDI as usize],
            libc::SYS_openat => (*uc).uc_mcontext.gregs[libc::REG_RSI as usize],
            _ => 0,
        }
    } as *const u8;
    if !path.is_null() && len > 0 {
        len -= 1; // the newline
        let mut tail = [0u8; 128];
        let mut n = 0;
        for (i, b) in b" path ".iter().enumerate() {
            tail[i] = *b;
            n += 1;
        }
        while n < tail.len() - 1 {
            // SAFETY: the path argument of the refused open is a
            // NUL-terminated string of the thread that made the call.
            let b = unsafe { path.add(n - 6).read() };
            if b == 0 {
                break;
            }
            tail[n] = b;
            n += 1;
        }
        tail[n] = b'\n';
        n += 1;
        let room = line.len() - len;
        let n = n.min(room);
        line[len..len + n].copy_from_slice(&tail[..n]);
        len += n;
    }
    // SAFETY: write(2) on stderr from a buffer of `len` valid bytes;
    // async-signal-safe.
    unsafe { libc::write(2, line.as_ptr().cast(), len) };
    // SAFETY: `ctx` is the ucontext_t the kernel passed (SA_SIGINFO); the
    // refused syscall returns what RAX holds when the handler returns.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::ENOSYS);
    }
}

/// Installs the process-wide `SIGSYS` handler.
pub(crate) fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO
    // signature and is async-signal-safe (see the module documentation).
    let rc = unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_line() {
        let mut out = [0u8; 128];
        let n = report(41, ThreadKind::Vcpu.index() as u8 + 1, 77, &mut out);
        assert_eq!(
            std::str::from_utf8(&out[..n]).unwrap(),
            "kiln: seccomp: blocked syscall 41 on a vcpu thread (tid 77)\n"
        );
        let n = report(0, 0, 1, &mut out);
        assert_eq!(
            std::str::from_utf8(&out[..n]).unwrap(),
            "kiln: seccomp: blocked syscall 0 on a unfiltered thread (tid 1)\n"
        );
    }
}
