//! Raw request bytes in, response bytes out.

use std::sync::Mutex;

use crate::server::serve_connection;
use crate::*;

/// A VM with (optionally) a balloon.
struct FakeVm {
    balloon: Option<Mutex<u64>>,
    stats: bool,
}

impl VmControl for FakeVm {
    fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            id: "anonymous-instance".into(),
            state: "Running".into(),
            vmm_version: "0.1.0".into(),
            app_name: "kiln".into(),
        }
    }
    fn balloon(&self) -> Result<Balloon, ApiError> {
        let b = self.balloon.as_ref().ok_or(ApiError::NoBalloon)?;
        Ok(Balloon {
            amount_mib: *b.lock().unwrap(),
            deflate_on_oom: true,
            stats_polling_interval_s: u32::from(self.stats),
            free_page_hinting: false,
            free_page_reporting: false,
        })
    }
    fn update_balloon(&self, u: &BalloonUpdate) -> Result<(), ApiError> {
        let b = self.balloon.as_ref().ok_or(ApiError::NoBalloon)?;
        if u.amount_mib > 1024 {
            return Err(ApiError::Invalid(
                "Amount of pages requested is too large".into(),
            ));
        }
        *b.lock().unwrap() = u.amount_mib;
        Ok(())
    }
    fn balloon_stats(&self) -> Result<BalloonStats, ApiError> {
        let b = self.balloon.as_ref().ok_or(ApiError::NoBalloon)?;
        if !self.stats {
            return Err(ApiError::StatsDisabled);
        }
        let t = *b.lock().unwrap();
        Ok(BalloonStats::from_device(
            t,
            t / 2,
            &[(4, 1000), (5, 2000), (6, 1500), (99, 1)],
        ))
    }
}

fn vm() -> FakeVm {
    FakeVm {
        balloon: Some(Mutex::new(0)),
        stats: true,
    }
}

/// Serves `input` on one connection; returns everything written.
fn serve(vm: &FakeVm, input: &[u8]) -> String {
    let mut out = Vec::new();
    serve_connection(input, &mut out, vm, DEFAULT_MAX_PAYLOAD);
    String::from_utf8(out).expect("responses are UTF-8")
}

fn patch(body: &str) -> String {
    format!(
        "PATCH /balloon HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// The `(status, body)` of each response in `out`.
fn responses(out: &str) -> Vec<(u16, String)> {
    let mut v = Vec::new();
    let mut rest = out;
    while !rest.is_empty() {
        let (head, after) = rest.split_once("\r\n\r\n").expect("response head");
        let status = head[9..12].parse().unwrap();
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |n| n.parse().unwrap());
        v.push((status, after[..len].to_string()));
        rest = &after[len..];
    }
    v
}

fn fault_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON body");
    v["fault_message"]
        .as_str()
        .expect("fault_message")
        .to_string()
}

#[test]
fn get_root_and_version() {
    let out = serve(
        &vm(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /version HTTP/1.1\r\n\r\n",
    );
    let r = responses(&out);
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.contains("Content-Type: application/json\r\n"));
    assert_eq!(r[0].0, 200);
    assert_eq!(
        r[0].1,
        r#"{"id":"anonymous-instance","state":"Running","vmm_version":"0.1.0","app_name":"kiln"}"#
    );
    assert_eq!(
        r[1],
        (200, r#"{"firecracker_version":"0.1.0"}"#.to_string())
    );
}

#[test]
fn patch_then_get_balloon_keep_alive() {
    let v = vm();
    let input = format!(
        "{}GET /balloon HTTP/1.1\r\n\r\nGET /balloon/statistics HTTP/1.1\r\n\r\n",
        patch(r#"{"amount_mib": 128}"#)
    );
    let out = serve(&v, input.as_bytes());
    assert!(out.starts_with("HTTP/1.1 204 No Content\r\n"), "{out}");
    let r = responses(&out);
    assert_eq!(r.len(), 3, "{out}");
    assert_eq!(r[0], (204, String::new()));
    assert_eq!(
        r[1],
        (
            200,
            r#"{"amount_mib":128,"deflate_on_oom":true,"stats_polling_interval_s":1,"free_page_hinting":false,"free_page_reporting":false}"#
                .into()
        )
    );
    assert_eq!(
        r[2].1,
        r#"{"target_pages":32768,"actual_pages":16384,"target_mib":128,"actual_mib":64,"free_memory":1000,"total_memory":2000,"available_memory":1500}"#
    );
    assert!(!out.contains("Connection: close"), "{out}");
}

#[test]
fn bad_bodies_are_400_and_keep_the_connection() {
    let v = vm();
    let cases = [
        (r#"{"amount_mib":"x"}"#, "invalid type"),
        (r#"{"amount_mib":1,"extra":2}"#, "unknown field `extra`"),
        (r#"{"amount_mib":"#, "EOF while parsing"),
        (r#"{}"#, "missing field `amount_mib`"),
        (r#"{"amount_mib":-1}"#, "invalid value"),
        (r#"{"amount_mib":4096}"#, "too large"),
        ("\u{0}\u{1}", "Invalid request body"),
        ("", "body is empty"),
    ];
    for (body, expect) in cases {
        // Each bad request is followed by a good one on the same connection.
        let input = format!("{}GET /balloon HTTP/1.1\r\n\r\n", patch(body));
        let out = serve(&v, input.as_bytes());
        let r = responses(&out);
        assert_eq!(r.len(), 2, "{body}: {out}");
        assert_eq!(r[0].0, 400, "{body}: {out}");
        let msg = fault_of(&r[0].1);
        assert!(msg.contains(expect), "{body}: {msg}");
        assert_eq!(r[1].0, 200, "{body}: {out}");
    }
    assert_eq!(*v.balloon.as_ref().unwrap().lock().unwrap(), 0);
}

#[test]
fn non_utf8_body_is_400_and_keeps_the_connection() {
    let mut input = b"PATCH /balloon HTTP/1.1\r\nContent-Length: 4\r\n\r\n\xff\xfe\x80{".to_vec();
    input.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    let out = String::from_utf8({
        let mut o = Vec::new();
        serve_connection(&input[..], &mut o, &vm(), DEFAULT_MAX_PAYLOAD);
        o
    })
    .unwrap();
    let r = responses(&out);
    assert_eq!((r[0].0, r[1].0), (400, 200), "{out}");
}

#[test]
fn unknown_paths_and_methods() {
    for req in [
        "GET /nope HTTP/1.1\r\n\r\n",
        "DELETE /balloon HTTP/1.1\r\n\r\n",
        "PUT /balloon/statistics HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        "get / HTTP/1.1\r\n\r\n",
    ] {
        let out = serve(&vm(), req.as_bytes());
        let r = responses(&out);
        assert_eq!(r.len(), 1, "{req}: {out}");
        assert_eq!(r[0].0, 400, "{req}: {out}");
        assert!(
            fault_of(&r[0].1).starts_with("Invalid request method and/or path"),
            "{out}"
        );
    }
}

#[test]
fn no_balloon_and_no_stats() {
    let none = FakeVm {
        balloon: None,
        stats: false,
    };
    let out = serve(
        &none,
        format!(
            "GET /balloon HTTP/1.1\r\n\r\n{}GET /balloon/statistics HTTP/1.1\r\n\r\n",
            patch(r#"{"amount_mib":1}"#)
        )
        .as_bytes(),
    );
    let r = responses(&out);
    assert_eq!(r.len(), 3);
    for (s, b) in &r {
        assert_eq!(*s, 400);
        assert_eq!(fault_of(b), "No balloon device configured");
    }
    let no_stats = FakeVm {
        balloon: Some(Mutex::new(0)),
        stats: false,
    };
    let r = responses(&serve(
        &no_stats,
        b"GET /balloon/statistics HTTP/1.1\r\n\r\n",
    ));
    assert_eq!(fault_of(&r[0].1), "Balloon statistics are not enabled");
}

/// Framing errors: 400 with a fault message, then the connection closes
/// (whatever follows is not answered).
fn framing_error(input: &[u8], expect: &str) {
    let mut o = Vec::new();
    serve_connection(input, &mut o, &vm(), DEFAULT_MAX_PAYLOAD);
    let out = String::from_utf8(o).unwrap();
    let r = responses(&out);
    assert_eq!(r.len(), 1, "{out}");
    assert_eq!(r[0].0, 400, "{out}");
    assert!(out.contains("Connection: close\r\n"), "{out}");
    let msg = fault_of(&r[0].1);
    assert!(msg.contains(expect), "{msg}");
}

#[test]
fn framing_errors_close_the_connection() {
    let big = format!(
        "PATCH /balloon HTTP/1.1\r\nContent-Length: 51201\r\n\r\n{}",
        "x".repeat(51201)
    );
    framing_error(
        big.as_bytes(),
        "Request payload with size 51201 is larger than the limit of 51200",
    );
    framing_error(
        b"PATCH /balloon HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Transfer-Encoding chunked is not supported",
    );
    framing_error(
        b"GET /\xff HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        "not valid UTF-8",
    );
    framing_error(
        b"GET / HTTP/1.1\r\nX-A: \xff\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        "not valid UTF-8",
    );
    framing_error(b"GET / HTTP/2.0\r\n\r\n", "Unsupported HTTP version");
    framing_error(b"GET /\r\n\r\n", "Invalid request line");
    framing_error(b"GET  / HTTP/1.1\r\n\r\n", "Invalid request line");
    framing_error(b"GET x HTTP/1.1\r\n\r\n", "Invalid request URI");
    framing_error(b"GET / HTTP/1.1\r\nbad header\r\n\r\n", "Invalid header");
    framing_error(
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        "Invalid Content-Length",
    );
    framing_error(
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "Conflicting",
    );
    framing_error(
        b"PATCH /balloon HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}",
        "end of stream in the body",
    );
    framing_error(b"GET / HTTP/1.1\r\nHost: x", "end of stream");
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000));
    framing_error(long.as_bytes(), "too long");
    let many: String = (0..65).map(|i| format!("X-{i}: y\r\n")).collect();
    framing_error(
        format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes(),
        "Too many headers",
    );
}

#[test]
fn connection_close_and_http10() {
    let out = serve(
        &vm(),
        b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    );
    assert_eq!(responses(&out).len(), 1);
    assert!(out.contains("Connection: close\r\n"));
    // HTTP/1.0 keeps the connection open unless asked to close (as
    // Firecracker does; one-connection HTTP/1.0 clients rely on it).
    let out = serve(&vm(), b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.1\r\n\r\n");
    assert_eq!(responses(&out).len(), 2);
    let out = serve(
        &vm(),
        b"GET / HTTP/1.0\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    );
    assert_eq!(responses(&out).len(), 1);
    let out = serve(
        &vm(),
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /?x=1 HTTP/1.1\r\n\r\n",
    );
    assert_eq!(responses(&out).len(), 2);
    // Nothing at all, or a client that leaves between requests: no answer.
    assert_eq!(serve(&vm(), b""), "");
    assert_eq!(serve(&vm(), b"\r\n"), "");
}

#[test]
fn expect_continue_and_bare_lf() {
    let body = r#"{"amount_mib":7}"#;
    let input = format!(
        "PATCH /balloon HTTP/1.1\nExpect: 100-continue\nContent-Length: {}\n\n{body}",
        body.len()
    );
    let v = vm();
    let out = serve(&v, input.as_bytes());
    assert!(
        out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n"),
        "{out}"
    );
    assert_eq!(*v.balloon.as_ref().unwrap().lock().unwrap(), 7);
}

#[test]
fn garbage_never_panics() {
    // A cheap deterministic fuzz: prefixes and byte flips of valid requests.
    let base = patch(r#"{"amount_mib":5}"#).into_bytes();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for i in 0..2000 {
        let mut input = base.clone();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let pos = (seed as usize) % input.len();
        input[pos] = (seed >> 32) as u8;
        input.truncate(input.len() - (i % 7));
        let mut o = Vec::new();
        serve_connection(&input[..], &mut o, &vm(), 64);
    }
}

#[test]
fn socket_round_trip() {
    let dir = std::env::temp_dir().join(format!("kiln-api-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    // A regular file in the way is refused and left alone.
    std::fs::write(&sock, b"keep").unwrap();
    let err = ApiServer::bind(&sock).err().expect("not a socket");
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"keep");
    std::fs::remove_file(&sock).unwrap();
    // A stale socket is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let server = ApiServer::bind(&sock).unwrap();
    server.spawn(std::sync::Arc::new(vm())).unwrap();
    let r = client::request(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib":3}"#)).unwrap();
    assert_eq!(
        (r.status, r.status_line.as_str()),
        (204, "HTTP/1.1 204 No Content")
    );
    let r = client::request(&sock, "GET", "/balloon", None).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains(r#""amount_mib":3"#), "{}", r.body);
    let r = client::request(&sock, "PATCH", "/balloon", Some(r#"{"amount_mib":"x"}"#)).unwrap();
    assert_eq!(r.status, 400);
    assert!(fault_of(&r.body).contains("invalid type"), "{}", r.body);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The concurrent server over a real socket.
mod concurrent {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;

    /// A server on a fresh socket; `f` adjusts it before it starts.
    fn start(f: impl FnOnce(ApiServer) -> ApiServer) -> (PathBuf, Arc<FakeVm>) {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-api-conc-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let v = Arc::new(vm());
        f(ApiServer::bind(&sock).unwrap()).spawn(v.clone()).unwrap();
        (sock, v)
    }

    fn connect(sock: &Path) -> UnixStream {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// Reads until `n` complete responses (or EOF) arrived.
    fn read_responses(s: &mut UnixStream, n: usize) -> Vec<(u16, String)> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if complete(&text) >= n {
                return responses(&text);
            }
            match s.read(&mut chunk) {
                Ok(0) => return responses(&text),
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                Err(e) => panic!("read: {e} after {text:?}"),
            }
        }
    }

    /// How many complete responses `text` holds.
    fn complete(text: &str) -> usize {
        let mut rest = text;
        let mut n = 0;
        while let Some((head, after)) = rest.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |v| v.parse().unwrap());
            if after.len() < len {
                break;
            }
            n += 1;
            rest = &after[len..];
        }
        n
    }

    /// One GET / on a new connection, timed; the response must arrive in
    /// one read(2), as a third-party client may expect.
    fn timed_get(sock: &Path) -> Duration {
        let t = Instant::now();
        let mut s = connect(sock);
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        assert_eq!(complete(text), 1, "one read, one whole response: {text}");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        t.elapsed()
    }

    #[test]
    fn three_hundred_concurrent_connections_are_all_answered() {
        let (sock, _) = start(|s| s);
        let mut conns: Vec<UnixStream> = (0..300).map(|_| connect(&sock)).collect();
        // Every connection is open before any request is sent.
        for (i, c) in conns.iter_mut().enumerate() {
            let req = if i % 2 == 0 {
                "GET / HTTP/1.1\r\n\r\n"
            } else {
                "GET /balloon HTTP/1.1\r\n\r\n"
            };
            c.write_all(req.as_bytes()).unwrap();
        }
        for (i, c) in conns.iter_mut().enumerate().rev() {
            let r = read_responses(c, 1);
            assert_eq!(r.len(), 1, "connection {i}");
            assert_eq!(r[0].0, 200, "connection {i}: {:?}", r[0]);
            let expect = if i % 2 == 0 { "\"id\"" } else { "amount_mib" };
            assert!(r[0].1.contains(expect), "connection {i}: {:?}", r[0]);
        }
        // Keep-alive: every connection takes a second request.
        for c in &mut conns {
            c.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        }
        for c in &mut conns {
            assert_eq!(read_responses(c, 1)[0].0, 200);
        }
    }

    #[test]
    fn slow_and_non_reading_clients_do_not_delay_others() {
        let (sock, _) = start(|s| s);
        let baseline = timed_get(&sock);

        // Slowloris: a request one byte every 20 ms, on 5 connections.
        let slow: Vec<_> = (0..5)
            .map(|_| {
                let mut s = connect(&sock);
                std::thread::spawn(move || {
                    for b in
                        b"PATCH /balloon HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"amount_mib\":1}"
                    {
                        if s.write_all(&[*b]).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            })
            .collect();
        // A client that pipelines requests until its socket is full and
        // never reads the responses.
        let mut hog = connect(&sock);
        hog.set_nonblocking(true).unwrap();
        let many = b"GET /balloon/statistics HTTP/1.1\r\n\r\n".repeat(1000);
        let mut sent = 0;
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(500) {
            match hog.write(&many) {
                Ok(n) => sent += n,
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        assert!(sent > 100_000, "the hog sent {sent} bytes");
        // Silent connections, and one half-closed mid-request.
        let _silent: Vec<_> = (0..20).map(|_| connect(&sock)).collect();
        let half = connect(&sock);
        (&half).write_all(b"GET / HTTP/1.1\r\nHost").unwrap();
        half.shutdown(std::net::Shutdown::Write).unwrap();

        for _ in 0..10 {
            let d = timed_get(&sock);
            assert!(
                d < Duration::from_millis(200) + baseline * 10,
                "GET / took {d:?} (baseline {baseline:?})"
            );
        }
        // The half-closed client got its 400 and EOF.
        let mut half = half;
        let r = read_responses(&mut half, 2);
        assert_eq!(r.len(), 1);
        assert!(fault_of(&r[0].1).contains("end of stream"), "{r:?}");
        for t in slow {
            t.join().unwrap();
        }
    }

    #[test]
    fn oversized_body_is_400_then_the_server_keeps_serving() {
        let (sock, v) = start(|s| s.max_payload(1000));
        let body = format!(r#"{{"amount_mib":9{}}}"#, " ".repeat(100_000));
        let mut s = connect(&sock);
        // The whole body is written (the server discards it after the 400).
        s.write_all(
            format!(
                "PATCH /balloon HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let r = read_responses(&mut s, 2);
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].0, 400);
        assert!(
            fault_of(&r[0].1).contains(&format!(
                "Request payload with size {} is larger than the limit of 1000",
                body.len()
            )),
            "{r:?}"
        );
        assert_eq!(*v.balloon.as_ref().unwrap().lock().unwrap(), 0);
        // A body at the limit is fine, on a new connection.
        let body = format!(r#"{{"amount_mib":9{}}}"#, " ".repeat(1000 - 16));
        assert_eq!(body.len(), 1000);
        let r = client::request(&sock, "PATCH", "/balloon", Some(&body)).unwrap();
        assert_eq!(r.status, 204, "{r:?}");
        assert_eq!(*v.balloon.as_ref().unwrap().lock().unwrap(), 9);
    }

    #[test]
    fn pipelined_requests_are_answered_in_order() {
        let (sock, _) = start(|s| s);
        let mut s = connect(&sock);
        let mut input = String::new();
        for i in 0..200 {
            input.push_str(&patch(&format!(r#"{{"amount_mib":{i}}}"#)));
            input.push_str("GET /balloon HTTP/1.1\r\n\r\n");
        }
        // Written byte by byte in places: the parser is incremental.
        let (a, b) = input.as_bytes().split_at(100);
        for byte in a {
            s.write_all(&[*byte]).unwrap();
        }
        s.write_all(b).unwrap();
        let r = read_responses(&mut s, 400);
        assert_eq!(r.len(), 400);
        for i in 0..200 {
            assert_eq!(r[2 * i].0, 204);
            assert!(
                r[2 * i + 1].1.contains(&format!(r#""amount_mib":{i},"#)),
                "{i}: {:?}",
                r[2 * i + 1]
            );
        }
    }

    #[test]
    fn garbage_gets_400_per_connection() {
        let (sock, _) = start(|s| s);
        let cases: [(&[u8], &str); 6] = [
            (b"\xff\xfe\xfd\r\n\r\n", "not valid UTF-8"),
            (b"GET /\xc3\x28 HTTP/1.1\r\n\r\n", "not valid UTF-8"),
            (b"GET / HTTP/1.1\r\nX: \x80\r\n\r\n", "not valid UTF-8"),
            (b"\x00\x01\x02 garbage\r\n\r\n", "Invalid request line"),
            (b"GET / HTTP/9.9\r\n\r\n", "Unsupported HTTP version"),
            (
                b"PATCH /balloon HTTP/1.1\r\nContent-Length: 3\r\n\r\n\xff\xfe\xfd",
                "Invalid request body",
            ),
        ];
        for (input, expect) in cases {
            let mut s = connect(&sock);
            s.write_all(input).unwrap();
            let r = read_responses(&mut s, 1);
            assert_eq!(r[0].0, 400, "{input:?}");
            assert!(fault_of(&r[0].1).contains(expect), "{input:?}: {r:?}");
        }
        timed_get(&sock);
    }

    #[test]
    fn connections_over_the_limit_get_503() {
        let (sock, _) = start(|s| s.max_connections(4));
        let mut open: Vec<UnixStream> = (0..4).map(|_| connect(&sock)).collect();
        // The server has taken all four (each answers), and each is now in
        // the middle of another request: none is idle.
        for c in &mut open {
            c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            assert_eq!(read_responses(c, 1)[0].0, 200);
            c.write_all(b"GET / HT").unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut extra = connect(&sock);
        let r = read_responses(&mut extra, 1);
        assert_eq!(r[0].0, 503, "{r:?}");
        assert!(fault_of(&r[0].1).contains("limit is 4"), "{r:?}");
        // Closing one makes room.
        drop(open.pop());
        let t = Instant::now();
        loop {
            let mut c = connect(&sock);
            c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let r = read_responses(&mut c, 1);
            if r[0].0 == 200 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "{r:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn at_the_cap_the_longest_idle_connection_makes_room() {
        let (sock, _) = start(|s| s.max_connections(2));
        let mut first = connect(&sock);
        first.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_responses(&mut first, 1)[0].0, 200);
        std::thread::sleep(Duration::from_millis(20));
        let mut second = connect(&sock);
        second.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_responses(&mut second, 1)[0].0, 200);
        // A third connection is served; the first (idle longest) is closed.
        let mut third = connect(&sock);
        third.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_responses(&mut third, 1)[0].0, 200);
        let mut buf = [0u8; 64];
        first
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(
            first.read(&mut buf).unwrap_or(0),
            0,
            "the oldest was closed"
        );
        second.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(read_responses(&mut second, 1)[0].0, 200);
    }

    #[test]
    fn stalled_requests_are_closed_idle_connections_stay() {
        let (sock, _) = start(|s| s.idle_timeout(Duration::from_millis(300)));
        let t = Instant::now();
        let mut idle = connect(&sock);
        let mut partial = connect(&sock);
        // A trickle that never completes a request is not "activity" forever.
        partial.write_all(b"GET / HT").unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..20 {
            if partial.write_all(b"T").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        assert_eq!(partial.read(&mut buf).unwrap_or(0), 0);
        let d = t.elapsed();
        assert!(
            d >= Duration::from_millis(290) && d < Duration::from_secs(3),
            "{d:?}"
        );
        // A connection idle between requests is kept (clients such as
        // Firecracker SDKs hold one for a VM's life).
        idle.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(idle.read(&mut buf).is_err(), "still open, nothing to read");
        idle.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        idle.set_read_timeout(None).unwrap();
        assert_eq!(read_responses(&mut idle, 1)[0].0, 200);
        timed_get(&sock);
    }
}
