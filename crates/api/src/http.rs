//! A minimal HTTP/1.1 request parser and response writer (std only).
//!
//! Supports what API clients send: a request line, headers, a body sized by
//! `Content-Length` (bounded), `Expect: 100-continue` and keep-alive.
//! Chunked (or any) `Transfer-Encoding` is refused.

use std::io::{self, BufRead, Write};

/// Longest request line or header line, bytes.
pub const MAX_LINE: usize = 8192;
/// Most headers in one request.
pub const MAX_HEADERS: usize = 64;

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

/// Reads one line (LF or CRLF ended, terminator removed) of at most
/// [`MAX_LINE`] bytes. `Ok(None)` on end of stream before any byte.
fn read_line(r: &mut impl BufRead) -> Result<Option<Vec<u8>>, HttpError> {
    let mut line = Vec::new();
    let n = io::Read::take(&mut *r, MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(if n > MAX_LINE {
            malformed("Request line or header is too long")
        } else {
            malformed("Unexpected end of stream inside the request head")
        });
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

fn utf8(bytes: Vec<u8>, what: &str) -> Result<String, HttpError> {
    String::from_utf8(bytes).map_err(|_| malformed(format!("{what} is not valid UTF-8")))
}

/// Reads the next request. `Ok(None)`: the client closed the connection
/// between requests. `continue_out` receives `100 Continue` when the client
/// asks for it before sending its body.
pub fn read_request(
    r: &mut impl BufRead,
    continue_out: &mut impl Write,
    max_payload: usize,
) -> Result<Option<Request>, HttpError> {
    // Request line (a few empty lines before it are tolerated, RFC 9112 2.2).
    let mut empties = 0;
    let line = loop {
        match read_line(r)? {
            None => return Ok(None),
            Some(l) if l.is_empty() && empties < 4 => empties += 1,
            Some(l) => break utf8(l, "Request line")?,
        }
    };
    let mut parts = line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => (m, t, v),
        _ => return Err(malformed("Invalid request line")),
    };
    if !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(malformed("Invalid HTTP method"));
    }
    let mut keep_alive = match version {
        // Like Firecracker's API server, HTTP/1.0 connections stay open too
        // (clients such as firecracker-rs-sdk send every request as HTTP/1.0
        // on one connection); `Connection: close` still closes.
        "HTTP/1.1" | "HTTP/1.0" => true,
        _ => return Err(malformed(format!("Unsupported HTTP version: {version}"))),
    };
    let path = target.split('?').next().unwrap_or_default().to_string();
    if !path.starts_with('/') {
        return Err(malformed("Invalid request URI"));
    }

    // Headers.
    let mut content_length: Option<u64> = None;
    let mut expect_continue = false;
    let mut count = 0;
    loop {
        let line = read_line(r)?.ok_or_else(|| malformed("Unexpected end of stream in headers"))?;
        if line.is_empty() {
            break;
        }
        count += 1;
        if count > MAX_HEADERS {
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
        match name.to_ascii_lowercase().as_str() {
            "content-length" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(malformed(format!("Invalid Content-Length: {value}")));
                }
                let n: u64 = value
                    .parse()
                    .map_err(|_| malformed(format!("Invalid Content-Length: {value}")))?;
                if content_length.is_some_and(|old| old != n) {
                    return Err(malformed("Conflicting Content-Length headers"));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => {
                return Err(malformed(format!(
                    "Transfer-Encoding {value} is not supported; send Content-Length"
                )))
            }
            "connection" => {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            }
            "expect" => {
                if value.eq_ignore_ascii_case("100-continue") {
                    expect_continue = true;
                } else {
                    return Err(malformed(format!("Unsupported Expect: {value}")));
                }
            }
            _ => {}
        }
    }

    // Body.
    let len = content_length.unwrap_or(0);
    if len > max_payload as u64 {
        return Err(HttpError::PayloadTooLarge {
            size: len,
            max: max_payload,
        });
    }
    if expect_continue && len > 0 {
        continue_out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        continue_out.flush()?;
    }
    let mut body = vec![0; len as usize];
    r.read_exact(&mut body).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            malformed("Unexpected end of stream in the body")
        } else {
            HttpError::Io(e)
        }
    })?;
    Ok(Some(Request {
        method: method.to_string(),
        path,
        keep_alive,
        body,
    }))
}

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

    /// Writes the response; `close` adds `Connection: close`.
    pub fn write_to(&self, w: &mut impl Write, close: bool) -> io::Result<()> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: Kiln API\r\n",
            self.status,
            reason(self.status)
        );
        if close {
            out.push_str("Connection: close\r\n");
        }
        match &self.body {
            Some(b) => out.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                b.len()
            )),
            None if self.status == 204 => out.push_str("\r\n"),
            None => out.push_str("Content-Length: 0\r\n\r\n"),
        }
        w.write_all(out.as_bytes())?;
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
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}
