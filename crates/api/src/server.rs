//! The API server: one thread accepting on a Unix socket and serving its
//! connections one after another (keep-alive, with an idle timeout so one
//! client cannot hold the API forever).

use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::http::{read_request, HttpError, Response};
use crate::router::route;
use crate::{VmControl, DEFAULT_MAX_PAYLOAD};

/// How long an idle keep-alive connection is kept before closing it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Something that is not a socket is in the way.
    #[error("--api-sock {0}: the path exists and is not a socket")]
    NotASocket(PathBuf),
    /// A stale socket could not be removed.
    #[error("--api-sock {path}: cannot remove the stale socket: {source}")]
    Remove {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// bind(2) failed.
    #[error("--api-sock {path}: cannot listen: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The thread could not be started.
    #[error("cannot start the API thread: {0}")]
    Spawn(io::Error),
}

/// A bound API socket, not serving yet.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    max_payload: usize,
}

impl ApiServer {
    /// Listens on `path`, replacing a stale socket there. Anything else at
    /// `path` is an error (it is never removed).
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        if Self::check_path(path)? {
            std::fs::remove_file(path).map_err(|source| ServerError::Remove {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            max_payload: DEFAULT_MAX_PAYLOAD,
        })
    }

    /// Fails if something other than a socket is at `path`; tells whether a
    /// (stale) socket is there.
    pub fn check_path(path: &Path) -> Result<bool, ServerError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => Ok(true),
            Ok(_) => Err(ServerError::NotASocket(path.to_path_buf())),
            Err(_) => Ok(false),
        }
    }

    /// Changes the largest accepted body.
    pub fn max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves forever on a new thread named `kiln_api`.
    pub fn spawn(self, vm: Arc<dyn VmControl>) -> Result<JoinHandle<()>, ServerError> {
        std::thread::Builder::new()
            .name("kiln_api".into())
            .spawn(move || self.serve(vm.as_ref()))
            .map_err(ServerError::Spawn)
    }

    /// Accepts and serves connections, one at a time, forever.
    pub fn serve(&self, vm: &dyn VmControl) {
        for conn in self.listener.incoming() {
            let stream = match conn {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("api: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            if let Err(e) = stream.set_read_timeout(Some(IDLE_TIMEOUT)) {
                log::warn!("api: {e}");
            }
            let reader = match stream.try_clone() {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("api: {e}");
                    continue;
                }
            };
            serve_connection(reader, &stream, vm, self.max_payload);
        }
    }
}

/// Serves the requests of one connection until the client closes it, asks
/// to close it, or sends something unparseable (answered with 400 first).
pub fn serve_connection(
    reader: impl Read,
    mut writer: impl Write,
    vm: &dyn VmControl,
    max_payload: usize,
) {
    let mut reader = BufReader::new(reader);
    loop {
        let (resp, keep_alive) = match read_request(&mut reader, &mut writer, max_payload) {
            Ok(None) => return,
            Ok(Some(req)) => {
                log::debug!("api: {} {}", req.method, req.path);
                (route(&req, vm), req.keep_alive)
            }
            Err(HttpError::Io(e)) => {
                if !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    log::debug!("api: connection error: {e}");
                }
                return;
            }
            Err(e) => (Response::bad_request(e.to_string()), false),
        };
        if resp.status >= 400 {
            log::info!(
                "api: {} {}",
                resp.status,
                resp.body.as_deref().unwrap_or("")
            );
        }
        if let Err(e) = resp.write_to(&mut writer, !keep_alive) {
            crate::metrics::API_METRICS.response_failed();
            log::debug!("api: cannot write the response: {e}");
            return;
        }
        if !keep_alive {
            return;
        }
    }
}
