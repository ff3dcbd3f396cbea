//! `kiln run --image PATH[:NAME] [-- CMD...]`: an OCI image's process in a
//! microVM (see docs/containers.md).
//!
//! Before anything boots, the image is read (`kiln-oci`), its root file
//! system built or taken from the cache (an erofs image) and the process
//! written to a small spec disk. Both become disks of the VM (the image
//! read-only, the spec writable: the guest writes the exit status into it)
//! and `kiln.image=`/`kiln.spec=` on the kernel command line tell the
//! guest's init to mount them. The rest is a plain `kiln run`, here or in
//! the lab; `--status-disk` makes that run's exit status the process's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use clap::Args;
use kiln_oci::Image;

use crate::run_args::RunArgs;

/// `kiln run`'s container options.
#[derive(Args, Clone, Debug, Default)]
pub struct ImageArgs {
    /// Run an OCI image (an image layout directory or an oci-layout tar
    /// archive; NAME picks a manifest by its ref name): its Entrypoint and
    /// Cmd, or the words after `--` in place of its Cmd, with its Env,
    /// WorkingDir and User; exits with the process's status.
    #[arg(long, value_name = "PATH[:NAME]")]
    pub image: Option<String>,
    /// Exit with the status the guest wrote into this disk (set by --image).
    #[arg(long, hide = true, value_name = "INDEX")]
    pub status_disk: Option<usize>,
}

/// The per-run spec disk, removed when the run ends (however it ends).
pub struct Prepared {
    spec: PathBuf,
}

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.spec);
    }
}

/// `PATH[:NAME]`: the whole string if that path exists, else split at the
/// last `:` (as in umoci's `img:latest`).
fn split_ref(spec: &str) -> (PathBuf, Option<String>) {
    if Path::new(spec).exists() {
        return (spec.into(), None);
    }
    match spec.rsplit_once(':') {
        Some((p, r)) if !p.is_empty() && !r.is_empty() && !r.contains('/') => {
            (p.into(), Some(r.to_string()))
        }
        _ => (spec.into(), None),
    }
}

/// The guest's name of the disk at `index` (`/dev/vda` for 0).
fn disk_dev(index: usize) -> Result<String> {
    let letter = u8::try_from(index)
        .ok()
        .filter(|i| *i < 26)
        .context("too many disks for --image (at most 24 others)")?;
    Ok(format!("/dev/vd{}", (b'a' + letter) as char))
}

/// With `--image`: builds (or reuses) the image's root file system, writes
/// the spec disk and turns `args` into the plain run that boots them.
/// Without it: nothing.
pub fn prepare(args: &mut RunArgs) -> Result<Option<Prepared>> {
    let Some(spec) = args.image.image.take() else {
        return Ok(None);
    };
    if args.image.status_disk.is_some() {
        anyhow::bail!("--status-disk is set by --image; give one or the other");
    }
    let (path, reference) = split_ref(&spec);
    let image = Image::open(&path, reference.as_deref())?;
    let process = image.process(&std::mem::take(&mut args.guest_command))?;
    let cache = kiln_oci::default_cache_dir(&kiln_lab::images::default_cache_dir());
    let rootfs = image.build_rootfs(&cache)?;
    log::info!(
        "image {}: root file system {} ({})",
        path.display(),
        rootfs.path.display(),
        if rootfs.reused { "cached" } else { "built" }
    );
    static N: AtomicU64 = AtomicU64::new(0);
    let spec_path = std::env::temp_dir().join(format!(
        "kiln-spec-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let prepared = Prepared {
        spec: spec_path.clone(),
    };
    let bytes = process
        .to_spec_bytes()
        .with_context(|| format!("{}: the process", path.display()))?;
    std::fs::write(&spec_path, bytes)
        .with_context(|| format!("writing {}", spec_path.display()))?;
    let n = args.disks.len();
    let (image_dev, spec_dev) = (disk_dev(n)?, disk_dev(n + 1)?);
    args.disks.push(format!("{},ro", rootfs.path.display()));
    args.disks.push(spec_path.display().to_string());
    args.image.status_disk = Some(n + 1);
    args.cmdline
        .push_str(&format!(" kiln.image={image_dev} kiln.spec={spec_dev}"));
    Ok(Some(prepared))
}

/// With `--status-disk`: that disk, opened now (before the VMM's seccomp
/// filter forbids opening files) to read the exit status from later.
pub fn status_disk(args: &RunArgs) -> Result<Option<(PathBuf, std::fs::File)>> {
    let Some(i) = args.image.status_disk else {
        return Ok(None);
    };
    let disk = args
        .disks
        .get(i)
        .with_context(|| format!("--status-disk {i}: there is no such --disk"))?;
    let path = crate::run_args::parse_disk(disk, i)?.path;
    let f = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    Ok(Some((path, f)))
}

/// Kiln's exit status after the VM ended with `vm_status`: with a status
/// disk, the exit status the guest wrote there.
pub fn exit_code(status_disk: Option<(PathBuf, std::fs::File)>, vm_status: i32) -> Result<i32> {
    let Some((path, mut f)) = status_disk else {
        return Ok(vm_status);
    };
    if vm_status != 0 {
        return Ok(vm_status);
    }
    let status = kiln_oci::spec::read_status_from(&mut f)
        .with_context(|| format!("reading the exit status from {}", path.display()))?;
    status.ok_or_else(|| {
        anyhow::anyhow!(
            "the guest ended without reporting the process's exit status (see its console output above)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references() {
        assert_eq!(
            split_ref("/no/such/img:latest"),
            ("/no/such/img".into(), Some("latest".into()))
        );
        assert_eq!(split_ref("/no/such/img"), ("/no/such/img".into(), None));
        assert_eq!(
            split_ref("/no/such:dir/img"),
            ("/no/such:dir/img".into(), None)
        );
        let here = std::env::temp_dir();
        assert_eq!(split_ref(here.to_str().unwrap()), (here.clone(), None));
    }

    #[test]
    fn the_status_sector_is_the_exit_status() {
        let p = std::env::temp_dir().join(format!("kiln-status-test-{}", std::process::id()));
        let open = |data: &[u8]| {
            std::fs::write(&p, data).unwrap();
            Some((p.clone(), std::fs::File::open(&p).unwrap()))
        };
        let mut sector = vec![0u8; 4096];
        assert!(exit_code(open(&sector), 0)
            .unwrap_err()
            .to_string()
            .contains("without reporting the process's exit status"));
        sector[..18].copy_from_slice(b"kiln-oci-status 7\n");
        assert_eq!(exit_code(open(&sector), 0).unwrap(), 7);
        // A guest that panicked keeps Kiln's own status.
        assert_eq!(exit_code(open(&sector), 2).unwrap(), 2);
        assert_eq!(exit_code(None, 3).unwrap(), 3);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn disk_names() {
        assert_eq!(disk_dev(0).unwrap(), "/dev/vda");
        assert_eq!(disk_dev(3).unwrap(), "/dev/vdd");
        assert!(disk_dev(26).is_err());
    }
}
