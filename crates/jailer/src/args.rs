//! The jailer's flags (Firecracker's names) and their validation.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::{Error, Result};

/// Firecracker's jailer flags (plus Kiln's `--allow-root` and `--cleanup`).
#[derive(Args, Debug, Clone)]
pub struct JailerArgs {
    /// The microVM's id: letters, digits and '-', at most 64.
    #[arg(long)]
    pub id: String,
    /// The VMM binary; it is copied into the jail. Its file name is the "exec name".
    #[arg(long, value_name = "PATH")]
    pub exec_file: PathBuf,
    /// The uid the VMM runs as (0 only with --allow-root).
    #[arg(long, required_unless_present = "cleanup")]
    pub uid: Option<u32>,
    /// The gid the VMM runs as (0 only with --allow-root).
    #[arg(long, required_unless_present = "cleanup")]
    pub gid: Option<u32>,
    /// Where jails are built: <chroot-base-dir>/<exec name>/<id>/root.
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// Join the network namespace at this path (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// Detach: new session, standard I/O to /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// Run the VMM as PID 1 of a new PID namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// Cgroup version: only 2 is supported by Kiln.
    #[arg(long, value_name = "1|2", default_value_t = 2)]
    pub cgroup_version: u8,
    /// Write VALUE to the VMM's cgroup file FILE (repeatable), e.g. memory.max=268435456.
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    pub cgroups: Vec<String>,
    /// The cgroup (relative to the cgroup v2 mount) under which the VMM's
    /// cgroup <id> is made. Default: the exec name.
    #[arg(long, value_name = "PATH")]
    pub parent_cgroup: Option<String>,
    /// Resource limit RESOURCE=VALUE (repeatable): fsize (bytes) or no-file.
    #[arg(long = "resource-limit", value_name = "RESOURCE=VALUE")]
    pub resource_limits: Vec<String>,
    /// Kiln: allow --uid 0 / --gid 0 (not isolated: avoid).
    #[arg(long)]
    pub allow_root: bool,
    /// Kiln: remove a finished jail (its chroot directory and cgroup) instead.
    #[arg(long)]
    pub cleanup: bool,
    /// The VMM's own arguments (for the kiln binary they start with `vmm`).
    #[arg(last = true, value_name = "VMM ARGS")]
    pub vmm_args: Vec<String>,
}

/// A resource limit to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rlimit {
    /// RLIMIT_FSIZE, bytes.
    Fsize(u64),
    /// RLIMIT_NOFILE.
    NoFile(u64),
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct JailConfig {
    pub id: String,
    pub exec_file: PathBuf,
    pub exec_name: String,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub netns: Option<PathBuf>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    /// (file, value) pairs for the cgroup leaf.
    pub cgroups: Vec<(String, String)>,
    /// Relative cgroup path of the parent.
    pub parent_cgroup: String,
    /// Whether --parent-cgroup was given (not the exec-name default).
    pub parent_cgroup_given: bool,
    pub rlimits: Vec<Rlimit>,
    pub cleanup: bool,
    pub vmm_args: Vec<String>,
}

impl JailConfig {
    /// `<base>/<exec name>/<id>`.
    pub fn id_dir(&self) -> PathBuf {
        self.chroot_base.join(&self.exec_name).join(&self.id)
    }

    /// `<base>/<exec name>/<id>/root`.
    pub fn root(&self) -> PathBuf {
        self.id_dir().join("root")
    }
}

/// Checks a jail id: 1 to 64 letters, digits or '-'.
pub fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(Error::Invalid(format!(
            "--id {id:?}: use 1 to 64 letters, digits or '-'"
        )));
    }
    Ok(())
}

/// Parses `--cgroup FILE=VALUE`: FILE is `<controller>.<name>` (no '/').
pub fn parse_cgroup(s: &str) -> Result<(String, String)> {
    let bad = |why: &str| Error::Invalid(format!("--cgroup {s:?}: {why}"));
    let (file, value) = s.split_once('=').ok_or_else(|| bad("use FILE=VALUE"))?;
    let (controller, rest) = file
        .split_once('.')
        .ok_or_else(|| bad("FILE must be <controller>.<name>, e.g. memory.max"))?;
    let ok = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    if !ok(controller) || !ok(rest) || file.contains("..") {
        return Err(bad("FILE must be <controller>.<name>, e.g. memory.max"));
    }
    if value.is_empty() || value.contains('\n') {
        return Err(bad("VALUE must be one non-empty line"));
    }
    Ok((file.to_string(), value.to_string()))
}

/// Parses `--resource-limit RESOURCE=VALUE` (fsize, no-file).
pub fn parse_rlimit(s: &str) -> Result<Rlimit> {
    let bad = |why: &str| Error::Invalid(format!("--resource-limit {s:?}: {why}"));
    let (name, value) = s.split_once('=').ok_or_else(|| bad("use RESOURCE=VALUE"))?;
    let v: u64 = value
        .parse()
        .map_err(|_| bad("VALUE must be a non-negative integer"))?;
    match name {
        "fsize" => Ok(Rlimit::Fsize(v)),
        "no-file" => Ok(Rlimit::NoFile(v)),
        _ => Err(bad("RESOURCE must be fsize or no-file")),
    }
}

/// Checks a relative cgroup path: components of letters, digits, '-', '_', '.'; no '..'.
fn check_parent_cgroup(p: &str) -> Result<()> {
    let ok = !p.is_empty()
        && !p.starts_with('/')
        && p.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "--parent-cgroup {p:?}: use a relative path of names (letters, digits, '-', '_', '.'; no '..')"
        )))
    }
}

fn exec_name(exec_file: &Path) -> Result<String> {
    exec_file
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .map(str::to_string)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "--exec-file {}: needs a file name",
                exec_file.display()
            ))
        })
}

impl JailerArgs {
    /// Validates every flag (step 1); touches nothing.
    pub fn validate(&self) -> Result<JailConfig> {
        check_id(&self.id)?;
        let exec_name = exec_name(&self.exec_file)?;
        if !self.chroot_base_dir.is_absolute() {
            return Err(Error::Invalid(format!(
                "--chroot-base-dir {}: must be an absolute path",
                self.chroot_base_dir.display()
            )));
        }
        let parent_cgroup = self
            .parent_cgroup
            .clone()
            .unwrap_or_else(|| exec_name.clone());
        check_parent_cgroup(&parent_cgroup)?;
        match self.cgroup_version {
            2 => {}
            1 => return Err(Error::Invalid(
                "--cgroup-version 1: Kiln's jailer supports only cgroup v2 (--cgroup-version 2)"
                    .into(),
            )),
            v => {
                return Err(Error::Invalid(format!(
                    "--cgroup-version {v}: use 2 (cgroup v2)"
                )))
            }
        }
        let mut cfg = JailConfig {
            id: self.id.clone(),
            exec_file: self.exec_file.clone(),
            exec_name,
            uid: self.uid.unwrap_or(u32::MAX),
            gid: self.gid.unwrap_or(u32::MAX),
            chroot_base: self.chroot_base_dir.clone(),
            netns: self.netns.clone(),
            daemonize: self.daemonize,
            new_pid_ns: self.new_pid_ns,
            cgroups: Vec::new(),
            parent_cgroup,
            parent_cgroup_given: self.parent_cgroup.is_some(),
            rlimits: Vec::new(),
            cleanup: self.cleanup,
            vmm_args: self.vmm_args.clone(),
        };
        if self.cleanup {
            return Ok(cfg);
        }
        let (uid, gid) = match (self.uid, self.gid) {
            (Some(u), Some(g)) => (u, g),
            _ => return Err(Error::Invalid("--uid and --gid are required".into())),
        };
        if (uid == 0 || gid == 0) && !self.allow_root {
            return Err(Error::Invalid(format!(
                "--uid {uid} --gid {gid}: refusing to run the VMM as root (uid or gid 0); pass --allow-root to insist"
            )));
        }
        cfg.uid = uid;
        cfg.gid = gid;
        let meta = std::fs::metadata(&self.exec_file).map_err(|e| {
            Error::Invalid(format!("--exec-file {}: {e}", self.exec_file.display()))
        })?;
        if !meta.is_file() {
            return Err(Error::Invalid(format!(
                "--exec-file {}: not a regular file",
                self.exec_file.display()
            )));
        }
        if let Some(ns) = &self.netns {
            std::fs::metadata(ns)
                .map_err(|e| Error::Invalid(format!("--netns {}: {e}", ns.display())))?;
        }
        cfg.cgroups = self
            .cgroups
            .iter()
            .map(|c| parse_cgroup(c))
            .collect::<Result<_>>()?;
        cfg.rlimits = self
            .resource_limits
            .iter()
            .map(|r| parse_rlimit(r))
            .collect::<Result<_>>()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: JailerArgs,
    }

    fn parse(extra: &[&str]) -> std::result::Result<JailerArgs, clap::Error> {
        let mut v = vec!["jailer"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).map(|c| c.a)
    }

    #[test]
    fn ids() {
        check_id("a-1-B").unwrap();
        check_id(&"a".repeat(64)).unwrap();
        for bad in ["", "a/b", "..", "a.b", "a b", &"a".repeat(65)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cgroup_values() {
        assert_eq!(
            parse_cgroup("memory.max=268435456").unwrap(),
            ("memory.max".into(), "268435456".into())
        );
        assert_eq!(parse_cgroup("cpuset.cpus=0-1").unwrap().1, "0-1");
        for bad in [
            "memory.max",
            "max=1",
            "../x.max=1",
            "a/b.max=1",
            "memory.max=",
            ".max=1",
        ] {
            assert!(parse_cgroup(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rlimits() {
        assert_eq!(parse_rlimit("fsize=100").unwrap(), Rlimit::Fsize(100));
        assert_eq!(parse_rlimit("no-file=1024").unwrap(), Rlimit::NoFile(1024));
        for bad in ["nofile=1", "fsize=-1", "fsize", "no-file=x"] {
            assert!(parse_rlimit(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn flags_and_vmm_args() {
        let a = parse(&[
            "--id",
            "vm1",
            "--exec-file",
            "/bin/sh",
            "--uid",
            "1234",
            "--gid",
            "1234",
            "--cgroup",
            "pids.max=10",
            "--resource-limit",
            "no-file=100",
            "--",
            "vmm",
            "--api-sock",
            "/api.sock",
        ])
        .unwrap();
        let c = a.validate().unwrap();
        assert_eq!(c.exec_name, "sh");
        assert_eq!(c.parent_cgroup, "sh");
        assert_eq!(c.root(), Path::new("/srv/jailer/sh/vm1/root"));
        assert_eq!(c.cgroups, vec![("pids.max".into(), "10".into())]);
        assert_eq!(c.rlimits, vec![Rlimit::NoFile(100)]);
        assert_eq!(c.vmm_args, vec!["vmm", "--api-sock", "/api.sock"]);
    }

    #[test]
    fn refusals() {
        let base = ["--id", "vm1", "--exec-file", "/bin/sh"];
        let err = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            parse(&v).unwrap().validate().unwrap_err().to_string()
        };
        assert!(err(&["--uid", "0", "--gid", "5"]).contains("--allow-root"));
        assert!(err(&["--uid", "5", "--gid", "0"]).contains("--allow-root"));
        let mut v = base.to_vec();
        v.extend_from_slice(&["--uid", "0", "--gid", "0", "--allow-root"]);
        parse(&v).unwrap().validate().unwrap();
        assert!(
            err(&["--uid", "5", "--gid", "5", "--cgroup-version", "1"]).contains("only cgroup v2")
        );
        assert!(
            err(&["--uid", "5", "--gid", "5", "--parent-cgroup", "../x"])
                .contains("--parent-cgroup")
        );
        assert!(
            err(&["--uid", "5", "--gid", "5", "--chroot-base-dir", "rel"]).contains("absolute")
        );
        let missing = parse(&[
            "--id",
            "x",
            "--exec-file",
            "/no/such/kiln",
            "--uid",
            "5",
            "--gid",
            "5",
        ])
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert!(missing.contains("/no/such/kiln"), "{missing}");
        assert!(parse(&["--id", "x", "--exec-file", "/bin/sh", "--uid", "5"]).is_err());
        assert!(parse(&["--id", "x", "--exec-file", "/bin/sh", "--cleanup"]).is_ok());
    }
}
