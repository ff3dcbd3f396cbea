//! Terminal handling for the guest console: raw mode while the VM runs.

use std::os::fd::RawFd;
use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Returns stdin for the guest's serial input, switching a terminal to raw
/// mode (restored by [`restore`]).
pub fn prepare_stdin() -> Option<RawFd> {
    let fd = libc::STDIN_FILENO;
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd) } == 1 {
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `t` is a valid, writable termios.
        if unsafe { libc::tcgetattr(fd, &mut t) } == 0 {
            *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
            let mut raw = t;
            // SAFETY: cfmakeraw only edits the struct it is given.
            unsafe { libc::cfmakeraw(&mut raw) };
            // Keep output post-processing so guest "\n" still renders.
            raw.c_oflag = t.c_oflag;
            // SAFETY: `raw` is a valid termios for this fd.
            unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) };
        }
    }
    Some(fd)
}

/// Restores the terminal, if [`prepare_stdin`] changed it.
pub fn restore() {
    if let Some(t) = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take() {
        // SAFETY: `t` came from tcgetattr on the same fd.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
    }
}
