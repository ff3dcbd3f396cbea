//! Saving and restoring the KVM side of a microVM: each vCPU's registers,
//! MSRs, LAPIC and pending events, and the VM's interrupt controllers, PIT
//! and clock. The types are `kiln_snapshot::state`'s, so what is saved goes
//! straight into a state file.
//!
//! Restore order matters: CPUID before anything that depends on features,
//! the LAPIC before the MSRs (the TSC deadline), pending events last.

use kiln_snapshot::state::{VcpuState, VmState};
use kvm_bindings::{
    kvm_irqchip, kvm_msr_entry, kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::sync::OnceLock;

/// A KVM state ioctl failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed: {source}")]
pub struct StateError {
    /// The ioctl.
    pub op: &'static str,
    /// The error.
    pub source: kvm_ioctls::Error,
}

type Result<T> = std::result::Result<T, StateError>;

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError { op, source }
}

/// The MSRs worth saving on this host: KVM's list of MSRs it can save,
/// reduced to those a read actually succeeds for (some are listed but
/// refuse reads on some hosts). The answer depends only on the host and on
/// the CPUID every Kiln vCPU gets from it, so it is probed once per process
/// (on the first snapshot) and shared by every vCPU after that.
pub fn saveable_msrs(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<&'static [u32]> {
    static SAVEABLE: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(list) = SAVEABLE.get() {
        return Ok(list);
    }
    // Two vCPUs may probe at once; both find the same list.
    let probed = probe_saveable_msrs(kvm_fd, vcpu)?;
    Ok(SAVEABLE.get_or_init(|| probed))
}

/// [`saveable_msrs`] without the cache: reads KVM's whole list in as few
/// KVM_GET_MSRS calls as it can, skipping each MSR a read stops at.
fn probe_saveable_msrs(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("KVM_GET_MSR_INDEX_LIST"))?;
    let mut usable = Vec::with_capacity(list.as_slice().len());
    let mut rest = list.as_slice();
    while !rest.is_empty() {
        // KVM reads in order and stops at the first MSR it refuses.
        let n = read_msrs(vcpu, rest)?.len();
        usable.extend_from_slice(&rest[..n]);
        rest = rest.get(n + 1..).unwrap_or_default();
    }
    Ok(usable)
}

/// Reads `indices`; KVM stops at the first MSR it cannot read, so the
/// result may be shorter (callers that need all use [`saveable_msrs`]).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(indices.len());
    // KVM's MSR arrays are bounded: read in chunks.
    for chunk in indices.chunks(64) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
            op: "KVM_GET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n]);
        if n < chunk.len() {
            break;
        }
    }
    Ok(out)
}

/// Saves one vCPU. The vCPU must not be running (paused or never run).
pub fn save_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    // Order: events and MP state first, so a pending interrupt is seen as
    // KVM holds it, then the registers.
    let events = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    let mp_state = vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debugregs = vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(vcpu, msr_indices)?;
    if msrs.len() != msr_indices.len() {
        log::error!("MSR {:#x} became unreadable", msr_indices[msrs.len()]);
        return Err(StateError {
            op: "KVM_GET_MSRS (an MSR became unreadable)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?;
    let tsc_khz = vcpu.get_tsc_khz().ok();
    Ok(VcpuState {
        regs,
        sregs,
        xsave: xsave.region.to_vec(),
        xcrs,
        debugregs,
        lapic,
        mp_state,
        events,
        msrs,
        cpuid: cpuid.as_slice().to_vec(),
        tsc_khz,
    })
}

/// Loads `state` into a freshly created vCPU.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| StateError {
        op: "KVM_SET_CPUID2 (too many entries)",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz {
        // Older hosts cannot scale the TSC; the guest then sees the host's
        // rate, which kvmclock copes with.
        if let Err(e) = vcpu.set_tsc_khz(khz) {
            log::warn!("KVM_SET_TSC_KHZ {khz}: {e}; keeping the host's TSC rate");
        }
    }
    vcpu.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    vcpu.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    let mut xsave = kvm_xsave::default();
    if state.xsave.len() != xsave.region.len() {
        return Err(StateError {
            op: "KVM_SET_XSAVE (wrong region size)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    xsave.region.copy_from_slice(&state.xsave);
    // SAFETY: `xsave` is a complete, owned kvm_xsave (the legacy 4 KiB
    // layout this module saved with KVM_GET_XSAVE), so the kernel reads only
    // within it.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&state.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    // The LAPIC before the MSRs: KVM ignores a TSC deadline written while
    // the LAPIC timer is not in TSC-deadline mode.
    vcpu.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    for chunk in state.msrs.chunks(64) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| StateError {
            op: "KVM_SET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let n = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if n != chunk.len() {
            return Err(StateError {
                op: "KVM_SET_MSRS (an MSR was refused)",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Saves the VM-wide state. Every vCPU must be stopped.
pub fn save_vm(vm: &VmFd) -> Result<VmState> {
    let mut irqchips = Vec::with_capacity(CHIPS.len());
    for chip_id in CHIPS {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
        irqchips.push(chip);
    }
    let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
    let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    // Only the clock value is restored; flags describing how it was read
    // (TSC_STABLE, REALTIME, HOST_TSC) are not inputs to KVM_SET_CLOCK.
    clock.flags = 0;
    Ok(VmState {
        irqchips,
        pit,
        clock,
    })
}

/// Loads `state` into a VM that has its irqchip and PIT created.
pub fn restore_vm(vm: &VmFd, state: &VmState) -> Result<()> {
    if state.irqchips.len() != CHIPS.len()
        || state
            .irqchips
            .iter()
            .zip(CHIPS)
            .any(|(c, id)| c.chip_id != id)
    {
        return Err(StateError {
            op: "KVM_SET_IRQCHIP (the snapshot's interrupt controllers are incomplete)",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    vm.set_clock(&state.clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};

    /// A VM with an irqchip, a PIT and one vCPU, as Vmm::new builds them.
    fn machine(kvm_fd: &Kvm) -> (VmFd, VcpuFd) {
        let vm = kvm_fd.create_vm().expect("KVM_CREATE_VM");
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = kvm_fd.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        vcpu.set_cpuid2(&cpuid).unwrap();
        (vm, vcpu)
    }

    // Needs /dev/kvm (any KVM: no guest code runs). Kiln's test hosts,
    // native or the lab's host, all have it.
    #[test]
    fn vcpu_and_vm_state_survive_a_round_trip() {
        let kvm_fd = Kvm::new().expect("/dev/kvm is needed for this test");
        let (vm, vcpu) = machine(&kvm_fd);

        // Give the source distinctive state.
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1234_5678;
        regs.rbx = 0xdead_beef;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cr0 |= 1; // protected mode
        sregs.cs.selector = 0x10;
        vcpu.set_sregs(&sregs).unwrap();
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: 0x174, // IA32_SYSENTER_CS
            data: 0x42,
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(vcpu.set_msrs(&msrs).unwrap(), 1);
        let mut pit = vm.get_pit2().unwrap();
        pit.channels[0].count = 0x1234;
        vm.set_pit2(&pit).unwrap();

        let indices = saveable_msrs(&kvm_fd, &vcpu).unwrap();
        assert!(indices.contains(&0x174), "SYSENTER_CS is saveable");
        // The cached list is the probed one, and each MSR in it reads alone.
        assert_eq!(indices, probe_saveable_msrs(&kvm_fd, &vcpu).unwrap());
        for &index in indices {
            assert_eq!(read_msrs(&vcpu, &[index]).unwrap().len(), 1, "{index:#x}");
        }
        let vcpu_state = save_vcpu(&vcpu, indices).unwrap();
        let vm_state = save_vm(&vm).unwrap();
        assert_eq!(vcpu_state.regs.rip, 0x1234_5678);

        // Through the state file format, into a fresh machine.
        let image = kiln_snapshot::encode(&(vm_state, vcpu_state)).unwrap();
        let (vm_state, vcpu_state): (VmState, VcpuState) = kiln_snapshot::decode(&image).unwrap();
        let (vm2, vcpu2) = machine(&kvm_fd);
        restore_vm(&vm2, &vm_state).unwrap();
        restore_vcpu(&vcpu2, &vcpu_state).unwrap();

        let r = vcpu2.get_regs().unwrap();
        assert_eq!((r.rip, r.rbx), (0x1234_5678, 0xdead_beef));
        let s = vcpu2.get_sregs().unwrap();
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.cr0 & 1, 1);
        let mut back = Msrs::from_entries(&[kvm_msr_entry {
            index: 0x174,
            ..Default::default()
        }])
        .unwrap();
        vcpu2.get_msrs(&mut back).unwrap();
        assert_eq!(back.as_slice()[0].data, 0x42);
        assert_eq!(vm2.get_pit2().unwrap().channels[0].count, 0x1234);
        // Saving the restored machine gives the same vCPU registers.
        let again = save_vcpu(&vcpu2, indices).unwrap();
        assert_eq!(again.regs.rip, vcpu_state.regs.rip);
        assert_eq!(again.lapic.regs, vcpu_state.lapic.regs);
    }

    #[test]
    fn incomplete_irqchip_state_is_refused() {
        let kvm_fd = Kvm::new().expect("/dev/kvm is needed for this test");
        let (vm, _vcpu) = machine(&kvm_fd);
        let mut state = save_vm(&vm).unwrap();
        state.irqchips.pop();
        let err = restore_vm(&vm, &state).unwrap_err();
        assert!(err.to_string().contains("incomplete"), "{err}");
    }
}
