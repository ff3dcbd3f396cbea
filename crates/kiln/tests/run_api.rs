//! A VM started with `kiln run --api-sock` is driven through the API like a
//! `kiln vmm` one: paused, snapshotted (the snapshot restores in a
//! `kiln vmm` with `PUT /snapshot/load`), resumed, and migrated to a
//! `kiln migrate receive` (`PUT /migrate`, through `kiln migrate send`);
//! the guest's count goes on where it stopped each time. Runs natively or
//! in the lab (see common/mod.rs).

mod common;

use std::time::Duration;

use common::{first_count, section, Batch, COUNTING_SH};

/// The guest: a string written and synced to /dev/vda, then a loop
/// printing a counter and what the disk holds (page cache dropped, so it
/// is read again). No double quotes: `kiln run` wraps the command in them.
const COUNTING: &str = "printf kiln-durable > /dev/vda; sync; i=0; \
     while true; do i=$((i+1)); echo 3 > /proc/sys/vm/drop_caches; \
     echo count=$i blk=$(head -c 12 /dev/vda); sleep 0.2; done";

fn cases() -> Vec<(&'static str, String)> {
    let sh = COUNTING_SH;
    vec![(
        "run_api",
        format!(
            r#"{sh}wait_line() {{ n=0; until grep -q "$2" "$1" 2>/dev/null || [ $n -gt 3000 ]; do sleep 0.1; n=$((n+1)); done; }}
alive() {{ st=$(cut -d' ' -f3 /proc/$1/stat 2>/dev/null); [ -n "$st" ] && [ "$st" != Z ]; }}
wait_exit() {{ n=0; while alive $1 && [ $n -lt $(($2*25)) ]; do sleep 0.2; n=$((n+1)); done; if alive $1; then kill -9 $1; wait $1; return 99; fi; wait $1; }}
logs() {{ for f in "$@"; do echo "-- $f"; grep -v 'count=[0-9]' $f | tail -15; done; }}
D=/tmp/runapi; rm -rf $D; mkdir -p $D; cd $D
dd if=/dev/zero of=disk.img bs=1M count=16 2>/dev/null
kiln run --mem 256 --disk $D/disk.img --api-sock $D/run.sock -- '{COUNTING}' > run.log 2>&1 & PR=$!
wait_counts run.log 5
echo '== pause'; kiln api --sock $D/run.sock PATCH /vm '{{"state":"Paused"}}'; echo pause-status=$?
echo '== create'; kiln api --sock $D/run.sock PUT /snapshot/create '{{"snapshot_path":"/tmp/runapi/state","mem_file_path":"/tmp/runapi/mem"}}'; echo create-status=$?
echo "paused-at=$(counts run.log | tail -1)"
echo '== config'; kiln api --sock $D/run.sock GET /vm/config
echo '== resume'; kiln api --sock $D/run.sock PATCH /vm '{{"state":"Resumed"}}'; echo resume-status=$?
before=$(counts run.log | tail -1); wait_counts run.log $((before+3))
echo "resumed-to=$(counts run.log | tail -1)"
echo '== load'
kiln vmm --api-sock $D/load.sock > load.log 2>&1 & PL=$!
wait_sock $D/load.sock
kiln api --sock $D/load.sock PUT /snapshot/load '{{"snapshot_path":"/tmp/runapi/state","mem_backend":{{"backend_type":"File","backend_path":"/tmp/runapi/mem"}},"resume_vm":true}}'; echo load-status=$?
wait_counts load.log 3
echo '== loaded'; grep 'count=[0-9]' load.log | head -3
kill $PL; wait_exit $PL 10
echo '== migrate'
kiln migrate receive --listen unix:$D/mig.sock --api-sock $D/dst.sock > dst.log 2>&1 & PD=$!
wait_line dst.log 'waiting for a migration'
timeout 300 kiln migrate send --sock $D/run.sock --to unix:$D/mig.sock 2>&1; echo send-status=$?
wait_exit $PR 20; echo "run-exit=$?"
echo "run-last=$(counts run.log | tail -1)"
wait_counts dst.log 3
echo '== dst'; grep 'count=[0-9]' dst.log | head -3
echo '== dst-state'; kiln api --sock $D/dst.sock GET /
kill $PD; wait_exit $PD 10
echo '== logs'; logs run.log load.log dst.log
echo '== end'
"#
        ),
    )]
}

static BATCH: Batch = Batch::new(cases, Duration::from_secs(900));

/// The number after `key` at the start of a line of `text`.
fn value(text: &str, key: &str, whole: &str) -> u64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|n| n.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {key:?} in:\n{whole}"))
}

#[test]
fn a_run_vm_pauses_snapshots_restores_and_migrates_through_the_api() {
    let out = BATCH.get("run_api");
    let o = out.output.replace('\r', "");
    assert_eq!(out.status, 0, "{o}");
    assert!(o.contains("== end"), "{o}");

    let pause = section(&o, "pause");
    assert!(pause.contains("HTTP/1.1 204 "), "{o}");
    assert!(pause.contains("pause-status=0"), "{o}");
    let create = section(&o, "create");
    assert!(create.contains("HTTP/1.1 204 "), "{o}");
    assert!(create.contains("create-status=0"), "{o}");
    let paused_at = value(create, "paused-at=", &o);

    // The API shows the configuration `kiln run` built from its options.
    let config = section(&o, "config");
    assert!(config.starts_with("HTTP/1.1 200 "), "{o}");
    assert!(config.contains(r#""drive_id":"disk0""#), "{o}");
    assert!(config.contains(r#""mem_size_mib":256"#), "{o}");

    let resume = section(&o, "resume");
    assert!(resume.contains("resume-status=0"), "{o}");
    assert!(
        value(resume, "resumed-to=", &o) >= paused_at + 3,
        "the guest did not go on after resume: {o}"
    );

    // Restored from the snapshot in a `kiln vmm`, the count goes on from
    // where it was when the snapshot was taken.
    let load = section(&o, "load");
    assert!(load.contains("HTTP/1.1 204 "), "{o}");
    assert!(load.contains("load-status=0"), "{o}");
    let loaded = section(&o, "loaded");
    assert_eq!(first_count(loaded), paused_at + 1, "{o}");
    assert!(loaded.contains("blk=kiln-durable"), "{o}");

    // Migrated, it goes on at the destination; the source ended cleanly.
    let migrate = section(&o, "migrate");
    assert!(migrate.contains("send-status=0"), "{o}");
    assert!(migrate.contains("kiln: migrated to unix:"), "{o}");
    assert!(migrate.contains("run-exit=0"), "{o}");
    let last = value(migrate, "run-last=", &o);
    let dst = section(&o, "dst");
    assert_eq!(first_count(dst), last + 1, "the count goes on: {o}");
    assert!(dst.contains("blk=kiln-durable"), "{o}");
    assert!(
        section(&o, "dst-state").contains(r#""state":"Running""#),
        "{o}"
    );
}
