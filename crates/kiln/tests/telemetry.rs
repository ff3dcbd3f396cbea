//! `kiln vmm`'s logger and metrics, natively (no guest needed): the flags,
//! `PUT /logger`, `PUT /metrics`, `FlushMetrics` before boot, the periodic
//! flush (shortened with $KILN_METRICS_INTERVAL_MS), the JSON lines and the
//! log lines.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln_api::client::{request, ClientResponse};
use serde_json::Value;

struct Vmm {
    child: Child,
    dir: PathBuf,
    sock: PathBuf,
}

impl Vmm {
    /// Starts `kiln vmm --api-sock` with `args` (paths relative to a fresh
    /// temp dir) and waits for its socket.
    fn start(name: &str, args: &[&str]) -> Vmm {
        let dir = std::env::temp_dir().join(format!("kiln-tel-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("vmm")
            .arg("--api-sock")
            .arg(&sock)
            .args(args)
            .current_dir(&dir)
            .env("KILN_METRICS_INTERVAL_MS", "200")
            .env("KILN_LAB", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kiln vmm");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "no API socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        Vmm { child, dir, sock }
    }

    fn req(&self, method: &str, uri: &str, body: Option<&str>) -> ClientResponse {
        request(&self.sock, method, uri, body).expect("API request")
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every metrics line written so far (each must be a JSON object).
fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The sum of `section.field` over every line (counters are increases).
fn total(lines: &[Value], section: &str, field: &str) -> u64 {
    lines
        .iter()
        .map(|l| l[section][field].as_u64().unwrap_or(0))
        .sum()
}

/// Waits until `ok` holds for the metrics lines.
fn wait_for(path: &Path, what: &str, ok: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = lines(path);
        if ok(&l) {
            return l;
        }
        let last = l.last().map(|v| v.to_string()).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "{what}: {} lines, last {last}",
            l.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_count_api_requests_and_logs_are_formatted() {
    let v = Vmm::start(
        "flags",
        &[
            "--id",
            "tel-1",
            "--metrics-path",
            "m.json",
            "--log-path",
            "l.log",
            "--level",
            "Info",
            "--show-level",
            "--show-log-origin",
        ],
    );
    let m = v.path("m.json");
    // The first line is written as soon as the metrics are configured.
    let first = wait_for(&m, "a first line", |l| !l.is_empty());
    for section in [
        "utc_timestamp_ms",
        "api_server",
        "get_api_requests",
        "put_api_requests",
        "patch_api_requests",
        "block",
        "net",
        "vsock",
        "entropy",
        "balloon",
        "vcpu",
        "seccomp",
        "latencies_us",
        "logger",
        "uart",
        "i8042",
        "rtc",
        "signals",
        "vmm",
    ] {
        assert!(first[0].get(section).is_some(), "{section}: {}", first[0]);
    }
    assert!(first[0].get("id").is_none(), "emit_id is off by default");

    let drive = r#"{"drive_id":"d1","path_on_host":"/d1.img","is_root_device":false}"#;
    assert_eq!(v.req("PUT", "/drives/d1", Some(drive)).status, 204);
    assert_eq!(v.req("PUT", "/drives/d2", Some(drive)).status, 400);
    assert_eq!(v.req("PUT", "/drives/d1", Some("{")).status, 400);
    assert_eq!(v.req("GET", "/", None).status, 200);
    // Metrics are configured once; the logger may be reconfigured pre-boot.
    let r = v.req("PUT", "/metrics", Some(r#"{"metrics_path":"other.json"}"#));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("already initialized"), "{r:?}");
    let r = v.req("PUT", "/logger", Some(r#"{"level":"Debug"}"#));
    assert_eq!(r.status, 204, "{r:?}");
    let r = v.req("PUT", "/logger", Some(r#"{"level":"Debug","x":1}"#));
    assert_eq!(r.status, 400, "{r:?}");
    // Firecracker refuses FlushMetrics before the microVM starts.
    let r = v.req("PUT", "/actions", Some(r#"{"action_type":"FlushMetrics"}"#));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("before starting"), "{r:?}");

    // The 200 ms timer flushes; the increases add up to the requests made.
    let all = wait_for(&m, "the requests counted", |l| {
        total(l, "put_api_requests", "actions_count") == 1
    });
    for (section, field, n) in [
        ("put_api_requests", "drive_count", 3),
        ("put_api_requests", "drive_fails", 2),
        ("put_api_requests", "metrics_count", 1),
        ("put_api_requests", "metrics_fails", 1),
        ("put_api_requests", "logger_count", 2),
        ("put_api_requests", "logger_fails", 1),
        ("put_api_requests", "actions_count", 1),
        ("put_api_requests", "actions_fails", 1),
        ("get_api_requests", "instance_info_count", 1),
        ("patch_api_requests", "drive_count", 0),
    ] {
        assert_eq!(total(&all, section, field), n, "{section}.{field}");
    }
    assert!(all.len() >= 2);
    let last = all.last().unwrap();
    assert!(
        last["api_server"]["process_startup_time_us"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(
        last["utc_timestamp_ms"].as_u64().unwrap()
            >= first[0]["utc_timestamp_ms"].as_u64().unwrap()
    );

    // GET /vm/config reports both, in Firecracker's shape.
    let c: Value = serde_json::from_str(&v.req("GET", "/vm/config", None).body).unwrap();
    assert_eq!(c["metrics"]["metrics_path"], "m.json");
    assert_eq!(c["logger"]["log_path"], "l.log");
    assert_eq!(c["logger"]["level"], "Debug");
    assert_eq!(c["logger"]["show_level"], true);

    // Log lines: "<time> [tel-1:<thread>:<LEVEL>:<file>:<line>] <message>".
    let log = std::fs::read_to_string(v.path("l.log")).unwrap();
    let listening = log
        .lines()
        .find(|l| l.contains("API listening on"))
        .unwrap_or_else(|| panic!("{log}"));
    let (time, rest) = listening.split_once(' ').unwrap();
    assert_eq!(
        time.len(),
        "2026-01-01T00:00:00.000000000".len(),
        "{listening}"
    );
    assert_eq!(&time[10..11], "T", "{listening}");
    assert!(rest.starts_with("[tel-1:main:INFO:"), "{listening}");
    assert!(rest.contains("vmm_cmd.rs:"), "{listening}");
    // After PUT /logger {"level":"Debug"}, debug lines appear (API thread).
    assert!(
        log.lines()
            .any(|l| l.contains("[tel-1:kiln_api:DEBUG:") && l.contains("api: PUT /actions")),
        "{log}"
    );
}

#[test]
fn a_log_fifo_without_reader_never_blocks_and_drops_are_counted() {
    let dir = std::env::temp_dir().join(format!("kiln-tel-pipe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("log.fifo");
    let _ = std::fs::remove_file(&fifo);
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let v = Vmm::start(
        "fifo",
        &["--log-path", fifo.to_str().unwrap(), "--level", "Debug"],
    );
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
    // Each request logs a debug line; nobody reads the pipe, so it fills
    // (64 KiB) and later lines are dropped. Every request is still answered.
    let t0 = Instant::now();
    for _ in 0..1500 {
        assert_eq!(v.req("GET", "/version", None).status, 200);
    }
    assert!(t0.elapsed() < Duration::from_secs(60));
    // Metrics configured over the API report the drops.
    let r = v.req(
        "PUT",
        "/metrics",
        Some(r#"{"metrics_path":"m.json","emit_id":true}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let m = v.path("m.json");
    let l = wait_for(&m, "missed log lines", |l| {
        total(l, "logger", "missed_log_count") > 0
    });
    assert_eq!(l[0]["id"], "anonymous-instance");
    assert_eq!(total(&l, "logger", "log_fails"), 0, "a full pipe is a miss");
    assert!(total(&l, "get_api_requests", "vmm_version_count") >= 1500);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_metrics_and_log_paths_fail_with_one_line() {
    for (args, expect) in [
        (
            vec!["--metrics-path", "/nonexistent/dir/m.json"],
            "kiln: vmm: metrics_path /nonexistent/dir/m.json: No such file",
        ),
        (
            vec!["--log-path", "/nonexistent/dir/l.log"],
            "kiln: vmm: log_path /nonexistent/dir/l.log: No such file",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["vmm", "--api-sock", "/tmp/kiln-tel-unused.sock"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with(expect), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}
