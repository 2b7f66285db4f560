//! A conversion's share at one device as one batch: the entry limit counted
//! across the batch, what a failed device still does (nothing), and which
//! failure a device is failed for.

use std::sync::Arc;

use super::*;
use crate::fake_iommu::FakeIommu;

const PAGE: u64 = 0x1000;

fn section(gpa: u64, size: u64) -> Section {
    Section { gpa, size }
}

fn listener(policy: MappingPolicy, limit: Option<u64>) -> (Arc<FakeIommu>, DmaMappingListener) {
    let iommu = Arc::new(FakeIommu::new(None));
    let l = DmaMappingListener::with_policy(iommu.clone(), limit, policy);
    (iommu, l)
}

fn refused_section(result: Result<(), (Section, ListenerError)>) -> (Section, MapError) {
    match result {
        Err((s, ListenerError::Map { source, .. })) => (s, source),
        other => panic!("expected a refused map, got {other:?}"),
    }
}

#[test]
fn the_entry_limit_counts_every_section_of_a_per_page_batch() {
    let (iommu, l) = listener(MappingPolicy::Pages, Some(6));
    let sections = [section(0x10000, 4 * PAGE), section(0x20000, 4 * PAGE)];
    let (refused, cause) = refused_section(l.start_populate(&sections).finish());
    assert_eq!(refused, sections[1], "the section that passes the limit");
    assert!(
        matches!(cause, MapError::PagesPastLimit { limit: 6, pages: 4 }),
        "{cause}"
    );
    assert!(
        iommu.mappings().is_empty(),
        "refused before anything was sent"
    );
    assert_eq!(l.stats().refused, 1);
}

#[test]
fn the_entry_limit_counts_every_run_of_a_batch() {
    let (iommu, l) = listener(MappingPolicy::Runs, Some(2));
    let sections = [
        section(0x10000, PAGE),
        section(0x20000, PAGE),
        section(0x30000, PAGE),
    ];
    let (refused, cause) = refused_section(l.start_populate(&sections).finish());
    assert_eq!(refused, sections[2]);
    assert!(
        matches!(cause, MapError::EntryLimit { limit: 2 }),
        "{cause}"
    );
    assert!(iommu.mappings().is_empty());
}

#[test]
fn a_single_page_under_the_per_page_policy_is_one_entry() {
    let (_, l) = listener(MappingPolicy::Pages, Some(1));
    l.notify_populate(section(0x10000, PAGE)).unwrap();
    let (_, cause) = refused_section(l.start_populate(&[section(0x20000, PAGE)]).finish());
    assert!(
        matches!(cause, MapError::EntryLimit { limit: 1 }),
        "{cause}"
    );
}

#[test]
fn a_device_refusal_in_a_batch_is_counted_once_and_takes_back_the_rest() {
    let (iommu, l) = listener(MappingPolicy::Pages, None);
    iommu.fail_next_maps(1);
    let result = l.start_populate(&[section(0x10000, 4 * PAGE)]).finish();
    let (_, cause) = refused_section(result);
    assert!(
        matches!(cause, MapError::Device(DmaError::Refused(_))),
        "{cause}"
    );
    assert!(
        iommu.mappings().is_empty(),
        "the three pages mapped went back"
    );
    let stats = l.stats();
    assert_eq!((stats.refused, stats.maps, stats.unmaps), (1, 3, 3));
    assert!(l.failure().is_none(), "a refusal is not a failure");
}

#[test]
fn a_failed_device_is_sent_nothing_more() {
    let (iommu, l) = listener(MappingPolicy::Runs, None);
    l.notify_populate(section(0x10000, PAGE)).unwrap();
    // A refused unmap fails the device; the connection itself still works.
    iommu.fail_next_unmaps(1);
    l.notify_discard(section(0x10000, PAGE));
    assert!(l.failure().is_some());
    let maps = l.stats().maps;
    l.start_populate(&[section(0x20000, PAGE)])
        .finish()
        .unwrap();
    assert!(iommu.mappings().is_empty(), "{:?}", iommu.mappings());
    assert_eq!(l.stats().maps, maps);
}

#[test]
fn a_device_is_failed_for_the_first_unmap_it_refused() {
    let (iommu, l) = listener(MappingPolicy::Runs, None);
    l.notify_populate(section(0x10000, PAGE)).unwrap();
    l.notify_populate(section(0x30000, PAGE)).unwrap();
    iommu.fail_next_unmaps(2);
    assert_eq!(l.unmap_all(), 2);
    let why = l.failure().unwrap();
    assert!(why.contains("0x10000+0x1000"), "{why}");
    assert_eq!(l.stats().unmap_failures, 1);
}

#[test]
fn survivors_past_the_entry_limit_fail_the_device() {
    // Unprepared (as a rollback's unmap is): nothing reserved the entry a
    // split needs, and the limit leaves room for one survivor, not two.
    let (iommu, l) = listener(MappingPolicy::Runs, Some(1));
    l.notify_populate(section(0x10000, 4 * PAGE)).unwrap();
    l.notify_discard(section(0x11000, PAGE));
    let why = l.failure().expect("the device is failed");
    assert!(
        why.contains("cannot map back 0x10000+0x1000 after a split"),
        "{why}"
    );
    assert!(why.contains("DMA entry limit of 1"), "{why}");
    assert!(iommu.mappings().is_empty());
    assert_eq!(l.stats().lost_remaps, 1);
}

#[test]
fn a_device_is_failed_for_the_first_survivor_it_would_not_take_back() {
    let (iommu, l) = listener(MappingPolicy::Runs, None);
    l.notify_populate(section(0x10000, 4 * PAGE)).unwrap();
    l.prepare_discard(section(0x11000, PAGE)).unwrap();
    // Both survivors (0x10000 and 0x12000) are refused.
    iommu.fail_next_maps(2);
    l.notify_discard(section(0x11000, PAGE));
    let why = l.failure().expect("the device is failed");
    assert!(
        why.contains("cannot map back 0x10000+0x1000 after a split"),
        "{why}"
    );
    assert_eq!(l.stats().lost_remaps, 1);
}

#[test]
fn survivors_count_against_what_is_held_and_reserved() {
    // Two mappings held, one entry reserved for a prepared split of the
    // second: an unprepared split of the first needs two more entries, and
    // the limit of 3 has room for one.
    let (_, l) = listener(MappingPolicy::Runs, Some(3));
    l.notify_populate(section(0x10000, 4 * PAGE)).unwrap();
    l.notify_populate(section(0x30000, 4 * PAGE)).unwrap();
    l.prepare_discard(section(0x31000, PAGE)).unwrap();
    l.notify_discard(section(0x11000, PAGE));
    let why = l.failure().expect("the device is failed");
    assert!(why.contains("DMA entry limit of 3"), "{why}");
}
