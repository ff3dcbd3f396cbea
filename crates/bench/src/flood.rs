//! `kiln bench api-flood`: hostile clients against a running API.
//!
//! Opens many connections to an API socket (idle ones, slowloris clients
//! trickling a request byte by byte, clients sending non-UTF-8 garbage or
//! an oversized body, clients pipelining requests without reading the
//! answers), keeps them busy for a while, and meanwhile times `GET /` on
//! fresh connections. Fails (exit status 1) if a probe is not answered
//! within a bound, or a bad request is not answered with 400.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;

/// Options of `kiln bench api-flood`.
pub struct FloodOptions {
    /// The API socket.
    pub sock: PathBuf,
    /// Hostile connections to open.
    pub conns: usize,
    /// How long to keep them busy.
    pub secs: u64,
    /// A probe slower than this fails the run.
    pub max_probe: Duration,
}

enum Kind {
    Idle,
    Slow(usize),
    Garbage,
    Oversized,
    Hog,
}

const SLOW_REQUEST: &[u8] = b"GET /balloon HTTP/1.1\r\nX-Slow: yes\r\n\r\n";

/// Reads one response (status, whole text) within `timeout`.
fn read_response(s: &mut UnixStream, timeout: Duration) -> std::io::Result<(u16, String)> {
    s.set_read_timeout(Some(timeout))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
                return Ok((status, String::from_utf8_lossy(&buf).into_owned()));
            }
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One `GET /` on a new connection: its duration, or why it failed.
fn probe(sock: &Path, timeout: Duration) -> Result<Duration, String> {
    let t = Instant::now();
    let mut s = UnixStream::connect(sock).map_err(|e| format!("connect: {e}"))?;
    s.write_all(b"GET / HTTP/1.1\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    match read_response(&mut s, timeout) {
        Ok((200, _)) => Ok(t.elapsed()),
        Ok((st, text)) => Err(format!("status {st}: {text}")),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// Runs the flood; prints a summary; 0 if the API held up.
pub fn flood(opts: FloodOptions) -> Result<i32> {
    let sock = &opts.sock;
    let baseline = probe(sock, Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("{}: the API does not answer: {e}", sock.display()))?;
    let mut conns: Vec<(Kind, UnixStream)> = Vec::new();
    let mut refused = 0;
    for i in 0..opts.conns {
        let mut s = match UnixStream::connect(sock) {
            Ok(s) => s,
            Err(_) => {
                refused += 1;
                continue;
            }
        };
        let kind = match i % 5 {
            0 => Kind::Idle,
            1 => Kind::Slow(0),
            2 => {
                let _ = s.write_all(b"\xff\xfe\xfd GET / HTTP/1.1\r\n\r\n");
                Kind::Garbage
            }
            3 => {
                let _ = s.set_nonblocking(true);
                let body = vec![b' '; 256 * 1024];
                let head = format!(
                    "PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write(head.as_bytes());
                let _ = s.write(&body);
                let _ = s.set_nonblocking(false);
                Kind::Oversized
            }
            _ => {
                let _ = s.set_nonblocking(true);
                let many = b"GET /version HTTP/1.1\r\n\r\n".repeat(4000);
                let _ = s.write(&many);
                Kind::Hog
            }
        };
        conns.push((kind, s));
    }
    let start = Instant::now();
    let mut probes = 0;
    let mut worst = Duration::ZERO;
    let mut failures = Vec::new();
    while start.elapsed() < Duration::from_secs(opts.secs) {
        for (kind, s) in conns.iter_mut() {
            match kind {
                Kind::Slow(sent) if *sent < SLOW_REQUEST.len() => {
                    let byte = &SLOW_REQUEST[*sent..*sent + 1];
                    *sent += usize::from(s.write_all(byte).is_ok());
                }
                Kind::Hog => {
                    let _ = s.write(b"GET /version HTTP/1.1\r\n\r\n");
                }
                _ => {}
            }
        }
        match probe(sock, Duration::from_secs(10)) {
            Ok(d) => {
                probes += 1;
                worst = worst.max(d);
            }
            Err(e) => failures.push(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every bad request got its 400.
    let (mut bad_total, mut bad_400) = (0, 0);
    for (kind, s) in conns.iter_mut() {
        if let Kind::Garbage | Kind::Oversized = kind {
            bad_total += 1;
            match read_response(s, Duration::from_secs(5)) {
                Ok((400, text)) if text.contains("fault_message") => bad_400 += 1,
                Ok((st, text)) => failures.push(format!("bad request answered {st}: {text}")),
                Err(e) => failures.push(format!("bad request not answered: {e}")),
            }
        }
    }
    drop(conns);
    let after = probe(sock, Duration::from_secs(10));
    println!(
        "api-flood: {} connections ({refused} refused), {}s; GET / probes: {probes} answered, {} failed, baseline {:.2} ms, worst {:.2} ms (bound {} ms); bad requests answered 400: {bad_400}/{bad_total}; after: {}",
        opts.conns,
        opts.secs,
        failures.len(),
        baseline.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3,
        opts.max_probe.as_millis(),
        match &after {
            Ok(d) => format!("GET / answered in {:.2} ms", d.as_secs_f64() * 1e3),
            Err(e) => format!("GET / failed: {e}"),
        }
    );
    for f in failures.iter().take(5) {
        println!("api-flood: failure: {f}");
    }
    let ok = failures.is_empty()
        && after.is_ok()
        && worst <= opts.max_probe
        && bad_400 == bad_total
        && probes > 0;
    println!("api-flood: {}", if ok { "PASS" } else { "FAIL" });
    Ok(if ok { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kiln_api::{ApiServer, PreBootVm, Starter, VmControl, VmResources};

    use super::*;

    struct NoStart;

    impl Starter for NoStart {
        fn start(&self, _: &VmResources) -> Result<Arc<dyn VmControl>, String> {
            Err("no VM in this test".into())
        }
    }

    #[test]
    fn a_flood_against_the_real_server_passes() {
        let dir = std::env::temp_dir().join(format!("kiln-flood-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let vm = Arc::new(PreBootVm::new("flood", "0", Box::new(NoStart)));
        ApiServer::bind(&sock).unwrap().spawn(vm).unwrap();
        let code = flood(FloodOptions {
            sock: sock.clone(),
            conns: 60,
            secs: 1,
            max_probe: Duration::from_millis(500),
        })
        .unwrap();
        assert_eq!(code, 0);
        // Against nothing, the flood fails with a clear error.
        std::fs::remove_file(&sock).unwrap();
        let e = flood(FloodOptions {
            sock,
            conns: 1,
            secs: 1,
            max_probe: Duration::from_millis(500),
        })
        .unwrap_err();
        assert!(e.to_string().contains("the API does not answer"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
