//! Boots Debian's stock cloud kernel in Kiln microVMs (natively, or in the
//! lab when this host's KVM cannot run it) and checks what the guest sees.
//! Needs root on a fresh machine only to install packages; see README.

mod common;

use std::time::Duration;

use common::{guest_lines, guest_status, octal, Batch};

const QUIET: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

fn cases() -> Vec<(&'static str, String)> {
    let t = "timeout 300";
    vec![
        ("cpus1", format!("{t} kiln run --vcpus 1 -- grep -c ^processor /proc/cpuinfo")),
        ("cpus4", format!("{t} kiln run --vcpus 4 -- grep -c ^processor /proc/cpuinfo")),
        ("mem", format!("{t} kiln run --mem 512 -- grep MemTotal /proc/meminfo")),
        (
            "cmdline",
            format!("{t} kiln run --cmdline '{QUIET} kiln.test=cmdline-ok' -- cat /proc/cmdline"),
        ),
        (
            "pvh",
            // The ELF vmlinux (with the Xen PVH note) enters through PVH.
            format!("KILN_LOG=info {t} kiln run --kernel $KILN_VMLINUX --initrd $KILN_INITRD --vcpus 2 -- grep -c ^processor /proc/cpuinfo"),
        ),
        ("reboot", format!("{t} kiln run -- 'echo before-reboot; reboot -f'")),
        ("poweroff", format!("{t} kiln run -- 'echo before-poweroff; poweroff -f'")),
        ("exit_status", format!("{t} kiln run -- 'exit 7'")),
        ("panic", format!("{t} kiln run -- 'echo c > /proc/sysrq-trigger'")),
        (
            "triple_fault",
            format!(
                "printf '{}' > /tmp/tf.elf && {t} kiln run --kernel /tmp/tf.elf",
                octal(&triple_fault_kernel())
            ),
        ),
        (
            "serial_input",
            // The guest gets no command, so init starts a shell on the serial
            // console; the host types into kiln's stdin once the guest is up.
            format!(
                "rm -f /tmp/kin /tmp/kout; mkfifo /tmp/kin; \
                 ({t} kiln run </tmp/kin >/tmp/kout 2>&1; echo status=$? >>/tmp/kout) & \
                 exec 3>/tmp/kin; i=0; \
                 until grep -q KILN-INIT-READY /tmp/kout || [ $i -gt 1200 ]; do sleep 0.1; i=$((i+1)); done; \
                 printf 'echo typed-$((6*7))\\nexit\\n' >&3; exec 3>&-; wait; cat /tmp/kout"
            ),
        ),
    ]
}

/// A 64-bit ELF "kernel" whose first instruction is `ud2`: with no IDT the
/// #UD becomes a double and then a triple fault, a shutdown the guest
/// never asked for.
fn triple_fault_kernel() -> Vec<u8> {
    const BASE: u64 = 0x100_0000;
    const EHDR: u16 = 64;
    const PHDR: u16 = 56;
    let code = [0x0f, 0x0b]; // ud2
    let entry = BASE + u64::from(EHDR + PHDR);
    let size = u64::from(EHDR + PHDR) + code.len() as u64;
    let mut f = b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0".to_vec();
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(0x3eu16.to_le_bytes()); // x86-64
    f.extend(1u32.to_le_bytes());
    f.extend(entry.to_le_bytes());
    f.extend(u64::from(EHDR).to_le_bytes()); // program headers
    f.extend(0u64.to_le_bytes()); // no section headers
    f.extend(0u32.to_le_bytes());
    for h in [EHDR, PHDR, 1, 64, 0, 0] {
        f.extend(h.to_le_bytes());
    }
    f.extend(1u32.to_le_bytes()); // PT_LOAD
    f.extend(5u32.to_le_bytes()); // R+X
    for v in [0, BASE, BASE, size, size, 0x1000] {
        f.extend(v.to_le_bytes());
    }
    f.extend(code);
    f
}

static BATCH: Batch = Batch::new(cases, Duration::from_secs(900));

fn only_line(name: &str) -> String {
    let out = BATCH.get(name);
    assert_eq!(out.status, 0, "{name}: kiln failed:\n{}", out.output);
    let lines = guest_lines(out);
    assert_eq!(
        lines.len(),
        1,
        "{name}: expected one line of guest output:\n{}",
        out.output
    );
    lines[0].clone()
}

#[test]
fn one_vcpu_guest_sees_one_cpu() {
    assert_eq!(only_line("cpus1"), "1");
}

#[test]
fn four_vcpu_guest_sees_four_cpus() {
    assert_eq!(only_line("cpus4"), "4");
}

#[test]
fn guest_memtotal_within_ten_percent_of_mem() {
    let line = only_line("mem");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("bad MemTotal line {line:?}"));
    let want = 512 * 1024;
    assert!(
        kib * 10 >= want * 9 && kib <= want,
        "MemTotal {kib} kB is not within 10% of {want} kB"
    );
}

#[test]
fn kernel_cmdline_reaches_guest() {
    let line = only_line("cmdline");
    assert!(line.contains("kiln.test=cmdline-ok"), "{line}");
    assert!(line.starts_with("console=ttyS0"), "{line}");
}

#[test]
fn guest_reboot_ends_vmm_with_status_zero() {
    let out = BATCH.get("reboot");
    assert_eq!(out.status, 0, "{}", out.output);
    assert!(
        guest_lines(out).contains(&"before-reboot".to_string()),
        "{}",
        out.output
    );
    // The guest rebooted before its init could report a status.
    assert_eq!(guest_status(out), None, "{}", out.output);
}

#[test]
fn guest_poweroff_ends_vmm_with_status_zero() {
    let out = BATCH.get("poweroff");
    assert_eq!(out.status, 0, "{}", out.output);
    assert!(
        guest_lines(out).contains(&"before-poweroff".to_string()),
        "{}",
        out.output
    );
}

#[test]
fn guest_command_status_is_reported() {
    let out = BATCH.get("exit_status");
    assert_eq!(out.status, 0, "{}", out.output);
    assert_eq!(guest_status(out), Some(7), "{}", out.output);
}

#[test]
fn guest_panic_is_a_clear_nonzero_exit() {
    let out = BATCH.get("panic");
    assert_eq!(out.status, 2, "{}", out.output);
    assert!(
        out.output.contains("kiln: the guest kernel panicked"),
        "{}",
        out.output
    );
    assert!(!out.output.contains("KILN-EXIT="), "{}", out.output);
}

#[test]
fn a_triple_fault_the_guest_did_not_ask_for_is_no_reboot() {
    let out = BATCH.get("triple_fault");
    assert_eq!(out.status, 3, "{}", out.output);
    // (On AMD, KVM has already reset the vCPU when it reports the shutdown,
    // so the registers named are the reset state, not the faulting ones.)
    assert!(
        out.output.contains(
            "kiln: vCPU error: the guest triple-faulted without asking for a reset (vcpu0: rip="
        ),
        "{}",
        out.output
    );
}

#[test]
fn the_triple_fault_kernel_is_the_elf_it_claims() {
    let k = triple_fault_kernel();
    assert_eq!(k.len(), 122);
    assert_eq!(&k[..4], b"\x7fELF");
    // e_entry points at the code, which ends the file.
    assert_eq!(
        u64::from_le_bytes(k[24..32].try_into().unwrap()),
        0x100_0078
    );
    assert_eq!(&k[120..], [0x0f, 0x0b]);
    assert!(octal(&k).starts_with("\\177\\105\\114\\106"));
}

#[test]
fn serial_input_reaches_guest_shell() {
    let out = BATCH.get("serial_input");
    assert_eq!(out.status, 0, "{}", out.output);
    // Only the guest's shell can turn the typed expression into 42.
    assert!(
        out.output
            .lines()
            .any(|l| l.trim_end_matches('\r') == "typed-42"),
        "{}",
        out.output
    );
    assert!(out.output.contains("status=0"), "{}", out.output);
}

#[test]
fn elf_vmlinux_boots_through_pvh() {
    let out = BATCH.get("pvh");
    assert_eq!(out.status, 0, "{}", out.output);
    assert!(out.output.contains("Pvh entry at"), "{}", out.output);
    assert_eq!(guest_lines(out), vec!["2"], "{}", out.output);
}
