//! Custom CPU templates (Firecracker's `PUT /cpu-config`): bits of CPUID
//! leaves and MSRs set or cleared on every vCPU at boot, and KVM
//! capabilities the host must offer. A restored VM keeps its CPUID and MSRs
//! from the snapshot, so the template travels with it.

use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::VmmError;

/// One CPUID leaf/subleaf: (mask, value) per register, EAX to EDX.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuidModifier {
    /// Leaf (EAX input).
    pub leaf: u32,
    /// Subleaf (ECX input).
    pub subleaf: u32,
    /// KVM entry flags.
    pub flags: u32,
    /// EAX, EBX, ECX, EDX: bits to change and their values.
    pub regs: [Option<(u32, u32)>; 4],
}

/// One MSR: bits to change and their values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MsrModifier {
    /// The MSR.
    pub addr: u32,
    /// Bits the template sets or clears.
    pub mask: u64,
    /// Their values.
    pub value: u64,
}

/// A whole template.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuTemplate {
    /// KVM capabilities: number, required (`false`: removed from the
    /// required set, which Kiln keeps empty).
    pub kvm_capabilities: Vec<(u32, bool)>,
    /// CPUID changes.
    pub cpuid: Vec<CpuidModifier>,
    /// MSR changes.
    pub msrs: Vec<MsrModifier>,
}

fn apply32(old: u32, m: Option<(u32, u32)>) -> u32 {
    match m {
        Some((mask, value)) => (old & !mask) | (value & mask),
        None => old,
    }
}

impl CpuTemplate {
    /// Fails unless the host's KVM has every required capability, and for
    /// MSRs the boot sets up through the special registers.
    pub fn check_capabilities(&self, kvm: &Kvm) -> Result<(), VmmError> {
        // EFER and APIC_BASE come from the boot's special registers, which
        // are written after the MSRs.
        if let Some(m) = self
            .msrs
            .iter()
            .find(|m| matches!(m.addr, 0xc000_0080 | 0x1b))
        {
            return Err(VmmError::Config(format!(
                "CPU template: MSR {:#x} is set by the boot (EFER and APIC_BASE cannot be templated)",
                m.addr
            )));
        }
        for (cap, required) in &self.kvm_capabilities {
            if *required && kvm.check_extension_raw(u64::from(*cap)) <= 0 {
                return Err(VmmError::Config(format!(
                    "CPU template: KVM capability {cap} is not available on this host"
                )));
            }
        }
        Ok(())
    }

    /// Applies the CPUID modifiers to one vCPU's entries; a leaf the host
    /// does not report is added.
    pub fn apply_cpuid(&self, cpuid: &mut CpuId) -> Result<(), VmmError> {
        for m in &self.cpuid {
            let found = cpuid
                .as_mut_slice()
                .iter_mut()
                .find(|e| e.function == m.leaf && e.index == m.subleaf);
            let e = match found {
                Some(e) => e,
                None => {
                    cpuid
                        .push(kvm_cpuid_entry2 {
                            function: m.leaf,
                            index: m.subleaf,
                            flags: m.flags,
                            ..Default::default()
                        })
                        .map_err(|e| {
                            VmmError::Config(format!(
                                "CPU template: cannot add CPUID leaf {:#x}: {e:?}",
                                m.leaf
                            ))
                        })?;
                    let last = cpuid.as_slice().len() - 1;
                    &mut cpuid.as_mut_slice()[last]
                }
            };
            e.flags = m.flags;
            e.eax = apply32(e.eax, m.regs[0]);
            e.ebx = apply32(e.ebx, m.regs[1]);
            e.ecx = apply32(e.ecx, m.regs[2]);
            e.edx = apply32(e.edx, m.regs[3]);
        }
        Ok(())
    }

    /// Applies the MSR modifiers to a vCPU (after the boot MSRs) and reads
    /// them back: a value KVM did not keep is an error.
    pub fn apply_msrs(&self, vcpu: &VcpuFd) -> Result<(), VmmError> {
        if self.msrs.is_empty() {
            return Ok(());
        }
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.addr,
                ..Default::default()
            })
            .collect();
        let read = |what: &str| -> Result<Msrs, VmmError> {
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| VmmError::Config(format!("CPU template: {e:?}")))?;
            let n = vcpu.get_msrs(&mut msrs).map_err(|source| VmmError::Kvm {
                what: "KVM_GET_MSRS (CPU template)",
                source,
            })?;
            if n != entries.len() {
                let bad = self.msrs[n].addr;
                return Err(VmmError::Config(format!(
                    "CPU template: MSR {bad:#x} cannot be {what} on this host"
                )));
            }
            Ok(msrs)
        };
        let mut msrs = read("read")?;
        for (e, m) in msrs.as_mut_slice().iter_mut().zip(&self.msrs) {
            e.data = (e.data & !m.mask) | (m.value & m.mask);
        }
        let set = vcpu.set_msrs(&msrs).map_err(|source| VmmError::Kvm {
            what: "KVM_SET_MSRS (CPU template)",
            source,
        })?;
        if set != self.msrs.len() {
            return Err(VmmError::Config(format!(
                "CPU template: MSR {:#x} cannot be written on this host",
                self.msrs[set].addr
            )));
        }
        let back = read("read back")?;
        for (e, m) in back.as_slice().iter().zip(&self.msrs) {
            if e.data & m.mask != m.value & m.mask {
                return Err(VmmError::Config(format!(
                    "CPU template: KVM did not keep MSR {:#x} (wanted {:#x} under mask {:#x}, has {:#x})",
                    m.addr, m.value, m.mask, e.data
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_bits_change_and_missing_leaves_are_added() {
        let mut cpuid = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            index: 0,
            eax: 0xffff_0000,
            ecx: 0x8000_0001,
            ..Default::default()
        }])
        .unwrap();
        let t = CpuTemplate {
            cpuid: vec![
                CpuidModifier {
                    leaf: 1,
                    subleaf: 0,
                    flags: 0,
                    regs: [Some((0xff, 0x12)), None, Some((0x8000_0000, 0)), None],
                },
                CpuidModifier {
                    leaf: 0x4000_0010,
                    subleaf: 0,
                    flags: 0,
                    regs: [None, None, None, Some((0xf, 0x5))],
                },
            ],
            ..Default::default()
        };
        t.apply_cpuid(&mut cpuid).unwrap();
        let e = cpuid.as_slice();
        assert_eq!((e[0].eax, e[0].ecx), (0xffff_0012, 1));
        assert_eq!((e[1].function, e[1].edx), (0x4000_0010, 5));
    }
}
