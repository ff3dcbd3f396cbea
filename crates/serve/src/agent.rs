//! The host side of the in-guest agent's function protocol (`kiln-agent
//! fn-serve`), reached through the hybrid vsock Unix socket of a VM.
//!
//! ```text
//! host → guest  PING\n                                  guest → host  PONG\n
//! host → guest  RUN <cmd len> <input len>\n<cmd><input>
//!                                     guest → host  EXIT <code> <out len> <err len>\n<out><err>
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The guest port the agent listens on.
pub const AGENT_PORT: u32 = 5000;
/// Largest output the host accepts from one call, bytes.
pub const MAX_OUTPUT: usize = 64 << 20;

/// What one call returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallResult {
    /// The command's exit status.
    pub code: i32,
    /// Its standard output.
    pub stdout: Vec<u8>,
    /// Its standard error.
    pub stderr: Vec<u8>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one header line, without its `\n`.
fn read_line(r: &mut impl Read) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if r.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the guest closed the connection",
            ));
        }
        if b[0] == b'\n' {
            break;
        }
        if line.len() >= 256 {
            return Err(invalid("header line too long".into()));
        }
        line.push(b[0]);
    }
    String::from_utf8(line).map_err(|_| invalid("header is not UTF-8".into()))
}

/// A connection to a VM's agent.
#[derive(Debug)]
pub struct AgentConn {
    stream: UnixStream,
}

impl AgentConn {
    /// Connects through the VM's hybrid vsock socket `uds` to the agent.
    pub fn connect(uds: &Path, timeout: Duration) -> io::Result<Self> {
        let mut stream = UnixStream::connect(uds)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())?;
        let line = read_line(&mut stream)?;
        if !line.starts_with("OK ") {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("vsock CONNECT answered {line:?}"),
            ));
        }
        Ok(Self { stream })
    }

    /// Checks that the agent answers.
    pub fn ping(&mut self) -> io::Result<()> {
        self.stream.write_all(b"PING\n")?;
        match read_line(&mut self.stream)?.as_str() {
            "PONG" => Ok(()),
            other => Err(invalid(format!("agent answered {other:?} to PING"))),
        }
    }

    /// Runs `cmd` in the guest with `input` on its stdin; the whole call
    /// (sending, running, answering) must end within `timeout`.
    pub fn call(&mut self, cmd: &str, input: &[u8], timeout: Duration) -> io::Result<CallResult> {
        let mut io = Deadline {
            stream: &mut self.stream,
            end: Instant::now() + timeout,
        };
        let mut req = format!("RUN {} {}\n", cmd.len(), input.len()).into_bytes();
        req.extend_from_slice(cmd.as_bytes());
        req.extend_from_slice(input);
        io.write_all(&req)?;
        let head = read_line(&mut io)?;
        let w: Vec<&str> = head.split(' ').collect();
        let (code, out, err) = match w.as_slice() {
            ["EXIT", c, o, e] => (c.parse::<i32>(), o.parse::<usize>(), e.parse::<usize>()),
            _ => return Err(invalid(format!("agent answered {head:?}"))),
        };
        let (Ok(code), Ok(out), Ok(err)) = (code, out, err) else {
            return Err(invalid(format!("agent answered {head:?}")));
        };
        if out > MAX_OUTPUT || err > MAX_OUTPUT {
            return Err(invalid(format!(
                "agent announced {out}+{err} bytes of output"
            )));
        }
        let mut stdout = vec![0; out];
        io.read_exact(&mut stdout)?;
        let mut stderr = vec![0; err];
        io.read_exact(&mut stderr)?;
        Ok(CallResult {
            code,
            stdout,
            stderr,
        })
    }
}

/// A stream whose reads and writes all end by one deadline.
struct Deadline<'a> {
    stream: &'a mut UnixStream,
    end: Instant,
}

impl Deadline<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "call timed out"));
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let left = self.left()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake hybrid-vsock socket answering `script` after the CONNECT line.
    fn peer(script: &'static [u8]) -> (tempdir::Dir, std::thread::JoinHandle<Vec<u8>>) {
        let d = tempdir::Dir::new();
        let l = UnixListener::bind(d.0.join("v.sock")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let line = read_line(&mut s).unwrap();
            assert_eq!(line, "CONNECT 5000");
            s.write_all(b"OK 1073741824\n").unwrap();
            s.write_all(script).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        (d, t)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "kiln-serve-agent-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Self(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn a_call_sends_the_command_and_reads_both_outputs() {
        let (d, t) = peer(b"EXIT 3 5 4\nHELLOoops");
        let mut c = AgentConn::connect(&d.0.join("v.sock"), Duration::from_secs(5)).unwrap();
        let r = c
            .call("tr a-z A-Z", b"hello", Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            r,
            CallResult {
                code: 3,
                stdout: b"HELLO".to_vec(),
                stderr: b"oops".to_vec()
            }
        );
        drop(c);
        assert_eq!(t.join().unwrap(), b"RUN 10 5\ntr a-z A-Zhello");
    }

    #[test]
    fn garbage_and_short_answers_are_errors() {
        for script in [&b"EXIT x 1 1\n"[..], b"WHAT\n", b"EXIT 0 10 0\nshort", b""] {
            let script: &'static [u8] = Box::leak(script.to_vec().into_boxed_slice());
            let (d, t) = peer(script);
            let mut c = AgentConn::connect(&d.0.join("v.sock"), Duration::from_secs(5)).unwrap();
            assert!(c.call("true", b"", Duration::from_secs(5)).is_err());
            drop(c);
            t.join().unwrap();
        }
    }

    #[test]
    fn a_trickling_agent_cannot_outlast_the_call_timeout() {
        let d = tempdir::Dir::new();
        let l = UnixListener::bind(d.0.join("v.sock")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = read_line(&mut s);
            s.write_all(b"OK 1\n").unwrap();
            // One byte every 100 ms: each read is quick, the call is not.
            for b in b"EXIT 0 100 0\n".iter().chain([b'x'; 100].iter()) {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let mut c = AgentConn::connect(&d.0.join("v.sock"), Duration::from_secs(5)).unwrap();
        let t0 = Instant::now();
        let e = c.call("true", b"", Duration::from_millis(700)).unwrap_err();
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t0.elapsed()
        );
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ),
            "{e}"
        );
        drop(c);
        t.join().unwrap();
    }

    #[test]
    fn a_refused_connect_is_an_error() {
        let d = tempdir::Dir::new();
        let l = UnixListener::bind(d.0.join("v.sock")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = read_line(&mut s);
            s.write_all(b"FAILURE\n").unwrap();
        });
        let e = AgentConn::connect(&d.0.join("v.sock"), Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("FAILURE"), "{e}");
        t.join().unwrap();
    }
}
