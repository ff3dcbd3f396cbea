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
            r#"{"amount_mib":128,"deflate_on_oom":true,"stats_polling_interval_s":1}"#.into()
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
