//! virtio devices with the stock kernel: disks (raw, read-only, eight at once,
//! ext4 root with data surviving a reboot) and entropy. Runs natively or in
//! the lab (see common/mod.rs).

mod common;

use std::time::Duration;

use common::{guest_lines, guest_status, Batch};

const BASE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet";

fn cases() -> Vec<(&'static str, String)> {
    let t = "timeout 300";
    vec![
        (
            "raw_read",
            // A disk whose first sector holds a known string.
            format!(
                "cd /tmp && dd if=/dev/zero of=raw.img bs=1M count=8 2>/dev/null && \
                 printf 'kiln-disk-ok' | dd of=raw.img conv=notrunc 2>/dev/null && \
                 {t} kiln run --disk /tmp/raw.img -- 'head -c 12 /dev/vda; echo; cat /sys/block/vda/size'"
            ),
        ),
        (
            "raw_write",
            format!(
                "cd /tmp && dd if=/dev/zero of=w.img bs=1M count=8 2>/dev/null && \
                 {t} kiln run --disk /tmp/w.img -- 'printf guest-wrote-this | dd of=/dev/vda bs=512 seek=3 conv=fsync 2>/dev/null' && \
                 dd if=w.img bs=512 skip=3 count=1 2>/dev/null | head -c 16; echo"
            ),
        ),
        (
            "io_uring",
            // The io_uring engine: the guest writes, reads back with O_DIRECT,
            // and the host finds the data in the file.
            format!(
                "cd /tmp && dd if=/dev/zero of=u.img bs=1M count=8 2>/dev/null && \
                 {t} kiln run --disk /tmp/u.img,engine=io_uring -- \
                 'printf uring-data | dd of=/dev/vda bs=512 seek=5 conv=fsync 2>/dev/null; dd if=/dev/vda bs=512 skip=5 count=1 iflag=direct 2>/dev/null | head -c 10; echo' && \
                 dd if=u.img bs=512 skip=5 count=1 2>/dev/null | head -c 10; echo"
            ),
        ),
        (
            "read_only",
            format!(
                "cd /tmp && dd if=/dev/zero of=ro.img bs=1M count=8 2>/dev/null && \
                 printf 'original' | dd of=ro.img conv=notrunc 2>/dev/null && before=$(md5sum < ro.img) && \
                 {t} kiln run --disk /tmp/ro.img,ro -- 'cat /sys/block/vda/ro; printf x | dd of=/dev/vda conv=fsync 2>/dev/null && echo write-ok || echo write-failed' && \
                 after=$(md5sum < ro.img) && [ \"$before\" = \"$after\" ] && echo file-unchanged"
            ),
        ),
        (
            "eight_disks",
            format!(
                "cd /tmp && args='' && for i in 0 1 2 3 4 5 6 7; do \
                   dd if=/dev/zero of=d$i.img bs=1M count=2 2>/dev/null; \
                   printf \"disk-$i\" | dd of=d$i.img conv=notrunc 2>/dev/null; args=\"$args --disk /tmp/d$i.img\"; done; \
                 {t} kiln run $args -- 'for d in a b c d e f g h; do head -c 6 /dev/vd$d; echo; done'"
            ),
        ),
        (
            "disk_rate_limit",
            // 1 MiB/s with a 1 MiB bucket: reading 4 MiB takes about 3 s.
            format!(
                "cd /tmp && dd if=/dev/zero of=rl.img bs=1M count=8 2>/dev/null && \
                 {t} kiln run --disk /tmp/rl.img,bw=1048576/1000 -- \
                 'start=$(cut -d. -f1 /proc/uptime); dd if=/dev/vda of=/dev/null bs=1M count=4 iflag=direct 2>/dev/null; end=$(cut -d. -f1 /proc/uptime); echo elapsed=$((end-start))'"
            ),
        ),
        (
            "rng",
            format!(
                "{t} kiln run --rng -- 'cat /sys/class/misc/hw_random/rng_current; head -c 4096 /dev/hwrng | wc -c; head -c 4096 /dev/hwrng | gzip -c | wc -c'"
            ),
        ),
        (
            "net",
            // A TAP on the KVM host, ping both ways, then 100 MiB of random
            // data from the host to the guest over TCP, checksums compared.
            format!(
                "IP=/usr/local/bin/ip; [ -x $IP ] || IP=ip; \\
                 head -c 104857600 /dev/urandom > /tmp/blob && echo host-md5 $(md5sum < /tmp/blob) && \\
                 $IP tuntap add dev kt0 mode tap && $IP addr add 172.30.0.1/24 dev kt0 && $IP link set kt0 up && \\
                 ({t} kiln run --mem 512 --net kt0,mac=52:54:00:12:34:56 -- \\
                   'ip addr add 172.30.0.2/24 dev eth0 && ip link set eth0 up && cat /sys/class/net/eth0/address && \\
                    ping -c 3 -W 5 172.30.0.1 >/dev/null && echo guest-ping-ok; \\
                    nc -l -p 5000 > /tmp/recv; echo guest-bytes $(wc -c < /tmp/recv); echo guest-md5 $(md5sum < /tmp/recv)' \\
                   > /tmp/net.out 2>&1; echo kiln-status=$? >> /tmp/net.out) & \\
                 i=0; until ping -c 1 -W 1 172.30.0.2 >/dev/null 2>&1 || [ $i -gt 400 ]; do sleep 0.3; i=$((i+1)); done; \\
                 ping -c 1 -W 2 172.30.0.2 >/dev/null && echo host-ping-ok; \\
                 i=0; until nc 172.30.0.2 5000 < /tmp/blob || [ $i -gt 100 ]; do sleep 0.5; i=$((i+1)); done; \\
                 wait; cat /tmp/net.out; $IP link del kt0"
            ),
        ),
        (
            "vsock_host_to_guest",
            // The host connects through the Unix socket (CONNECT 5000), the
            // guest's agent echoes 10 MiB back.
            format!(
                "rm -f /tmp/v1.sock; \
                 ({t} kiln run --mem 512 --vsock 3,/tmp/v1.sock -- kiln-agent vsock-echo 5000 > /tmp/v1.out 2>&1; echo kiln-status=$? >> /tmp/v1.out) & \
                 $KILN_AGENT uds-send /tmp/v1.sock 5000 10485760; wait; cat /tmp/v1.out"
            ),
        ),
        (
            "vsock_guest_to_host",
            // The guest connects to host port 6000, which the device bridges
            // to /tmp/v2.sock_6000, where the host's agent echoes.
            format!(
                "rm -f /tmp/v2.sock /tmp/v2.sock_6000; ($KILN_AGENT uds-echo /tmp/v2.sock_6000 > /tmp/echo.out 2>&1 &); \
                 i=0; until [ -S /tmp/v2.sock_6000 ] || [ $i -gt 100 ]; do sleep 0.1; i=$((i+1)); done; \
                 {t} kiln run --mem 512 --vsock 3,/tmp/v2.sock -- kiln-agent vsock-send 2 6000 10485760; sleep 1; cat /tmp/echo.out"
            ),
        ),
        (
            "balloon",
            // The same guest without and with a 128 MiB balloon (the guest
            // waits, bounded, until the inflation shows in MemTotal).
            format!(
                "{t} kiln run --mem 512 -- grep MemTotal /proc/meminfo > /tmp/bal0.out && cat /tmp/bal0.out && \
                 T=$(tr -d '\\r' < /tmp/bal0.out | awk '/^MemTotal:/ {{print $2}}') && \
                 {t} kiln run --mem 512 --balloon 128 -- 'm() {{ set -- $(grep MemTotal /proc/meminfo); v=$2; }}; m; i=0; while [ $i -lt 600 ] && [ $v -gt '$((T - 120000))' ]; do sleep 0.2; m; i=$((i+1)); done; grep MemTotal /proc/meminfo'"
            ),
        ),
        (
            "rootfs_persist",
            // Boot from ext4 on virtio-blk, write and sync a file, power off,
            // boot again and read it back.
            format!(
                "cp $KILN_ROOTFS /tmp/root.ext4 && \
                 {t} kiln run --disk /tmp/root.ext4 --cmdline '{BASE} root=/dev/vda' -- 'test -e /etc/kiln-rootfs-marker && echo on-rootfs; echo persisted-$((40+2)) > /data.txt; sync' && \
                 {t} kiln run --disk /tmp/root.ext4 --cmdline '{BASE} root=/dev/vda' -- 'cat /data.txt'"
            ),
        ),
    ]
}

static BATCH: Batch = Batch::new(cases, Duration::from_secs(1800));

#[test]
fn raw_disk_is_readable_and_sized() {
    let out = BATCH.get("raw_read");
    assert_eq!(out.status, 0, "{}", out.output);
    let lines = guest_lines(out);
    assert_eq!(lines, vec!["kiln-disk-ok", "16384"], "{}", out.output);
}

#[test]
fn guest_writes_reach_the_file() {
    let out = BATCH.get("raw_write");
    assert_eq!(out.status, 0, "{}", out.output);
    assert_eq!(guest_status(out), Some(0), "{}", out.output);
    assert!(out.output.contains("guest-wrote-this"), "{}", out.output);
}

#[test]
fn read_only_disk_refuses_writes() {
    let out = BATCH.get("read_only");
    assert_eq!(out.status, 0, "{}", out.output);
    let lines = guest_lines(out);
    assert_eq!(lines, vec!["1", "write-failed"], "{}", out.output);
    assert!(out.output.contains("file-unchanged"), "{}", out.output);
}

#[test]
fn eight_disks_at_once() {
    let out = BATCH.get("eight_disks");
    assert_eq!(out.status, 0, "{}", out.output);
    let want: Vec<String> = (0..8).map(|i| format!("disk-{i}")).collect();
    assert_eq!(guest_lines(out), want, "{}", out.output);
}

#[test]
fn hwrng_gives_random_bytes() {
    let out = BATCH.get("rng");
    assert_eq!(out.status, 0, "{}", out.output);
    let lines = guest_lines(out);
    assert_eq!(lines.len(), 3, "{}", out.output);
    assert!(lines[0].starts_with("virtio_rng"), "{}", out.output);
    assert_eq!(lines[1], "4096");
    // Random data does not compress.
    let gz: usize = lines[2].parse().unwrap();
    assert!(
        gz > 4000,
        "4 KiB of hwrng output gzipped to {gz} bytes: not random"
    );
}

#[test]
fn ext4_root_on_virtio_blk_keeps_data_across_boots() {
    let out = BATCH.get("rootfs_persist");
    assert_eq!(out.status, 0, "{}", out.output);
    assert!(out.output.contains("on-rootfs"), "{}", out.output);
    assert!(
        out.output
            .lines()
            .any(|l| l.trim_end_matches('\r') == "persisted-42"),
        "{}",
        out.output
    );
}

#[test]
fn network_ping_both_ways_and_100_mib_intact() {
    let out = BATCH.get("net");
    assert_eq!(out.status, 0, "{}", out.output);
    let text = out.output.replace('\r', "");
    assert!(text.contains("kiln-status=0"), "{text}");
    assert!(text.contains("52:54:00:12:34:56"), "guest MAC: {text}");
    assert!(text.contains("guest-ping-ok"), "{text}");
    assert!(text.contains("host-ping-ok"), "{text}");
    let md5 = |prefix: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_else(|| panic!("no {prefix} line: {text}"))
    };
    let (g, h) = (md5("guest-md5 "), md5("host-md5 "));
    assert_eq!(g.len(), 32, "{text}");
    assert_eq!(g, h, "checksums differ: {text}");
}

/// Parses the agent's `sent N X recv M Y` line.
fn round_trip(text: &str) -> (u64, String, u64, String) {
    let l = text
        .lines()
        .find(|l| l.trim_start_matches('\r').starts_with("sent "))
        .unwrap_or_else(|| panic!("no agent report in: {text}"));
    let f: Vec<&str> = l.split_whitespace().collect();
    (
        f[1].parse().unwrap(),
        f[2].to_string(),
        f[4].parse().unwrap(),
        f[5].to_string(),
    )
}

#[test]
fn vsock_host_initiated_echo_10_mib() {
    let out = BATCH.get("vsock_host_to_guest");
    assert_eq!(out.status, 0, "{}", out.output);
    let (sent, s1, recv, s2) = round_trip(&out.output);
    assert_eq!((sent, recv), (10 << 20, 10 << 20), "{}", out.output);
    assert_eq!(s1, s2, "{}", out.output);
    assert!(out.output.contains("kiln-status=0"), "{}", out.output);
}

#[test]
fn vsock_guest_initiated_echo_10_mib() {
    let out = BATCH.get("vsock_guest_to_host");
    assert_eq!(out.status, 0, "{}", out.output);
    let (sent, s1, recv, s2) = round_trip(&out.output);
    assert_eq!((sent, recv), (10 << 20, 10 << 20), "{}", out.output);
    assert_eq!(s1, s2, "{}", out.output);
    assert!(out.output.contains("echoed 10485760"), "{}", out.output);
}

#[test]
fn balloon_inflate_lowers_memtotal() {
    let out = BATCH.get("balloon");
    assert_eq!(out.status, 0, "{}", out.output);
    let totals: Vec<u64> = out
        .output
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("MemTotal:"))
        .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap())
        .collect();
    assert_eq!(totals.len(), 2, "{}", out.output);
    let drop_kib = totals[0].saturating_sub(totals[1]);
    // 128 MiB = 131072 kB; allow a little slack for rounding and timing.
    assert!(
        (120_000..=140_000).contains(&drop_kib),
        "MemTotal went from {} to {} kB: {}",
        totals[0],
        totals[1],
        out.output
    );
}

#[test]
fn disk_bandwidth_limit_slows_reads() {
    let out = BATCH.get("disk_rate_limit");
    assert_eq!(out.status, 0, "{}", out.output);
    let secs: u64 = out
        .output
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix("elapsed="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no elapsed line: {}", out.output));
    assert!(
        secs >= 2,
        "4 MiB at 1 MiB/s took only {secs} s: {}",
        out.output
    );
}

#[test]
fn io_uring_engine_reads_and_writes() {
    let out = BATCH.get("io_uring");
    assert_eq!(out.status, 0, "{}", out.output);
    assert_eq!(guest_lines(out), vec!["uring-data"], "{}", out.output);
    // The host's copy: the last line of the output.
    let last = out.output.trim_end().lines().last().unwrap_or("");
    assert_eq!(last.trim(), "uring-data", "{}", out.output);
}
