//! Parser for the lab's results channel (`/dev/ttyS1` inside the lab).
//!
//! The channel is a dedicated serial port in raw mode, so kernel messages
//! (which go to `ttyS0`) never interleave with it. Each command is framed as:
//!
//! ```text
//! KILN-CMD-BEGIN <i>
//! KILN-CMD-ALIVE <i> <secs>      (every minute while it runs; ignored here)
//! KILN-CMD-OUT <i> <len>
//! <exactly len bytes of combined stdout+stderr>
//! KILN-CMD-END <i> <status>
//! ```
//!
//! (the newline before `KILN-CMD-END` is always written, even after output
//! that already ends with one) and the run ends with `KILN-RUN-DONE`. Because
//! the output length is sent up front, output may contain anything, including
//! lines that look like markers.

/// One finished command as read from the results channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Index of the command in the run.
    pub index: usize,
    /// Combined stdout+stderr (lossily decoded as UTF-8).
    pub output: String,
    /// Exit status as reported by the shell.
    pub status: i32,
}

/// Everything that could be parsed from a (possibly truncated) channel.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// `KILN-RUN-START` was seen: `/lab/run.sh` started.
    pub started: bool,
    /// Completed commands, in order.
    pub frames: Vec<Frame>,
    /// Index of a command that began but did not finish.
    pub running: Option<usize>,
    /// `KILN-RUN-DONE` was seen.
    pub done: bool,
    /// A framing violation, if any (parsing stops there).
    pub error: Option<String>,
}

/// Splits one `\n`-terminated line off `buf` at `pos`.
fn line(buf: &[u8], pos: &mut usize) -> Option<String> {
    let rest = &buf[*pos..];
    let nl = rest.iter().position(|&b| b == b'\n')?;
    *pos += nl + 1;
    let l = String::from_utf8_lossy(&rest[..nl]);
    Some(l.trim_end_matches('\r').to_string())
}

/// Parses `<prefix> <a> <b>...` into integers.
fn nums<T: std::str::FromStr>(l: &str, prefix: &str, n: usize) -> Option<Vec<T>> {
    let rest = l.strip_prefix(prefix)?.strip_prefix(' ')?;
    let v: Vec<T> = rest
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    (v.len() == n).then_some(v)
}

/// Parses the results channel. Never fails: problems are reported in
/// [`Parsed::error`] and truncation shows as `running`/`!done`.
pub fn parse(buf: &[u8]) -> Parsed {
    let mut p = Parsed::default();
    let mut pos = 0;
    while let Some(l) = line(buf, &mut pos) {
        if l == "KILN-RUN-START" {
            p.started = true;
        } else if l == "KILN-RUN-DONE" {
            p.done = true;
            p.running = None;
            break;
        } else if let Some(v) = nums::<usize>(&l, "KILN-CMD-BEGIN", 1) {
            p.running = Some(v[0]);
        } else if let Some(v) = nums::<usize>(&l, "KILN-CMD-OUT", 2) {
            let (index, len) = (v[0], v[1]);
            if p.running != Some(index) {
                p.error = Some(format!("output for command {index} without BEGIN"));
                break;
            }
            if buf.len() < pos + len + 1 {
                break; // truncated inside the output
            }
            let output = String::from_utf8_lossy(&buf[pos..pos + len]).into_owned();
            pos += len;
            if buf[pos] != b'\n' {
                p.error = Some(format!("missing separator after output of command {index}"));
                break;
            }
            pos += 1;
            let Some(end) = line(buf, &mut pos) else {
                break; // truncated before END
            };
            match nums::<i64>(&end, "KILN-CMD-END", 2) {
                Some(e) if e[0] == index as i64 => {
                    p.frames.push(Frame {
                        index,
                        output,
                        status: e[1] as i32,
                    });
                    p.running = None;
                }
                _ => {
                    p.error = Some(format!("bad end marker for command {index}: {end:?}"));
                    break;
                }
            }
        }
        // Anything else (noise) is ignored.
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: usize, out: &str, status: i32) -> String {
        format!(
            "KILN-CMD-BEGIN {i}\nKILN-CMD-OUT {i} {}\n{out}\nKILN-CMD-END {i} {status}\n",
            out.len()
        )
    }

    #[test]
    fn complete_run() {
        let mut s = String::from("noise\nKILN-RUN-START\n");
        s += &frame(0, "hello\n", 0);
        s += &frame(1, "", 3);
        s += &frame(2, "no newline", 1);
        s += "KILN-RUN-DONE\n";
        let p = parse(s.as_bytes());
        assert!(p.started && p.done);
        assert_eq!(p.error, None);
        assert_eq!(p.frames.len(), 3);
        assert_eq!(p.frames[0].output, "hello\n");
        assert_eq!(p.frames[1].status, 3);
        assert_eq!(p.frames[1].output, "");
        assert_eq!(p.frames[2].output, "no newline");
    }

    #[test]
    fn heartbeats_while_a_command_runs_are_not_output() {
        let f = frame(0, "out\n", 0).replacen(
            "KILN-CMD-OUT",
            "KILN-CMD-ALIVE 0 60\nKILN-CMD-ALIVE 0 120\nKILN-CMD-OUT",
            1,
        );
        let p = parse(format!("KILN-RUN-START\n{f}KILN-RUN-DONE\n").as_bytes());
        assert!(p.done);
        assert_eq!(p.error, None);
        assert_eq!(p.frames[0].output, "out\n");
        let p = parse(b"KILN-RUN-START\nKILN-CMD-BEGIN 0\nKILN-CMD-ALIVE 0 60\n");
        assert_eq!((p.running, p.frames.len()), (Some(0), 0));
    }

    #[test]
    fn output_may_contain_markers() {
        let evil = "KILN-CMD-END 0 0\nKILN-RUN-DONE\nKILN-CMD-BEGIN 9\n";
        let s = format!("KILN-RUN-START\n{}KILN-RUN-DONE\n", frame(0, evil, 5));
        let p = parse(s.as_bytes());
        assert!(p.done);
        assert_eq!(p.frames.len(), 1);
        assert_eq!(p.frames[0].output, evil);
        assert_eq!(p.frames[0].status, 5);
    }

    #[test]
    fn truncated_runs() {
        let full = format!(
            "KILN-RUN-START\n{}{}",
            frame(0, "a\n", 0),
            frame(1, "bbbb\n", 2)
        );
        for cut in 0..full.len() {
            let p = parse(&full.as_bytes()[..cut]);
            assert!(!p.done);
            assert_eq!(p.error, None, "cut at {cut}");
            assert!(p.frames.len() <= 2);
        }
        let cut = full.find("KILN-CMD-OUT 1").unwrap();
        let p = parse(&full.as_bytes()[..cut]);
        assert_eq!(p.frames.len(), 1);
        assert_eq!(p.running, Some(1));
    }

    #[test]
    fn crlf_and_bad_frames() {
        let p = parse(b"KILN-RUN-START\r\nKILN-CMD-BEGIN 0\r\n");
        assert!(p.started);
        assert_eq!(p.running, Some(0));
        let p = parse(b"KILN-CMD-BEGIN 0\nKILN-CMD-OUT 0 1\nxy\n");
        assert!(p.error.is_some());
        let p = parse(b"KILN-CMD-OUT 4 1\nx\n");
        assert!(p.error.is_some());
    }
}
