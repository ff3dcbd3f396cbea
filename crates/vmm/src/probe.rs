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

/// Iterations of the probe loop.
const LOOP_COUNT: u32 = 100_000;
/// 100k iterations: well under 1 ms natively; 40 ms to 0.3 s on hosts that
/// emulate the guest's instructions.
const LOOP_CODE: [u8; 16] = [
    0x66, 0xb9, 0xa0, 0x86, 0x01, 0x00, // mov ecx, 100000
    0x66, 0x49, // dec ecx
    0x75, 0xfc, // jnz -4
    0x66, 0x31, 0xc0, // xor eax, eax
    0x0f, 0x22, 0xd8, // mov cr3, eax
];
const HLT: u8 = 0xf4;
/// A native guest's loop always counts as native below this time.
const THRESHOLD: Duration = Duration::from_millis(5);

/// Which KVM module provides `/dev/kvm`, from the loaded modules listed in
/// `modules` (a directory like `/sys/module`): PVM (`kvm_pvm`) runs only
/// guests built for it; a stock kernel stops with a KVM internal error
/// there, however fast the probe loop runs (its emulator got fast enough
/// to pass the timing check on this project's CI hosts).
fn pvm_only(modules: &std::path::Path) -> bool {
    let loaded = |m: &str| modules.join(m).exists();
    loaded("kvm_pvm") && !loaded("kvm_intel") && !loaded("kvm_amd")
}

/// Runs the probe.
pub fn probe() -> KvmProbe {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => return KvmProbe::Unavailable(format!("cannot open /dev/kvm: {e}")),
    };
    if pvm_only(std::path::Path::new("/sys/module")) {
        return KvmProbe::Emulated(
            "/dev/kvm is PVM (kvm_pvm): it runs only PVM-aware guest kernels".into(),
        );
    }
    // The same loop on this host's CPU sets the bar: a native guest runs
    // it at about the same speed, an emulating host 100 times slower or
    // worse. A guest run that was preempted is tried again (best of three).
    let threshold = THRESHOLD.max(host_loop_time() * 20);
    let mut best = None;
    for _ in 0..3 {
        match run_probe(&kvm) {
            Ok(t) if t < threshold => return KvmProbe::Native(t),
            Ok(t) => best = Some(best.map_or(t, |b: Duration| b.min(t))),
            Err(e) => return KvmProbe::Emulated(e),
        }
    }
    let t = best.unwrap_or_default();
    KvmProbe::Emulated(format!(
        "probe loop took {t:?} in a guest (native: under {threshold:?})"
    ))
}

/// The probe's loop (`dec ecx; jnz`, [`LOOP_COUNT`] times) on the host
/// CPU: the best of three runs.
fn host_loop_time() -> Duration {
    (0..3)
        .map(|_| {
            let start = Instant::now();
            let mut n: u32 = LOOP_COUNT;
            // SAFETY: a register-only loop; touches no memory and no flags
            // the compiler relies on (flags are clobbered by default).
            unsafe {
                std::arch::asm!("2:", "dec {0:e}", "jnz 2b", inout(reg) n, options(nomem, nostack));
            }
            std::hint::black_box(n);
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_count_is_the_codes() {
        assert_eq!(LOOP_CODE[2..6], LOOP_COUNT.to_le_bytes());
    }

    #[test]
    fn pvm_alone_needs_the_lab() {
        let d = std::env::temp_dir().join(format!("kiln-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("kvm")).unwrap();
        assert!(!pvm_only(&d));
        std::fs::create_dir_all(d.join("kvm_pvm")).unwrap();
        assert!(pvm_only(&d));
        std::fs::create_dir_all(d.join("kvm_amd")).unwrap();
        assert!(!pvm_only(&d));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_host_loop_is_timed() {
        let t = host_loop_time();
        assert!(t > Duration::ZERO && t < Duration::from_secs(1), "{t:?}");
    }
}
