//! The fuzzing harness of the HTTP request parser, shared by the
//! `cargo fuzz` target `fuzz/fuzz_targets/http_parser.rs` and the corpus
//! replay test (`tests/fuzz_corpus.rs`).
//!
//! # Input layout
//!
//! ```text
//! byte 0   low 4 bits: log2 of the largest body accepted (0..=15 -> 1 B..32 KiB)
//!          high 4 bits: how the stream is cut into reads (chunk size seed)
//! rest     the bytes a client sends on one connection
//! ```
//!
//! Checks:
//! - nothing panics;
//! - the parser is incremental: cutting the stream into any reads gives
//!   exactly the events of feeding it whole;
//! - nothing comes after an error; every request has a path starting with
//!   `/` and a body no larger than the limit; the parser never buffers more
//!   than one request head and body plus the last read;
//! - the whole server path (router and pre-boot state machine, which parses
//!   the JSON bodies) answers with well-formed responses.

use std::sync::Arc;

use crate::http::{Event, RequestParser, MAX_HEAD};
use crate::preboot::{PreBootVm, Starter, VmResources};
use crate::server::serve_connection;
use crate::VmControl;

/// A summary of one event, comparable across runs.
fn summary(ev: &Event) -> String {
    match ev {
        Event::Request(r) => format!(
            "{} {} keep_alive={} body={:?}",
            r.method, r.path, r.keep_alive, r.body
        ),
        Event::Continue => "100".into(),
        Event::Error(e) => format!("error {e}"),
    }
}

/// Feeds `data` in chunks of the sizes `sizes` yields (cycled), collecting
/// every event, then ends the stream.
fn run(data: &[u8], max_payload: usize, mut sizes: impl FnMut() -> usize) -> Vec<String> {
    let mut p = RequestParser::new(max_payload);
    let mut events = Vec::new();
    let mut rest = data;
    let mut failed = false;
    loop {
        while let Some(ev) = p.next_event() {
            assert!(!failed, "an event after an error");
            if let Event::Request(r) = &ev {
                assert!(r.path.starts_with('/'), "{r:?}");
                assert!(r.body.len() <= max_payload, "{r:?}");
            }
            failed = matches!(ev, Event::Error(_));
            events.push(summary(&ev));
        }
        if rest.is_empty() {
            break;
        }
        let n = sizes().clamp(1, rest.len());
        assert!(
            p.buffered() <= MAX_HEAD + max_payload + 1,
            "buffered {}",
            p.buffered()
        );
        p.feed(&rest[..n]);
        rest = &rest[n..];
    }
    if let Some(e) = p.finish() {
        assert!(!failed, "an error after an error");
        events.push(format!("error {e}"));
    }
    events
}

/// Never starts a VM.
struct NoStart;

impl Starter for NoStart {
    fn start(&self, _: &VmResources) -> Result<Arc<dyn VmControl>, String> {
        Err("fuzzing: no VM".into())
    }
}

/// The harness: see the module documentation.
pub fn http_parser(data: &[u8]) {
    let Some((&ctl, stream)) = data.split_first() else {
        return;
    };
    let max_payload = 1usize << (ctl & 0x0f);
    let whole = run(stream, max_payload, || usize::MAX);
    let mut seed = u32::from(ctl >> 4).wrapping_mul(2_654_435_761) | 1;
    let chunked = run(stream, max_payload, || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        (seed % 9) as usize + 1
    });
    assert_eq!(whole, chunked, "chunked parsing differs");
    let bytewise = run(stream, max_payload, || 1);
    assert_eq!(whole, bytewise, "byte-at-a-time parsing differs");

    // The full request path, through the pre-boot router.
    let vm = PreBootVm::new("fuzz", "0.0.0", Box::new(NoStart));
    let mut out = Vec::new();
    serve_connection(stream, &mut out, &vm, max_payload);
    check_responses(&out);
}

/// Every response is `HTTP/1.1 <3 digits>` with a consistent length.
fn check_responses(mut out: &[u8]) {
    while !out.is_empty() {
        let end = out
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head");
        let head = std::str::from_utf8(&out[..end]).expect("an ASCII head");
        assert!(head.starts_with("HTTP/1.1 "), "{head}");
        let status: u16 = head[9..12].parse().expect("a status code");
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |v| v.parse().expect("a length"));
        assert!(status == 100 || status == 204 || len > 0, "{head}");
        let body = &out[end + 4..end + 4 + len];
        if len > 0 {
            let v: serde_json::Value = serde_json::from_slice(body).expect("a JSON body");
            if status >= 400 {
                assert!(v["fault_message"].is_string(), "{v}");
            }
        }
        out = &out[end + 4 + len..];
    }
}

/// Built-in seeds: `(name, input)`.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let with = |ctl: u8, s: &str| {
        let mut v = vec![ctl];
        v.extend_from_slice(s.as_bytes());
        v
    };
    vec![
        (
            "get-pipelined".into(),
            with(
                0x3a,
                "GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /version?x=1 HTTP/1.1\r\n\r\nGET /machine-config HTTP/1.0\r\n\r\n",
            ),
        ),
        (
            "put-bodies".into(),
            with(
                0x7c,
                "PUT /machine-config HTTP/1.1\r\nContent-Length: 36\r\n\r\n{\"vcpu_count\":2,\"mem_size_mib\":256}\nPUT /boot-source HTTP/1.1\nExpect: 100-continue\nContent-Length: 27\n\n{\"kernel_image_path\":\"/k\"}\nPUT /actions HTTP/1.1\r\nConnection: keep-alive\r\nContent-Length: 33\r\n\r\n{\"action_type\":\"InstanceStart\"}",
            ),
        ),
        (
            "too-large".into(),
            with(
                0x14,
                "PATCH /balloon HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"amount_mib\": 1}",
            ),
        ),
        (
            "framing".into(),
            with(
                0xff,
                "\r\n\r\nPUT /drives/rootfs HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello",
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_harness_catches_a_broken_invariant() {
        // A response without a status code is rejected by the checker.
        let r = std::panic::catch_unwind(|| super::check_responses(b"HTTP/1.1 OK\r\n\r\n"));
        assert!(r.is_err());
        super::check_responses(b"HTTP/1.1 204 No Content\r\n\r\n");
    }
}
