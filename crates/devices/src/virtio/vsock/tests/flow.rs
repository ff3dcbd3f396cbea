//! Credit flow control, malformed input, and the device on its worker thread.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::virtio::{ActivateContext, Interrupt, VirtioDevice};

/// Opens a guest-initiated connection from guest port 40000 to host port
/// `port` with guest buffer `buf_alloc`; returns the host end.
fn guest_connect(g: &mut Guest, port: u32, buf_alloc: u32) -> (UnixStream, UnixListener, PathBuf) {
    let mut p = g.uds.clone().into_os_string();
    p.push(format!("_{port}"));
    let path = PathBuf::from(p);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    g.send(ghdr(40000, port, OP_REQUEST, 0, buf_alloc, 0), &[]);
    assert_eq!(g.expect_packet().0.op, OP_RESPONSE);
    let (s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (s, listener, path)
}

/// Pumps a few times and returns every packet the device sent.
fn settle(g: &mut Guest) -> Vec<(Header, Vec<u8>)> {
    let mut out = vec![];
    for _ in 0..10 {
        g.pump();
        out.extend(g.recv());
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

#[test]
fn vsock_never_exceeds_guest_credit_and_asks_for_more() {
    let mut g = Guest::new("credit-rx");
    let (mut host, _l, path) = guest_connect(&mut g, 6000, 1000);
    let data = pattern(3, 5000);
    host.write_all(&data).unwrap();

    let mut got = vec![];
    for update in [Some(1000), None] {
        let pkts = settle(&mut g);
        let rw: Vec<u8> = pkts
            .iter()
            .filter(|p| p.0.op == OP_RW)
            .flat_map(|p| p.1.clone())
            .collect();
        assert_eq!(rw.len(), 1000, "exactly the guest's credit");
        assert_eq!(
            pkts.last().unwrap().0.op,
            OP_CREDIT_REQUEST,
            "then asks for credit"
        );
        assert_eq!(
            pkts.iter().filter(|p| p.0.op == OP_CREDIT_REQUEST).count(),
            1
        );
        got.extend(rw);
        if let Some(fwd) = update {
            g.send(ghdr(40000, 6000, OP_CREDIT_UPDATE, 0, 1000, fwd), &[]);
        }
    }
    assert_eq!(
        settle(&mut g).iter().map(|p| p.1.len()).sum::<usize>(),
        0,
        "credit exhausted"
    );
    // A credit request from the guest gets an update; a bigger buffer lets
    // the rest through.
    g.send(ghdr(40000, 6000, OP_CREDIT_REQUEST, 0, 1 << 20, 2000), &[]);
    let pkts = settle(&mut g);
    assert!(pkts
        .iter()
        .any(|p| p.0.op == OP_CREDIT_UPDATE && p.0.buf_alloc == CONN_BUF_ALLOC));
    got.extend(
        pkts.iter()
            .filter(|p| p.0.op == OP_RW)
            .flat_map(|p| p.1.clone()),
    );
    assert!(got == data, "bytes in order");
    assert_eq!(g.invalid(), 0);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn vsock_buffers_for_slow_host_within_advertised_credit() {
    let mut g = Guest::new("credit-tx");
    let (mut host, _l, path) = guest_connect(&mut g, 6001, 1 << 20);
    // The host does not read: the guest sends exactly what the device's
    // credit allows, and the device keeps it all.
    let (mut sent, mut dev_buf, mut dev_fwd) = (0u32, CONN_BUF_ALLOC, 0u32);
    let all = pattern(4, 4 << 20);
    loop {
        for (h, _) in settle(&mut g) {
            assert_ne!(h.op, OP_RST, "the device reset an honest guest");
            (dev_buf, dev_fwd) = (h.buf_alloc, h.fwd_cnt);
        }
        let credit = dev_buf.saturating_sub(sent.wrapping_sub(dev_fwd));
        if credit == 0 {
            break;
        }
        let n = credit.min(64 * 1024);
        let chunk = &all[sent as usize..(sent + n) as usize];
        g.send(ghdr(40000, 6001, OP_RW, n, 1 << 20, 0), chunk);
        sent += n;
        assert!((sent as usize) < all.len(), "credit never ran out");
    }
    assert!(sent >= CONN_BUF_ALLOC);
    // Now the host reads everything; the device flushes and updates credit.
    let want = all[..sent as usize].to_vec();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; want.len()];
        host.read_exact(&mut buf).unwrap();
        assert!(buf == want, "guest → host bytes differ");
        host
    });
    let t = Instant::now();
    while !reader.is_finished() {
        assert!(t.elapsed() < Duration::from_secs(10));
        for (h, _) in settle(&mut g) {
            dev_fwd = h.fwd_cnt;
        }
    }
    let mut host = reader.join().unwrap();
    assert!(
        sent.wrapping_sub(dev_fwd) < CONN_BUF_ALLOC / 4,
        "credit update after the flush"
    );
    assert_eq!(g.invalid(), 0);

    // A guest that ignores credit is reset, not allowed to grow the buffer.
    let mut reset = false;
    for _ in 0..32 {
        g.send(ghdr(40000, 6001, OP_RW, 65536, 1 << 20, 0), &all[..65536]);
        if settle(&mut g).iter().any(|p| p.0.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "credit overrun resets the connection");
    assert_eq!(g.invalid(), 1);
    assert_eq!(g.muxer().connections(), 0);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sink = vec![];
    host.read_to_end(&mut sink).unwrap();
    std::fs::remove_file(path).unwrap();
}

#[test]
fn vsock_malformed_packets_are_dropped_and_counted() {
    let mut g = Guest::bare("malformed");
    // An RX buffer too small for a header, one outside guest memory, then
    // good ones.
    g.rx.write_desc(&g.mem, 0, RX_DATA, 10, F_WRITE, 0);
    g.rx.publish(&g.mem, 0);
    g.rx.write_desc(&g.mem, 1, 0xfff0_0000, RX_BUF, F_WRITE, 0);
    g.rx.publish(&g.mem, 1);
    for i in 2..QSIZE {
        g.post_rx(i);
    }

    let good = ghdr(40000, 7000, OP_REQUEST, 0, 4096, 0).to_bytes();
    let mut bad_cid = ghdr(40000, 7000, OP_REQUEST, 0, 4096, 0);
    bad_cid.src_cid = 7;
    let mut bad_type = bad_cid;
    bad_type.src_cid = CID;
    bad_type.kind = 2;
    let mut bad_op = bad_type;
    bad_op.kind = TYPE_STREAM;
    bad_op.op = 99;
    let short_rw = ghdr(40000, 7000, OP_RW, 1000, 4096, 0);
    let huge_rw = ghdr(40000, 7000, OP_RW, 100_000, 4096, 0);

    g.send_bytes(&good[..20], &[]); // short header
    g.send(bad_cid, &[]); // wrong source CID: dropped silently
    g.send(bad_type, &[]); // SEQPACKET: dropped, reset
    g.send(bad_op, &[]); // unknown op: dropped, reset
    g.send(short_rw, &[1; 10]); // len larger than the buffer
    g.send(huge_rw, &[1; 10]); // len larger than any packet
    g.send_raw(&[(0xfff0_0000, HDR_LEN as u32, false)]); // outside guest memory
    g.send_raw(&[(TX_DATA, HDR_LEN as u32, true)]); // header device-writable
                                                    // A valid header split over two descriptors still works (no listener: RST).
    g.mem
        .write_slice(&good, vm_memory::GuestAddress(TX_DATA + 0x8000))
        .unwrap();
    g.send_raw(&[(TX_DATA + 0x8000, 20, false), (TX_DATA + 0x8014, 24, false)]);

    let used_before = g.rx.last_used;
    let pkts = settle(&mut g);
    assert_eq!(
        g.rx.last_used.wrapping_sub(used_before),
        5,
        "2 bad RX buffers + 3 resets"
    );
    let ops: Vec<u16> = pkts.iter().map(|p| p.0.op).collect();
    assert_eq!(ops, vec![OP_RST, OP_RST, OP_RST]);
    assert!(pkts
        .iter()
        .all(|p| p.0.dst_port == 40000 && p.0.dst_cid == CID));
    assert_eq!(g.invalid(), 8 + 2, "8 bad TX packets, 2 bad RX buffers");
    assert_eq!(g.muxer().connections(), 0);
}

#[test]
fn vsock_device_runs_on_its_worker_and_resets() {
    let path = std::env::temp_dir().join(format!("kiln-vsock-{}-device", std::process::id()));
    let mut dev = Vsock::new(VsockConfig {
        guest_cid: CID,
        uds_path: path.clone(),
    })
    .unwrap();
    // Borrow the rings of a harness guest (its own muxer stays idle).
    let mut g = Guest::new("device-rings");
    g.muxer = None;
    let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
    let (rx_evt, tx_evt, irq) = (evt(), evt(), evt());
    let ctx = ActivateContext {
        mem: g.mem.clone(),
        queues: vec![
            (g.rx.queue(&g.mem), rx_evt.try_clone().unwrap()),
            (g.tx.queue(&g.mem), tx_evt.try_clone().unwrap()),
            (Ring::new(0x8000).queue(&g.mem), evt()),
        ],
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
    };
    dev.activate(ctx).unwrap();

    let wait_packet = |g: &mut Guest| {
        let t = Instant::now();
        loop {
            assert!(t.elapsed() < Duration::from_secs(5), "no interrupt");
            if irq.read().is_ok() {
                if let Some(p) = g.recv().pop() {
                    return p;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let mut client = UnixStream::connect(&path).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    client.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = wait_packet(&mut g);
    assert_eq!((req.op, req.dst_port), (OP_REQUEST, 52));
    g.send(ghdr(52, req.src_port, OP_RESPONSE, 0, 65536, 0), &[]);
    tx_evt.write(1).unwrap();
    assert_eq!(read_line(&mut client), format!("OK {}", req.src_port));
    client.write_all(b"ping").unwrap();
    let (h, data) = wait_packet(&mut g);
    assert_eq!((h.op, &data[..]), (OP_RW, &b"ping"[..]));

    // Reset closes every connection; the listening socket stays.
    dev.reset();
    let mut b = [0u8; 1];
    assert_eq!(client.read(&mut b).unwrap(), 0);
    UnixStream::connect(&path).expect("still listening after reset");
    drop(dev);
    assert!(!path.exists());
}

#[test]
fn a_restored_device_sends_the_guest_a_transport_reset() {
    let path = std::env::temp_dir().join(format!("kiln-vsock-{}-reset", std::process::id()));
    let mut dev = Vsock::new(VsockConfig {
        guest_cid: CID,
        uds_path: path.clone(),
    })
    .unwrap();
    let mut g = Guest::new("reset-rings");
    g.muxer = None;
    let evt = || EventFd::new(EFD_NONBLOCK).unwrap();
    let (ev_evt, irq) = (evt(), evt());
    let mut events = Ring::new(0x8000);
    let ctx = ActivateContext {
        mem: g.mem.clone(),
        queues: vec![
            (g.rx.queue(&g.mem), evt()),
            (g.tx.queue(&g.mem), evt()),
            (events.queue(&g.mem), ev_evt.try_clone().unwrap()),
        ],
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
    };
    dev.activate(ctx).unwrap();
    // Restored before the guest posts an event buffer: owed, not lost.
    g.mem
        .write_obj(0xffff_ffffu32, vm_memory::GuestAddress(0xc000))
        .unwrap();
    dev.restored();
    std::thread::sleep(Duration::from_millis(50));
    assert!(events.take_used(&g.mem).is_empty());
    // The guest posts one writable 4-byte buffer and kicks the queue.
    events.write_desc(&g.mem, 0, 0xc000, 4, 2 /* VIRTQ_DESC_F_WRITE */, 0);
    events.publish(&g.mem, 0);
    ev_evt.write(1).unwrap();
    let t = Instant::now();
    let used = loop {
        let u = events.take_used(&g.mem);
        if !u.is_empty() {
            break u;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "no reset event");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(used, vec![(0, 4)]);
    let id: u32 = g.mem.read_obj(vm_memory::GuestAddress(0xc000)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    assert!(irq.read().is_ok(), "the guest was interrupted");
    dev.reset();
    drop(dev);
    let _ = std::fs::remove_file(path);
}
