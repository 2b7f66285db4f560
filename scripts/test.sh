#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property and integration
# tests (real KVM guests), and a compile check of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --no-fail-fast
cargo test --workspace --doc --locked
cargo bench --workspace --locked --no-run
