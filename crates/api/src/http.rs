//! A minimal HTTP/1.1 request parser and response writer (std only).
//!
//! [`RequestParser`] is incremental: bytes are fed as they arrive (one at a
//! time or many requests at once) and complete requests come out in order,
//! so a server can multiplex many connections on one thread. It supports
//! what API clients send: a request line, headers, a body sized by
//! `Content-Length` (bounded), `Expect: 100-continue` and keep-alive.
//! Chunked (or any) `Transfer-Encoding` is refused.

use std::io::{self, Write};

/// Longest request line or header line, bytes (without its line ending).
pub const MAX_LINE: usize = 8192;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 64;
/// Largest request head (request line and headers), bytes.
pub const MAX_HEAD: usize = 32 * 1024;
/// Empty lines tolerated before a request line (RFC 9112 2.2).
const MAX_EMPTY_LINES: u8 = 4;

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Method, as sent (case-sensitive, like HTTP).
    pub method: String,
    /// Path, without the query string.
    pub path: String,
    /// The connection stays open after the response.
    pub keep_alive: bool,
    /// The body (empty when none).
    pub body: Vec<u8>,
    /// The headers, names as sent, values without surrounding blanks.
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The value of header `name` (case-insensitive; the first one).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request could not be read. Except for `Io`, the server answers 400
/// and closes the connection (the stream position is no longer known).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Bad request line, header or framing.
    #[error("{0}")]
    Malformed(String),
    /// The body is larger than the server accepts.
    #[error(
        "Request payload with size {size} is larger than the limit of {max} allowed by server."
    )]
    PayloadTooLarge {
        /// Announced size.
        size: u64,
        /// The limit.
        max: usize,
    },
    /// The connection failed (or timed out) mid-request.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

fn malformed(msg: impl Into<String>) -> HttpError {
    HttpError::Malformed(msg.into())
}

/// What the parser produced.
#[derive(Debug)]
pub enum Event {
    /// A complete request.
    Request(Request),
    /// The client asked for `100 Continue` before sending its body.
    Continue,
    /// The stream is not valid HTTP/1.1: answer 400 and close. The parser
    /// produces nothing after an error.
    Error(HttpError),
}

/// A request head parsed so far.
#[derive(Debug)]
struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    content_length: Option<u64>,
    expect_continue: bool,
    headers: Vec<(String, String)>,
}

#[derive(Debug)]
enum State {
    /// Before a request line.
    Start { empties: u8 },
    /// Reading headers.
    Headers(Head),
    /// Waiting for `len` body bytes.
    Body(Head, usize),
    /// After an error.
    Failed,
}

/// An incremental HTTP/1.1 request parser for one connection.
///
/// ```
/// use kiln_api::http::{Event, RequestParser};
/// let mut p = RequestParser::new(1024);
/// p.feed(b"GET / HTTP/1.1\r\n");
/// assert!(p.next_event().is_none());
/// p.feed(b"\r\nGET /version HTTP/1.1\r\n\r\n");
/// assert!(matches!(p.next_event(), Some(Event::Request(r)) if r.path == "/"));
/// assert!(matches!(p.next_event(), Some(Event::Request(r)) if r.path == "/version"));
/// assert!(p.next_event().is_none() && p.is_idle());
/// ```
#[derive(Debug)]
pub struct RequestParser {
    max_payload: usize,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    pos: usize,
    /// Bytes of `buf` already searched for a line end.
    scan: usize,
    /// Head bytes consumed so far for the current request.
    head_bytes: usize,
    state: State,
}

impl RequestParser {
    /// A parser accepting bodies of at most `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        Self {
            max_payload,
            buf: Vec::new(),
            pos: 0,
            scan: 0,
            head_bytes: 0,
            state: State::Start { empties: 0 },
        }
    }

    /// Appends bytes received from the client.
    pub fn feed(&mut self, data: &[u8]) {
        if matches!(self.state, State::Failed) {
            return;
        }
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.scan -= self.pos;
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// No request is partially received (nothing to lose by closing).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::Start { .. }) && self.buffered() == 0
    }

    /// Whether an error was produced.
    pub fn failed(&self) -> bool {
        matches!(self.state, State::Failed)
    }

    fn fail(&mut self, e: HttpError) -> Option<Event> {
        self.state = State::Failed;
        self.buf = Vec::new();
        self.pos = 0;
        self.scan = 0;
        Some(Event::Error(e))
    }

    /// The next complete line (terminator removed), if any.
    fn line(&mut self) -> Result<Option<std::ops::Range<usize>>, HttpError> {
        let start = self.pos;
        match self.buf[self.scan..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let nl = self.scan + i;
                let mut end = nl;
                if end > start && self.buf[end - 1] == b'\r' {
                    end -= 1;
                }
                if end - start > MAX_LINE {
                    return Err(malformed("Request line or header is too long"));
                }
                self.pos = nl + 1;
                self.scan = self.pos;
                self.head_bytes += nl + 1 - start;
                if self.head_bytes > MAX_HEAD {
                    return Err(malformed("Request head is too large"));
                }
                Ok(Some(start..end))
            }
            None => {
                self.scan = self.buf.len();
                // One byte of slack for a CR before the LF.
                if self.buf.len() - start > MAX_LINE + 1 {
                    return Err(malformed("Request line or header is too long"));
                }
                if self.head_bytes + self.buf.len() - start > MAX_HEAD {
                    return Err(malformed("Request head is too large"));
                }
                Ok(None)
            }
        }
    }

    /// The next event; `None` until more bytes are fed.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            match std::mem::replace(&mut self.state, State::Failed) {
                State::Failed => return None,
                State::Start { empties } => {
                    let range = match self.line() {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            self.state = State::Start { empties };
                            return None;
                        }
                        Err(e) => return self.fail(e),
                    };
                    if range.is_empty() && empties < MAX_EMPTY_LINES {
                        self.state = State::Start {
                            empties: empties + 1,
                        };
                        continue;
                    }
                    match request_line(&self.buf[range]) {
                        Ok(head) => self.state = State::Headers(head),
                        Err(e) => return self.fail(e),
                    }
                }
                State::Headers(mut head) => {
                    let range = match self.line() {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            self.state = State::Headers(head);
                            return None;
                        }
                        Err(e) => return self.fail(e),
                    };
                    if !range.is_empty() {
                        if let Err(e) = header(&mut head, &self.buf[range]) {
                            return self.fail(e);
                        }
                        self.state = State::Headers(head);
                        continue;
                    }
                    let len = head.content_length.unwrap_or(0);
                    if len > self.max_payload as u64 {
                        return self.fail(HttpError::PayloadTooLarge {
                            size: len,
                            max: self.max_payload,
                        });
                    }
                    let cont = head.expect_continue && len > 0;
                    self.state = State::Body(head, len as usize);
                    if cont {
                        return Some(Event::Continue);
                    }
                }
                State::Body(head, len) => {
                    if self.buffered() < len {
                        self.state = State::Body(head, len);
                        return None;
                    }
                    let body = self.buf[self.pos..self.pos + len].to_vec();
                    self.pos += len;
                    self.scan = self.pos;
                    self.head_bytes = 0;
                    self.state = State::Start { empties: 0 };
                    return Some(Event::Request(Request {
                        method: head.method,
                        path: head.path,
                        keep_alive: head.keep_alive,
                        body,
                        headers: head.headers,
                    }));
                }
            }
        }
    }

    /// The client closed its side: an error if a request was cut short.
    /// Call once [`next_event`](Self::next_event) returns `None`.
    pub fn finish(&mut self) -> Option<HttpError> {
        let e = match &self.state {
            State::Failed => return None,
            State::Start { .. } if self.buffered() == 0 => return None,
            State::Start { .. } => malformed("Unexpected end of stream inside the request head"),
            State::Headers(_) => malformed("Unexpected end of stream in headers"),
            State::Body(..) => malformed("Unexpected end of stream in the body"),
        };
        self.state = State::Failed;
        Some(e)
    }
}

fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, HttpError> {
    std::str::from_utf8(bytes).map_err(|_| malformed(format!("{what} is not valid UTF-8")))
}

fn request_line(line: &[u8]) -> Result<Head, HttpError> {
    let line = utf8(line, "Request line")?;
    let mut parts = line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(malformed("Invalid request line")),
    };
    if !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(malformed("Invalid HTTP method"));
    }
    let keep_alive = match version {
        // Like Firecracker's API server, HTTP/1.0 connections stay open too
        // (clients such as firecracker-rs-sdk send every request as HTTP/1.0
        // on one connection); `Connection: close` still closes.
        "HTTP/1.1" | "HTTP/1.0" => true,
        _ => return Err(malformed(format!("Unsupported HTTP version: {version}"))),
    };
    let path = target.split('?').next().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(malformed("Invalid request URI"));
    }
    Ok(Head {
        method: method.to_string(),
        path: path.to_string(),
        keep_alive,
        content_length: None,
        expect_continue: false,
        headers: Vec::new(),
    })
}

fn header(head: &mut Head, line: &[u8]) -> Result<(), HttpError> {
    if head.headers.len() >= MAX_HEADERS {
        return Err(malformed("Too many headers"));
    }
    let line = utf8(line, "Header")?;
    if line.starts_with([' ', '\t']) {
        return Err(malformed("Folded headers are not supported"));
    }
    let (name, value) = line
        .split_once(':')
        .ok_or_else(|| malformed(format!("Invalid header: {line}")))?;
    if name.is_empty() || name.contains([' ', '\t']) {
        return Err(malformed(format!("Invalid header name: {name}")));
    }
    let value = value.trim_matches([' ', '\t']);
    head.headers.push((name.to_string(), value.to_string()));
    if name.eq_ignore_ascii_case("content-length") {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed(format!("Invalid Content-Length: {value}")));
        }
        let n: u64 = value
            .parse()
            .map_err(|_| malformed(format!("Invalid Content-Length: {value}")))?;
        if head.content_length.is_some_and(|old| old != n) {
            return Err(malformed("Conflicting Content-Length headers"));
        }
        head.content_length = Some(n);
    } else if name.eq_ignore_ascii_case("transfer-encoding") {
        return Err(malformed(format!(
            "Transfer-Encoding {value} is not supported; send Content-Length"
        )));
    } else if name.eq_ignore_ascii_case("connection") {
        for token in value.split(',').map(str::trim) {
            if token.eq_ignore_ascii_case("close") {
                head.keep_alive = false;
            } else if token.eq_ignore_ascii_case("keep-alive") {
                head.keep_alive = true;
            }
        }
    } else if name.eq_ignore_ascii_case("expect") {
        if value.eq_ignore_ascii_case("100-continue") {
            head.expect_continue = true;
        } else {
            return Err(malformed(format!("Unsupported Expect: {value}")));
        }
    }
    Ok(())
}

/// The interim response to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A response: status and an optional JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body; `None` for 204.
    pub body: Option<String>,
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    /// 200 with `value` as JSON.
    pub fn json(value: &impl serde::Serialize) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self {
                status: 200,
                body: Some(body),
            },
            Err(e) => Self::fault(500, format!("Cannot serialize the response: {e}")),
        }
    }

    /// An error with Firecracker's `{"fault_message": ...}` body.
    pub fn fault(status: u16, message: impl Into<String>) -> Self {
        let body = serde_json::to_string(&crate::models::Fault {
            fault_message: message.into(),
        })
        .unwrap_or_else(|_| "{\"fault_message\":\"\"}".to_string());
        Self {
            status,
            body: Some(body),
        }
    }

    /// 400 Bad Request with `message`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::fault(400, message)
    }

    /// Appends the whole response (head and body) to `out`; `close` adds
    /// `Connection: close`.
    pub fn encode(&self, out: &mut Vec<u8>, close: bool) {
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nServer: Kiln API\r\n",
            self.status,
            reason(self.status)
        );
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        match &self.body {
            Some(b) => {
                let _ = write!(
                    out,
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    b.len()
                );
                out.extend_from_slice(b.as_bytes());
            }
            None if self.status == 204 => out.extend_from_slice(b"\r\n"),
            None => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
        }
    }

    /// Writes the response with one `write_all`; `close` adds
    /// `Connection: close`.
    pub fn write_to(&self, w: &mut impl Write, close: bool) -> io::Result<()> {
        let mut out = Vec::with_capacity(128 + self.body.as_ref().map_or(0, String::len));
        self.encode(&mut out, close);
        w.write_all(&out)?;
        w.flush()
    }
}

/// The reason phrase of `status`.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod reason_tests {
    use super::reason;

    #[test]
    fn statuses_go_out_with_their_standard_reason_phrases() {
        for (status, phrase) in [
            (405, "Method Not Allowed"),
            (413, "Payload Too Large"),
            (501, "Not Implemented"),
            (401, "Unauthorized"),
        ] {
            assert_eq!(reason(status), phrase);
        }
    }
}
