//! Reproducible guest and lab-host images built from pinned Debian packages.
//!
//! [`ensure`] downloads the pinned `.deb` files with `apt-get download`,
//! verifies their SHA-256, extracts them with `dpkg-deb -x` and builds two
//! initramfs images with the crate's own cpio writer:
//!
//! * the **guest initramfs** (booted by the Kiln VMM as the L2 guest), and
//! * the **lab initramfs** (booted by QEMU/TCG with emulated AMD-V; it loads
//!   KVM and carries the guest kernel and guest initramfs under `/images`).
//!
//! Everything is cached under a cache directory and rebuilt only when the
//! stamp (a hash of the pinned inputs, the init scripts and
//! [`BUILDER_VERSION`]) changes.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::cpio::CpioWriter;
use crate::scripts;

/// Bump when the image layout changes in a way the stamp cannot see.
pub const BUILDER_VERSION: u32 = 1;

/// A Debian package pinned by name, version and SHA-256 of the `.deb`.
#[derive(Debug, Clone, Copy)]
pub struct Pinned {
    /// Package name.
    pub name: &'static str,
    /// Exact Debian version.
    pub version: &'static str,
    /// Lower-case hex SHA-256 of the `.deb` file.
    pub sha256: &'static str,
}

/// The pinned kernel package (used for both the lab host and the guest).
pub const KERNEL_PACKAGE: Pinned = Pinned {
    name: "linux-image-6.1.0-50-cloud-amd64",
    version: "6.1.176-1",
    sha256: "efe19f605b6f54a8352e68d85a629abb2d30b72a085faef603a9152590baa791",
};

/// The pinned busybox package.
pub const BUSYBOX_PACKAGE: Pinned = Pinned {
    name: "busybox-static",
    version: "1:1.35.0-4+deb12u1+b1",
    sha256: "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744",
};

/// Kernel version string of [`KERNEL_PACKAGE`].
pub const KERNEL_VERSION: &str = "6.1.0-50-cloud-amd64";

/// Paths of the cached images and the extracted inputs.
#[derive(Debug, Clone)]
pub struct Images {
    /// The kernel bzImage (same kernel for lab host and guest).
    pub kernel: PathBuf,
    /// Guest initramfs (uncompressed newc cpio).
    pub initramfs: PathBuf,
    /// Lab-host initramfs (uncompressed newc cpio).
    pub lab_initramfs: PathBuf,
    /// `uname -r` of the kernel.
    pub kernel_version: String,
    /// Extracted `/lib/modules/<version>` directory.
    pub modules_dir: PathBuf,
    /// Extracted static busybox binary.
    pub busybox: PathBuf,
}

/// Errors from building or fetching images.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A required host tool is not installed.
    #[error("`{tool}` not found: {hint}")]
    ToolMissing {
        /// Tool name.
        tool: &'static str,
        /// How to install it.
        hint: &'static str,
    },
    /// A host command exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its standard error (trimmed).
        stderr: String,
    },
    /// A downloaded package does not have the pinned checksum.
    #[error("checksum mismatch for {package} ({path}): expected sha256 {expected}, got {actual}")]
    ChecksumMismatch {
        /// `name=version`.
        package: String,
        /// The offending file.
        path: PathBuf,
        /// Pinned checksum.
        expected: String,
        /// Actual checksum.
        actual: String,
    },
    /// A file expected inside an extracted package is missing.
    #[error("{what} not found at {path} (package {package})")]
    MissingInPackage {
        /// What was looked for.
        what: String,
        /// Where it was expected.
        path: PathBuf,
        /// The package.
        package: &'static str,
    },
    /// Any other I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Attaches a context string to an I/O error.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ImageError> {
        self.map_err(|source| ImageError::Io {
            context: context(),
            source,
        })
    }
}

/// Cache directory: `$KILN_CACHE_DIR`, else `<workspace>/.cache/kiln`.
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os("KILN_CACHE_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            // crates/lab -> workspace root.
            let root = manifest.ancestors().nth(2).unwrap_or(manifest);
            root.join(".cache/kiln")
        }
    }
}

/// Hex SHA-256 of a file.
pub(crate) fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An exclusive `flock` on a file, released on drop (when the file closes).
struct CacheLock(#[allow(dead_code)] File);

impl CacheLock {
    fn acquire(path: &Path) -> Result<Self, ImageError> {
        let f = File::create(path).ctx(|| format!("creating lock file {}", path.display()))?;
        // SAFETY: flock only operates on the valid, open descriptor owned by `f`.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io::Error::last_os_error()).ctx(|| format!("locking {}", path.display()));
        }
        Ok(Self(f))
    }
}

/// Runs a command, mapping "not found" and failures to clear errors.
fn run_tool(cmd: &mut Command, tool: &'static str, hint: &'static str) -> Result<(), ImageError> {
    let desc = format!("{cmd:?}");
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImageError::ToolMissing { tool, hint })
        }
        Err(e) => return Err(e).ctx(|| format!("running {desc}")),
    };
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            command: desc,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Directory a package is extracted to (content-addressed by its checksum).
fn extract_dir(cache: &Path, p: &Pinned) -> PathBuf {
    cache
        .join("extract")
        .join(format!("{}-{}", p.name, &p.sha256[..16]))
}

/// Makes sure the pinned package is downloaded, verified and extracted.
fn ensure_package(cache: &Path, p: &Pinned) -> Result<PathBuf, ImageError> {
    let dest = extract_dir(cache, p);
    if dest.is_dir() {
        return Ok(dest);
    }
    let spec = format!("{}={}", p.name, p.version);
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).ctx(|| format!("creating {}", debs.display()))?;
    let deb = debs.join(format!("{}-{}.deb", p.name, &p.sha256[..16]));
    let have = deb.is_file() && sha256_file(&deb).ok().as_deref() == Some(p.sha256);
    if !have {
        eprintln!("kiln-lab: downloading {spec} ...");
        let tmp = debs.join(format!("tmp-{}-{}", p.name, std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        // apt's _apt sandbox user must be able to write here; fall back silently.
        let _ = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o777));
        run_tool(
            Command::new("apt-get")
                .args(["download", "-q", &spec])
                .current_dir(&tmp),
            "apt-get",
            "a Debian/Ubuntu host with apt is required to fetch the pinned packages",
        )?;
        let got = fs::read_dir(&tmp)
            .ctx(|| format!("listing {}", tmp.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| ImageError::MissingInPackage {
                what: format!(".deb downloaded by `apt-get download {spec}`"),
                path: tmp.clone(),
                package: p.name,
            })?;
        let actual = sha256_file(&got).ctx(|| format!("hashing {}", got.display()))?;
        if actual != p.sha256 {
            return Err(ImageError::ChecksumMismatch {
                package: spec,
                path: got,
                expected: p.sha256.to_string(),
                actual,
            });
        }
        fs::rename(&got, &deb).ctx(|| format!("moving {} into cache", got.display()))?;
        let _ = fs::remove_dir_all(&tmp);
    }
    eprintln!("kiln-lab: extracting {spec} ...");
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    run_tool(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp),
        "dpkg-deb",
        "install dpkg",
    )?;
    fs::rename(&tmp, &dest).ctx(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    Ok(dest)
}

/// The stamp that identifies the current image inputs.
fn stamp() -> String {
    let mut h = Sha256::new();
    h.update(format!("builder {BUILDER_VERSION}\n"));
    for p in [KERNEL_PACKAGE, BUSYBOX_PACKAGE] {
        h.update(format!("{} {} {}\n", p.name, p.version, p.sha256));
    }
    h.update(scripts::guest_init(KERNEL_VERSION));
    h.update(scripts::LAB_INIT_STAGE1);
    h.update(scripts::lab_init_stage2(KERNEL_VERSION));
    for m in scripts::GUEST_MODULES.iter().chain(scripts::LAB_MODULES) {
        h.update(m);
    }
    hex(&h.finalize())
}

/// Computes the image paths for a cache directory (without building).
fn paths(cache: &Path) -> Images {
    let k = extract_dir(cache, &KERNEL_PACKAGE);
    let b = extract_dir(cache, &BUSYBOX_PACKAGE);
    Images {
        kernel: k.join(format!("boot/vmlinuz-{KERNEL_VERSION}")),
        initramfs: cache.join("images/guest-initramfs.img"),
        lab_initramfs: cache.join("images/lab-initramfs.img"),
        kernel_version: KERNEL_VERSION.to_string(),
        modules_dir: k.join(format!("lib/modules/{KERNEL_VERSION}")),
        busybox: b.join("bin/busybox"),
    }
}

/// Downloads, verifies and builds everything needed, reusing the cache.
pub fn ensure(cache_dir: &Path) -> Result<Images, ImageError> {
    fs::create_dir_all(cache_dir.join("images"))
        .ctx(|| format!("creating cache dir {}", cache_dir.display()))?;
    let _lock = CacheLock::acquire(&cache_dir.join("lock"))?;
    let images = paths(cache_dir);
    let stamp_path = cache_dir.join("images/stamp");
    let want = stamp();
    let fresh = fs::read_to_string(&stamp_path).is_ok_and(|s| s.trim() == want)
        && [
            &images.kernel,
            &images.initramfs,
            &images.lab_initramfs,
            &images.busybox,
        ]
        .iter()
        .all(|p| p.is_file());
    if fresh {
        return Ok(images);
    }
    let _ = fs::remove_file(&stamp_path);
    ensure_package(cache_dir, &KERNEL_PACKAGE)?;
    ensure_package(cache_dir, &BUSYBOX_PACKAGE)?;
    for (what, p, pkg) in [
        ("kernel", &images.kernel, KERNEL_PACKAGE.name),
        ("busybox", &images.busybox, BUSYBOX_PACKAGE.name),
    ] {
        if !p.is_file() {
            return Err(ImageError::MissingInPackage {
                what: what.into(),
                path: p.clone(),
                package: pkg,
            });
        }
    }
    let applets = busybox_applets(&images.busybox)?;

    eprintln!(
        "kiln-lab: building guest initramfs {} ...",
        images.initramfs.display()
    );
    write_atomic(&images.initramfs, |w| {
        base_tree(w, &images, &applets)?;
        add_modules(w, &images, scripts::GUEST_MODULES)?;
        w.file(
            "init",
            0o755,
            scripts::guest_init(KERNEL_VERSION).as_bytes(),
        )
        .ctx(|| "writing /init".into())
    })?;

    eprintln!(
        "kiln-lab: building lab initramfs {} ...",
        images.lab_initramfs.display()
    );
    write_atomic(&images.lab_initramfs, |w| {
        base_tree(w, &images, &applets)?;
        add_modules(w, &images, scripts::LAB_MODULES)?;
        w.file_from_host("images/vmlinuz", 0o644, &images.kernel)
            .ctx(|| format!("adding {}", images.kernel.display()))?;
        w.file_from_host("images/initramfs.img", 0o644, &images.initramfs)
            .ctx(|| format!("adding {}", images.initramfs.display()))?;
        w.file("init", 0o755, scripts::LAB_INIT_STAGE1.as_bytes())
            .ctx(|| "writing /init".into())?;
        w.file(
            "kiln/lab-init",
            0o755,
            scripts::lab_init_stage2(KERNEL_VERSION).as_bytes(),
        )
        .ctx(|| "writing /kiln/lab-init".into())
    })?;
    fs::write(&stamp_path, format!("{want}\n"))
        .ctx(|| format!("writing {}", stamp_path.display()))?;
    Ok(images)
}

/// Lists busybox applet paths (e.g. `usr/bin/env`) by running the binary.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>, ImageError> {
    let out = Command::new(busybox)
        .arg("--list-full")
        .output()
        .ctx(|| format!("running {} --list-full", busybox.display()))?;
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            command: format!("{} --list-full", busybox.display()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        });
    }
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| l.contains('/') && l != "bin/busybox")
        .collect();
    v.sort();
    v.dedup();
    Ok(v)
}

type Cpio<'a> = CpioWriter<BufWriter<&'a mut File>>;

/// Writes a cpio archive to `path` via a temporary file and rename.
fn write_atomic(
    path: &Path,
    build: impl FnOnce(&mut Cpio<'_>) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
    {
        let mut w = CpioWriter::new(BufWriter::new(&mut f));
        build(&mut w)?;
        w.finish().ctx(|| format!("writing {}", tmp.display()))?;
    }
    f.sync_all().ctx(|| format!("syncing {}", tmp.display()))?;
    fs::rename(&tmp, path).ctx(|| format!("renaming {}", tmp.display()))
}

/// Directories, busybox and its applet symlinks, shared by both images.
fn base_tree(w: &mut Cpio<'_>, images: &Images, applets: &[String]) -> Result<(), ImageError> {
    let e = |what: &str| format!("writing {what} into initramfs");
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "root", "run",
    ] {
        w.dir(d, 0o755).ctx(|| e(d))?;
    }
    w.dir("tmp", 0o1777).ctx(|| e("tmp"))?;
    w.file_from_host("bin/busybox", 0o755, &images.busybox)
        .ctx(|| e("busybox"))?;
    for a in applets {
        w.symlink(a, "/bin/busybox").ctx(|| e(a))?;
    }
    Ok(())
}

/// Adds kernel modules (paths relative to the modules dir).
fn add_modules(w: &mut Cpio<'_>, images: &Images, mods: &[&str]) -> Result<(), ImageError> {
    for m in mods {
        let host = images.modules_dir.join(m);
        if !host.is_file() {
            return Err(ImageError::MissingInPackage {
                what: format!("module {m}"),
                path: host,
                package: KERNEL_PACKAGE.name,
            });
        }
        let guest = format!("lib/modules/{}/{m}", images.kernel_version);
        w.file_from_host(&guest, 0o644, &host)
            .ctx(|| format!("adding {}", host.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_is_stable() {
        assert_eq!(stamp(), stamp());
        assert_eq!(stamp().len(), 64);
    }

    #[test]
    fn sha256_of_known_content() {
        let p = std::env::temp_dir().join(format!("kiln-sha-{}", std::process::id()));
        fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        fs::remove_file(&p).unwrap();
    }

    #[test]
    fn paths_live_under_cache() {
        let i = paths(Path::new("/c"));
        assert!(i.kernel.starts_with("/c/extract"));
        assert!(i.kernel.ends_with(format!("boot/vmlinuz-{KERNEL_VERSION}")));
        assert_eq!(i.initramfs, Path::new("/c/images/guest-initramfs.img"));
    }
}
