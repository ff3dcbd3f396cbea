//! What a lab that stopped answering was doing, asked of QEMU itself.
//!
//! Every lab QEMU serves its monitor (QMP) on a Unix socket. When a run
//! stalls, [`diagnose`] reads each emulated CPU's registers (where the lab
//! kernel is stuck: instruction pointer, privilege level, halted or not)
//! and then sends an NMI to every CPU: the lab kernel is booted with
//! `unknown_nmi_panic` and `panic_print` set to dump every CPU's stack, so
//! a lab kernel that can still run prints where its CPUs were on the
//! kernel log (see [`crate::lab`]), and one that cannot shows that too.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long one monitor exchange may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A connected QMP session.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(sock: &Path) -> io::Result<Self> {
        let s = UnixStream::connect(sock)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        let mut q = Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        };
        q.reply()?; // the greeting
        q.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    /// The next line that is not an asynchronous event.
    fn reply(&mut self) -> io::Result<String> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "QEMU closed its monitor",
                ));
            }
            if !line.contains(r#""event""#) {
                return Ok(line);
            }
        }
    }

    fn execute(&mut self, command: &str) -> io::Result<String> {
        self.writer.write_all(command.as_bytes())?;
        self.writer.write_all(b"\n")?;
        self.reply()
    }
}

/// One line per CPU from HMP's `info registers -a`: its number, where it
/// runs (RIP, CPL) and whether it is halted.
pub fn summarize_registers(text: &str) -> Vec<String> {
    let mut cpus = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("CPU#") {
            current = Some(line.to_string());
        } else if let Some(rest) = line.strip_prefix("RIP=") {
            let cpu = current.take().unwrap_or_else(|| "CPU".to_string());
            let fields: Vec<&str> = rest
                .split_whitespace()
                .filter(|f| f.starts_with("CPL=") || f.starts_with("HLT=") || f.starts_with("II="))
                .collect();
            let rip = rest.split_whitespace().next().unwrap_or("?");
            cpus.push(format!("{cpu}: RIP={rip} {}", fields.join(" ")));
        }
    }
    cpus
}

/// Asks the QEMU behind `sock` where its CPUs are and sends them an NMI.
/// Returns a description for an error message (never fails: a monitor that
/// does not answer is itself a finding).
pub fn diagnose(sock: &Path) -> String {
    let mut q = match Qmp::connect(sock) {
        Ok(q) => q,
        Err(e) => return format!("QEMU's monitor did not answer ({e}): QEMU itself is stuck"),
    };
    let mut out = String::new();
    match q.execute(
        r#"{"execute":"human-monitor-command","arguments":{"command-line":"info registers -a"}}"#,
    ) {
        Ok(reply) => {
            let text = serde_json::from_str::<serde_json::Value>(&reply)
                .ok()
                .and_then(|v| v["return"].as_str().map(str::to_owned))
                .unwrap_or_default();
            let cpus = summarize_registers(&text);
            if cpus.is_empty() {
                out.push_str(&format!("registers: {}", reply.trim()));
            } else {
                out.push_str(&cpus.join("; "));
            }
        }
        Err(e) => out.push_str(&format!("registers not read: {e}")),
    }
    match q.execute(r#"{"execute":"inject-nmi"}"#) {
        Ok(_) => out.push_str("; NMI sent (the lab kernel prints its CPUs' stacks if it can)"),
        Err(e) => out.push_str(&format!("; NMI not sent: {e}")),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_are_summarized_per_cpu() {
        let text = "CPU#0\nRAX=0000000000000000 RBX=0000000000000001\nRIP=ffffffff81e01a60 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\nES =0000\nCPU#1\nRIP=00007f0012345678 RFL=00000202 [-------] CPL=3 II=0 A20=1 SMM=0 HLT=0\n";
        assert_eq!(
            summarize_registers(text),
            [
                "CPU#0: RIP=ffffffff81e01a60 CPL=0 II=0 HLT=1",
                "CPU#1: RIP=00007f0012345678 CPL=3 II=0 HLT=0"
            ]
        );
    }

    #[test]
    fn a_missing_monitor_is_reported() {
        let d = diagnose(Path::new("/nonexistent/kiln-qmp.sock"));
        assert!(d.contains("did not answer"), "{d}");
    }

    #[test]
    fn a_monitor_is_asked_for_registers_and_an_nmi() {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("kiln-qmp-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("qmp.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut got = Vec::new();
            w.write_all(b"{\"QMP\": {}}\n").unwrap();
            let answers = [
                "{\"return\": {}}\n".to_string(),
                "{\"event\": \"X\"}\n{\"return\": \"CPU#0\\r\\nRIP=ffffffff81000000 RFL=2 CPL=0 II=0 HLT=0\\r\\n\"}\n".to_string(),
                "{\"return\": {}}\n".to_string(),
            ];
            for a in answers {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                got.push(line);
                w.write_all(a.as_bytes()).unwrap();
            }
            got
        });
        let d = diagnose(&sock);
        let got = server.join().unwrap();
        assert!(got[1].contains("info registers -a"), "{got:?}");
        assert!(got[2].contains("inject-nmi"), "{got:?}");
        assert!(d.starts_with("CPU#0: RIP=ffffffff81000000 CPL=0"), "{d}");
        assert!(d.contains("NMI sent"), "{d}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
