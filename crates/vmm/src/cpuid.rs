//! CPUID: start from what KVM supports, then make it describe this VM
//! (hypervisor bit, per-vCPU APIC ids, N cores on one socket).

use kvm_bindings::kvm_cpuid_entry2;

const HYPERVISOR_BIT: u32 = 1 << 31; // leaf 1 ECX
const HTT_BIT: u32 = 1 << 28; // leaf 1 EDX

/// Leaf 0xb / 0x1f level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` cores.
fn core_shift(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites `entries` for vCPU `index` of `count`, one thread per core, one
/// socket. APIC ids equal vCPU indexes.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], index: u8, count: u8) {
    let apic_id = u32::from(index);
    let count = u32::from(count.max(1));
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx |= HYPERVISOR_BIT;
                // EBX[31:24] initial APIC id, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                if count > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            4 => {
                // Deterministic cache parameters: EAX[31:26] cores per package - 1,
                // EAX[25:14] logical processors sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | ((sharing & 0xfff) << 14);
            }
            0xb | 0x1f => {
                let (eax, ebx, ecx) = match e.index {
                    0 => (0, 1, (LEVEL_SMT << 8)),
                    1 => (core_shift(count), count, (LEVEL_CORE << 8) | 1),
                    n => (0, 0, n),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = ecx;
                e.edx = apic_id;
            }
            0x8000_0008 => {
                // AMD: ECX[7:0] number of cores - 1, ECX[15:12] APIC id size.
                e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (core_shift(count) << 12);
            }
            0x8000_001e => {
                // AMD extended APIC id, compute unit (= core) id, node 0.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_has_apic_id_count_and_hypervisor_bit() {
        let mut v = vec![entry(1, 0)];
        normalize(&mut v, 3, 4);
        assert_eq!(v[0].ebx >> 24, 3);
        assert_eq!((v[0].ebx >> 16) & 0xff, 4);
        assert_eq!(v[0].ebx & 0xffff, 0x0800);
        assert_ne!(v[0].ecx & HYPERVISOR_BIT, 0);
        assert_ne!(v[0].edx & HTT_BIT, 0);
        normalize(&mut v, 0, 1);
        assert_eq!(v[0].edx & HTT_BIT, 0);
    }

    #[test]
    fn topology_leaves_describe_n_cores() {
        let mut v = vec![entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)];
        normalize(&mut v, 5, 6);
        assert_eq!((v[0].eax, v[0].ebx, v[0].ecx >> 8, v[0].edx), (0, 1, 1, 5));
        assert_eq!((v[1].eax, v[1].ebx, v[1].ecx >> 8, v[1].edx), (3, 6, 2, 5));
        assert_eq!((v[2].ebx, v[2].ecx >> 8), (0, 0));
        assert_eq!(core_shift(1), 0);
        assert_eq!(core_shift(2), 1);
        assert_eq!(core_shift(32), 5);
        assert_eq!(core_shift(33), 6);
    }

    #[test]
    fn amd_core_count() {
        let mut v = vec![entry(0x8000_0008, 0), entry(0x8000_001e, 0)];
        normalize(&mut v, 2, 8);
        assert_eq!(v[0].ecx & 0xff, 7);
        assert_eq!(v[1].eax, 2);
    }
}
