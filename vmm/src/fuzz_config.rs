// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! Shared settings of the proptest fuzz harnesses (`*_fuzz.rs`): CI runs a
//! bounded number of cases, a long campaign sets `CH_FUZZ_CASES`.

use proptest::test_runner::Config;

/// Cases per harness when `CH_FUZZ_CASES` is unset: a few seconds in CI.
const CI_CASES: u32 = 512;

pub fn fuzz_config() -> Config {
    let cases = std::env::var("CH_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CI_CASES);
    Config {
        cases,
        // A failure is shrunk to a minimal input; keep that bounded too.
        max_shrink_iters: 4096,
        ..Config::default()
    }
}
