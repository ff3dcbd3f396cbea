//! Reproducible guest and lab-host images built from pinned Debian packages.
//!
//! [`ensure`] downloads the pinned `.deb` files with `apt-get download`,
//! verifies their SHA-256, extracts them with `dpkg-deb -x` and builds two
//! initramfs images with the crate's own cpio writer and one ext4 image with
//! `mkfs.ext4 -d`:
//!
//! * the **guest initramfs** (booted by the Kiln VMM as the L2 guest),
//! * the **guest rootfs** (a raw ext4 image for virtio-blk: the same busybox,
//!   modules and `/init` as the guest initramfs, plus
//!   [`scripts::ROOTFS_MARKER_FILE`]; the initramfs switches to it when the
//!   kernel command line has `root=/dev/vda`), and
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
pub const BUILDER_VERSION: u32 = 4;

/// Size of the guest rootfs image in bytes (a multiple of 512).
pub const ROOTFS_SIZE: u64 = 64 << 20;
/// Fixed filesystem UUID of the guest rootfs (reproducible images).
pub const ROOTFS_UUID: &str = "6b696c6e-726f-4f74-8673-000000000001";
/// Label of the guest rootfs.
pub const ROOTFS_LABEL: &str = "kiln-root";

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
    /// Guest root filesystem: raw ext4 image of [`ROOTFS_SIZE`] bytes, for
    /// a virtio-blk disk with `root=/dev/vda` on the kernel command line.
    pub rootfs: PathBuf,
    /// The same kernel as an ELF vmlinux (with the PVH note), for PVH boots.
    pub vmlinux: PathBuf,
    /// The in-guest agent (static binary; also in both initramfs images at /usr/bin/kiln-agent).
    pub agent: PathBuf,
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

/// Extracts the ELF `vmlinux` from a bzImage: finds a compressed payload
/// (lz4 legacy, xz, zstd or gzip) and decompresses it with the matching tool,
/// keeping the first candidate that yields an ELF image. The ELF carries the
/// Xen PVH entry note, so it exercises Kiln's PVH boot path.
fn build_vmlinux(bzimage: &Path, dest: &Path) -> Result<(), ImageError> {
    let data = fs::read(bzimage).ctx(|| format!("reading {}", bzimage.display()))?;
    const FORMATS: [(&[u8], &str, &str); 4] = [
        (&[0x02, 0x21, 0x4c, 0x18], "lz4", "lz4"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz", "xz-utils"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd", "zstd"),
        (&[0x1f, 0x8b, 0x08], "gzip", "gzip"),
    ];
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    for (magic, tool, package) in FORMATS {
        let Some(off) = data.windows(magic.len()).position(|w| w == magic) else {
            continue;
        };
        let mut child = match Command::new(tool)
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?)
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(c) => c,
            Err(_) => {
                let _ = fs::remove_file(&tmp);
                return Err(ImageError::ToolMissing {
                    tool: "lz4/xz/zstd",
                    hint: match package {
                        "lz4" => "apt-get install lz4",
                        "xz-utils" => "apt-get install xz-utils",
                        _ => "apt-get install zstd",
                    },
                });
            }
        };
        let mut stdin = child.stdin.take().expect("piped");
        // Trailing bytes after the payload make the tool complain; its
        // output up to there is what we want.
        let _ = std::io::Write::write_all(&mut stdin, &data[off..]);
        drop(stdin);
        let _ = child.wait();
        let head = fs::read(&tmp)
            .map(|d| d.get(..4) == Some(b"\x7fELF".as_slice()))
            .unwrap_or(false);
        if head {
            return fs::rename(&tmp, dest).ctx(|| format!("renaming {}", tmp.display()));
        }
    }
    let _ = fs::remove_file(&tmp);
    Err(ImageError::CommandFailed {
        command: format!("extracting vmlinux from {}", bzimage.display()),
        status: "no compressed ELF payload found".into(),
        stderr: String::new(),
    })
}

/// Source of `kiln-agent`, compiled static with plain `rustc` for guests.
pub const AGENT_SOURCE: &str = include_str!("../../agent/src/main.rs");

/// Compiles the agent as a static, stripped binary at `dest`.
fn build_agent(cache: &Path, dest: &Path) -> Result<(), ImageError> {
    let src = cache.join("images/kiln-agent.rs");
    fs::write(&src, AGENT_SOURCE).ctx(|| format!("writing {}", src.display()))?;
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let tmp = dest.with_extension(format!("tmp{}", std::process::id()));
    let out = Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-C",
            "strip=symbols",
            "-o",
        ])
        .arg(&tmp)
        .arg(&src)
        .output()
        .map_err(|_| ImageError::ToolMissing {
            tool: "rustc",
            hint: "the Rust toolchain is needed to build the in-guest agent",
        })?;
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            command: format!("{} (kiln-agent)", rustc.to_string_lossy()),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    fs::rename(&tmp, dest).ctx(|| format!("renaming {}", tmp.display()))
}

/// The stamp that identifies the current image inputs.
fn stamp() -> String {
    let mut h = Sha256::new();
    h.update(format!("builder {BUILDER_VERSION}\n"));
    for p in [KERNEL_PACKAGE, BUSYBOX_PACKAGE] {
        h.update(format!("{} {} {}\n", p.name, p.version, p.sha256));
    }
    h.update(scripts::guest_init(KERNEL_VERSION));
    h.update(AGENT_SOURCE);
    h.update(scripts::ROOTFS_MARKER_TEXT);
    h.update(format!("{:?}\n", mkfs_args(Path::new("D"), Path::new("I"))));
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
        rootfs: cache.join("images/rootfs.ext4"),
        agent: cache.join("images/kiln-agent"),
        vmlinux: cache.join("images/vmlinux"),
        lab_initramfs: cache.join("images/lab-initramfs.img"),
        kernel_version: KERNEL_VERSION.to_string(),
        modules_dir: k.join(format!("lib/modules/{KERNEL_VERSION}")),
        busybox: b.join("bin/busybox"),
    }
}

/// Fills in the guest kernel and initrd a `kiln` command boots when none
/// was given: `$KILN_KERNEL` (with `$KILN_INITRD`), else Kiln's own
/// images (built on first use, in the default cache).
pub fn resolve_guest(
    kernel: &mut Option<PathBuf>,
    initrd: &mut Option<PathBuf>,
) -> Result<(), ImageError> {
    if kernel.is_none() {
        *kernel = std::env::var_os("KILN_KERNEL").map(PathBuf::from);
        if initrd.is_none() {
            *initrd = std::env::var_os("KILN_INITRD").map(PathBuf::from);
        }
    }
    if kernel.is_none() {
        let images = ensure(&default_cache_dir())?;
        *kernel = Some(images.kernel);
        if initrd.is_none() {
            *initrd = Some(images.initramfs);
        }
    }
    Ok(())
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
            &images.rootfs,
            &images.agent,
            &images.vmlinux,
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
        "kiln-lab: extracting {} from the bzImage ...",
        images.vmlinux.display()
    );
    build_vmlinux(&images.kernel, &images.vmlinux)?;
    eprintln!(
        "kiln-lab: building the in-guest agent {} ...",
        images.agent.display()
    );
    build_agent(cache_dir, &images.agent)?;

    eprintln!(
        "kiln-lab: building guest initramfs {} ...",
        images.initramfs.display()
    );
    write_atomic(&images.initramfs, |w| {
        base_tree(w, &images, &applets)?;
        add_modules(w, &images, scripts::GUEST_MODULES)?;
        add_modules(w, &images, scripts::CONTAINER_MODULES)?;
        w.file_from_host("usr/bin/kiln-agent", 0o755, &images.agent)
            .ctx(|| "adding kiln-agent".into())?;
        w.file(
            scripts::INITRAMFS_MARKER_FILE,
            0o644,
            b"kiln guest initramfs\n",
        )
        .ctx(|| "writing the initramfs marker".into())?;
        w.file(
            "init",
            0o755,
            scripts::guest_init(KERNEL_VERSION).as_bytes(),
        )
        .ctx(|| "writing /init".into())
    })?;

    eprintln!(
        "kiln-lab: building guest rootfs {} ...",
        images.rootfs.display()
    );
    build_rootfs(&images, &applets)?;

    eprintln!(
        "kiln-lab: building lab initramfs {} ...",
        images.lab_initramfs.display()
    );
    write_atomic(&images.lab_initramfs, |w| {
        base_tree(w, &images, &applets)?;
        add_modules(w, &images, scripts::LAB_MODULES)?;
        w.file_from_host("usr/bin/kiln-agent", 0o755, &images.agent)
            .ctx(|| "adding kiln-agent".into())?;
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

/// `mkfs.ext4` arguments building `image` from the directory `dir`.
///
/// Fixed UUID, directory hash seed and label so the image depends only on
/// its inputs (as far as mke2fs allows); 4 KiB blocks; root dir owned by 0:0.
fn mkfs_args(dir: &Path, image: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = [
        "-F",
        "-q",
        "-t",
        "ext4",
        "-b",
        "4096",
        "-L",
        ROOTFS_LABEL,
        "-U",
        ROOTFS_UUID,
        "-E",
        &format!("hash_seed={ROOTFS_UUID},root_owner=0:0"),
        "-d",
    ]
    .iter()
    .map(Into::into)
    .collect();
    v.push(dir.into());
    v.push(image.into());
    v.push(format!("{}k", ROOTFS_SIZE / 1024).into());
    v
}

/// Builds the guest rootfs image: stages a directory tree (busybox and its
/// applet links, the guest modules, `/init`, the rootfs marker, empty
/// mount-point directories) with fixed modes and timestamps, then runs
/// `mkfs.ext4 -d` into a temporary file and renames it into place.
fn build_rootfs(images: &Images, applets: &[String]) -> Result<(), ImageError> {
    let pid = std::process::id();
    let stage = images.rootfs.with_extension(format!("d.tmp{pid}"));
    let tmp = images.rootfs.with_extension(format!("ext4.tmp{pid}"));
    let _ = fs::remove_dir_all(&stage);
    let _ = fs::remove_file(&tmp);
    let result = stage_rootfs(&stage, images, applets).and_then(|entries| {
        const HINT: &str = "install e2fsprogs (apt-get install e2fsprogs)";
        // mke2fs stamps new metadata with E2FSPROGS_FAKE_TIME (or, in newer
        // versions, SOURCE_DATE_EPOCH), but copies each inode's ctime from
        // the staged file; debugfs then resets those ctimes as well.
        let mut cmd = Command::new("mkfs.ext4");
        cmd.args(mkfs_args(&stage, &tmp))
            .env("E2FSPROGS_FAKE_TIME", "1")
            .env("SOURCE_DATE_EPOCH", "1")
            .env("PATH", sbin_path());
        run_tool(&mut cmd, "mkfs.ext4", HINT)?;
        let script = images.rootfs.with_extension(format!("debugfs.tmp{pid}"));
        let cmds: String = entries
            .iter()
            .map(|e| format!("set_inode_field /{e} ctime 1\n"))
            .collect();
        fs::write(&script, cmds).ctx(|| format!("writing {}", script.display()))?;
        let mut cmd = Command::new("debugfs");
        cmd.arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(&tmp)
            .env("E2FSPROGS_FAKE_TIME", "1")
            .env("PATH", sbin_path());
        let r = run_tool(&mut cmd, "debugfs", HINT);
        let _ = fs::remove_file(&script);
        r?;
        fs::rename(&tmp, &images.rootfs).ctx(|| format!("renaming {}", tmp.display()))
    });
    let _ = fs::remove_dir_all(&stage);
    let _ = fs::remove_file(&tmp);
    result
}

/// `$PATH` plus the sbin directories, where `mkfs.ext4` lives.
fn sbin_path() -> std::ffi::OsString {
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

/// Writes the rootfs tree into `stage` (see [`build_rootfs`]) and returns
/// the paths of all entries relative to it (`""` for the root itself).
fn stage_rootfs(
    stage: &Path,
    images: &Images,
    applets: &[String],
) -> Result<Vec<String>, ImageError> {
    let e = |p: &Path| format!("staging {}", p.display());
    let mkdir = |rel: &str, mode: u32| -> Result<PathBuf, ImageError> {
        let p = stage.join(rel);
        fs::create_dir_all(&p).ctx(|| e(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).ctx(|| e(&p))?;
        Ok(p)
    };
    let put = |rel: &str, mode: u32, data: &[u8]| -> Result<(), ImageError> {
        let p = stage.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).ctx(|| e(parent))?;
        }
        fs::write(&p, data).ctx(|| e(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).ctx(|| e(&p))
    };
    mkdir("", 0o755)?;
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "root", "run", "mnt",
    ] {
        mkdir(d, 0o755)?;
    }
    mkdir("tmp", 0o1777)?;
    let busybox = fs::read(&images.busybox).ctx(|| e(&images.busybox))?;
    put("bin/busybox", 0o755, &busybox)?;
    for a in applets {
        let p = stage.join(a);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).ctx(|| e(parent))?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &p).ctx(|| e(&p))?;
    }
    for m in scripts::GUEST_MODULES {
        let host = images.modules_dir.join(m);
        let data = fs::read(&host).map_err(|_| ImageError::MissingInPackage {
            what: format!("module {m}"),
            path: host.clone(),
            package: KERNEL_PACKAGE.name,
        })?;
        put(
            &format!("lib/modules/{}/{m}", images.kernel_version),
            0o644,
            &data,
        )?;
    }
    let agent = fs::read(&images.agent).ctx(|| e(&images.agent))?;
    put("usr/bin/kiln-agent", 0o755, &agent)?;
    put(
        scripts::ROOTFS_MARKER_FILE,
        0o644,
        scripts::ROOTFS_MARKER_TEXT.as_bytes(),
    )?;
    put(
        "init",
        0o755,
        scripts::guest_init(&images.kernel_version).as_bytes(),
    )?;
    let mut entries = Vec::new();
    zero_times(stage, "", &mut entries)?;
    Ok(entries)
}

/// Sets the access and modification times of everything under `dir`
/// (symlinks themselves included) to the epoch, children before parents,
/// and appends the entries' paths (relative to the top, `rel` for `dir`).
fn zero_times(dir: &Path, rel: &str, entries: &mut Vec<String>) -> Result<(), ImageError> {
    let mut children: Vec<_> = fs::read_dir(dir)
        .ctx(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<io::Result<_>>()
        .ctx(|| format!("listing {}", dir.display()))?;
    children.sort();
    for p in children {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        let child_rel = if rel.is_empty() {
            name.into_owned()
        } else {
            format!("{rel}/{name}")
        };
        let meta = fs::symlink_metadata(&p).ctx(|| format!("stat {}", p.display()))?;
        if meta.is_dir() {
            zero_times(&p, &child_rel, entries)?;
        } else {
            set_times_zero(&p)?;
            entries.push(child_rel);
        }
    }
    entries.push(rel.to_string());
    set_times_zero(dir)
}

fn set_times_zero(p: &Path) -> Result<(), ImageError> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        .ctx(|| format!("path {}", p.display()))?;
    let times = [libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    }; 2];
    // SAFETY: `c` is a valid NUL-terminated path and `times` holds two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).ctx(|| format!("setting times of {}", p.display()));
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
        assert_eq!(i.rootfs, Path::new("/c/images/rootfs.ext4"));
    }
}
