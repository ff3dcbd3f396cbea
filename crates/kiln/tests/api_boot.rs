//! Firecracker's pre-boot flow: `kiln vmm --api-sock` configured and started
//! over the API, and `kiln vmm --no-api --config-file`. Runs natively or in
//! the lab (see common/mod.rs).

mod common;

use std::time::Duration;

use common::{section, Batch};

/// The guest of `device_updates` (no quotes of either kind: it goes, as one
/// double-quoted init argument, into a JSON string inside a single-quoted
/// shell word; unquoted, its words would exceed the kernel's 32 init
/// arguments). It prints its drive's
/// size and first bytes, waits for the size to change, prints them again
/// (read with O_DIRECT, past the page cache), then receives two TCP
/// transfers.
const UPDATE_GUEST: &str = "s=$(cat /sys/block/vda/size); echo size-before=$s; \
    dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 13; echo; \
    i=0; while [ $i -lt 600 ] && [ $(cat /sys/block/vda/size) = $s ]; do sleep 0.2; i=$((i+1)); done; \
    echo size-after=$(cat /sys/block/vda/size); \
    dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c 13; echo; \
    ip addr add 172.31.0.2/24 dev eth0; ip link set eth0 up; echo net-ready; \
    nc -l -p 5001 > /dev/null; echo got-1; nc -l -p 5002 > /dev/null; echo got-2";

fn update_config() -> String {
    format!(
        r#"{{"boot-source":{{"kernel_image_path":"@K@","initrd_path":"@I@","boot_args":"{} -- \"{UPDATE_GUEST}\""}},"drives":[{{"drive_id":"data","path_on_host":"/tmp/old.img","is_root_device":false,"is_read_only":true}}],"machine-config":{{"vcpu_count":1,"mem_size_mib":256}},"network-interfaces":[{{"iface_id":"eth0","host_dev_name":"kt1","guest_mac":"06:00:AC:10:00:02"}}]}}"#,
        kiln_vmm::DEFAULT_CMDLINE
    )
}

fn cases() -> Vec<(&'static str, String)> {
    let cmdline = kiln_vmm::DEFAULT_CMDLINE;
    let api = "kiln api --sock /tmp/fc.sock";
    let du = "kiln api --sock /tmp/du.sock";
    let config = update_config();
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
        (
            "device_updates",
            // A running VM (config file + API socket) with a read-only 1 MiB
            // drive and a TAP. The host swaps the drive for a 3 MiB file
            // with other content, which the guest sees (new size after the
            // config-change interrupt, new data); then it times 1 MiB sent
            // to the guest over TCP before and after limiting the
            // interface's RX to 64 KiB/s.
            format!(
                "IP=/usr/local/bin/ip; [ -x $IP ] || IP=ip; cd /tmp; rm -f du.sock du.log; \
                 dd if=/dev/zero of=old.img bs=1M count=1 2>/dev/null; printf kiln-old-disk | dd of=old.img conv=notrunc 2>/dev/null; \
                 dd if=/dev/zero of=new.img bs=1M count=3 2>/dev/null; printf kiln-new-disk | dd of=new.img conv=notrunc 2>/dev/null; \
                 head -c 1048576 /dev/urandom > blob1m; \
                 $IP tuntap add dev kt1 mode tap && $IP addr add 172.31.0.1/24 dev kt1 && $IP link set kt1 up; \
                 printf '%s' '{config}' | sed -e \"s|@K@|$KILN_KERNEL|\" -e \"s|@I@|$KILN_INITRD|\" > du.json; \
                 (timeout 240 kiln vmm --api-sock /tmp/du.sock --config-file /tmp/du.json > du.log 2>&1; echo kiln-status=$? >> du.log) & \
                 i=0; until grep -q ^size-before= du.log || [ $i -gt 240 ]; do sleep 0.5; i=$((i+1)); done; \
                 echo '== patch-missing'; {du} PATCH /drives/data '{{\"drive_id\":\"data\",\"path_on_host\":\"/tmp/none.img\"}}'; \
                 echo '== patch-unknown'; {du} PATCH /drives/nope '{{\"drive_id\":\"nope\",\"path_on_host\":\"/tmp/new.img\"}}'; \
                 echo '== patch-drive'; {du} PATCH /drives/data '{{\"drive_id\":\"data\",\"path_on_host\":\"/tmp/new.img\"}}'; \
                 i=0; until grep -q ^net-ready du.log || [ $i -gt 240 ]; do sleep 0.5; i=$((i+1)); done; \
                 t0=$(cut -d' ' -f1 /proc/uptime); \
                 i=0; until timeout 60 nc 172.31.0.2 5001 < blob1m || [ $i -gt 50 ]; do sleep 0.2; i=$((i+1)); done; \
                 t1=$(cut -d' ' -f1 /proc/uptime); \
                 echo '== patch-net'; {du} PATCH /network-interfaces/eth0 '{{\"iface_id\":\"eth0\",\"rx_rate_limiter\":{{\"bandwidth\":{{\"size\":65536,\"refill_time\":1000}}}}}}'; \
                 echo '== vm-config'; {du} GET /vm/config; echo; \
                 t2=$(cut -d' ' -f1 /proc/uptime); \
                 i=0; until timeout 90 nc 172.31.0.2 5002 < blob1m || [ $i -gt 50 ]; do sleep 0.2; i=$((i+1)); done; \
                 t3=$(cut -d' ' -f1 /proc/uptime); \
                 echo '== times'; echo unlimited $t0 $t1 limited $t2 $t3; \
                 wait; echo '== log'; cat du.log; $IP link del kt1; true"
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
            vec![
                "vmm",
                "--api-sock",
                "/tmp/x.sock",
                "--seccomp-filter",
                "/nonexistent/f",
            ],
            "kiln: vmm: seccomp filter file /nonexistent/f: No such file or directory".to_string(),
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

#[test]
fn running_drive_and_interface_are_updated_over_the_api() {
    let out = BATCH.get("device_updates");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    let missing = section(&o, "patch-missing");
    assert!(missing.starts_with("HTTP/1.1 400 "), "{o}");
    assert!(missing.contains("No such file or directory"), "{missing}");
    let unknown = section(&o, "patch-unknown");
    assert!(unknown.starts_with("HTTP/1.1 400 "), "{o}");
    assert!(unknown.contains("no drive with id"), "{unknown}");
    assert!(
        section(&o, "patch-drive").starts_with("HTTP/1.1 204 "),
        "{o}"
    );
    assert!(section(&o, "patch-net").starts_with("HTTP/1.1 204 "), "{o}");
    let log = section(&o, "log");
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    // 1 MiB, then 3 MiB, in sectors; the old file's data, then the new's
    // (so the failed patch kept the old file).
    let at = |l: &str| {
        lines
            .iter()
            .position(|x| *x == l)
            .unwrap_or_else(|| panic!("no line {l:?}: {o}"))
    };
    assert!(at("size-before=2048") < at("kiln-old-disk"), "{o}");
    assert!(at("kiln-old-disk") < at("size-after=6144"), "{o}");
    assert!(at("size-after=6144") < at("kiln-new-disk"), "{o}");
    assert!(at("got-1") < at("got-2"), "{o}");
    assert!(log.contains("kiln-status="), "{o}");

    // The same 1 MiB to the guest, before and after a 64 KiB/s RX limit.
    let times: Vec<f64> = section(&o, "times")
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(times.len(), 4, "{o}");
    let (free, limited) = (times[1] - times[0], times[3] - times[2]);
    eprintln!("1 MiB to the guest: {free:.2} s unlimited, {limited:.2} s at 64 KiB/s");
    // The bucket starts full (64 KiB): at least 15 s for the rest.
    assert!(limited >= 12.0, "limited transfer took {limited:.2} s: {o}");
    assert!(
        limited > 2.0 * free,
        "unlimited {free:.2} s vs limited {limited:.2} s: {o}"
    );
    let config = section(&o, "vm-config");
    assert!(
        config.contains(r#""path_on_host":"/tmp/new.img""#),
        "{config}"
    );
    assert!(
        config.contains(r#""rx_rate_limiter":{"bandwidth":{"size":65536,"one_time_burst":0,"refill_time":1000}}"#),
        "{config}"
    );
}
