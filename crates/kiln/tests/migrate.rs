//! Live migration: a guest counting on its console, with a virtio-blk disk,
//! moves from a `kiln vmm` to a `kiln migrate receive` over a Unix socket,
//! from there on over TCP to a third process, and goes on counting; a
//! destination killed mid-stream leaves the source guest running; a guest
//! dirtying memory as fast as it can still moves (with a bounded final
//! round). Runs natively or in the lab (see common/mod.rs); the receiver's
//! error paths, which need no guest, run here directly.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{section, Batch, COUNTING_SH};
use kiln_snapshot::migration::{self as wire, Message};

/// The guest: a string written and synced to /dev/vda, then a loop printing
/// a counter and what the disk holds (page cache dropped, so it is read
/// again).
const COUNTING: &str = "printf kiln-durable > /dev/vda; sync; i=0; \
     while true; do i=$((i+1)); echo 3 > /proc/sys/vm/drop_caches; \
     echo count=$i blk=$(head -c 12 /dev/vda); sleep 0.2; done";

/// A guest rewriting 64 MiB of memory (a file on its RAM root) in a loop.
const DIRTYING: &str = "i=0; while true; do i=$((i+1)); \
     dd if=/dev/zero of=/dirty.bin bs=1M count=64 conv=notrunc 2>/dev/null; \
     echo count=$i; done";

/// Shell helpers shared by the cases.
fn helpers() -> String {
    let cmdline = kiln_vmm::DEFAULT_CMDLINE;
    let sh = COUNTING_SH;
    format!(
        r#"{sh}wait_line() {{ n=0; until grep -q "$2" "$1" 2>/dev/null || [ $n -gt 3000 ]; do sleep 0.1; n=$((n+1)); done; }}
alive() {{ st=$(cut -d' ' -f3 /proc/$1/stat 2>/dev/null); [ -n "$st" ] && [ "$st" != Z ]; }}
# wait_exit PID SECS: its exit status, or 99 (killed) if it outlives 5 x SECS
# (room for a loaded machine).
wait_exit() {{ n=0; while alive $1 && [ $n -lt $(($2*25)) ]; do sleep 0.2; n=$((n+1)); done; if alive $1; then kill -9 $1; wait $1; return 99; fi; wait $1; }}
logs() {{ for f in "$@"; do echo "-- $f"; grep -v 'count=[0-9]' $f | tail -15; done; }}
vm_json() {{ cat > $D/vm.json <<EOF
{{"boot-source":{{"kernel_image_path":"$KILN_KERNEL","initrd_path":"$KILN_INITRD","boot_args":"{cmdline} -- \"$1\""}},
 "machine-config":{{"vcpu_count":2,"mem_size_mib":256}},
 "drives":[{{"drive_id":"data","path_on_host":"$D/disk.img","is_root_device":false,"is_read_only":false}}]}}
EOF
}}
"#
    )
}

/// A destination's handshake answer (Hello) as a printf(1) format.
fn hello_printf() -> String {
    let mut bytes = Vec::new();
    wire::send(&mut bytes, &wire::hello()).unwrap();
    common::octal(&bytes)
}

fn cases() -> Vec<(&'static str, String)> {
    let h = helpers();
    let hello = hello_printf();
    vec![
        (
            "moves",
            format!(
                r#"{h}
D=/tmp/mig; rm -rf $D; mkdir -p $D; cd $D
dd if=/dev/zero of=disk.img bs=1M count=16 2>/dev/null
vm_json '{COUNTING}'
kiln vmm --api-sock $D/src.sock --config-file $D/vm.json > src.log 2>&1 & PS=$!
wait_counts src.log 5
kiln migrate receive --listen unix:$D/mig.sock --api-sock $D/dst.sock > dst.log 2>&1 & PD=$!
wait_line dst.log 'waiting for a migration'
echo '== send'; timeout 300 kiln migrate send --sock $D/src.sock --to unix:$D/mig.sock 2>&1; echo send-status=$?
wait_exit $PS 20; echo "src-exit=$?"
echo '== src-last'; counts src.log | tail -1
wait_counts dst.log 3
echo '== dst'; grep -E 'count=[0-9]|runs here' dst.log | head -4
echo '== dst-state'; kiln api --sock $D/dst.sock GET /
echo '== tcp'
# The lab's loopback starts down (busybox's ip lacks what iproute2 has).
IP=/usr/local/bin/ip; [ -x $IP ] || IP=ip; $IP link set lo up 2>/dev/null
kiln migrate receive --listen tcp:127.0.0.1:0 > dst2.log 2>&1 & PT=$!
wait_line dst2.log 'waiting for a migration'
EP=$(sed -n 's/.*waiting for a migration on //p' dst2.log | head -1)
echo "endpoint=$EP"
timeout 300 kiln migrate send --sock $D/dst.sock --to "$EP" --downtime-ms 300 2>&1; echo send2-status=$?
wait_exit $PD 20; echo "dst-exit=$?"
echo "dst-last=$(counts dst.log | tail -1)"
wait_counts dst2.log 3
grep 'count=[0-9]' dst2.log | head -2
kill $PT; wait_exit $PT 10
echo '== logs'; logs src.log dst.log dst2.log
echo '== end'
"#
            ),
        ),
        (
            "killed",
            format!(
                r#"{h}
D=/tmp/migk; rm -rf $D; mkdir -p $D; cd $D
dd if=/dev/zero of=disk.img bs=1M count=16 2>/dev/null
vm_json '{COUNTING}'
kiln vmm --api-sock $D/src.sock --config-file $D/vm.json > src.log 2>&1 & PS=$!
wait_counts src.log 5
kiln migrate receive --listen unix:$D/mig.sock > dst.log 2>&1 & PD=$!
wait_line dst.log 'waiting for a migration'
# Stopped, the destination takes nothing more; killed, it vanishes mid-stream.
kill -STOP $PD
kiln migrate send --sock $D/src.sock --to unix:$D/mig.sock > send.log 2>&1 & PC=$!
sleep 2; kill -KILL $PD; wait_exit $PD 5
wait_exit $PC 120; echo "send-status=$?"
echo '== send'; cat send.log
before=$(counts src.log | tail -1)
sleep 3; wait_counts src.log $((before+3))
echo '== counts'; echo "before=$before after=$(counts src.log | tail -1)"
echo '== src-log'; grep -i 'migration' src.log | head -3
echo '== alive'; kiln api --sock $D/src.sock GET /
# A fake destination (nc) answers the handshake, takes 4 MB of pages and
# hangs up in the middle of round 0.
cat > $D/fake.sh <<'EOF'
#!/bin/sh
printf '{hello}'
head -c 4000000 > /dev/null
EOF
chmod +x $D/fake.sh
IP=/usr/local/bin/ip; [ -x $IP ] || IP=ip; $IP link set lo up 2>/dev/null
nc -l -p 47555 -e $D/fake.sh & PN=$!
# Listening yet? (47555 is B9C3; state 0A is LISTEN.)
n=0; until grep -q ':B9C3 00000000:0000 0A' /proc/net/tcp || [ $n -gt 300 ]; do sleep 0.1; n=$((n+1)); done
timeout 300 kiln migrate send --sock $D/src.sock --to tcp:127.0.0.1:47555 > mid.log 2>&1; echo "mid-status=$?"
kill $PN 2>/dev/null; wait_exit $PN 5
echo '== mid'; cat mid.log
before=$(counts src.log | tail -1)
sleep 2; wait_counts src.log $((before+3))
echo "before=$before after=$(counts src.log | tail -1)"
kill $PS; wait_exit $PS 10
echo '== logs'; logs src.log dst.log
echo '== end'
"#
            ),
        ),
        (
            "dirtying",
            format!(
                r#"{h}
D=/tmp/migd; rm -rf $D; mkdir -p $D; cd $D
dd if=/dev/zero of=disk.img bs=1M count=16 2>/dev/null
vm_json '{DIRTYING}'
kiln vmm --api-sock $D/src.sock --config-file $D/vm.json > src.log 2>&1 & PS=$!
wait_counts src.log 3
kiln migrate receive --listen unix:$D/mig.sock > dst.log 2>&1 & PD=$!
wait_line dst.log 'waiting for a migration'
echo '== send'; timeout 600 kiln migrate send --sock $D/src.sock --to unix:$D/mig.sock --max-rounds 6 2>&1; echo send-status=$?
wait_exit $PS 20; echo "src-exit=$?"
echo "src-last=$(counts src.log | tail -1)"
wait_counts dst.log 2
echo '== dst'; grep 'count=[0-9]' dst.log | head -2
kill $PD; wait_exit $PD 10
kill -9 $PS 2>/dev/null
echo '== logs'; logs src.log dst.log
echo '== end'
"#
            ),
        ),
        (
            "indoubt",
            format!(
                r#"{h}
D=/tmp/migi; rm -rf $D; mkdir -p $D; cd $D
dd if=/dev/zero of=disk.img bs=1M count=16 2>/dev/null
vm_json '{COUNTING}'
kiln vmm --api-sock $D/src.sock --config-file $D/vm.json > src.log 2>&1 & PS=$!
wait_counts src.log 5
# Takes the whole migration, then hangs up instead of sending the Ack.
ackless_destination $D/mig.sock > dst.log 2>&1 & PD=$!
wait_line dst.log 'waiting for a migration'
timeout 300 kiln migrate send --sock $D/src.sock --to unix:$D/mig.sock > send.log 2>&1; echo "send-status=$?"
wait_exit $PD 10; echo "dst-status=$?"
echo '== send'; cat send.log
echo '== paused'; kiln api --sock $D/src.sock GET /
before=$(counts src.log | tail -1); sleep 2
echo "before=$before after=$(counts src.log | tail -1)"
echo '== resumed'; kiln api --sock $D/src.sock PATCH /vm '{{"state":"Resumed"}}'
before=$(counts src.log | tail -1)
sleep 2; wait_counts src.log $((before+3))
echo "before=$before after=$(counts src.log | tail -1)"
kill $PS; wait_exit $PS 10
echo '== logs'; logs src.log dst.log
echo '== end'
"#
            ),
        ),
    ]
}

fn binaries() -> Vec<std::path::PathBuf> {
    vec![common::example_bin("ackless_destination")]
}

static BATCH: Batch = Batch::with_binaries(cases, Duration::from_secs(1500), binaries);

fn counts(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.split("count=").nth(1))
        .filter_map(|r| r.split_whitespace().next())
        .filter_map(|n| n.parse().ok())
        .collect()
}

fn value(text: &str, key: &str) -> u64 {
    value_in(text, key, text)
}

/// [`value`], showing all of `whole` (the case's output, logs included)
/// when the number is missing.
fn value_in(text: &str, key: &str, whole: &str) -> u64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|n| n.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!("no number after {key:?} in:\n{text}\n--- the whole output ---\n{whole}")
        })
}

/// The number right after "after=" (0 if none; a shell's "Terminated" may
/// follow it on the next line).
fn after_value(text: &str) -> u64 {
    text.split("after=")
        .nth(1)
        .map(|a| {
            a.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// "(downtime D ms, R rounds, ...)" from `kiln migrate send`.
fn rounds(send: &str) -> u64 {
    send.split(" rounds")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no rounds in: {send}"))
}

#[test]
fn a_counting_guest_moves_and_goes_on_counting() {
    let out = BATCH.get("moves");
    let o = out.output.replace('\r', "");
    let send = section(&o, "send");
    assert!(send.contains("send-status=0"), "{o}");
    assert!(send.contains("kiln: migrated to unix:"), "{o}");
    assert!(send.contains("downtime"), "{o}");
    // The source ended cleanly, and only after the destination ran.
    assert!(send.contains("src-exit=0"), "{o}");
    let last = value_in(section(&o, "src-last"), "", &o);
    let dst = section(&o, "dst");
    assert!(dst.contains("the microVM runs here"), "{o}");
    let c = counts(dst);
    assert_eq!(c.first(), Some(&(last + 1)), "the count goes on: {o}");
    // The data synced to the disk before the move is there.
    assert!(
        dst.lines()
            .filter(|l| l.contains("count="))
            .all(|l| l.contains("blk=kiln-durable")),
        "{o}"
    );
    assert!(
        section(&o, "dst-state").contains(r#""state":"Running""#),
        "{o}"
    );
}

#[test]
fn a_migrated_guest_moves_on_over_tcp() {
    let out = BATCH.get("moves");
    let o = out.output.replace('\r', "");
    let tcp = section(&o, "tcp");
    assert!(tcp.contains("endpoint=tcp:127.0.0.1:"), "{o}");
    assert!(tcp.contains("send2-status=0"), "{o}");
    assert!(tcp.contains("dst-exit=0"), "{o}");
    let last = value(tcp, "dst-last=");
    let after: Vec<u64> = counts(
        &tcp.lines()
            .skip_while(|l| !l.starts_with("dst-last="))
            .skip(1)
            .collect::<Vec<_>>()
            .join("\n"),
    );
    assert_eq!(after.first(), Some(&(last + 1)), "{o}");
}

#[test]
fn a_destination_killed_mid_stream_leaves_the_source_running() {
    let out = BATCH.get("killed");
    let o = out.output.replace('\r', "");
    let send = section(&o, "send");
    assert!(o.contains("send-status=1"), "{o}");
    assert!(send.contains("PUT /migrate: migration to unix:"), "{o}");
    assert!(send.contains("the microVM keeps running here"), "{o}");
    assert_eq!(send.trim().lines().count(), 1, "one line: {o}");
    let c = section(&o, "counts");
    let (before, after) = (value(c, "before="), after_value(c));
    assert!(
        after >= before + 3,
        "the source guest stopped counting: {o}"
    );
    assert!(section(&o, "alive").contains(r#""state":"Running""#), "{o}");
    // The source VMM said so too.
    assert!(section(&o, "src-log").contains("keeps running here"), "{o}");
}

/// Everything sent, then the connection gone before the destination's Ack:
/// the destination may run the guest, so the source keeps it paused (never
/// running twice on the same disk) until told otherwise.
#[test]
fn a_destination_gone_before_its_ack_leaves_the_source_paused() {
    let out = BATCH.get("indoubt");
    let o = out.output.replace('\r', "");
    assert!(o.contains("send-status=1"), "{o}");
    assert!(
        o.contains("dst-status=0"),
        "the destination took it all: {o}"
    );
    let send = section(&o, "send");
    assert!(
        send.contains("everything was sent, then the migration peer disconnected"),
        "{o}"
    );
    assert!(
        send.contains("the destination may be running the microVM, so it stays paused here"),
        "{o}"
    );
    assert_eq!(send.trim().lines().count(), 1, "one line: {o}");
    let paused = section(&o, "paused");
    assert!(paused.contains(r#""state":"Paused""#), "{o}");
    assert_eq!(
        after_value(paused),
        value(paused, "before="),
        "the source guest ran on: {o}"
    );
    // Told to, it runs here again.
    let resumed = section(&o, "resumed");
    assert!(resumed.contains("HTTP/1.1 204"), "{o}");
    assert!(
        after_value(resumed) >= value(resumed, "before=") + 3,
        "the source guest did not resume: {o}"
    );
}

#[test]
fn a_destination_hanging_up_mid_round_leaves_the_source_running() {
    let out = BATCH.get("killed");
    let o = out.output.replace('\r', "");
    let mid = section(&o, "mid");
    assert!(o.contains("mid-status=1"), "{o}");
    assert!(mid.contains("PUT /migrate: migration to tcp:127.0.0.1:47555 failed: the migration peer disconnected"), "{o}");
    assert!(mid.contains("the microVM keeps running here"), "{o}");
    let before = value(mid, "before=");
    let after = after_value(mid);
    assert!(
        after >= before + 3,
        "the source guest stopped counting: {o}"
    );
}

#[test]
fn a_memory_dirtying_guest_still_moves_with_a_bounded_final_round() {
    let out = BATCH.get("dirtying");
    let o = out.output.replace('\r', "");
    let send = section(&o, "send");
    assert!(send.contains("send-status=0"), "{o}");
    assert!(rounds(send) <= 6, "{o}");
    assert!(send.contains("src-exit=0"), "{o}");
    let last = value_in(send, "src-last=", &o);
    let c = counts(section(&o, "dst"));
    assert!(
        c.first().is_some_and(|&f| f == last || f == last + 1),
        "the count goes on ({last}): {o}"
    );
}

/// A `kiln migrate receive` on a fresh Unix socket, and the socket.
fn receiver(name: &str) -> (std::process::Child, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("kiln-mig-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("m.sock");
    let mut child = Command::new(common::kiln_bin())
        .args(["migrate", "receive", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .env("KILN_LAB", "0")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("waiting for a migration on unix:"), "{line}");
    (child, sock)
}

fn finish(mut child: std::process::Child) -> (Option<i32>, String) {
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_receiver_whose_source_vanishes_starts_nothing() {
    let (child, sock) = receiver("vanish");
    let mut s = UnixStream::connect(&sock).unwrap();
    wire::send(&mut s, &wire::hello()).unwrap();
    let layout = kiln_snapshot::state::MemoryLayout {
        regions: vec![kiln_snapshot::state::MemoryRegion {
            guest_addr: 0,
            size: 128 << 20,
            file_offset: 0,
        }],
    };
    wire::send(&mut s, &Message::Layout(layout)).unwrap();
    assert!(matches!(wire::recv(&mut s).unwrap(), Message::Hello { .. }));
    wire::send_pages(&mut s, 0, &[1u8; 8192]).unwrap();
    // Half a message, then gone.
    s.write_all(&[3, 0, 16, 0]).unwrap();
    drop(s);
    let (code, err) = finish(child);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the migration peer disconnected") && err.contains("nothing was started"),
        "{err}"
    );
    assert!(!sock.exists(), "the listening socket is removed");
}

#[test]
fn a_receiver_refuses_a_foreign_peer_and_says_why() {
    let (child, sock) = receiver("foreign");
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    // The receiver answers with an Error message before it goes.
    let answer = wire::recv(&mut s);
    let (code, err) = finish(child);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("nothing was started"), "{err}");
    assert!(
        matches!(answer, Ok(Message::Error(_)) | Err(_)),
        "{answer:?}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn migrate_send_before_boot_fails_with_the_api_fault() {
    let dir = std::env::temp_dir().join(format!("kiln-mig-send-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let mut vmm = Command::new(common::kiln_bin())
        .args(["vmm", "--api-sock"])
        .arg(&sock)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = sock.to_str().unwrap();
    let out = common::kiln_here(&["migrate", "send", "--sock", s, "--to", "unix:/nonexistent"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("PUT /migrate: "), "{err}");
    assert!(err.contains("not supported before starting"), "{err}");
    let out = common::kiln_here(&["migrate", "send", "--sock", s, "--to", "udp:x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let _ = vmm.kill();
    let _ = vmm.wait();
    let _ = std::fs::remove_dir_all(&dir);
}
