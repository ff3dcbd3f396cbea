//! `kiln serve`: the function runtime (crates/serve) behind a Unix socket.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use kiln_serve::policy::PolicyConfig;
use kiln_serve::vm::VmDefaults;
use kiln_serve::{FunctionSpec, Runtime, ServeConfig};

/// Options of `kiln serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Serve the functions API (HTTP/1.1) on this Unix socket; it appears
    /// once the functions given here are ready.
    #[arg(long, value_name = "PATH")]
    pub sock: PathBuf,
    /// Also serve the API over TCP on HOST:PORT (unauthenticated: bind to
    /// localhost or put a proxy in front).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen_tcp: Option<String>,
    /// State directory: a snapshot and the instances' sockets per function.
    #[arg(long, value_name = "DIR", default_value = "/tmp/kiln-serve")]
    pub dir: PathBuf,
    /// A function: NAME=COMMAND, the command run by `sh -c` in the guest with
    /// the call's body on stdin (repeatable).
    #[arg(long = "function", value_name = "NAME=COMMAND")]
    pub functions: Vec<String>,
    /// Functions from a JSON file: {"NAME": {"command": "...",
    /// "mem_size_mib": 128, "vcpu_count": 1, "timeout_ms": 60000,
    /// "setup": "..."}, ...}; `setup` runs once before the snapshot.
    #[arg(long, value_name = "FILE")]
    pub functions_file: Option<PathBuf>,
    /// Guest kernel. Default: $KILN_KERNEL or Kiln's guest kernel.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Guest initrd with kiln-agent. Default: $KILN_INITRD or Kiln's initramfs.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Guest memory of the --function functions, MiB.
    #[arg(long, default_value_t = 128)]
    pub mem: u64,
    /// Keep-alive (seconds) until a function's idle times are learned.
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    pub keep_alive: f64,
    /// Width of one bin of the idle-time histogram, ms.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    pub policy_bin_ms: u64,
    /// Bins of the idle-time histogram.
    #[arg(long, value_name = "N", default_value_t = 240)]
    pub policy_bins: usize,
    /// Idle times a function needs before its histogram is used.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub policy_min_samples: u64,
    /// Most running instances, all functions together.
    #[arg(long, value_name = "N", default_value_t = 1000)]
    pub max_instances: usize,
    /// Longest a template boot or an instance restore may take, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub start_timeout: u64,
}

fn functions(args: &ServeArgs) -> Result<Vec<(String, FunctionSpec)>> {
    let mut out = Vec::new();
    if let Some(f) = &args.functions_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("{}", f.display()))?;
        let map: std::collections::BTreeMap<String, FunctionSpec> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a functions file", f.display()))?;
        out.extend(map);
    }
    for f in &args.functions {
        let Some((name, cmd)) = f.split_once('=') else {
            bail!("--function {f:?}: expected NAME=COMMAND");
        };
        let mut spec = FunctionSpec::new(cmd);
        spec.mem_size_mib = args.mem;
        out.push((name.to_string(), spec));
    }
    for (name, spec) in &out {
        kiln_serve::validate_name(name)
            .and_then(|()| spec.validate())
            .map_err(|e| anyhow::anyhow!("function {name:?}: {e}"))?;
    }
    Ok(out)
}

/// Runs the server until it is killed.
pub fn serve(args: ServeArgs) -> Result<i32> {
    let fns = functions(&args)?;
    let Ok(keep_alive) = Duration::try_from_secs_f64(args.keep_alive) else {
        bail!("--keep-alive {}: expected seconds", args.keep_alive);
    };
    let (kernel, initrd) = match &args.kernel {
        Some(k) => (k.clone(), args.initrd.clone()),
        None => {
            let (mut kernel, mut initrd) = (None, None);
            kiln_lab::images::resolve_guest(&mut kernel, &mut initrd)
                .context("building Kiln's guest images")?;
            (kernel.expect("resolved"), initrd)
        }
    };
    let Some(initrd) = initrd else {
        bail!("--initrd is needed with --kernel: the guest must start kiln-agent");
    };
    for p in [&kernel, &initrd] {
        if !p.exists() {
            bail!("{}: no such file", p.display());
        }
    }
    if !matches!(
        kiln_vmm::probe::probe(),
        kiln_vmm::probe::KvmProbe::Native(_)
    ) {
        bail!(
            "this host's KVM does not run guests natively; run kiln serve in the lab \
             (kiln lab 'kiln serve ...') or on a KVM host"
        );
    }
    let cfg = ServeConfig {
        vm: VmDefaults {
            exe: std::env::current_exe()?,
            kernel,
            initrd,
            cmdline: kiln_vmm::DEFAULT_CMDLINE.to_string(),
            start_timeout: Duration::from_secs(args.start_timeout),
        },
        dir: args.dir.clone(),
        policy: PolicyConfig {
            bin: Duration::from_millis(args.policy_bin_ms.max(1)),
            bins: args.policy_bins.max(1),
            min_samples: args.policy_min_samples,
            fixed_keep_alive: keep_alive,
            ..PolicyConfig::default()
        },
        max_instances: args.max_instances,
        tick: Duration::from_millis(20),
    };
    let rt = Runtime::new(cfg)?;
    for (name, spec) in fns {
        rt.register(&name, spec)?;
        let s = rt.stats(&name)?;
        eprintln!(
            "kiln serve: function {name} ready (boot to snapshot {:.0} ms)",
            s.snapshot_ms
        );
    }
    let _ = std::fs::remove_file(&args.sock);
    let listener = std::os::unix::net::UnixListener::bind(&args.sock)
        .with_context(|| format!("binding {}", args.sock.display()))?;
    eprintln!("kiln serve: listening on {}", args.sock.display());
    if let Some(addr) = &args.listen_tcp {
        let tcp = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        eprintln!("kiln serve: listening on tcp {}", tcp.local_addr()?);
        let rt = rt.clone();
        std::thread::Builder::new()
            .name("kiln_serve_tcp_accept".into())
            .spawn(move || {
                if let Err(e) = kiln_serve::serve_tcp(rt, tcp) {
                    eprintln!("kiln serve: tcp: {e}");
                }
            })?;
    }
    let r = kiln_serve::serve(rt.clone(), listener);
    rt.shutdown();
    r.with_context(|| format!("serving {}", args.sock.display()))?;
    Ok(0)
}
