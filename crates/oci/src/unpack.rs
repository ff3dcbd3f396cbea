//! Applying layers (tar change sets) onto a directory.
//!
//! A layer is read twice: the first pass collects its whiteouts
//! (`.wh.NAME` deletes NAME of the layers below; `.wh..wh..opq` empties
//! its directory of what the layers below put there) and applies them, the
//! second extracts its other entries. Whiteouts only ever hide lower
//! layers' files, whatever their order in the archive, so applying them
//! first is the OCI semantics exactly.
//!
//! Nothing is ever written or removed outside the root: paths with `..` are
//! skipped, parents are resolved and checked to be inside the root before
//! anything is removed, and extraction goes through `tar`'s `unpack_in`,
//! which refuses to write through symlinks leading out. (A consequence: a
//! whiteout or entry below an absolute symlink of a lower layer is skipped,
//! not followed inside the image.) Device nodes are skipped: the guest
//! mounts its own `/dev`.

use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// The path of an archive entry relative to the root, or `None` when it
/// would leave it.
fn clean(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `root/rel`'s parent resolved (symlinks followed) if it exists and stays
/// inside `root` (already canonical).
fn parent_inside(root: &Path, rel: &Path) -> Option<PathBuf> {
    let parent = root.join(rel.parent()?);
    let real = parent.canonicalize().ok()?;
    real.starts_with(root).then_some(real)
}

/// Removes `dir/name` (a file, symlink or whole directory) if it exists.
fn remove_entry(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether the process may chown (preserving the layers' owners).
pub(crate) fn can_chown() -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Applies one layer to `root`. `open` gives the layer's uncompressed tar
/// stream; it is called twice (see the module docs).
pub fn apply_layer<R: Read>(
    root: &Path,
    mut open: impl FnMut() -> io::Result<R>,
) -> Result<(), String> {
    let root = root
        .canonicalize()
        .map_err(|e| format!("{}: {e}", root.display()))?;
    // Pass 1: whiteouts.
    let mut archive = tar::Archive::new(open().map_err(|e| format!("reading: {e}"))?);
    let mut removals: Vec<(PathBuf, bool)> = Vec::new();
    for e in archive.entries().map_err(|e| format!("reading: {e}"))? {
        let e = e.map_err(|e| format!("reading: {e}"))?;
        let path = e.path().map_err(|e| format!("entry name: {e}"))?;
        let Some(rel) = clean(&path) else { continue };
        let Some(name) = rel.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name == OPAQUE {
            removals.push((rel.parent().unwrap_or(Path::new("")).to_path_buf(), true));
        } else if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            removals.push((rel.with_file_name(hidden), false));
        }
    }
    for (rel, opaque) in removals {
        if opaque {
            // Empty the directory (it stays: the layer keeps it).
            let dir = root.join(&rel);
            let Ok(real) = dir.canonicalize() else {
                continue;
            };
            if !real.starts_with(&root) || !real.is_dir() {
                continue;
            }
            for child in fs::read_dir(&real).map_err(|e| format!("{}: {e}", rel.display()))? {
                let child = child.map_err(|e| format!("{}: {e}", rel.display()))?;
                remove_entry(&child.path())
                    .map_err(|e| format!("opaque {}: {e}", rel.display()))?;
            }
        } else if let (Some(parent), Some(name)) = (parent_inside(&root, &rel), rel.file_name()) {
            remove_entry(&parent.join(name))
                .map_err(|e| format!("whiteout {}: {e}", rel.display()))?;
        }
    }
    // Pass 2: everything else.
    let mut archive = tar::Archive::new(open().map_err(|e| format!("reading: {e}"))?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(can_chown());
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    for e in archive.entries().map_err(|e| format!("reading: {e}"))? {
        let mut e = e.map_err(|e| format!("reading: {e}"))?;
        let path = e
            .path()
            .map_err(|e| format!("entry name: {e}"))?
            .into_owned();
        let Some(rel) = clean(&path) else { continue };
        let ty = e.header().entry_type();
        let name = rel.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if rel.as_os_str().is_empty()
            || name.starts_with(WHITEOUT)
            || ty.is_character_special()
            || ty.is_block_special()
            || ty.is_fifo()
        {
            continue;
        }
        // A file replacing a directory of a lower layer, or the reverse.
        if let (Some(parent), Some(fname)) = (parent_inside(&root, &rel), rel.file_name()) {
            let target = parent.join(fname);
            if let Ok(m) = fs::symlink_metadata(&target) {
                let replace = if ty.is_dir() { !m.is_dir() } else { m.is_dir() };
                if replace {
                    remove_entry(&target).map_err(|e| format!("{}: {e}", rel.display()))?;
                }
            }
        }
        e.unpack_in(&root).map_err(|err| {
            let cause = std::error::Error::source(&err)
                .map(|c| format!(": {c}"))
                .unwrap_or_default();
            format!("extracting {}: {err}{cause}", rel.display())
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer from (path, kind, content): kind 'f' file, 'd' dir, 'l' symlink to content.
    fn layer(entries: &[(&str, char, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for &(p, kind, content) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1);
            h.set_uid(0);
            h.set_gid(0);
            match kind {
                'd' => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    b.append_data(&mut h, p, io::empty()).unwrap();
                }
                'l' => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, p, content).unwrap();
                }
                _ => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(content.len() as u64);
                    b.append_data(&mut h, p, content.as_bytes()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn apply(root: &Path, data: Vec<u8>) -> Result<(), String> {
        apply_layer(root, || Ok(io::Cursor::new(data.clone())))
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kiln-oci-unpack-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn listing(root: &Path) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let m = fs::symlink_metadata(&p).unwrap();
                if m.is_dir() {
                    out.push(format!("{rel}/"));
                    walk(root, &p, out);
                } else if m.file_type().is_symlink() {
                    out.push(format!("{rel} -> {}", fs::read_link(&p).unwrap().display()));
                } else {
                    out.push(format!("{rel}={}", fs::read_to_string(&p).unwrap()));
                }
            }
        }
        let mut v = Vec::new();
        walk(root, root, &mut v);
        v.sort();
        v
    }

    #[test]
    fn layers_with_whiteouts_and_opaque_dirs() {
        let root = tmp("wh");
        apply(
            &root,
            layer(&[
                ("etc", 'd', ""),
                ("etc/keep", 'f', "k1"),
                ("etc/gone", 'f', "g"),
                ("opt", 'd', ""),
                ("opt/old", 'f', "o"),
                ("opt/sub", 'd', ""),
                ("opt/sub/deep", 'f', "d"),
                ("var", 'd', ""),
                ("var/x", 'f', "x"),
                ("link", 'l', "etc/keep"),
                ("was-dir", 'd', ""),
                ("was-dir/f", 'f', "f"),
                ("was-file", 'f', "f"),
            ]),
        )
        .unwrap();
        apply(
            &root,
            layer(&[
                ("etc/.wh.gone", 'f', ""),
                ("etc/keep", 'f', "k2"),
                // The opaque marker after an entry of the same layer: that entry stays.
                ("opt/new", 'f', "n"),
                ("opt/.wh..wh..opq", 'f', ""),
                ("./.wh.var", 'f', ""),
                ("was-dir", 'f', "now a file"),
                ("was-file", 'd', ""),
                ("was-file/inside", 'f', "i"),
                ("etc/.wh.never-existed", 'f', ""),
            ]),
        )
        .unwrap();
        assert_eq!(
            listing(&root),
            [
                "etc/",
                "etc/keep=k2",
                "link -> etc/keep",
                "opt/",
                "opt/new=n",
                "was-dir=now a file",
                "was-file/",
                "was-file/inside=i",
            ]
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn nothing_escapes_the_root() {
        let outer = tmp("escape");
        let root = outer.join("root");
        fs::create_dir(&root).unwrap();
        fs::write(outer.join("victim"), "v").unwrap();
        apply(
            &root,
            layer(&[("up", 'l', ".."), ("abs", 'l', outer.to_str().unwrap())]),
        )
        .unwrap();
        // Whiteouts through symlinks leading out, and `..` paths, are skipped.
        apply(
            &root,
            layer(&[("up/.wh.victim", 'f', ""), ("abs/.wh.victim", 'f', "")]),
        )
        .unwrap();
        assert_eq!(fs::read_to_string(outer.join("victim")).unwrap(), "v");
        // Writing through them fails the layer rather than escaping.
        let err = apply(&root, layer(&[("abs/victim", 'f', "pwned")]));
        assert!(err.is_err(), "{err:?}");
        assert_eq!(fs::read_to_string(outer.join("victim")).unwrap(), "v");
        fs::remove_dir_all(&outer).unwrap();
    }

    #[test]
    fn a_broken_layer_is_an_error() {
        let root = tmp("broken");
        let mut data = layer(&[("a", 'f', "x".repeat(3000).as_str())]);
        data.truncate(1500);
        let err = apply(&root, data).unwrap_err();
        assert!(
            err.contains("reading") || err.contains("extracting"),
            "{err}"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
