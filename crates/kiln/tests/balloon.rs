//! Free page reporting with the stock kernel (lab, or natively on a KVM
//! host): a guest fills 256 MiB of its memory with a file, then deletes it.
//! With `--balloon 0,free_page_reporting` the VMM's resident memory falls
//! back after the guest reports the freed blocks; without it, it stays up.

mod common;

use std::time::Duration;

use common::{section, Batch};

/// The guest: fill, wait, free, wait (the host measures in the pauses: RSS
/// right after the fill, and its lowest value between the delete and the end).
const GUEST: &str = "echo filling; dd if=/dev/zero of=/fill bs=1M count=256 2>/dev/null; \
    echo filled; sleep 5; rm /fill; echo freed; sleep 12; echo end";

fn cases() -> Vec<(&'static str, String)> {
    let run = |name: &str, balloon: &str| {
        format!(
            r#"rm -f /tmp/{name}.out; kiln run --mem 512 --balloon {balloon} -- '{GUEST}' > /tmp/{name}.out 2>&1 & V=$!
w() {{ i=0; until grep -q "$1" /tmp/{name}.out || [ $i -gt 900 ]; do sleep 0.2; i=$((i+1)); done; }}
r() {{ awk '/VmRSS/{{print $2}}' /proc/$V/status 2>/dev/null; }}
w filled; echo "filled-rss=$(r)"
# The lowest RSS from the delete until the guest's end (12 s later): with
# reporting it must fall, without it must stay up the whole time.
w freed; low=$(r); i=0
until grep -q end /tmp/{name}.out || [ $i -gt 900 ]; do x=$(r); [ -n "$x" ] && [ "$x" -lt "$low" ] && low=$x; sleep 0.2; i=$((i+1)); done
echo "freed-rss=$low"
wait $V; echo status=$?; grep -c end /tmp/{name}.out"#
        )
    };
    vec![(
        "reporting",
        format!(
            "echo '== without'; {}\necho '== with'; {}",
            run("plain", "0"),
            run("rep", "0,free_page_reporting")
        ),
    )]
}

static BATCH: Batch = Batch::new(cases, Duration::from_secs(600));

/// (RSS after the fill, RSS after the delete), kB.
fn rss(s: &str) -> (u64, u64) {
    let get = |k: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {s}"))
    };
    (get("filled-rss="), get("freed-rss="))
}

#[test]
fn reported_free_pages_leave_the_vmm() {
    let out = BATCH.get("reporting");
    eprintln!("{}", out.output);
    let o = &out.output;
    let without = section(o, "without");
    let with = section(o, "with");
    for s in [without, with] {
        assert!(s.contains("status=0"), "{o}");
    }
    let (full, after) = rss(without);
    // The fill is resident in both runs.
    assert!(full > 256 * 1024, "{o}");
    // Without reporting the freed memory stays with the VMM...
    assert!(after + 32 * 1024 > full, "{o}");
    let (full, after) = rss(with);
    assert!(full > 256 * 1024, "{o}");
    // ...with it, most of the 256 MiB goes back to the host.
    assert!(after + 160 * 1024 < full, "{o}");
}
