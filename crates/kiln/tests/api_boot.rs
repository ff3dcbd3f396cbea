//! Firecracker's pre-boot flow: `kiln vmm --api-sock` configured and started
//! over the API, and `kiln vmm --no-api --config-file`. Runs natively or in
//! the lab (see common/mod.rs).

mod common;

use std::time::Duration;

use common::{section, Batch};

fn cases() -> Vec<(&'static str, String)> {
    let cmdline = kiln_vmm::DEFAULT_CMDLINE;
    let api = "kiln api --sock /tmp/fc.sock";
    vec![
        (
            "api_boot",
            // kiln vmm waits in the background; the host configures it, starts
            // it, asks its state right away, tries a pre-boot PUT, and waits.
            format!(
                "rm -f /tmp/fc.log /tmp/fc.sock; \
                 (timeout 400 kiln vmm --api-sock /tmp/fc.sock --id api-boot --level Info \
                   > /tmp/fc.log 2>&1; echo kiln-status=$? >> /tmp/fc.log) & \
                 i=0; until [ -S /tmp/fc.sock ] || [ $i -gt 300 ]; do sleep 0.1; i=$((i+1)); done; \
                 echo '== before'; {api} GET /; \
                 echo '== early'; {api} PUT /actions '{{\"action_type\":\"InstanceStart\"}}'; \
                 echo '== boot-source'; {api} PUT /boot-source \
                   \"{{\\\"kernel_image_path\\\":\\\"$KILN_KERNEL\\\",\\\"initrd_path\\\":\\\"$KILN_INITRD\\\",\\\"boot_args\\\":\\\"{cmdline} -- echo booted-by-api\\\"}}\"; \
                 echo '== machine-config'; {api} PUT /machine-config '{{\"vcpu_count\":2,\"mem_size_mib\":256}}'; \
                 echo '== start'; {api} PUT /actions '{{\"action_type\":\"InstanceStart\"}}'; echo start-status=$?; \
                 echo '== running'; {api} GET /; \
                 echo '== late'; {api} PUT /machine-config '{{\"vcpu_count\":1,\"mem_size_mib\":256}}'; echo late-status=$?; \
                 wait; echo '== log'; cat /tmp/fc.log; \
                 test -e /tmp/fc.sock && echo socket-left-behind; true"
            ),
        ),
        (
            "config_file_boot",
            format!(
                "printf '%s' \"{{\\\"boot-source\\\":{{\\\"kernel_image_path\\\":\\\"$KILN_KERNEL\\\",\\\"initrd_path\\\":\\\"$KILN_INITRD\\\",\\\"boot_args\\\":\\\"{cmdline} -- echo booted-from-file\\\"}},\\\"machine-config\\\":{{\\\"vcpu_count\\\":1,\\\"mem_size_mib\\\":256}}}}\" > /tmp/fc.json; \
                 cat /tmp/fc.json; echo; \
                 timeout 400 kiln vmm --no-api --config-file /tmp/fc.json --boot-timer; echo kiln-status=$?"
            ),
        ),
    ]
}

static BATCH: Batch = Batch::new(cases, Duration::from_secs(900));

#[test]
fn api_configures_and_starts_the_vm() {
    let out = BATCH.get("api_boot");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    let before = section(&o, "before");
    assert!(
        before.contains(r#""id":"api-boot","state":"Not started""#),
        "{before}"
    );
    let early = section(&o, "early");
    assert!(early.starts_with("HTTP/1.1 400 "), "{early}");
    assert!(early.contains("without kernel configuration"), "{early}");
    assert!(
        section(&o, "boot-source").starts_with("HTTP/1.1 204 "),
        "{o}"
    );
    assert!(
        section(&o, "machine-config").starts_with("HTTP/1.1 204 "),
        "{o}"
    );
    let start = section(&o, "start");
    assert!(
        start.contains("HTTP/1.1 204 No Content\nstart-status=0"),
        "{o}"
    );
    let running = section(&o, "running");
    assert!(running.contains(r#""state":"Running""#), "{o}");
    let late = section(&o, "late");
    assert!(late.starts_with("HTTP/1.1 400 "), "{o}");
    assert!(
        late.contains("not allowed after the microVM has started"),
        "{o}"
    );
    assert!(late.contains("late-status=1"), "{o}");
    let log = section(&o, "log");
    assert!(
        log.lines().any(|l| l.trim() == "booted-by-api"),
        "the guest did not run its command: {o}"
    );
    assert!(log.contains("kiln-status=0"), "{o}");
    assert!(!o.contains("socket-left-behind"), "{o}");
}

#[test]
fn config_file_boots_without_api() {
    let out = BATCH.get("config_file_boot");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    assert!(
        o.lines().any(|l| l.trim() == "booted-from-file"),
        "the guest did not run its command: {o}"
    );
    assert!(o.contains("kiln-status=0"), "{o}");
}

#[test]
fn bad_flags_and_files_fail_with_one_line() {
    let bad = common::temp_file(
        "bad.json",
        br#"{"boot-source":{"kernel_image_path":"/k"},"logger":{"colour":true}}"#,
    );
    let bad = bad.to_str().unwrap();
    for (args, expect) in [
        (
            vec!["vmm", "--api-sock", "/tmp/x.sock", "--seccomp-filter", "f"],
            "kiln: vmm: Firecracker's --seccomp-filter is not supported by Kiln\n".to_string(),
        ),
        (
            vec!["vmm", "--no-api", "--config-file", bad],
            format!("kiln: vmm: --config-file {bad}: unknown field `colour`"),
        ),
        (
            vec!["vmm", "--api-sock", "/tmp/x.sock", "--level", "loud"],
            "kiln: vmm: --level: Invalid log level \"loud\"".to_string(),
        ),
    ] {
        let out = common::kiln_here(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with(&expect), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
}
