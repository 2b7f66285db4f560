//! Random conversion sequences through the conversion path with DMA
//! listeners over the fake IOMMU (the kernel's type1 rules): no request ever
//! cuts a mapping or overlaps one, every device's mappings cover exactly the
//! shared pages, and an entry limit refuses conversions (either direction:
//! an unmap that cuts a mapping needs one more entry) without leaving
//! partial state anywhere or losing a mapping.

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;
use vm_device::fake_iommu::FakeIommu;
use vm_device::{DmaMappingListener, Section};

use crate::memory::RamBlockAttribute;
use crate::test_util::OneRegion;

const PAGES: u64 = 128;
use arch::layout::PAGE_SIZE as PAGE;
const BASE: u64 = 0x10_0000_0000;

fn pages_of(sections: &[Section]) -> BTreeSet<u64> {
    sections
        .iter()
        .flat_map(|s| (s.gpa..s.end()).step_by(::arch::usize_from(PAGE)))
        .collect()
}

fn shared_pages(rba: &RamBlockAttribute) -> BTreeSet<u64> {
    let mut runs = Vec::new();
    rba.replay_populated(0, PAGES * PAGE, |s| {
        runs.push(s);
        Ok::<(), ()>(())
    })
    .unwrap();
    pages_of(&runs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn exact_unmap_holds_over_random_conversions(
        steps in prop::collection::vec((0..PAGES, 1..24u64, any::<bool>()), 1..80),
        limit in 2..12u64,
    ) {
        let rba = OneRegion::new(BASE, PAGES * PAGE);
        let region = Section { gpa: BASE, size: PAGES * PAGE };
        let roomy = Arc::new(FakeIommu::new(None));
        let tight = Arc::new(FakeIommu::new(Some(limit)));
        let roomy_listener = Arc::new(DmaMappingListener::new(roomy.clone(), None));
        // The listener knows the limit; the fake enforces it as well.
        let tight_listener = Arc::new(DmaMappingListener::new(tight.clone(), Some(limit - 1)));
        rba.register_listener(roomy_listener.clone(), region).unwrap();
        rba.register_listener(tight_listener.clone(), region).unwrap();

        for (first, count, to_shared) in steps {
            let count = count.min(PAGES - first);
            let before = shared_pages(&rba);
            let result = rba.convert(first * PAGE, count * PAGE, to_shared);
            let after = shared_pages(&rba);
            if result.is_err() {
                // A map past the limit, or an unmap that would split a
                // mapping with no entry left: refused whole.
                prop_assert_eq!(&after, &before, "a refused conversion changed the state");
            } else {
                let range: BTreeSet<u64> =
                    (first..first + count).map(|p| BASE + p * PAGE).collect();
                let expected: BTreeSet<u64> = if to_shared {
                    before.union(&range).copied().collect()
                } else {
                    before.difference(&range).copied().collect()
                };
                prop_assert_eq!(&after, &expected);
            }
            for (iommu, listener) in [(&roomy, &roomy_listener), (&tight, &tight_listener)] {
                prop_assert_eq!(iommu.violations(), 0, "a request broke the kernel's rules");
                prop_assert_eq!(pages_of(&iommu.mappings()), after.clone());
                prop_assert_eq!(listener.mappings(), iommu.mappings());
                prop_assert_eq!(listener.stats().lost_remaps, 0);
            }
        }
    }
}
