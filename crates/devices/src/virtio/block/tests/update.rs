//! Tests of [`BlockHandle::update`] on a running device (a child of
//! `block::tests`, for its queue helpers).

use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::rate_limiter::{BucketUpdate, TokenBucketConfig};
use crate::virtio::{Interrupt, INT_CONFIG};

/// Waits (at most 5 s) until `n` requests are used.
fn wait_used(bq: &BigQueue, n: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while bq.used_idx() < n {
        assert!(Instant::now() < deadline, "{what}: timed out");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Reads 512 bytes at `sector` through the worker; returns (status, data).
fn read_sector(bq: &mut BigQueue, kick: &EventFd, sector: u64) -> (u8, Vec<u8>) {
    let (_, addrs) = bq.push(&[
        Buf::R(header(VIRTIO_BLK_T_IN, sector)),
        Buf::W(512),
        Buf::W(1),
    ]);
    let n = bq.used_idx() + 1;
    kick.write(1).unwrap();
    wait_used(bq, n, "read");
    (bq.read(addrs[2], 1)[0], bq.read(addrs[1], 512))
}

fn capacity_in_config(dev: &Block) -> u64 {
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b);
    u64::from_le_bytes(b)
}

#[test]
fn block_file_and_limiter_replaced_while_running() {
    for engine in ENGINES {
        let old = temp_disk(&[0xaa; 4096]);
        let new = temp_disk(&[0xbb; 8192]);
        let mut dev = open(config(&old, false, engine));
        let handle = dev.handle();
        let mut bq = BigQueue::new();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        dev.activate(ActivateContext {
            mem: bq.mem.clone(),
            queues: vec![(bq.queue(), kick.try_clone().unwrap())],
            interrupt: interrupt.clone(),
        })
        .unwrap();
        assert_eq!(read_sector(&mut bq, &kick, 0), (OK, vec![0xaa; 512]));
        // Sector 8 is past the old disk's end.
        assert_eq!(read_sector(&mut bq, &kick, 8).0, IOERR, "{engine}");
        interrupt.ack(u32::MAX);

        // A missing file: an error naming it, and the old file stays.
        let missing = old.with_extension("missing");
        let e = handle.update(Some(&missing), None).unwrap_err();
        assert!(matches!(e, BlockError::Open { .. }), "{engine}: {e:?}");
        assert!(e.to_string().contains("No such file"), "{e}");
        assert_eq!(handle.path(), old, "{engine}");
        assert_eq!(capacity_in_config(&dev), 8, "{engine}");
        assert_eq!(interrupt.status() & INT_CONFIG, 0, "{engine}");
        // A file of the wrong size is refused too.
        let odd = temp_disk(&[1; 1000]);
        let e = handle.update(Some(&odd), None).unwrap_err();
        assert!(matches!(e, BlockError::Size { size: 1000, .. }), "{e:?}");

        // The new file: capacity, config interrupt, data.
        handle.update(Some(&new), None).unwrap();
        assert_eq!(handle.path(), new, "{engine}");
        assert_eq!(capacity_in_config(&dev), 16, "{engine}");
        assert_eq!(handle.capacity(), 16, "{engine}");
        assert_ne!(interrupt.status() & INT_CONFIG, 0, "{engine}: config irq");
        assert_eq!(read_sector(&mut bq, &kick, 8), (OK, vec![0xbb; 512]));
        assert_eq!(read_sector(&mut bq, &kick, 0).1, vec![0xbb; 512]);

        // An ops limit of one request a minute: the next read waits...
        let ops = |size| TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms: 60_000,
        };
        let limit = RateLimiterUpdate {
            bandwidth: BucketUpdate::Keep,
            ops: BucketUpdate::Set(ops(1)),
        };
        handle.update(None, Some(&limit)).unwrap();
        assert_eq!(handle.rate_limiter().ops, Some(ops(1)));
        assert_eq!(handle.path(), new, "a limiter-only update keeps the file");
        assert_eq!(read_sector(&mut bq, &kick, 1).0, OK);
        let before = bq.used_idx();
        bq.push(&[Buf::R(header(VIRTIO_BLK_T_IN, 2)), Buf::W(512), Buf::W(1)]);
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(bq.used_idx(), before, "{engine}: throttled");
        // ... until the limit is removed, which serves it without a kick.
        let unlimit = RateLimiterUpdate {
            bandwidth: BucketUpdate::Keep,
            ops: BucketUpdate::Disable,
        };
        handle.update(None, Some(&unlimit)).unwrap();
        wait_used(&bq, before + 1, "after the limit was removed");
        assert!(handle.rate_limiter().is_unlimited());

        // The old file was never written.
        assert_eq!(std::fs::read(&old).unwrap(), vec![0xaa; 4096]);
        drop(dev);
        for p in [old, new, odd] {
            std::fs::remove_file(p).unwrap();
        }
    }
}

#[test]
fn block_update_before_activation_is_kept_for_the_driver() {
    let old = temp_disk(&[1; 512]);
    let new = temp_disk(&[2; 2048]);
    let dev = open(config(&old, true, BlockEngine::Sync));
    let t = Instant::now();
    dev.handle().update(Some(&new), None).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "no worker to wait for"
    );
    assert_eq!(dev.capacity(), 4);
    let mut be = dev.backend();
    let mut q = ChainBuilder::new();
    q.push(&[
        Desc::r(&header(VIRTIO_BLK_T_IN, 3)),
        Desc::w(512),
        Desc::w(1),
    ]);
    // The read-only drive stays read-only on its new file.
    q.push(&[
        Desc::r(&header(VIRTIO_BLK_T_OUT, 0)),
        Desc::r(&[9; 512]),
        Desc::w(1),
    ]);
    run(BlockEngine::Sync, &mut be, &mut q);
    assert_eq!(q.written(0, 1), vec![2; 512]);
    assert_eq!(q.written(1, 2), vec![IOERR]);
    assert_eq!(std::fs::read(&new).unwrap(), vec![2; 2048]);
    std::fs::remove_file(old).unwrap();
    std::fs::remove_file(new).unwrap();
}
