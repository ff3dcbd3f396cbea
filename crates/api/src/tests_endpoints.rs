//! `PUT /serial`, `PATCH /balloon/statistics` and the endpoints Kiln does
//! not implement, through [`PreBootVm`] before and after `InstanceStart`.

use std::sync::{Arc, Mutex};

use crate::client::ClientResponse;
use crate::server::serve_connection;
use crate::*;

/// A running VM whose balloon has statistics every `interval` seconds.
struct Running {
    interval: Mutex<u32>,
}

impl VmControl for Running {
    fn instance_info(&self) -> InstanceInfo {
        InstanceInfo {
            id: String::new(),
            state: "Running".into(),
            vmm_version: String::new(),
            app_name: String::new(),
        }
    }
    fn balloon(&self) -> Result<Balloon, ApiError> {
        Ok(Balloon {
            amount_mib: 0,
            deflate_on_oom: false,
            stats_polling_interval_s: *self.interval.lock().unwrap(),
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
    fn update_balloon_stats(&self, u: &BalloonStatsUpdate) -> Result<(), ApiError> {
        let mut i = self.interval.lock().unwrap();
        if (*i == 0) != (u.stats_polling_interval_s == 0) {
            return Err(ApiError::Invalid("cannot toggle".into()));
        }
        *i = u.stats_polling_interval_s;
        Ok(())
    }
}

/// Records the serial configuration it was started with.
struct Recorder(Arc<Mutex<Option<Option<preboot::Serial>>>>);

impl Starter for Recorder {
    fn start(&self, res: &VmResources) -> Result<Arc<dyn VmControl>, String> {
        *self.0.lock().unwrap() = Some(res.serial.clone());
        Ok(Arc::new(Running {
            interval: Mutex::new(
                res.balloon
                    .as_ref()
                    .map_or(0, |b| b.stats_polling_interval_s),
            ),
        }))
    }
}

/// Sends one request on its own connection (shared with preboot.rs's tests).
pub(crate) fn req(vm: &PreBootVm, method: &str, uri: &str, body: Option<&str>) -> ClientResponse {
    let mut input = format!("{method} {uri} HTTP/1.1\r\n");
    match body {
        Some(b) => input.push_str(&format!("Content-Length: {}\r\n\r\n{b}", b.len())),
        None => input.push_str("\r\n"),
    }
    let mut out = Vec::new();
    serve_connection(input.as_bytes(), &mut out, vm, DEFAULT_MAX_PAYLOAD);
    let out = String::from_utf8(out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    ClientResponse {
        status_line: head.lines().next().unwrap().to_string(),
        status: head[9..12].parse().unwrap(),
        body: body.to_string(),
    }
}

/// The fault message of a 400 answer.
pub(crate) fn fault(r: &ClientResponse) -> String {
    assert_eq!(r.status, 400, "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    v["fault_message"].as_str().unwrap().to_string()
}

fn new_vm() -> (PreBootVm, Arc<Mutex<Option<Option<preboot::Serial>>>>) {
    let seen = Arc::new(Mutex::new(None));
    (
        PreBootVm::new("t", "0", Box::new(Recorder(seen.clone()))),
        seen,
    )
}

const START: &str = r#"{"action_type":"InstanceStart"}"#;

#[test]
fn serial_output_path_reaches_the_starter() {
    let (v, seen) = new_vm();
    for (body, expect) in [
        (r#"{"serial_out_path":""}"#, "serial_out_path is empty"),
        (
            r#"{"serial_out_path":"/tmp/s","rate_limiter":{"size":1,"refill_time":1}}"#,
            "rate limiter on the serial console is not supported by Kiln",
        ),
        (r#"{"serial_out_path":3}"#, "invalid type"),
        (r#"{"path":"/tmp/s"}"#, "unknown field `path`"),
    ] {
        let m = fault(&req(&v, "PUT", "/serial", Some(body)));
        assert!(m.contains(expect), "{body}: {m}");
    }
    let r = req(
        &v,
        "PUT",
        "/serial",
        Some(r#"{"serial_out_path":"/tmp/s.log"}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    // Not part of Firecracker's full configuration.
    let r = req(&v, "GET", "/vm/config", None);
    assert!(!r.body.contains("serial"), "{r:?}");
    let boot = r#"{"kernel_image_path":"/k"}"#;
    assert_eq!(req(&v, "PUT", "/boot-source", Some(boot)).status, 204);
    assert_eq!(req(&v, "PUT", "/actions", Some(START)).status, 204);
    let serial = seen
        .lock()
        .unwrap()
        .clone()
        .expect("started")
        .expect("serial");
    assert_eq!(serial.serial_out_path.as_deref(), Some("/tmp/s.log"));
    let m = fault(&req(
        &v,
        "PUT",
        "/serial",
        Some(r#"{"serial_out_path":"/x"}"#),
    ));
    assert!(m.contains("after the microVM has started"), "{m}");
}

#[test]
fn balloon_statistics_interval_before_and_after_start() {
    let (v, _) = new_vm();
    let patch = |v: &PreBootVm, n: &str| {
        req(
            v,
            "PATCH",
            "/balloon/statistics",
            Some(&format!(r#"{{"stats_polling_interval_s":{n}}}"#)),
        )
    };
    assert_eq!(fault(&patch(&v, "1")), "No balloon device configured");
    let b = r#"{"amount_mib":0,"deflate_on_oom":false,"stats_polling_interval_s":0}"#;
    assert_eq!(req(&v, "PUT", "/balloon", Some(b)).status, 204);
    // Before boot it is configuration: statistics may be turned on.
    assert_eq!(patch(&v, "5").status, 204);
    let got = req(&v, "GET", "/balloon", None).body;
    assert!(got.contains(r#""stats_polling_interval_s":5"#), "{got}");
    // Firecracker's answer always has both free-page fields.
    assert!(
        got.contains(r#""free_page_hinting":false,"free_page_reporting":false"#),
        "{got}"
    );
    assert!(fault(&patch(&v, "-1")).contains("invalid value"));
    assert!(fault(&patch(&v, r#""x""#)).contains("invalid type"));
    let boot = r#"{"kernel_image_path":"/k"}"#;
    assert_eq!(req(&v, "PUT", "/boot-source", Some(boot)).status, 204);
    assert_eq!(req(&v, "PUT", "/actions", Some(START)).status, 204);
    // After boot the running VM decides (and the configuration follows).
    assert_eq!(patch(&v, "2").status, 204);
    assert!(req(&v, "GET", "/balloon", None)
        .body
        .contains(r#""stats_polling_interval_s":2"#));
    assert!(req(&v, "GET", "/vm/config", None)
        .body
        .contains(r#""stats_polling_interval_s":2"#));
    assert_eq!(fault(&patch(&v, "0")), "cannot toggle");
}

#[test]
fn every_spec_endpoint_gets_a_clear_answer() {
    let (v, _) = new_vm();
    let unsupported = [
        ("PUT", "/hotplug/memory", "memory hot-plugging"),
        ("PATCH", "/hotplug/memory", "memory hot-plugging"),
        ("GET", "/hotplug/memory", "memory hot-plugging"),
        ("PATCH", "/balloon/hinting/start", "free page hinting"),
        ("GET", "/balloon/hinting/status", "free page hinting"),
        ("PATCH", "/balloon/hinting/stop", "free page hinting"),
        ("PUT", "/pmem/pm0", "pmem"),
        ("PATCH", "/pmem/pm0", "pmem"),
    ];
    let check = |v: &PreBootVm| {
        for (m, p, what) in unsupported {
            let body = (m != "GET").then_some("{}");
            let msg = fault(&req(v, m, p, body));
            assert!(
                msg.contains(what) && msg.contains("not supported by Kiln"),
                "{m} {p}: {msg}"
            );
            assert!(msg.starts_with(&format!("{m} {p}: ")), "{msg}");
        }
    };
    check(&v);
    // Not endpoints at all: still the generic answer.
    for (m, p) in [
        ("GET", "/cpu-config"),
        ("DELETE", "/mmds"),
        ("PUT", "/pmem/"),
    ] {
        let msg = fault(&req(&v, m, p, None));
        assert!(
            msg.starts_with("Invalid request method and/or path"),
            "{msg}"
        );
    }
    let boot = r#"{"kernel_image_path":"/k"}"#;
    assert_eq!(req(&v, "PUT", "/boot-source", Some(boot)).status, 204);
    assert_eq!(req(&v, "PUT", "/actions", Some(START)).status, 204);
    check(&v);
    // Pre-boot-only endpoints after the start.
    for p in [
        "/entropy",
        "/serial",
        "/vsock",
        "/machine-config",
        "/boot-source",
    ] {
        let msg = fault(&req(&v, "PUT", p, Some("{}")));
        assert!(
            msg.contains("after the microVM has started") || msg.contains("missing field"),
            "{p}: {msg}"
        );
    }
}

/// A running VM that "migrates" and counts the responses it was told of.
struct Migrating {
    responded: Arc<Mutex<Vec<bool>>>,
    migrated: Mutex<bool>,
}

impl VmControl for Migrating {
    fn instance_info(&self) -> InstanceInfo {
        Running {
            interval: Mutex::new(0),
        }
        .instance_info()
    }
    fn balloon(&self) -> Result<Balloon, ApiError> {
        Err(ApiError::NoBalloon)
    }
    fn update_balloon(&self, _: &BalloonUpdate) -> Result<(), ApiError> {
        Err(ApiError::NoBalloon)
    }
    fn balloon_stats(&self) -> Result<BalloonStats, ApiError> {
        Err(ApiError::NoBalloon)
    }
    fn migrate(&self, p: &migrate::MigrateParams) -> Result<migrate::MigrationReport, ApiError> {
        if p.destination.starts_with("unix:/gone") {
            return Err(ApiError::Invalid("the migration peer disconnected".into()));
        }
        *self.migrated.lock().unwrap() = true;
        Ok(migrate::MigrationReport {
            rounds: p.max_rounds,
            bytes_sent: 4096,
            final_bytes: 0,
            total_ms: 1.5,
            downtime_ms: p.downtime_ms as f64,
        })
    }
    fn after_response(&self) {
        self.responded
            .lock()
            .unwrap()
            .push(*self.migrated.lock().unwrap());
    }
}

#[test]
fn migrate_answers_with_the_figures_then_tells_the_vm() {
    let (v, _) = new_vm();
    let body = r#"{"destination":"unix:/m.sock"}"#;
    let m = fault(&req(&v, "PUT", "/migrate", Some(body)));
    assert!(m.contains("not supported before starting"), "{m}");

    let responded = Arc::new(Mutex::new(Vec::new()));
    v.set_running(
        VmResources::default(),
        Arc::new(Migrating {
            responded: responded.clone(),
            migrated: Mutex::new(false),
        }),
    );
    let m = fault(&req(&v, "PUT", "/migrate", Some(r#"{"to":"x"}"#)));
    assert!(m.contains("unknown field `to`"), "{m}");
    let m = fault(&req(
        &v,
        "PUT",
        "/migrate",
        Some(r#"{"destination":"unix:/gone"}"#),
    ));
    assert!(m.contains("disconnected"), "{m}");
    let r = req(
        &v,
        "PUT",
        "/migrate",
        Some(r#"{"destination":"tcp:h:1","downtime_ms":7,"max_rounds":2}"#),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let rep: migrate::MigrationReport = serde_json::from_str(&r.body).unwrap();
    assert_eq!((rep.rounds, rep.downtime_ms), (2, 7.0));
    // Told after each response, the last one after the successful migration.
    assert_eq!(*responded.lock().unwrap(), vec![false, false, true]);
}

/// A document store that refuses documents over 40 bytes.
#[derive(Default)]
struct Store(Mutex<Option<serde_json::Value>>);

impl mmds::MmdsData for Store {
    fn apply(&self, op: mmds::MmdsOp) -> Result<Option<serde_json::Value>, ApiError> {
        let mut d = self.0.lock().unwrap();
        let fits = |v: &serde_json::Value| {
            if v.to_string().len() > 40 {
                return Err(ApiError::PayloadTooLarge("too large".into()));
            }
            Ok(())
        };
        match op {
            mmds::MmdsOp::Put(v) => {
                fits(&v)?;
                *d = Some(v);
                Ok(None)
            }
            mmds::MmdsOp::Patch(v) => {
                let cur = d
                    .as_mut()
                    .ok_or_else(|| ApiError::Invalid(mmds::NOT_INITIALIZED.into()))?;
                fits(&v)?;
                if let (Some(c), Some(p)) = (cur.as_object_mut(), v.as_object()) {
                    c.extend(p.clone());
                }
                Ok(None)
            }
            mmds::MmdsOp::Get => Ok(Some(d.clone().unwrap_or_else(|| serde_json::json!({})))),
        }
    }
}

#[test]
fn mmds_data_and_config_before_and_after_the_start() {
    let (v, _) = new_vm();
    // Without a store, /mmds is refused clearly.
    assert!(fault(&req(&v, "GET", "/mmds", None)).contains("not available"));
    let v = v.with_mmds(Arc::new(Store::default()));
    assert_eq!(req(&v, "GET", "/mmds", None).body, "{}");
    assert_eq!(
        fault(&req(&v, "PATCH", "/mmds", Some(r#"{"a":1}"#))),
        mmds::NOT_INITIALIZED
    );
    assert_eq!(req(&v, "PUT", "/mmds", Some(r#"{"a":"b"}"#)).status, 204);
    assert_eq!(req(&v, "PATCH", "/mmds", Some(r#"{"c":2}"#)).status, 204);
    assert_eq!(req(&v, "GET", "/mmds", None).body, r#"{"a":"b","c":2}"#);
    let big = format!(r#"{{"x":"{}"}}"#, "y".repeat(50));
    let r = req(&v, "PUT", "/mmds", Some(&big));
    assert_eq!(r.status, 413, "{r:?}");
    assert!(r.body.contains("too large"), "{r:?}");
    assert!(fault(&req(&v, "PUT", "/mmds", Some("{nope"))).contains("Invalid request body"));
    // The configuration names existing interfaces, a link-local address.
    let cfg = |body: &str| req(&v, "PUT", "/mmds/config", Some(body));
    assert!(fault(&cfg(r#"{"network_interfaces":[]}"#)).contains("is empty"));
    assert!(fault(&cfg(r#"{"network_interfaces":["eth0"]}"#)).contains("does not correspond"));
    let eth0 = r#"{"iface_id":"eth0","host_dev_name":"tap0"}"#;
    assert_eq!(
        req(&v, "PUT", "/network-interfaces/eth0", Some(eth0)).status,
        204
    );
    let bad_ip = r#"{"network_interfaces":["eth0"],"ipv4_address":"10.0.0.1"}"#;
    assert!(fault(&cfg(bad_ip)).contains("not link local"));
    assert!(fault(&cfg(r#"{"network_interfaces":["eth0"],"version":"V3"}"#)).contains("V3"));
    assert!(fault(&cfg(r#"{"network_interfaces":["eth0"],"x":1}"#)).contains("unknown field"));
    let good = r#"{"network_interfaces":["eth0"],"version":"V2","ipv4_address":"169.254.1.2"}"#;
    assert_eq!(cfg(good).status, 204);
    assert!(req(&v, "GET", "/vm/config", None)
        .body
        .contains(r#""mmds-config":{"version":"V2","network_interfaces":["eth0"],"ipv4_address":"169.254.1.2","imds_compat":false}"#));
    // After the start: data yes, configuration no.
    let boot = r#"{"kernel_image_path":"/k"}"#;
    assert_eq!(req(&v, "PUT", "/boot-source", Some(boot)).status, 204);
    assert_eq!(req(&v, "PUT", "/actions", Some(START)).status, 204);
    assert_eq!(req(&v, "PATCH", "/mmds", Some(r#"{"d":3}"#)).status, 204);
    assert!(req(&v, "GET", "/mmds", None).body.contains(r#""d":3"#));
    assert_eq!(fault(&cfg(good)), preboot::AFTER_START);
    // A VM started without the service has no store to write.
    let (w, _) = new_vm();
    let w = w.with_mmds(Arc::new(Store::default()));
    assert_eq!(req(&w, "PUT", "/boot-source", Some(boot)).status, 204);
    assert_eq!(req(&w, "PUT", "/actions", Some(START)).status, 204);
    assert_eq!(fault(&req(&w, "GET", "/mmds", None)), mmds::NOT_INITIALIZED);
}

#[test]
fn config_files_take_mmds_config_with_the_same_checks() {
    let net = r#""network-interfaces":[{"iface_id":"eth0","host_dev_name":"tap0"}]"#;
    let ok = format!(r#"{{{net},"mmds-config":{{"version":"V2","network_interfaces":["eth0"]}}}}"#);
    let r = VmResources::from_json(&ok).unwrap();
    let c = r.mmds_config.unwrap();
    assert_eq!(c.version, models::MmdsVersion::V2);
    assert_eq!(c.ipv4(), models::MmdsConfig::DEFAULT_IPV4);
    let bad = format!(r#"{{{net},"mmds-config":{{"network_interfaces":["eth1"]}}}}"#);
    assert!(VmResources::from_json(&bad)
        .unwrap_err()
        .contains("does not correspond"));
}

#[test]
fn firecracker_config_files_with_null_sections_load() {
    // What Firecracker's GET /vm/config writes for sections not in use.
    let fc = r#"{"cpu-config":null,"mmds-config":null,"pmem":[],"memory-hotplug":null,
                 "network-interfaces":[],"drives":[]}"#;
    let r = VmResources::from_json(fc).unwrap();
    assert_eq!(r.cpu_config, None);
    let t = r#"{"cpu-config":{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,
                 "modifiers":[{"register":"ecx","bitmap":"0b0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}]}}"#;
    let r = VmResources::from_json(t).unwrap();
    assert_eq!(r.cpu_config.unwrap().cpuid_modifiers.len(), 1);
    let e = VmResources::from_json(r#"{"pmem":[{"id":"p"}]}"#).unwrap_err();
    assert!(e.contains("pmem devices are not supported"), "{e}");
    let e = VmResources::from_json(r#"{"memory-hotplug":{"total_size_mib":1}}"#).unwrap_err();
    assert!(e.contains("hot-plugging"), "{e}");
    let e =
        VmResources::from_json(r#"{"cpu-config":{"msr_modifiers":[{"addr":"x","bitmap":"0b1"}]}}"#)
            .unwrap_err();
    assert!(e.contains("Invalid number"), "{e}");
}
