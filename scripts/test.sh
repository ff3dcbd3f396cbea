#!/bin/sh
# Sets up a fresh machine and runs the whole test suite: unit tests, and the
# integration tests that boot Debian's stock kernel in Kiln microVMs (in the
# lab when this host's KVM cannot run them natively).
set -eu
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -q -- -D warnings
cargo test --workspace --no-fail-fast
