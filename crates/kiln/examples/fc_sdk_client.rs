//! A third-party Firecracker client, `firecracker-rs-sdk`, driving Kiln run
//! under the name `firecracker`, exactly as a Firecracker user would.
//!
//! ```text
//! fc_sdk_client --fc PATH/firecracker --sock SOCK --console FILE \
//!     --kernel K [--initrd I] [--boot-args ARGS] [--drive IMG] \
//!     [--ready LINE] [--preboot-only]
//! ```
//!
//! It starts the VMM, asks its version and state, checks that Ctrl-Alt-Del
//! is refused before boot, configures machine, boot source and (optionally)
//! a drive, starts the microVM, pauses and resumes it, waits until the
//! guest's console (the VMM's stdout, sent to `--console`) shows `--ready`,
//! sends Ctrl-Alt-Del (`stop()`) and waits for the VMM process to exit.
//! Every step prints one `fc-client: ...` line; the last is
//! `fc-client: vmm exit status N`. With `--preboot-only` it stops after the
//! pre-boot configuration (no KVM needed) and kills the VMM.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use firecracker_rs_sdk::firecracker::FirecrackerOption;
use firecracker_rs_sdk::instance::Instance;
use firecracker_rs_sdk::models::{BootSource, Drive, InstanceState as State, MachineConfiguration};

#[derive(Default)]
struct Opts {
    fc: PathBuf,
    sock: PathBuf,
    console: PathBuf,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    boot_args: Option<String>,
    drive: Option<PathBuf>,
    ready: String,
    preboot_only: bool,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        ready: "fc-guest-ready".into(),
        ..Opts::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--preboot-only" {
            o.preboot_only = true;
            continue;
        }
        let v = args.next().with_context(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--fc" => o.fc = v.into(),
            "--sock" => o.sock = v.into(),
            "--console" => o.console = v.into(),
            "--kernel" => o.kernel = v.into(),
            "--initrd" => o.initrd = Some(v.into()),
            "--boot-args" => o.boot_args = Some(v),
            "--drive" => o.drive = Some(v.into()),
            "--ready" => o.ready = v,
            _ => bail!("unknown option {a}"),
        }
    }
    for (name, p) in [
        ("--fc", &o.fc),
        ("--sock", &o.sock),
        ("--console", &o.console),
    ] {
        if p.as_os_str().is_empty() {
            bail!("{name} is required");
        }
    }
    Ok(o)
}

/// Waits for the VMM (a child of this process) to exit; its exit code.
fn wait_exit(pid: u32, timeout: Duration) -> Result<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own child's pid with a valid status pointer.
        let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if r == pid as libc::pid_t {
            if libc::WIFEXITED(status) {
                return Ok(libc::WEXITSTATUS(status));
            }
            return Ok(128 + libc::WTERMSIG(status));
        }
        if r < 0 {
            bail!("waitpid: {}", std::io::Error::last_os_error());
        }
        if Instant::now() >= deadline {
            bail!("the VMM did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(o: &Opts) -> Result<()> {
    let mut vm: Instance = FirecrackerOption::new(&o.fc)
        .api_sock(&o.sock)
        .id("fc-sdk-vm")
        .stdout(&o.console)
        .stderr(o.console.with_extension("err"))
        .build()?;
    vm.start_vmm()?;
    let pid = vm.firecracker_pid().context("no VMM pid")?;
    println!("fc-client: started pid {pid}");

    let v = vm.get_firecracker_version()?;
    println!("fc-client: version {}", v.firecracker_version);
    let info = vm.describe_instance()?;
    println!(
        "fc-client: instance {} state {:?} app {}",
        info.id, info.state, info.app_name
    );
    if info.state != State::NotStarted {
        bail!("expected a VM that is not started, got {:?}", info.state);
    }
    // Ctrl-Alt-Del before boot: Firecracker answers 400, the SDK's empty
    // response type cannot hold the fault message.
    match vm.stop() {
        Ok(()) => bail!("SendCtrlAltDel was accepted before boot"),
        Err(e) => println!("fc-client: pre-boot stop refused: {e}"),
    }

    vm.put_machine_configuration(&MachineConfiguration {
        cpu_template: None,
        smt: None,
        mem_size_mib: 256,
        track_dirty_pages: None,
        vcpu_count: 1,
        huge_pages: None,
    })?;
    let mc = vm.get_machine_configuration()?;
    println!(
        "fc-client: machine {} vcpu {} MiB",
        mc.vcpu_count, mc.mem_size_mib
    );
    vm.put_guest_boot_source(&BootSource {
        kernel_image_path: o.kernel.clone(),
        initrd_path: o.initrd.clone(),
        boot_args: o.boot_args.clone(),
    })?;
    println!("fc-client: boot source set");
    if let Some(d) = &o.drive {
        vm.put_guest_drive_by_id(&Drive {
            drive_id: "data".into(),
            partuuid: None,
            is_root_device: false,
            cache_type: None,
            is_read_only: true,
            path_on_host: d.clone(),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        })?;
        println!("fc-client: drive set");
    }
    if o.preboot_only {
        println!("fc-client: pre-boot done");
        // Dropping the instance terminates the VMM.
        drop(vm);
        let code = wait_exit(pid, Duration::from_secs(10))?;
        println!("fc-client: vmm exit status {code}");
        return Ok(());
    }

    vm.start()?;
    let state = vm.describe_instance()?.state;
    println!("fc-client: after start {state:?}");
    vm.pause()?;
    let paused = vm.describe_instance()?.state;
    vm.resume()?;
    let resumed = vm.describe_instance()?.state;
    println!("fc-client: pause {paused:?} resume {resumed:?}");

    // Wait for the guest, asking its state now and then (which also keeps
    // the SDK's one connection busy).
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let console = std::fs::read_to_string(&o.console).unwrap_or_default();
        if console.lines().any(|l| l.trim_end() == o.ready) {
            break;
        }
        if Instant::now() >= deadline {
            bail!("the guest did not print {:?}", o.ready);
        }
        std::thread::sleep(Duration::from_millis(500));
        let s = vm.describe_instance()?.state;
        if s != State::Running {
            bail!("the VM is {s:?} while booting");
        }
    }
    println!("fc-client: guest ready");

    let sent = Instant::now();
    vm.stop()?;
    println!("fc-client: stop sent");
    let code = wait_exit(pid, Duration::from_secs(60))?;
    println!(
        "fc-client: vmm exited after {} ms",
        sent.elapsed().as_millis()
    );
    println!("fc-client: vmm exit status {code}");
    Ok(())
}

fn main() {
    let code = match parse_args().and_then(|o| run(&o)) {
        Ok(()) => 0,
        Err(e) => {
            println!("fc-client: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
