//! The HTTP/1.1 front end on a Unix socket.
//!
//! ```text
//! GET    /functions                  every function's statistics
//! PUT    /functions/{name}           register (JSON FunctionSpec); answers once the snapshot exists
//! GET    /functions/{name}           statistics
//! DELETE /functions/{name}           remove, stopping its idle instances
//! POST   /functions/{name}/invoke    call: body → the command's stdin; 200 with its stdout
//! ```
//! Errors use Firecracker's `{"fault_message": ...}` body.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use kiln_api::http::{Event, RequestParser, Response, CONTINUE};

use crate::runtime::Runtime;
use crate::{FunctionSpec, ServeError};

/// Largest request body (a call's input), bytes.
pub const MAX_BODY: usize = 16 << 20;
/// A connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

enum Reply {
    Api(Response),
    /// A call's output.
    Output {
        start: &'static str,
        pid: u32,
        body: Vec<u8>,
    },
}

impl From<ServeError> for Reply {
    fn from(e: ServeError) -> Self {
        Reply::Api(Response::fault(e.status(), e.to_string()))
    }
}

fn route(rt: &Runtime, method: &str, path: &str, body: &[u8]) -> Reply {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let result = match (method, parts.as_slice()) {
        ("GET", ["functions"]) => Ok(Reply::Api(Response::json(&rt.list()))),
        ("GET", ["functions", name]) => rt.stats(name).map(|s| Reply::Api(Response::json(&s))),
        ("PUT", ["functions", name]) => serde_json::from_slice::<FunctionSpec>(body)
            .map_err(|e| ServeError::BadRequest(format!("Bad function definition: {e}")))
            .and_then(|spec| rt.register(name, spec))
            .map(|()| Reply::Api(Response::no_content())),
        ("DELETE", ["functions", name]) => {
            rt.delete(name).map(|()| Reply::Api(Response::no_content()))
        }
        ("POST", ["functions", name, "invoke"]) => rt.invoke(name, body).map(|inv| {
            if inv.result.code == 0 {
                Reply::Output {
                    start: inv.start.as_str(),
                    pid: inv.pid,
                    body: inv.result.stdout,
                }
            } else {
                let err = String::from_utf8_lossy(&inv.result.stderr);
                let tail: String = err.trim_end().chars().rev().take(2000).collect();
                let tail: String = tail.chars().rev().collect();
                Reply::Api(Response::fault(
                    500,
                    format!(
                        "Function '{name}' exited with status {}: {tail}",
                        inv.result.code
                    ),
                ))
            }
        }),
        _ => Err(ServeError::BadRequest(format!(
            "Invalid request method and/or path: {method} {path}."
        ))),
    };
    result.unwrap_or_else(Reply::from)
}

fn write_reply(s: &mut UnixStream, reply: &Reply, close: bool) -> std::io::Result<()> {
    match reply {
        Reply::Api(r) => r.write_to(s, close),
        Reply::Output { start, pid, body } => {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nServer: Kiln serve\r\nContent-Type: application/octet-stream\r\n\
                 X-Kiln-Start: {start}\r\nX-Kiln-Instance-Pid: {pid}\r\nContent-Length: {}\r\n{}\r\n",
                body.len(),
                if close { "Connection: close\r\n" } else { "" }
            )
            .into_bytes();
            out.extend_from_slice(body);
            s.write_all(&out)?;
            s.flush()
        }
    }
}

fn connection(rt: Arc<Runtime>, mut s: UnixStream) {
    let _ = s.set_read_timeout(Some(IDLE_TIMEOUT));
    let mut parser = RequestParser::new(MAX_BODY);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        while let Some(ev) = parser.next_event() {
            match ev {
                Event::Continue => {
                    if s.write_all(CONTINUE).is_err() {
                        return;
                    }
                }
                Event::Request(req) => {
                    let reply = route(&rt, &req.method, &req.path, &req.body);
                    if write_reply(&mut s, &reply, !req.keep_alive).is_err() || !req.keep_alive {
                        return;
                    }
                }
                Event::Error(e) => {
                    let _ = Response::bad_request(e.to_string()).write_to(&mut s, true);
                    return;
                }
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => parser.feed(&buf[..n]),
        }
    }
}

/// Serves the API on `listener` until accepting fails.
pub fn serve(rt: Arc<Runtime>, listener: UnixListener) -> std::io::Result<()> {
    loop {
        let (s, _) = listener.accept()?;
        let rt = rt.clone();
        std::thread::Builder::new()
            .name("kiln_serve_conn".into())
            .spawn(move || connection(rt, s))?;
    }
}
