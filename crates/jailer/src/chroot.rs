//! The jail's root directory: creation, contents, device nodes, pivot_root.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::args::JailConfig;
use crate::journal::Journal;
use crate::{io_err, last_err, Error, Result};

/// Device nodes made in the jail: (path, required).
pub const DEVICES: [(&str, bool); 4] = [
    ("/dev/kvm", true),
    ("/dev/net/tun", false),
    ("/dev/urandom", false),
    ("/dev/userfaultfd", false),
];

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// Refuses an existing chroot (before anything is created).
pub fn check_free(cfg: &JailConfig) -> Result<()> {
    let root = cfg.root();
    if fs::symlink_metadata(&root).is_ok() {
        return Err(Error::Invalid(format!(
            "create chroot: {} already exists (is the id in use? `kiln jailer --cleanup` removes a finished jail)",
            root.display()
        )));
    }
    Ok(())
}

/// Creates `<base>/<exec name>/<id>/root`, journaling each new directory.
pub fn create_root(cfg: &JailConfig, journal: &Journal) -> Result<PathBuf> {
    check_free(cfg)?;
    let root = cfg.root();
    let id_dir = cfg.id_dir();
    let mut missing: Vec<&Path> = root.ancestors().take_while(|p| !p.exists()).collect();
    missing.reverse();
    for dir in missing {
        fs::create_dir(dir).map_err(io_err("create chroot dir", dir))?;
        if dir == root || dir == id_dir {
            journal.tree(dir);
        } else {
            journal.dir(dir);
        }
    }
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
        .map_err(io_err("create chroot dir", &root))?;
    Ok(root)
}

/// The ELF interpreter (PT_INTERP) of a 64-bit little-endian ELF image, if any.
pub fn elf_interp(image: &[u8]) -> Option<String> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(image.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(image.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(image.get(o..o + 8)?.try_into().ok()?));
    if image.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let phoff = usize::try_from(u64_at(0x20)?).ok()?;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == 3 {
            let off = usize::try_from(u64_at(ph + 8)?).ok()?;
            let size = usize::try_from(u64_at(ph + 0x20)?).ok()?;
            let raw = image.get(off..off.checked_add(size)?)?;
            let s = raw.split(|&b| b == 0).next()?;
            return String::from_utf8(s.to_vec()).ok();
        }
    }
    None
}

/// Absolute paths in `ld.so --list` (ldd) output.
pub fn parse_ld_list(out: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for l in out.lines() {
        let l = l.trim();
        let target = match l.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("library {} not found", name.trim()));
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => l.split_whitespace().next().unwrap_or(""),
        };
        if target.starts_with('/') {
            libs.push(PathBuf::from(target));
        }
    }
    Ok(libs)
}

/// The shared libraries (and the ELF interpreter) a binary needs; empty for
/// a static binary.
pub fn shared_libraries(exec: &Path) -> Result<Vec<PathBuf>> {
    let image = fs::read(exec).map_err(io_err("copy exec file: read", exec))?;
    let Some(interp) = elf_interp(&image) else {
        return Ok(Vec::new());
    };
    let out = Command::new(&interp)
        .arg("--list")
        .arg(exec)
        .env_clear()
        .output()
        .map_err(io_err("copy exec file: list its libraries with", &interp))?;
    if !out.status.success() {
        return Err(Error::Invalid(format!(
            "copy exec file: `{interp} --list {}` failed: {}",
            exec.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_ld_list(&String::from_utf8_lossy(&out.stdout))
        .map_err(|m| Error::Invalid(format!("copy exec file {}: {m}", exec.display())))
}

/// Copies `src` to `root` + `dest` (an absolute in-jail path), making parents.
fn copy_in(root: &Path, src: &Path, dest: &Path, mode: u32) -> Result<()> {
    let target = root.join(dest.strip_prefix("/").unwrap_or(dest));
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(io_err("copy exec file: create", parent))?;
    }
    fs::copy(src, &target).map_err(io_err("copy exec file: copy to", &target))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(mode))
        .map_err(io_err("copy exec file: chmod", &target))
}

/// Copies the VMM binary to `<root>/<exec name>` (a copy, not a link: no
/// memory is shared with other jails) and, for a dynamically linked binary,
/// its shared libraries at their host paths.
pub fn copy_exec(cfg: &JailConfig, root: &Path) -> Result<()> {
    let libs = shared_libraries(&cfg.exec_file)?;
    copy_in(
        root,
        &cfg.exec_file,
        &Path::new("/").join(&cfg.exec_name),
        0o755,
    )?;
    for lib in libs {
        copy_in(root, &lib, &lib, 0o755)?;
    }
    Ok(())
}

/// Creates `<root>/dev/...` nodes with the host's major/minor, owned by
/// uid:gid (mode 0600), and `/run`; then gives the root to uid:gid.
pub fn populate(root: &Path, uid: u32, gid: u32) -> Result<()> {
    for (dev, required) in DEVICES {
        let meta = match fs::metadata(dev) {
            Ok(m) => m,
            Err(_) if !required => continue,
            Err(e) => return Err(io_err("create device node: stat the host's", dev)(e)),
        };
        if !meta.file_type().is_char_device() {
            return Err(Error::Invalid(format!(
                "create device node: the host's {dev} is not a character device"
            )));
        }
        let target = root.join(&dev[1..]);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(io_err("create device node: create", parent))?;
        }
        let c = cpath(&target);
        // SAFETY: `c` is a valid NUL-terminated path; mknod does not keep it.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, meta.rdev()) } != 0 {
            return Err(last_err("create device node", &target));
        }
        chown(&target, uid, gid, "create device node: chown")?;
    }
    let run = root.join("run");
    fs::create_dir_all(&run).map_err(io_err("create", &run))?;
    chown(&run, uid, gid, "chown")?;
    chown(root, uid, gid, "chown the chroot dir")
}

fn chown(p: &Path, uid: u32, gid: u32, step: &'static str) -> Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(io_err(step, p))
}

/// Enters a new mount namespace and makes `root` the root file system:
/// mounts private, `root` bind-mounted on itself, `pivot_root`, old root
/// detached.
pub fn pivot_into(root: &Path) -> Result<()> {
    // SAFETY: plain syscalls; the strings are valid NUL-terminated paths
    // that outlive each call.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(last_err("pivot: unshare the mount namespace for", root));
        }
        let slash = c"/";
        if libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_PRIVATE | libc::MS_REC,
            std::ptr::null(),
        ) != 0
        {
            return Err(last_err("pivot: make / private for", root));
        }
        let r = cpath(root);
        if libc::mount(
            r.as_ptr(),
            r.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
        {
            return Err(last_err("pivot: bind-mount", root));
        }
        if libc::chdir(r.as_ptr()) != 0 {
            return Err(last_err("pivot: chdir", root));
        }
        // pivot_root(".", "."): the old root ends up stacked on the new one
        // and is detached right after (no old_root directory needed).
        let dot = c".";
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(last_err("pivot: pivot_root into", root));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(last_err("pivot: detach the old root from", root));
        }
        if libc::chdir(slash.as_ptr()) != 0 {
            return Err(last_err("pivot: chdir / in", root));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interp_of_this_test_binary() {
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        // The test binary is linked like the kiln binary.
        let i = elf_interp(&me).expect("a dynamically linked test binary");
        assert!(i.starts_with('/') && i.contains("ld"), "{i}");
        assert!(Path::new(&i).exists(), "{i}");
        assert_eq!(elf_interp(b"#!/bin/sh\n"), None);
        assert_eq!(elf_interp(b"\x7fELF\x02\x01"), None);
    }

    #[test]
    fn ld_list_output() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ld_list(out).unwrap(),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ld_list("\tlibfoo.so => not found\n").is_err());
    }
}
