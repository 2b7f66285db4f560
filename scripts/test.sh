#!/usr/bin/env bash
# The whole test suite: formatting, lints, a compile check of the benchmarks,
# then unit, property and integration tests (real KVM guests) under nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo bench --workspace --locked --no-run
# The device tests run ch-test-device from another package, which nextest
# does not build for them.
cargo build --workspace --locked --bins
cargo nextest run --workspace --locked --no-fail-fast
