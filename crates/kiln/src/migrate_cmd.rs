//! `kiln migrate send` (the client of the source's `PUT /migrate`) and
//! `kiln migrate receive` (the destination: the controller takes the VM in
//! and runs it). See docs/migration.md.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_api::migrate::{MigrateParams, MigrationReport, DEFAULT_DOWNTIME_MS, DEFAULT_MAX_ROUNDS};
use kiln_api::snapshot::VsockOverride;
use kiln_controller::error::chain;
use kiln_controller::migrate::{receive, refuse, Incoming};
use kiln_controller::Controller;
use kiln_vmm::migration::{self, Endpoint};

use crate::snapshot_cmd::parse_net_overrides;

/// Options of `kiln migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    #[command(subcommand)]
    cmd: MigrateCmd,
}

#[derive(Subcommand, Debug)]
enum MigrateCmd {
    /// Move a running VM (`kiln vmm`, `kiln restore`, `kiln migrate
    /// receive` with --api-sock) to a `kiln migrate receive`; returns once
    /// it runs there (the source VMM then exits).
    Send(SendArgs),
    /// Wait for one migrated VM, then run it like `kiln restore`.
    Receive(ReceiveArgs),
}

/// Options of `kiln migrate send`.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// The running VM's API socket.
    #[arg(long, value_name = "PATH")]
    sock: PathBuf,
    /// The destination: tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ENDPOINT")]
    to: String,
    /// Downtime target: pre-copy stops once the rest can be sent this fast.
    #[arg(long, value_name = "MS", default_value_t = DEFAULT_DOWNTIME_MS)]
    downtime_ms: u64,
    /// At most this many pre-copy rounds.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_ROUNDS)]
    max_rounds: u32,
}

/// Options of `kiln migrate receive`.
#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Where to wait for the source: tcp:HOST:PORT or unix:PATH.
    #[arg(long, value_name = "ENDPOINT")]
    listen: String,
    /// Serve the Firecracker API (runtime requests) on this socket.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// Use another TAP device for an interface: IFACE_ID=TAP (repeatable).
    #[arg(long = "net-override", value_name = "IFACE_ID=TAP")]
    net_overrides: Vec<String>,
    /// Use another Unix socket path for the vsock device.
    #[arg(long, value_name = "PATH")]
    vsock_override: Option<String>,
    #[command(flatten)]
    seccomp: crate::seccomp_cmd::SeccompArgs,
}

/// `kiln migrate`.
pub fn migrate(args: MigrateArgs, start: Instant) -> Result<i32> {
    match args.cmd {
        MigrateCmd::Send(a) => send_cmd(a),
        MigrateCmd::Receive(a) => receive_cmd(a, start),
    }
}

/// `kiln migrate send`: `PUT /migrate` and the figures it answers.
fn send_cmd(a: SendArgs) -> Result<i32> {
    // The VMM resolves no names (its seccomp filters): do it here.
    let to: Endpoint =
        a.to.parse()
            .map_err(|e| anyhow::anyhow!("migrate send: --to {e}"))?;
    let to = to
        .resolved()
        .map_err(|e| anyhow::anyhow!("migrate send: {e}"))?;
    let body = serde_json::to_string(&MigrateParams {
        destination: to.to_string(),
        downtime_ms: a.downtime_ms,
        max_rounds: a.max_rounds,
    })?;
    let r = kiln_api::client::request_timeout(&a.sock, "PUT", "/migrate", Some(&body), None)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.sock.display()))?;
    if !(200..300).contains(&r.status) {
        let msg = serde_json::from_str::<serde_json::Value>(&r.body)
            .ok()
            .and_then(|v| v["fault_message"].as_str().map(String::from))
            .unwrap_or(r.body);
        anyhow::bail!("PUT /migrate: {msg}");
    }
    let rep: MigrationReport = serde_json::from_str(&r.body)
        .with_context(|| format!("PUT /migrate answered {:?}", r.body))?;
    eprintln!(
        "kiln: migrated to {} in {:.1} ms (downtime {:.1} ms, {} rounds, {:.1} MiB sent, {:.1} MiB while paused)",
        a.to,
        rep.total_ms,
        rep.downtime_ms,
        rep.rounds,
        rep.bytes_sent as f64 / (1 << 20) as f64,
        rep.final_bytes as f64 / (1 << 20) as f64,
    );
    Ok(0)
}

/// `kiln migrate receive`.
fn receive_cmd(a: ReceiveArgs, start: Instant) -> Result<i32> {
    let at: Endpoint = a
        .listen
        .parse()
        .map_err(|e| anyhow::anyhow!("migrate receive: --listen {e}"))?;
    let net_overrides = parse_net_overrides(&a.net_overrides)?;
    let vsock_override = a.vsock_override.map(|uds_path| VsockOverride { uds_path });
    if let Some(sock) = &a.api_sock {
        kiln_controller::api::check_sock(sock)?;
    }
    crate::seccomp_cmd::init(a.seccomp.no_seccomp, a.seccomp.seccomp_filter.as_deref())?;
    // Bound here (names resolved, the socket path made); the source's data
    // is taken in on a thread of the migration seccomp kind.
    let listener = Arc::new(
        at.listen()
            .map_err(|e| anyhow::anyhow!("migrate receive: {e}"))?,
    );
    eprintln!("kiln: waiting for a migration on {}", listener.endpoint());
    let received = receive(listener.clone());
    drop(listener); // one migration per process (a Unix socket is removed here)
    let Incoming {
        mut stream,
        received: got,
        since: t,
    } = received.map_err(|e| anyhow::anyhow!("migrate receive: {e}"))?;
    log::info!(
        "received {} MiB of guest memory in {} rounds in {:?}",
        got.bytes >> 20,
        got.rounds,
        t.elapsed()
    );

    let mut vm = Controller::from_migration(got, &net_overrides, vsock_override.as_ref(), start)
        .map_err(|e| {
            let why = chain(&e);
            refuse(&mut stream, &why);
            anyhow::anyhow!("migrate receive: {why}; nothing was started")
        })?;
    if let Some(path) = &a.api_sock {
        vm.serve_api(path)?;
    }

    let handle = vm.vmm().handle();
    let ack_failed = Arc::new(AtomicBool::new(false));
    let failed = ack_failed.clone();
    let stream = Mutex::new(stream);
    let stdin = crate::term::prepare_stdin();
    let reason = vm.run(stdin, move |_| {
        let mut s = stream.lock().unwrap_or_else(|e| e.into_inner());
        match migration::send_ack(&mut s) {
            Ok(()) => {
                handle.resume();
                eprintln!(
                    "kiln: migration received; the microVM runs here ({:.1} ms after the source connected)",
                    t.elapsed().as_secs_f64() * 1e3
                );
            }
            Err(e) => {
                // The source will resume its guest: never run this one.
                eprintln!("kiln: migrate receive: confirming to the source failed: {e}");
                failed.store(true, Ordering::SeqCst);
                let _ = handle.end_migrated();
            }
        }
    })?;
    crate::term::restore();
    if ack_failed.load(Ordering::SeqCst) {
        eprintln!("kiln: migrate receive: the microVM was not started here");
        return Ok(1);
    }
    Ok(crate::exit::status(reason))
}
