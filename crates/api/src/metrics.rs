//! API request counters for the metrics (Firecracker's `get_api_requests`,
//! `put_api_requests` and `patch_api_requests`): cumulative relaxed atomics,
//! recorded by the router. The VMM side reads them with
//! [`ApiMetrics::snapshot`] and reports the increase since its last flush.

use std::sync::atomic::{AtomicU64, Ordering};

/// Firecracker's GET counters (plus Kiln's `balloon` and `vm_config`).
const GET: &[&str] = &[
    "instance_info",
    "machine_cfg",
    "mmds",
    "vmm_version",
    "hotplug_memory",
    "balloon",
    "vm_config",
];
/// Firecracker's PUT counters (plus Kiln's `balloon` and `entropy`).
const PUT: &[&str] = &[
    "actions",
    "boot_source",
    "drive",
    "logger",
    "machine_cfg",
    "cpu_cfg",
    "metrics",
    "network",
    "mmds",
    "vsock",
    "pmem",
    "serial",
    "hotplug_memory",
    "balloon",
    "entropy",
];
/// Firecracker's PATCH counters (plus Kiln's `balloon` and `vm`).
const PATCH: &[&str] = &[
    "drive",
    "network",
    "machine_cfg",
    "mmds",
    "hotplug_memory",
    "pmem",
    "balloon",
    "vm",
];

const SLOTS: usize = 16;

type Slots = [AtomicU64; SLOTS];

const fn slots() -> Slots {
    [const { AtomicU64::new(0) }; SLOTS]
}

/// The API's counters.
pub struct ApiMetrics {
    get: Slots,
    put: Slots,
    put_fails: Slots,
    patch: Slots,
    patch_fails: Slots,
    /// Responses that could not be written back to the client.
    pub sync_response_fails: AtomicU64,
    /// Requests the VMM did not answer in time (Kiln never times out: 0).
    pub sync_vmm_send_timeout_count: AtomicU64,
}

/// The process's API counters, recorded by [`crate::router::route`].
pub static API_METRICS: ApiMetrics = ApiMetrics::new();

/// The counter name of a request path (Firecracker's names).
fn endpoint(path: &str) -> Option<&'static str> {
    let first = path.trim_start_matches('/').split('/').next()?;
    Some(match (first, path) {
        (_, "/") | (_, "") => "instance_info",
        (_, "/vm/config") => "vm_config",
        (_, "/hotplug/memory") => "hotplug_memory",
        ("version", _) => "vmm_version",
        ("machine-config", _) => "machine_cfg",
        ("mmds", _) => "mmds",
        ("actions", _) => "actions",
        ("boot-source", _) => "boot_source",
        ("drives", _) => "drive",
        ("logger", _) => "logger",
        ("cpu-config", _) => "cpu_cfg",
        ("metrics", _) => "metrics",
        ("network-interfaces", _) => "network",
        ("vsock", _) => "vsock",
        ("pmem", _) => "pmem",
        ("serial", _) => "serial",
        ("balloon", "/balloon") => "balloon",
        ("entropy", _) => "entropy",
        ("vm", "/vm") => "vm",
        _ => return None,
    })
}

fn bump(names: &[&str], name: &str, slots: &Slots) {
    if let Some(i) = names.iter().position(|n| *n == name) {
        slots[i].fetch_add(1, Ordering::Relaxed);
    }
}

impl ApiMetrics {
    /// All zero.
    pub const fn new() -> Self {
        Self {
            get: slots(),
            put: slots(),
            put_fails: slots(),
            patch: slots(),
            patch_fails: slots(),
            sync_response_fails: AtomicU64::new(0),
            sync_vmm_send_timeout_count: AtomicU64::new(0),
        }
    }

    /// Counts one request and whether it failed (`status` >= 400).
    /// Requests to unknown paths and methods are not counted.
    pub fn record(&self, method: &str, path: &str, status: u16) {
        let Some(name) = endpoint(path.trim_end_matches('/')) else {
            return;
        };
        let failed = status >= 400;
        match method {
            "GET" => bump(GET, name, &self.get),
            "PUT" => {
                bump(PUT, name, &self.put);
                if failed {
                    bump(PUT, name, &self.put_fails);
                }
            }
            "PATCH" => {
                bump(PATCH, name, &self.patch);
                if failed {
                    bump(PATCH, name, &self.patch_fails);
                }
            }
            _ => {}
        }
    }

    /// Counts a response that could not be written back.
    pub fn response_failed(&self) {
        self.sync_response_fails.fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter as (section, field, cumulative value), in Firecracker's
    /// names: `get_api_requests.instance_info_count`,
    /// `put_api_requests.drive_fails`, ...
    pub fn snapshot(&self) -> Vec<(&'static str, String, u64)> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Vec::new();
        for (i, n) in GET.iter().enumerate() {
            out.push(("get_api_requests", format!("{n}_count"), load(&self.get[i])));
        }
        for (section, names, count, fails) in [
            ("put_api_requests", PUT, &self.put, &self.put_fails),
            ("patch_api_requests", PATCH, &self.patch, &self.patch_fails),
        ] {
            for (i, n) in names.iter().enumerate() {
                out.push((section, format!("{n}_count"), load(&count[i])));
                out.push((section, format!("{n}_fails"), load(&fails[i])));
            }
        }
        out
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(m: &ApiMetrics, section: &str, field: &str) -> u64 {
        m.snapshot()
            .into_iter()
            .find(|(s, f, _)| *s == section && f == field)
            .unwrap_or_else(|| panic!("no {section}.{field}"))
            .2
    }

    #[test]
    fn requests_are_counted_per_endpoint() {
        assert!(GET.len() <= SLOTS && PUT.len() <= SLOTS && PATCH.len() <= SLOTS);
        let m = ApiMetrics::new();
        m.record("PUT", "/drives/rootfs", 204);
        m.record("PUT", "/drives/data", 400);
        m.record("PUT", "/actions", 204);
        m.record("PATCH", "/network-interfaces/eth0", 400);
        m.record("GET", "/", 200);
        m.record("GET", "/version", 200);
        m.record("GET", "/machine-config/", 200);
        m.record("DELETE", "/drives/x", 400);
        m.record("PUT", "/nope", 400);
        assert_eq!(get(&m, "put_api_requests", "drive_count"), 2);
        assert_eq!(get(&m, "put_api_requests", "drive_fails"), 1);
        assert_eq!(get(&m, "put_api_requests", "actions_count"), 1);
        assert_eq!(get(&m, "put_api_requests", "actions_fails"), 0);
        assert_eq!(get(&m, "patch_api_requests", "network_fails"), 1);
        assert_eq!(get(&m, "get_api_requests", "instance_info_count"), 1);
        assert_eq!(get(&m, "get_api_requests", "vmm_version_count"), 1);
        assert_eq!(get(&m, "get_api_requests", "machine_cfg_count"), 1);
        let total: u64 = m.snapshot().iter().map(|(_, _, v)| v).sum();
        // drive 2 + 1 fail, actions 1, PATCH network 1 + 1 fail, 3 GETs.
        assert_eq!(total, 9);
        // Firecracker's field names are all there.
        let fields: Vec<String> = m.snapshot().into_iter().map(|(_, f, _)| f).collect();
        for f in [
            "logger_count",
            "metrics_fails",
            "boot_source_count",
            "vsock_count",
            "machine_cfg_fails",
            "balloon_count",
        ] {
            assert!(fields.iter().any(|x| x == f), "{f}");
        }
    }
}
