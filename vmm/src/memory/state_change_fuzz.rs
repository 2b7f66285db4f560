//! Fuzz target for the conversion path (`ConvertibleRam::convert`, which
//! every guest conversion runs): sequences of arbitrary (offset, size, direction)
//! — unaligned, zero, overflowing, past the end, huge — on a 16 GiB region
//! with a DMA listener over the fake IOMMU. Each call either succeeds and
//! matches an interval model, or fails and changes nothing (state, mappings)
//! while counting one failure. Never a panic.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use vm_device::fake_iommu::FakeIommu;
use vm_device::{DmaMappingListener, Section};

use super::ram_block_attribute::{GRANULARITY as PAGE, RamBlockAttribute};
use crate::fuzz_config::fuzz_config;
use crate::test_util::OneRegion;

const REGION: u64 = 16 << 30;
const BASE: u64 = 0x1_0000_0000;

/// Shared ranges as `start -> end` (region offsets), never touching.
#[derive(Default, Debug, PartialEq)]
struct IntervalModel(BTreeMap<u64, u64>);

impl IntervalModel {
    fn set(&mut self, start: u64, end: u64, shared: bool) {
        // Cut every interval overlapping or touching [start, end), keep the
        // parts outside, then add the range back if it is shared.
        let touching: Vec<(u64, u64)> = self
            .0
            .range(..=end)
            .filter(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let (mut lo, mut hi) = (start, end);
        for (s, e) in touching {
            self.0.remove(&s);
            if shared {
                lo = lo.min(s);
                hi = hi.max(e);
            } else {
                if s < start {
                    self.0.insert(s, start);
                }
                if e > end {
                    self.0.insert(end, e);
                }
            }
        }
        if shared {
            self.0.insert(lo, hi);
        }
    }

    fn runs(&self) -> Vec<(u64, u64)> {
        self.0.iter().map(|(&s, &e)| (s, e - s)).collect()
    }
}

fn shared_runs(rba: &RamBlockAttribute) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    rba.replay_populated(0, REGION, |s| {
        runs.push((s.gpa - BASE, s.size));
        Ok::<(), ()>(())
    })
    .unwrap();
    runs
}

/// Device mappings merged into maximal runs (region offsets).
fn mapped_runs(mappings: &[Section]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for s in mappings {
        match runs.last_mut() {
            Some((start, size)) if *start + *size == s.gpa - BASE => *size += s.size,
            _ => runs.push((s.gpa - BASE, s.size)),
        }
    }
    runs
}

/// Offsets and sizes a guest could put in the doorbell, biased towards the
/// ones that reach different checks.
fn guest_number(small_pages: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (1..small_pages).prop_map(|p| p * PAGE),
        3 => (0..REGION / PAGE).prop_map(|p| p * PAGE),
        1 => (0..64u64).prop_map(|p| REGION - p * PAGE),
        1 => any::<u64>(),
        1 => 0..REGION,
        1 => prop_oneof![Just(0), Just(u64::MAX), Just(u64::MAX - PAGE + 1), Just(REGION)],
    ]
}

/// Offsets cluster in the first pages so conversions overlap.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![3 => (0..256u64).prop_map(|p| p * PAGE), 2 => guest_number(1 << 16)]
}

/// What the path must answer for a request at region offset `offset`
/// (sent as the GPA `BASE + offset`, wrapping): `Some(true)` converts,
/// `Some(false)` is accepted with nothing to convert (a to-shared request
/// wholly outside RAM, as firmware makes MMIO shared), `None` is refused.
fn expected(offset: u64, size: u64, to_shared: bool) -> Option<bool> {
    let gpa = BASE.wrapping_add(offset);
    let end = gpa.checked_add(size)?;
    if size == 0 || !gpa.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
        return None;
    }
    if gpa >= BASE && end <= BASE + REGION {
        Some(true)
    } else if to_shared && (end <= BASE || gpa >= BASE + REGION) {
        Some(false)
    } else {
        None
    }
}

proptest! {
    #![proptest_config(fuzz_config())]

    #[test]
    fn conversions_accept_exactly_the_valid_ranges_and_never_half_applies(
        steps in proptest::collection::vec((offset(), guest_number(64), any::<bool>()), 1..40)
    ) {
        let rba = OneRegion::new(BASE, REGION);
        let iommu = Arc::new(FakeIommu::new(None));
        let listener = Arc::new(DmaMappingListener::new(iommu.clone(), None));
        rba.register_listener(listener, Section { gpa: BASE, size: REGION }).unwrap();
        let mut model = IntervalModel::default();
        let mut failures = 0;
        for (offset, size, to_shared) in steps {
            let result = rba.convert(offset, size, to_shared);
            let expected = expected(offset, size, to_shared);
            prop_assert_eq!(result.is_ok(), expected.is_some(), "{:#x}+{:#x}: {:?}", offset, size, result);
            match (result, expected) {
                (Ok(_), Some(true)) => model.set(offset, offset + size, to_shared),
                (Ok(changed), _) => prop_assert_eq!(changed, 0),
                (Err(_), _) => failures += 1,
            }
            let runs = model.runs();
            prop_assert_eq!(&shared_runs(&rba), &runs);
            prop_assert_eq!(&mapped_runs(&iommu.mappings()), &runs);
            prop_assert_eq!(iommu.violations(), 0);
            prop_assert_eq!(rba.totals().failed, failures);
            let shared: u64 = runs.iter().map(|r| r.1).sum();
            prop_assert_eq!(rba.shared_bytes(), shared);
        }
    }
}

#[test]
fn the_interval_model_merges_and_cuts() {
    let mut m = IntervalModel::default();
    m.set(0, 10, true);
    m.set(10, 20, true);
    assert_eq!(m.runs(), [(0, 20)]);
    m.set(5, 8, false);
    assert_eq!(m.runs(), [(0, 5), (8, 12)]);
    m.set(0, 30, false);
    assert!(m.runs().is_empty());
}
