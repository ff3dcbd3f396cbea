//! Snapshots: a guest counting on its console, with two virtio-blk disks
//! (sync and io_uring engines), a balloon and a vsock listener, is paused,
//! snapshotted, killed, and restored in new processes (`kiln restore`,
//! `PUT /snapshot/load`, ten clones at once); diff snapshots on top of a
//! full one, rebased and restored.
//! Runs natively or in the lab (see common/mod.rs); the error paths that
//! need no guest run here directly.

mod common;

use std::time::Duration;

use common::{assert_echoed, first_count, section, Batch, COUNTING_SH};

/// The guest: an echo server on vsock port 5000 in the background, a
/// string written and synced to /dev/vda (sync engine) and one to /dev/vdb
/// (io_uring engine), a background loop keeping /dev/vdb busy (writes,
/// flushes, uncached reads: requests are in flight when the snapshot is
/// taken) and printing io=N per round, then a loop printing a counter and
/// what the disks hold (page cache dropped, so they are read again).
fn guest_command() -> &'static str {
    "kiln-agent vsock-echo 5000 & printf kiln-durable > /dev/vda; \
     printf uring-durable > /dev/vdb; sync; \
     (j=0; while true; do j=$((j+1)); \
     dd if=/dev/zero of=/dev/vdb bs=64k seek=16 count=16 conv=fsync 2>/dev/null; \
     dd if=/dev/vdb of=/dev/null bs=64k skip=32 count=64 2>/dev/null; echo io=$j; done) & \
     i=0; while true; do i=$((i+1)); echo 3 > /proc/sys/vm/drop_caches; \
     echo count=$i blk=$(head -c 12 /dev/vda) ur=$(head -c 13 /dev/vdb); sleep 0.2; done"
}

/// The diff guest: ext4 on /dev/vda; for 12 rounds it writes and syncs a
/// file, drops the page cache and reads the file back, then only reads it
/// from the page cache. From round 12 on it also prints the checksum of the
/// random raw disk /dev/vdb, read once (round 12, after the full snapshot)
/// into page-cache pages that only the device writes (`init_on_alloc=0`:
/// the kernel does not zero them first), then from the cache. A diff
/// snapshot that missed the device's writes restores stale pages there.
fn diff_guest_command() -> &'static str {
    "mkdir -p /m; mount -t ext4 /dev/vda /m || echo mount-failed; i=0; while true; do \
     i=$((i+1)); if [ $i -le 12 ]; then echo v$i > /m/f; sync; \
     echo 3 > /proc/sys/vm/drop_caches; fi; [ $i -ge 12 ] && s=$(md5sum < /dev/vdb | cut -c1-32); \
     echo count=$i file=$(cat /m/f) sum=$s; sleep 0.2; done"
}

fn cases() -> Vec<(&'static str, String)> {
    let cmdline = kiln_vmm::DEFAULT_CMDLINE;
    let guest = guest_command();
    let dguest = diff_guest_command();
    let api = "kiln api --sock";
    let sh = COUNTING_SH;
    vec![
        (
            "snapshot",
            format!(
                r#"{sh}D=/tmp/snap; rm -rf $D; mkdir -p $D; cd $D
dd if=/dev/zero of=disk.img bs=1M count=16 2>/dev/null
dd if=/dev/zero of=uring.img bs=1M count=16 2>/dev/null
cat > vm.json <<'EOF'
{{"boot-source":{{"kernel_image_path":"@K@","initrd_path":"@I@","boot_args":"{cmdline} -- \"{guest}\""}},
 "machine-config":{{"vcpu_count":2,"mem_size_mib":256}},
 "drives":[{{"drive_id":"data","path_on_host":"/tmp/snap/disk.img","is_root_device":false,"is_read_only":false}},
  {{"drive_id":"uring","path_on_host":"/tmp/snap/uring.img","is_root_device":false,"is_read_only":false,"io_engine":"Async"}}],
 "balloon":{{"amount_mib":0,"deflate_on_oom":false,"stats_polling_interval_s":1}},
 "vsock":{{"guest_cid":3,"uds_path":"/tmp/snap/v.sock"}}}}
EOF
sed -i "s|@K@|$KILN_KERNEL|; s|@I@|$KILN_INITRD|" vm.json
kiln vmm --api-sock $D/api.sock --config-file $D/vm.json > run1.log 2>&1 & P1=$!
wait_counts run1.log 10
echo '== balloon-set'; {api} $D/api.sock PATCH /balloon '{{"amount_mib":20}}'
echo '== pause'; kiln pause --sock $D/api.sock; echo pause-status=$?
echo '== create'; {api} $D/api.sock PUT /snapshot/create '{{"snapshot_path":"/tmp/snap/state","mem_file_path":"/tmp/snap/mem"}}'
echo '== last'; counts run1.log | tail -1
sleep 1
echo '== still'; counts run1.log | tail -1
echo '== diff'; {api} $D/api.sock PUT /snapshot/create '{{"snapshot_path":"/tmp/snap/s2","mem_file_path":"/tmp/snap/m2","snapshot_type":"Diff"}}'
echo; ls s2 m2 2>&1 | grep -c 'No such file'
echo '== sizes'; wc -c < mem; du -k mem | cut -f1
kill $P1; wait $P1
echo '== restore'
kiln restore --snapshot state --mem-file mem > run2.log 2>&1 & P2=$!
wait_counts run2.log 3
echo '== vsock'; $KILN_AGENT uds-send $D/v.sock 5000 1048576
n=0; while ! grep -q '^io=' run2.log && [ $n -lt 300 ]; do sleep 0.2; n=$((n+1)); done
kill $P2; wait $P2
echo '== run2'; grep 'count=[0-9]' run2.log | head -3; grep '^io=' run2.log | head -1; grep -i error run2.log | head -3
echo '== load'
kiln vmm --api-sock $D/api2.sock > run3.log 2>&1 & P3=$!
n=0; until [ -S $D/api2.sock ] || [ $n -gt 100 ]; do sleep 0.1; n=$((n+1)); done
{api} $D/api2.sock PUT /snapshot/load '{{"snapshot_path":"/tmp/snap/state","mem_backend":{{"backend_type":"File","backend_path":"/tmp/snap/mem"}},"resume_vm":true}}'
wait_counts run3.log 3
echo '== state'; {api} $D/api2.sock GET /
echo '== balloon'; {api} $D/api2.sock GET /balloon
echo '== again'; {api} $D/api2.sock PUT /snapshot/load '{{"snapshot_path":"/tmp/snap/state","mem_file_path":"/tmp/snap/mem"}}'
kill $P3; wait $P3
echo '== run3'; grep 'count=[0-9]' run3.log | head -3
echo '== corrupt'
cp state bad; printf 'X' | dd of=bad bs=1 seek=100 conv=notrunc 2>/dev/null
kiln restore --snapshot bad --mem-file mem; echo status=$?
echo '== short-mem'
head -c 4096 mem > short; kiln restore --snapshot state --mem-file short; echo status=$?
echo '== end'
"#
            ),
        ),
        (
            "diff",
            format!(
                r#"{sh}D=/tmp/diff; rm -rf $D; mkdir -p $D; cd $D
cp $KILN_ROOTFS disk.ext4
dd if=/dev/urandom of=rnd.img bs=1M count=1 2>/dev/null
cat > vm.json <<'EOF'
{{"boot-source":{{"kernel_image_path":"@K@","initrd_path":"@I@","boot_args":"{cmdline} init_on_alloc=0 -- \"{dguest}\""}},
 "machine-config":{{"vcpu_count":1,"mem_size_mib":256,"track_dirty_pages":true}},
 "drives":[{{"drive_id":"data","path_on_host":"/tmp/diff/disk.ext4","is_root_device":false,"is_read_only":false}},
  {{"drive_id":"rnd","path_on_host":"/tmp/diff/rnd.img","is_root_device":false,"is_read_only":true}}]}}
EOF
sed -i "s|@K@|$KILN_KERNEL|; s|@I@|$KILN_INITRD|" vm.json
kiln vmm --api-sock $D/api.sock --config-file $D/vm.json > run1.log 2>&1 & P1=$!
wait_counts run1.log 5
echo '== full'
echo "host_sum=$(md5sum < rnd.img | cut -c1-32)"
kiln snapshot --sock $D/api.sock --snapshot $D/full.state --mem-file $D/full.mem; echo status=$?
echo "at=$(counts run1.log | tail -1)"
kiln resume --sock $D/api.sock
wait_counts run1.log 16
echo '== diff1'
kiln snapshot --sock $D/api.sock --type diff --snapshot $D/d1.state --mem-file $D/d1.mem; echo status=$?
echo "last=$(counts run1.log | tail -1)"
echo "full_kib=$(du -k full.mem | cut -f1) diff_kib=$(du -k d1.mem | cut -f1) diff_len=$(wc -c < d1.mem)"
kill $P1; wait $P1
grep -E 'count=1[0-4] ' run1.log
cp full.mem base.mem
echo '== rebase1'; kiln snapshot-rebase --base-mem base.mem --diff-mem d1.mem; echo status=$?
kiln vmm --api-sock $D/api2.sock > run2.log 2>&1 & P2=$!
n=0; until [ -S $D/api2.sock ] || [ $n -gt 100 ]; do sleep 0.1; n=$((n+1)); done
echo '== load'
{api} $D/api2.sock PUT /snapshot/load '{{"snapshot_path":"/tmp/diff/d1.state","mem_backend":{{"backend_type":"File","backend_path":"/tmp/diff/base.mem"}},"track_dirty_pages":true,"resume_vm":true}}'
wait_counts run2.log 4
echo '== diff2'
kiln snapshot --sock $D/api2.sock --type diff --snapshot $D/d2.state --mem-file $D/d2.mem; echo status=$?
echo "last=$(counts run2.log | tail -1)"
kill $P2; wait $P2
echo '== run2'; grep -E 'count=[0-9]|mount-failed' run2.log | head -2; grep -i error run2.log | head -3
echo '== rebase2'; kiln snapshot-rebase --base-mem base.mem --diff-mem d2.mem; echo status=$?
kiln restore --snapshot d2.state --mem-file base.mem > run3.log 2>&1 & P3=$!
wait_counts run3.log 3
kill $P3; wait $P3
echo '== run3'; grep 'count=[0-9]' run3.log | head -2; grep -i error run3.log | head -3
echo '== end'
"#
            ),
        ),
        (
            "clones",
            format!(
                r#"{sh}D=/tmp/clones; rm -rf $D; mkdir -p $D; cd $D
echo '== clones'
# Clones come from a light one-vCPU guest that only counts (ten of them at
# once, each faulting in its file-backed memory copy-on-write).
cat > light.json <<'EOF'
{{"boot-source":{{"kernel_image_path":"@K@","initrd_path":"@I@","boot_args":"{cmdline} -- \"i=0; while true; do i=$((i+1)); echo count=$i; sleep 0.2; done\""}},
 "machine-config":{{"vcpu_count":1,"mem_size_mib":256}}}}
EOF
sed -i "s|@K@|$KILN_KERNEL|; s|@I@|$KILN_INITRD|" light.json
kiln vmm --api-sock $D/light.sock --config-file $D/light.json > light.log 2>&1 & PL=$!
wait_counts light.log 5
kiln snapshot --sock $D/light.sock --snapshot $D/lstate --mem-file $D/lmem; echo snapshot-status=$?
echo "light-last=$(counts light.log | tail -1)"
kill $PL; wait $PL
before=$(awk '/MemAvailable/ {{print $2}}' /proc/meminfo)
PIDS=""
for i in 0 1 2 3 4 5 6 7 8 9; do
  kiln --log-level info restore --snapshot lstate --mem-file lmem > c$i.log 2>&1 & PIDS="$PIDS $!"; echo $! > c$i.pid
  wait_counts c$i.log 1
done
for i in 0 1 2 3 4 5 6 7 8 9; do wait_counts c$i.log 2; done
after=$(awk '/MemAvailable/ {{print $2}}' /proc/meminfo)
running=0; for i in 0 1 2 3 4 5 6 7 8 9; do grep -q 'count=[0-9]' c$i.log && running=$((running+1)); done
echo "running=$running"
echo "grew_kib=$((before-after))"
for i in 0 1 2 3 4 5 6 7 8 9; do counts c$i.log | head -1; done | sort -u | tr '\n' ' '; echo
for i in 0 1 2 3 4 5 6 7 8 9; do
  if ! kill -0 $(cat c$i.pid) 2>/dev/null || ! grep -q 'count=[0-9]' c$i.log; then
    wait $(cat c$i.pid); echo "clone $i exited: status $?"; grep -E "count=|shutdown" c$i.log | tail -3
  fi
done
dmesg | grep -i -E 'segfault|kiln|kvm|traps|general protection' | tail -5
kill $PIDS 2>/dev/null; wait
echo '== end'
"#
            ),
        ),
    ]
}

static BATCH: Batch = Batch::new(cases, Duration::from_secs(2100));

fn numbers(s: &str) -> Vec<u64> {
    s.split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect()
}

#[test]
fn snapshot_restore_continues_the_guest() {
    let out = BATCH.get("snapshot");
    let o = out.output.replace('\r', "");
    assert!(section(&o, "pause").contains("pause-status=0"), "{o}");
    assert!(section(&o, "create").starts_with("HTTP/1.1 204"), "{o}");
    let last = numbers(section(&o, "last"));
    let still = numbers(section(&o, "still"));
    assert_eq!(last.len(), 1, "{o}");
    assert_eq!(last, still, "the guest counted while paused: {o}");
    let last = last[0];

    // Memory file: full size, sparse (zero pages are holes).
    let sizes = numbers(section(&o, "sizes"));
    assert_eq!(sizes[0], 256 << 20, "{o}");
    assert!(sizes[1] < 200 * 1024, "the memory file is not sparse: {o}");

    // Restored by `kiln restore`: the count goes on from where it stopped,
    // the synced disk data is there, vsock connects to the restored guest.
    let run2 = section(&o, "run2");
    assert_eq!(first_count(run2), last + 1, "{o}");
    assert!(run2.contains("blk=kiln-durable"), "{o}");
    // The io_uring disk: its data is intact, and the I/O that was in
    // flight when the snapshot was taken went on (a request lost or
    // answered twice would hang the loop or fail it).
    assert!(run2.contains("ur=uring-durable"), "{o}");
    assert!(run2.lines().any(|l| l.starts_with("io=")), "{o}");
    assert!(!run2.contains("I/O error"), "{o}");
    // "sent N SUM recv N SUM (...)": all bytes echoed back unchanged.
    let vsock = section(&o, "vsock");
    assert_echoed(vsock, 1048576, &o);

    // Restored through the API.
    let run3 = section(&o, "run3");
    assert_eq!(first_count(run3), last + 1, "{o}");
    assert!(section(&o, "state").contains(r#""state":"Running""#), "{o}");
    // The balloon target set after boot came back with the snapshot.
    assert!(
        section(&o, "balloon-set").starts_with("HTTP/1.1 204"),
        "{o}"
    );
    assert!(section(&o, "balloon").contains(r#""amount_mib":20"#), "{o}");
    let again = section(&o, "again");
    assert!(again.starts_with("HTTP/1.1 400"), "{o}");
    assert!(again.contains("fault_message"), "{o}");
}

#[test]
fn ten_clones_share_the_snapshot_memory() {
    let out = BATCH.get("clones");
    let o = out.output.replace('\r', "");
    let clones = section(&o, "clones");
    assert!(clones.contains("running=10"), "{o}");
    let grew: i64 = clones
        .lines()
        .find_map(|l| l.strip_prefix("grew_kib="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{o}"));
    // Ten private copies would take 10 x 256 MiB; shared pages far less.
    assert!(grew < 10 * 256 * 1024 / 4, "10 clones took {grew} KiB: {o}");
    assert!(
        clones.contains("snapshot-status=0"),
        "kiln snapshot failed: {o}"
    );
    let last: u64 = clones
        .lines()
        .find_map(|l| l.strip_prefix("light-last="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{o}"));
    let firsts = numbers(
        clones
            .lines()
            .skip_while(|l| !l.starts_with("grew_kib="))
            .nth(1)
            .unwrap_or_default(),
    );
    // Every clone keeps running (in the lab too: the lab kernel used to die
    // or a clone to triple-fault here under QEMU's emulated nested paging;
    // the lab now runs kvm-amd with npt=0, see docs/design.md).
    assert!(
        !clones.contains("exited"),
        "a clone stopped early:\n{clones}"
    );
    assert_eq!(
        firsts,
        vec![last + 1],
        "every clone continues the count: {o}"
    );
}

/// Without dirty-page tracking a diff snapshot is refused with
/// Firecracker's message, and no file is written.
#[test]
fn diff_snapshot_without_tracking_is_refused_clearly() {
    let out = BATCH.get("snapshot");
    let o = out.output.replace('\r', "");
    let diff = section(&o, "diff");
    assert!(diff.starts_with("HTTP/1.1 400"), "{o}");
    assert!(
        diff.contains("Diff snapshots are not allowed on uVMs with dirty page tracking disabled"),
        "{o}"
    );
    assert_eq!(diff.lines().last(), Some("2"), "files were written: {o}");
}

/// `name=N` in `text`.
fn field(text: &str, name: &str) -> u64 {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in: {text}"))
}

/// Full snapshot, the guest goes on (vCPU writes, file writes and synced
/// reads through virtio-blk), diff snapshot: the diff's memory file holds
/// far fewer pages; rebased onto the full one it restores a guest that
/// continues the count with its page cache intact, which tracks dirty pages
/// in turn (a second diff, rebased and restored, continues too).
#[test]
fn diff_snapshot_rebased_onto_full_restores_the_guest() {
    let out = BATCH.get("diff");
    let o = out.output.replace('\r', "");
    let full = section(&o, "full");
    assert!(full.contains("status=0"), "{o}");
    let sum = full
        .split_whitespace()
        .find_map(|w| w.strip_prefix("host_sum="))
        .unwrap_or_else(|| panic!("{o}"));
    let want = format!("file=v12 sum={sum}");
    assert!(
        o.contains(&format!("count=13 {want}")),
        "the guest misread /dev/vdb: {o}"
    );
    assert!(
        field(full, "at") < 12,
        "the full snapshot came too late: {o}"
    );

    let diff1 = section(&o, "diff1");
    assert!(diff1.contains("status=0"), "{o}");
    assert_eq!(field(diff1, "diff_len"), 256 << 20, "{o}");
    let (full_kib, diff_kib) = (field(diff1, "full_kib"), field(diff1, "diff_kib"));
    assert!(diff_kib > 0, "an empty diff: {o}");
    eprintln!("diff snapshot: {diff_kib} KiB on disk, the full one {full_kib} KiB");
    assert!(
        diff_kib * 4 < full_kib,
        "the diff ({diff_kib} KiB) is not much smaller than the full snapshot ({full_kib} KiB): {o}"
    );
    let last = field(diff1, "last");
    assert!(last >= 16, "{o}");
    assert!(section(&o, "rebase1").contains("status=0"), "{o}");
    assert!(section(&o, "load").starts_with("HTTP/1.1 204"), "{o}");

    // Restored from the diff's state and the rebased memory: the count goes
    // on, and the file read from the page cache is the last one read from
    // the disk (after the full snapshot).
    let run2 = section(&o, "run2");
    assert_eq!(first_count(run2), last + 1, "{o}");
    assert!(
        run2.lines().next().unwrap_or("").ends_with(&want),
        "stale pages after restoring the diff: {o}"
    );

    let diff2 = section(&o, "diff2");
    assert!(
        diff2.contains("status=0"),
        "the restored VM took no diff: {o}"
    );
    let last2 = field(diff2, "last");
    assert!(section(&o, "rebase2").contains("status=0"), "{o}");
    let run3 = section(&o, "run3");
    assert_eq!(first_count(run3), last2 + 1, "{o}");
    assert!(
        run3.lines().next().unwrap_or("").ends_with(&want),
        "stale pages after restoring the second diff: {o}"
    );
}

#[test]
fn bad_snapshot_files_start_nothing() {
    let out = BATCH.get("snapshot");
    let o = out.output.replace('\r', "");
    let corrupt = section(&o, "corrupt");
    assert!(corrupt.contains("corrupted (checksum mismatch)"), "{o}");
    assert!(corrupt.contains("status=1"), "{o}");
    let short = section(&o, "short-mem");
    assert!(
        short.contains("is 4096 bytes, the snapshot needs 268435456"),
        "{o}"
    );
    assert!(short.contains("status=1"), "{o}");
}

#[test]
fn missing_or_foreign_state_files_fail_with_one_line() {
    let junk = common::temp_file("junk.state", b"this is not a snapshot at all");
    let mem = common::temp_file("junk.mem", b"");
    let junk = junk.to_str().unwrap();
    let mem = mem.to_str().unwrap();
    for (state, expect) in [
        (junk, "not a Kiln snapshot file"),
        ("/nonexistent/state", "/nonexistent/state"),
    ] {
        let out = common::kiln_here(&["restore", "--snapshot", state, "--mem-file", mem]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(expect), "{err}");
        assert!(err.lines().count() <= 2, "{err}");
    }
}

#[test]
fn cli_pause_and_snapshot_before_boot_fail_with_the_api_fault() {
    let dir = std::env::temp_dir().join(format!("kiln-snap-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let mut vmm = std::process::Command::new(common::kiln_bin())
        .args(["vmm", "--api-sock"])
        .arg(&sock)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = sock.to_str().unwrap();
    let m = dir.join("m");
    let st = dir.join("s");
    for args in [
        vec!["pause", "--sock", s],
        vec![
            "snapshot",
            "--sock",
            s,
            "--snapshot",
            st.to_str().unwrap(),
            "--mem-file",
            m.to_str().unwrap(),
        ],
    ] {
        let out = common::kiln_here(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("PATCH /vm: The requested operation is not supported before starting"),
            "{args:?}: {err}"
        );
        assert!(!st.exists() && !m.exists());
    }
    let _ = vmm.kill();
    let _ = vmm.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kiln snapshot-rebase` copies a diff's written pages onto its base (holes
/// leave the base alone) and refuses a diff of another size in one line.
#[test]
fn snapshot_rebase_applies_the_written_pages_only() {
    use std::os::unix::fs::FileExt;
    let page = 4096u64;
    let base = common::temp_file("rebase.base", b"");
    let diff = common::temp_file("rebase.diff", b"");
    let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    f.set_len(16 * page).unwrap();
    f.write_all_at(&[b'b'; 4096], 2 * page).unwrap();
    f.write_all_at(&[b'b'; 4096], 5 * page).unwrap();
    let d = std::fs::OpenOptions::new().write(true).open(&diff).unwrap();
    d.set_len(16 * page).unwrap();
    d.write_all_at(&[b'd'; 4096], 5 * page).unwrap();
    d.write_all_at(&[0; 4096], 9 * page).unwrap();
    let (b, dp) = (base.to_str().unwrap(), diff.to_str().unwrap());
    let out = common::kiln_here(&["snapshot-rebase", "--base-mem", b, "--diff-mem", dp]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = std::fs::read(&base).unwrap();
    assert_eq!(got.len(), 16 * 4096);
    let at = |p: usize| got[p * 4096];
    assert_eq!((at(2), at(5), at(9), at(0)), (b'b', b'd', 0, 0));

    d.set_len(8 * page).unwrap();
    let out = common::kiln_here(&["snapshot-rebase", "--base-mem", b, "--diff-mem", dp]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("a diff applies only onto the memory file of the same VM"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(&base).unwrap(), got, "the base changed");
}
