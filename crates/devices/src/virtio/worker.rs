//! A device worker thread: one epoll over the device's eventfds and backend
//! fds, plus a kill eventfd to stop it.

use std::os::fd::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const KILL_TOKEN: u64 = u64::MAX;

/// A running worker; dropping it stops the thread.
pub struct Worker {
    kill: EventFd,
    handle: Option<JoinHandle<()>>,
}

/// What the handler tells the loop after an event.
pub enum Next {
    /// Keep running.
    Continue,
    /// Stop the worker (the device hit an error it cannot recover from).
    Stop,
}

impl Worker {
    /// Spawns thread `name` that waits on `fds` (fd, token, events) and calls
    /// `handler(token, events)` for each ready fd. The handler owns the device
    /// state (queues, backend) for the life of the thread.
    pub fn spawn<F>(
        name: String,
        fds: Vec<(RawFd, u64, EventSet)>,
        mut handler: F,
    ) -> std::io::Result<Self>
    where
        F: FnMut(u64, EventSet) -> Next + Send + 'static,
    {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL_TOKEN),
        )?;
        for (fd, token, events) in fds {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))?;
        }
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
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
                        if ev.data() == KILL_TOKEN {
                            return;
                        }
                        if let Next::Stop = handler(ev.data(), ev.event_set()) {
                            log::error!("{name}: worker stopped");
                            return;
                        }
                    }
                }
            })?;
        Ok(Self {
            kill,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.kill.write(1);
            let _ = h.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}
