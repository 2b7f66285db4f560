#!/usr/bin/env bash
# The whole test suite: formatting, lints, a compile check of the benchmarks,
# then unit, property and integration tests (real KVM guests) under nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
# The OpenAPI spec is valid OpenAPI 3 (the Rust tests check it against the
# routes and the answers).
if python3 -c 'import openapi_spec_validator' 2>/dev/null; then
    python3 -m openapi_spec_validator vmm/openapi/cloud-hypervisor.yaml
elif [ "${CH_REQUIRE_KVM:-}" = 1 ]; then
    echo "openapi-spec-validator is missing (.ci/run installs it)" >&2
    exit 1
else
    echo "*** SKIPPED: OpenAPI validation (pip install openapi-spec-validator) ***" >&2
fi
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo bench --workspace --locked --no-run
# The device tests run ch-test-device from another package, which nextest
# does not build for them.
cargo build --workspace --locked --bins
cargo nextest run --workspace --locked --no-fail-fast
