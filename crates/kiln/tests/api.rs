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
    vec![
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
             sleep 4; n3=$(grep -c tick- /tmp/p.log); echo counts $n1 $n2 $n3; \
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
        b.contains(r#"{"amount_mib":0,"deflate_on_oom":false,"stats_polling_interval_s":1}"#),
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
