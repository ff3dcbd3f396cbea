//! Live migration: the source side (`PUT /migrate`, through
//! [`crate::RunningVm`]) and the destination's transfer (`kiln migrate
//! receive`, which then builds the VM with
//! [`crate::Controller::from_migration`]). See docs/migration.md.

use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_api::migrate::{MigrateParams, MigrationReport};
use kiln_vmm::migration::{self, Endpoint, Listener, Received, SendError, SendOptions, Stream};
use kiln_vmm::VmHandle;

use crate::error::{MigrateError, ReceiveError};

/// Migrates the VM of `handle` as `PUT /migrate` asks (called on the API
/// thread; the migration itself runs on a thread of the migration seccomp
/// kind, the only one that may open TCP sockets). `config` is the VM's
/// configuration (JSON). Returns once the destination runs it; on failure
/// the VM runs here.
pub fn send(
    handle: &VmHandle,
    config: &str,
    p: &MigrateParams,
) -> Result<MigrationReport, MigrateError> {
    let to: Endpoint = p.destination.parse().map_err(MigrateError::Destination)?;
    if p.max_rounds == 0 {
        return Err(MigrateError::MaxRounds);
    }
    if kiln_seccomp::enabled() && !to.is_literal() {
        return Err(MigrateError::NeedsAddress(to.to_string()));
    }
    let opts = SendOptions {
        downtime: Duration::from_millis(p.downtime_ms),
        max_rounds: p.max_rounds,
    };
    let (handle, config) = (handle.clone(), config.to_string());
    let (tx, rx) = sync_channel(1);
    let thread = kiln_seccomp::spawn(
        kiln_seccomp::ThreadKind::Migration,
        "kiln_migrate".into(),
        move || {
            let _ = tx.send(send_on_this_thread(&handle, &config, &to, &opts));
        },
    )
    .map_err(MigrateError::Thread)?;
    let r = rx.recv().unwrap_or(Err(MigrateError::NoAnswer));
    let _ = thread.join();
    r
}

fn send_on_this_thread(
    handle: &VmHandle,
    config: &str,
    to: &Endpoint,
    opts: &SendOptions,
) -> Result<MigrationReport, MigrateError> {
    let fail = |error: String| MigrateError::Failed {
        to: to.to_string(),
        error,
    };
    let mut stream = to.connect().map_err(fail)?;
    log::info!("migrating to {to}");
    let stats = handle
        .migrate_send(&mut stream, config, opts)
        .map_err(|e| match e {
            SendError::Failed(e) => fail(e),
            SendError::InDoubt(error) => MigrateError::InDoubt {
                to: to.to_string(),
                error,
            },
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

/// A migration taken in: the source's connection (for the Ack), what it
/// sent, and when it connected.
pub struct Incoming {
    /// The connection to the source.
    pub stream: Stream,
    /// The VM's state and memory.
    pub received: Received,
    /// When the source connected.
    pub since: Instant,
}

/// Waits on `listener` for one source and takes its VM in, on a thread of
/// the migration seccomp kind. On a transfer failure the source is told
/// nothing runs here.
pub fn receive(listener: Arc<Listener>) -> Result<Incoming, ReceiveError> {
    let (tx, rx) = sync_channel(1);
    let thread = kiln_seccomp::spawn(
        kiln_seccomp::ThreadKind::Migration,
        "kiln_migrate".into(),
        move || {
            let r = listener
                .accept()
                .map_err(ReceiveError::Accept)
                .and_then(|mut stream| {
                    let since = Instant::now();
                    match migration::receive(&mut stream) {
                        Ok(received) => Ok(Incoming {
                            stream,
                            received,
                            since,
                        }),
                        Err(e) => Err(ReceiveError::Transfer(e)),
                    }
                });
            drop(listener);
            let _ = tx.send(r);
        },
    )
    .map_err(ReceiveError::Thread)?;
    let r = rx.recv().unwrap_or(Err(ReceiveError::NoAnswer));
    let _ = thread.join();
    r
}

/// Tells the source why nothing will run here.
pub fn refuse(stream: &mut Stream, why: &str) {
    let _ = kiln_snapshot::migration::send(
        stream,
        &kiln_snapshot::migration::Message::Error(why.to_string()),
    );
}
