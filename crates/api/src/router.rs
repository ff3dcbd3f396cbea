//! Maps requests to [`VmControl`] calls and results to responses.

use serde::de::DeserializeOwned;

use crate::http::{Request, Response};
use crate::models::{BalloonUpdate, FirecrackerVersion};
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
    Response::bad_request(e.to_string())
}

/// Answers one request.
pub fn route(req: &Request, vm: &dyn VmControl) -> Response {
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
        ("GET", "/balloon/statistics") => match vm.balloon_stats() {
            Ok(s) => Response::json(&s),
            Err(e) => fault(e),
        },
        (m, _) => Response::bad_request(format!(
            "Invalid request method and/or path: {m} {}",
            req.path
        )),
    }
}
