//! vCPU threads: each owns its KVM vCPU and dispatches I/O exits to the buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kiln_devices::Bus;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::stats::{inc, VcpuCounters};

/// Why a vCPU stopped running.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for a reset (KVM system event).
    Reset,
    /// A triple fault (KVM_EXIT_SHUTDOWN), with the vCPU's registers: a
    /// reset only if the guest asked for one just before (Linux falls back
    /// to a triple fault when a keyboard-controller reset has not happened
    /// yet); otherwise the guest died.
    TripleFault(String),
    /// The guest asked to power off.
    Shutdown,
    /// The guest crashed (KVM system event).
    Crash,
    /// KVM could not run the vCPU.
    Error(String),
}

/// Pause control shared by the VMM and its vCPU threads: a paused vCPU parks
/// at the top of its run loop (an instruction boundary: KVM_RUN returned).
#[derive(Default)]
pub struct PauseState {
    inner: Mutex<PauseInner>,
    cv: Condvar,
}

/// Work for parked vCPU threads (e.g. saving their state): each parked
/// thread runs it once with its own vCPU.
pub type ParkedTask = Arc<dyn Fn(u8, &mut VcpuFd) + Send + Sync>;

#[derive(Default)]
struct PauseInner {
    paused: bool,
    parked: usize,
    task: Option<(u64, ParkedTask)>,
    task_gen: u64,
}

impl PauseState {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks vCPUs to park (they still need a kick to leave KVM_RUN).
    pub fn request_pause(&self) {
        self.lock().paused = true;
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.cv.notify_all();
    }

    /// Whether a pause is requested.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Waits up to `timeout` for `n` vCPUs to be parked.
    pub fn wait_parked(&self, n: usize, timeout: Duration) -> bool {
        let g = self.lock();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |i| i.parked < n)
            .unwrap_or_else(|e| e.into_inner());
        g.parked >= n
    }

    /// Has every parked vCPU run `task` once (the VM must be paused, with
    /// all `n` vCPUs parked). The task reports its results itself (e.g.
    /// through a channel); this only hands it out.
    pub fn run_on_parked(&self, task: ParkedTask) {
        let mut g = self.lock();
        g.task_gen += 1;
        let gen = g.task_gen;
        g.task = Some((gen, task));
        self.cv.notify_all();
    }

    /// Parks the calling vCPU while a pause is requested.
    fn park(&self, index: u8, vcpu: &mut VcpuFd, stop: &AtomicBool, stats: &VcpuCounters) {
        let mut g = self.lock();
        if !g.paused {
            return;
        }
        // Tell the guest's kvmclock it was stopped by the host, so its
        // watchdogs do not report the pause as a soft lockup.
        if let Err(e) = vcpu.kvmclock_ctrl() {
            inc(&stats.kvmclock_ctrl_fails);
            log::debug!("vcpu{index}: KVM_KVMCLOCK_CTRL: {e}");
        }
        g.parked += 1;
        self.cv.notify_all();
        // Tasks handed out before this thread parked are not for it.
        let mut seen = g.task_gen;
        while g.paused && !stop.load(Ordering::Acquire) {
            if let Some((gen, task)) = g.task.clone() {
                if gen != seen {
                    seen = gen;
                    drop(g);
                    task(index, vcpu);
                    g = self.lock();
                    continue;
                }
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        g.parked -= 1;
    }
}

/// What a vCPU thread shares with the VMM.
pub struct VcpuContext {
    /// Port I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Set by the VMM to make every vCPU return.
    pub stop: Arc<AtomicBool>,
    /// Signalled when this vCPU stops on its own.
    pub exit_evt: EventFd,
    /// The first stop reason reported by any vCPU.
    pub reason: Arc<Mutex<Option<VcpuStop>>>,
    /// Pause requests.
    pub pause: Arc<PauseState>,
    /// Exit counters (shared by every vCPU).
    pub stats: Arc<VcpuCounters>,
}

/// Logs the registers of a vCPU that shut down (triple fault).
/// Where a vCPU was when it triple-faulted (logged, and part of the error
/// when the guest did not ask for a reset).
fn triple_fault_registers(index: u8, vcpu: &VcpuFd) -> String {
    let text = match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "vcpu{index}: rip={:#x} rsp={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
            r.rip, r.rsp, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.cs.selector
        ),
        (r, s) => format!(
            "vcpu{index}: registers unavailable: {:?} {:?}",
            r.err(),
            s.err()
        ),
    };
    log::info!("shutdown (triple fault): {text}");
    text
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// Runs `vcpu` until the guest stops it or the VMM sets `stop`.
pub fn run_vcpu(index: u8, mut vcpu: VcpuFd, ctx: VcpuContext) {
    let stop = loop {
        if ctx.stop.load(Ordering::Acquire) {
            return;
        }
        ctx.pause.park(index, &mut vcpu, &ctx.stop, &ctx.stats);
        if ctx.stop.load(Ordering::Acquire) {
            return;
        }
        match vcpu.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    inc(&ctx.stats.exit_io_in);
                    if !ctx.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                    }
                }
                VcpuExit::IoOut(port, data) => {
                    inc(&ctx.stats.exit_io_out);
                    ctx.pio.write(u64::from(port), data);
                }
                VcpuExit::MmioRead(addr, data) => {
                    inc(&ctx.stats.exit_mmio_read);
                    if !ctx.mmio.read(addr, data) {
                        log::debug!("vcpu{index}: unhandled MMIO read at {addr:#x}");
                        data.fill(0);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    inc(&ctx.stats.exit_mmio_write);
                    if !ctx.mmio.write(addr, data) {
                        log::debug!("vcpu{index}: unhandled MMIO write at {addr:#x}");
                    }
                }
                VcpuExit::Shutdown => {
                    // A triple fault: a reset the guest asked for, or a dead
                    // guest; the VMM tells which (see VcpuStop::TripleFault).
                    break VcpuStop::TripleFault(triple_fault_registers(index, &vcpu));
                }
                VcpuExit::SystemEvent(kind, _) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => break VcpuStop::Shutdown,
                    KVM_SYSTEM_EVENT_RESET => break VcpuStop::Reset,
                    KVM_SYSTEM_EVENT_CRASH => break VcpuStop::Crash,
                    other => break VcpuStop::Error(format!("unknown system event {other}")),
                },
                VcpuExit::Hlt => {
                    break VcpuStop::Error("vCPU halted with no interrupt controller".into())
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    break VcpuStop::Error(format!(
                        "KVM entry failed (hardware reason {reason:#x} on cpu {cpu})"
                    ))
                }
                VcpuExit::InternalError => {
                    break VcpuStop::Error(
                        "KVM internal error (the host cannot emulate this guest)".into(),
                    )
                }
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
                other => {
                    break VcpuStop::Error(format!("unexpected vCPU exit {other:?}"));
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => break VcpuStop::Error(format!("KVM_RUN failed: {e}")),
        }
    };
    log::debug!("vcpu{index} stopped: {stop:?}");
    if matches!(stop, VcpuStop::Error(_)) {
        inc(&ctx.stats.failures);
    }
    let mut reason = ctx.reason.lock().expect("stop reason lock poisoned");
    if reason.is_none() {
        *reason = Some(stop);
    }
    drop(reason);
    if let Err(e) = ctx.exit_evt.write(1) {
        log::error!("vcpu{index}: cannot notify the VMM: {e}");
    }
}
