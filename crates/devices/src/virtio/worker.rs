//! A device worker thread: one epoll over the device's eventfds and backend
//! fds, plus a control eventfd to pause, resume or stop it.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kiln_seccomp::ThreadKind;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const CONTROL_TOKEN: u64 = u64::MAX;
/// The token a worker spawned with [`Worker::spawn_quiescing`] passes its
/// handler before it pauses: finish the work in flight (complete it to the
/// guest), start nothing new.
pub const QUIESCE: u64 = u64::MAX - 1;

/// What the control eventfd asks of the thread.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Run,
    /// Asked to pause; the thread answers by setting `Paused`.
    Pause,
    Paused,
    Stop,
}

struct Control {
    mode: Mutex<Mode>,
    cond: Condvar,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, Mode> {
        self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running worker; dropping it stops the thread.
pub struct Worker {
    kick: EventFd,
    control: Arc<Control>,
    handle: Option<JoinHandle<()>>,
}

/// What the handler tells the loop after an event.
pub enum Next {
    /// Keep running.
    Continue,
    /// Stop the worker (the device hit an error it cannot recover from).
    Stop,
}

/// A handler of a worker's events.
pub type Handler = Box<dyn FnMut(u64, EventSet) -> Next>;

/// What [`Worker::spawn_with`] runs on the new thread before its loop:
/// more fds to wait on, and the handler.
pub type Setup =
    Box<dyn FnOnce() -> std::io::Result<(Vec<(RawFd, u64, EventSet)>, Handler)> + Send>;

impl Worker {
    /// Spawns thread `name`, under `kind`'s seccomp filter, that waits on
    /// `fds` (fd, token, events) and calls `handler(token, events)` for each
    /// ready fd. The handler owns the device state (queues, backend) for
    /// the life of the thread.
    pub fn spawn<F>(
        name: String,
        kind: ThreadKind,
        fds: Vec<(RawFd, u64, EventSet)>,
        handler: F,
    ) -> std::io::Result<Self>
    where
        F: FnMut(u64, EventSet) -> Next + Send + 'static,
    {
        Self::spawn_with(
            name,
            kind,
            fds,
            Box::new(move || Ok((Vec::new(), Box::new(handler) as Handler))),
            false,
        )
    }

    /// [`Worker::spawn`] for a device that has work in flight between
    /// events (asynchronous I/O): before pausing, the thread calls
    /// `handler(QUIESCE, EventSet::empty())`, which must complete that work,
    /// so a paused device has every request it took in the used ring.
    pub fn spawn_quiescing<F>(
        name: String,
        kind: ThreadKind,
        fds: Vec<(RawFd, u64, EventSet)>,
        handler: F,
    ) -> std::io::Result<Self>
    where
        F: FnMut(u64, EventSet) -> Next + Send + 'static,
    {
        Self::spawn_with(
            name,
            kind,
            fds,
            Box::new(move || Ok((Vec::new(), Box::new(handler) as Handler))),
            true,
        )
    }

    /// [`Worker::spawn`] with the handler made by `setup` on the new thread,
    /// under its filter (a backend whose set-up needs syscalls only that
    /// thread may make, such as io_uring's). An error of `setup` is
    /// returned here and the thread ends. `quiesce`: see
    /// [`Worker::spawn_quiescing`].
    pub fn spawn_with(
        name: String,
        kind: ThreadKind,
        fds: Vec<(RawFd, u64, EventSet)>,
        setup: Setup,
        quiesce: bool,
    ) -> std::io::Result<Self> {
        let kick = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, CONTROL_TOKEN),
        )?;
        for (fd, token, events) in fds {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        }
        let control = Arc::new(Control {
            mode: Mutex::new(Mode::Run),
            cond: Condvar::new(),
        });
        let thread_control = control.clone();
        let thread_kick = kick.try_clone()?;
        let (ready_tx, ready) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(1);
        let thread_name = name.clone();
        let handle = kiln_seccomp::spawn(kind, thread_name, move || {
            let set_up = setup().and_then(|(more, handler)| {
                for (fd, token, events) in more {
                    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
                }
                Ok(handler)
            });
            let mut handler = match set_up {
                Ok(h) => {
                    let _ = ready_tx.send(Ok(()));
                    h
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let mut events = vec![EpollEvent::default(); 16];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::error!("{name}: epoll_wait: {e}");
                        return;
                    }
                };
                for ev in &events[..n] {
                    if ev.data() == CONTROL_TOKEN {
                        let _ = thread_kick.read();
                        if quiesce && *thread_control.lock() == Mode::Pause {
                            handler(QUIESCE, EventSet::empty());
                        }
                        if !obey(&thread_control) {
                            return;
                        }
                        continue;
                    }
                    if let Next::Stop = handler(ev.data(), ev.event_set()) {
                        log::error!("{name}: worker stopped");
                        return;
                    }
                }
            }
        })?;
        match ready.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(e);
            }
            Err(_) => {
                let _ = handle.join();
                return Err(std::io::Error::other(
                    "the worker thread ended while starting",
                ));
            }
        }
        Ok(Self {
            kick,
            control,
            handle: Some(handle),
        })
    }

    /// Stops the thread between two events and keeps it (and the device
    /// state it owns) until [`Worker::resume`]. Returns false if the thread
    /// did not stop within `timeout` or has ended.
    pub fn pause(&self, timeout: Duration) -> bool {
        if self.handle.as_ref().is_none_or(|h| h.is_finished()) {
            return false;
        }
        {
            let mut mode = self.control.lock();
            if *mode == Mode::Paused {
                return true;
            }
            *mode = Mode::Pause;
        }
        let _ = self.kick.write(1);
        let mode = self.control.lock();
        let (mode, _) = self
            .control
            .cond
            .wait_timeout_while(mode, timeout, |m| *m == Mode::Pause)
            .unwrap_or_else(|e| e.into_inner());
        *mode == Mode::Paused
    }

    /// Lets a paused thread go on.
    pub fn resume(&self) {
        let mut mode = self.control.lock();
        if matches!(*mode, Mode::Pause | Mode::Paused) {
            *mode = Mode::Run;
            self.control.cond.notify_all();
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            *self.control.lock() = Mode::Stop;
            self.control.cond.notify_all();
            let _ = self.kick.write(1);
            let _ = h.join();
        }
    }
}

/// Acts on the control state on the worker thread; false means exit.
fn obey(control: &Control) -> bool {
    let mut mode = control.lock();
    loop {
        match *mode {
            Mode::Run => return true,
            Mode::Stop => return false,
            Mode::Pause => {
                *mode = Mode::Paused;
                control.cond.notify_all();
            }
            Mode::Paused => {
                mode = control.cond.wait(mode).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn pause_holds_events_until_resume_and_stop_works_while_paused() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let (s, e) = (seen.clone(), evt.try_clone().unwrap());
        let mut w = Worker::spawn(
            "test_worker".into(),
            ThreadKind::Rng,
            vec![(evt.as_raw_fd(), 1, EventSet::IN)],
            move |_, _| {
                s.fetch_add(e.read().unwrap_or(0), Ordering::SeqCst);
                Next::Continue
            },
        )
        .unwrap();
        let wait_for = |n| {
            for _ in 0..200 {
                if seen.load(Ordering::SeqCst) == n {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            false
        };
        evt.write(2).unwrap();
        assert!(wait_for(2));

        assert!(w.pause(Duration::from_secs(2)));
        assert!(w.pause(Duration::from_secs(2)), "pausing twice is fine");
        evt.write(3).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(seen.load(Ordering::SeqCst), 2, "no events while paused");

        w.resume();
        assert!(wait_for(5), "the held event is handled after resume");

        assert!(w.pause(Duration::from_secs(2)));
        w.stop(); // must not hang on a paused thread
        assert!(
            !w.pause(Duration::from_millis(10)),
            "a stopped worker cannot pause"
        );
    }

    #[test]
    fn a_quiescing_worker_finishes_its_work_before_it_pauses() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        // Work "in flight": taken by an event, finished only on QUIESCE.
        let (taken, finished) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (t, f, e) = (taken.clone(), finished.clone(), evt.try_clone().unwrap());
        let w = Worker::spawn_quiescing(
            "test_quiesce".into(),
            ThreadKind::Rng,
            vec![(evt.as_raw_fd(), 1, EventSet::IN)],
            move |token, _| {
                if token == QUIESCE {
                    f.store(t.load(Ordering::SeqCst), Ordering::SeqCst);
                } else {
                    t.fetch_add(e.read().unwrap_or(0), Ordering::SeqCst);
                }
                Next::Continue
            },
        )
        .unwrap();
        evt.write(4).unwrap();
        for _ in 0..200 {
            if taken.load(Ordering::SeqCst) == 4 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(finished.load(Ordering::SeqCst), 0);
        assert!(w.pause(Duration::from_secs(2)));
        assert_eq!(
            finished.load(Ordering::SeqCst),
            4,
            "paused with work in flight"
        );
        assert!(w.pause(Duration::from_secs(2)), "pausing again is fine");
        w.resume();
    }
}
