//! Handshakes in both directions, refusals, closing and bulk data.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::*;

#[test]
fn vsock_device_basics_and_socket_path() {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("kiln-vsock-{}-basics", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let cfg = |cid| VsockConfig {
        guest_cid: cid,
        uds_path: path.clone(),
    };
    assert!(matches!(Vsock::new(cfg(2)), Err(VsockError::Cid(2))));
    assert!(matches!(Vsock::new(cfg(1 << 32)), Err(VsockError::Cid(_))));

    // A regular file in the way is refused and left alone.
    std::fs::write(&path, b"precious").unwrap();
    let e = Vsock::new(cfg(3)).err().unwrap();
    assert!(matches!(e, VsockError::NotASocket(_)), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();

    // A live listener is in use; a stale socket file is replaced.
    let other = UnixListener::bind(&path).unwrap();
    assert!(matches!(Vsock::new(cfg(3)), Err(VsockError::InUse(_))));
    drop(other);
    assert!(path.exists(), "stale socket file left behind");
    let v = Vsock::new(cfg(0x1234_5678)).unwrap();
    assert_eq!(v.device_type(), 19);
    assert_eq!(v.queue_max_sizes().len(), 3);
    assert_eq!(v.features(), crate::virtio::VIRTIO_F_VERSION_1);
    let mut cid = [0u8; 8];
    v.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), 0x1234_5678);
    let mut hi = [0xffu8; 4];
    v.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    UnixStream::connect(&path).expect("device listens");
    drop(v);
    assert!(!path.exists(), "socket removed on drop");
}

#[test]
fn vsock_host_initiated_handshake() {
    let mut g = Guest::new("handshake");
    let (mut client, req) = host_connect(&mut g, 1234);
    assert_eq!(
        (req.src_cid, req.dst_cid, req.dst_port),
        (HOST_CID, CID, 1234)
    );
    assert!(req.src_port >= FIRST_LOCAL_PORT);
    assert_eq!(
        (req.kind, req.len, req.buf_alloc),
        (TYPE_STREAM, 0, CONN_BUF_ALLOC)
    );

    g.send(ghdr(1234, req.src_port, OP_RESPONSE, 0, 65536, 0), &[]);
    g.pump();
    assert_eq!(read_line(&mut client), format!("OK {}", req.src_port));

    // A second client gets another local port.
    let (_c2, req2) = host_connect(&mut g, 1234);
    assert_ne!(req2.src_port, req.src_port);
    assert_eq!(g.invalid(), 0);
}

#[test]
fn vsock_host_initiated_refused_and_bad_handshakes() {
    let mut g = Guest::new("refused");
    let (mut client, req) = host_connect(&mut g, 99);
    g.send(ghdr(99, req.src_port, OP_RST, 0, 0, 0), &[]);
    g.pump();
    let mut b = [0u8; 8];
    assert_eq!(client.read(&mut b).unwrap(), 0, "client closed on RST");
    assert_eq!(g.muxer().connections(), 0);

    for bad in [
        "HELLO 5\n",
        "CONNECT\n",
        "CONNECT x\n",
        "CONNECT 123456789012345678901234567890123\n",
    ] {
        let mut c = UnixStream::connect(&g.uds).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(bad.as_bytes()).unwrap();
        for _ in 0..5 {
            g.pump();
        }
        assert_eq!(c.read(&mut b).unwrap_or(0), 0, "{bad:?} closes the client");
        assert!(g.recv().is_empty(), "{bad:?} sends nothing to the guest");
    }
}

/// 300 KiB each way through a host-initiated connection, with a guest that
/// advertises a small buffer and checks the device never exceeds its credit.
#[test]
fn vsock_data_both_ways_with_integrity() {
    const N: usize = 300 * 1024;
    const GUEST_BUF: u32 = 64 * 1024;
    let mut g = Guest::new("data");
    let (client, req) = host_connect(&mut g, 5000);
    let local = req.src_port;
    let port = 5000;
    g.send(ghdr(port, local, OP_RESPONSE, 0, GUEST_BUF, 0), &[]);

    let host_out = pattern(1, N);
    let guest_out = pattern(2, N);
    let to_guest = host_out.clone();
    let host = std::thread::spawn(move || {
        let mut client = client;
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        assert_eq!(read_line(&mut client), format!("OK {local}"));
        let mut w = client.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&to_guest).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut got = vec![];
        client.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        got
    });

    let mut got = Vec::new();
    let (mut fwd_cnt, mut advertised) = (0u32, 0u32);
    let (mut sent, mut dev_buf, mut dev_fwd) = (0usize, req.buf_alloc, req.fwd_cnt);
    let (mut host_eof, mut shut_sent, mut reset, mut asked) = (false, false, false, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reset {
        assert!(
            Instant::now() < deadline,
            "stalled: got {} sent {sent}",
            got.len()
        );
        g.pump();
        for (h, data) in g.recv() {
            assert_eq!((h.src_port, h.dst_port), (local, port));
            dev_buf = h.buf_alloc;
            dev_fwd = h.fwd_cnt;
            match h.op {
                OP_RW => {
                    assert!(!host_eof, "data after shutdown");
                    got.extend_from_slice(&data);
                    fwd_cnt = fwd_cnt.wrapping_add(data.len() as u32);
                    assert!(
                        fwd_cnt.wrapping_sub(advertised) <= GUEST_BUF,
                        "device exceeded guest credit"
                    );
                }
                OP_CREDIT_REQUEST => asked = true,
                OP_CREDIT_UPDATE => {}
                OP_SHUTDOWN => {
                    assert_eq!(h.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);
                    host_eof = true;
                }
                OP_RST => reset = true,
                op => panic!("unexpected op {op}"),
            }
        }
        // Like Linux: tell the device once half the buffer was consumed,
        // or when it asked.
        if fwd_cnt.wrapping_sub(advertised) >= GUEST_BUF / 2 || asked {
            g.send(
                ghdr(port, local, OP_CREDIT_UPDATE, 0, GUEST_BUF, fwd_cnt),
                &[],
            );
            advertised = fwd_cnt;
            asked = false;
        }
        let credit = dev_buf.saturating_sub((sent as u32).wrapping_sub(dev_fwd)) as usize;
        let n = (N - sent).min(credit).min(16 * 1024);
        if n > 0 && g.can_send() {
            let h = ghdr(port, local, OP_RW, n as u32, GUEST_BUF, fwd_cnt);
            g.send(h, &guest_out[sent..sent + n]);
            advertised = fwd_cnt;
            sent += n;
        } else if sent == N && host_eof && !shut_sent && g.can_send() {
            let mut h = ghdr(port, local, OP_SHUTDOWN, 0, GUEST_BUF, fwd_cnt);
            h.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
            g.send(h, &[]);
            shut_sent = true;
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    assert!(shut_sent, "the device reset only after the guest closed");
    assert!(
        got == host_out,
        "host → guest bytes differ ({} of {N} received)",
        got.len()
    );
    let host_got = host.join().unwrap();
    assert!(
        host_got == guest_out,
        "guest → host bytes differ ({} of {N})",
        host_got.len()
    );
    assert_eq!(g.muxer().connections(), 0);
    assert_eq!(g.invalid(), 0);
    assert_eq!(g.metrics.bytes_to_guest.load(Ordering::Relaxed), N as u64);
    assert_eq!(g.metrics.bytes_from_guest.load(Ordering::Relaxed), N as u64);
}

#[test]
fn vsock_guest_initiated_connect_refusal_and_close() {
    let mut g = Guest::new("guestconn");
    let mut p = g.uds.clone().into_os_string();
    p.push("_5000");
    let host_path = PathBuf::from(p);
    let _ = std::fs::remove_file(&host_path);
    let host = UnixListener::bind(&host_path).unwrap();

    g.send(ghdr(40000, 5000, OP_REQUEST, 0, 65536, 0), &[]);
    let (resp, _) = g.expect_packet();
    assert_eq!(
        (resp.op, resp.src_port, resp.dst_port, resp.dst_cid),
        (OP_RESPONSE, 5000, 40000, CID)
    );
    assert_eq!(resp.buf_alloc, CONN_BUF_ALLOC);
    let (mut s, _) = host.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    g.send(ghdr(40000, 5000, OP_RW, 5, 65536, 0), b"hello");
    g.pump();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"hello");

    s.write_all(b"world").unwrap();
    let (h, data) = g.expect_packet();
    assert_eq!((h.op, h.len, &data[..]), (OP_RW, 5, &b"world"[..]));
    assert_eq!(h.fwd_cnt, 5, "the device reports bytes it forwarded");

    // The guest closes: the host sees EOF, the guest gets its RST.
    let mut h = ghdr(40000, 5000, OP_SHUTDOWN, 0, 65536, 5);
    h.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(h, &[]);
    let (rst, _) = g.expect_packet();
    assert_eq!((rst.op, rst.dst_port), (OP_RST, 40000));
    assert_eq!(s.read(&mut b).unwrap(), 0);
    assert_eq!(g.muxer().connections(), 0);

    // Nobody listens on port 5001: refused.
    g.send(ghdr(40001, 5001, OP_REQUEST, 0, 65536, 0), &[]);
    let (rst, _) = g.expect_packet();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, 5001, 40001));
    // Data for a connection that does not exist: reset.
    g.send(ghdr(40002, 5000, OP_RW, 3, 65536, 0), b"abc");
    assert_eq!(g.expect_packet().0.op, OP_RST);
    // A guest RST for nothing gets no answer.
    g.send(ghdr(40003, 5000, OP_RST, 0, 0, 0), &[]);
    g.pump();
    assert!(g.recv().is_empty());
    assert_eq!(g.invalid(), 0);
    std::fs::remove_file(&host_path).unwrap();
}

#[test]
fn vsock_host_connect_times_out_when_the_guest_never_answers() {
    let mut g = Guest::new("timeout");
    let (mut client, req) = host_connect(&mut g, 77);
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let t = Instant::now();
    let (rst, _) = loop {
        assert!(t.elapsed() < Duration::from_secs(5), "no timeout");
        g.pump();
        if let Some(p) = g.recv().pop() {
            break p;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(t.elapsed() >= Duration::from_millis(1500));
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (OP_RST, req.src_port, 77)
    );
    let mut b = [0u8; 4];
    assert_eq!(client.read(&mut b).unwrap(), 0, "client closed");
    assert_eq!(g.muxer().connections(), 0);
}
