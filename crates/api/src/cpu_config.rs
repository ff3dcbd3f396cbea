//! `PUT /cpu-config`: Firecracker's custom CPU template (x86_64): CPUID
//! and MSR bit modifiers, and KVM capabilities the host must have. Numbers
//! are strings (`"0x1"`, `"0b1"`, `"1"`); a bitmap is `"0b"` and one
//! character per bit, most significant first: `0` clears the bit, `1` sets
//! it, `x` leaves it (underscores are ignored; missing leading bits are
//! `x`).

use serde::{Deserialize, Serialize};

/// The template, with Firecracker's field names.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    /// KVM capabilities by number; `"!N"` removes one from the required set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_capabilities: Vec<String>,
    /// CPUID leaf modifiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// MSR modifiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub msr_modifiers: Vec<MsrModifier>,
    /// aarch64 only: refused here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reg_modifiers: Vec<serde_json::Value>,
    /// aarch64 only: refused here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_features: Vec<serde_json::Value>,
}

/// One CPUID leaf and subleaf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    /// Leaf (EAX input).
    pub leaf: String,
    /// Subleaf (ECX input).
    pub subleaf: String,
    /// KVM's entry flags (1: the subleaf is significant).
    pub flags: i32,
    /// Register modifiers.
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// One register of a CPUID leaf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    /// `eax`, `ebx`, `ecx` or `edx`.
    pub register: CpuidRegister,
    /// 32-bit bitmap.
    pub bitmap: String,
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One MSR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    /// MSR address (32 bits).
    pub addr: String,
    /// 64-bit bitmap.
    pub bitmap: String,
}

/// Bits to change: `value` on the bits of `mask`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bits {
    /// Bits the template sets or clears.
    pub mask: u64,
    /// Their new values (zero outside `mask`).
    pub value: u64,
}

impl Bits {
    /// `old` with the template's bits applied.
    pub fn apply(self, old: u64) -> u64 {
        (old & !self.mask) | self.value
    }
}

/// (leaf, subleaf, flags, [(register, bits)]).
pub type ParsedCpuidLeaf = (u32, u32, u32, Vec<(CpuidRegister, Bits)>);

/// A parsed template (what the VMM applies).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedCpuConfig {
    /// KVM capabilities: number, and whether it is required (`false`:
    /// removed with `!`).
    pub kvm_capabilities: Vec<(u32, bool)>,
    /// CPUID leaves.
    pub cpuid: Vec<ParsedCpuidLeaf>,
    /// (address, bits).
    pub msrs: Vec<(u32, Bits)>,
}

/// Parses `"0x.."`, `"0b.."` or decimal.
pub fn parse_number(s: &str, bits: u32) -> Result<u64, String> {
    let t = s.trim().replace('_', "");
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else if let Some(b) = t.strip_prefix("0b") {
        u64::from_str_radix(b, 2)
    } else {
        t.parse()
    }
    .map_err(|_| format!("Invalid number {s:?}: use hex (0x..), binary (0b..) or decimal"))?;
    if bits < 64 && v >> bits != 0 {
        return Err(format!("Number {s:?} does not fit in {bits} bits"));
    }
    Ok(v)
}

/// Parses a `"0b[01x_]..."` bitmap of at most `bits` bits.
pub fn parse_bitmap(s: &str, bits: u32) -> Result<Bits, String> {
    let body = s
        .strip_prefix("0b")
        .ok_or_else(|| format!("Invalid bitmap {s:?}: it must start with 0b"))?;
    let chars: Vec<char> = body.chars().filter(|c| *c != '_').collect();
    if chars.is_empty() || chars.len() > bits as usize {
        return Err(format!(
            "Invalid bitmap {s:?}: give 1 to {bits} characters of 0, 1 or x after 0b"
        ));
    }
    let mut b = Bits { mask: 0, value: 0 };
    for (i, c) in chars.iter().rev().enumerate() {
        match c {
            '0' => b.mask |= 1 << i,
            '1' => {
                b.mask |= 1 << i;
                b.value |= 1 << i;
            }
            'x' | 'X' => {}
            _ => return Err(format!("Invalid bitmap {s:?}: {c:?} is not 0, 1 or x")),
        }
    }
    Ok(b)
}

impl CpuConfig {
    /// Parses and checks every field (x86_64).
    pub fn parse(&self) -> Result<ParsedCpuConfig, String> {
        if !self.reg_modifiers.is_empty() || !self.vcpu_features.is_empty() {
            return Err(
                "reg_modifiers and vcpu_features are for aarch64; this host is x86_64".into(),
            );
        }
        let mut p = ParsedCpuConfig::default();
        for c in &self.kvm_capabilities {
            let (n, required) = match c.strip_prefix('!') {
                Some(n) => (n, false),
                None => (c.as_str(), true),
            };
            let n = n
                .parse::<u32>()
                .map_err(|_| format!("Invalid KVM capability {c:?}: use N or !N"))?;
            p.kvm_capabilities.push((n, required));
        }
        for m in &self.cpuid_modifiers {
            let leaf = parse_number(&m.leaf, 32)? as u32;
            let subleaf = parse_number(&m.subleaf, 32)? as u32;
            let mut regs = Vec::new();
            for r in &m.modifiers {
                regs.push((r.register, parse_bitmap(&r.bitmap, 32)?));
            }
            p.cpuid.push((leaf, subleaf, m.flags as u32, regs));
        }
        for m in &self.msr_modifiers {
            let addr = parse_number(&m.addr, 32)? as u32;
            p.msrs.push((addr, parse_bitmap(&m.bitmap, 64)?));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_bitmaps() {
        assert_eq!(parse_number("0x10a", 32), Ok(0x10a));
        assert_eq!(parse_number("0b100001010", 32), Ok(0x10a));
        assert_eq!(parse_number("266", 32), Ok(0x10a));
        assert!(parse_number("0x1_0000_0000", 32).is_err());
        assert!(parse_number("ten", 32).is_err());
        let b = parse_bitmap("0bxxxx_xxxx_xxxx_xxxx_xxxx_xxxx_xxxx_10x0", 32).unwrap();
        assert_eq!(
            b,
            Bits {
                mask: 0b1101,
                value: 0b1000
            }
        );
        assert_eq!(b.apply(0b0111), 0b1010);
        let top = parse_bitmap(&format!("0b0{}", "x".repeat(31)), 32).unwrap();
        assert_eq!(top.mask, 1 << 31);
        assert!(parse_bitmap(&format!("0b{}", "x".repeat(33)), 32).is_err());
        assert!(parse_bitmap("0b102", 32).is_err());
        assert!(parse_bitmap("1010", 32).is_err());
        assert!(parse_bitmap(&format!("0b1{}", "0".repeat(63)), 64).is_ok());
    }

    #[test]
    fn templates_parse_or_say_why_not() {
        let c: CpuConfig = serde_json::from_str(
            r#"{"kvm_capabilities":["121","!7"],
                "cpuid_modifiers":[{"leaf":"0x1","subleaf":"0x0","flags":0,
                  "modifiers":[{"register":"ecx","bitmap":"0b0xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}]}],
                "msr_modifiers":[{"addr":"0x1a0","bitmap":"0bx1"}]}"#,
        )
        .unwrap();
        let p = c.parse().unwrap();
        assert_eq!(p.kvm_capabilities, vec![(121, true), (7, false)]);
        assert_eq!(p.cpuid[0].0, 1);
        assert_eq!(
            p.cpuid[0].3[0],
            (
                CpuidRegister::Ecx,
                Bits {
                    mask: 1 << 31,
                    value: 0
                }
            )
        );
        assert_eq!(p.msrs, vec![(0x1a0, Bits { mask: 1, value: 1 })]);
        let arm: CpuConfig =
            serde_json::from_str(r#"{"reg_modifiers":[{"addr":"0x1","bitmap":"0b1"}]}"#).unwrap();
        assert!(arm.parse().unwrap_err().contains("aarch64"));
        let bad: CpuConfig = serde_json::from_str(r#"{"kvm_capabilities":["x"]}"#).unwrap();
        assert!(bad.parse().is_err());
        assert!(serde_json::from_str::<CpuConfig>(
            r#"{"cpuid_modifiers":[{"leaf":"1","subleaf":"0","flags":0,"modifiers":[{"register":"esi","bitmap":"0b1"}]}]}"#
        )
        .is_err());
    }
}
