//! A tiny client for scripts and tests: one request per connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A response as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientResponse {
    /// E.g. `HTTP/1.1 204 No Content`.
    pub status_line: String,
    /// The status code.
    pub status: u16,
    /// The body (possibly empty).
    pub body: String,
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// Sends `method uri` with an optional JSON `body` to the API socket at `sock`.
pub fn request(
    sock: &Path,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> io::Result<ClientResponse> {
    request_timeout(sock, method, uri, body, Some(Duration::from_secs(30)))
}

/// [`request`], waiting at most `timeout` (`None`: forever) for the answer.
pub fn request_timeout(
    sock: &Path,
    method: &str,
    uri: &str,
    body: Option<&str>,
    timeout: Option<Duration>,
) -> io::Result<ClientResponse> {
    let mut stream = UnixStream::connect(sock)?;
    stream.set_read_timeout(timeout)?;
    let mut req = format!("{method} {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    stream.write_all(req.as_bytes())?;

    let mut r = BufReader::new(stream);
    let mut status_line = String::new();
    r.read_line(&mut status_line)?;
    let status_line = status_line.trim_end().to_string();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("invalid status line"))?;
    let mut len: Option<usize> = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Err(bad("connection closed inside the headers"));
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = Some(
                    v.trim()
                        .parse()
                        .map_err(|_| bad("invalid Content-Length"))?,
                );
            }
        }
    }
    let mut body = Vec::new();
    match len {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None if status == 204 => {}
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    Ok(ClientResponse {
        status_line,
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
