//! Kiln's logger.
//!
//! Unconfigured, it writes `[kiln LEVEL] message` lines to stderr. Once
//! configured (`kiln vmm --log-path/--show-level/--show-log-origin`,
//! `PUT /logger` or a config file's `logger`), it writes Firecracker-style
//! lines:
//!
//! ```text
//! 2026-11-24T03:52:52.123456789 [instance-id:thread:LEVEL:file:line] message
//! ```
//!
//! (`:LEVEL` with show_level, `:file:line` with show_log_origin) to the
//! log file or named pipe (stderr without a path). The file is opened
//! non-blocking: a line that cannot be written at once (a full pipe, an I/O
//! error) is dropped and counted in the metrics (`logger.missed_log_count`;
//! errors other than a full pipe also in `logger.log_fails`).

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use kiln_api::LoggerConfig;
use log::{LevelFilter, Log, Metadata, Record};

/// Log lines dropped (any reason).
pub static MISSED_LOG_COUNT: AtomicU64 = AtomicU64::new(0);
/// Log lines dropped because of an I/O error (not a full pipe).
pub static LOG_FAILS: AtomicU64 = AtomicU64::new(0);

/// The instance id written in each line.
static INSTANCE_ID: OnceLock<String> = OnceLock::new();

struct Format {
    /// Firecracker-style lines (the logger was configured).
    configured: bool,
    show_level: bool,
    show_log_origin: bool,
    module: Option<String>,
    target: Option<File>,
}

struct KilnLogger(RwLock<Format>);

static LOGGER: KilnLogger = KilnLogger(RwLock::new(Format {
    configured: false,
    show_level: false,
    show_log_origin: false,
    module: None,
    target: None,
}));

/// Opens a log or metrics destination: a regular file (created if missing,
/// appended) or a named pipe, non-blocking. Opening read-write means a pipe
/// with no reader does not fail (its writes fill the pipe, then are dropped).
pub fn open_nonblock(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// Writes `line` with one non-blocking write: a full pipe is an error of
/// kind `WouldBlock`, a partial write one of kind `WriteZero`.
pub fn write_line(mut out: &File, line: &[u8]) -> io::Result<()> {
    match out.write(line)? {
        n if n == line.len() => Ok(()),
        n => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            format!("only {n} of {} bytes written", line.len()),
        )),
    }
}

/// Counts a log line that could not be written.
fn count_missed(e: &io::Error) {
    MISSED_LOG_COUNT.fetch_add(1, Ordering::Relaxed);
    if e.kind() != io::ErrorKind::WouldBlock {
        LOG_FAILS.fetch_add(1, Ordering::Relaxed);
    }
}

/// `2026-11-24T03:52:52.123456789` (UTC).
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// One Firecracker-style line (with its newline).
fn format_line(f: &Format, r: &Record, time: SystemTime, thread: &str) -> String {
    let id = INSTANCE_ID
        .get()
        .map(String::as_str)
        .unwrap_or("anonymous-instance");
    let mut tag = format!("{id}:{thread}");
    if f.show_level {
        tag.push(':');
        tag.push_str(r.level().as_str());
    }
    if f.show_log_origin {
        tag.push_str(&format!(
            ":{}:{}",
            r.file().unwrap_or("?"),
            r.line().map_or("?".to_string(), |l| l.to_string())
        ));
    }
    format!("{} [{tag}] {}\n", timestamp(time), r.args())
}

impl Log for KilnLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let f = self.0.read().unwrap_or_else(|e| e.into_inner());
        if !f.configured {
            eprintln!("[kiln {}] {}", r.level(), r.args());
            return;
        }
        if let Some(m) = &f.module {
            if !r.module_path().is_some_and(|p| p.starts_with(m.as_str())) {
                return;
            }
        }
        let thread = std::thread::current();
        let line = format_line(&f, r, SystemTime::now(), thread.name().unwrap_or("-"));
        let written = match &f.target {
            Some(file) => write_line(file, line.as_bytes()),
            None => io::stderr().write_all(line.as_bytes()),
        };
        if let Err(e) = written {
            count_missed(&e);
        }
    }

    fn flush(&self) {}
}

/// Installs the logger; `level` (or $KILN_LOG) defaults to `warn`.
pub fn init(level: Option<&str>) {
    let env = std::env::var("KILN_LOG").ok();
    let level = level
        .or(env.as_deref())
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Warn);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Sets the instance id written in each line (once).
pub fn set_instance_id(id: &str) {
    let _ = INSTANCE_ID.set(id.to_string());
}

/// Applies a (complete, merged) logger configuration: opens the log file,
/// then switches to Firecracker-style lines. The level defaults to Info
/// (Firecracker's default).
pub fn configure(config: &LoggerConfig) -> Result<(), String> {
    let target = match &config.log_path {
        Some(p) => Some(open_nonblock(Path::new(p)).map_err(|e| format!("log_path {p}: {e}"))?),
        None => None,
    };
    let mut f = LOGGER.0.write().unwrap_or_else(|e| e.into_inner());
    f.configured = true;
    f.show_level = config.show_level.unwrap_or(false);
    f.show_log_origin = config.show_log_origin.unwrap_or(false);
    f.module = config.module.clone();
    if target.is_some() {
        f.target = target;
    }
    log::set_max_level(
        config
            .level
            .map_or(LevelFilter::Info, kiln_api::LogLevel::filter),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_civil_time() {
        let t = UNIX_EPOCH + Duration::new(1_795_405_972, 5);
        assert_eq!(timestamp(t), "2026-11-23T03:52:52.000000005");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000");
        // A leap day.
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(t), "2000-02-29T00:00:00.000000000");
    }

    #[test]
    fn lines_show_level_and_origin_on_request() {
        set_instance_id("vm-1");
        let mut f = Format {
            configured: true,
            show_level: false,
            show_log_origin: false,
            module: None,
            target: None,
        };
        let args = format_args!("hello {}", 7);
        let rec = Record::builder()
            .args(args)
            .level(log::Level::Warn)
            .file(Some("src/x.rs"))
            .line(Some(12))
            .build();
        let line = format_line(&f, &rec, UNIX_EPOCH, "main");
        assert_eq!(line, "1970-01-01T00:00:00.000000000 [vm-1:main] hello 7\n");
        f.show_level = true;
        f.show_log_origin = true;
        let line = format_line(&f, &rec, UNIX_EPOCH, "kiln_api");
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000000000 [vm-1:kiln_api:WARN:src/x.rs:12] hello 7\n"
        );
    }

    #[test]
    fn a_full_fifo_drops_and_counts_lines_without_blocking() {
        let dir = std::env::temp_dir().join(format!("kiln-logger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("log.fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Nobody reads this pipe: opening does not block, writes fill it.
        let out = open_nonblock(&fifo).unwrap();
        let line = [b'x'; 1000];
        let results: Vec<_> = (0..200).map(|_| write_line(&out, &line)).collect();
        let written = results.iter().filter(|r| r.is_ok()).count();
        // A pipe holds 64 KiB by default: some lines fit, the rest fail at
        // once with WouldBlock (the logger counts those as missed).
        assert!(written > 0 && written < 200, "{written}");
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.kind() == io::ErrorKind::WouldBlock));
        let missed = MISSED_LOG_COUNT.load(Ordering::Relaxed);
        count_missed(&io::Error::from(io::ErrorKind::WouldBlock));
        assert!(MISSED_LOG_COUNT.load(Ordering::Relaxed) > missed);

        // A regular file is appended to.
        let file = dir.join("log.txt");
        std::fs::write(&file, "old\n").unwrap();
        let out = open_nonblock(&file).unwrap();
        write_line(&out, b"new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "old\nnew\n");
        // A read-only descriptor fails with an error that is not "full".
        let ro = File::open(&file).unwrap();
        let e = write_line(&ro, b"x\n").unwrap_err();
        assert_ne!(e.kind(), io::ErrorKind::WouldBlock);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
