//! The microVM metadata service with the stock kernel (lab, or natively on
//! a KVM host): a `kiln vmm` booted from a config file with `mmds-config`
//! (V2) and `--metadata`; the guest, through its virtio-net interface on a
//! real TAP, reaches 169.254.169.254 with busybox `nc` and `wget`: gets a
//! session token, reads keys in the IMDS and JSON forms, is refused without
//! a valid token, gets 404 for a missing path, and sees the host's `PATCH
//! /mmds` made while it runs. Host side: the document, the merge patch and
//! the post-boot refusal of `PUT /mmds/config`. Also native: `--metadata`
//! errors.

mod common;

use std::time::Duration;

use common::{kiln_here, section, temp_file, Batch};

/// The guest's script, read from a raw disk (`sh /dev/vda`): the padding
/// after it is newlines, and it ends by powering off.
const GUEST: &str = r#"ip addr add 172.31.5.2/24 dev eth0; ip link set eth0 up
ip route add 169.254.169.254 dev eth0
M=169.254.169.254
raw() { printf "$1 $2 HTTP/1.1\r\n$3Connection: close\r\n\r\n" | nc -w 20 $M 80; }
show() { raw "$@" | tr -d '\r'; echo; }
echo '== token'
T=$(raw PUT /latest/api/token 'X-metadata-token-ttl-seconds: 60\r\n' | tail -n 1)
echo "token-length=${#T}"
H="X-metadata-token: $T\r\n"
echo '== imds'; show GET /latest/meta-data/ "$H"
echo '== json'; show GET /latest/meta-data/tags "${H}Accept: application/json\r\n"
echo '== notoken'; show GET /latest/meta-data/instance-id ''
echo '== badtoken'; show GET /latest/meta-data/instance-id 'X-metadata-token: forged\r\n'
echo '== missing'; show GET /latest/nothing "$H"
echo '== wget'; wget -q -O- --header "X-metadata-token: $T" http://$M/latest/meta-data/instance-id; echo
echo '== waiting-for-patch'
i=0; until raw GET /late "$H" | grep -q patched || [ $i -gt 150 ]; do sleep 0.2; i=$((i+1)); done
echo '== late'; show GET /late "$H"
# The host is done with its API checks when it puts /done.
i=0; until raw GET /done "$H" | grep -q yes || [ $i -gt 150 ]; do sleep 0.2; i=$((i+1)); done
echo '== end'
"#;

fn cases() -> Vec<(&'static str, String)> {
    let cmdline = kiln_vmm::DEFAULT_CMDLINE;
    let api = "kiln api --sock /tmp/mg.sock";
    vec![(
        "v2",
        format!(
            r#"IP=/usr/local/bin/ip; [ -x $IP ] || IP=ip; $IP tuntap add dev km0 mode tap && $IP link set km0 up
cat > /tmp/mg.sh <<'EOS'
{GUEST}
EOS
sz=$(wc -c < /tmp/mg.sh); yes '' | head -n $(( (512 - sz % 512) % 512 )) >> /tmp/mg.sh
printf '{{"latest":{{"meta-data":{{"instance-id":"i-kiln","tags":{{"a":"b"}}}}}},"n":5}}' > /tmp/md.json
cat > /tmp/mg.json <<EOF
{{"boot-source":{{"kernel_image_path":"$KILN_KERNEL","initrd_path":"$KILN_INITRD","boot_args":"{cmdline} -- \"sh /dev/vda\""}},
 "drives":[{{"drive_id":"script","path_on_host":"/tmp/mg.sh","is_root_device":false,"is_read_only":true}}],
 "machine-config":{{"vcpu_count":1,"mem_size_mib":256}},
 "network-interfaces":[{{"iface_id":"eth0","host_dev_name":"km0"}}],
 "mmds-config":{{"version":"V2","network_interfaces":["eth0"]}}}}
EOF
rm -f /tmp/mg.sock
(timeout 300 kiln vmm --api-sock /tmp/mg.sock --config-file /tmp/mg.json --metadata /tmp/md.json > /tmp/mg.out 2>&1; echo kiln-status=$? >> /tmp/mg.out) & V=$!
i=0; until grep -q waiting-for-patch /tmp/mg.out 2>/dev/null || [ $i -gt 1200 ]; do sleep 0.2; i=$((i+1)); done
echo '== hostget'; {api} GET /mmds
echo '== config'; {api} PUT /mmds/config '{{"network_interfaces":["eth0"]}}'
echo '== patch'; {api} PATCH /mmds '{{"late":"patched","n":null}}'
echo '== hostafter'; {api} GET /mmds
{api} PATCH /mmds '{{"done":"yes"}}' > /dev/null
wait $V; echo '== guest'; cat /tmp/mg.out; $IP link del km0"#
        ),
    )]
}

/// `kiln run --mmds FILE --net TAP`: V2 on the interface, no API needed.
fn run_case() -> String {
    // Read from a disk (`sh /dev/vda`): as init arguments its words would
    // exceed the kernel's limit.
    let guest = r#"ip addr add 172.31.6.2/24 dev eth0; ip link set eth0 up; ip route add 169.254.169.254 dev eth0
T=$(printf "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 30\r\nConnection: close\r\n\r\n" | nc -w 20 169.254.169.254 80 | tail -n 1)
echo run-got=$(printf "GET /hello/from HTTP/1.1\r\nX-metadata-token: $T\r\nConnection: close\r\n\r\n" | nc -w 20 169.254.169.254 80 | tail -n 1)"#;
    format!(
        r#"IP=/usr/local/bin/ip; [ -x $IP ] || IP=ip; $IP tuntap add dev km1 mode tap && $IP link set km1 up
cat > /tmp/run.sh <<'EOS'
{guest}
EOS
sz=$(wc -c < /tmp/run.sh); yes '' | head -n $(( (512 - sz % 512) % 512 )) >> /tmp/run.sh
printf '{{"hello":{{"from":"kiln-run"}}}}' > /tmp/md-run.json
timeout 200 kiln run --mmds /tmp/md-run.json --net km1 --disk /tmp/run.sh,ro -- sh /dev/vda 2>&1 | tr -d '\r'
$IP link del km1"#
    )
}

static BATCH: Batch = Batch::new(
    || {
        let mut c = cases();
        c.push(("run", run_case()));
        c
    },
    Duration::from_secs(600),
);

#[test]
fn kiln_run_serves_a_metadata_file() {
    let out = BATCH.get("run");
    eprintln!("{}", out.output);
    assert!(out.output.contains("run-got=kiln-run"), "{}", out.output);
}

/// The body of a raw HTTP answer section (after the blank line).
fn body(answer: &str) -> &str {
    answer.split_once("\n\n").map_or("", |(_, b)| b).trim()
}

#[test]
fn a_v2_guest_reads_metadata_with_a_token_and_sees_host_patches() {
    let out = BATCH.get("v2");
    eprintln!("{}", out.output);
    let o = &out.output;
    // Host side: the --metadata document, the merge patch (null removes).
    let before = section(o, "hostget");
    assert!(before.contains(r#""instance-id":"i-kiln""#), "{before}");
    assert!(before.contains(r#""n":5"#), "{before}");
    assert!(section(o, "patch").contains("204"), "{o}");
    let after = section(o, "hostafter");
    assert!(after.contains(r#""late":"patched""#), "{after}");
    assert!(!after.contains(r#""n":"#), "{after}");
    assert!(
        section(o, "config").contains("not allowed after the microVM has started"),
        "{o}"
    );

    // The guest's own "== " sections follow the host's last one.
    let g = o[o.find("== guest\n").expect("guest output")..].replace('\r', "");
    let g = g.as_str();
    assert!(g.contains("kiln-status=0"), "{g}");
    let token_len = section(g, "token");
    assert!(token_len.contains("token-length=48"), "{g}");
    let imds = section(g, "imds");
    assert!(imds.starts_with("HTTP/1.1 200"), "{imds}");
    assert_eq!(body(imds), "instance-id\ntags/", "{imds}");
    let json = section(g, "json");
    assert!(json.contains("Content-Type: application/json"), "{json}");
    assert_eq!(body(json), r#"{"a":"b"}"#, "{json}");
    let no = section(g, "notoken");
    assert!(no.starts_with("HTTP/1.1 401"), "{no}");
    assert!(body(no).starts_with("No MMDS token provided."), "{no}");
    let bad = section(g, "badtoken");
    assert!(bad.starts_with("HTTP/1.1 401"), "{bad}");
    assert_eq!(body(bad), "MMDS token not valid.", "{bad}");
    let missing = section(g, "missing");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    assert_eq!(body(missing), "Resource not found: /latest/nothing.");
    assert_eq!(section(g, "wget").trim(), "i-kiln", "{g}");
    assert_eq!(body(section(g, "late")), "patched", "{g}");
}

#[test]
fn bad_metadata_files_are_refused_in_one_line() {
    let missing = kiln_here(&[
        "vmm",
        "--api-sock",
        "/tmp/kiln-mmds-none.sock",
        "--metadata",
        "/nonexistent/md.json",
    ]);
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(err.contains("--metadata /nonexistent/md.json"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let bad = temp_file("md-bad.json", b"{\"a\":");
    let out = kiln_here(&[
        "vmm",
        "--api-sock",
        "/tmp/kiln-mmds-none.sock",
        "--metadata",
        bad.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("EOF while parsing"), "{err}");
    let big = temp_file("md-big.json", format!("\"{}\"", "x".repeat(600)).as_bytes());
    let out = kiln_here(&[
        "vmm",
        "--api-sock",
        "/tmp/kiln-mmds-none.sock",
        "--mmds-size-limit",
        "100",
        "--metadata",
        big.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("doesn't fit"), "{err}");
    assert!(!std::path::Path::new("/tmp/kiln-mmds-none.sock").exists());
    // kiln run: a document needs an interface, and a readable file.
    let out = kiln_here(&["run", "--mmds", bad.to_str().unwrap(), "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("through a --net interface"), "{err}");
    let out = kiln_here(&[
        "run",
        "--mmds",
        "/nonexistent/md.json",
        "--net",
        "tap9",
        "--",
        "true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("--mmds /nonexistent/md.json"), "{err}");
}
