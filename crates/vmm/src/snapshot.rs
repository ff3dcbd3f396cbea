//! Snapshots of a running VM and VMs restored from them.
//!
//! Creating a snapshot needs a paused VM: every vCPU is parked at an
//! instruction boundary. Each parked vCPU thread saves its own vCPU (after
//! one immediate-exit KVM_RUN that completes any I/O the VMM answered but
//! KVM has not yet applied to the registers); the API thread saves the
//! VM-wide KVM state, pauses every device worker, saves the devices and
//! writes guest memory. The VM stays paused afterwards, as Firecracker's.
//!
//! Restoring builds the same machine from the saved configuration, maps the
//! memory file privately ([`crate::memory_file::map_private`]), loads the
//! VM, vCPU and device state, and reactivates the devices the guest had
//! activated: nothing is booted, no boot data is written.

use kiln_devices::GuestMem;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_devices::i8042::I8042Snapshot;
use kiln_devices::serial::{Serial, SerialSnapshot};
use kiln_devices::virtio::mmio::{MmioState, MmioTransport};
use kiln_snapshot::state::{DeviceState, MicrovmState, VcpuState};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::kvm_state;
use crate::layout::ram_ranges;
use crate::memory_file;
use crate::vm::{build_devices, create_vm, register_memory, VmHandle, Vmm};
use crate::{VmConfig, VmmError};

/// What of a VM a snapshot reads, shared with [`VmHandle`].
pub(crate) struct VmParts {
    pub(crate) kvm: Arc<Kvm>,
    pub(crate) vm: Arc<VmFd>,
    pub(crate) mem: GuestMem,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) transports: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
    /// Whether KVM logs dirty pages (see [`crate::dirty`]).
    pub(crate) dirty_log: std::sync::atomic::AtomicBool,
}

impl VmParts {
    /// Pauses every device worker (idempotent).
    pub(crate) fn pause_devices(&self) -> Result<(), String> {
        for (base, t) in &self.transports {
            let t = t.lock().map_err(|_| "virtio transport lock poisoned")?;
            if !t.pause_device(STEP_TIMEOUT) {
                return Err(format!(
                    "the device at {base:#x} did not stop within {STEP_TIMEOUT:?}"
                ));
            }
        }
        Ok(())
    }

    /// Lets every device worker go on.
    pub(crate) fn resume_devices(&self) {
        for (_, t) in &self.transports {
            if let Ok(t) = t.lock() {
                t.resume_device();
            }
        }
    }
}

/// How long device workers and vCPUs get to answer.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

const SERIAL: &str = "serial";
const I8042: &str = "i8042";
const VIRTIO_MMIO: &str = "virtio-mmio";

fn encode_part<T: serde::Serialize>(what: &str, v: &T) -> Result<Vec<u8>, String> {
    kiln_snapshot::to_bytes(v).map_err(|e| format!("{what}: {e}"))
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotStats {
    /// Bytes of guest memory written (zero pages are holes).
    pub mem_bytes_written: u64,
    /// Time taken.
    pub elapsed: Duration,
}

impl VmHandle {
    /// Writes a full snapshot of the paused VM: its state to `state_path`
    /// and its memory to `mem_path`. `config` is the configuration to
    /// rebuild the machine from on restore (stored as is). When dirty pages
    /// are tracked, the log is cleared: a following diff snapshot
    /// ([`VmHandle::snapshot_diff`]) holds the pages written after this one.
    pub fn snapshot(
        &self,
        config: &str,
        state_path: &Path,
        mem_path: &Path,
    ) -> Result<SnapshotStats, String> {
        let t0 = Instant::now();
        let mut state = self.capture_state(config)?;
        let (memory, written) =
            memory_file::save_full(&self.parts.mem, mem_path).map_err(|e| e.to_string())?;
        state.memory = memory;
        kiln_snapshot::write_file(state_path, &state).map_err(|e| e.to_string())?;
        // A following diff snapshot is relative to this one.
        self.reset_dirty_log()?;
        Ok(SnapshotStats {
            mem_bytes_written: written,
            elapsed: t0.elapsed(),
        })
    }

    /// Saves everything of the paused VM but its memory's contents: vCPUs,
    /// VM-wide KVM state, devices and the memory layout. The devices stay
    /// paused (they were paused with the vCPUs); guest memory does not
    /// change until [`VmHandle::resume`].
    pub fn capture_state(&self, config: &str) -> Result<MicrovmState, String> {
        if !self.is_paused() || !self.pause.wait_parked(self.vcpus, STEP_TIMEOUT) {
            return Err("the microVM must be paused to create a snapshot".into());
        }
        let parts = &self.parts;
        let vcpus = self.save_vcpus()?;
        let vm = kvm_state::save_vm(&parts.vm).map_err(|e| e.to_string())?;

        // The devices were paused with the vCPUs (VmHandle::pause); make
        // sure, then save them.
        parts.pause_devices()?;
        let mut devices = Vec::new();
        let serial = parts.serial.lock().map_err(|_| "serial lock poisoned")?;
        devices.push(DeviceState {
            kind: SERIAL.into(),
            id: String::new(),
            base: kiln_devices::serial::COM1_PORT,
            data: encode_part(SERIAL, &serial.save_state())?,
        });
        drop(serial);
        let keyboard = self.keyboard.lock().map_err(|_| "i8042 lock poisoned")?;
        devices.push(DeviceState {
            kind: I8042.into(),
            id: String::new(),
            base: kiln_devices::i8042::I8042_PORT,
            data: encode_part(I8042, &keyboard.save_state())?,
        });
        drop(keyboard);
        for (base, t) in &parts.transports {
            let t = t.lock().map_err(|_| "virtio transport lock poisoned")?;
            devices.push(DeviceState {
                kind: VIRTIO_MMIO.into(),
                id: t.device().name(),
                base: *base,
                data: encode_part(VIRTIO_MMIO, &t.save_state())?,
            });
        }
        Ok(MicrovmState {
            config: config.to_string(),
            memory: memory_file::layout(&parts.mem),
            vm,
            vcpus,
            devices,
        })
    }

    /// The VM's guest memory (read while paused, or while running for a
    /// migration's pre-copy rounds together with the dirty log).
    pub fn guest_memory(&self) -> &GuestMem {
        &self.parts.mem
    }

    /// Has each parked vCPU thread save its vCPU.
    fn save_vcpus(&self) -> Result<Vec<VcpuState>, String> {
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let kvm = self.parts.kvm.clone();
        self.pause
            .run_on_parked(Arc::new(move |index, vcpu: &mut VcpuFd| {
                let r = save_one(&kvm, index, vcpu);
                if let Ok(tx) = tx.lock() {
                    let _ = tx.send((index, r));
                }
            }));
        let mut states: Vec<Option<VcpuState>> = vec![None; self.vcpus];
        for _ in 0..self.vcpus {
            let (index, r) = rx
                .recv_timeout(STEP_TIMEOUT)
                .map_err(|_| "a vCPU did not save its state in time".to_string())?;
            let slot = states
                .get_mut(index as usize)
                .ok_or_else(|| format!("unexpected vCPU index {index}"))?;
            *slot = Some(r.map_err(|e| format!("vCPU {index}: {e}"))?);
        }
        states
            .into_iter()
            .enumerate()
            .map(|(i, s)| s.ok_or_else(|| format!("vCPU {i} saved nothing")))
            .collect()
    }
}

/// Saves one parked vCPU (on its own thread).
fn save_one(kvm: &Kvm, index: u8, vcpu: &mut VcpuFd) -> Result<VcpuState, String> {
    // Let KVM finish an instruction whose I/O the VMM already answered, so
    // the registers include its result; immediate exit runs no guest code.
    vcpu.set_kvm_immediate_exit(1);
    let r = match vcpu.run() {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(format!("completing pending I/O: {e}")),
        Ok(exit) => {
            log::debug!("vcpu{index}: immediate exit returned {exit:?}");
            Ok(())
        }
    };
    vcpu.set_kvm_immediate_exit(0);
    r?;
    let msrs = kvm_state::saveable_msrs(kvm, vcpu).map_err(|e| e.to_string())?;
    kvm_state::save_vcpu(vcpu, msrs).map_err(|e| e.to_string())
}

impl Vmm {
    /// Rebuilds a VM from `state` (taken from a VM built from `config`) and
    /// the memory file `mem_path`. The VM does not run until [`Vmm::run`];
    /// its vCPUs then continue where the snapshot stopped them.
    pub fn restore(
        config: VmConfig,
        state: &MicrovmState,
        mem_path: &Path,
        console: Box<dyn Write + Send>,
        start: Instant,
    ) -> Result<Self, VmmError> {
        check_restorable(&config, state)?;
        // KILN_RESTORE_COPY=1 copies memory up front instead of mapping it
        // (for comparing the two while a restore problem is investigated).
        let mem = if std::env::var_os("KILN_RESTORE_COPY").is_some_and(|v| v == "1") {
            memory_file::load_copy(mem_path, &state.memory)
        } else {
            memory_file::map_private(mem_path, &state.memory)
        }
        .map_err(|e| VmmError::Config(e.to_string()))?;
        log::info!(
            "restore: guest memory mapped from {} at {:?}",
            mem_path.display(),
            start.elapsed()
        );
        Self::restore_with_memory(config, state, mem, console, start)
    }

    /// Rebuilds a VM from `state` on guest memory the caller has filled (a
    /// migration's destination) or will fill on demand (userfaultfd).
    /// `mem` must have the layout `state.memory` describes.
    pub fn restore_with_memory(
        config: VmConfig,
        state: &MicrovmState,
        mem: GuestMem,
        console: Box<dyn Write + Send>,
        start: Instant,
    ) -> Result<Self, VmmError> {
        check_restorable(&config, state)?;
        let bad = |m: String| VmmError::Config(format!("snapshot: {m}"));
        let given: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let want: Vec<(u64, u64)> = state
            .memory
            .regions
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        if given != want {
            return Err(bad(format!(
                "guest memory {given:x?} does not have the saved layout {want:x?}"
            )));
        }
        let (kvm_fd, vm) = create_vm()?;
        register_memory(&vm, &mem, config.mem_mib, config.track_dirty_pages)?;
        let devs = build_devices(&config, &vm, &mem, console, start)?;
        log::info!("restore: VM and devices built at {:?}", start.elapsed());

        kvm_state::restore_vm(&vm, &state.vm).map_err(|e| bad(e.to_string()))?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (index, st) in state.vcpus.iter().enumerate() {
            let vcpu = vm
                .create_vcpu(index as u64)
                .map_err(|source| VmmError::Kvm {
                    what: "KVM_CREATE_VCPU",
                    source,
                })?;
            kvm_state::restore_vcpu(&vcpu, st).map_err(|e| bad(format!("vCPU {index}: {e}")))?;
            vcpus.push(vcpu);
        }
        for d in &state.devices {
            match d.kind.as_str() {
                SERIAL => {
                    let s: SerialSnapshot = kiln_snapshot::from_bytes(&d.data)
                        .map_err(|e| bad(format!("serial: {e}")))?;
                    devs.serial
                        .lock()
                        .map_err(|_| bad("serial lock poisoned".into()))?
                        .restore_state(&s)
                        .map_err(bad)?;
                }
                I8042 => {
                    let s: I8042Snapshot = kiln_snapshot::from_bytes(&d.data)
                        .map_err(|e| bad(format!("i8042: {e}")))?;
                    devs.keyboard
                        .lock()
                        .map_err(|_| bad("i8042 lock poisoned".into()))?
                        .restore_state(&s)
                        .map_err(bad)?;
                }
                VIRTIO_MMIO => {
                    let st: MmioState = kiln_snapshot::from_bytes(&d.data)
                        .map_err(|e| bad(format!("{}: {e}", d.id)))?;
                    let (_, t) = devs
                        .transports
                        .iter()
                        .find(|(base, _)| *base == d.base)
                        .ok_or_else(|| {
                            bad(format!(
                                "device {} at {:#x} is not in the configuration",
                                d.id, d.base
                            ))
                        })?;
                    t.lock()
                        .map_err(|_| bad("transport lock poisoned".into()))?
                        .restore_state(&st)
                        .map_err(bad)?;
                }
                other => return Err(bad(format!("unknown device kind {other:?}"))),
            }
        }
        let restored = state
            .devices
            .iter()
            .filter(|d| d.kind == VIRTIO_MMIO)
            .count();
        if restored != devs.transports.len() {
            return Err(bad(format!(
                "it has {restored} virtio devices, the configuration {}",
                devs.transports.len()
            )));
        }
        log::info!(
            "restore: {} vCPUs and device state restored at {:?}, {} MiB of memory",
            vcpus.len(),
            start.elapsed(),
            mem.iter().map(|r| r.len()).sum::<u64>() >> 20,
        );
        Vmm::assemble(config, kvm_fd, vm, mem, devs, vcpus)
    }
}

/// Whether `state` can be restored on a machine built from `config`.
pub(crate) fn check_restorable(config: &VmConfig, state: &MicrovmState) -> Result<(), VmmError> {
    config.validate()?;
    let bad = |m: String| VmmError::Config(format!("snapshot: {m}"));
    let want: Vec<(u64, u64)> = ram_ranges(config.mem_mib << 20)
        .iter()
        .map(|(a, l)| (a.0, *l as u64))
        .collect();
    let have: Vec<(u64, u64)> = state
        .memory
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    if want != have {
        return Err(bad(format!(
            "its memory layout {have:x?} does not match a {} MiB machine",
            config.mem_mib
        )));
    }
    if state.vcpus.len() != config.vcpus as usize {
        return Err(bad(format!(
            "it has {} vCPUs, the configuration {}",
            state.vcpus.len(),
            config.vcpus
        )));
    }
    Ok(())
}
