//! Run-time changes to a device from another thread (the API), applied by
//! the device's worker.
//!
//! [`Live`] holds the device's current settings (`S`) and a generation
//! number. The API side changes the settings with [`Live::update`], which
//! bumps the generation, wakes the worker through an eventfd and, while a
//! worker runs, waits (briefly) until the worker reports the generation
//! applied. The worker watches [`Live::as_raw_fd`]; on that event it takes
//! the settings with [`Live::fetch`] and reports them applied with
//! [`Live::applied`]. A device that is not active yet simply starts its
//! next worker from the current settings ([`Live::snapshot`]).

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// How long [`Live::update`] waits for a running worker to apply a change.
const APPLY_TIMEOUT: Duration = Duration::from_secs(2);

struct State<S> {
    value: S,
    generation: u64,
    applied: u64,
    worker: bool,
}

/// Settings shared between a device, its worker and its handles.
pub struct Live<S> {
    state: Mutex<State<S>>,
    applied: Condvar,
    evt: EventFd,
}

impl<S: Clone> Live<S> {
    /// Settings `value`, at generation 0.
    pub fn new(value: S) -> std::io::Result<Self> {
        Ok(Self {
            state: Mutex::new(State {
                value,
                generation: 0,
                applied: 0,
                worker: false,
            }),
            applied: Condvar::new(),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<S>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the current settings.
    pub fn with<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.lock().value)
    }

    /// The current settings and their generation, for a worker about to
    /// start.
    pub fn snapshot(&self) -> (S, u64) {
        let s = self.lock();
        (s.value.clone(), s.generation)
    }

    /// A worker started from a [`Self::snapshot`] runs: updates from now
    /// on wait for it. (One made in between finds the eventfd set.)
    pub fn worker_started(&self) {
        self.lock().worker = true;
    }

    /// The worker stopped (device reset): updates no longer wait for it.
    pub fn worker_stopped(&self) {
        self.lock().worker = false;
        self.applied.notify_all();
    }

    /// Changes the settings with `f` (which may refuse, changing nothing),
    /// wakes the worker and, while one runs, waits until it applied the
    /// change. Returns `f`'s result.
    pub fn update<R, E>(&self, f: impl FnOnce(&mut S) -> Result<R, E>) -> Result<R, E> {
        let mut s = self.lock();
        let r = f(&mut s.value)?;
        s.generation += 1;
        let generation = s.generation;
        // A full counter still wakes the worker; nothing to do on failure.
        let _ = self.evt.write(1);
        let deadline = Instant::now() + APPLY_TIMEOUT;
        while s.worker && s.applied < generation {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("device update {generation}: the worker has not applied it yet");
                break;
            }
            s = self
                .applied
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(r)
    }

    /// Worker side, on the eventfd: the settings if they changed since
    /// generation `seen` (which is then advanced).
    pub fn fetch(&self, seen: &mut u64) -> Option<S> {
        let _ = self.evt.read();
        let s = self.lock();
        (s.generation != *seen).then(|| {
            *seen = s.generation;
            s.value.clone()
        })
    }

    /// Worker side: the settings of generation `seen` are in effect.
    pub fn applied(&self, seen: u64) {
        let mut s = self.lock();
        s.applied = s.applied.max(seen);
        self.applied.notify_all();
    }
}

impl<S> AsRawFd for Live<S> {
    /// The eventfd the worker watches.
    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn updates_wait_for_a_running_worker_and_not_for_an_idle_one() {
        let live = Arc::new(Live::new(1u32).unwrap());
        // No worker: the update returns at once and the value is stored.
        let t = Instant::now();
        live.update(|v| {
            *v = 2;
            Ok::<_, ()>(())
        })
        .unwrap();
        assert!(t.elapsed() < APPLY_TIMEOUT);
        assert_eq!(live.with(|v| *v), 2);
        // A refused update changes nothing and wakes nobody.
        assert_eq!(live.update(|_| Err::<(), _>("no")), Err("no"));
        let (v, mut seen) = live.snapshot();
        assert_eq!((v, seen), (2, 1));
        assert_eq!(live.fetch(&mut seen), None);
        live.worker_started();
        // A worker thread applies the next update before update() returns.
        let done = Arc::new(Mutex::new(0u32));
        let worker = {
            let (live, done) = (live.clone(), done.clone());
            std::thread::spawn(move || loop {
                if let Some(v) = live.fetch(&mut seen) {
                    *done.lock().unwrap() = v;
                    live.applied(seen);
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            })
        };
        live.update(|v| {
            *v = 7;
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(*done.lock().unwrap(), 7, "applied before update returned");
        worker.join().unwrap();
        live.worker_stopped();
        live.update(|v| {
            *v = 8;
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(live.with(|v| *v), 8);
    }
}
