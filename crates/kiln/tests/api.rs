//! The REST API steering a running guest's balloon (`kiln run --api-sock`
//! and `kiln api`). Runs natively or in the lab (see common/mod.rs).

mod common;

use std::time::Duration;

use common::{section, Batch};

/// The guest prints MemTotal (kB), waits until it has dropped by 128 MiB,
/// prints it, waits until it is back, prints it (each wait gives up after
/// two minutes, so a broken balloon shows up as wrong numbers).
/// No double quotes: kiln wraps the guest command in them.
const GUEST: &str = "m() { set -- $(grep MemTotal /proc/meminfo); v=$2; }; \
    m; a=$v; echo MemTotal: $v kB; \
    i=0; while [ $i -lt 600 ] && [ $((a - v)) -lt 131072 ]; do sleep 0.2; m; i=$((i+1)); done; \
    echo MemTotal: $v kB; \
    i=0; while [ $i -lt 600 ] && [ $v -lt $a ]; do sleep 0.2; m; i=$((i+1)); done; \
    echo MemTotal: $v kB";

fn cases() -> Vec<(&'static str, String)> {
    let api = "kiln api --sock /tmp/api.sock";
    let cmdline = kiln_vmm::DEFAULT_CMDLINE;
    vec![
        (
            "flood",
            // A guest counting on its console while `kiln bench api-flood`
            // hammers the API with idle, slowloris, garbage, oversized and
            // never-reading clients; then the balloon statistics interval is
            // changed through the API (and refused when turned off).
            "rm -f /tmp/f.log; \
             (timeout 400 kiln run --mem 256 --balloon 0,stats=1 --api-sock /tmp/f.sock -- \
               'i=0; while [ $i -lt 150 ]; do echo tick-$i; i=$((i+1)); sleep 0.2; done' > /tmp/f.log 2>&1; \
               echo kiln-status=$? >> /tmp/f.log) & \
             i=0; until grep -q tick-5 /tmp/f.log || [ $i -gt 600 ]; do sleep 0.5; i=$((i+1)); done; \
             n1=$(grep -c tick- /tmp/f.log); \
             echo '== flood'; kiln bench api-flood --sock /tmp/f.sock --conns 100 --secs 8 --max-probe-ms 3000; \
             echo flood-status=$?; n2=$(grep -c tick- /tmp/f.log); echo flood-counts $n1 $n2; \
             echo '== after'; kiln api --sock /tmp/f.sock GET /; \
             echo '== interval'; kiln api --sock /tmp/f.sock PATCH /balloon/statistics '{\"stats_polling_interval_s\":3}'; \
             echo interval-status=$?; \
             echo '== balloon'; kiln api --sock /tmp/f.sock GET /balloon; \
             echo '== off'; kiln api --sock /tmp/f.sock PATCH /balloon/statistics '{\"stats_polling_interval_s\":0}'; \
             echo off-status=$?; \
             echo '== stats'; kiln api --sock /tmp/f.sock GET /balloon/statistics; echo stats-status=$?; \
             echo '== end'; wait; tail -n 2 /tmp/f.log"
                .to_string(),
        ),
        (
            "serial_file",
            // kiln vmm with PUT /serial: the guest's console goes to the
            // file, not to kiln's stdout.
            format!(
                "rm -f /tmp/s.sock /tmp/s.log /tmp/serial.out; \
                 (timeout 300 kiln vmm --api-sock /tmp/s.sock > /tmp/s.log 2>&1; echo kiln-status=$? >> /tmp/s.log) & \
                 i=0; until [ -S /tmp/s.sock ] || [ $i -gt 300 ]; do sleep 0.1; i=$((i+1)); done; \
                 echo '== serial'; kiln api --sock /tmp/s.sock PUT /serial '{{\"serial_out_path\":\"/tmp/serial.out\"}}'; \
                 echo '== cpu-config'; kiln api --sock /tmp/s.sock PUT /cpu-config '{{\"msr_modifiers\":[{{\"addr\":\"0x1a0\",\"bitmap\":\"0b2\"}}]}}'; \
                 echo '== cpu-config-ok'; kiln api --sock /tmp/s.sock PUT /cpu-config '{{\"kvm_capabilities\":[\"!121\"]}}'; \
                 kiln api --sock /tmp/s.sock PUT /boot-source \
                   \"{{\\\"kernel_image_path\\\":\\\"$KILN_KERNEL\\\",\\\"initrd_path\\\":\\\"$KILN_INITRD\\\",\\\"boot_args\\\":\\\"{cmdline} -- echo serial-to-file-\\$((40+2))\\\"}}\"; \
                 echo '== start'; kiln api --sock /tmp/s.sock PUT /actions '{{\"action_type\":\"InstanceStart\"}}'; \
                 wait; echo '== stdout'; cat /tmp/s.log; echo '== file'; echo answer=$(grep -c serial-to-file-42 /tmp/serial.out) marker=$(grep -c KILN-INIT-READY /tmp/serial.out)"
            ),
        ),
        (
            "pause_resume",
            // A guest counting on its console; the host pauses it through
            // the API, checks the count stands still, resumes, and checks the
            // count goes on from where it stopped.
            "rm -f /tmp/p.log; \
             (timeout 400 kiln run --api-sock /tmp/p.sock -- \
               'i=0; while [ $i -lt 150 ]; do echo tick-$i; i=$((i+1)); sleep 0.2; done' > /tmp/p.log 2>&1; \
               echo kiln-status=$? >> /tmp/p.log) & \
             i=0; until grep -q tick-10 /tmp/p.log || [ $i -gt 600 ]; do sleep 0.5; i=$((i+1)); done; \
             kiln api --sock /tmp/p.sock PATCH /vm '{\"state\":\"Paused\"}'; echo pause-status=$?; \
             kiln api --sock /tmp/p.sock GET /; echo; \
             sleep 1; n1=$(grep -c tick- /tmp/p.log); sleep 4; n2=$(grep -c tick- /tmp/p.log); \
             kiln api --sock /tmp/p.sock PATCH /vm '{\"state\":\"Resumed\"}'; echo resume-status=$?; \
             i=0; until [ $(grep -c tick- /tmp/p.log) -ge $((n2 + 5)) ] || [ $i -gt 600 ]; do sleep 0.1; i=$((i+1)); done; n3=$(grep -c tick- /tmp/p.log); echo counts $n1 $n2 $n3; \
             kiln api --sock /tmp/p.sock PATCH /vm '{\"state\":\"Frozen\"}'; echo bad-state-status=$?; \
             wait; cat /tmp/p.log"
                .to_string(),
        ),
        (
            "balloon_oom",
            // 300 of 384 MiB in the balloon leaves ~50 MiB free; writing
            // 150 MiB to tmpfs only succeeds if the guest takes pages back
            // from the balloon (deflate on OOM). The API shows the balloon
            // shrank.
            "rm -f /tmp/oom.log; \
             (timeout 400 kiln run --mem 384 --balloon 300,deflate_on_oom,stats=1 --api-sock /tmp/oom.sock -- \
               'head -c 157286400 /dev/zero > /tmp/fill && echo fill-ok; sleep 10; echo done' > /tmp/oom.log 2>&1; \
               echo kiln-status=$? >> /tmp/oom.log) & \
             i=0; until grep -q fill-ok /tmp/oom.log || [ $i -gt 600 ]; do sleep 0.5; i=$((i+1)); done; \
             kiln api --sock /tmp/oom.sock GET /balloon/statistics; echo; wait; cat /tmp/oom.log"
                .to_string(),
        ),
        (
        "api_balloon",
        // kiln runs in the background; the host waits for the guest's first
        // line, inflates by 128 MiB, waits for the device to report it, reads
        // the statistics, sends a bad request, deflates, and waits for kiln.
        format!(
            "rm -f /tmp/api.log; \
             (timeout 400 kiln run --mem 512 --balloon 0,stats=1 --api-sock /tmp/api.sock -- '{GUEST}' \
               > /tmp/api.log 2>&1; echo kiln-status=$? >> /tmp/api.log) & \
             i=0; until grep -q MemTotal: /tmp/api.log || [ $i -gt 600 ]; do sleep 0.5; i=$((i+1)); done; \
             echo '== GET /'; {api} GET /; \
             echo '== GET /balloon'; {api} GET /balloon; \
             echo '== inflate'; {api} PATCH /balloon '{{\"amount_mib\":128}}'; echo inflate-status=$?; \
             i=0; until {api} GET /balloon/statistics | grep -q '\"actual_mib\":128' || [ $i -gt 300 ]; do sleep 0.5; i=$((i+1)); done; \
             sleep 2; echo '== stats'; {api} GET /balloon/statistics; echo stats-status=$?; \
             echo '== bad'; {api} PATCH /balloon '{{\"amount_mib\":\"x\"}}'; echo bad-status=$?; \
             echo '== deflate'; {api} PATCH /balloon '{{\"amount_mib\":0}}'; echo deflate-status=$?; \
             wait; echo '== guest'; cat /tmp/api.log; \
             test -e /tmp/api.sock && echo socket-left-behind; true"
        ),
        ),
    ]
}

static BATCH: Batch = Batch::new(cases, Duration::from_secs(900));

#[test]
fn api_inflates_and_deflates_the_balloon() {
    let out = BATCH.get("api_balloon");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    assert!(o.contains("kiln-status=0"), "{o}");
    assert!(!o.contains("socket-left-behind"), "{o}");

    let root = section(&o, "GET /");
    assert!(root.starts_with("HTTP/1.1 200 OK\n"), "{root}");
    assert!(root.contains(r#""state":"Running""#), "{root}");
    assert!(root.contains(r#""app_name":"kiln""#), "{root}");
    let b = section(&o, "GET /balloon");
    assert!(
        b.contains(
            r#"{"amount_mib":0,"deflate_on_oom":false,"stats_polling_interval_s":1,"free_page_hinting":false,"free_page_reporting":false}"#
        ),
        "{b}"
    );
    assert!(
        section(&o, "inflate").contains("HTTP/1.1 204 No Content\ninflate-status=0"),
        "{o}"
    );
    let stats = section(&o, "stats");
    assert!(stats.contains("stats-status=0"), "{stats}");
    for field in [
        r#""target_mib":128"#,
        r#""actual_mib":128"#,
        r#""target_pages":32768"#,
        r#""free_memory":"#,
        r#""total_memory":"#,
        r#""available_memory":"#,
    ] {
        assert!(stats.contains(field), "{field}: {stats}");
    }
    let bad = section(&o, "bad");
    assert!(bad.starts_with("HTTP/1.1 400 Bad Request\n"), "{bad}");
    assert!(
        bad.contains(r#"{"fault_message":"Invalid request body: invalid type"#),
        "{bad}"
    );
    assert!(bad.contains("bad-status=1"), "{bad}");
    assert!(section(&o, "deflate").contains("deflate-status=0"), "{o}");

    let totals: Vec<u64> = o
        .lines()
        .filter_map(|l| l.strip_prefix("MemTotal:"))
        .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap())
        .collect();
    assert_eq!(totals.len(), 3, "{o}");
    let drop_kib = totals[0].saturating_sub(totals[1]);
    // 128 MiB = 131072 kB.
    assert!(
        (120_000..=140_000).contains(&drop_kib),
        "MemTotal went from {} to {} kB after inflating: {o}",
        totals[0],
        totals[1]
    );
    assert!(
        totals[2] + 8_000 >= totals[0] && totals[2] > totals[1],
        "MemTotal {totals:?}: not back after deflating: {o}"
    );
}

#[test]
fn balloon_deflates_on_guest_oom() {
    let out = BATCH.get("balloon_oom");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    assert!(
        o.contains("fill-ok"),
        "the guest could not use memory held by the balloon: {o}"
    );
    assert!(o.contains("kiln-status=0"), "{o}");
    let actual: u64 = o
        .split("\"actual_mib\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no actual_mib in: {o}"));
    assert!(
        actual < 300,
        "balloon still at {actual} MiB after the guest ran out of memory: {o}"
    );
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    let out = BATCH.get("pause_resume");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    assert!(o.contains("pause-status=0"), "{o}");
    assert!(o.contains("resume-status=0"), "{o}");
    assert!(
        o.contains("\"state\":\"Paused\""),
        "GET / while paused: {o}"
    );
    assert!(
        o.contains("bad-state-status=1") && o.contains("fault_message"),
        "{o}"
    );
    let counts: Vec<u64> = o
        .lines()
        .find_map(|l| l.strip_prefix("counts "))
        .unwrap_or_else(|| panic!("no counts: {o}"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    let (n1, n2, n3) = (counts[0], counts[1], counts[2]);
    assert!(
        n2 <= n1 + 1,
        "the guest kept counting while paused ({n1} -> {n2}): {o}"
    );
    assert!(
        n3 >= n2 + 5,
        "the guest did not continue after resume ({n2} -> {n3}): {o}"
    );
    // The count continues without a gap or a restart.
    let ticks: Vec<u64> = o
        .lines()
        .filter_map(|l| l.strip_prefix("tick-"))
        .map(|v| v.trim().parse().unwrap())
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "count broke: {ticks:?}"
    );
    assert!(o.contains("kiln-status=0"), "{o}");
}

#[test]
fn flooded_api_keeps_answering_while_the_guest_runs() {
    let out = BATCH.get("flood");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    let flood = section(&o, "flood");
    assert!(flood.contains("api-flood: PASS"), "{flood}");
    assert!(flood.contains("flood-status=0"), "{flood}");
    assert!(
        flood.contains("bad requests answered 400: 40/40"),
        "{flood}"
    );
    let counts: Vec<u64> = o
        .lines()
        .find_map(|l| l.strip_prefix("flood-counts "))
        .unwrap_or_else(|| panic!("no counts: {o}"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    // 8 s of flood at 5 ticks/s: the console kept advancing.
    assert!(
        counts[1] >= counts[0] + 10,
        "the guest stalled during the flood: {counts:?}: {o}"
    );
    assert!(section(&o, "after").contains(r#""state":"Running""#), "{o}");
    assert!(
        section(&o, "interval").contains("HTTP/1.1 204 No Content\ninterval-status=0"),
        "{o}"
    );
    assert!(
        section(&o, "balloon").contains(r#""stats_polling_interval_s":3"#),
        "{o}"
    );
    let off = section(&o, "off");
    assert!(off.starts_with("HTTP/1.1 400 "), "{off}");
    assert!(
        off.contains("cannot be enabled or disabled after boot"),
        "{off}"
    );
    assert!(off.contains("off-status=1"), "{off}");
    assert!(section(&o, "stats").contains("stats-status=0"), "{o}");
    assert!(section(&o, "end").contains("kiln-status=0"), "{o}");
}

#[test]
fn serial_output_goes_to_the_configured_file() {
    let out = BATCH.get("serial_file");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    assert!(section(&o, "serial").starts_with("HTTP/1.1 204 "), "{o}");
    let cpu = section(&o, "cpu-config");
    assert!(cpu.starts_with("HTTP/1.1 400 "), "{cpu}");
    assert!(cpu.contains("Invalid bitmap"), "{cpu}");
    assert!(
        section(&o, "cpu-config-ok").starts_with("HTTP/1.1 204 "),
        "{o}"
    );
    assert!(section(&o, "start").starts_with("HTTP/1.1 204 "), "{o}");
    let stdout = section(&o, "stdout");
    assert!(stdout.contains("kiln-status=0"), "{stdout}");
    assert!(
        !stdout.contains("serial-to-file-42") && !stdout.contains("KILN-INIT-READY"),
        "console output on stdout: {stdout}"
    );
    // Both the init marker and the command's output are in the file.
    let file = section(&o, "file");
    assert!(
        !file.contains("answer=0") && !file.contains("marker=0") && file.contains("answer="),
        "{o}"
    );
}
