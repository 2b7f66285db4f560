//! Tests of RamBlockAttribute: error cases, rollback, notification counts,
//! scale, and a model-based property test against a plain `Vec<bool>`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;
use crate::memory::ConversionFailure;
use crate::test_util::OneRegion;

const PAGE: u64 = GRANULARITY;

/// A listener that records its mapped pages, enforces that it is never
/// told to map a mapped page or unmap an unmapped one, and can be told to
/// refuse maps touching a given page.
#[derive(Default)]
struct Recorder {
    mapped: Mutex<BTreeSet<u64>>,
    populates: Mutex<Vec<Section>>,
    discards: Mutex<Vec<Section>>,
    refuse_page: Mutex<Option<u64>>,
}

impl Recorder {
    fn refusing(gpa: u64) -> Arc<Self> {
        let r = Recorder::default();
        *r.refuse_page.lock().unwrap() = Some(gpa);
        Arc::new(r)
    }

    fn mapped(&self) -> BTreeSet<u64> {
        self.mapped.lock().unwrap().clone()
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.populates.lock().unwrap().len(),
            self.discards.lock().unwrap().len(),
        )
    }
}

impl RamDiscardListener for Recorder {
    fn notify_populate(&self, s: Section) -> Result<(), ListenerError> {
        if let Some(bad) = *self.refuse_page.lock().unwrap()
            && (s.gpa..s.end()).contains(&bad)
        {
            return Err(ListenerError::Other(format!("refusing {bad:#x}").into()));
        }
        let mut mapped = self.mapped.lock().unwrap();
        for p in (s.gpa..s.end()).step_by(arch::usize_from(PAGE)) {
            assert!(mapped.insert(p), "page {p:#x} mapped twice");
        }
        self.populates.lock().unwrap().push(s);
        Ok(())
    }

    fn notify_discard(&self, s: Section) {
        let mut mapped = self.mapped.lock().unwrap();
        for p in (s.gpa..s.end()).step_by(arch::usize_from(PAGE)) {
            assert!(mapped.remove(&p), "page {p:#x} unmapped but not mapped");
        }
        self.discards.lock().unwrap().push(s);
    }
}

/// Pages `first..first+count` of the region at BASE, as a section.
fn pages(first: u64, count: u64) -> Section {
    Section {
        gpa: BASE + first * PAGE,
        size: count * PAGE,
    }
}

/// A new `Recorder` registered on `rba` for `section`.
fn recorder_on(rba: &RamBlockAttribute, section: Section) -> Arc<Recorder> {
    let recorder = Arc::new(Recorder::default());
    rba.register_listener(recorder.clone(), section).unwrap();
    recorder
}

/// Converts each `(offset, size, to_shared)` of `rba` in order; each must
/// succeed.
fn convert_each(rba: &OneRegion, conversions: &[(u64, u64, bool)]) {
    for &(offset, size, shared) in conversions {
        rba.convert(offset, size, shared)
            .unwrap_or_else(|e| panic!("{offset:#x}+{size:#x} to shared={shared}: {e:?}"));
    }
}

fn shared_pages(rba: &RamBlockAttribute) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    rba.replay_populated::<()>(0, rba.size(), |s| {
        set.extend((s.gpa..s.end()).step_by(arch::usize_from(PAGE)));
        Ok(())
    })
    .unwrap();
    set
}

const BASE: u64 = 0x1_0000_0000;

#[test]
fn all_private_at_start() {
    let rba = OneRegion::new(BASE, 64 * PAGE);
    assert!(!rba.is_populated(0, PAGE).unwrap());
    assert!(shared_pages(&rba).is_empty());
    assert_eq!(rba.min_granularity(), 4096);
}

#[test]
fn bad_ranges_are_typed_errors_and_change_nothing() {
    let rba = OneRegion::new(BASE, 16 * PAGE);
    rba.convert(0, PAGE, true).unwrap();
    let before = shared_pages(&rba);
    for (offset, size, to_shared) in [(0, 0, true), (1, PAGE, true), (0, PAGE + 1, false)] {
        assert!(
            matches!(
                rba.convert(offset, size, to_shared),
                Err(ConversionFailure::Invalid { .. })
            ),
            "{offset:#x}+{size:#x}"
        );
    }
    // Past the end of the address space, and past the end of the region.
    assert!(matches!(
        rba.ram().convert(crate::test_util::conversion(
            u64::MAX - PAGE + 1,
            2 * PAGE,
            true
        )),
        Err(ConversionFailure::Invalid { .. })
    ));
    assert!(matches!(
        rba.convert(15 * PAGE, 2 * PAGE, true),
        Err(ConversionFailure::OutOfRange { .. })
    ));
    assert_eq!(shared_pages(&rba), before);
    assert_eq!(rba.totals().failed, 5);
    assert_eq!(
        rba.counters().failed,
        0,
        "refused before reaching the region"
    );
}

#[test]
fn mixed_range_notifies_one_run_per_change() {
    let rba = OneRegion::new(BASE, 64 * PAGE);
    let l = recorder_on(&rba, pages(0, 64));
    // Shared: pages 2..4 and 10..12; then the whole 0..16 to shared.
    convert_each(
        &rba,
        &[(2 * PAGE, 2 * PAGE, true), (10 * PAGE, 2 * PAGE, true)],
    );
    assert_eq!(l.counts(), (2, 0));
    let changed = rba.convert(0, 16 * PAGE, true).unwrap();
    assert_eq!(changed, 12);
    // Only the three private gaps were notified: 0..2, 4..10, 12..16.
    assert_eq!(l.counts(), (5, 0));
    assert_eq!(
        l.populates.lock().unwrap()[2..],
        [pages(0, 2), pages(4, 6), pages(12, 4),]
    );
    // Already shared: no notification at all.
    assert_eq!(rba.convert(0, 16 * PAGE, true).unwrap(), 0);
    assert_eq!(l.counts(), (5, 0));
    // To private over 0..32: one discard for the one shared run.
    rba.convert(0, 32 * PAGE, false).unwrap();
    assert_eq!(l.counts(), (5, 1));
    assert!(l.mapped().is_empty());
}

#[test]
fn refused_populate_rolls_back_every_listener() {
    let rba = OneRegion::new(BASE, 32 * PAGE);
    let section = pages(0, 32);
    let first = Arc::new(Recorder::default());
    let second = Recorder::refusing(BASE + 9 * PAGE);
    rba.register_listener(first.clone(), section).unwrap();
    rba.register_listener(second.clone(), section).unwrap();
    rba.convert(4 * PAGE, 2 * PAGE, true).unwrap();
    let shared_before = shared_pages(&rba);
    let err = rba.convert(0, 16 * PAGE, true).unwrap_err();
    assert!(matches!(
        err,
        ConversionFailure::ListenerFailed(AttributeError::ListenerFailed { gpa, .. })
            if gpa == BASE + 6 * PAGE
    ));
    assert_eq!(shared_pages(&rba), shared_before, "state unchanged");
    assert_eq!(first.mapped(), shared_before, "first listener rolled back");
    assert_eq!(
        second.mapped(),
        shared_before,
        "second listener rolled back"
    );
    assert_eq!(rba.counters().failed, 1);
    assert_eq!(rba.counters().to_shared, 1);
}

#[test]
fn listener_sections_clip_notifications() {
    let rba = OneRegion::new(BASE, 32 * PAGE);
    let l = recorder_on(&rba, pages(8, 8));
    rba.convert(0, 32 * PAGE, true).unwrap();
    assert_eq!(l.mapped(), (8..16).map(|p| BASE + p * PAGE).collect());
    assert_eq!(l.counts(), (1, 0));
}

#[test]
fn register_replays_and_failed_register_leaves_nothing() {
    let rba = OneRegion::new(BASE, 32 * PAGE);
    convert_each(
        &rba,
        &[
            (0, 4 * PAGE, true),
            (8 * PAGE, 4 * PAGE, true),
            (20 * PAGE, 4 * PAGE, true),
        ],
    );
    let section = pages(0, 32);

    let bad = Recorder::refusing(BASE + 21 * PAGE);
    assert!(rba.register_listener(bad.clone(), section).is_err());
    assert!(bad.mapped().is_empty(), "replayed runs were undone");
    // Not registered: later conversions do not reach it.
    rba.convert(30 * PAGE, PAGE, true).unwrap();
    assert!(bad.mapped().is_empty());

    let good = Arc::new(Recorder::default());
    let id = rba.register_listener(good.clone(), section).unwrap();
    assert_eq!(good.mapped(), shared_pages(&rba));
    assert_eq!(good.counts().0, 4, "one replay per run");
    rba.unregister_listener(id).unwrap();
    assert!(good.mapped().is_empty());
    assert!(matches!(
        rba.unregister_listener(id),
        Err(AttributeError::UnknownListener(_))
    ));
    assert!(
        rba.register_listener(
            good,
            Section {
                gpa: BASE - PAGE,
                size: PAGE
            }
        )
        .is_err()
    );
}

#[test]
fn replay_is_clipped_and_stops_at_first_error() {
    let rba = OneRegion::new(BASE, 32 * PAGE);
    convert_each(&rba, &[(0, 8 * PAGE, true), (16 * PAGE, 8 * PAGE, true)]);
    let mut seen = Vec::new();
    rba.replay_populated::<()>(4 * PAGE, 16 * PAGE, |s| {
        seen.push(s);
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, [pages(4, 4), pages(16, 4),]);
    let mut calls = 0;
    let r = rba.replay_discarded(0, 32 * PAGE, |_| {
        calls += 1;
        Err("stop")
    });
    assert!(matches!(r, Err(ReplayError::Callback("stop"))));
    assert_eq!(calls, 1);
}

#[test]
fn sixteen_tib_region() {
    let size = 16u64 << 40;
    let rba = OneRegion::new(0x1_0000_0000, size);
    let l = recorder_on(
        &rba,
        Section {
            gpa: 0x1_0000_0000,
            size,
        },
    );
    convert_each(
        &rba,
        &[(size - 2 * PAGE, 2 * PAGE, true), (size / 2, 1 << 30, true)],
    );
    assert_eq!(rba.shared_bytes(), (1 << 30) + 2 * PAGE);
    assert!(rba.is_populated(size - 2 * PAGE, 2 * PAGE).unwrap());
    assert_eq!(l.counts(), (2, 0));
    // The partial chunk at the end holds its bits; uniform chunks none.
    assert!(rba.lock().unwrap().heap_bytes() >= 4096);
    assert!(
        rba.lock().unwrap().heap_bytes() < 4 << 20,
        "sparse state for a sparse pattern"
    );
}

/// Scale: a 16 TiB region with 1 GiB and 1000 scattered pages shared gets a
/// device attached (its mappings replayed) and converts, in bounded time
/// and memory. The figures go to docs/performance.md.
#[test]
fn a_device_attaches_to_a_sixteen_tib_region_in_bounded_time_and_memory() {
    use vm_device::DmaMappingListener;
    use vm_device::fake_iommu::FakeIommu;
    let size = 16u64 << 40;
    let started = std::time::Instant::now();
    let rba = OneRegion::new(0x1_0000_0000, size);
    let created = started.elapsed();
    rba.convert(size / 2, 1 << 30, true).unwrap();
    for i in 0..1000u64 {
        rba.convert((i * (size / 2000)) & !(PAGE - 1), PAGE, true)
            .unwrap();
    }
    let iommu = Arc::new(FakeIommu::new(None));
    let listener = Arc::new(DmaMappingListener::new(iommu.clone(), Some(65535)));
    let attach = std::time::Instant::now();
    rba.register_listener(
        listener.clone(),
        Section {
            gpa: 0x1_0000_0000,
            size,
        },
    )
    .unwrap();
    let attached = attach.elapsed();
    assert_eq!(iommu.mappings().len(), 1001);
    rba.convert(size / 2, 2 << 20, false).unwrap();
    assert_eq!(listener.stats().splits, 1);
    let heap = rba.lock().unwrap().heap_bytes();
    eprintln!(
        "16 TiB region: created in {created:?}, device attached (1001 runs) in {attached:?}, {heap} bytes of state"
    );
    // 131072 chunks of 16 bytes, one block per mixed chunk (1000 of them
    // at most), two spares.
    assert!(heap <= (2 << 20) + 1002 * 4096, "{heap}");
    assert!(created + attached < std::time::Duration::from_secs(5));
}

#[test]
fn one_tib_fragmented_state_stays_within_a_bitmap() {
    let size = 1u64 << 40;
    let rba = OneRegion::new(0, size);
    // One shared page in every 128 MiB chunk: every chunk is mixed.
    let chunk = 128u64 << 20;
    for i in 0..size / chunk {
        rba.convert(i * chunk, PAGE, true).unwrap();
    }
    let bitmap = (size / PAGE / 8) as usize;
    let used = rba.lock().unwrap().heap_bytes();
    assert!(used <= bitmap + bitmap / 200, "{used} vs {bitmap}");
}

/// Concurrent conversions from several threads keep state and listener in step.
#[test]
fn concurrent_conversions_are_atomic() {
    let rba = Arc::new(OneRegion::new(0, 1024 * PAGE));
    let l = recorder_on(
        &rba,
        Section {
            gpa: 0,
            size: 1024 * PAGE,
        },
    );
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let rba = rba.clone();
            std::thread::spawn(move || {
                for i in 0..500u64 {
                    let page = (i * 7 + t * 13) % 1000;
                    rba.convert(page * PAGE, (1 + i % 24) * PAGE, (i + t) % 3 != 0)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(l.mapped(), shared_pages(&rba));
}

#[derive(Debug, Clone)]
enum Step {
    Change {
        first: u64,
        count: u64,
        to_shared: bool,
    },
    Register {
        listener: usize,
        first: u64,
        count: u64,
    },
    Unregister {
        listener: usize,
    },
    Refuse {
        listener: usize,
        page: Option<u64>,
    },
}

const MODEL_PAGES: u64 = 96;
const LISTENERS: usize = 3;

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..MODEL_PAGES + 4, 0..24u64, any::<bool>())
            .prop_map(|(first, count, to_shared)| Step::Change { first, count, to_shared }),
        1 => (0..LISTENERS, 0..MODEL_PAGES, 1..MODEL_PAGES)
            .prop_map(|(listener, first, count)| Step::Register { listener, first, count }),
        1 => (0..LISTENERS).prop_map(|listener| Step::Unregister { listener }),
        1 => (0..LISTENERS, proptest::option::of(0..MODEL_PAGES))
            .prop_map(|(listener, page)| Step::Refuse { listener, page }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn matches_the_reference_model(steps in proptest::collection::vec(step(), 1..60)) {
        let rba = OneRegion::new(BASE, MODEL_PAGES * PAGE);
        let mut model = vec![false; arch::usize_from(MODEL_PAGES)];
        let listeners: Vec<Arc<Recorder>> = (0..LISTENERS).map(|_| Arc::new(Recorder::default())).collect();
        let mut registered: Vec<Option<(ListenerId, u64, u64)>> = vec![None; LISTENERS];
        for step in steps {
            match step {
                Step::Change { first, count, to_shared } => {
                    let in_range = count > 0 && first + count <= MODEL_PAGES;
                    let refused = to_shared && in_range && registered.iter().enumerate().any(|(i, r)| {
                        r.is_some_and(|(_, f, c)| {
                            listeners[i].refuse_page.lock().unwrap().is_some_and(|bad| {
                                let page = (bad - BASE) / PAGE;
                                page >= f.max(first) && page < (f + c).min(first + count)
                                    && !model[page as usize]
                            })
                        })
                    });
                    let result = rba.convert(first * PAGE, count * PAGE, to_shared);
                    // Wholly past the region: no RAM there, so to-shared is
                    // accepted with nothing to convert (as for MMIO).
                    let unbacked = to_shared && count > 0 && first >= MODEL_PAGES;
                    prop_assert_eq!(result.is_ok(), (in_range && !refused) || unbacked, "{:?}", result);
                    if in_range && result.is_ok() {
                        for p in first..first + count {
                            model[arch::usize_from(p)] = to_shared;
                        }
                    }
                }
                Step::Register { listener, first, count } => {
                    if registered[listener].is_none() {
                        let count = count.min(MODEL_PAGES - first);
                        let section = Section { gpa: BASE + first * PAGE, size: count * PAGE };
                        if let Ok(id) = rba.register_listener(listeners[listener].clone(), section) {
                            registered[listener] = Some((id, first, count));
                        }
                    }
                }
                Step::Unregister { listener } => {
                    if let Some((id, _, _)) = registered[listener].take() {
                        rba.unregister_listener(id).unwrap();
                    }
                }
                Step::Refuse { listener, page } => {
                    *listeners[listener].refuse_page.lock().unwrap() = page.map(|p| BASE + p * PAGE);
                }
            }
            let expected: BTreeSet<u64> = (0..MODEL_PAGES)
                .filter(|p| model[arch::usize_from(*p)])
                .map(|p| BASE + p * PAGE)
                .collect();
            prop_assert_eq!(&shared_pages(&rba), &expected);
            for (i, l) in listeners.iter().enumerate() {
                let want: BTreeSet<u64> = match registered[i] {
                    Some((_, f, c)) => expected
                        .iter()
                        .copied()
                        .filter(|g| *g >= BASE + f * PAGE && *g < BASE + (f + c) * PAGE)
                        .collect(),
                    None => BTreeSet::new(),
                };
                prop_assert_eq!(&l.mapped(), &want, "listener {}", i);
            }
        }
    }
}

#[test]
fn a_listener_section_outside_the_region_is_refused_with_the_region_size() {
    let rba = OneRegion::new(BASE, 32 * PAGE);
    for section in [
        Section {
            gpa: BASE - PAGE,
            size: 2 * PAGE,
        },
        pages(31, 2),
    ] {
        let err = rba
            .register_listener(Arc::new(Recorder::default()), section)
            .unwrap_err();
        assert!(
            matches!(
                err,
                AttributeError::OutOfRegion {
                    region_size,
                    ..
                } if region_size == 32 * PAGE
            ),
            "{section:?}: {err}"
        );
    }
    assert_eq!(rba.lock().unwrap().listener_count(), 0);
}

/// What a conversion spanning two regions does when the second refuses:
/// the first region's listeners get their maps withdrawn.
#[test]
fn undo_populate_withdraws_exactly_what_was_offered() {
    let rba = OneRegion::new(BASE, 32 * PAGE);
    rba.convert(2 * PAGE, PAGE, true).unwrap();
    let recorder = recorder_on(
        &rba,
        Section {
            gpa: BASE,
            size: 32 * PAGE,
        },
    );
    let state = rba.lock().unwrap();
    let range = state.validate(0, 8 * PAGE).unwrap();
    let runs = state.changes(range, false);
    state.notify_populate(&runs).unwrap();
    // Pages 0-1 and 3-7 were offered (page 2 already was shared).
    assert_eq!(recorder.mapped().len(), 8);
    state.undo_populate(&runs);
    assert_eq!(recorder.mapped(), BTreeSet::from([BASE + 2 * PAGE]));
    assert_eq!(state.shared_pages(), 1, "the bitmap never changed");
}

#[test]
fn every_counter_follows_the_conversions() {
    let rba = OneRegion::new(BASE, 64 * PAGE);
    rba.convert(0, 8 * PAGE, true).unwrap();
    // Half of it already shared: only 4 pages change.
    convert_each(
        &rba,
        &[(4 * PAGE, 8 * PAGE, true), (2 * PAGE, 3 * PAGE, false)],
    );
    // Already private: counted as a conversion, no page changes.
    rba.convert(40 * PAGE, PAGE, false).unwrap();
    assert!(rba.convert(PAGE + 1, PAGE, true).is_err());
    assert_eq!(
        rba.totals(),
        ConversionCounters {
            to_shared: 2,
            to_private: 2,
            failed: 1,
            pages_to_shared: 12,
            pages_to_private: 3,
        }
    );
    assert_eq!(rba.lock().unwrap().shared_pages(), 9);
    assert_eq!(rba.shared_bytes(), 9 * PAGE);
}

/// A listener whose maps and unmaps are in flight until finished, logging
/// when each starts and finishes, and refusing maps on request.
struct InFlight {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    mapped: Mutex<BTreeSet<u64>>,
    refuse: bool,
}

impl InFlight {
    fn new(name: &'static str, log: &Arc<Mutex<Vec<String>>>, refuse: bool) -> Arc<Self> {
        Arc::new(InFlight {
            name,
            log: log.clone(),
            mapped: Mutex::new(BTreeSet::new()),
            refuse,
        })
    }

    fn note(&self, what: &str) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} {what}", self.name));
    }
}

impl RamDiscardListener for InFlight {
    fn notify_populate(&self, _: Section) -> Result<(), ListenerError> {
        unreachable!("maps go through start_populate")
    }

    fn notify_discard(&self, _: Section) {
        unreachable!("unmaps go through start_discard")
    }

    fn start_populate(&self, sections: &[Section]) -> Started<'_> {
        self.note("maps");
        let sections: Vec<Section> = sections.to_vec();
        Started::InFlight(Box::new(move || {
            self.note("mapped");
            if self.refuse {
                return Err((sections[0], ListenerError::Other("refused".into())));
            }
            let mut mapped = self.mapped.lock().unwrap();
            for s in &sections {
                mapped.extend((s.gpa..s.end()).step_by(arch::usize_from(PAGE)));
            }
            Ok(())
        }))
    }

    fn start_discard(&self, sections: &[Section]) -> Started<'_> {
        self.note("unmaps");
        let sections: Vec<Section> = sections.to_vec();
        Started::InFlight(Box::new(move || {
            self.note("unmapped");
            let mut mapped = self.mapped.lock().unwrap();
            for s in &sections {
                for page in (s.gpa..s.end()).step_by(arch::usize_from(PAGE)) {
                    assert!(mapped.remove(&page), "{page:#x} unmapped but not mapped");
                }
            }
            Ok(())
        }))
    }
}

fn log_of(log: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap())
}

/// Two listeners' log: its first and second half, each sorted.
fn sorted_halves(mut log: Vec<String>) -> [[String; 2]; 2] {
    assert_eq!(log.len(), 4, "{log:?}");
    log[..2].sort();
    log[2..].sort();
    let [a, b, c, d] = <[String; 4]>::try_from(log).unwrap();
    [[a, b], [c, d]]
}

#[test]
fn every_listener_is_started_before_any_is_waited_for() {
    let rba = OneRegion::new(BASE, 32 * PAGE);
    let log = Arc::new(Mutex::new(Vec::new()));
    let whole = pages(0, 32);
    let (a, b) = (
        InFlight::new("a", &log, false),
        InFlight::new("b", &log, false),
    );
    rba.register_listener(a.clone(), whole).unwrap();
    rba.register_listener(b.clone(), whole).unwrap();
    rba.convert(0, 4 * PAGE, true).unwrap();
    assert_eq!(
        sorted_halves(log_of(&log)),
        [["a maps", "b maps"], ["a mapped", "b mapped"]]
    );
    rba.convert(0, 4 * PAGE, false).unwrap();
    assert_eq!(
        sorted_halves(log_of(&log)),
        [["a unmaps", "b unmaps"], ["a unmapped", "b unmapped"]]
    );
    assert!(a.mapped.lock().unwrap().is_empty() && b.mapped.lock().unwrap().is_empty());
}

#[test]
fn a_refusal_while_all_are_in_flight_unmaps_every_listener_that_mapped() {
    let rba = OneRegion::new(BASE, 32 * PAGE);
    let log = Arc::new(Mutex::new(Vec::new()));
    let whole = pages(0, 32);
    let listeners = [
        InFlight::new("a", &log, false),
        InFlight::new("b", &log, true),
        InFlight::new("c", &log, false),
    ];
    for l in &listeners {
        rba.register_listener(l.clone(), whole).unwrap();
    }
    let err = rba.convert(2 * PAGE, 4 * PAGE, true).unwrap_err();
    assert!(
        matches!(
            err,
            ConversionFailure::ListenerFailed(AttributeError::ListenerFailed { gpa, .. })
                if gpa == BASE + 2 * PAGE
        ),
        "{err:?}"
    );
    // Every listener started, then every one finished, then the two that
    // mapped started and finished unmapping (listeners are kept in one
    // order for every region, not in registration order).
    let log = log_of(&log);
    let sorted = |part: &[String]| {
        let mut part = part.to_vec();
        part.sort();
        part
    };
    assert_eq!(log.len(), 10, "{log:?}");
    assert_eq!(sorted(&log[0..3]), ["a maps", "b maps", "c maps"]);
    assert_eq!(sorted(&log[3..6]), ["a mapped", "b mapped", "c mapped"]);
    assert_eq!(sorted(&log[6..8]), ["a unmaps", "c unmaps"]);
    assert_eq!(sorted(&log[8..10]), ["a unmapped", "c unmapped"]);
    for l in &listeners {
        assert!(l.mapped.lock().unwrap().is_empty(), "{}", l.name);
    }
    assert!(shared_pages(&rba).is_empty());
    assert_eq!(rba.counters().failed, 1);
}

/// Reserves per run, refusing the reservation of one run, and records
/// every reservation and cancellation.
#[derive(Default)]
struct Reserver {
    refuse_at: Option<u64>,
    log: Mutex<Vec<String>>,
}

impl RamDiscardListener for Reserver {
    fn notify_populate(&self, _: Section) -> Result<(), ListenerError> {
        Ok(())
    }

    fn prepare_discard(&self, s: Section) -> Result<(), ListenerError> {
        if self.refuse_at == Some(s.gpa) {
            return Err(ListenerError::Other("no entry left".into()));
        }
        self.log
            .lock()
            .unwrap()
            .push(format!("reserve {:#x}", s.gpa));
        Ok(())
    }

    fn cancel_discard(&self, s: Section) {
        self.log
            .lock()
            .unwrap()
            .push(format!("cancel {:#x}", s.gpa));
    }

    fn notify_discard(&self, s: Section) {
        self.log.lock().unwrap().push(format!("unmap {:#x}", s.gpa));
    }
}

#[test]
fn a_reservation_refused_part_way_cancels_exactly_the_runs_before_it() {
    let rba = OneRegion::new(BASE, 32 * PAGE);
    // Three shared runs: 0-1, 4-5, 8-9.
    for first in [0, 4, 8] {
        rba.convert(first * PAGE, 2 * PAGE, true).unwrap();
    }
    let whole = pages(0, 32);
    let reserver = Arc::new(Reserver {
        refuse_at: Some(BASE + 8 * PAGE),
        ..Default::default()
    });
    rba.register_listener(reserver.clone(), whole).unwrap();
    assert!(rba.convert(0, 16 * PAGE, false).is_err());
    assert_eq!(
        *reserver.log.lock().unwrap(),
        [
            format!("reserve {BASE:#x}"),
            format!("reserve {:#x}", BASE + 4 * PAGE),
            format!("cancel {BASE:#x}"),
            format!("cancel {:#x}", BASE + 4 * PAGE),
        ]
    );
    assert_eq!(shared_pages(&rba).len(), 6, "nothing converted");
}

#[test]
fn a_detached_listener_hears_nothing_more_and_the_others_still_do() {
    let rba = OneRegion::new(BASE, 32 * PAGE);
    let whole = pages(0, 32);
    let (kept, detached) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let kept_id = rba.register_listener(kept.clone(), whole).unwrap();
    let detached_id = rba.register_listener(detached.clone(), whole).unwrap();
    assert_eq!(rba.lock().unwrap().listener_count(), 2);
    rba.detach_listener(detached_id).unwrap();
    assert_eq!(rba.lock().unwrap().listener_count(), 1);
    rba.convert(0, 2 * PAGE, true).unwrap();
    assert_eq!(kept.mapped().len(), 2);
    assert!(detached.mapped().is_empty(), "detached, yet notified");
    assert!(matches!(
        rba.detach_listener(detached_id),
        Err(AttributeError::UnknownListener(_))
    ));
    rba.detach_listener(kept_id).unwrap();
    assert_eq!(rba.lock().unwrap().listener_count(), 0);
}

#[test]
fn reads_of_unaligned_ranges_are_refused() {
    let rba = OneRegion::new(BASE, 32 * PAGE);
    assert!(matches!(
        rba.is_populated(1, PAGE),
        Err(AttributeError::Unaligned { .. })
    ));
    assert!(matches!(
        rba.is_populated(0, PAGE + 1),
        Err(AttributeError::Unaligned { .. })
    ));
    assert!(rba.is_populated(0, PAGE).is_ok());
}

/// A conversion holds the locks of all its region's listeners at once, so
/// every region keeps them in one order whatever order they registered in:
/// two conversions of two regions never wait for each other in a cycle.
#[test]
fn every_region_keeps_its_listeners_in_one_order() {
    let (first, second) = (
        OneRegion::new(BASE, 32 * PAGE),
        OneRegion::new(0, 32 * PAGE),
    );
    let devices: Vec<Arc<Recorder>> = (0..3).map(|_| Arc::new(Recorder::default())).collect();
    for d in &devices {
        first.register_listener(d.clone(), pages(0, 1)).unwrap();
    }
    for d in devices.iter().rev() {
        second
            .register_listener(d.clone(), Section { gpa: 0, size: PAGE })
            .unwrap();
    }
    let order = |rba: &OneRegion| -> Vec<usize> {
        rba.lock()
            .unwrap()
            .listeners
            .iter()
            .map(|r| lock_order(&r.listener))
            .collect()
    };
    assert_eq!(order(&first), order(&second));
    let mut sorted = order(&first);
    sorted.sort_unstable();
    assert_eq!(order(&first), sorted);
}
