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
            "metrics_boot",
            // A guest reads and writes its disk; the host flushes the metrics
            // (FlushMetrics) and prints every metrics line.
            format!(
                "rm -f /tmp/mx.log /tmp/mx.sock /tmp/m.json; head -c 4194304 /dev/zero > /tmp/md.img; \
                 (timeout 400 kiln vmm --api-sock /tmp/mx.sock --id metrics-lab --metrics-path /tmp/m.json \
                   > /tmp/mx.log 2>&1; echo kiln-status=$? >> /tmp/mx.log) & \
                 i=0; until [ -S /tmp/mx.sock ] || [ $i -gt 300 ]; do sleep 0.1; i=$((i+1)); done; \
                 {mx} PUT /boot-source \
                   \"{{\\\"kernel_image_path\\\":\\\"$KILN_KERNEL\\\",\\\"initrd_path\\\":\\\"$KILN_INITRD\\\",\\\"boot_args\\\":\\\"{cmdline} -- head -c 65536 /dev/vda | wc -c; dd if=/dev/zero of=/dev/vda bs=4096 count=16 conv=fsync 2>/dev/null; echo disk-done; sleep 5\\\"}}\"; \
                 {mx} PUT /drives/data '{{\"drive_id\":\"data\",\"path_on_host\":\"/tmp/md.img\",\"is_root_device\":false}}'; \
                 echo '== early-flush'; {mx} PUT /actions '{{\"action_type\":\"FlushMetrics\"}}'; \
                 {mx} PUT /actions '{{\"action_type\":\"InstanceStart\"}}'; \
                 i=0; until grep -q disk-done /tmp/mx.log || [ $i -gt 600 ]; do sleep 0.5; i=$((i+1)); done; \
                 echo '== flush'; {mx} PUT /actions '{{\"action_type\":\"FlushMetrics\"}}'; \
                 echo '== metrics'; sed 's/^/METRICS /' /tmp/m.json; \
                 wait; echo '== log'; cat /tmp/mx.log",
                mx = "kiln api --sock /tmp/mx.sock"
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
fn flush_metrics_reports_guest_activity() {
    let out = BATCH.get("metrics_boot");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    let early = section(&o, "early-flush");
    assert!(
        early.starts_with("HTTP/1.1 400 "),
        "pre-boot FlushMetrics: {o}"
    );
    assert!(
        section(&o, "flush").starts_with("HTTP/1.1 204 "),
        "FlushMetrics: {o}"
    );
    let lines: Vec<serde_json::Value> = o
        .lines()
        .filter_map(|l| l.strip_prefix("METRICS "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    // The line at configuration, FlushMetrics's (and maybe the timer's).
    assert!(lines.len() >= 2, "{o}");
    // Counters are increases: their sum over the lines is the total.
    let total = |section: &str, field: &str| -> u64 {
        lines
            .iter()
            .map(|l| l[section][field].as_u64().unwrap_or(0))
            .sum()
    };
    for (section, field) in [
        ("block_data", "read_count"),
        ("block_data", "read_bytes"),
        ("block_data", "write_count"),
        ("block", "write_bytes"),
        ("vcpu", "exit_io_out"),
        ("vcpu", "exit_mmio_read"),
        ("uart", "write_count"),
        ("rtc", "read_count"),
        ("block_data", "flush_count"),
    ] {
        assert!(total(section, field) > 0, "{section}.{field}: {o}");
    }
    assert!(total("block_data", "read_bytes") >= 65536, "{o}");
    assert_eq!(total("vcpu", "failures"), 0, "{o}");
    // The last FlushMetrics is counted after its own line is written.
    assert!(total("put_api_requests", "actions_count") >= 2, "{o}");
    assert_eq!(total("put_api_requests", "actions_fails"), 1, "{o}");
    assert!(section(&o, "log").contains("kiln-status=0"), "{o}");
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
