//! virtio-rng: entropy from the host's getrandom(2).

use crate::GuestMem;
use kiln_seccomp::ThreadKind;
use std::io::Write;
use std::sync::Arc;

use std::os::fd::AsRawFd;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{Queue, QueueT, Writer};
use vmm_sys_util::epoll::EventSet;

use super::worker::{Next, Worker};
use super::{ActivateContext, ActivateError, DeviceMetrics, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::rate_limiter::{self, RateLimiter, RateLimiterConfig};

const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
    rate_limiter: Option<RateLimiterConfig>,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self::default()
    }

    /// An entropy device under `limits` (bandwidth: bytes handed to the
    /// guest; ops: requests); `None` is unlimited.
    pub fn with_rate_limiter(limits: Option<RateLimiterConfig>) -> Self {
        Self {
            rate_limiter: limits,
            ..Self::default()
        }
    }
}

fn fill_random(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let r = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if r < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        done += r as usize;
    }
    true
}

/// Answers every available request; returns whether any completed.
pub fn drain_queue(queue: &mut Queue, mem: &GuestMem, metrics: &DeviceMetrics) -> bool {
    drain_queue_limited(queue, mem, metrics, None)
}

/// [`drain_queue`] under `limiter`: stops at the first request the limiter
/// refuses, leaving it available for when the limiter's timer fires.
pub fn drain_queue_limited(
    queue: &mut Queue,
    mem: &GuestMem,
    metrics: &DeviceMetrics,
    mut limiter: Option<&mut RateLimiter>,
) -> bool {
    let mut used = false;
    let mut buf = vec![0u8; MAX_REQUEST];
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = match Writer::new(mem, chain) {
            Ok(mut w) => {
                let n = w.available_bytes().min(MAX_REQUEST);
                let limiter = limiter.as_deref_mut();
                if n > 0 && !rate_limiter::admit(limiter, 1, n as u64, &metrics.throttled) {
                    virtio_queue::QueueOwnedT::go_to_previous_position(queue);
                    break;
                }
                if n > 0 && fill_random(&mut buf[..n]) && w.write_all(&buf[..n]).is_ok() {
                    DeviceMetrics::add(&metrics.bytes_to_guest, n as u64);
                    DeviceMetrics::add(&metrics.requests, 1);
                    n as u32
                } else {
                    DeviceMetrics::add(&metrics.invalid_requests, 1);
                    0
                }
            }
            Err(_) => {
                DeviceMetrics::add(&metrics.invalid_requests, 1);
                0
            }
        };
        let _ = queue.add_used(mem, head, len);
        used = true;
    }
    used
}

impl VirtioDevice for Rng {
    fn name(&self) -> String {
        "rng".into()
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let ActivateContext {
            mem,
            queues,
            interrupt,
        } = ctx;
        let Some((mut queue, evt)) = queues.into_iter().next() else {
            return Err(ActivateError::Queues {
                device: self.name(),
                got: 0,
                want: 1,
            });
        };
        let metrics = self.metrics.clone();
        let io_err = |source| ActivateError::Io {
            device: self.name(),
            source,
        };
        let mut limiter = rate_limiter::build(self.rate_limiter.as_ref()).map_err(io_err)?;
        let mut fds = vec![(evt.as_raw_fd(), 0, EventSet::IN)];
        fds.extend(limiter.as_ref().map(|l| (l.as_raw_fd(), 1, EventSet::IN)));
        let worker = Worker::spawn("kiln_rng".into(), ThreadKind::Rng, fds, move |token, _| {
            match (token, limiter.as_mut()) {
                (1, Some(l)) => l.event_handler(),
                _ => {
                    let _ = evt.read();
                }
            }
            if drain_queue_limited(&mut queue, &mem, &metrics, limiter.as_mut()) {
                interrupt.signal_used();
            }
            Next::Continue
        })
        .map_err(|source| ActivateError::Io {
            device: self.name(),
            source,
        })?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn worker(&self) -> Option<&super::worker::Worker> {
        self.worker.as_ref()
    }

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{ChainBuilder, Desc};

    #[test]
    fn rate_limited_requests_wait_for_the_refill_in_order() {
        use crate::rate_limiter::tests::wait_for_timer;
        use std::sync::atomic::Ordering::Relaxed;
        let m = DeviceMetrics::default();
        // 64 bytes per 60 ms: two 32-byte requests now, the others later.
        let cfg = RateLimiterConfig::parse_opts("bw=64/60").unwrap();
        let mut rl = RateLimiter::new(&cfg).unwrap();
        let mut q = ChainBuilder::new();
        for _ in 0..4 {
            q.push(&[Desc::w(32)]);
        }
        let start = std::time::Instant::now();
        let mut state = None;
        let mut run = |q: &mut ChainBuilder, rl: &mut RateLimiter| {
            q.run(|mem, queue| {
                if let Some(s) = state.take() {
                    *queue = Queue::try_from(s).unwrap();
                }
                let r = drain_queue_limited(queue, mem, &m, Some(rl));
                state = Some(queue.state());
                r
            })
        };
        let mut used = run(&mut q, &mut rl);
        assert_eq!(used, vec![(0, 32), (1, 32)], "served partially");
        assert!(rl.is_blocked());
        while used.len() < 4 {
            wait_for_timer(&mut rl);
            used = run(&mut q, &mut rl);
        }
        let waited = start.elapsed();
        assert!(waited >= std::time::Duration::from_millis(55), "{waited:?}");
        assert_eq!(used, vec![(0, 32), (1, 32), (2, 32), (3, 32)]);
        assert_eq!(m.bytes_to_guest.load(Relaxed), 128);
        assert!(m.throttled.load(Relaxed) >= 1);
    }

    /// The worker resumes a throttled queue on its own when the limiter's
    /// timer fires: one kick, every request served, in order.
    #[test]
    fn worker_resumes_on_the_limiter_timer_without_a_kick() {
        use crate::virtio::Interrupt;
        use std::sync::atomic::Ordering::Relaxed;
        use std::time::{Duration, Instant};
        use vmm_sys_util::eventfd::EventFd;
        let cfg = RateLimiterConfig::parse_opts("bw=64/60").unwrap();
        let mut rng = Rng::with_rate_limiter(Some(cfg));
        let mut q = ChainBuilder::new();
        for _ in 0..4 {
            q.push(&[Desc::w(32)]);
        }
        let mut st = None;
        q.run(|_, queue| {
            st = Some(queue.state());
            false
        });
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        rng.activate(ActivateContext {
            mem: q.mem().clone(),
            queues: vec![(
                Queue::try_from(st.unwrap()).unwrap(),
                evt.try_clone().unwrap(),
            )],
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        })
        .unwrap();
        let start = Instant::now();
        evt.write(1).unwrap();
        let deadline = start + Duration::from_secs(5);
        let used = loop {
            let used = q.run(|_, _| false);
            if used.len() == 4 || Instant::now() > deadline {
                break used;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let waited = start.elapsed();
        rng.reset();
        assert_eq!(used, vec![(0, 32), (1, 32), (2, 32), (3, 32)]);
        assert!(waited >= Duration::from_millis(55), "{waited:?}");
        assert!(rng.metrics().throttled.load(Relaxed) >= 1);
    }

    #[test]
    fn fills_writable_buffers_and_rejects_bad_ones() {
        let m = DeviceMetrics::default();
        let mut q = ChainBuilder::new();
        q.push(&[Desc::w(64)]);
        q.push(&[Desc::w(16), Desc::w(16)]);
        q.push(&[Desc::r(&[1, 2, 3])]); // nothing writable
        q.push(&[Desc::raw(0xfff0_0000, 64, true)]); // outside memory
        let used = q.run(|mem, queue| drain_queue(queue, mem, &m));
        assert_eq!(
            used.iter().map(|u| u.1).collect::<Vec<_>>(),
            vec![64, 32, 0, 0]
        );
        assert_ne!(q.written(0, 0), vec![0u8; 64], "random bytes, not zeros");
        assert_eq!(
            m.invalid_requests
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }
}
