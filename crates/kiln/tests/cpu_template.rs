//! Custom CPU templates (`cpu-config`) with the stock kernel (lab, or
//! natively on a KVM host): the same guest booted without and with a
//! template that clears SMEP and SMAP (CPUID.7.0:EBX bits 7 and 20), adds a
//! CPUID leaf of its own and sets an MSR bit: the guest's CPUID and
//! /proc/cpuinfo show the change (and did not before). A template with an
//! MSR KVM does not have, or a KVM capability the host lacks, stops the
//! start with one line.

mod common;

use std::time::Duration;

use common::{section, Batch};

const GUEST: &str =
    "grep -c -w smep /proc/cpuinfo; kiln-agent cpuid 7 0; kiln-agent cpuid 0x4fff0000";

/// Clears SMEP and SMAP, adds leaf 0x4fff0000 with EDX = "KILN" (ASCII,
/// little-endian), sets IA32_MISC_ENABLE bit 0 (fast strings).
const TEMPLATE: &str = r#"{"cpuid_modifiers":[
  {"leaf":"0x7","subleaf":"0x0","flags":1,"modifiers":[{"register":"ebx","bitmap":"0bxxxxxxxxxxx0xxxxxxxxxxxx0xxxxxxx"}]},
  {"leaf":"0x4fff0000","subleaf":"0","flags":0,"modifiers":[{"register":"edx","bitmap":"0b01001110010011000100100101001011"}]}],
 "msr_modifiers":[{"addr":"0x1a0","bitmap":"0bx1"}],
 "kvm_capabilities":["!121"]}"#;

fn config(cpu: &str) -> String {
    format!(
        r#"{{"boot-source":{{"kernel_image_path":"$KILN_KERNEL","initrd_path":"$KILN_INITRD","boot_args":"{} -- \"{GUEST}\""}},"machine-config":{{"vcpu_count":1,"mem_size_mib":256}}{cpu}}}"#,
        kiln_vmm::DEFAULT_CMDLINE
    )
}

fn cases() -> Vec<(&'static str, String)> {
    let plain = config("");
    let templ = config(&format!(r#","cpu-config":{TEMPLATE}"#));
    let bad_msr =
        config(r#","cpu-config":{"msr_modifiers":[{"addr":"0xdeadbeef","bitmap":"0b1"}]}"#);
    let bad_cap = config(r#","cpu-config":{"kvm_capabilities":["999999"]}"#);
    vec![(
        "boots",
        format!(
            r#"cat > /tmp/c0.json <<EOF
{plain}
EOF
cat > /tmp/c1.json <<EOF
{templ}
EOF
cat > /tmp/c2.json <<EOF
{bad_msr}
EOF
cat > /tmp/c3.json <<EOF
{bad_cap}
EOF
echo '== plain'; timeout 200 kiln vmm --no-api --config-file /tmp/c0.json 2>&1 | tr -d '\r'
echo '== template'; timeout 200 kiln vmm --no-api --config-file /tmp/c1.json 2>&1 | tr -d '\r'
echo '== badmsr'; timeout 200 kiln vmm --no-api --config-file /tmp/c2.json 2>&1; echo status=$?
echo '== badcap'; timeout 200 kiln vmm --no-api --config-file /tmp/c3.json 2>&1; echo status=$?"#
        ),
    )]
}

static BATCH: Batch = Batch::new(cases, Duration::from_secs(600));

/// The guest's `smep` count and its CPUID answers (leaf 7, leaf 0x4fff0000).
fn guest(out: &str) -> (u32, Vec<u32>, Vec<u32>) {
    let lines: Vec<&str> = out
        .lines()
        .skip_while(|l| *l != "KILN-INIT-READY")
        .skip(1)
        .collect();
    let regs = |l: &str| -> Vec<u32> {
        l.split_whitespace()
            .map(|x| u32::from_str_radix(x, 16).unwrap_or_else(|_| panic!("{out}")))
            .collect()
    };
    let smep = lines[0].trim().parse().unwrap_or_else(|_| panic!("{out}"));
    (smep, regs(lines[1]), regs(lines[2]))
}

#[test]
fn a_template_changes_what_the_guest_sees_and_bad_ones_stop_the_start() {
    let out = BATCH.get("boots");
    eprintln!("{}", out.output);
    let o = &out.output;
    let (smep, leaf7, _) = guest(section(o, "plain"));
    // Without a template the guest has SMEP (so the test can see it go).
    assert_eq!(smep, 1, "{o}");
    assert_ne!(leaf7[1] & (1 << 7), 0, "{o}");
    let (smep, leaf7, own) = guest(section(o, "template"));
    assert_eq!(smep, 0, "{o}");
    assert_eq!(leaf7[1] & ((1 << 7) | (1 << 20)), 0, "{o}");
    assert_eq!(own[3], 0x4e4c_494b, "leaf 0x4fff0000 EDX: {o}");
    let bad = section(o, "badmsr");
    assert!(bad.contains("MSR 0xdeadbeef cannot be read"), "{bad}");
    assert!(bad.contains("status=1"), "{bad}");
    let bad = section(o, "badcap");
    assert!(
        bad.contains("KVM capability 999999 is not available"),
        "{bad}"
    );
    assert!(bad.contains("status=1"), "{bad}");
}
