//! `kiln uffd-handler`: a page-fault handler for restores with Firecracker's
//! `Uffd` memory backend (Kiln's or Firecracker's VMM).
//!
//! It listens on a Unix socket, takes one VMM's connection (the socket path
//! is removed then), receives the userfaultfd and the memory regions, and
//! serves the VM's missing pages from the memory file until the VMM
//! disconnects (see kiln_vmm::uffd_handler).

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use kiln_vmm::uffd;
use kiln_vmm::uffd_handler::{PageServer, WorkingSet};

/// Options of `kiln uffd-handler`.
#[derive(Args, Debug)]
pub struct UffdHandlerArgs {
    /// The Unix socket to listen on (`backend_path` of the Uffd backend).
    #[arg(long, value_name = "PATH")]
    sock: PathBuf,
    /// The snapshot's memory file.
    #[arg(long, value_name = "PATH")]
    mem_file: PathBuf,
    /// Record the working set (the memory file's pages in first-fault
    /// order) to this file.
    #[arg(long, value_name = "WS", conflicts_with = "prefetch")]
    record: Option<PathBuf>,
    /// Copy the pages of this recorded working set in as soon as the VMM
    /// connects, before they are touched (faults are served meanwhile).
    #[arg(long, value_name = "WS")]
    prefetch: Option<PathBuf>,
}

/// `kiln uffd-handler`: 0 once the VMM it served has gone.
pub fn uffd_handler(args: UffdHandlerArgs) -> Result<i32> {
    let t0 = Instant::now();
    // Bad arguments fail before anything listens.
    std::fs::File::open(&args.mem_file)
        .with_context(|| format!("memory file {}", args.mem_file.display()))?;
    let prefetch = args.prefetch.as_deref().map(WorkingSet::read).transpose()?;
    match std::fs::symlink_metadata(&args.sock) {
        Ok(m) if m.file_type().is_socket() => {
            // A stale socket: a live handler on it would answer.
            if std::os::unix::net::UnixStream::connect(&args.sock).is_ok() {
                anyhow::bail!("{}: another handler listens there", args.sock.display());
            }
            std::fs::remove_file(&args.sock)
                .with_context(|| format!("removing stale socket {}", args.sock.display()))?;
        }
        Ok(_) => anyhow::bail!("{}: exists and is not a socket", args.sock.display()),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(&args.sock).with_context(|| format!("{}", args.sock.display()))?;
    log::info!("uffd-handler: listening on {}", args.sock.display());
    let (stream, _) = listener
        .accept()
        .with_context(|| format!("{}: accept", args.sock.display()))?;
    // One VM per handler: nobody else may connect to a served socket.
    drop(listener);
    let _ = std::fs::remove_file(&args.sock);
    let (uffd_fd, regions) = uffd::receive(&stream)?;
    let accepted = t0.elapsed();
    let mut server = PageServer::new(uffd_fd, &regions, &args.mem_file, args.record.as_deref())?;
    if let Some(ws) = &prefetch {
        server.prefetch(ws)?;
    }
    server.serve(Some(&stream))?;
    eprintln!(
        "kiln uffd-handler: {} regions, {} MiB; {}{}",
        regions.len(),
        regions.iter().map(|r| r.size).sum::<u64>() >> 20,
        server.stats,
        args.record
            .as_ref()
            .map(|w| format!(" to {}", w.display()))
            .unwrap_or_default()
    );
    log::debug!("uffd-handler: VMM connected after {accepted:?}");
    Ok(0)
}
