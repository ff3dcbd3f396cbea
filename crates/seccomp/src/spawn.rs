//! Starting threads that install their filter first, through a spawner
//! thread when the caller is itself filtered (see the crate documentation).

use std::io;
use std::sync::mpsc::{channel, sync_channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;

use crate::{Error, ThreadKind};

/// Work for a spawner: a closure that starts one thread.
type Job = Box<dyn FnOnce() + Send>;

/// The device spawner ([`ThreadKind::Spawner`]).
static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();
/// The migration spawner ([`ThreadKind::MigrationSpawner`]).
static MIGRATION_SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

fn slot(spawner: ThreadKind) -> Option<&'static OnceLock<Mutex<Sender<Job>>>> {
    match spawner {
        ThreadKind::Spawner => Some(&SPAWNER),
        ThreadKind::MigrationSpawner => Some(&MIGRATION_SPAWNER),
        _ => None,
    }
}

/// Starts the spawner thread of kind `kind` (from [`crate::init`], on an
/// unfiltered thread); returns once its filter is installed.
pub(crate) fn start_spawner(kind: ThreadKind) -> io::Result<()> {
    let slot = slot(kind).ok_or_else(|| io::Error::other("not a spawner kind"))?;
    let (jobs, rx) = channel::<Job>();
    let (ready_tx, ready) = sync_channel::<Result<(), Error>>(1);
    let name = match kind {
        ThreadKind::Spawner => "kiln_spawner",
        _ => "kiln_mig_spawn",
    };
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let installed = crate::apply(kind);
            let ok = installed.is_ok();
            let _ = ready_tx.send(installed);
            if !ok {
                return;
            }
            while let Ok(job) = rx.recv() {
                job();
            }
        })?;
    match ready.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(io::Error::other(e.to_string())),
        Err(_) => return Err(io::Error::other("the spawner thread ended")),
    }
    let _ = slot.set(Mutex::new(jobs));
    Ok(())
}

/// Spawns thread `name` running `f` under `kind`'s filter, installed
/// before `f` starts. Returns an error if the thread could not be started
/// or its filter not installed (then `f` never runs). From a filtered
/// thread, the spawner of `kind` ([`crate::spawner_for`]) starts it, so
/// that it does not inherit the caller's filter; a kind without a spawner
/// cannot be started from a filtered thread (an error).
pub fn spawn<F>(kind: ThreadKind, name: String, f: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let (result_tx, result) = sync_channel::<io::Result<JoinHandle<()>>>(1);
    let job = move || {
        let (installed_tx, installed) = sync_channel::<Result<(), Error>>(1);
        let spawned = std::thread::Builder::new().name(name).spawn(move || {
            let r = crate::apply(kind);
            let ok = r.is_ok();
            let _ = installed_tx.send(r);
            if ok {
                f();
            }
        });
        let r = spawned.and_then(|handle| match installed.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(io::Error::other(e.to_string())),
            Err(_) => Err(io::Error::other("the new thread ended before its filter")),
        });
        let _ = result_tx.send(r);
    };
    let caller = crate::current();
    let spawner = crate::spawner_for(kind)
        .and_then(slot)
        .and_then(OnceLock::get);
    match (caller, spawner) {
        (None, _) => job(),
        (Some(_), Some(spawner)) => {
            spawner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(Box::new(job))
                .map_err(|_| io::Error::other("the spawner thread has stopped"))?;
        }
        // Started directly it would run under the caller's filter too,
        // which does not allow what it does.
        (Some(caller), None) => {
            return Err(io::Error::other(format!(
                "a {} thread cannot be started from a filtered {} thread",
                kind.name(),
                caller.name()
            )))
        }
    }
    result
        .recv()
        .map_err(|_| io::Error::other("the spawner thread has stopped"))?
}
