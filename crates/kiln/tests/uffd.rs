//! The userfaultfd memory backend: a counting guest with a vsock echo
//! server is snapshotted, then restored with its memory served by
//! `kiln uffd-handler` (through `PUT /snapshot/load` and `kiln restore`,
//! recording a working set, then prefetching it) and by the in-process
//! handler thread; a missing handler and a handler killed mid-run. Runs in
//! the lab (or natively where KVM runs guests); the handler process also
//! serves this test process directly (no VM needed).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_echoed, first_count, section, Batch, COUNTING_SH};
use kiln_vmm::uffd_handler::WS_HEADER;
use kiln_vmm::MemBackend;
use vm_memory::{Bytes, GuestAddress};

fn cases() -> Vec<(&'static str, String)> {
    let cmdline = kiln_vmm::DEFAULT_CMDLINE;
    let guest = "kiln-agent vsock-echo 5000 & i=0; while true; do i=$((i+1)); \
                 echo count=$i; sleep 0.2; done";
    let sh = COUNTING_SH;
    let load = |sock: &str| {
        format!(
            r#"'{{"snapshot_path":"/tmp/uffd/state","mem_backend":{{"backend_type":"Uffd","backend_path":"{sock}"}},"resume_vm":true}}'"#
        )
    };
    let (load_missing, load_h1) = (load("/tmp/uffd/nope.sock"), load("/tmp/uffd/h1.sock"));
    vec![(
        "uffd",
        format!(
            r#"{sh}D=/tmp/uffd; rm -rf $D; mkdir -p $D; cd $D
cat > vm.json <<'EOF'
{{"boot-source":{{"kernel_image_path":"@K@","initrd_path":"@I@","boot_args":"{cmdline} -- \"{guest}\""}},
 "machine-config":{{"vcpu_count":1,"mem_size_mib":256}},
 "vsock":{{"guest_cid":3,"uds_path":"/tmp/uffd/v.sock"}}}}
EOF
sed -i "s|@K@|$KILN_KERNEL|; s|@I@|$KILN_INITRD|" vm.json
kiln vmm --api-sock $D/api.sock --config-file $D/vm.json > run1.log 2>&1 & P1=$!
wait_counts run1.log 5
sleep 1
kiln snapshot --sock $D/api.sock --snapshot $D/state --mem-file $D/mem; echo snapshot-status=$?
echo "last=$(counts run1.log | tail -1)"
kill $P1; wait $P1
echo '== api'
kiln uffd-handler --sock $D/h1.sock --mem-file $D/mem --record $D/ws > h1.log 2>&1 & H1=$!
wait_sock $D/h1.sock
kiln vmm --api-sock $D/api2.sock > run2.log 2>&1 & P2=$!
wait_sock $D/api2.sock
kiln api --sock $D/api2.sock PUT /snapshot/load {load_missing}
kiln api --sock $D/api2.sock PUT /snapshot/load {load_h1}
wait_counts run2.log 3
echo '== vsock'; $KILN_AGENT uds-send $D/v.sock 5000 65536
kill $P2; wait $P2
wait $H1; echo handler-status=$?
echo '== run2'; grep 'count=[0-9]' run2.log | head -3
echo '== h1'; cat h1.log
echo '== ws'; head -1 ws; echo lines=$(wc -l < ws)
echo distinct=$(tail -n +2 ws | sort -u | wc -l); echo max=$(tail -n +2 ws | sort -n | tail -1)
echo '== prefetch'
kiln uffd-handler --sock $D/h2.sock --mem-file $D/mem --prefetch $D/ws > h2.log 2>&1 & H2=$!
wait_sock $D/h2.sock
kiln restore --snapshot state --uffd-sock $D/h2.sock > run3.log 2>&1 & P3=$!
wait_counts run3.log 3
kill $P3; wait $P3
wait $H2; echo handler-status=$?
echo '== run3'; grep 'count=[0-9]' run3.log | head -3
echo '== h2'; cat h2.log
echo '== thread'
kiln restore --snapshot state --mem-file mem --uffd --record ws2 > run4.log 2>&1 & P4=$!
wait_counts run4.log 3
kill $P4; wait $P4
echo '== run4'; grep 'count=[0-9]' run4.log | head -3; echo ws2-lines=$(wc -l < ws2)
echo '== missing'
kiln restore --snapshot state --uffd-sock $D/nope.sock; echo status=$?
echo '== killed'
kiln uffd-handler --sock $D/h3.sock --mem-file $D/mem > h3.log 2>&1 & H3=$!
wait_sock $D/h3.sock
kiln restore --snapshot state --uffd-sock $D/h3.sock > run5.log 2>&1 & P5=$!
wait_counts run5.log 2
kill -9 $H3
n=0; while kill -0 $P5 2>/dev/null && [ $n -lt 150 ]; do sleep 0.1; n=$((n+1)); done
kill -0 $P5 2>/dev/null && {{ echo still-running; kill -9 $P5; }}
wait $P5; echo status=$?
grep -v count= run5.log | tail -3
echo '== end'
"#
        ),
    )]
}

static BATCH: Batch = Batch::new(cases, Duration::from_secs(1500));

/// The number after `key=` in `text`.
fn value(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in: {text}"))
}

fn output() -> String {
    BATCH.get("uffd").output.replace('\r', "")
}

#[test]
fn uffd_restores_continue_the_count() {
    let o = output();
    assert!(o.contains("snapshot-status=0"), "{o}");
    let last = value(&o, "last");
    let api = section(&o, "api");
    // A missing handler: a clear 400, nothing started; then the real one.
    let missing = api.find("HTTP/1.1 400").unwrap_or_else(|| panic!("{o}"));
    let loaded = api.find("HTTP/1.1 204").unwrap_or_else(|| panic!("{o}"));
    assert!(missing < loaded, "{o}");
    assert!(api.contains("nope.sock: No such file or directory"), "{o}");
    for run in ["run2", "run3", "run4"] {
        assert_eq!(first_count(section(&o, run)), last + 1, "{run}: {o}");
    }
    // The guest answers over vsock with its memory served by the handler.
    let vsock = section(&o, "vsock");
    assert_echoed(vsock, 65536, &o);
    // The handler served faults and ended when its VMM went.
    let h1 = section(&o, "h1");
    assert!(h1.contains("faults served"), "{o}");
    assert!(section(&o, "prefetch").contains("handler-status=0"), "{o}");
}

#[test]
fn a_recorded_working_set_is_sane_and_prefetches() {
    let o = output();
    let ws = section(&o, "ws");
    assert!(ws.starts_with(WS_HEADER), "{o}");
    let lines = value(ws, "lines");
    let distinct = value(ws, "distinct");
    // Some pages (a guest resuming touches hundreds), each once, all
    // within the 256 MiB memory file.
    assert!(lines > 50, "{o}");
    assert_eq!(distinct, lines - 1, "{o}");
    assert!(value(ws, "max") < 65536, "{o}");
    // "N faults served; ... P pages prefetched in T ms"
    let h2 = section(&o, "h2");
    let prefetched: u64 = h2
        .split("; ")
        .find(|p| p.contains("pages prefetched"))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no prefetch report: {o}"));
    assert!(prefetched > 0 && prefetched < lines, "{o}");
    // The in-process handler records too.
    assert!(value(section(&o, "run4"), "ws2-lines") > 50, "{o}");
}

#[test]
fn a_missing_handler_starts_nothing() {
    let o = output();
    let m = section(&o, "missing");
    assert!(m.contains("status=1"), "{o}");
    let errs: Vec<&str> = m.lines().filter(|l| l.starts_with("kiln:")).collect();
    assert_eq!(errs.len(), 1, "{o}");
    assert!(
        errs[0].contains("nope.sock: No such file or directory"),
        "{o}"
    );
}

#[test]
fn a_killed_handler_stops_the_vmm_with_a_message() {
    let o = output();
    let k = section(&o, "killed");
    assert!(!k.contains("still-running"), "the VMM hung: {o}");
    assert!(k.contains("status=1"), "{o}");
    assert!(
        k.contains("exited: the guest's memory can no longer be served"),
        "{o}"
    );
}

fn wait_for(p: &Path) {
    let t = Instant::now();
    while !p.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `kiln uffd-handler` serves memory this test process registers and hands
/// over exactly as the VMM does (no VM needed), and records what it served.
#[test]
fn the_handler_process_serves_another_process() {
    let dir = std::env::temp_dir().join(format!("kiln-uffd-proc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src =
        kiln_vmm::kiln_devices::GuestMem::from_ranges(&[(GuestAddress(0), 256 << 10)]).unwrap();
    src.write_slice(b"served", GuestAddress(3 << 12)).unwrap();
    let file = dir.join("mem");
    let (layout, _) = kiln_vmm::memory_file::save_full(&src, &file).unwrap();
    let sock = dir.join("h.sock");
    let ws = dir.join("ws");
    let mut handler = Command::new(common::kiln_bin())
        .arg("uffd-handler")
        .arg("--sock")
        .arg(&sock)
        .arg("--mem-file")
        .arg(&file)
        .arg("--record")
        .arg(&ws)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&sock);
    let (mem, link) = kiln_vmm::uffd::guest_memory(&MemBackend::Uffd(sock.clone()), &layout)
        .unwrap_or_else(|e| {
            let _ = handler.kill();
            panic!("{e}")
        });
    let mut buf = [0u8; 6];
    mem.read_slice(&mut buf, GuestAddress(3 << 12)).unwrap();
    assert_eq!(&buf, b"served");
    mem.read_slice(&mut buf, GuestAddress(9 << 12)).unwrap();
    assert_eq!(buf, [0; 6]);
    assert!(!sock.exists(), "the socket is removed once a VMM connected");
    drop(link);
    let out = handler.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("2 faults served; 1 pages copied, 1 zero pages"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&ws).unwrap(),
        format!("{WS_HEADER}\n3\n9\n")
    );
    drop(mem);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn handler_arguments_are_checked_before_listening() {
    let dir = std::env::temp_dir().join(format!("kiln-uffd-args-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("h.sock");
    let not_ws = common::temp_file("not-ws", b"12\n13\n");
    let mem = common::temp_file("uffd-mem", &[0u8; 4096]);
    for (args, expect) in [
        (
            vec!["--mem-file", "/nonexistent/mem"],
            "memory file /nonexistent/mem",
        ),
        (
            vec![
                "--mem-file",
                mem.to_str().unwrap(),
                "--prefetch",
                not_ws.to_str().unwrap(),
            ],
            "not a Kiln working-set file",
        ),
    ] {
        let mut all = vec!["uffd-handler", "--sock", sock.to_str().unwrap()];
        all.extend(args);
        let out = common::kiln_here(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(expect), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!sock.exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
