//! The VMM's cgroup v2 leaf: `<cgroup2 mount>/<parent cgroup>/<id>`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::args::JailConfig;
use crate::journal::Journal;
use crate::{io_err, Error, Result};

/// The first cgroup2 mount point in `/proc/self/mountinfo` text
/// (`/sys/fs/cgroup` preferred when several are mounted).
pub fn parse_mountinfo(text: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    for line in text.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(mp) = left.split_whitespace().nth(4) {
            found.push(PathBuf::from(unescape(mp)));
        }
    }
    found
        .iter()
        .find(|p| p.as_path() == Path::new("/sys/fs/cgroup"))
        .or(found.first())
        .cloned()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where cgroup2 is mounted, from `/proc/self/mountinfo`.
pub fn find_mount() -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("cgroup: read", "/proc/self/mountinfo"))?;
    parse_mountinfo(&text).ok_or_else(|| {
        Error::Invalid(
            "cgroup: no cgroup2 file system is mounted (see /proc/self/mountinfo); \
             mount one, e.g. `mount -t cgroup2 none /sys/fs/cgroup`"
                .into(),
        )
    })
}

/// This process's cgroup v2 path (the `0::` line of `/proc/self/cgroup`).
fn own_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_start_matches('/').to_string())
}

/// The controller a cgroup file belongs to (`memory` for `memory.max`);
/// None for the core `cgroup.*` files.
pub fn controller_of(file: &str) -> Option<&str> {
    let c = file.split('.').next()?;
    (c != "cgroup").then_some(c)
}

/// What [`apply`] does, worked out (and checked) before anything is touched.
#[derive(Debug, Clone)]
pub struct CgroupPlan {
    pub mount: PathBuf,
    /// Parent cgroup directory (`<mount>/<parent>`).
    pub parent: PathBuf,
    /// The leaf to create, or None to join `parent` only (no --cgroup given).
    pub leaf: Option<PathBuf>,
    pub controllers: Vec<String>,
    pub values: Vec<(String, String)>,
    /// `cgroup.procs` of the jailer's own cgroup (where the cleaner moves
    /// processes back before removing the leaf).
    pub return_procs: PathBuf,
}

/// Works out the cgroup plan: None when there is nothing to do (no --cgroup
/// and no existing, explicitly given --parent-cgroup: Firecracker's v2
/// behaviour).
pub fn prepare(cfg: &JailConfig) -> Result<Option<CgroupPlan>> {
    if cfg.cgroups.is_empty() {
        if !cfg.parent_cgroup_given {
            return Ok(None);
        }
        let Ok(mount) = find_mount() else {
            return Ok(None);
        };
        let parent = mount.join(&cfg.parent_cgroup);
        if !parent.is_dir() {
            return Ok(None);
        }
        return Ok(Some(CgroupPlan {
            return_procs: return_procs(&mount)?,
            mount,
            parent,
            leaf: None,
            controllers: Vec::new(),
            values: Vec::new(),
        }));
    }
    let mount = find_mount()?;
    let ctl_path = mount.join("cgroup.controllers");
    let available = fs::read_to_string(&ctl_path).map_err(io_err("cgroup: read", &ctl_path))?;
    let available: BTreeSet<&str> = available.split_whitespace().collect();
    let mut controllers = Vec::new();
    for (file, _) in &cfg.cgroups {
        if let Some(c) = controller_of(file) {
            if !available.contains(c) {
                return Err(Error::Invalid(format!(
                    "--cgroup {file}: controller {c:?} is not available in the cgroup v2 hierarchy at {} (available: {})",
                    mount.display(),
                    available.iter().copied().collect::<Vec<_>>().join(" ")
                )));
            }
            if !controllers.iter().any(|x| x == c) {
                controllers.push(c.to_string());
            }
        }
    }
    let parent = mount.join(&cfg.parent_cgroup);
    let leaf = parent.join(&cfg.id);
    if leaf.exists() {
        return Err(Error::Invalid(format!(
            "cgroup {} already exists (is the id in use? `kiln jailer --cleanup` removes a finished jail)",
            leaf.display()
        )));
    }
    Ok(Some(CgroupPlan {
        return_procs: return_procs(&mount)?,
        mount,
        parent,
        leaf: Some(leaf),
        controllers,
        values: cfg.cgroups.clone(),
    }))
}

fn return_procs(mount: &Path) -> Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(io_err("cgroup: read", "/proc/self/cgroup"))?;
    let own = own_cgroup(&text).unwrap_or_default();
    Ok(mount.join(own).join("cgroup.procs"))
}

/// The leaf a jail would have (for `--cleanup`); None without cgroup2.
pub fn find_leaf(cfg: &JailConfig) -> Result<Option<PathBuf>> {
    Ok(find_mount()
        .ok()
        .map(|m| m.join(&cfg.parent_cgroup).join(&cfg.id)))
}

/// Creates the leaf, enables the controllers on the way down, writes the
/// values and moves this process in. Every directory made is journaled.
pub fn apply(plan: &CgroupPlan, journal: &Journal) -> Result<()> {
    let Some(leaf) = &plan.leaf else {
        // No --cgroup: join the existing parent cgroup (Firecracker's v2 behaviour).
        let procs = plan.parent.join("cgroup.procs");
        return fs::write(&procs, std::process::id().to_string())
            .map_err(io_err("cgroup: move the jailer into", &procs));
    };
    // Directories from the mount down to the leaf.
    let rel = leaf.strip_prefix(&plan.mount).unwrap_or(leaf);
    let mut dir = plan.mount.clone();
    let mut chain = vec![dir.clone()];
    for c in rel.components() {
        dir.push(c);
        if !dir.exists() {
            fs::create_dir(&dir).map_err(io_err("cgroup: create", &dir))?;
            if &dir == leaf {
                journal.cgroup(&dir);
            } else {
                journal.dir(&dir);
            }
        }
        chain.push(dir.clone());
    }
    // Enable the controllers in every ancestor's subtree_control.
    for anc in &chain[..chain.len() - 1] {
        let path = anc.join("cgroup.subtree_control");
        let enabled = fs::read_to_string(&path).map_err(io_err("cgroup: read", &path))?;
        for c in &plan.controllers {
            if !enabled.split_whitespace().any(|e| e == c) {
                fs::write(&path, format!("+{c}"))
                    .map_err(io_err("cgroup: enable the controller (+{c}) in", &path))
                    .map_err(|e| with_detail(e, c))?;
            }
        }
    }
    for (file, value) in &plan.values {
        let path = leaf.join(file);
        if !path.exists() {
            return Err(Error::Invalid(format!(
                "cgroup: {} does not exist (no such cgroup file {file:?})",
                path.display()
            )));
        }
        fs::write(&path, value).map_err(io_err("cgroup: write the value to", &path))?;
    }
    let procs = leaf.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .map_err(io_err("cgroup: move the jailer into", &procs))
}

fn with_detail(e: Error, controller: &str) -> Error {
    match e {
        Error::Io { path, err, .. } => Error::Invalid(format!(
            "cgroup: enable the controller {controller:?} in {}: {err}",
            path.display()
        )),
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_mountinfo() {
        let text = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
            35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_mountinfo(text),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let two = format!("{text}50 1 0:40 / /tmp/my\\040cg rw - cgroup2 none rw\n");
        assert_eq!(
            parse_mountinfo(&two),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let pref = "50 1 0:40 / /tmp/a\\040b rw - cgroup2 none rw\n\
            51 1 0:40 / /sys/fs/cgroup rw - cgroup2 none rw\n";
        assert_eq!(parse_mountinfo(pref), Some(PathBuf::from("/sys/fs/cgroup")));
        let esc = "50 1 0:40 / /tmp/a\\040b rw - cgroup2 none rw\n";
        assert_eq!(parse_mountinfo(esc), Some(PathBuf::from("/tmp/a b")));
        assert_eq!(
            parse_mountinfo("22 27 0:21 / /proc rw - proc proc rw\n"),
            None
        );
    }

    #[test]
    fn own_cgroup_and_controllers() {
        assert_eq!(own_cgroup("4:memory:/x\n0::/a/b\n").as_deref(), Some("a/b"));
        assert_eq!(own_cgroup("0::/\n").as_deref(), Some(""));
        assert_eq!(controller_of("memory.max"), Some("memory"));
        assert_eq!(controller_of("hugetlb.2MB.max"), Some("hugetlb"));
        assert_eq!(controller_of("cgroup.max.depth"), None);
    }
}
