//! virtio-rng: entropy from the host's getrandom(2).

use std::io::Write;
use std::sync::Arc;

use std::os::fd::AsRawFd;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::{Queue, QueueT, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::worker::{Next, Worker};
use super::{ActivateContext, ActivateError, DeviceMetrics, VirtioDevice, VIRTIO_F_VERSION_1};

const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request.
pub const MAX_REQUEST: usize = 64 * 1024;

/// The entropy device.
#[derive(Default)]
pub struct Rng {
    worker: Option<Worker>,
    metrics: Arc<DeviceMetrics>,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self::default()
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
pub fn drain_queue(queue: &mut Queue, mem: &GuestMemoryMmap, metrics: &DeviceMetrics) -> bool {
    let mut used = false;
    let mut buf = vec![0u8; MAX_REQUEST];
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = match Writer::new(mem, chain) {
            Ok(mut w) => {
                let n = w.available_bytes().min(MAX_REQUEST);
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
        let fd = evt.as_raw_fd();
        let worker = Worker::spawn(
            "kiln_rng".into(),
            vec![(fd, 0, EventSet::IN)],
            move |_, _| {
                let _ = evt.read();
                if drain_queue(&mut queue, &mem, &metrics) {
                    interrupt.signal_used();
                }
                Next::Continue
            },
        )
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

    fn metrics(&self) -> Arc<DeviceMetrics> {
        self.metrics.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{ChainBuilder, Desc};

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
