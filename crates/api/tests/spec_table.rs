//! A table-driven test of the API against Firecracker's specification
//! (tests/data/firecracker-api.yaml): every endpoint and method of the spec
//! has rows, each row a request in a given state with the status it must
//! get. For every row the test also checks
//! - the row's request body against the spec's body schema (a "valid" row
//!   must conform, a "spec-invalid" row must not, a "malformed" one must not
//!   even be JSON), so the table cannot drift from the spec;
//! - the response against the spec: its status must be one the operation
//!   lists (or `default`), a 204 has no body, a 200's JSON body conforms to
//!   the response schema, and an error carries a non-empty `fault_message`
//!   (the spec's `Error`) containing the row's expected words.
//!
//! Requests go over a real Unix socket to an [`ApiServer`] serving a
//! [`PreBootVm`]; "running" is a fake VM ([`FakeVm`]) started by a fake
//! [`Starter`], so no guest is needed.
//!
//! Rows of features being added elsewhere are gated by [`Feature`]: until a
//! feature is listed in [`LANDED`], its rows assert Kiln's clear "not
//! supported" fault instead; once it is listed, they assert the status the
//! row states. Rows of endpoints Kiln does not implement at all
//! ([`Gate::Unsupported`]) always expect that fault.

mod swagger;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use kiln_api::client::{request, ClientResponse};
use kiln_api::models::{
    Balloon, BalloonStats, BalloonStatsUpdate, BalloonUpdate, InstanceInfo, VmState,
};
use kiln_api::telemetry::{LoggerConfig, MetricsConfig, Telemetry};
use kiln_api::{
    ApiError, ApiServer, PartialDrive, PartialNetworkInterface, PreBootVm, Starter, VmControl,
    VmResources,
};
use serde_json::Value as Json;
use swagger::Spec;

/// Features other work adds. A row gated by one asserts "not supported"
/// until the feature is listed in [`LANDED`]; then it asserts its own
/// status. Integrator: add a feature here when its routes are merged (and
/// check the rows' statuses against what was implemented).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Feature {
    Logger,
    Metrics,
    Serial,
    CpuConfig,
    Mmds,
    Snapshot,
    BalloonStatsUpdate,
    CtrlAltDel,
}

/// A row body built at run time.
fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Features whose routes are merged (see [`Feature`]).
const LANDED: &[Feature] = &[
    Feature::Snapshot,
    Feature::Logger,
    Feature::Metrics,
    Feature::Serial,
    Feature::BalloonStatsUpdate,
    Feature::CtrlAltDel,
    Feature::Mmds,
    Feature::CpuConfig,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gate {
    /// Implemented by Kiln: the row's status holds.
    Kiln,
    /// Being added elsewhere: see [`Feature`].
    Pending(Feature),
    /// Part of Firecracker's spec that Kiln does not implement: always a
    /// 400 "not supported".
    Unsupported,
}

/// What the row's body is, as far as the spec is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// No body (GET, or a PATCH without one).
    NoBody,
    /// Conforms to the spec's schema (the request may still be refused: a
    /// wrong state, an unknown field, a value out of Kiln's range).
    Valid,
    /// Violates the spec's schema (type, enum, required, minimum, ...).
    SpecInvalid,
    /// Not JSON at all.
    Malformed,
}

/// The VM's state when the row's request is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Nothing configured.
    Bare,
    /// Configured (kernel, machine, two drives, an interface, a balloon),
    /// not started.
    Pre,
    /// Configured and started.
    Post,
}

struct Row {
    stage: Stage,
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    kind: Kind,
    status: u16,
    /// Words the fault message must contain ("" for any).
    fault: &'static str,
    gate: Gate,
    /// Pre-boot requests (each must succeed) run before the row, when its
    /// gate is open.
    setup: &'static [(&'static str, &'static str, &'static str)],
}

use Kind::*;
use Stage::*;

const fn row(
    stage: Stage,
    method: &'static str,
    path: &'static str,
    body: Option<&'static str>,
    kind: Kind,
    status: u16,
    fault: &'static str,
) -> Row {
    Row {
        stage,
        method,
        path,
        body,
        kind,
        status,
        fault,
        gate: Gate::Kiln,
        setup: &[],
    }
}

const fn pending(f: Feature, r: Row) -> Row {
    Row {
        gate: Gate::Pending(f),
        ..r
    }
}

const fn unsupported(r: Row) -> Row {
    Row {
        gate: Gate::Unsupported,
        ..r
    }
}

const fn with_setup(setup: &'static [(&'static str, &'static str, &'static str)], r: Row) -> Row {
    Row { setup, ..r }
}

const AFTER: &str = "not allowed after the microVM has started";
const BEFORE: &str = "not supported before starting";
const UNKNOWN: &str = "unknown field";
const TYPE: &str = "invalid type";
const MISSING: &str = "missing field";
const NOT_SUPPORTED: &str = "not supported";

const KERNEL: &str = r#"{"kernel_image_path":"{tmp}/kernel","boot_args":"console=ttyS0"}"#;
const MACHINE: &str = r#"{"vcpu_count":2,"mem_size_mib":256}"#;
const DRIVE: &str =
    r#"{"drive_id":"scratch","path_on_host":"{tmp}/data.img","is_root_device":false}"#;
const NET: &str = r#"{"iface_id":"eth1","host_dev_name":"tap1"}"#;
const VSOCK: &str = r#"{"guest_cid":3,"uds_path":"{tmp}/v.sock"}"#;
const SNAP: &str = r#"{"snapshot_path":"{tmp}/snap","mem_file_path":"{tmp}/mem"}"#;
const LOAD: &str = r#"{"snapshot_path":"{tmp}/snap","mem_file_path":"{tmp}/mem"}"#;
const BALLOON: &str = r#"{"amount_mib":0,"deflate_on_oom":false}"#;
const DRIVE_RL: &str = r#"{"drive_id":"scratch","path_on_host":"/d","is_root_device":false,"is_read_only":true,"io_engine":"Async","rate_limiter":{"bandwidth":{"size":1000,"refill_time":100},"ops":{"size":10,"one_time_burst":5,"refill_time":1000}}}"#;

// One row per line: far easier to read (and review) as a table.
#[rustfmt::skip]
fn table() -> Vec<Row> {
    vec![
        // GET /
        row(Bare, "GET", "/", None, NoBody, 200, ""),
        row(Post, "GET", "/", None, NoBody, 200, ""),
        // GET /version
        row(Pre, "GET", "/version", None, NoBody, 200, ""),
        row(Post, "GET", "/version", None, NoBody, 200, ""),
        // PUT /actions
        row(Pre, "PUT", "/actions", Some(r#"{"action_type":"InstanceStart"}"#), Valid, 204, ""),
        row(Bare, "PUT", "/actions", Some(r#"{"action_type":"InstanceStart"}"#), Valid, 400, "without kernel configuration"),
        row(Post, "PUT", "/actions", Some(r#"{"action_type":"InstanceStart"}"#), Valid, 400, AFTER),
        row(Pre, "PUT", "/actions", Some(r#"{"action_type":"Boot"}"#), SpecInvalid, 400, "unknown variant"),
        row(Pre, "PUT", "/actions", Some(r#"{"action_type":1}"#), SpecInvalid, 400, "Invalid request body"),
        row(Pre, "PUT", "/actions", Some("{}"), SpecInvalid, 400, MISSING),
        row(Pre, "PUT", "/actions", Some(r#"{"action_type":"InstanceStart","now":true}"#), Valid, 400, UNKNOWN),
        row(Pre, "PUT", "/actions", Some(r#"{"action_type":"#), Malformed, 400, "Invalid request body"),
        row(Pre, "PUT", "/actions", None, NoBody, 400, "empty"),
        pending(Feature::CtrlAltDel, row(Post, "PUT", "/actions", Some(r#"{"action_type":"SendCtrlAltDel"}"#), Valid, 204, "")),
        pending(Feature::CtrlAltDel, row(Pre, "PUT", "/actions", Some(r#"{"action_type":"SendCtrlAltDel"}"#), Valid, 400, BEFORE)),
        pending(Feature::Metrics, with_setup(
            &[("PUT", "/metrics", r#"{"metrics_path":"{tmp}/metrics"}"#)],
            row(Post, "PUT", "/actions", Some(r#"{"action_type":"FlushMetrics"}"#), Valid, 204, ""),
        )),
        // PUT /boot-source
        row(Bare, "PUT", "/boot-source", Some(KERNEL), Valid, 204, ""),
        row(Post, "PUT", "/boot-source", Some(KERNEL), Valid, 400, AFTER),
        row(Bare, "PUT", "/boot-source", Some("{}"), SpecInvalid, 400, MISSING),
        row(Bare, "PUT", "/boot-source", Some(r#"{"kernel_image_path":5}"#), SpecInvalid, 400, TYPE),
        row(Bare, "PUT", "/boot-source", Some(r#"{"kernel_image_path":"/k","initrd":"/i"}"#), Valid, 400, UNKNOWN),
        row(Bare, "PUT", "/boot-source", Some(r#"{"kernel_image_path":""}"#), Valid, 400, "kernel_image_path is empty"),
        row(Bare, "PUT", "/boot-source", Some("[1,"), Malformed, 400, "Invalid request body"),
        // GET/PUT/PATCH /machine-config
        row(Bare, "GET", "/machine-config", None, NoBody, 200, ""),
        row(Post, "GET", "/machine-config", None, NoBody, 200, ""),
        row(Bare, "PUT", "/machine-config", Some(MACHINE), Valid, 204, ""),
        row(Post, "PUT", "/machine-config", Some(MACHINE), Valid, 400, AFTER),
        row(Bare, "PUT", "/machine-config", Some(r#"{"vcpu_count":0,"mem_size_mib":256}"#), SpecInvalid, 400, "Invalid vCPU count"),
        row(Bare, "PUT", "/machine-config", Some(r#"{"vcpu_count":33,"mem_size_mib":256}"#), SpecInvalid, 400, "between 1 and 32"),
        row(Bare, "PUT", "/machine-config", Some(r#"{"vcpu_count":2,"mem_size_mib":64}"#), Valid, 400, "at least 128 MiB"),
        row(Bare, "PUT", "/machine-config", Some(r#"{"vcpu_count":2,"mem_size_mib":-1}"#), Valid, 400, "invalid value"),
        row(Bare, "PUT", "/machine-config", Some(r#"{"vcpu_count":2,"mem_size_mib":256,"smt":true}"#), Valid, 400, "smt"),
        row(Bare, "PUT", "/machine-config", Some(r#"{"vcpu_count":"2","mem_size_mib":256}"#), SpecInvalid, 400, TYPE),
        row(Bare, "PUT", "/machine-config", Some(r#"{"vcpu_count":2}"#), SpecInvalid, 400, MISSING),
        // In the spec, but not supported by Kiln: refused as unknown.
        row(Bare, "PUT", "/machine-config", Some(r#"{"vcpu_count":2,"mem_size_mib":256,"huge_pages":"2M"}"#), Valid, 400, UNKNOWN),
        row(Bare, "PUT", "/machine-config", Some(r#"{"vcpu_count":2,"mem_size_mib":256,"ht":true}"#), Valid, 400, UNKNOWN),
        // The spec reuses MachineConfiguration (both fields required) for
        // PATCH; Firecracker, and Kiln, take any subset.
        row(Pre, "PATCH", "/machine-config", Some(r#"{"vcpu_count":4}"#), SpecInvalid, 204, ""),
        row(Post, "PATCH", "/machine-config", Some(r#"{"vcpu_count":4}"#), SpecInvalid, 400, AFTER),
        row(Pre, "PATCH", "/machine-config", Some(r#"{"vcpu_count":64}"#), SpecInvalid, 400, "between 1 and 32"),
        row(Pre, "PATCH", "/machine-config", Some(r#"{"mem_size_mib":"x"}"#), SpecInvalid, 400, TYPE),
        row(Pre, "PATCH", "/machine-config", Some("{"), Malformed, 400, "Invalid request body"),
        // PUT /drives/{id}
        row(Pre, "PUT", "/drives/scratch", Some(DRIVE), Valid, 204, ""),
        row(Pre, "PUT", "/drives/scratch", Some(DRIVE_RL), Valid, 204, ""),
        row(Post, "PUT", "/drives/scratch", Some(DRIVE), Valid, 400, AFTER),
        row(Pre, "PUT", "/drives/other", Some(DRIVE), Valid, 400, "does not match"),
        row(Pre, "PUT", "/drives/scratch", Some(r#"{"drive_id":"scratch","path_on_host":"/d"}"#), SpecInvalid, 400, MISSING),
        row(Pre, "PUT", "/drives/scratch", Some(r#"{"drive_id":"scratch","path_on_host":"/d","is_root_device":"no"}"#), SpecInvalid, 400, TYPE),
        row(Pre, "PUT", "/drives/scratch", Some(r#"{"drive_id":"scratch","path_on_host":"/d","is_root_device":false,"io_engine":"Uring"}"#), SpecInvalid, 400, "unknown variant"),
        row(Pre, "PUT", "/drives/scratch", Some(r#"{"drive_id":"scratch","path_on_host":"/d","is_root_device":false,"cache_type":"Unsafe"}"#), Valid, 400, UNKNOWN),
        row(Pre, "PUT", "/drives/scratch", Some(r#"{"drive_id":"scratch","path_on_host":"/d","is_root_device":true}"#), Valid, 400, "root block device already exists"),
        row(Pre, "PUT", "/drives/abcdefghijklmnopqrstu", Some(r#"{"drive_id":"abcdefghijklmnopqrstu","path_on_host":"/d","is_root_device":false}"#), Valid, 400, "Invalid drive_id"),
        row(Pre, "PUT", "/drives/scratch", Some(r#"{"drive_id":"scratch","path_on_host":"/d","is_root_device":false,"rate_limiter":{"bandwidth":{"size":-5,"refill_time":10}}}"#), SpecInvalid, 400, "invalid value"),
        // PATCH /drives/{id}
        row(Post, "PATCH", "/drives/data", Some(r#"{"drive_id":"data","path_on_host":"{tmp}/new.img"}"#), Valid, 204, ""),
        row(Post, "PATCH", "/drives/data", Some(r#"{"drive_id":"data","rate_limiter":{"bandwidth":{"size":1000,"refill_time":100}}}"#), Valid, 204, ""),
        row(Post, "PATCH", "/drives/rootfs", Some(r#"{"drive_id":"rootfs","path_on_host":"{tmp}/new.img","rate_limiter":{"ops":{"size":0,"refill_time":0}}}"#), Valid, 204, ""),
        row(Pre, "PATCH", "/drives/data", Some(r#"{"drive_id":"data","path_on_host":"{tmp}/new.img"}"#), Valid, 400, BEFORE),
        row(Post, "PATCH", "/drives/data", Some(r#"{"drive_id":"data"}"#), Valid, 400, "at least one property to patch: path_on_host, rate_limiter"),
        row(Post, "PATCH", "/drives/nope", Some(r#"{"drive_id":"nope","path_on_host":"{tmp}/new.img"}"#), Valid, 400, "no drive with id"),
        row(Post, "PATCH", "/drives/data", Some(r#"{"drive_id":"data","path_on_host":"{tmp}/missing.img"}"#), Valid, 400, "No such file or directory"),
        row(Post, "PATCH", "/drives/data", Some(r#"{"drive_id":"data","path_on_host":"{tmp}/new.img","is_read_only":true}"#), Valid, 400, "unknown field `is_read_only`"),
        row(Post, "PATCH", "/drives/data", Some(r#"{"drive_id":"rootfs","path_on_host":"{tmp}/new.img"}"#), Valid, 400, "does not match"),
        row(Post, "PATCH", "/drives/data", Some(r#"{"drive_id":"data","path_on_host":7}"#), SpecInvalid, 400, TYPE),
        row(Post, "PATCH", "/drives/data", Some(r#"{"drive_id":"data","rate_limiter":{"ops":{"size":1}}}"#), SpecInvalid, 400, "missing field `refill_time`"),
        row(Post, "PATCH", "/drives/data", Some(r#"{"path_on_host":"{tmp}/new.img"}"#), SpecInvalid, 400, MISSING),
        row(Post, "PATCH", "/drives/data", Some(r#"{"drive_id":"data","#), Malformed, 400, "Invalid request body"),
        // PUT /network-interfaces/{id}
        row(Pre, "PUT", "/network-interfaces/eth1", Some(NET), Valid, 204, ""),
        row(Post, "PUT", "/network-interfaces/eth1", Some(NET), Valid, 400, AFTER),
        row(Pre, "PUT", "/network-interfaces/eth2", Some(NET), Valid, 400, "does not match"),
        row(Pre, "PUT", "/network-interfaces/eth1", Some(r#"{"iface_id":"eth1","host_dev_name":"tap1","guest_mac":"06:00"}"#), Valid, 400, "guest_mac"),
        row(Pre, "PUT", "/network-interfaces/eth1", Some(r#"{"iface_id":"eth1","host_dev_name":"tap0"}"#), Valid, 400, "already used"),
        row(Pre, "PUT", "/network-interfaces/eth1", Some(r#"{"iface_id":"eth1"}"#), SpecInvalid, 400, MISSING),
        row(Pre, "PUT", "/network-interfaces/eth1", Some(r#"{"iface_id":"eth1","host_dev_name":"tap1","allow_mmds_requests":true}"#), Valid, 400, UNKNOWN),
        // PATCH /network-interfaces/{id}
        row(Post, "PATCH", "/network-interfaces/eth0", Some(r#"{"iface_id":"eth0","rx_rate_limiter":{"bandwidth":{"size":1000,"refill_time":100}}}"#), Valid, 204, ""),
        row(Post, "PATCH", "/network-interfaces/eth0", Some(r#"{"iface_id":"eth0","tx_rate_limiter":{"ops":{"size":0,"refill_time":0}}}"#), Valid, 204, ""),
        row(Post, "PATCH", "/network-interfaces/eth0", Some(r#"{"iface_id":"eth0"}"#), Valid, 204, ""),
        row(Pre, "PATCH", "/network-interfaces/eth0", Some(r#"{"iface_id":"eth0"}"#), Valid, 400, BEFORE),
        row(Post, "PATCH", "/network-interfaces/eth9", Some(r#"{"iface_id":"eth9"}"#), Valid, 400, "no interface with id"),
        row(Post, "PATCH", "/network-interfaces/eth0", Some(r#"{"iface_id":"eth9"}"#), Valid, 400, "does not match"),
        row(Post, "PATCH", "/network-interfaces/eth0", Some(r#"{"iface_id":"eth0","host_dev_name":"tap5"}"#), Valid, 400, UNKNOWN),
        row(Post, "PATCH", "/network-interfaces/eth0", Some(r#"{"iface_id":"eth0","rx_rate_limiter":{"bandwidth":{"size":"big","refill_time":1}}}"#), SpecInvalid, 400, TYPE),
        row(Post, "PATCH", "/network-interfaces/eth0", Some(r#"{"iface_id":"eth0","rx_rate_limiter":{"ops":{"size":-1,"refill_time":1}}}"#), SpecInvalid, 400, "invalid value"),
        row(Post, "PATCH", "/network-interfaces/eth0", None, NoBody, 400, "empty"),
        // PUT /vsock
        row(Pre, "PUT", "/vsock", Some(VSOCK), Valid, 204, ""),
        row(Post, "PUT", "/vsock", Some(VSOCK), Valid, 400, AFTER),
        row(Pre, "PUT", "/vsock", Some(r#"{"guest_cid":2,"uds_path":"/v"}"#), SpecInvalid, 400, "guest_cid"),
        row(Pre, "PUT", "/vsock", Some(r#"{"guest_cid":3}"#), SpecInvalid, 400, MISSING),
        row(Pre, "PUT", "/vsock", Some(r#"{"guest_cid":4294967296,"uds_path":"/v"}"#), Valid, 400, "invalid value"),
        row(Pre, "PUT", "/vsock", Some(r#"{"guest_cid":3,"uds_path":"/v","port":1}"#), Valid, 400, UNKNOWN),
        // PUT /entropy
        row(Pre, "PUT", "/entropy", Some("{}"), Valid, 204, ""),
        row(Pre, "PUT", "/entropy", Some(r#"{"rate_limiter":{"ops":{"size":10,"refill_time":100}}}"#), Valid, 204, ""),
        row(Post, "PUT", "/entropy", Some("{}"), Valid, 400, AFTER),
        row(Pre, "PUT", "/entropy", Some(r#"{"rate_limiter":5}"#), SpecInvalid, 400, TYPE),
        row(Pre, "PUT", "/entropy", Some(r#"{"rate":{}}"#), Valid, 400, UNKNOWN),
        // /balloon
        row(Pre, "GET", "/balloon", None, NoBody, 200, ""),
        row(Post, "GET", "/balloon", None, NoBody, 200, ""),
        row(Bare, "GET", "/balloon", None, NoBody, 400, "No balloon device"),
        row(Bare, "PUT", "/balloon", Some(BALLOON), Valid, 204, ""),
        row(Post, "PUT", "/balloon", Some(BALLOON), Valid, 400, AFTER),
        row(Bare, "PUT", "/balloon", Some(r#"{"amount_mib":0}"#), SpecInvalid, 400, MISSING),
        row(Bare, "PUT", "/balloon", Some(r#"{"amount_mib":"0","deflate_on_oom":false}"#), SpecInvalid, 400, TYPE),
        row(Bare, "PUT", "/balloon", Some(r#"{"amount_mib":0,"deflate_on_oom":false,"free_page_hinting":true}"#), Valid, 400, "free page hinting is not supported"),
        row(Bare, "PUT", "/balloon", Some(r#"{"amount_mib":0,"deflate_on_oom":false,"free_page_reporting":true}"#), Valid, 204, ""),
        row(Post, "PATCH", "/balloon", Some(r#"{"amount_mib":10}"#), Valid, 204, ""),
        row(Pre, "PATCH", "/balloon", Some(r#"{"amount_mib":10}"#), Valid, 400, BEFORE),
        row(Post, "PATCH", "/balloon", Some(r#"{"amount_mib":256}"#), Valid, 400, "smaller than the guest's memory"),
        row(Post, "PATCH", "/balloon", Some("{}"), SpecInvalid, 400, MISSING),
        row(Post, "PATCH", "/balloon", Some(r#"{"amount_mib":1,"deflate_on_oom":true}"#), Valid, 400, UNKNOWN),
        // /balloon/statistics
        row(Post, "GET", "/balloon/statistics", None, NoBody, 200, ""),
        row(Pre, "GET", "/balloon/statistics", None, NoBody, 400, BEFORE),
        pending(Feature::BalloonStatsUpdate, row(Post, "PATCH", "/balloon/statistics", Some(r#"{"stats_polling_interval_s":5}"#), Valid, 204, "")),
        pending(Feature::BalloonStatsUpdate, row(Post, "PATCH", "/balloon/statistics", Some(r#"{"stats_polling_interval_s":"5"}"#), SpecInvalid, 400, TYPE)),
        pending(Feature::BalloonStatsUpdate, row(Post, "PATCH", "/balloon/statistics", Some("{}"), SpecInvalid, 400, MISSING)),
        // PATCH /vm
        row(Post, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#), Valid, 204, ""),
        row(Post, "PATCH", "/vm", Some(r#"{"state":"Resumed"}"#), Valid, 204, ""),
        row(Pre, "PATCH", "/vm", Some(r#"{"state":"Paused"}"#), Valid, 400, BEFORE),
        row(Post, "PATCH", "/vm", Some(r#"{"state":"Stopped"}"#), SpecInvalid, 400, "unknown variant"),
        row(Post, "PATCH", "/vm", Some("{}"), SpecInvalid, 400, MISSING),
        row(Post, "PATCH", "/vm", Some(r#"{"state":"Paused","now":1}"#), Valid, 400, UNKNOWN),
        // GET /vm/config
        row(Bare, "GET", "/vm/config", None, NoBody, 200, ""),
        row(Pre, "GET", "/vm/config", None, NoBody, 200, ""),
        row(Post, "GET", "/vm/config", None, NoBody, 200, ""),
        // /snapshot/* (the fake VM cannot snapshot, the fake starter cannot
        // restore: these rows check the API layer's rules).
        pending(Feature::Snapshot, row(Pre, "PUT", "/snapshot/create", Some(SNAP), Valid, 400, BEFORE)),
        pending(Feature::Snapshot, row(Post, "PUT", "/snapshot/create", Some(SNAP), Valid, 400, "cannot be snapshotted")),
        pending(Feature::Snapshot, row(Post, "PUT", "/snapshot/create", Some(r#"{"snapshot_path":"/s","mem_file_path":"/m","snapshot_type":"Incremental"}"#), SpecInvalid, 400, "unknown variant")),
        pending(Feature::Snapshot, row(Post, "PUT", "/snapshot/create", Some(r#"{"snapshot_path":"/s"}"#), SpecInvalid, 400, MISSING)),
        pending(Feature::Snapshot, row(Bare, "PUT", "/snapshot/load", Some(r#"{"snapshot_path":"{tmp}/snap"}"#), Valid, 400, "one of mem_file_path or mem_backend is required")),
        pending(Feature::Snapshot, row(Bare, "PUT", "/snapshot/load", Some(LOAD), Valid, 400, "Cannot load the snapshot")),
        pending(Feature::Snapshot, row(Pre, "PUT", "/snapshot/load", Some(LOAD), Valid, 400, "after configuring boot-specific resources")),
        pending(Feature::Snapshot, row(Post, "PUT", "/snapshot/load", Some(LOAD), Valid, 400, "after the microVM has started")),
        pending(Feature::Snapshot, row(Bare, "PUT", "/snapshot/load", Some("{}"), SpecInvalid, 400, MISSING)),
        // Features being added elsewhere (see `Feature`).
        pending(Feature::Logger, row(Bare, "PUT", "/logger", Some(r#"{"log_path":"{tmp}/log","level":"Info"}"#), Valid, 204, "")),
        pending(Feature::Logger, row(Post, "PUT", "/logger", Some(r#"{"level":"Debug"}"#), Valid, 400, AFTER)),
        pending(Feature::Logger, row(Bare, "PUT", "/logger", Some(r#"{"level":5}"#), SpecInvalid, 400, "")),
        pending(Feature::Logger, row(Bare, "PUT", "/logger", Some(r#"{"level":"Info","colour":true}"#), Valid, 400, UNKNOWN)),
        pending(Feature::Metrics, row(Bare, "PUT", "/metrics", Some(r#"{"metrics_path":"{tmp}/metrics"}"#), Valid, 204, "")),
        pending(Feature::Metrics, row(Post, "PUT", "/metrics", Some(r#"{"metrics_path":"{tmp}/metrics"}"#), Valid, 400, AFTER)),
        pending(Feature::Metrics, row(Bare, "PUT", "/metrics", Some("{}"), SpecInvalid, 400, MISSING)),
        pending(Feature::Serial, row(Bare, "PUT", "/serial", Some(r#"{"serial_out_path":"{tmp}/serial"}"#), Valid, 204, "")),
        pending(Feature::Serial, row(Post, "PUT", "/serial", Some(r#"{"serial_out_path":"{tmp}/serial"}"#), Valid, 400, AFTER)),
        pending(Feature::Serial, row(Bare, "PUT", "/serial", Some(r#"{"serial_out_path":9}"#), SpecInvalid, 400, TYPE)),
        pending(Feature::CpuConfig, row(Pre, "PUT", "/cpu-config", Some("{}"), Valid, 204, "")),
        row(Pre, "PUT", "/cpu-config", Some(r#"{"cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,"modifiers":[{"register":"ecx","bitmap":"0b0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}],"msr_modifiers":[{"addr":"0x1a0","bitmap":"0bx1"}],"kvm_capabilities":["!121"]}"#), Valid, 204, ""),
        row(Pre, "PUT", "/cpu-config", Some(r#"{"msr_modifiers":[{"addr":"0x1a0","bitmap":"0b12"}]}"#), Valid, 400, "Invalid bitmap"),
        row(Pre, "PUT", "/cpu-config", Some(r#"{"cpuid_modifiers":[{"leaf":"1","subleaf":"0","flags":0,"modifiers":[{"register":"esi","bitmap":"0b1"}]}]}"#), SpecInvalid, 400, "esi"),
        row(Pre, "PUT", "/cpu-config", Some("{"), Malformed, 400, "Invalid request body"),
        row(Post, "PUT", "/cpu-config", Some("{}"), Valid, 400, AFTER),
        pending(Feature::Mmds, row(Pre, "PUT", "/mmds", Some(r#"{"latest":{"meta-data":{"id":"i-1"}}}"#), Valid, 204, "")),
        pending(Feature::Mmds, with_setup(
            &[("PUT", "/mmds", r#"{"latest":{}}"#)],
            row(Pre, "PATCH", "/mmds", Some(r#"{"latest":{"x":"y"}}"#), Valid, 204, ""),
        )),
        pending(Feature::Mmds, with_setup(
            &[("PUT", "/mmds", r#"{"a":"b"}"#)],
            row(Pre, "GET", "/mmds", None, NoBody, 200, ""),
        )),
        pending(Feature::Mmds, row(Pre, "PUT", "/mmds/config", Some(r#"{"network_interfaces":["eth0"]}"#), Valid, 204, "")),
        row(Pre, "PUT", "/mmds/config", Some(r#"{"network_interfaces":["eth9"]}"#), Valid, 400, "does not correspond"),
        row(Pre, "PUT", "/mmds/config", Some(r#"{"network_interfaces":["eth0"],"version":"V7"}"#), SpecInvalid, 400, "V7"),
        row(Post, "PUT", "/mmds/config", Some(r#"{"network_interfaces":["eth0"]}"#), Valid, 400, AFTER),
        row(Pre, "PATCH", "/mmds", Some(r#"{"a":1}"#), Valid, 400, "not initialized"),
        row(Pre, "PUT", "/mmds", Some(r#"{"a":"#), Malformed, 400, "Invalid request body"),
        row(Pre, "PATCH", "/mmds", Some("{"), Malformed, 400, "Invalid request body"),
        with_setup(
            Box::leak(Box::new([("PUT", "/mmds", leak(format!(r#"{{"a":"{}"}}"#, "x".repeat(30000))))])),
            row(Pre, "PATCH", "/mmds", Some(leak(format!(r#"{{"b":"{}"}}"#, "y".repeat(30000)))), Valid, 413, "doesn't fit"),
        ),
        row(Post, "GET", "/mmds", None, NoBody, 400, "not initialized"),
        with_setup(
            &[("PUT", "/mmds/config", r#"{"network_interfaces":["eth0"],"version":"V2"}"#)],
            row(Post, "PUT", "/mmds", Some(r#"{"b":"c"}"#), Valid, 204, ""),
        ),
        // In the spec; not implemented by Kiln.
        unsupported(row(Pre, "PUT", "/pmem/p0", Some(r#"{"id":"p0","path_on_host":"/p"}"#), Valid, 400, "")),
        unsupported(row(Post, "PATCH", "/pmem/p0", Some(r#"{"id":"p0"}"#), Valid, 400, "")),
        unsupported(row(Pre, "PUT", "/hotplug/memory", Some(r#"{"total_size_mib":1024}"#), Valid, 400, "")),
        unsupported(row(Post, "PATCH", "/hotplug/memory", Some(r#"{"requested_size_mib":512}"#), Valid, 400, "")),
        unsupported(row(Post, "GET", "/hotplug/memory", None, NoBody, 400, "")),
        unsupported(row(Post, "PATCH", "/balloon/hinting/start", Some("{}"), Valid, 400, "")),
        unsupported(row(Post, "GET", "/balloon/hinting/status", None, NoBody, 400, "")),
        unsupported(row(Post, "PATCH", "/balloon/hinting/stop", None, NoBody, 400, "")),
    ]
}

/// The running VM: a balloon, drives "rootfs" and "data", interface
/// "eth0", 256 MiB; records the updates it accepts.
struct FakeVm {
    paused: Mutex<bool>,
    log: Arc<Mutex<Vec<String>>>,
}

impl VmControl for FakeVm {
    fn instance_info(&self) -> InstanceInfo {
        let paused = *self.paused.lock().unwrap();
        InstanceInfo {
            id: "inner".into(),
            state: if paused { "Paused" } else { "Running" }.into(),
            vmm_version: "0".into(),
            app_name: "inner".into(),
        }
    }
    fn balloon(&self) -> Result<Balloon, ApiError> {
        Ok(Balloon {
            amount_mib: 0,
            deflate_on_oom: true,
            stats_polling_interval_s: 1,
            free_page_hinting: false,
            free_page_reporting: false,
        })
    }
    fn update_balloon(&self, u: &BalloonUpdate) -> Result<(), ApiError> {
        if u.amount_mib >= 256 {
            return Err(ApiError::Invalid(
                "amount_mib must be smaller than the guest's memory (256 MiB)".into(),
            ));
        }
        self.log
            .lock()
            .unwrap()
            .push(format!("balloon {}", u.amount_mib));
        Ok(())
    }
    fn balloon_stats(&self) -> Result<BalloonStats, ApiError> {
        Ok(BalloonStats::from_device(
            4,
            2,
            &[(4, 1 << 20), (5, 2 << 20)],
        ))
    }
    fn update_balloon_stats(&self, u: &BalloonStatsUpdate) -> Result<(), ApiError> {
        if u.stats_polling_interval_s == 0 {
            return Err(ApiError::Invalid(
                "Statistics cannot be turned off after boot".into(),
            ));
        }
        self.log
            .lock()
            .unwrap()
            .push(format!("stats {}", u.stats_polling_interval_s));
        Ok(())
    }
    fn send_ctrl_alt_del(&self) -> Result<(), ApiError> {
        self.log.lock().unwrap().push("ctrl-alt-del".into());
        Ok(())
    }
    fn set_vm_state(&self, state: VmState) -> Result<(), ApiError> {
        *self.paused.lock().unwrap() = state == VmState::Paused;
        Ok(())
    }
    fn update_drive(&self, u: &PartialDrive) -> Result<(), ApiError> {
        if !["rootfs", "data"].contains(&u.drive_id.as_str()) {
            return Err(ApiError::Invalid(format!(
                "drive update (patch): no drive with id {:?}",
                u.drive_id
            )));
        }
        if let Some(p) = &u.path_on_host {
            std::fs::File::open(p).map_err(|e| {
                ApiError::Invalid(format!("drive update (patch): cannot open disk {p}: {e}"))
            })?;
        }
        self.log.lock().unwrap().push(format!("drive {u:?}"));
        Ok(())
    }
    fn update_network_interface(&self, u: &PartialNetworkInterface) -> Result<(), ApiError> {
        if u.iface_id != "eth0" {
            return Err(ApiError::Invalid(format!(
                "network interface update (patch): no interface with id {:?}",
                u.iface_id
            )));
        }
        self.log.lock().unwrap().push(format!("net {u:?}"));
        Ok(())
    }
}

/// Logger and metrics that accept everything (the API layer's rules are
/// under test, not the files).
struct FakeTelemetry;

impl Telemetry for FakeTelemetry {
    fn configure_logger(&self, _: &LoggerConfig) -> Result<(), String> {
        Ok(())
    }
    fn configure_metrics(&self, _: &MetricsConfig) -> Result<(), String> {
        Ok(())
    }
    fn flush_metrics(&self) -> Result<(), String> {
        Ok(())
    }
}

struct FakeStarter(Arc<Mutex<Vec<String>>>);

impl Starter for FakeStarter {
    fn start(&self, _res: &VmResources) -> Result<Arc<dyn VmControl>, String> {
        Ok(Arc::new(FakeVm {
            paused: Mutex::new(false),
            log: self.0.clone(),
        }))
    }
}

/// A temporary directory with the files the rows name.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "kiln-spec-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        for f in ["kernel", "rootfs.img", "data.img", "new.img"] {
            std::fs::write(d.join(f), [0u8; 1024]).unwrap();
        }
        Self(d)
    }

    fn fill(&self, text: &str) -> String {
        text.replace("{tmp}", &self.0.display().to_string())
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VM in `stage` behind its own API socket.
struct Fixture {
    dir: Dir,
    sock: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Fixture {
    fn new(stage: Stage, setup: &[(&str, &str, &str)]) -> Self {
        let dir = Dir::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        let vm = PreBootVm::new("spec-vm", "1.0.0", Box::new(FakeStarter(log.clone())))
            .with_telemetry(Box::new(FakeTelemetry))
            .with_mmds(Arc::new(kiln_mmds::Mmds::new(
                kiln_mmds::DEFAULT_SIZE_LIMIT,
            )));
        let sock = dir.0.join("api.sock");
        ApiServer::bind(&sock).unwrap().spawn(Arc::new(vm)).unwrap();
        let f = Self { dir, sock, log };
        let mut steps: Vec<(&str, &str, &str)> = Vec::new();
        if stage != Bare {
            steps.extend([
                ("PUT", "/boot-source", KERNEL),
                ("PUT", "/machine-config", MACHINE),
                ("PUT", "/drives/rootfs", r#"{"drive_id":"rootfs","path_on_host":"{tmp}/rootfs.img","is_root_device":true,"is_read_only":false}"#),
                ("PUT", "/drives/data", r#"{"drive_id":"data","path_on_host":"{tmp}/data.img","is_root_device":false,"rate_limiter":{"ops":{"size":5,"refill_time":100}}}"#),
                ("PUT", "/network-interfaces/eth0", r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:AC:10:00:02"}"#),
                ("PUT", "/balloon", r#"{"amount_mib":0,"deflate_on_oom":true,"stats_polling_interval_s":1}"#),
            ]);
        }
        steps.extend(setup.iter().copied());
        if stage == Post {
            steps.push(("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#));
        }
        for (m, p, b) in steps {
            let r = f.send(m, p, Some(b));
            assert!((200..300).contains(&r.status), "setup {m} {p}: {r:?}");
        }
        f
    }

    fn send(&self, method: &str, path: &str, body: Option<&str>) -> ClientResponse {
        let body = body.map(|b| self.dir.fill(b));
        request(&self.sock, method, path, body.as_deref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }
}

/// Checks `r` (the answer to `method path`) against the spec; returns the
/// fault message of an error.
fn check_response(spec: &Spec, method: &str, path: &str, r: &ClientResponse) -> Option<String> {
    let t = spec.template_of(path).expect("a spec path");
    let schema = spec
        .response_schema(method, &t, r.status)
        .unwrap_or_else(|e| panic!("{e}: {r:?}"));
    if r.status == 204 {
        assert!(r.body.is_empty(), "{method} {path}: 204 with a body: {r:?}");
        return None;
    }
    let json: Json = serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("{method} {path}: body is not JSON ({e}): {r:?}"));
    if let Some(s) = schema {
        let errors = spec.validate(s, &json);
        assert!(
            errors.is_empty(),
            "{method} {path}: {errors:?} in {}",
            r.body
        );
    }
    if r.status >= 400 {
        let m = json["fault_message"].as_str();
        assert!(
            m.is_some_and(|m| !m.is_empty()),
            "{method} {path}: an error without fault_message: {r:?}"
        );
        return m.map(str::to_string);
    }
    None
}

/// The status and fault words `row` must get, given [`LANDED`].
fn expectation(row: &Row) -> (u16, &'static str, bool) {
    match row.gate {
        Gate::Kiln => (row.status, row.fault, true),
        Gate::Pending(f) if LANDED.contains(&f) => (row.status, row.fault, true),
        Gate::Pending(_) | Gate::Unsupported => (400, NOT_SUPPORTED, false),
    }
}

fn describe(row: &Row) -> String {
    format!(
        "{:?} {} {} {}",
        row.stage,
        row.method,
        row.path,
        row.body.unwrap_or("(no body)")
    )
}

#[test]
fn every_row_gets_its_status_and_a_spec_conformant_answer() {
    let spec = Spec::load();
    let mut failures = Vec::new();
    for row in table() {
        let what = describe(&row);
        let t = spec
            .template_of(row.path)
            .unwrap_or_else(|| panic!("{what}: the path is not in the spec"));
        // The row's body against the spec: the table cannot drift from it.
        let body_schema = spec.body_schema(row.method, &t);
        match (row.kind, row.body) {
            (NoBody, None) => {}
            (Malformed, Some(b)) => {
                assert!(serde_json::from_str::<Json>(b).is_err(), "{what}: is JSON")
            }
            (Valid | SpecInvalid, Some(b)) => {
                let json: Json = serde_json::from_str(b).expect("a row's body is JSON");
                let schema =
                    body_schema.unwrap_or_else(|| panic!("{what}: the spec has no body here"));
                let errors = spec.validate(schema, &json);
                match row.kind {
                    Valid => assert!(errors.is_empty(), "{what}: {errors:?}"),
                    _ => assert!(!errors.is_empty(), "{what}: conforms to the spec"),
                }
            }
            (k, b) => panic!("{what}: kind {k:?} with body {b:?}"),
        }
        let (status, fault, open) = expectation(&row);
        if row.gate == Gate::Unsupported {
            assert_eq!(row.status, 400, "{what}: unsupported rows expect 400");
        }
        let setup = if open { row.setup } else { &[] };
        let f = Fixture::new(row.stage, setup);
        let r = f.send(row.method, row.path, row.body);
        let msg = check_response(&spec, row.method, &t, &r);
        if r.status != status {
            failures.push(format!("{what}: expected {status}, got {r:?}"));
        } else if let Some(m) = msg.filter(|m| !m.contains(fault)) {
            failures.push(format!("{what}: fault {m:?} lacks {fault:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_spec_operation_has_rows_and_kiln_operations_have_a_success() {
    let spec = Spec::load();
    let rows = table();
    for (m, t) in spec.operations() {
        let mine: Vec<&Row> = rows
            .iter()
            .filter(|r| r.method == m && spec.template_of(r.path).as_deref() == Some(t.as_str()))
            .collect();
        assert!(!mine.is_empty(), "no row for {m} {t}");
        if mine.iter().all(|r| r.gate == Gate::Kiln) {
            assert!(
                mine.iter().any(|r| (200..300).contains(&r.status)),
                "{m} {t}: no happy path"
            );
            if m != "GET" {
                assert!(
                    mine.iter().any(|r| r.status == 400),
                    "{m} {t}: no error case"
                );
            }
        }
    }
    // Every request with a body has a malformed or spec-invalid row for
    // each Kiln endpoint taking a body.
    for (m, t) in spec.operations() {
        let kiln: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                r.gate == Gate::Kiln
                    && r.method == m
                    && spec.template_of(r.path).as_deref() == Some(t.as_str())
            })
            .collect();
        if kiln.is_empty() || spec.body_schema(&m, &t).is_none() {
            continue;
        }
        assert!(
            kiln.iter()
                .any(|r| matches!(r.kind, SpecInvalid | Malformed)),
            "{m} {t}: no row with a bad body"
        );
    }
}

#[test]
fn patches_reach_the_running_vm_and_show_in_vm_config() {
    let spec = Spec::load();
    let f = Fixture::new(Post, &[]);
    let new = f.dir.0.join("new.img");
    let body = format!(
        r#"{{"drive_id":"data","path_on_host":"{}","rate_limiter":{{"bandwidth":{{"size":4096,"refill_time":10}},"ops":{{"size":0,"refill_time":0}}}}}}"#,
        new.display()
    );
    assert_eq!(f.send("PATCH", "/drives/data", Some(&body)).status, 204);
    let r = f.send(
        "PATCH",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id":"eth0","tx_rate_limiter":{"ops":{"size":7,"refill_time":70}}}"#),
    );
    assert_eq!(r.status, 204, "{r:?}");
    // A refused patch changes nothing.
    let r = f.send(
        "PATCH",
        "/drives/rootfs",
        Some(r#"{"drive_id":"rootfs","path_on_host":"/nonexistent/x.img"}"#),
    );
    assert_eq!(r.status, 400);
    let log = f.log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(
        log[0].starts_with("drive PartialDrive { drive_id: \"data\""),
        "{log:?}"
    );
    assert!(log[1].contains("size: 7"), "{log:?}");

    let r = f.send("GET", "/vm/config", None);
    check_response(&spec, "GET", "/vm/config", &r);
    let c: Json = serde_json::from_str(&r.body).unwrap();
    let data = &c["drives"][1];
    assert_eq!(data["drive_id"], "data");
    assert_eq!(data["path_on_host"], new.display().to_string());
    // The bandwidth bucket is new; the ops bucket (size 0) was removed.
    assert_eq!(
        data["rate_limiter"],
        serde_json::json!({"bandwidth":{"size":4096,"one_time_burst":0,"refill_time":10}})
    );
    assert!(c["drives"][0]["path_on_host"]
        .as_str()
        .unwrap()
        .ends_with("rootfs.img"));
    assert_eq!(
        c["network-interfaces"][0]["tx_rate_limiter"],
        serde_json::json!({"ops":{"size":7,"one_time_burst":0,"refill_time":70}})
    );
    assert!(c["network-interfaces"][0].get("rx_rate_limiter").is_none());
    assert!(Path::new(&f.dir.0).exists());
}
