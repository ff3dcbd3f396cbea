//! OCI images to read-only root file systems for Kiln microVMs.
//!
//! No registry and no device-mapper: [`Image::open`] reads an OCI image
//! layout directory, or an `oci-layout` tar archive (as `umoci` or
//! `skopeo copy ... oci-archive:` write), picks the manifest from its
//! `index.json` (the only one, or the one whose
//! `org.opencontainers.image.ref.name` annotation matches), and parses the
//! image config. [`Image::build_rootfs`] applies the layers in order
//! (tar or tar+gzip, with `.wh.` whiteouts and `.wh..wh..opq` opaque
//! directories) into a staging directory and packs it with `mkfs.erofs`
//! into a block image, cached by the digest of the layer chain: a second
//! build of the same image reuses the file, and concurrent builders never
//! see a half-written one (each builds into its own temporary file and
//! renames it into place). [`Image::process`] turns the config's
//! Entrypoint, Cmd, Env, WorkingDir and User (or a command given instead)
//! into the [`Process`] the guest runs; [`spec`] is how it travels to the
//! guest.

mod build;
mod layout;
pub mod spec;
mod unpack;

use std::path::{Path, PathBuf};

pub use build::{chain_digest, BUILDER_VERSION};
pub use layout::{ContainerConfig, Descriptor, Image};
pub use spec::Process;
pub use unpack::apply_layer;

/// What can go wrong turning an image into a root file system.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// The path does not exist or cannot be opened.
    #[error("{path}: {error}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// Why it could not be opened.
        error: std::io::Error,
    },
    /// Neither an OCI image layout directory nor an oci-layout archive.
    #[error("{path}: not an OCI image ({why})")]
    NotOci {
        /// The image path.
        path: PathBuf,
        /// What is missing or wrong.
        why: String,
    },
    /// The archive ends in the middle of an entry.
    #[error("{path}: the archive is truncated ({why})")]
    Truncated {
        /// The archive.
        path: PathBuf,
        /// Where it ends.
        why: String,
    },
    /// A blob the image refers to is missing.
    #[error("{path}: blob {digest} ({what}) is missing")]
    MissingBlob {
        /// The image path.
        path: PathBuf,
        /// The blob's digest.
        digest: String,
        /// What it should hold.
        what: &'static str,
    },
    /// A blob's content does not match its digest or size.
    #[error("{path}: blob {digest} ({what}) is corrupt: {why}")]
    BadBlob {
        /// The image path.
        path: PathBuf,
        /// The blob's digest.
        digest: String,
        /// What it should hold.
        what: &'static str,
        /// The mismatch.
        why: String,
    },
    /// No manifest to run (empty index, or no manifest with the asked name).
    #[error("{path}: {why}")]
    NoManifest {
        /// The image path.
        path: PathBuf,
        /// Which manifest is missing.
        why: String,
    },
    /// A JSON document of the image does not parse.
    #[error("{path}: {what}: {error}")]
    Json {
        /// The image path.
        path: PathBuf,
        /// Which document.
        what: String,
        /// The parse error.
        error: serde_json::Error,
    },
    /// Something in the image Kiln does not handle (yet).
    #[error("{path}: {why}")]
    Unsupported {
        /// The image path.
        path: PathBuf,
        /// What.
        why: String,
    },
    /// The image gives no command and none was given.
    #[error("{path}: the image has no Entrypoint or Cmd; give the command after `--`")]
    NoCommand {
        /// The image path.
        path: PathBuf,
    },
    /// The image's User is not one Kiln can apply without a user database.
    #[error("{path}: user {user:?}: only numeric UID[:GID] or root is supported")]
    User {
        /// The image path.
        path: PathBuf,
        /// The User field.
        user: String,
    },
    /// A layer could not be applied.
    #[error("{path}: layer {digest}: {why}")]
    Layer {
        /// The image path.
        path: PathBuf,
        /// The layer's digest.
        digest: String,
        /// What went wrong.
        why: String,
    },
    /// `mkfs.erofs` is not installed.
    #[error("`mkfs.erofs` not found: install erofs-utils (scripts/setup.sh does)")]
    NoMkfs,
    /// `mkfs.erofs` failed.
    #[error("mkfs.erofs failed ({status}): {stderr}")]
    Mkfs {
        /// Its exit status.
        status: String,
        /// Its standard error.
        stderr: String,
    },
    /// Any other I/O failure.
    #[error("{context}: {error}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        error: std::io::Error,
    },
}

/// Attaches what was being done to an I/O error.
pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
    let context = context.into();
    move |error| OciError::Io { context, error }
}

/// Where built root file systems are cached: `<dir>/<chain digest>.erofs`.
pub fn default_cache_dir(kiln_cache: &Path) -> PathBuf {
    kiln_cache.join("oci")
}
