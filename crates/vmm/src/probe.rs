//! Does this host's KVM run guests at native speed? A tiny real-mode guest
//! runs a counted loop and touches CR3; a nested host that emulates guests
//! instruction by instruction (or cannot load CR3) fails the check.

use kiln_devices::GuestMem;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The probe's verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmProbe {
    /// KVM runs guest code natively.
    Native(Duration),
    /// KVM exists but is too slow or incomplete for a stock kernel.
    Emulated(String),
    /// No usable /dev/kvm.
    Unavailable(String),
}

/// 100k iterations: ~1 ms natively, ~0.3 s when every instruction is emulated.
const LOOP_CODE: [u8; 16] = [
    0x66, 0xb9, 0xa0, 0x86, 0x01, 0x00, // mov ecx, 100000
    0x66, 0x49, // dec ecx
    0x75, 0xfc, // jnz -4
    0x66, 0x31, 0xc0, // xor eax, eax
    0x0f, 0x22, 0xd8, // mov cr3, eax
];
const HLT: u8 = 0xf4;
const THRESHOLD: Duration = Duration::from_millis(60);

/// Runs the probe.
pub fn probe() -> KvmProbe {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => return KvmProbe::Unavailable(format!("cannot open /dev/kvm: {e}")),
    };
    match run_probe(&kvm) {
        Ok(t) if t < THRESHOLD => KvmProbe::Native(t),
        Ok(t) => KvmProbe::Emulated(format!("probe loop took {t:?} (native: about 1 ms)")),
        Err(e) => KvmProbe::Emulated(e),
    }
}

fn run_probe(kvm: &Kvm) -> Result<Duration, String> {
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)])
        .map_err(|e| format!("probe memory: {e}"))?;
    let region = mem.iter().next().ok_or("probe memory has no region")?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| format!("probe memory: {e}"))?;
    let slot = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: region.len(),
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM
    // (both are dropped at the end of this function, `vm` first).
    unsafe { vm.set_user_memory_region(slot) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut code = LOOP_CODE.to_vec();
    code.push(HLT);
    mem.write_slice(&code, GuestAddress(0x1000))
        .map_err(|e| format!("probe code: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    let start = Instant::now();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::Hlt) => return Ok(start.elapsed()),
            Ok(VcpuExit::InternalError) => return Err("KVM internal error on mov cr3".into()),
            Ok(other) => return Err(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(format!("KVM_RUN: {e}")),
        }
    }
}
