//! Maps requests to [`VmControl`] calls and results to responses.

use serde::de::DeserializeOwned;

use crate::http::{Request, Response};
use crate::mmds::MmdsOp;
use crate::models::{BalloonUpdate, FirecrackerVersion, PartialDrive, PartialNetworkInterface};
use crate::preboot::{Action, ActionType, Drive, NetworkInterface, PreBootRequest};
use crate::{ApiError, VmControl};

/// Parses a JSON body; the serde error becomes the fault message.
fn parse_body<T: DeserializeOwned>(req: &Request) -> Result<T, Response> {
    if req.body.is_empty() {
        return Err(Response::bad_request("The request body is empty"));
    }
    serde_json::from_slice(&req.body)
        .map_err(|e| Response::bad_request(format!("Invalid request body: {e}")))
}

fn fault(e: ApiError) -> Response {
    Response::fault(e.status(), e.to_string())
}

fn mmds(req: &Request, vm: &dyn VmControl, op: fn(serde_json::Value) -> MmdsOp) -> Response {
    match parse_body::<serde_json::Value>(req) {
        Ok(v) => match vm.mmds(op(v)) {
            Ok(_) => Response::no_content(),
            Err(e) => fault(e),
        },
        Err(resp) => resp,
    }
}

fn result(r: Result<(), ApiError>) -> Response {
    match r {
        Ok(()) => Response::no_content(),
        Err(e) => fault(e),
    }
}

/// Parses the body as `T` and hands it to [`VmControl::configure`].
fn configure<T: DeserializeOwned>(
    req: &Request,
    vm: &dyn VmControl,
    wrap: fn(T) -> PreBootRequest,
) -> Response {
    match parse_body::<T>(req) {
        Ok(body) => result(vm.configure(wrap(body))),
        Err(resp) => resp,
    }
}

/// Answers one request and counts it in [`crate::metrics::API_METRICS`].
pub fn route(req: &Request, vm: &dyn VmControl) -> Response {
    let resp = dispatch(req, vm);
    crate::metrics::API_METRICS.record(&req.method, &req.path, resp.status);
    resp
}

fn dispatch(req: &Request, vm: &dyn VmControl) -> Response {
    let path = match req.path.trim_end_matches('/') {
        "" => "/",
        p => p,
    };
    match (req.method.as_str(), path) {
        ("GET", "/") => Response::json(&vm.instance_info()),
        ("GET", "/version") => Response::json(&FirecrackerVersion {
            firecracker_version: vm.instance_info().vmm_version,
        }),
        ("GET", "/balloon") => match vm.balloon() {
            Ok(b) => Response::json(&b),
            Err(e) => fault(e),
        },
        ("PATCH", "/balloon") => match parse_body::<BalloonUpdate>(req) {
            Ok(u) => match vm.update_balloon(&u) {
                Ok(()) => Response::no_content(),
                Err(e) => fault(e),
            },
            Err(resp) => resp,
        },
        ("PATCH", "/vm") => match parse_body::<crate::models::VmStateUpdate>(req) {
            Ok(u) => match vm.set_vm_state(u.state) {
                Ok(()) => Response::no_content(),
                Err(e) => fault(e),
            },
            Err(resp) => resp,
        },
        ("PATCH", "/balloon/statistics") => {
            match parse_body::<crate::models::BalloonStatsUpdate>(req) {
                Ok(u) => result(vm.update_balloon_stats(&u)),
                Err(resp) => resp,
            }
        }
        ("PUT", "/serial") => configure(req, vm, PreBootRequest::Serial),
        ("PUT", "/mmds/config") => configure(req, vm, PreBootRequest::MmdsConfig),
        ("PUT", "/cpu-config") => configure(req, vm, PreBootRequest::CpuConfig),
        ("PUT", "/mmds") => mmds(req, vm, MmdsOp::Put),
        ("PATCH", "/mmds") => mmds(req, vm, MmdsOp::Patch),
        ("GET", "/mmds") => match vm.mmds(MmdsOp::Get) {
            Ok(v) => Response::json(&v.unwrap_or_default()),
            Err(e) => fault(e),
        },
        ("GET", "/balloon/statistics") => match vm.balloon_stats() {
            Ok(s) => Response::json(&s),
            Err(e) => fault(e),
        },
        ("GET", "/machine-config") => match vm.machine_config() {
            Ok(m) => Response::json(&m),
            Err(e) => fault(e),
        },
        ("GET", "/vm/config") => match vm.vm_config() {
            Ok(c) => Response::json(&c),
            Err(e) => fault(e),
        },
        ("PUT", "/boot-source") => configure(req, vm, PreBootRequest::BootSource),
        ("PUT", "/machine-config") => configure(req, vm, PreBootRequest::MachineConfig),
        ("PATCH", "/machine-config") => configure(req, vm, PreBootRequest::PatchMachineConfig),
        ("PUT", "/vsock") => configure(req, vm, PreBootRequest::Vsock),
        ("PUT", "/entropy") => configure(req, vm, PreBootRequest::Entropy),
        ("PUT", "/balloon") => configure(req, vm, PreBootRequest::Balloon),
        ("PUT", "/logger") => configure(req, vm, PreBootRequest::Logger),
        ("PUT", "/metrics") => configure(req, vm, PreBootRequest::Metrics),
        ("PUT", p) if p.starts_with("/drives/") => {
            let id = &p["/drives/".len()..];
            match parse_body::<Drive>(req) {
                Ok(d) if d.drive_id != id => Response::bad_request(format!(
                    "The id from the path ({id}) does not match the drive_id from the body ({})",
                    d.drive_id
                )),
                Ok(d) => result(vm.configure(PreBootRequest::Drive(d))),
                Err(resp) => resp,
            }
        }
        ("PUT", p) if p.starts_with("/network-interfaces/") => {
            let id = &p["/network-interfaces/".len()..];
            match parse_body::<NetworkInterface>(req) {
                Ok(n) if n.iface_id != id => Response::bad_request(format!(
                    "The id from the path ({id}) does not match the iface_id from the body ({})",
                    n.iface_id
                )),
                Ok(n) => result(vm.configure(PreBootRequest::NetworkInterface(n))),
                Err(resp) => resp,
            }
        }
        ("PATCH", p) if p.starts_with("/drives/") => {
            let id = &p["/drives/".len()..];
            match parse_body::<PartialDrive>(req) {
                Ok(d) if d.drive_id != id => Response::bad_request(format!(
                    "The id from the path ({id}) does not match the drive_id from the body ({})",
                    d.drive_id
                )),
                Ok(d) if d.path_on_host.is_none() && d.rate_limiter.is_none() => {
                    Response::bad_request(
                        "Please specify at least one property to patch: path_on_host, rate_limiter.",
                    )
                }
                Ok(d) => result(vm.update_drive(&d)),
                Err(resp) => resp,
            }
        }
        ("PATCH", p) if p.starts_with("/network-interfaces/") => {
            let id = &p["/network-interfaces/".len()..];
            match parse_body::<PartialNetworkInterface>(req) {
                Ok(n) if n.iface_id != id => Response::bad_request(format!(
                    "The id from the path ({id}) does not match the iface_id from the body ({})",
                    n.iface_id
                )),
                Ok(n) => result(vm.update_network_interface(&n)),
                Err(resp) => resp,
            }
        }
        ("PUT", "/snapshot/create") => {
            match parse_body::<crate::snapshot::SnapshotCreateParams>(req) {
                Ok(p) => result(vm.create_snapshot(&p)),
                Err(resp) => resp,
            }
        }
        ("PUT", "/snapshot/load") => match parse_body::<crate::snapshot::SnapshotLoadParams>(req) {
            Ok(p) => result(vm.load_snapshot(&p)),
            Err(resp) => resp,
        },
        ("PUT", "/migrate") => match parse_body::<crate::migrate::MigrateParams>(req) {
            Ok(p) => match vm.migrate(&p) {
                Ok(report) => Response::json(&report),
                Err(e) => fault(e),
            },
            Err(resp) => resp,
        },
        ("PUT", "/actions") => match parse_body::<Action>(req) {
            Ok(Action {
                action_type: ActionType::InstanceStart,
            }) => result(vm.start_instance()),
            Ok(Action {
                action_type: ActionType::SendCtrlAltDel,
            }) => result(vm.send_ctrl_alt_del()),
            Ok(Action {
                action_type: ActionType::FlushMetrics,
            }) => result(vm.flush_metrics()),
            Err(resp) => resp,
        },
        (m, p) => match not_supported(m, p) {
            Some(what) => Response::bad_request(format!("{m} {p}: {what} not supported by Kiln")),
            None => Response::bad_request(format!(
                "Invalid request method and/or path: {m} {}",
                req.path
            )),
        },
    }
}

/// The endpoints of Firecracker's API that Kiln does not implement: what
/// they are about, for a clear fault message (`None`: not an endpoint of the
/// API at all). Endpoints implemented above never get here.
pub fn not_supported(method: &str, path: &str) -> Option<&'static str> {
    let what = match (method, path) {
        ("PUT" | "PATCH" | "GET", "/hotplug/memory") => "memory hot-plugging is",
        ("PATCH", "/balloon/hinting/start" | "/balloon/hinting/stop")
        | ("GET", "/balloon/hinting/status") => "free page hinting is",
        ("PUT" | "PATCH", p) if id_of(p, "/pmem/").is_some() => "pmem devices are",
        _ => return None,
    };
    Some(what)
}

/// The `{id}` of `prefix{id}` (one non-empty path segment).
fn id_of<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix)
        .filter(|id| !id.is_empty() && !id.contains('/'))
}
