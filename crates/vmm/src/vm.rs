//! The VM: KVM objects, guest memory, legacy devices, vCPU threads and the
//! VMM's event loop.

use kiln_devices::GuestMem;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_devices::boot_timer::{BootTimer, BOOT_TIMER_ADDR, BOOT_TIMER_LEN};
use kiln_devices::cmos::Cmos;
use kiln_devices::i8042::{I8042, I8042_IRQ, I8042_PORT, I8042_PORT_LEN};
use kiln_devices::power::SleepControl;
use kiln_devices::pvpanic::{PvPanic, PVPANIC_ADDR, PVPANIC_LEN};
use kiln_devices::serial::{ConsoleWriter, Serial, COM1_IRQ, COM1_PORT};
use kiln_devices::virtio::balloon::{Balloon, BalloonHandle};
use kiln_devices::virtio::block::{Block, BlockHandle};
use kiln_devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use kiln_devices::virtio::net::{Net, NetHandle};
use kiln_devices::virtio::rng::Rng;
use kiln_devices::virtio::vsock::Vsock;
use kiln_devices::virtio::VirtioDevice;
use kiln_devices::{Bus, EventFdTrigger};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::layout::*;
use crate::stats::{inc, Counted, DeviceKind, DeviceStats, Shared, VmStats};
use crate::vcpu::{run_vcpu, PauseState, VcpuContext, VcpuStop};
use crate::{acpi, boot, cpuid, mptable, regs, VmConfig, VmmError};

type Result<T> = std::result::Result<T, VmmError>;

/// How the guest ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest rebooted (`reboot`, with reboot=k): Kiln ends the VM.
    Reboot,
    /// The guest powered off through ACPI.
    Poweroff,
    /// The guest kernel panicked.
    GuestPanic,
    /// A vCPU failed.
    VcpuError(String),
    /// The VM was migrated away ([`VmHandle::end_migrated`]): it runs
    /// elsewhere now.
    Migrated,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |source| VmmError::Io { what, source }
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// A handle for pausing, resuming and snapshotting a VM from another
/// thread (the API).
#[derive(Clone)]
pub struct VmHandle {
    pub(crate) pause: Arc<PauseState>,
    threads: Arc<Mutex<Vec<libc::pthread_t>>>,
    pub(crate) vcpus: usize,
    pub(crate) parts: Arc<crate::snapshot::VmParts>,
    pub(crate) keyboard: Arc<Mutex<I8042>>,
    /// Ends the event loop with [`ExitReason::Migrated`].
    migrated_evt: Arc<EventFd>,
}

impl VmHandle {
    /// Stops every vCPU at an instruction boundary; returns once all are
    /// parked (or an error after 2 s).
    pub fn pause(&self) -> std::result::Result<(), String> {
        self.pause.request_pause();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            for t in self
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
            {
                // SAFETY: `t` is the pthread of a vCPU thread of this process;
                // the signal's handler only interrupts KVM_RUN. The ids are
                // removed before the threads are joined.
                unsafe { libc::pthread_kill(*t, SIGRTMIN()) };
            }
            if self
                .pause
                .wait_parked(self.vcpus, Duration::from_millis(10))
            {
                break;
            }
            if Instant::now() >= deadline {
                return Err("the vCPUs did not stop within 2 s".into());
            }
        }
        // Then the devices: nothing touches guest memory while paused.
        if let Err(e) = self.parts.pause_devices() {
            self.resume();
            return Err(e);
        }
        Ok(())
    }

    /// Lets the devices and the vCPUs run again.
    pub fn resume(&self) {
        self.parts.resume_devices();
        self.pause.resume();
    }

    /// Keeps the vCPUs parked from the moment they start, and the devices
    /// paused (a VM restored without `resume_vm`), until [`VmHandle::resume`].
    pub fn hold_paused(&self) -> std::result::Result<(), String> {
        self.pause.request_pause();
        self.parts.pause_devices()
    }

    /// Whether the VM is paused (or being paused).
    pub fn is_paused(&self) -> bool {
        self.pause.is_paused()
    }

    /// Types Ctrl-Alt-Del on the guest's i8042 keyboard (Firecracker's
    /// `SendCtrlAltDel`); a Linux guest reboots, which ends the VM.
    pub fn send_ctrl_alt_del(&self) -> std::result::Result<(), String> {
        self.keyboard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send_ctrl_alt_del()
            .map_err(|e| format!("Cannot send Ctrl-Alt-Del: {e}"))
    }

    /// Ends [`Vmm::run`] with [`ExitReason::Migrated`] (after a migration
    /// the destination confirmed). The vCPUs must be paused: they stop
    /// without running guest code again.
    pub fn end_migrated(&self) -> std::result::Result<(), String> {
        self.migrated_evt
            .write(1)
            .map_err(|e| format!("ending the VM: {e}"))
    }
}

/// A built VM, ready to run.
pub struct Vmm {
    config: VmConfig,
    // The VM and memory must outlive the vCPUs; fields drop in order.
    vcpus: Vec<VcpuFd>,
    _vm: Arc<VmFd>,
    _kvm: Arc<Kvm>,
    _mem: GuestMem,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<Serial>>,
    reset_evt: EventFd,
    power_evt: EventFd,
    panic_evt: EventFd,
    exit_evt: EventFd,
    panicked: Arc<AtomicBool>,
    boot_timer: Arc<Mutex<BootTimer>>,
    balloon: Option<BalloonHandle>,
    drives: Vec<BlockHandle>,
    nets: Vec<NetHandle>,
    handle: VmHandle,
    stats: VmStats,
}

impl Vmm {
    /// Validates `config`, creates the VM and loads the guest. `console`
    /// receives the guest's serial output; `start` is when the VMM began
    /// (for the boot timer).
    pub fn new(config: VmConfig, console: Box<dyn Write + Send>, start: Instant) -> Result<Self> {
        config.validate()?;
        // Fail early, with the path, before touching KVM.
        boot::check_kernel_file(&config.kernel)?;
        if let Some(initrd) = &config.initrd {
            std::fs::metadata(initrd).map_err(|source| boot::BootError::Initrd {
                path: initrd.clone(),
                source,
            })?;
        }

        let (kvm_fd, vm) = create_vm()?;
        let mem_bytes = config.mem_mib << 20;
        let mem = GuestMem::from_ranges(&ram_ranges(mem_bytes)).map_err(|e| VmmError::Memory {
            mib: config.mem_mib,
            detail: e.to_string(),
        })?;
        register_memory(&vm, &mem, config.mem_mib, config.track_dirty_pages)?;

        // Guest image and boot tables.
        let kernel = boot::load_kernel(&mem, &config.kernel)?;
        log::info!(
            "kernel {}: {:?} entry at {:#x}",
            config.kernel.display(),
            kernel.protocol,
            kernel.entry
        );
        let initrd = match &config.initrd {
            Some(p) => Some(boot::load_initrd(&mem, p, &kernel, mem_bytes)?),
            None => None,
        };
        let devs = build_devices(&config, &vm, &mem, console, start)?;
        let mmio_infos = devs.mmio_infos.clone();

        // Boot data: command line (with the devices for kernels that read
        // them there), MP table, ACPI tables (with the devices in the DSDT),
        // zero page or PVH start info.
        let cmdline = cmdline_with_virtio(&config.cmdline, &mmio_infos);
        if cmdline.len() >= CMDLINE_MAX {
            return Err(VmmError::Config(format!(
                "kernel command line with device entries is {} bytes; the limit is {}",
                cmdline.len(),
                CMDLINE_MAX - 1
            )));
        }
        boot::write_cmdline(&mem, &cmdline)?;
        mem.write_slice(&mptable::build(config.vcpus), GuestAddress(EBDA_START))
            .map_err(|e| VmmError::Device(format!("writing the MP table: {e}")))?;
        let rsdp = acpi::write(&mem, config.vcpus, &mmio_infos)?;
        boot::write_boot_info(
            &mem,
            &boot::BootInfo {
                kernel: &kernel,
                initrd,
                cmdline_len: cmdline.len(),
                mem_bytes,
                rsdp,
            },
        )?;

        // vCPUs.
        let supported = kvm_fd
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        if let Some(t) = &config.cpu_template {
            t.check_capabilities(&kvm_fd)?;
        }
        let mut vcpus = Vec::with_capacity(config.vcpus as usize);
        for index in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm("KVM_CREATE_VCPU"))?;
            let mut cpuid = supported.clone();
            // The template first: per-vCPU topology (APIC IDs, core
            // counts) is Kiln's whatever the template says.
            if let Some(t) = &config.cpu_template {
                t.apply_cpuid(&mut cpuid)?;
            }
            cpuid::normalize(cpuid.as_mut_slice(), index, config.vcpus);
            vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
            regs::setup_msrs(&vcpu)?;
            if let Some(t) = &config.cpu_template {
                t.apply_msrs(&vcpu)?;
            }
            regs::setup_fpu(&vcpu)?;
            regs::setup_lapic(&vcpu)?;
            if index == 0 {
                regs::setup_sregs(&mem, &vcpu, kernel.protocol)?;
                regs::setup_regs(&vcpu, kernel.protocol, kernel.entry)?;
            }
            vcpus.push(vcpu);
        }

        Self::assemble(config, kvm_fd, vm, mem, devs, vcpus)
    }

    /// The Vmm around built parts.
    pub(crate) fn assemble(
        config: VmConfig,
        kvm_fd: Kvm,
        vm: VmFd,
        mem: GuestMem,
        devs: Devices,
        vcpus: Vec<VcpuFd>,
    ) -> Result<Self> {
        let migrated_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(io("eventfd"))?);
        let vcpu_count = vcpus.len();
        let vm = Arc::new(vm);
        let kvm_fd = Arc::new(kvm_fd);
        let parts = Arc::new(crate::snapshot::VmParts {
            kvm: kvm_fd.clone(),
            vm: vm.clone(),
            mem: mem.clone(),
            serial: devs.serial.clone(),
            transports: devs.transports.clone(),
            dirty_log: config.track_dirty_pages.into(),
        });
        Ok(Self {
            config,
            vcpus,
            _vm: vm,
            _kvm: kvm_fd,
            _mem: mem,
            pio: devs.pio,
            mmio: devs.mmio,
            serial: devs.serial,
            reset_evt: devs.reset_evt,
            power_evt: devs.power_evt,
            panic_evt: devs.panic_evt,
            exit_evt: devs.exit_evt,
            panicked: devs.panicked,
            boot_timer: devs.boot_timer,
            balloon: devs.balloon,
            drives: devs.drives,
            nets: devs.nets,
            stats: devs.stats,
            handle: VmHandle {
                pause: Arc::new(PauseState::default()),
                threads: Arc::new(Mutex::new(Vec::new())),
                vcpus: vcpu_count,
                parts,
                keyboard: devs.keyboard,
                migrated_evt,
            },
        })
    }

    /// The VM's counters (for the metrics).
    pub fn stats(&self) -> VmStats {
        self.stats.clone()
    }

    /// The configuration this VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Host virtual address ranges (start, length) backing guest RAM.
    pub fn guest_memory_host_ranges(&self) -> Vec<(u64, u64)> {
        self._mem
            .iter()
            .filter_map(|r| {
                let host = self._mem.get_host_address(r.start_addr()).ok()?;
                Some((host as u64, r.len()))
            })
            .collect()
    }

    /// Pause and resume, from any thread.
    pub fn handle(&self) -> VmHandle {
        self.handle.clone()
    }

    /// The balloon, when the VM has one.
    pub fn balloon(&self) -> Option<BalloonHandle> {
        self.balloon.clone()
    }

    /// The disks, for run-time updates (`PATCH /drives/{id}`).
    pub fn drives(&self) -> Vec<BlockHandle> {
        self.drives.clone()
    }

    /// The network interfaces, for run-time limiter updates.
    pub fn nets(&self) -> Vec<NetHandle> {
        self.nets.clone()
    }

    /// The boot time the guest reported through the boot timer, if it did.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_timer.lock().ok().and_then(|t| t.boot_time())
    }

    /// Runs the guest until it ends. `input`, if given, is read (non-blocking
    /// is not required) and fed to the serial port.
    pub fn run(&mut self, input: Option<RawFd>) -> Result<ExitReason> {
        self.run_notify(input, || {})
    }

    /// [`Vmm::run`], calling `on_started` once every vCPU thread has been
    /// started (before the event loop; not called if starting one failed).
    /// `kiln vmm` answers the API's `InstanceStart` from there.
    pub fn run_notify(
        &mut self,
        input: Option<RawFd>,
        on_started: impl FnOnce(),
    ) -> Result<ExitReason> {
        register_signal_handler(SIGRTMIN(), kick_handler).map_err(|e| VmmError::Io {
            what: "vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let reason = Arc::new(Mutex::new(None));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for (index, vcpu) in self.vcpus.drain(..).enumerate() {
            let ctx = VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                stop: stop.clone(),
                exit_evt: self.exit_evt.try_clone().map_err(io("vCPU exit eventfd"))?,
                reason: reason.clone(),
                pause: self.handle.pause.clone(),
                stats: self.stats.vcpu.clone(),
            };
            // Each vCPU installs its filter before its first KVM_RUN.
            let spawned = kiln_seccomp::spawn(
                kiln_seccomp::ThreadKind::Vcpu,
                format!("kiln_vcpu{index}"),
                move || run_vcpu(index as u8, vcpu, ctx),
            );
            let t = match spawned {
                Ok(t) => t,
                Err(e) => {
                    stop_vcpus(&self.handle, &stop, threads);
                    return Err(VmmError::Io {
                        what: "spawning a vCPU thread",
                        source: e,
                    });
                }
            };
            self.handle
                .threads
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(std::os::unix::thread::JoinHandleExt::as_pthread_t(&t));
            threads.push(t);
        }
        // The main thread's own filter, before the event loop handles
        // anything the guest does.
        let outcome = match kiln_seccomp::apply(kiln_seccomp::ThreadKind::Vmm) {
            Ok(()) => {
                on_started();
                self.event_loop(input, &reason)
            }
            Err(e) => Err(VmmError::Config(e.to_string())),
        };
        stop_vcpus(&self.handle, &stop, threads);
        outcome
    }

    fn event_loop(
        &self,
        input: Option<RawFd>,
        reason: &Mutex<Option<VcpuStop>>,
    ) -> Result<ExitReason> {
        const RESET: u64 = 1;
        const POWER: u64 = 2;
        const PANIC: u64 = 3;
        const VCPU: u64 = 4;
        const INPUT: u64 = 5;
        const MIGRATED: u64 = 6;
        let epoll = Epoll::new().map_err(io("epoll_create"))?;
        let add = |fd: RawFd, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(io("epoll_ctl"))
        };
        add(self.reset_evt.as_raw_fd(), RESET)?;
        add(self.power_evt.as_raw_fd(), POWER)?;
        add(self.panic_evt.as_raw_fd(), PANIC)?;
        add(self.exit_evt.as_raw_fd(), VCPU)?;
        add(self.handle.migrated_evt.as_raw_fd(), MIGRATED)?;
        let mut input = input;
        if let Some(fd) = input {
            // Regular files and /dev/null cannot be polled: no input then.
            if add(fd, INPUT).is_err() {
                input = None;
            }
        }
        let mut pending: Vec<u8> = Vec::new();
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let timeout = if pending.is_empty() { -1 } else { 10 };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(VmmError::Io {
                        what: "epoll_wait",
                        source: e,
                    })
                }
            };
            for ev in &events[..n] {
                inc(&self.stats.device_events);
                match ev.data() {
                    RESET => return Ok(self.end(ExitReason::Reboot)),
                    POWER => return Ok(self.end(ExitReason::Poweroff)),
                    PANIC => return Ok(ExitReason::GuestPanic),
                    MIGRATED => return Ok(ExitReason::Migrated),
                    VCPU => {
                        let r = reason.lock().expect("stop reason lock poisoned").clone();
                        return Ok(match r {
                            Some(VcpuStop::Reset) => self.end(ExitReason::Reboot),
                            // A guest that asked the keyboard controller for
                            // a reset may triple-fault before this loop has
                            // seen the request: still a reboot. Any other
                            // triple fault is a guest that died; it must not
                            // look like a reboot.
                            Some(VcpuStop::TripleFault(regs)) => {
                                if self.reset_evt.read().is_ok() {
                                    self.end(ExitReason::Reboot)
                                } else {
                                    ExitReason::VcpuError(format!(
                                        "the guest triple-faulted without asking for a reset ({regs})"
                                    ))
                                }
                            }
                            Some(VcpuStop::Shutdown) => self.end(ExitReason::Poweroff),
                            Some(VcpuStop::Crash) => ExitReason::GuestPanic,
                            Some(VcpuStop::Error(e)) => ExitReason::VcpuError(e),
                            None => ExitReason::VcpuError("vCPU stopped without a reason".into()),
                        });
                    }
                    INPUT => {
                        let mut buf = [0u8; 256];
                        let fd = input.expect("input token without an input fd");
                        // SAFETY: `buf` is valid for writes of its length; `fd` is the
                        // caller's open descriptor.
                        let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
                        if r <= 0 {
                            // EOF or error: stop reading input, keep running the guest.
                            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        } else {
                            pending.extend_from_slice(&buf[..r as usize]);
                        }
                    }
                    _ => {}
                }
            }
            if !pending.is_empty() {
                let n = self
                    .serial
                    .lock()
                    .expect("serial lock poisoned")
                    .enqueue_input(&pending);
                pending.drain(..n);
            }
        }
    }

    /// A clean end is a panic if the console or pvpanic saw one first.
    fn end(&self, clean: ExitReason) -> ExitReason {
        if self.panicked.load(Ordering::SeqCst) {
            ExitReason::GuestPanic
        } else {
            clean
        }
    }
}

/// Devices of a VM, built from its config, before boot data or restore.
pub(crate) struct Devices {
    pub(crate) pio: Arc<Bus>,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) serial: Arc<Mutex<Serial>>,
    /// Each virtio transport with its MMIO base.
    pub(crate) transports: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
    pub(crate) mmio_infos: Vec<acpi::MmioDeviceInfo>,
    pub(crate) balloon: Option<BalloonHandle>,
    /// The disks and network interfaces, for run-time updates.
    pub(crate) drives: Vec<BlockHandle>,
    pub(crate) nets: Vec<NetHandle>,
    pub(crate) boot_timer: Arc<Mutex<BootTimer>>,
    /// The i8042 (for SendCtrlAltDel).
    pub(crate) keyboard: Arc<Mutex<I8042>>,
    pub(crate) reset_evt: EventFd,
    pub(crate) power_evt: EventFd,
    pub(crate) panic_evt: EventFd,
    pub(crate) exit_evt: EventFd,
    pub(crate) panicked: Arc<AtomicBool>,
    pub(crate) stats: VmStats,
}

/// Opens KVM and creates the VM with its in-kernel irqchip and PIT.
pub(crate) fn create_vm() -> Result<(Kvm, VmFd)> {
    let kvm_fd = Kvm::new().map_err(VmmError::KvmOpen)?;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
    ] {
        if !kvm_fd.check_extension(cap) {
            return Err(VmmError::Config(format!("this host's KVM lacks {name}")));
        }
    }
    let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDR as usize)
        .map_err(kvm("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm("KVM_CREATE_PIT2"))?;

    Ok((kvm_fd, vm))
}

/// Registers every region of `mem` with KVM, logging dirty pages if
/// `log_dirty`.
pub(crate) fn register_memory(
    vm: &VmFd,
    mem: &GuestMem,
    mem_mib: u64,
    log_dirty: bool,
) -> Result<()> {
    crate::dirty::set_slots(vm, mem, log_dirty).map_err(|detail| VmmError::Memory {
        mib: mem_mib,
        detail,
    })
}

/// Builds the legacy and virtio devices of `config` on `vm`.
pub(crate) fn build_devices(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestMem,
    console: Box<dyn Write + Send>,
    start: Instant,
) -> Result<Devices> {
    // Legacy devices.
    let evt = |what| EventFd::new(libc::EFD_NONBLOCK).map_err(io(what));
    let reset_evt = evt("reset eventfd")?;
    let power_evt = evt("poweroff eventfd")?;
    let panic_evt = evt("panic eventfd")?;
    let exit_evt = evt("vCPU exit eventfd")?;
    let panicked = Arc::new(AtomicBool::new(false));
    let pio = Arc::new(Bus::new());
    let mmio = Arc::new(Bus::new());
    let dev_err = |e: kiln_devices::BusError| VmmError::Device(e.to_string());

    let serial_irq = evt("serial irq eventfd")?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm("KVM_IRQFD (serial)"))?;
    let serial = Arc::new(Mutex::new(Serial::new(
        EventFdTrigger::new(serial_irq),
        ConsoleWriter::new(console, panicked.clone()),
    )));
    let mut stats = VmStats::default();
    pio.insert(
        Arc::new(Mutex::new(Counted {
            dev: Shared(serial.clone()),
            counters: stats.uart.clone(),
        })),
        COM1_PORT,
        8,
    )
    .map_err(dev_err)?;
    let reset = EventFdTrigger::new(reset_evt.try_clone().map_err(io("reset eventfd"))?);
    let kbd_irq = evt("i8042 irq eventfd")?;
    vm.register_irqfd(&kbd_irq, I8042_IRQ)
        .map_err(kvm("KVM_IRQFD (i8042)"))?;
    let keyboard = Arc::new(Mutex::new(
        I8042::new(reset).with_irq(EventFdTrigger::new(kbd_irq)),
    ));
    pio.insert(
        Arc::new(Mutex::new(Counted {
            dev: Shared(keyboard.clone()),
            counters: stats.i8042.clone(),
        })),
        I8042_PORT,
        I8042_PORT_LEN,
    )
    .map_err(dev_err)?;
    pio.insert(
        Arc::new(Mutex::new(Counted {
            dev: Cmos::new(),
            counters: stats.rtc.clone(),
        })),
        0x70,
        2,
    )
    .map_err(dev_err)?;
    let sleep = SleepControl::new(
        acpi::S5_SLEEP_TYPE,
        power_evt.try_clone().map_err(io("poweroff eventfd"))?,
    );
    pio.insert(
        Arc::new(Mutex::new(sleep)),
        u64::from(acpi::SLEEP_CONTROL_PORT),
        1,
    )
    .map_err(dev_err)?;
    let boot_timer = Arc::new(Mutex::new(BootTimer::new(start)));
    mmio.insert(boot_timer.clone(), BOOT_TIMER_ADDR, BOOT_TIMER_LEN)
        .map_err(dev_err)?;
    let pvpanic = PvPanic::new(
        panicked.clone(),
        panic_evt.try_clone().map_err(io("panic eventfd"))?,
    );
    mmio.insert(Arc::new(Mutex::new(pvpanic)), PVPANIC_ADDR, PVPANIC_LEN)
        .map_err(dev_err)?;

    // Virtio devices: opened now so bad paths fail before the guest runs.
    // Each is registered with its stats label (kind and id), in the order
    // of the MMIO windows (which a snapshot's devices are matched by).
    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut register = |kind: DeviceKind, id: String, dev: Box<dyn VirtioDevice>| {
        stats.devices.push(DeviceStats {
            kind,
            id,
            metrics: dev.metrics(),
        });
        virtio.push(dev);
    };
    let (mut drives, mut nets) = (Vec::new(), Vec::new());
    for d in &config.disks {
        let b = Block::new(d.clone()).map_err(|e| VmmError::Device(e.to_string()))?;
        drives.push(b.handle());
        register(DeviceKind::Block, d.id.clone(), Box::new(b));
    }
    for n in &config.nets {
        let d = Net::new(n.clone()).map_err(|e| VmmError::Device(e.to_string()))?;
        nets.push(d.handle());
        register(DeviceKind::Net, n.id.clone(), Box::new(d));
    }
    if let Some(v) = &config.vsock {
        let d = Vsock::new(v.clone()).map_err(|e| VmmError::Device(e.to_string()))?;
        register(DeviceKind::Vsock, String::new(), Box::new(d));
    }
    if config.rng {
        let d = Rng::with_rate_limiter(config.rng_rate_limiter);
        register(DeviceKind::Rng, String::new(), Box::new(d));
    }
    let mut balloon = None;
    if let Some(cfg) = &config.balloon {
        let b = Balloon::new(cfg.clone());
        balloon = Some(b.handle());
        register(DeviceKind::Balloon, String::new(), Box::new(b));
    }
    let mut mmio_infos = Vec::new();
    let mut transports = Vec::new();
    for (i, dev) in virtio.into_iter().enumerate() {
        let info = acpi::MmioDeviceInfo {
            addr: VIRTIO_MMIO_START + i as u64 * MMIO_WINDOW,
            len: MMIO_WINDOW,
            irq: VIRTIO_IRQ_BASE + i as u32,
        };
        let irqfd = evt("virtio irq eventfd")?;
        vm.register_irqfd(&irqfd, info.irq)
            .map_err(kvm("KVM_IRQFD (virtio)"))?;
        let mut queue_evts = Vec::new();
        for q in 0..dev.queue_max_sizes().len() {
            let e = evt("virtio queue eventfd")?;
            vm.register_ioevent(
                &e,
                &IoEventAddress::Mmio(info.addr + QUEUE_NOTIFY),
                q as u32,
            )
            .map_err(kvm("KVM_IOEVENTFD"))?;
            queue_evts.push(e);
        }
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            dev,
            mem.clone(),
            queue_evts,
            irqfd,
        )));
        mmio.insert(transport.clone(), info.addr, info.len)
            .map_err(dev_err)?;
        transports.push((info.addr, transport));
        mmio_infos.push(info);
    }

    Ok(Devices {
        pio,
        mmio,
        serial,
        transports,
        mmio_infos,
        balloon,
        drives,
        nets,
        boot_timer,
        keyboard,
        reset_evt,
        power_evt,
        panic_evt,
        exit_evt,
        panicked,
        stats,
    })
}

/// Adds `virtio_mmio.device=` entries before any init arguments (` -- `).
pub fn cmdline_with_virtio(cmdline: &str, devices: &[acpi::MmioDeviceInfo]) -> String {
    if devices.is_empty() {
        return cmdline.to_string();
    }
    let entries: Vec<String> = devices
        .iter()
        .map(|d| {
            format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                d.len >> 10,
                d.addr,
                d.irq
            )
        })
        .collect();
    let entries = entries.join(" ");
    match cmdline.find(" -- ") {
        Some(i) => format!("{} {entries}{}", &cmdline[..i], &cmdline[i..]),
        None => format!("{cmdline} {entries}"),
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only interrupts KVM_RUN; the vCPU loop then sees the stop flag.
}

/// Tells the vCPU threads to stop, releases paused ones and joins them
/// (no more pause kicks at threads about to be joined).
fn stop_vcpus(handle: &VmHandle, stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    handle
        .threads
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
    handle.pause.resume();
    stop_threads(threads);
}

fn stop_threads(threads: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + Duration::from_secs(2);
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            let _ = t.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(1));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            log::warn!("a vCPU thread did not stop in time");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_cmdline_entries_go_before_init_args() {
        let d = [acpi::MmioDeviceInfo {
            addr: 0xd000_2000,
            len: 0x1000,
            irq: 5,
        }];
        assert_eq!(
            cmdline_with_virtio("console=ttyS0 -- echo hi", &d),
            "console=ttyS0 virtio_mmio.device=4K@0xd0002000:5 -- echo hi"
        );
        assert_eq!(
            cmdline_with_virtio("quiet", &d),
            "quiet virtio_mmio.device=4K@0xd0002000:5"
        );
        assert_eq!(cmdline_with_virtio("quiet", &[]), "quiet");
    }
}
