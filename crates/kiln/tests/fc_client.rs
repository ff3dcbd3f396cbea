//! Kiln as a Firecracker drop-in: the `firecracker` name, SendCtrlAltDel,
//! and a third-party Firecracker client (`firecracker-rs-sdk`, through the
//! example `fc_sdk_client`) driving it unmodified. Pre-boot checks run
//! natively; booting ones run in the lab (see common/mod.rs).

mod common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{section, Batch};

/// What the guest runs: show the kernel's keyboard lines, say it is ready,
/// then stay up (so only Ctrl-Alt-Del can end it).
const GUEST_CMD: &str = "dmesg | grep -i -e i8042 -e serio -e input: ; \
    grep i8042 /proc/interrupts ; \
    [ -e /sys/block/vda ] && echo guest-has-vda ; echo fc-guest-ready ; sleep 600";

/// The kernel command line without Kiln's i8042 options, so Linux probes
/// the keyboard fully (identify, LEDs, typematic rate, enable).
const FULL_PROBE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

fn cases() -> Vec<(&'static str, String)> {
    let cmdline = kiln_vmm::DEFAULT_CMDLINE;
    vec![
        (
            "sdk_client",
            format!(
                "rm -rf /tmp/fcsdk; mkdir -p /tmp/fcsdk; \
                 ln -s \"$(command -v kiln)\" /tmp/fcsdk/firecracker; \
                 dd if=/dev/zero of=/tmp/fcsdk/data.img bs=1M count=4 2>/dev/null; \
                 timeout 600 fc_sdk_client --fc /tmp/fcsdk/firecracker --sock /tmp/fcsdk/api.sock \
                   --console /tmp/fcsdk/console.txt --kernel \"$KILN_KERNEL\" --initrd \"$KILN_INITRD\" \
                   --drive /tmp/fcsdk/data.img --boot-args \"{cmdline} -- {GUEST_CMD}\"; \
                 echo client-status=$?; \
                 echo '== console'; cat /tmp/fcsdk/console.txt; \
                 echo '== vmm-stderr'; cat /tmp/fcsdk/console.err; \
                 test -e /tmp/fcsdk/api.sock && echo socket-left-behind; true"
            ),
        ),
        (
            "api_full_probe",
            // `kiln vmm` over `kiln api`, with Linux's full keyboard probe;
            // the host waits for the guest, sends Ctrl-Alt-Del and counts
            // tenths of a second until kiln exits.
            format!(
                "rm -f /tmp/cad.log /tmp/cad.sock /tmp/cad.done; api='kiln api --sock /tmp/cad.sock'; \
                 (timeout 500 kiln vmm --api-sock /tmp/cad.sock --id cad-full > /tmp/cad.log 2>&1; \
                  echo kiln-status=$? > /tmp/cad.done) & \
                 i=0; until [ -S /tmp/cad.sock ] || [ $i -gt 300 ]; do sleep 0.1; i=$((i+1)); done; \
                 $api PUT /boot-source \"{{\\\"kernel_image_path\\\":\\\"$KILN_KERNEL\\\",\\\"initrd_path\\\":\\\"$KILN_INITRD\\\",\\\"boot_args\\\":\\\"{FULL_PROBE_CMDLINE} -- {GUEST_CMD}\\\"}}\" >/dev/null; \
                 $api PUT /actions '{{\"action_type\":\"InstanceStart\"}}' >/dev/null; \
                 i=0; until grep -q '^fc-guest-ready' /tmp/cad.log || [ $i -gt 3000 ]; do sleep 0.1; i=$((i+1)); done; \
                 echo '== cad'; $api PUT /actions '{{\"action_type\":\"SendCtrlAltDel\"}}'; \
                 i=0; until [ -e /tmp/cad.done ] || [ $i -gt 600 ]; do sleep 0.1; i=$((i+1)); done; \
                 echo \"exit-tenths=$i\"; cat /tmp/cad.done; \
                 wait; echo '== log'; cat /tmp/cad.log; true"
            ),
        ),
    ]
}

fn binaries() -> Vec<PathBuf> {
    vec![common::example_bin("fc_sdk_client")]
}

static BATCH: Batch = Batch::with_binaries(cases, Duration::from_secs(1200), binaries);

/// The value after `key` on the line that starts with it.
fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
}

/// What the SDK client printed of its pre-boot calls (every run makes
/// them); returns why it says the pre-boot stop was refused.
fn assert_preboot_calls(o: &str) -> &str {
    assert_eq!(
        value(o, "fc-client: instance"),
        Some("fc-sdk-vm state NotStarted app kiln"),
        "{o}"
    );
    assert_eq!(
        value(o, "fc-client: machine"),
        Some("1 vcpu 256 MiB"),
        "{o}"
    );
    assert!(o.contains("fc-client: drive set\n"), "{o}");
    value(o, "fc-client: pre-boot stop refused:").unwrap_or_else(|| panic!("{o}"))
}

/// Kernel console lines that show the keyboard was found through ACPI at
/// GSI 1 (IO-APIC pin 1; Linux numbers the IRQ itself, e.g. 25, as a
/// hardware-reduced ACPI machine has no legacy IRQ range) and the guest
/// rebooted on Ctrl-Alt-Del (not because its command ended).
fn assert_keyboard_and_reboot(console: &str, all: &str) {
    assert!(
        console.contains("[PNP0303:PS2K] at 0x60,0x64 irq"),
        "ACPI did not declare the keyboard: {all}"
    );
    assert!(
        console.contains("serio: i8042 KBD port at 0x60,0x64 irq"),
        "the guest found no i8042 keyboard: {all}"
    );
    assert!(
        console
            .lines()
            .any(|l| l.contains("IO-APIC") && l.contains(" 1-edge") && l.contains("i8042")),
        "the keyboard interrupt is not IO-APIC pin 1: {all}"
    );
    assert!(
        console.contains("input: AT Translated Set 2 keyboard"),
        "no keyboard input device: {all}"
    );
    assert!(
        console.lines().any(|l| l.trim() == "fc-guest-ready"),
        "{all}"
    );
    assert!(
        console.contains("reboot: Restarting system"),
        "the guest did not reboot: {all}"
    );
    assert!(
        !console.contains("KILN-EXIT="),
        "the guest command ended by itself: {all}"
    );
}

#[test]
fn sdk_client_boots_pauses_and_stops_kiln() {
    let out = BATCH.get("sdk_client");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    assert_eq!(value(&o, "client-status="), Some("0"), "{o}");
    // What the library returned.
    assert_eq!(
        value(&o, "fc-client: version"),
        Some(env!("CARGO_PKG_VERSION")),
        "{o}"
    );
    assert_preboot_calls(&o);
    assert_eq!(value(&o, "fc-client: after start"), Some("Running"), "{o}");
    assert_eq!(
        value(&o, "fc-client: pause"),
        Some("Paused resume Running"),
        "{o}"
    );
    assert!(o.contains("fc-client: stop sent\n"), "{o}");
    assert_eq!(value(&o, "fc-client: vmm exit status"), Some("0"), "{o}");
    // What the guest showed.
    let console = section(&o, "console");
    assert_keyboard_and_reboot(console, &o);
    assert!(
        console.lines().any(|l| l.trim() == "guest-has-vda"),
        "the drive did not reach the guest: {o}"
    );
    assert!(!o.contains("socket-left-behind"), "{o}");
}

#[test]
fn ctrl_alt_del_after_a_full_keyboard_probe() {
    let out = BATCH.get("api_full_probe");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    let cad = section(&o, "cad");
    assert!(cad.starts_with("HTTP/1.1 204 "), "{o}");
    assert!(cad.contains("kiln-status=0"), "{o}");
    let tenths: u32 = value(&o, "exit-tenths=")
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX);
    // Bounded: the lab is slow, but a reboot takes seconds, not a minute.
    assert!(tenths < 600, "kiln did not exit after Ctrl-Alt-Del: {o}");
    let log = section(&o, "log");
    assert_keyboard_and_reboot(log, &o);
    // The full probe (identify, LEDs, rate, enable) ran on interrupts: the
    // count on the i8042 line of /proc/interrupts.
    let count: u64 = log
        .lines()
        .find(|l| l.contains(" 1-edge") && l.contains("i8042"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(count >= 5, "too few keyboard interrupts ({count}): {o}");
    // No probe errors or timeouts from the keyboard driver.
    for bad in ["Can't read CTR", "No controller found", "timeout", "failed"] {
        assert!(
            !log.lines()
                .any(|l| l.contains(bad) && (l.contains("i8042") || l.contains("atkbd"))),
            "{bad}: {o}"
        );
    }
}

/// A `firecracker` symlink to kiln in a fresh directory.
fn firecracker_link(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-fc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("firecracker");
    symlink(common::kiln_bin(), &link).unwrap();
    link
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn firecracker_name_runs_the_vmm_with_firecracker_flags() {
    let fc = firecracker_link("name");
    let out = Command::new(&fc).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with(&format!("Firecracker v{}", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    // Firecracker's flags, `kiln vmm`'s behaviour.
    let sock = fc.with_file_name("api.sock");
    let _vmm = Killed(
        Command::new(&fc)
            .args(["--api-sock", sock.to_str().unwrap(), "--id", "fc-native"])
            .args(["--level", "Warning", "--show-level", "--boot-timer"])
            .env("KILN_LAB", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&sock);
    let r = kiln_api::client::request(&sock, "GET", "/", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains(r#""id":"fc-native","state":"Not started""#),
        "{}",
        r.body
    );
    // SendCtrlAltDel before boot: 400 with Firecracker's message.
    let r = kiln_api::client::request(
        &sock,
        "PUT",
        "/actions",
        Some(r#"{"action_type":"SendCtrlAltDel"}"#),
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        r.body,
        r#"{"fault_message":"The requested operation is not supported before starting the microVM."}"#
    );
    // Kiln's own subcommands do not exist under that name.
    let out = Command::new(&fc).args(["run", "--help"]).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn sdk_client_configures_kiln_before_boot() {
    let fc = firecracker_link("sdk");
    let dir = fc.parent().unwrap();
    let out = Command::new(common::example_bin("fc_sdk_client"))
        .arg("--fc")
        .arg(&fc)
        .arg("--sock")
        .arg(dir.join("api.sock"))
        .arg("--console")
        .arg(dir.join("console.txt"))
        .args(["--kernel", "/k", "--boot-args", "console=ttyS0 -- echo hi"])
        .arg("--drive")
        .arg(&fc)
        .arg("--preboot-only")
        .env("KILN_LAB", "0")
        .output()
        .unwrap();
    let o = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{o}");
    let refused = assert_preboot_calls(&o);
    // The library cannot decode a fault into its empty response: the 400.
    assert!(refused.contains("fault") || refused.contains("map"), "{o}");
    assert!(o.contains("fc-client: pre-boot done\n"), "{o}");
    // Dropping the SDK's instance sends SIGTERM.
    assert_eq!(value(&o, "fc-client: vmm exit status"), Some("143"), "{o}");
}
