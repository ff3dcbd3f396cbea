//! Live migration: `PUT /migrate` on the source VMM (through
//! [`crate::api_glue`]), `kiln migrate send` (its client) and
//! `kiln migrate receive` (the destination). See docs/migration.md.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use kiln_api::migrate::{MigrateParams, MigrationReport, DEFAULT_DOWNTIME_MS, DEFAULT_MAX_ROUNDS};
use kiln_api::snapshot::VsockOverride;
use kiln_api::VmResources;
use kiln_vmm::migration::{self, Endpoint, SendError, SendOptions, Stream};
use kiln_vmm::{VmHandle, Vmm};

use crate::snapshot_cmd::{apply_overrides, parse_net_overrides};

/// Migrates the VM of `handle` as `PUT /migrate` asks (called on the API
/// thread; the migration itself runs on a thread of the migration seccomp
/// kind, the only one that may open TCP sockets). Returns once the
/// destination runs it; on failure the VM runs here.
pub fn send(
    handle: &VmHandle,
    config: &str,
    p: &MigrateParams,
) -> std::result::Result<MigrationReport, String> {
    let to: Endpoint = p
        .destination
        .parse()
        .map_err(|e| format!("migration destination {e}"))?;
    if p.max_rounds == 0 {
        return Err("max_rounds must be at least 1".into());
    }
    if kiln_seccomp::enabled() && !to.is_literal() {
        return Err(format!(
            "migration destination {to}: the VMM's seccomp filters allow no name lookups; \
             give an IP address (`kiln migrate send` resolves names itself)"
        ));
    }
    let opts = SendOptions {
        downtime: Duration::from_millis(p.downtime_ms),
        max_rounds: p.max_rounds,
    };
    let (handle, config) = (handle.clone(), config.to_string());
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread = kiln_seccomp::spawn(
        kiln_seccomp::ThreadKind::Migration,
        "kiln_migrate".into(),
        move || {
            let _ = tx.send(send_on_this_thread(&handle, &config, &to, &opts));
        },
    )
    .map_err(|e| format!("starting the migration thread: {e}; the microVM keeps running here"))?;
    let r = rx
        .recv()
        .unwrap_or_else(|_| Err("the migration thread ended without an answer".into()));
    let _ = thread.join();
    r
}

fn send_on_this_thread(
    handle: &VmHandle,
    config: &str,
    to: &Endpoint,
    opts: &SendOptions,
) -> std::result::Result<MigrationReport, String> {
    let fail = |e: String| format!("migration to {to} failed: {e}; the microVM keeps running here");
    let mut stream = to.connect().map_err(fail)?;
    log::info!("migrating to {to}");
    let stats = handle
        .migrate_send(&mut stream, config, opts)
        .map_err(|e| match e {
            SendError::Failed(e) => fail(e),
            SendError::InDoubt(e) => format!(
                "migration to {to}: everything was sent, then {e}: the destination may be \
                 running the microVM, so it stays paused here (resume it with PATCH /vm only \
                 if the destination does not run it)"
            ),
        })?;
    log::info!(
        "migrated to {to}: {} rounds, {} MiB, {:?} in all, {:?} paused",
        stats.rounds,
        stats.bytes >> 20,
        stats.total,
        stats.downtime
    );
    Ok(MigrationReport {
        rounds: stats.rounds,
        bytes_sent: stats.bytes,
        final_bytes: stats.final_bytes,
        total_ms: stats.total.as_secs_f64() * 1e3,
        downtime_ms: stats.downtime.as_secs_f64() * 1e3,
    })
}

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

/// Tells the source why nothing will run here, and returns the error.
fn refuse(stream: &mut Stream, e: anyhow::Error) -> anyhow::Error {
    let _ = kiln_snapshot::migration::send(
        stream,
        &kiln_snapshot::migration::Message::Error(format!("{e:#}")),
    );
    e
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
        crate::api_glue::check_sock(sock)?;
    }
    crate::seccomp_cmd::init(a.seccomp.no_seccomp, a.seccomp.seccomp_filter.as_deref())?;
    // Bound here (names resolved, the socket path made); the source's data
    // is taken in on a thread of the migration seccomp kind.
    let listener = Arc::new(
        at.listen()
            .map_err(|e| anyhow::anyhow!("migrate receive: {e}"))?,
    );
    eprintln!("kiln: waiting for a migration on {}", listener.endpoint());
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let on_thread = listener.clone();
    let thread = kiln_seccomp::spawn(
        kiln_seccomp::ThreadKind::Migration,
        "kiln_migrate".into(),
        move || {
            let r = on_thread.accept().map_err(|e| (None, e)).and_then(|mut s| {
                let t = Instant::now();
                match migration::receive(&mut s) {
                    Ok(got) => Ok((s, got, t)),
                    Err(e) => Err((Some(s), e)),
                }
            });
            drop(on_thread);
            let _ = tx.send(r);
        },
    )
    .map_err(|e| anyhow::anyhow!("migrate receive: starting the migration thread: {e}"))?;
    let received = rx.recv();
    let _ = thread.join();
    drop(listener); // one migration per process (a Unix socket is removed here)
    let (mut stream, got, t) = match received {
        Ok(Ok(r)) => r,
        Ok(Err((None, e))) => anyhow::bail!("migrate receive: {e}"),
        Ok(Err((Some(_), e))) => {
            anyhow::bail!("migrate receive: {e}; nothing was started")
        }
        Err(_) => anyhow::bail!("migrate receive: the migration thread ended without an answer"),
    };
    log::info!(
        "received {} MiB of guest memory in {} rounds in {:?}",
        got.bytes >> 20,
        got.rounds,
        t.elapsed()
    );

    let built = (|| -> Result<(Vmm, VmResources)> {
        let mut res = VmResources::from_json(&got.state.config)
            .map_err(|e| anyhow::anyhow!("the migrated configuration is unusable: {e}"))?;
        apply_overrides(&mut res, &net_overrides, vsock_override.as_ref())?;
        let config = crate::vmm_cmd::vm_config_of(&res, false)?;
        let vmm = Vmm::restore_with_memory(
            config,
            &got.state,
            got.mem,
            Box::new(std::io::stdout()),
            start,
        )?;
        // Held until the source has the Ack: the guest never runs twice.
        vmm.handle().hold_paused().map_err(|e| anyhow::anyhow!(e))?;
        Ok((vmm, res))
    })();
    let (mut vmm, res) = built
        .map_err(|e| refuse(&mut stream, e))
        .map_err(|e| anyhow::anyhow!("migrate receive: {e:#}; nothing was started"))?;

    let _socket = crate::snapshot_cmd::serve_running_api(a.api_sock.as_deref(), &vmm, &res)?;

    let handle = vmm.handle();
    let ack_failed = Arc::new(AtomicBool::new(false));
    let failed = ack_failed.clone();
    let stream = Mutex::new(stream);
    let stdin = crate::term::prepare_stdin();
    let reason = vmm.run_notify(stdin, move || {
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
    Ok(crate::exit_status(reason))
}
