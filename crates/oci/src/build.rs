//! Root file system images: the layers applied into a staging directory,
//! packed read-only with `mkfs.erofs`, cached by the layer chain's digest.

use std::fs;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::layout::{hex, layer_compression, Descriptor, Image};
use crate::{io_err, OciError};

/// Bump when the image format changes (it is part of the cache key).
pub const BUILDER_VERSION: u32 = 1;

/// The cache key of a layer chain (hex SHA-256 over the builder version
/// and the layers' digests, bottom first).
pub fn chain_digest(layers: &[Descriptor]) -> String {
    let mut h = Sha256::new();
    h.update(format!("kiln-oci erofs v{BUILDER_VERSION}\n"));
    for l in layers {
        h.update(l.digest.as_bytes());
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// A built (or reused) root file system image.
#[derive(Debug, Clone)]
pub struct Rootfs {
    /// The erofs image file.
    pub path: PathBuf,
    /// Whether it came from the cache.
    pub reused: bool,
}

/// Temporary paths removed on drop (a failed or interrupted build leaves
/// nothing behind).
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_dir_all(p).or_else(|_| fs::remove_file(p));
        }
    }
}

/// `$PATH` plus the sbin directories (where mkfs tools live).
fn tool_path() -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        if !dirs.iter().any(|x| x == Path::new(d)) {
            dirs.push(d.into());
        }
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

impl Image {
    /// The image's root file system as an erofs image in `cache_dir`,
    /// built unless a previous build of the same layer chain is there.
    pub fn build_rootfs(&self, cache_dir: &Path) -> Result<Rootfs, OciError> {
        let key = chain_digest(&self.layers);
        let path = cache_dir.join(format!("{key}.erofs"));
        if path.is_file() {
            return Ok(Rootfs { path, reused: true });
        }
        fs::create_dir_all(cache_dir)
            .map_err(io_err(format!("creating {}", cache_dir.display())))?;
        static N: AtomicU64 = AtomicU64::new(0);
        let tag = format!(
            "tmp-{}-{}-{}",
            &key[..16],
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let stage = cache_dir.join(format!("{tag}.d"));
        let tmp = cache_dir.join(format!("{tag}.erofs"));
        let _scratch = Scratch(vec![stage.clone(), tmp.clone()]);
        fs::create_dir(&stage).map_err(io_err(format!("creating {}", stage.display())))?;
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&stage, fs::Permissions::from_mode(0o755))
                .map_err(io_err(format!("chmod {}", stage.display())))?;
        }
        for l in &self.layers {
            self.apply(l, &stage)?;
        }
        mkfs_erofs(&stage, &tmp, &key)?;
        fs::rename(&tmp, &path).map_err(io_err(format!("renaming {}", tmp.display())))?;
        Ok(Rootfs {
            path,
            reused: false,
        })
    }

    /// Applies layer `l` onto `stage`, verifying its digest.
    fn apply(&self, l: &Descriptor, stage: &Path) -> Result<(), OciError> {
        let err = |why: String| OciError::Layer {
            path: self.path().to_path_buf(),
            digest: l.digest.clone(),
            why,
        };
        let gzip = layer_compression(l).map_err(err)?;
        // Verify the blob first (a corrupt or truncated layer must not be
        // half applied and then cached).
        self.open_blob(l, "layer")?
            .finish(l)
            .map_err(|why| OciError::BadBlob {
                path: self.path().to_path_buf(),
                digest: l.digest.clone(),
                what: "layer",
                why,
            })?;
        let open = || -> io::Result<Box<dyn Read>> {
            let blob = self.open_blob(l, "layer").map_err(io::Error::other)?;
            let r = BufReader::with_capacity(1 << 16, blob);
            Ok(if gzip {
                Box::new(flate2::read::GzDecoder::new(r))
            } else {
                Box::new(r)
            })
        };
        crate::apply_layer(stage, open).map_err(err)
    }
}

/// Packs `dir` into the erofs image `out` (uncompressed; UUID from `key`).
fn mkfs_erofs(dir: &Path, out: &Path, key: &str) -> Result<(), OciError> {
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        &key[0..8],
        &key[8..12],
        &key[12..16],
        &key[16..20],
        &key[20..32]
    );
    let mut cmd = Command::new("mkfs.erofs");
    cmd.arg("--quiet")
        .arg("-x-1")
        .arg(format!("-U{uuid}"))
        .env("PATH", tool_path());
    if !crate::unpack::can_chown() {
        // Not root: the staged files are ours; an image's are root's.
        cmd.arg("--all-root");
    }
    cmd.arg(out).arg(dir);
    let o = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(OciError::NoMkfs),
        Err(e) => return Err(io_err("running mkfs.erofs")(e)),
    };
    if !o.status.success() {
        return Err(OciError::Mkfs {
            status: o.status.to_string(),
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        });
    }
    Ok(())
}
