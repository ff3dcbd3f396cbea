//! Replays the HTTP parser's fuzz corpus (`fuzz/corpus/http_parser/*`) and
//! the harness's built-in seeds through the harness the `cargo fuzz` target
//! calls, so every `cargo test` (stable, no fuzzer) runs them.
//!
//! `KILN_WRITE_SEEDS=1 cargo test -p kiln-api --test fuzz_corpus`
//! (re)writes the built-in seeds into `fuzz/corpus/http_parser/`.

use std::path::{Path, PathBuf};

use kiln_api::fuzz_harness::{http_parser, seeds};

#[test]
fn http_parser_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/http_parser");
    let seeds = seeds();
    if std::env::var_os("KILN_WRITE_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
        }
    }
    for (name, bytes) in &seeds {
        eprintln!("built-in seed {name}");
        http_parser(bytes);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    for f in files {
        eprintln!("{}", f.display());
        http_parser(&std::fs::read(&f).unwrap());
    }
}
