//! What a Kiln snapshot holds, apart from guest memory.
//!
//! The KVM structures come from `kvm-bindings` (with its `serde` feature),
//! so what is saved is exactly what the KVM ioctls returned. Variable-length
//! KVM lists (MSRs, CPUID) are stored as plain vectors of entries.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::{Deserialize, Serialize};

/// The whole microVM, as saved in a state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The configuration the VM was built from (Kiln's own encoding, e.g.
    /// the `GET /vm/config` JSON), used to rebuild the same machine.
    pub config: String,
    /// Guest memory: where each region sits in the memory file.
    pub memory: MemoryLayout,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Device models' state, in bus order.
    pub devices: Vec<DeviceState>,
}

/// Guest memory regions and their place in the memory file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryLayout {
    /// The regions, in guest-address order.
    pub regions: Vec<MemoryRegion>,
}

impl MemoryLayout {
    /// The size the memory file must have.
    pub fn file_len(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.file_offset + r.size)
            .max()
            .unwrap_or(0)
    }
}

/// One guest memory region.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of its contents in the memory file.
    pub file_offset: u64,
}

/// VM-wide KVM state: the in-kernel interrupt controllers, PIT and clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave and IOAPIC (KVM_GET_IRQCHIP, chip ids 0..=2).
    pub irqchips: Vec<kvm_irqchip>,
    /// The in-kernel PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// One vCPU's KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state: the `region` words of KVM_GET_XSAVE(2).
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, ...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Model-specific registers.
    pub msrs: Vec<kvm_msr_entry>,
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The TSC frequency in kHz, if known.
    pub tsc_khz: Option<u32>,
}

/// One device model's state, encoded by the device itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceState {
    /// What the device is ("serial", "virtio-block", ...).
    pub kind: String,
    /// Its id (drive id, iface id, ...), or empty.
    pub id: String,
    /// Where it sits on its bus (port or MMIO base).
    pub base: u64,
    /// Its state, in the device's own versioned encoding.
    pub data: Vec<u8>,
}
