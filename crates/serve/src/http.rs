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
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
#[cfg(test)]
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use kiln_api::http::{Event, RequestParser, Response, CONTINUE};

use crate::runtime::Runtime;
use crate::{FunctionSpec, ServeError};

/// Largest request body (a call's input), bytes.
pub const MAX_BODY: usize = 16 << 20;
/// A connection idle (or not reading its answer) this long is closed.
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

fn write_reply(s: &mut impl Write, reply: &Reply, close: bool) -> std::io::Result<()> {
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

fn connection(rt: Arc<Runtime>, mut s: impl Read + Write) {
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
        s.set_read_timeout(Some(IDLE_TIMEOUT))?;
        s.set_write_timeout(Some(IDLE_TIMEOUT))?;
        let rt = rt.clone();
        std::thread::Builder::new()
            .name("kiln_serve_conn".into())
            .spawn(move || connection(rt, s))?;
    }
}

/// Serves the API on a TCP `listener` until accepting fails.
pub fn serve_tcp(rt: Arc<Runtime>, listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (s, _) = listener.accept()?;
        s.set_read_timeout(Some(IDLE_TIMEOUT))?;
        s.set_write_timeout(Some(IDLE_TIMEOUT))?;
        let _ = s.set_nodelay(true);
        let rt = rt.clone();
        std::thread::Builder::new()
            .name("kiln_serve_tcp".into())
            .spawn(move || connection(rt, s))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyConfig;
    use crate::vm::VmDefaults;
    use crate::ServeConfig;

    fn runtime() -> Arc<Runtime> {
        let dir = std::env::temp_dir().join(format!("kiln-serve-http-{}", std::process::id()));
        Runtime::new(ServeConfig {
            vm: VmDefaults {
                exe: "/nonexistent/kiln".into(),
                kernel: "/nonexistent/vmlinuz".into(),
                initrd: "/nonexistent/initrd".into(),
                cmdline: String::new(),
                start_timeout: Duration::from_secs(1),
            },
            dir,
            policy: PolicyConfig::default(),
            max_instances: 1,
            tick: Duration::from_millis(50),
        })
        .unwrap()
    }

    /// Sends `req` on a fresh connection; the whole answer.
    fn exchange(rt: &Arc<Runtime>, req: &str) -> String {
        let (mut a, b) = UnixStream::pair().unwrap();
        let rt = rt.clone();
        let t = std::thread::spawn(move || connection(rt, b));
        a.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        a.read_to_string(&mut out).unwrap();
        t.join().unwrap();
        out
    }

    fn put(path: &str, body: &str) -> String {
        format!(
            "PUT {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn bad_requests_get_firecracker_faults_without_starting_a_vm() {
        let rt = runtime();
        let list = exchange(&rt, "GET /functions HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert!(
            list.starts_with("HTTP/1.1 200 ") && list.ends_with("\r\n\r\n[]"),
            "{list}"
        );
        let cases = [
            (put("/functions/x", "{\"comand\":\"true\"}"), "400", "unknown field"),
            (put("/functions/x", "not json"), "400", "Bad function definition"),
            (put("/functions/a%20b", "{\"command\":\"true\"}"), "400", "Invalid function name"),
            (put("/functions/x", "{\"command\":\"true\",\"vcpu_count\":0}"), "400", "vcpu_count 0"),
            (put("/functions/x", "{\"command\":\" \"}"), "400", "command is empty"),
            (
                "POST /functions/x/invoke HTTP/1.1\r\nConnection: close\r\nContent-Length: 1\r\n\r\nz".into(),
                "404",
                "No function named 'x'.",
            ),
            (
                "DELETE /functions/x HTTP/1.1\r\nConnection: close\r\n\r\n".into(),
                "404",
                "No function named",
            ),
            (
                "GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n".into(),
                "400",
                "Invalid request method and/or path: GET /nowhere.",
            ),
            ("garbage\r\n\r\n".into(), "400", "fault_message"),
        ];
        for (req, status, text) in cases {
            let out = exchange(&rt, &req);
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status} ")),
                "{req}: {out}"
            );
            assert!(
                out.contains(text) && out.contains("fault_message"),
                "{req}: {out}"
            );
        }
    }

    #[test]
    fn a_template_that_cannot_start_is_a_502_and_leaves_nothing() {
        let rt = runtime();
        let out = exchange(&rt, &put("/functions/f", "{\"command\":\"true\"}"));
        assert!(out.starts_with("HTTP/1.1 502 "), "{out}");
        assert!(out.contains("/nonexistent/kiln"), "{out}");
        assert!(rt.list().is_empty());
        let dir = std::env::temp_dir().join(format!("kiln-serve-http-{}", std::process::id()));
        assert!(!dir.join("f").exists());
    }

    #[test]
    fn call_output_is_raw_bytes_with_the_start_kind() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let reply = Reply::Output {
            start: "cold",
            pid: 42,
            body: b"\x00hi\n".to_vec(),
        };
        write_reply(&mut b, &reply, true).unwrap();
        drop(b);
        let mut out = Vec::new();
        a.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        for h in [
            "X-Kiln-Start: cold\r\n",
            "X-Kiln-Instance-Pid: 42\r\n",
            "Content-Length: 4\r\n",
            "Connection: close\r\n",
            "Content-Type: application/octet-stream\r\n",
        ] {
            assert!(text.contains(h), "{h}: {text}");
        }
        assert!(out.ends_with(b"\r\n\r\n\x00hi\n"), "{text}");
    }
}
