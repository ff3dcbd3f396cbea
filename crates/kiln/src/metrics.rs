//! Firecracker-style metrics for `kiln vmm`: one JSON object per line,
//! written to `--metrics-path` / `PUT /metrics`'s file or named pipe when
//! configured, on `FlushMetrics`, and every 60 s.
//!
//! Every source keeps cumulative counters; [`Flusher`] remembers what it
//! reported last, so a counter shows its increase since the previous line
//! (Firecracker's "shared incremental" metrics) and a gauge (`*_us`,
//! `panic_count`) its current value. Field names are Firecracker's where it
//! has the metric; see the README for the list and Kiln's additions.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_api::metrics::API_METRICS;
use kiln_api::MetricsConfig;
use kiln_vmm::kiln_devices::virtio::DeviceMetrics;
use kiln_vmm::stats::{DeviceKind, VmStats};
use serde_json::{Map, Value};

use crate::logger::{self, LOG_FAILS, MISSED_LOG_COUNT};

/// How often the metrics are written without being asked (Firecracker's).
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// [`FLUSH_INTERVAL`], or `$KILN_METRICS_INTERVAL_MS` (for tests).
fn flush_interval() -> Duration {
    std::env::var("KILN_METRICS_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map_or(FLUSH_INTERVAL, Duration::from_millis)
}

/// Metrics lines that could not be written because the pipe was full.
pub static MISSED_METRICS_COUNT: AtomicU64 = AtomicU64::new(0);
/// Metrics lines that could not be written (any reason).
pub static METRICS_FAILS: AtomicU64 = AtomicU64::new(0);
/// Kiln panics (a gauge, as in Firecracker).
pub static PANIC_COUNT: AtomicU64 = AtomicU64::new(0);
/// Wall time from the process start (or the jailer's --start-time-us) to
/// the API being ready, µs.
pub static STARTUP_US: AtomicU64 = AtomicU64::new(0);
/// CPU time to the API being ready, µs.
pub static STARTUP_CPU_US: AtomicU64 = AtomicU64::new(0);
/// How long the last pause took, µs.
pub use kiln_controller::running::PAUSE_US;
/// How long the last resume took, µs.
pub use kiln_controller::running::RESUME_US;

/// Builds metrics lines, remembering each counter's last reported value.
#[derive(Default)]
pub struct Flusher {
    last: HashMap<String, u64>,
    root: Map<String, Value>,
}

impl Flusher {
    fn section(&mut self, name: &str) -> &mut Map<String, Value> {
        match self
            .root
            .entry(name.to_string())
            .or_insert_with(|| Value::Object(Map::new()))
        {
            Value::Object(m) => m,
            _ => unreachable!("sections are objects"),
        }
    }

    /// Reports the increase of a cumulative counter since the last line.
    pub fn counter(&mut self, section: &str, field: &str, total: u64) {
        let last = self
            .last
            .insert(format!("{section}.{field}"), total)
            .unwrap_or(0);
        self.section(section)
            .insert(field.to_string(), total.saturating_sub(last).into());
    }

    /// Reports a current value.
    pub fn gauge(&mut self, section: &str, field: &str, value: u64) {
        self.section(section)
            .insert(field.to_string(), value.into());
    }

    /// The line built so far (and starts the next one).
    pub fn take(&mut self) -> Map<String, Value> {
        std::mem::take(&mut self.root)
    }

    fn device(&mut self, kind: DeviceKind, section: &str, m: &Totals) {
        for (field, v) in fields(kind, m) {
            self.counter(section, field, v);
        }
    }

    /// Adds every Kiln source: the API, the logger, the process, and the
    /// VM's counters when one runs.
    pub fn collect(&mut self, vm: Option<&VmStats>) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        self.root.insert("utc_timestamp_ms".into(), ms.into());

        self.gauge("api_server", "process_startup_time_us", load(&STARTUP_US));
        self.gauge(
            "api_server",
            "process_startup_time_cpu_us",
            load(&STARTUP_CPU_US),
        );
        let api = &API_METRICS;
        self.counter(
            "api_server",
            "sync_response_fails",
            load(&api.sync_response_fails),
        );
        self.counter(
            "api_server",
            "sync_vmm_send_timeout_count",
            load(&api.sync_vmm_send_timeout_count),
        );
        for (section, field, v) in api.snapshot() {
            self.counter(section, &field, v);
        }

        self.counter(
            "logger",
            "missed_metrics_count",
            load(&MISSED_METRICS_COUNT),
        );
        self.counter("logger", "metrics_fails", load(&METRICS_FAILS));
        self.counter("logger", "missed_log_count", load(&MISSED_LOG_COUNT));
        self.counter("logger", "log_fails", load(&LOG_FAILS));

        self.gauge("latencies_us", "pause_vm", load(&PAUSE_US));
        self.gauge("latencies_us", "resume_vm", load(&RESUME_US));
        // Refused syscalls trapped (KILN_SECCOMP=trap); in the default
        // mode the first one kills the process. Kiln installs no handlers
        // for the fault signals below.
        self.gauge("seccomp", "num_faults", kiln_seccomp::faults());
        for s in [
            "sigbus", "sigsegv", "sigxfsz", "sigxcpu", "sigpipe", "sighup", "sigill",
        ] {
            self.gauge("signals", s, 0);
        }
        self.gauge("vmm", "panic_count", load(&PANIC_COUNT));

        let empty = VmStats::default();
        let vm = vm.unwrap_or(&empty);
        self.counter("vmm", "device_events", load(&vm.device_events));
        let c = &vm.vcpu;
        for (field, v) in [
            ("exit_io_in", &c.exit_io_in),
            ("exit_io_out", &c.exit_io_out),
            ("exit_mmio_read", &c.exit_mmio_read),
            ("exit_mmio_write", &c.exit_mmio_write),
            ("failures", &c.failures),
            ("kvmclock_ctrl_fails", &c.kvmclock_ctrl_fails),
        ] {
            self.counter("vcpu", field, load(v));
        }
        for (section, b) in [("uart", &vm.uart), ("i8042", &vm.i8042), ("rtc", &vm.rtc)] {
            self.counter(section, "read_count", load(&b.reads));
            self.counter(section, "write_count", load(&b.writes));
        }

        // Devices: one section per drive and interface plus the aggregates
        // (always present, zero without devices, as in Firecracker).
        let mut sums: HashMap<&str, (DeviceKind, Totals)> = [
            ("block", DeviceKind::Block),
            ("net", DeviceKind::Net),
            ("vsock", DeviceKind::Vsock),
            ("entropy", DeviceKind::Rng),
            ("balloon", DeviceKind::Balloon),
        ]
        .into_iter()
        .map(|(name, kind)| (name, (kind, Totals::default())))
        .collect();
        for d in &vm.devices {
            let t = Totals::of(&d.metrics);
            let name = match d.kind {
                DeviceKind::Block => "block",
                DeviceKind::Net => "net",
                DeviceKind::Vsock => "vsock",
                DeviceKind::Rng => "entropy",
                DeviceKind::Balloon => "balloon",
            };
            if matches!(d.kind, DeviceKind::Block | DeviceKind::Net) {
                self.device(d.kind, &format!("{name}_{}", d.id), &t);
            }
            if let Some((_, sum)) = sums.get_mut(name) {
                sum.add(&t);
            }
        }
        for (name, (kind, t)) in sums {
            self.device(kind, name, &t);
        }
    }
}

/// A device's counters, loaded once.
#[derive(Default)]
struct Totals {
    requests: u64,
    invalid: u64,
    io_errors: u64,
    from_guest: u64,
    to_guest: u64,
    throttled: u64,
    reads: u64,
    writes: u64,
    flushes: u64,
}

impl Totals {
    fn of(m: &DeviceMetrics) -> Self {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Self {
            requests: l(&m.requests),
            invalid: l(&m.invalid_requests),
            io_errors: l(&m.io_errors),
            from_guest: l(&m.bytes_from_guest),
            to_guest: l(&m.bytes_to_guest),
            throttled: l(&m.throttled),
            reads: l(&m.reads),
            writes: l(&m.writes),
            flushes: l(&m.flushes),
        }
    }

    fn add(&mut self, o: &Totals) {
        self.requests += o.requests;
        self.invalid += o.invalid;
        self.io_errors += o.io_errors;
        self.from_guest += o.from_guest;
        self.to_guest += o.to_guest;
        self.throttled += o.throttled;
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
    }
}

/// A device's fields: Firecracker's names, plus `invalid_reqs_count` and
/// `io_fails` where Firecracker has no single equivalent.
fn fields(kind: DeviceKind, t: &Totals) -> Vec<(&'static str, u64)> {
    match kind {
        DeviceKind::Block => vec![
            ("read_bytes", t.to_guest),
            ("write_bytes", t.from_guest),
            ("read_count", t.reads),
            ("write_count", t.writes),
            ("flush_count", t.flushes),
            ("invalid_reqs_count", t.invalid),
            ("execute_fails", t.io_errors),
            ("rate_limiter_throttled_events", t.throttled),
        ],
        DeviceKind::Net | DeviceKind::Vsock => vec![
            ("rx_bytes_count", t.to_guest),
            ("tx_bytes_count", t.from_guest),
            ("rx_packets_count", t.reads),
            ("tx_packets_count", t.writes),
            ("invalid_reqs_count", t.invalid),
            ("io_fails", t.io_errors),
            ("rate_limiter_throttled", t.throttled),
        ],
        DeviceKind::Rng => vec![
            ("entropy_event_count", t.requests),
            ("entropy_bytes", t.to_guest),
            ("host_rng_fails", t.io_errors),
            ("entropy_rate_limiter_throttled", t.throttled),
            ("invalid_reqs_count", t.invalid),
        ],
        DeviceKind::Balloon => vec![
            ("inflate_count", t.writes),
            ("deflate_count", t.reads),
            ("invalid_reqs_count", t.invalid),
        ],
    }
}

struct Output {
    file: File,
    id: Option<String>,
    properties: Option<Value>,
}

struct State {
    out: Option<Output>,
    flusher: Flusher,
    vm: Option<VmStats>,
}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(|| {
        Mutex::new(State {
            out: None,
            flusher: Flusher::default(),
            vm: None,
        })
    })
}

/// Starts the metrics: opens the destination, writes a first line and
/// starts the 60 s timer. Only once per process.
pub fn configure(config: &MetricsConfig, instance_id: &str) -> Result<(), String> {
    let mut s = state().lock().unwrap_or_else(|e| e.into_inner());
    if s.out.is_some() {
        return Err("The metrics system is already initialized".into());
    }
    let file = logger::open_nonblock(Path::new(&config.metrics_path))
        .map_err(|e| format!("metrics_path {}: {e}", config.metrics_path))?;
    s.out = Some(Output {
        file,
        id: config.emit_id.then(|| instance_id.to_string()),
        properties: config
            .properties
            .as_ref()
            .and_then(|p| serde_json::to_value(p).ok()),
    });
    drop(s);
    static TIMER: AtomicBool = AtomicBool::new(false);
    if !TIMER.swap(true, Ordering::SeqCst) {
        let spawned = kiln_seccomp::spawn(
            kiln_seccomp::ThreadKind::Metrics,
            "kiln_metrics".into(),
            || loop {
                std::thread::sleep(flush_interval());
                if let Err(e) = flush() {
                    log::debug!("periodic metrics flush: {e}");
                }
            },
        );
        if let Err(e) = spawned {
            log::warn!("metrics: cannot start the 60 s timer: {e}");
        }
    }
    // A first line right away; a failure is counted, not fatal.
    if let Err(e) = flush() {
        log::warn!("metrics: {e}");
    }
    Ok(())
}

/// Makes the running VM's counters part of the metrics.
pub fn set_vm(stats: VmStats) {
    state().lock().unwrap_or_else(|e| e.into_inner()).vm = Some(stats);
}

/// Writes one metrics line now. Without a metrics destination it does
/// nothing (like Firecracker). A line that cannot be written is dropped and
/// counted (`logger.metrics_fails`, and `missed_metrics_count` if the pipe
/// was full).
pub fn flush() -> Result<(), String> {
    let mut guard = state().lock().unwrap_or_else(|e| e.into_inner());
    write_locked(&mut guard)
}

fn write_locked(s: &mut State) -> Result<(), String> {
    let State { out, flusher, vm } = s;
    let Some(out) = out.as_ref() else {
        return Ok(());
    };
    flusher.collect(vm.as_ref());
    let mut line = flusher.take();
    if let Some(id) = &out.id {
        line.insert("id".into(), id.clone().into());
    }
    if let Some(p) = &out.properties {
        line.insert("properties".into(), p.clone());
    }
    let mut text = Value::Object(line).to_string();
    text.push('\n');
    logger::write_line(&out.file, text.as_bytes()).map_err(|e| {
        METRICS_FAILS.fetch_add(1, Ordering::Relaxed);
        if e.kind() == io::ErrorKind::WouldBlock {
            MISSED_METRICS_COUNT.fetch_add(1, Ordering::Relaxed);
        }
        format!("Cannot write the metrics: {e}")
    })
}

/// On a panic: counts it and writes the metrics one last time (if nothing
/// else holds them).
pub fn on_panic() {
    PANIC_COUNT.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut s) = state().try_lock() {
        let _ = write_locked(&mut s);
    }
}

/// Records the process's startup times (wall and CPU, µs) once the API is
/// ready. `start_time_us`/`start_time_cpu_us`/`parent_cpu_time_us` are the
/// jailer's flags; without them the process start is the origin.
pub fn record_startup(
    start: std::time::Instant,
    start_time_us: Option<u64>,
    start_time_cpu_us: Option<u64>,
    parent_cpu_time_us: Option<u64>,
) {
    let wall = match start_time_us {
        Some(t0) => clock_us(libc::CLOCK_MONOTONIC).saturating_sub(t0),
        None => start.elapsed().as_micros() as u64,
    };
    let cpu = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID)
        .saturating_sub(start_time_cpu_us.unwrap_or(0))
        + parent_cpu_time_us.unwrap_or(0);
    STARTUP_US.store(wall, Ordering::Relaxed);
    STARTUP_CPU_US.store(cpu, Ordering::Relaxed);
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_vmm::stats::DeviceStats;
    use std::sync::Arc;

    #[test]
    fn counters_report_the_increase_since_the_last_line() {
        let mut f = Flusher::default();
        let total = AtomicU64::new(0);
        for _ in 0..3 {
            total.fetch_add(1, Ordering::Relaxed);
        }
        f.counter("vcpu", "exit_io_in", total.load(Ordering::Relaxed));
        f.gauge("vmm", "panic_count", 2);
        let first = f.take();
        assert_eq!(first["vcpu"]["exit_io_in"], 3);
        f.counter("vcpu", "exit_io_in", total.load(Ordering::Relaxed));
        f.gauge("vmm", "panic_count", 2);
        let second = f.take();
        assert_eq!(second["vcpu"]["exit_io_in"], 0);
        assert_eq!(second["vmm"]["panic_count"], 2, "gauges keep their value");
        total.fetch_add(5, Ordering::Relaxed);
        f.counter("vcpu", "exit_io_in", total.load(Ordering::Relaxed));
        assert_eq!(f.take()["vcpu"]["exit_io_in"], 5);
    }

    #[test]
    fn lines_have_firecrackers_sections_and_per_device_objects() {
        let block = Arc::new(DeviceMetrics::default());
        let vm = VmStats {
            devices: vec![
                DeviceStats {
                    kind: DeviceKind::Block,
                    id: "rootfs".into(),
                    metrics: block.clone(),
                },
                DeviceStats {
                    kind: DeviceKind::Block,
                    id: "data".into(),
                    metrics: Arc::new(DeviceMetrics::default()),
                },
                DeviceStats {
                    kind: DeviceKind::Net,
                    id: "eth0".into(),
                    metrics: Arc::new(DeviceMetrics::default()),
                },
            ],
            ..Default::default()
        };
        for _ in 0..3 {
            DeviceMetrics::add(&block.reads, 1);
            DeviceMetrics::add(&block.bytes_to_guest, 512);
        }
        vm.vcpu.exit_mmio_write.fetch_add(4, Ordering::Relaxed);
        vm.uart.writes.fetch_add(9, Ordering::Relaxed);
        let mut f = Flusher::default();
        f.collect(Some(&vm));
        let line = Value::Object(f.take());
        for section in [
            "utc_timestamp_ms",
            "api_server",
            "get_api_requests",
            "put_api_requests",
            "patch_api_requests",
            "block",
            "block_rootfs",
            "block_data",
            "net",
            "net_eth0",
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
            assert!(line.get(section).is_some(), "{section} missing: {line}");
        }
        for (section, field) in [
            ("api_server", "process_startup_time_us"),
            ("api_server", "process_startup_time_cpu_us"),
            ("api_server", "sync_response_fails"),
            ("api_server", "sync_vmm_send_timeout_count"),
            ("put_api_requests", "actions_count"),
            ("put_api_requests", "logger_fails"),
            ("get_api_requests", "instance_info_count"),
            ("patch_api_requests", "drive_count"),
            ("logger", "missed_metrics_count"),
            ("logger", "metrics_fails"),
            ("logger", "missed_log_count"),
            ("logger", "log_fails"),
            ("vcpu", "exit_io_in"),
            ("vcpu", "exit_io_out"),
            ("vcpu", "exit_mmio_read"),
            ("vcpu", "failures"),
            ("seccomp", "num_faults"),
            ("vmm", "panic_count"),
            ("vmm", "device_events"),
            ("net_eth0", "tx_bytes_count"),
            ("entropy", "entropy_bytes"),
            ("balloon", "inflate_count"),
        ] {
            assert!(line[section].get(field).is_some(), "{section}.{field}");
        }
        assert_eq!(line["block_rootfs"]["read_count"], 3);
        assert_eq!(line["block_rootfs"]["read_bytes"], 1536);
        assert_eq!(line["block_data"]["read_count"], 0);
        assert_eq!(line["block"]["read_count"], 3, "the aggregate sums drives");
        assert_eq!(line["vcpu"]["exit_mmio_write"], 4);
        assert_eq!(line["uart"]["write_count"], 9);
        DeviceMetrics::add(&block.reads, 1);
        f.collect(Some(&vm));
        let line = Value::Object(f.take());
        assert_eq!(line["block_rootfs"]["read_count"], 1);
        assert_eq!(line["block"]["read_count"], 1);
        assert_eq!(line["uart"]["write_count"], 0);
    }
}
