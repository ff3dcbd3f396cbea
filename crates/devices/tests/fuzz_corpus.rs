//! Replays the fuzz corpus (`fuzz/corpus/<target>/*`) and the harness's
//! built-in seeds through the same harness functions the `cargo fuzz`
//! targets call, so every `cargo test` (stable, no fuzzer) runs them.
//!
//! `KILN_WRITE_SEEDS=1 cargo test -p kiln-devices --test fuzz_corpus`
//! (re)writes the built-in seeds into `fuzz/corpus/`.

use std::path::{Path, PathBuf};

use kiln_devices::fuzz_harness::{seeds, TARGETS};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target)
}

fn replay(target: &str) {
    let (_, harness) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .expect("known target");
    let seeds = seeds(target);
    assert!(!seeds.is_empty(), "{target}: no built-in seeds");
    let dir = corpus_dir(target);
    if std::env::var_os("KILN_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
    for (name, bytes) in &seeds {
        eprintln!("{target}: built-in seed {name}");
        harness(bytes);
    }
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(d) => d.map(|e| e.unwrap().path()).collect(),
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    for f in files {
        eprintln!("{target}: {}", f.display());
        harness(&std::fs::read(&f).unwrap());
    }
}

#[test]
fn virtio_blk_corpus() {
    replay("virtio_blk");
}

#[test]
fn virtio_net_tx_corpus() {
    replay("virtio_net_tx");
}

#[test]
fn virtio_vsock_corpus() {
    replay("virtio_vsock");
}

#[test]
fn mmio_transport_corpus() {
    replay("mmio_transport");
}
