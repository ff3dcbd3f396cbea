//! The pre-boot flow through the API: validation, start rules, telemetry,
//! config files.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use crate::models::{Balloon, BalloonStats, BalloonUpdate, InstanceInfo};
use crate::telemetry::{LoggerConfig, MetricsConfig, Telemetry};
use crate::{ApiError, VmControl};

/// A running VM with a balloon at 0 MiB.
struct Running;

impl VmControl for Running {
    fn instance_info(&self) -> InstanceInfo {
        // PreBootVm takes only the state from the running VM.
        InstanceInfo {
            id: "inner".into(),
            state: "Running".into(),
            vmm_version: "0".into(),
            app_name: "inner".into(),
        }
    }
    fn balloon(&self) -> Result<Balloon, ApiError> {
        Ok(Balloon {
            amount_mib: 0,
            deflate_on_oom: false,
            stats_polling_interval_s: 0,
            free_page_hinting: false,
            free_page_reporting: false,
        })
    }
    fn update_balloon(&self, _: &BalloonUpdate) -> Result<(), ApiError> {
        Ok(())
    }
    fn balloon_stats(&self) -> Result<BalloonStats, ApiError> {
        Err(ApiError::StatsDisabled)
    }
    fn send_ctrl_alt_del(&self) -> Result<(), ApiError> {
        Ok(())
    }
}

/// Starts unless the kernel path is "/missing"; counts starts.
struct FakeStarter(Arc<AtomicUsize>);

impl Starter for FakeStarter {
    fn start(&self, res: &VmResources) -> Result<Arc<dyn VmControl>, String> {
        let k = &res.boot_source.as_ref().unwrap().kernel_image_path;
        if k == "/missing" {
            return Err(format!("cannot open the kernel {k}: No such file"));
        }
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(Running))
    }
}

fn vm() -> (PreBootVm, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    (
        PreBootVm::new("test-vm", "0.1.0", Box::new(FakeStarter(n.clone()))),
        n,
    )
}

use crate::server::serve_connection;
use crate::tests_endpoints::{fault, req};
use crate::DEFAULT_MAX_PAYLOAD;

const BOOT: &str = r#"{"kernel_image_path":"/k","boot_args":"console=ttyS0"}"#;

#[test]
fn machine_config_validation() {
    let (v, _) = vm();
    let r = req(&v, "GET", "/machine-config", None);
    assert_eq!(
        r.body,
        r#"{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false}"#
    );
    for (body, expect) in [
        (
            r#"{"vcpu_count":0,"mem_size_mib":256}"#,
            "Invalid vCPU count: 0",
        ),
        (
            r#"{"vcpu_count":33,"mem_size_mib":256}"#,
            "between 1 and 32",
        ),
        (r#"{"vcpu_count":300,"mem_size_mib":256}"#, "invalid value"),
        (r#"{"vcpu_count":2,"mem_size_mib":64}"#, "at least 128 MiB"),
        (r#"{"vcpu_count":2,"mem_size_mib":256,"smt":true}"#, "smt"),
        (r#"{"vcpu_count":2}"#, "missing field `mem_size_mib`"),
        (
            r#"{"vcpu_count":2,"mem_size_mib":256,"cpu_template":"T2"}"#,
            "unknown field",
        ),
    ] {
        let m = fault(&req(&v, "PUT", "/machine-config", Some(body)));
        assert!(m.contains(expect), "{body}: {m}");
    }
    let r = req(
        &v,
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count":2,"mem_size_mib":256}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let m = fault(&req(
        &v,
        "PATCH",
        "/machine-config",
        Some(r#"{"vcpu_count":64}"#),
    ));
    assert!(m.contains("between 1 and 32"), "{m}");
    // As Firecracker: a PATCH that changes nothing is refused.
    let m = fault(&req(&v, "PATCH", "/machine-config", Some("{}")));
    assert_eq!(m, "Empty PATCH request.");
    let r = req(
        &v,
        "PATCH",
        "/machine-config",
        Some(r#"{"mem_size_mib":512}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    let r = req(&v, "GET", "/machine-config", None);
    assert!(
        r.body.contains(r#""vcpu_count":2,"mem_size_mib":512"#),
        "{r:?}"
    );
}

#[test]
fn drives_and_interfaces() {
    let (v, _) = vm();
    let d = r#"{"drive_id":"rootfs","path_on_host":"/r.img","is_root_device":true,"is_read_only":false,"io_engine":"Async","rate_limiter":{"bandwidth":{"size":1000,"refill_time":100},"ops":{"size":10,"one_time_burst":5,"refill_time":1000}}}"#;
    let m = fault(&req(&v, "PUT", "/drives/other", Some(d)));
    assert!(m.contains("does not match"), "{m}");
    assert_eq!(req(&v, "PUT", "/drives/rootfs", Some(d)).status, 204);
    // The same id again replaces it.
    assert_eq!(req(&v, "PUT", "/drives/rootfs", Some(d)).status, 204);
    let d2 =
        r#"{"drive_id":"data","path_on_host":"/d.img","is_root_device":true,"is_read_only":true}"#;
    let m = fault(&req(&v, "PUT", "/drives/data", Some(d2)));
    assert!(m.contains("root block device already exists"), "{m}");
    let bad_engine =
        r#"{"drive_id":"x","path_on_host":"/d","is_root_device":false,"io_engine":"Uring"}"#;
    assert!(fault(&req(&v, "PUT", "/drives/x", Some(bad_engine))).contains("unknown variant"));
    let n = r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:AC:10:00:02"}"#;
    assert!(fault(&req(&v, "PUT", "/network-interfaces/eth1", Some(n))).contains("does not match"));
    assert_eq!(
        req(&v, "PUT", "/network-interfaces/eth0", Some(n)).status,
        204
    );
    let n = r#"{"iface_id":"eth1","host_dev_name":"tap1","guest_mac":"06:00"}"#;
    assert!(fault(&req(&v, "PUT", "/network-interfaces/eth1", Some(n))).contains("guest_mac"));
    let m = fault(&req(
        &v,
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid":2,"uds_path":"/v.sock"}"#),
    ));
    assert!(m.contains("guest_cid"), "{m}");
    let res = v.vm_config().unwrap();
    assert_eq!(res.drives.len(), 1);
    let rl = res.drives[0].rate_limiter.unwrap();
    assert_eq!(rl.ops.unwrap().one_time_burst, 5);
    assert_eq!(rl.bandwidth.unwrap().one_time_burst, 0);
    assert_eq!(res.drives[0].io_engine, Some(IoEngine::Async));
}

#[test]
fn start_rules() {
    let (v, starts) = vm();
    let root = req(&v, "GET", "/", None);
    assert!(
        root.body
            .contains(r#""id":"test-vm","state":"Not started""#),
        "{root:?}"
    );
    let start = r#"{"action_type":"InstanceStart"}"#;
    let m = fault(&req(&v, "PUT", "/actions", Some(start)));
    assert!(m.contains("without kernel configuration"), "{m}");
    assert!(
        fault(&req(&v, "PATCH", "/balloon", Some(r#"{"amount_mib":1}"#)))
            .contains("before starting")
    );
    let cad = r#"{"action_type":"SendCtrlAltDel"}"#;
    let m = fault(&req(&v, "PUT", "/actions", Some(cad)));
    assert_eq!(m, BEFORE_START);
    assert!(fault(&req(
        &v,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"Boot"}"#)
    ))
    .contains("unknown variant"));
    // A start that fails leaves the VM configurable.
    let missing = r#"{"kernel_image_path":"/missing"}"#;
    assert_eq!(req(&v, "PUT", "/boot-source", Some(missing)).status, 204);
    let m = fault(&req(&v, "PUT", "/actions", Some(start)));
    assert!(m.contains("cannot open the kernel /missing"), "{m}");
    assert!(req(&v, "GET", "/", None).body.contains("Not started"));
    assert_eq!(req(&v, "PUT", "/boot-source", Some(BOOT)).status, 204);
    let b = r#"{"amount_mib":0,"deflate_on_oom":false,"stats_polling_interval_s":0}"#;
    assert_eq!(req(&v, "PUT", "/balloon", Some(b)).status, 204);
    assert_eq!(req(&v, "PUT", "/entropy", Some("{}")).status, 204);
    assert_eq!(req(&v, "PUT", "/actions", Some(start)).status, 204);
    assert_eq!(starts.load(Ordering::SeqCst), 1);
    assert!(req(&v, "GET", "/", None)
        .body
        .contains(r#""state":"Running""#));
    // Pre-boot requests and a second start are refused; runtime ones work.
    for (m, uri, body) in [
        ("PUT", "/boot-source", BOOT),
        (
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":256}"#,
        ),
        ("PATCH", "/machine-config", r#"{"vcpu_count":1}"#),
        (
            "PUT",
            "/drives/a",
            r#"{"drive_id":"a","path_on_host":"/a","is_root_device":false}"#,
        ),
        ("PUT", "/balloon", b),
        ("PUT", "/entropy", "{}"),
        ("PUT", "/actions", start),
    ] {
        let f = fault(&req(&v, m, uri, Some(body)));
        assert!(
            f.contains("not allowed after the microVM has started"),
            "{uri}: {f}"
        );
    }
    assert_eq!(starts.load(Ordering::SeqCst), 1);
    assert_eq!(
        req(&v, "PATCH", "/balloon", Some(r#"{"amount_mib":3}"#)).status,
        204
    );
    // Post-boot, SendCtrlAltDel reaches the running VM.
    let r = req(&v, "PUT", "/actions", Some(cad));
    assert_eq!((r.status, r.body.as_str()), (204, ""));
    let c = req(&v, "GET", "/vm/config", None);
    assert_eq!(
        c.body,
        r#"{"boot-source":{"kernel_image_path":"/k","boot_args":"console=ttyS0"},"drives":[],"machine-config":{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false},"network-interfaces":[],"balloon":{"amount_mib":3,"deflate_on_oom":false,"stats_polling_interval_s":0,"free_page_hinting":false,"free_page_reporting":false},"entropy":{}}"#
    );
    // What GET /vm/config returns is a valid config file.
    let back = VmResources::from_json(&c.body).unwrap();
    assert_eq!(back, v.vm_config().unwrap());
}

/// Records what it is asked; paths named "/fail" cannot be opened.
#[derive(Default)]
struct FakeTelemetry {
    calls: Arc<Mutex<Vec<String>>>,
}

impl Telemetry for FakeTelemetry {
    fn configure_logger(&self, c: &LoggerConfig) -> Result<(), String> {
        if c.log_path.as_deref() == Some("/fail") {
            return Err("cannot open /fail".into());
        }
        self.calls.lock().unwrap().push(format!("logger {c:?}"));
        Ok(())
    }
    fn configure_metrics(&self, c: &MetricsConfig) -> Result<(), String> {
        if c.metrics_path == "/fail" {
            return Err("cannot open /fail".into());
        }
        self.calls
            .lock()
            .unwrap()
            .push(format!("metrics {}", c.metrics_path));
        Ok(())
    }
    fn flush_metrics(&self) -> Result<(), String> {
        self.calls.lock().unwrap().push("flush".into());
        Ok(())
    }
}

fn api_count(section: &str, field: &str) -> u64 {
    crate::metrics::API_METRICS
        .snapshot()
        .into_iter()
        .find(|(s, f, _)| *s == section && f == field)
        .unwrap()
        .2
}

#[test]
fn logger_and_metrics() {
    let (plain, _) = vm();
    let m = fault(&req(&plain, "PUT", "/logger", Some(r#"{"level":"Info"}"#)));
    assert!(m.contains("not available"), "{m}");

    let t = FakeTelemetry::default();
    let calls = t.calls.clone();
    let (v, _) = vm();
    let v = v.with_telemetry(Box::new(t));
    let logger_puts = api_count("put_api_requests", "logger_count");
    let logger_fails = api_count("put_api_requests", "logger_fails");
    for (body, expect) in [
        (
            r#"{"level":"Info","colour":true}"#,
            "unknown field `colour`",
        ),
        (r#"{"level":"Loud"}"#, "Invalid log level"),
        (r#"{"show_level":"yes"}"#, "invalid type"),
        (r#"{"log_path":""}"#, "log_path is empty"),
        (r#"{"log_path":"/fail"}"#, "cannot open /fail"),
        ("", "body is empty"),
    ] {
        let m = fault(&req(&v, "PUT", "/logger", Some(body)));
        assert!(m.contains(expect), "{body}: {m}");
    }
    assert!(calls.lock().unwrap().is_empty());
    let l = r#"{"log_path":"/l.log","level":"warn","show_level":true}"#;
    assert_eq!(req(&v, "PUT", "/logger", Some(l)).status, 204);
    // A second PUT /logger (pre-boot) updates the given fields only.
    let l2 = r#"{"level":"Debug","show_log_origin":true}"#;
    assert_eq!(req(&v, "PUT", "/logger", Some(l2)).status, 204);
    // Other tests run in parallel: the counters only grow.
    assert!(api_count("put_api_requests", "logger_count") >= logger_puts + 8);
    assert!(api_count("put_api_requests", "logger_fails") >= logger_fails + 6);
    let logger = v.vm_config().unwrap().logger.unwrap();
    assert_eq!(logger.log_path.as_deref(), Some("/l.log"));
    assert_eq!(logger.level, Some(crate::LogLevel::Debug));
    assert_eq!(
        (logger.show_level, logger.show_log_origin),
        (Some(true), Some(true))
    );

    for (body, expect) in [
        ("{}", "missing field `metrics_path`"),
        (r#"{"metrics_path":"/m","x":1}"#, "unknown field `x`"),
        (r#"{"metrics_path":""}"#, "metrics_path is empty"),
        (r#"{"metrics_path":"/fail"}"#, "cannot open /fail"),
    ] {
        let m = fault(&req(&v, "PUT", "/metrics", Some(body)));
        assert!(m.contains(expect), "{body}: {m}");
    }
    assert!(v.vm_config().unwrap().metrics.is_none());
    let mb = r#"{"metrics_path":"/m.json","emit_id":true,"properties":{"k":"v"}}"#;
    assert_eq!(req(&v, "PUT", "/metrics", Some(mb)).status, 204);
    let m = fault(&req(&v, "PUT", "/metrics", Some(mb)));
    assert!(m.contains("already initialized"), "{m}");

    let flush = r#"{"action_type":"FlushMetrics"}"#;
    let m = fault(&req(&v, "PUT", "/actions", Some(flush)));
    assert!(m.contains("before starting"), "{m}");
    let config = req(&v, "GET", "/vm/config", None).body;
    assert!(
        config.contains(r#""logger":{"log_path":"/l.log","level":"Debug","show_level":true,"show_log_origin":true}"#),
        "{config}"
    );
    assert!(
        config.contains(
            r#""metrics":{"metrics_path":"/m.json","emit_id":true,"properties":{"k":"v"}}"#
        ),
        "{config}"
    );
    // GET /vm/config is a valid config file, logger and metrics included.
    assert_eq!(
        VmResources::from_json(&config).unwrap(),
        v.vm_config().unwrap()
    );

    assert_eq!(req(&v, "PUT", "/boot-source", Some(BOOT)).status, 204);
    let start = r#"{"action_type":"InstanceStart"}"#;
    assert_eq!(req(&v, "PUT", "/actions", Some(start)).status, 204);
    assert_eq!(req(&v, "PUT", "/actions", Some(flush)).status, 204);
    for (uri, body) in [("/logger", l), ("/metrics", r#"{"metrics_path":"/n"}"#)] {
        let m = fault(&req(&v, "PUT", uri, Some(body)));
        assert!(m.contains("not allowed after"), "{uri}: {m}");
    }
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert!(calls[0].contains("Warning") && calls[0].contains("/l.log"));
    assert!(calls[1].contains("Debug") && calls[1].contains("/l.log"));
    assert_eq!(calls[2..], ["metrics /m.json", "flush"]);
}

/// A client that went away: every write fails.
struct Gone;

impl std::io::Write for Gone {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::BrokenPipe.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn unwritable_responses_are_counted() {
    let (v, _) = vm();
    let m = &crate::metrics::API_METRICS;
    let before = m.sync_response_fails.load(Ordering::Relaxed);
    let input = "GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
    serve_connection(input.as_bytes(), Gone, &v, DEFAULT_MAX_PAYLOAD);
    assert!(m.sync_response_fails.load(Ordering::Relaxed) > before);
}

#[test]
fn config_files() {
    let good = r#"{
      "boot-source": {"kernel_image_path": "/k", "initrd_path": "/i", "boot_args": "console=ttyS0 -- echo hi"},
      "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": true}],
      "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
      "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
      "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock"},
      "balloon": {"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1},
      "entropy": {"rate_limiter": {"bandwidth": {"size": 100, "refill_time": 10}}}
    }"#;
    let r = VmResources::from_json(good).unwrap();
    assert_eq!(r.machine_config.vcpu_count, 2);
    assert_eq!(r.boot_source.unwrap().initrd_path.as_deref(), Some("/i"));
    assert!(r.drives[0].is_read_only);
    assert_eq!(r.vsock.unwrap().guest_cid, 3);
    assert!(r.entropy.unwrap().rate_limiter.unwrap().bandwidth.is_some());
    // Only the boot source: machine-config takes Firecracker's defaults.
    let r = VmResources::from_json(r#"{"boot-source":{"kernel_image_path":"/k"}}"#).unwrap();
    assert_eq!(r.machine_config, MachineConfig::default());

    for (text, expect) in [
        (
            r#"{"boot-source":{"kernel_image_path":"/k"},"logger":{"colour":true}}"#,
            "unknown field `colour`",
        ),
        (r#"{"logger":{"level":"Loud"}}"#, "Invalid log level"),
        (r#"{"metrics":{}}"#, "missing field `metrics_path`"),
        (
            r#"{"boot-source":{"kernel_image_path":"/k","extra":1}}"#,
            "unknown field `extra`",
        ),
        (
            r#"{"machine-config":{"vcpu_count":"2","mem_size_mib":256}}"#,
            "invalid type: string \"2\", expected u8",
        ),
        (
            r#"{"machine-config":{"vcpu_count":0,"mem_size_mib":256}}"#,
            "Invalid vCPU count",
        ),
        (
            r#"{"machine-config":{"vcpu_count":2,"mem_size_mib":256,"smt":true}}"#,
            "smt",
        ),
        (
            r#"{"drives":[{"drive_id":"a","path_on_host":"/a","is_root_device":false},{"drive_id":"a","path_on_host":"/b","is_root_device":false}]}"#,
            "Duplicate drive_id",
        ),
        (r#"{"drives":{}}"#, "invalid type: map, expected a sequence"),
        ("{", "EOF"),
    ] {
        let e = VmResources::from_json(text).unwrap_err();
        assert!(e.contains(expect), "{text}: {e}");
    }

    let dir = std::env::temp_dir().join(format!("kiln-preboot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("vm.json");
    std::fs::write(&f, r#"{"vsock":3}"#).unwrap();
    let e = VmResources::from_file(&f).unwrap_err();
    assert!(
        e.starts_with(&format!("--config-file {}: invalid type", f.display())),
        "{e}"
    );
    let e = VmResources::from_file(&dir.join("none.json")).unwrap_err();
    assert!(e.contains("none.json: No such file"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
