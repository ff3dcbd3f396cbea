//! `kiln restore` (a snapshot restored by the controller and run) and the
//! API clients `kiln pause`, `kiln resume`, `kiln snapshot`, plus
//! `kiln snapshot-rebase`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use kiln_api::snapshot::{
    MemBackend as ApiMemBackend, MemBackendType, NetworkOverride, SnapshotLoadParams, VsockOverride,
};
use kiln_controller::restore::prepare;
use kiln_controller::Controller;
use kiln_vmm::uffd_handler::HandlerOptions;
use kiln_vmm::MemBackend;

/// Options of `kiln restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The state file (`snapshot_path` of PUT /snapshot/create).
    #[arg(long, value_name = "PATH")]
    snapshot: PathBuf,
    /// The memory file (`mem_file_path`), mapped privately.
    #[arg(long, value_name = "PATH", required_unless_present = "uffd_sock")]
    mem_file: Option<PathBuf>,
    /// Get the memory from the page-fault handler listening on this Unix
    /// socket (Firecracker's Uffd backend, e.g. `kiln uffd-handler`)
    /// instead of a memory file.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["mem_file", "uffd"])]
    uffd_sock: Option<PathBuf>,
    /// Serve the memory file through userfaultfd, from a page-fault handler
    /// thread in this process, instead of mapping it.
    #[arg(long, requires = "mem_file")]
    uffd: bool,
    /// With --uffd: record the working set (the pages of the memory file in
    /// first-fault order) to this file.
    #[arg(
        long,
        value_name = "WS",
        requires = "uffd",
        conflicts_with = "prefetch"
    )]
    record: Option<PathBuf>,
    /// With --uffd: copy the pages of this recorded working set in before
    /// they are touched.
    #[arg(long, value_name = "WS", requires = "uffd")]
    prefetch: Option<PathBuf>,
    /// Serve the Firecracker API (runtime requests) on this socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Stay paused (resume with PATCH /vm).
    #[arg(long, requires = "api_sock")]
    paused: bool,
    /// Use another TAP device for an interface: IFACE_ID=TAP (repeatable).
    #[arg(long = "net-override", value_name = "IFACE_ID=TAP")]
    net_overrides: Vec<String>,
    /// Use another Unix socket path for the vsock device.
    #[arg(long, value_name = "PATH")]
    vsock_override: Option<String>,
    #[command(flatten)]
    seccomp: crate::seccomp_cmd::SeccompArgs,
    /// Track dirty pages, so diff snapshots of the restored VM can be taken.
    #[arg(long)]
    track_dirty_pages: bool,
}

/// `kiln restore`: restores a snapshot and runs it like `kiln vmm`.
pub fn restore_cmd(args: RestoreArgs, start: Instant) -> Result<i32> {
    let network_overrides = parse_net_overrides(&args.net_overrides)?;
    let params = SnapshotLoadParams {
        snapshot_path: args.snapshot.display().to_string(),
        mem_file_path: args.mem_file.as_ref().map(|m| m.display().to_string()),
        mem_backend: args.uffd_sock.as_ref().map(|s| ApiMemBackend {
            backend_type: MemBackendType::Uffd,
            backend_path: s.display().to_string(),
        }),
        resume_vm: !args.paused,
        network_overrides,
        vsock_override: args
            .vsock_override
            .map(|uds_path| VsockOverride { uds_path }),
        track_dirty_pages: args.track_dirty_pages,
        ..Default::default()
    };
    if let Some(sock) = &args.api_sock {
        kiln_controller::api::check_sock(sock)?;
    }
    crate::seccomp_cmd::init(
        args.seccomp.no_seccomp,
        args.seccomp.seccomp_filter.as_deref(),
    )?;
    let mut r = prepare(&params).with_context(|| format!("restore {}", args.snapshot.display()))?;
    log::info!("restore: state file read at {:?}", start.elapsed());
    if let (true, Some(mem_file)) = (args.uffd, args.mem_file) {
        r.mem = MemBackend::UffdThread {
            mem_file,
            options: HandlerOptions {
                record: args.record,
                prefetch: args.prefetch,
            },
        };
    }
    let mut vm = Controller::restore(r, start).map_err(|e| anyhow::anyhow!("restore: {e}"))?;
    if let Some(path) = &args.api_sock {
        vm.serve_api(path)?;
    }
    log::info!("restored in {:?}", start.elapsed());
    let stdin = crate::term::prepare_stdin();
    let reason = vm.run(stdin, |_| {})?;
    crate::term::restore();
    Ok(crate::exit::status(reason))
}

/// `--net-override IFACE_ID=TAP` options.
pub fn parse_net_overrides(opts: &[String]) -> Result<Vec<NetworkOverride>> {
    opts.iter()
        .map(|o| {
            let (iface_id, tap) = o
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--net-override {o:?}: expected IFACE_ID=TAP"))?;
            Ok(NetworkOverride {
                iface_id: iface_id.into(),
                host_dev_name: tap.into(),
            })
        })
        .collect()
}

/// Options of `kiln pause` and `kiln resume`.
#[derive(Args, Debug)]
pub struct SockArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    sock: PathBuf,
}

/// Options of `kiln snapshot`.
#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    sock: PathBuf,
    /// Where the state file goes.
    #[arg(long, value_name = "PATH")]
    snapshot: PathBuf,
    /// Where the memory file goes.
    #[arg(long, value_name = "PATH")]
    mem_file: PathBuf,
    /// `full`: every page. `diff`: only the pages written since the last
    /// snapshot (the VM must track dirty pages; apply the memory file onto
    /// the previous one with `kiln snapshot-rebase`).
    #[arg(long = "type", value_name = "full|diff", default_value = "full", value_parser = ["full", "diff"])]
    kind: String,
    /// Resume the VM afterwards (by default it stays paused, as after
    /// Firecracker's snapshot).
    #[arg(long)]
    resume: bool,
}

fn call(sock: &std::path::Path, method: &str, uri: &str, body: &str) -> Result<()> {
    let r = kiln_api::client::request(sock, method, uri, Some(body))
        .map_err(|e| anyhow::anyhow!("{}: {e}", sock.display()))?;
    if !(200..300).contains(&r.status) {
        let msg = serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v["fault_message"].as_str().map(String::from))
            .unwrap_or(r.body);
        anyhow::bail!("{method} {uri}: {msg}");
    }
    Ok(())
}

/// `kiln pause` / `kiln resume`: PATCH /vm.
pub fn set_state(args: SockArgs, paused: bool) -> Result<i32> {
    let state = if paused { "Paused" } else { "Resumed" };
    call(
        &args.sock,
        "PATCH",
        "/vm",
        &format!(r#"{{"state":"{state}"}}"#),
    )?;
    Ok(0)
}

/// `kiln snapshot`: pause (if needed), PUT /snapshot/create, optionally
/// resume.
pub fn snapshot(args: SnapshotArgs) -> Result<i32> {
    call(&args.sock, "PATCH", "/vm", r#"{"state":"Paused"}"#)?;
    let body = serde_json::json!({
        "snapshot_path": args.snapshot,
        "mem_file_path": args.mem_file,
        "snapshot_type": if args.kind == "diff" { "Diff" } else { "Full" },
    });
    let t = Instant::now();
    let made = call(&args.sock, "PUT", "/snapshot/create", &body.to_string());
    if args.resume {
        call(&args.sock, "PATCH", "/vm", r#"{"state":"Resumed"}"#)?;
    }
    made?;
    eprintln!(
        "kiln: {} snapshot {} + {} in {:.1} ms",
        args.kind,
        args.snapshot.display(),
        args.mem_file.display(),
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(0)
}

/// Options of `kiln snapshot-rebase`.
#[derive(Args, Debug)]
pub struct RebaseArgs {
    /// The memory file of the snapshot the diff was taken after (full, or
    /// already rebased); it is updated in place.
    #[arg(long, value_name = "FILE")]
    base_mem: PathBuf,
    /// The diff snapshot's memory file.
    #[arg(long, value_name = "FILE")]
    diff_mem: PathBuf,
}

/// `kiln snapshot-rebase`: applies a diff snapshot's memory file onto the
/// memory file before it, which then restores with the diff's state file.
pub fn rebase(args: RebaseArgs) -> Result<i32> {
    let t = Instant::now();
    let copied = kiln_vmm::memory_file::rebase(&args.base_mem, &args.diff_mem)
        .map_err(|e| anyhow::anyhow!("snapshot-rebase: {e}"))?;
    eprintln!(
        "kiln: {} KiB of {} applied onto {} in {:.1} ms",
        copied >> 10,
        args.diff_mem.display(),
        args.base_mem.display(),
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(0)
}
