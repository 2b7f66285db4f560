//! The adapter between a device's DMA mapping and the RAM conversion state:
//! populate maps, discard unmaps, and the IOVA is the GPA.
//!
//! VFIO type1, iommufd and vfio-user servers can only unmap whole mappings,
//! so the adapter remembers every mapping it made. A populated run becomes
//! one mapping. A discard that covers part of a mapping unmaps the whole
//! mapping and maps back the parts that stay shared (a "split"): during that
//! window a DMA to the surviving parts faults, which is the price of not
//! mapping every 4 KiB page separately. Guests mostly convert back the same
//! ranges they shared (bounce buffers, coherent allocations), so splits are
//! rare; they are counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use log::error;
use serde::Serialize;

use crate::discard_listener::{ListenerError, MapError, RamDiscardListener, Section, Started};
use crate::dma_mapping::{CutOff, DmaError, DmaOp, ExternalDmaMapping};

mod batch;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DmaStats {
    /// Mappings currently held.
    pub entries: u64,
    pub mapped_bytes: u64,
    pub maps: u64,
    pub unmaps: u64,
    /// Discards that cut a mapping and mapped its surviving parts again.
    pub splits: u64,
    /// Populates refused (by the device or the entry limit).
    pub refused: u64,
    /// Unmaps the device failed: the range may still be reachable by DMA.
    pub unmap_failures: u64,
    /// Surviving parts of a split the device would not map again (each one
    /// fails the device: see `DmaMappingListener`).
    pub lost_remaps: u64,
}

/// How a device's mappings cover the shared pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MappingPolicy {
    /// One mapping per populated run: fewest entries; a discard inside a
    /// run unmaps it whole and maps back the survivors (a split), so DMA in
    /// flight to the survivors can fault in that window.
    #[default]
    Runs,
    /// One mapping per 4 KiB page: a discard unmaps exactly its pages, so a
    /// page that stays shared is never unmapped; costs an entry per page.
    Pages,
}

use arch::layout::PAGE_SIZE;

/// Called once, with the reason, when the device is failed and cut off.
pub type FailureHook = Box<dyn Fn(&str) + Send + Sync>;

struct Mappings {
    /// IOVA -> size of every mapping made and not yet unmapped.
    by_iova: BTreeMap<u64, u64>,
    /// Entries promised to prepared discards (a split needs one more).
    reserved: u64,
    /// Extra entries reserved per prepared section. A section is prepared
    /// at most once at a time: its region's lock serializes conversions and
    /// sections never span regions.
    pending: HashMap<Section, u64>,
    stats: DmaStats,
    /// Set once the device is cut off: from then on it follows nothing.
    failure: Option<String>,
}

impl Mappings {
    /// Extra entries a discard of `section` needs: a mapping that extends
    /// past both ends of it leaves two survivors where it was one.
    fn extra_entries(&self, section: Section) -> u64 {
        self.by_iova
            .range(..section.gpa)
            .next_back()
            .is_some_and(|(&iova, &size)| iova + size > section.end())
            .into()
    }

    fn release(&mut self, section: Section) {
        if let Some(extra) = self.pending.remove(&section) {
            self.reserved -= extra;
        }
    }
}

/// What a reader may see without waiting for device I/O.
#[derive(Default, Clone)]
struct Published {
    stats: DmaStats,
    failure: Option<String>,
}

/// A device's DMA mapping as a discard listener.
///
/// Faults: a refused map (`DmaError::Refused`) refuses the conversion. A
/// device whose connection fails (`DmaError::Broken`), that fails an unmap,
/// or that will not map back the surviving parts of a split is *failed*: it
/// is cut off from guest memory at once (`ExternalDmaMapping::cut_off`, then
/// unmapping everything held unless that dropped it all), it stops taking
/// part in conversions, and the guest's conversion goes on. A failed device
/// never holds a page the guest made private, and the guest is never told
/// `ok` for a page a live device did not follow.
pub struct DmaMappingListener {
    dma: Arc<dyn ExternalDmaMapping>,
    entry_limit: Option<u64>,
    policy: MappingPolicy,
    mappings: Mutex<Mappings>,
    /// Updated at the end of every operation; never held across device I/O.
    published: Mutex<Published>,
    on_failure: Mutex<Option<FailureHook>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update of these states completes before its lock is released
    // (no device call can panic half-way through one), so a poisoned lock
    // still guards consistent data.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl DmaMappingListener {
    /// `entry_limit`: most mappings the IOMMU backend accepts, if bounded.
    pub fn new(dma: Arc<dyn ExternalDmaMapping>, entry_limit: Option<u64>) -> Self {
        Self::with_policy(dma, entry_limit, MappingPolicy::Runs)
    }

    pub fn with_policy(
        dma: Arc<dyn ExternalDmaMapping>,
        entry_limit: Option<u64>,
        policy: MappingPolicy,
    ) -> Self {
        DmaMappingListener {
            dma,
            entry_limit,
            policy,
            mappings: Mutex::new(Mappings {
                by_iova: BTreeMap::new(),
                reserved: 0,
                pending: HashMap::new(),
                stats: DmaStats::default(),
                failure: None,
            }),
            published: Mutex::new(Published::default()),
            on_failure: Mutex::new(None),
        }
    }

    /// `hook` runs once if the device is ever failed. It runs on the thread
    /// that found the failure (a vCPU, usually), so it must not block.
    pub fn set_failure_hook(&self, hook: FailureHook) {
        *lock(&self.on_failure) = Some(hook);
    }

    fn lock(&self) -> MutexGuard<'_, Mappings> {
        lock(&self.mappings)
    }

    fn publish(&self, m: &Mappings) {
        let mut p = lock(&self.published);
        p.stats = m.stats;
        if p.failure.is_none() {
            p.failure.clone_from(&m.failure);
        }
    }

    pub fn policy(&self) -> MappingPolicy {
        self.policy
    }

    /// Counters as of the last finished operation; never waits for a device.
    pub fn stats(&self) -> DmaStats {
        lock(&self.published).stats
    }

    /// Why the device was failed, if it was; never waits for a device.
    pub fn failure(&self) -> Option<String> {
        lock(&self.published).failure.clone()
    }

    /// Every mapping held, in IOVA order.
    pub fn mappings(&self) -> Vec<Section> {
        self.lock()
            .by_iova
            .iter()
            .map(|(&gpa, &size)| Section { gpa, size })
            .collect()
    }

    /// Unmaps whatever is still mapped; returns how many mappings that was.
    /// Unregistering from every region normally leaves nothing to do here.
    pub fn unmap_all(&self) -> usize {
        let mut m = self.lock();
        let held: Vec<(u64, u64)> = m.by_iova.iter().map(|(&a, &s)| (a, s)).collect();
        if m.failure.is_none() {
            self.unmap_batch(&mut m, &held);
        }
        self.publish(&m);
        held.len()
    }

    /// Fails the device: cuts it off from guest memory and forgets what it
    /// held. Idempotent.
    fn fail(&self, m: &mut Mappings, reason: String) {
        if m.failure.is_some() {
            return;
        }
        error!("device failed and detached from guest memory: {reason}");
        if self.dma.cut_off(&reason) == CutOff::MappingsLeft {
            // Best effort: nothing else can take these mappings away.
            let held: Vec<(u64, u64)> = m.by_iova.iter().map(|(&a, &s)| (a, s)).collect();
            for (iova, size) in held {
                if self.dma.unmap(iova, size).is_err() {
                    m.stats.unmap_failures += 1;
                }
            }
        }
        m.by_iova.clear();
        m.pending.clear();
        m.reserved = 0;
        m.stats.entries = 0;
        m.stats.mapped_bytes = 0;
        m.failure = Some(reason.clone());
        self.publish(m);
        if let Some(hook) = lock(&self.on_failure).as_ref() {
            hook(&reason);
        }
    }
}

impl DmaMappingListener {
    /// Maps RAM that is never converted (no guest_memfd) as one mapping,
    /// whatever the policy: nothing will ever be discarded inside it.
    pub fn populate_unconverted(&self, section: Section) -> Result<(), ListenerError> {
        self.start_populate_as(&[section], MappingPolicy::Runs)
            .finish()
            .map_err(|(_, e)| e)
    }
}

impl RamDiscardListener for DmaMappingListener {
    fn notify_populate(&self, section: Section) -> Result<(), ListenerError> {
        self.start_populate(&[section]).finish().map_err(|(_, e)| e)
    }

    fn start_populate(&self, sections: &[Section]) -> Started<'_> {
        self.start_populate_as(sections, self.policy)
    }

    fn start_discard(&self, sections: &[Section]) -> Started<'_> {
        self.start_discard_batch(sections)
    }

    fn prepare_discard(&self, section: Section) -> Result<(), ListenerError> {
        let mut m = self.lock();
        if m.failure.is_some() {
            return Ok(());
        }
        let extra = m.extra_entries(section);
        if let Some(limit) = self.entry_limit
            && m.stats.entries + m.reserved + extra > limit
        {
            m.stats.refused += 1;
            self.publish(&m);
            return Err(ListenerError::SplitPastLimit {
                limit,
                gpa: section.gpa,
                size: section.size,
            });
        }
        m.reserved += extra;
        m.pending.insert(section, extra);
        Ok(())
    }

    fn cancel_discard(&self, section: Section) {
        self.lock().release(section);
    }

    fn notify_discard(&self, section: Section) {
        let _ = self.start_discard(&[section]).finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_iommu::FakeIommu;

    fn section(gpa: u64, size: u64) -> Section {
        Section { gpa, size }
    }

    fn listener(limit: Option<u64>) -> (Arc<FakeIommu>, DmaMappingListener) {
        let iommu = Arc::new(FakeIommu::new(limit));
        (iommu.clone(), DmaMappingListener::new(iommu, None))
    }

    /// A listener holding at most `limit` entries on a fake without a
    /// limit of its own.
    fn entry_limited(limit: u64) -> (Arc<FakeIommu>, DmaMappingListener) {
        let iommu = Arc::new(FakeIommu::new(None));
        (iommu.clone(), DmaMappingListener::new(iommu, Some(limit)))
    }

    /// Notifies `l` of each `(gpa, size)` becoming shared, in order; each
    /// must be accepted.
    fn populate(l: &DmaMappingListener, runs: &[(u64, u64)]) {
        for &(gpa, size) in runs {
            l.notify_populate(section(gpa, size))
                .unwrap_or_else(|e| panic!("populate {gpa:#x}+{size:#x}: {e}"));
        }
    }

    fn page_listener(
        iommu_limit: Option<u64>,
        entry_limit: Option<u64>,
    ) -> (Arc<FakeIommu>, DmaMappingListener) {
        let iommu = Arc::new(FakeIommu::new(iommu_limit));
        let l = DmaMappingListener::with_policy(iommu.clone(), entry_limit, MappingPolicy::Pages);
        (iommu, l)
    }

    #[test]
    fn per_page_policy_never_unmaps_a_page_that_stays_shared() {
        let (iommu, l) = page_listener(None, None);
        assert_eq!(l.policy(), MappingPolicy::Pages);
        l.notify_populate(section(0x10000, 0x4000)).unwrap();
        let pages: Vec<Section> = (0..4)
            .map(|i| section(0x10000 + i * 0x1000, 0x1000))
            .collect();
        assert_eq!(iommu.mappings(), pages);
        l.prepare_discard(section(0x11000, 0x1000)).unwrap();
        l.notify_discard(section(0x11000, 0x1000));
        assert_eq!(iommu.mappings(), [pages[0], pages[2], pages[3]]);
        let stats = l.stats();
        assert_eq!(
            (stats.maps, stats.unmaps, stats.splits, stats.entries),
            (4, 1, 0, 3),
            "exactly the discarded page went; nothing was mapped again"
        );
        assert_eq!(stats.mapped_bytes, 0x3000);
        assert_eq!(iommu.violations(), 0);
    }

    #[test]
    fn per_page_policy_checks_the_whole_populate_against_the_entry_limit() {
        let (iommu, l) = page_listener(None, Some(5));
        l.notify_populate(section(0x10000, 0x2000)).unwrap();
        // Four more pages would need 6 entries in all: refused up front,
        // without a single map sent.
        assert!(l.notify_populate(section(0x20000, 0x4000)).is_err());
        assert_eq!(iommu.mappings().len(), 2, "nothing of the refused run");
        assert_eq!((l.stats().refused, l.stats().maps), (1, 2));
        l.notify_populate(section(0x20000, 0x3000)).unwrap();
        assert_eq!(l.stats().entries, 5);
    }

    #[test]
    fn per_page_populate_counts_entries_reserved_by_a_prepared_discard() {
        let (iommu, l) = page_listener(None, Some(6));
        // Unconverted RAM is one mapping; a prepared discard in its middle
        // reserves the extra entry the split will need.
        l.populate_unconverted(section(0x10000, 0x3000)).unwrap();
        l.prepare_discard(section(0x11000, 0x1000)).unwrap();
        // 1 entry + 1 reserved + 5 pages > 6: refused before any map.
        assert!(l.notify_populate(section(0x40000, 0x5000)).is_err());
        assert_eq!(
            l.stats().maps,
            1,
            "no map was sent for the refused populate"
        );
        // 1 + 1 + 4 = 6: fits.
        l.notify_populate(section(0x40000, 0x4000)).unwrap();
        assert_eq!(l.stats().entries, 5);
        l.notify_discard(section(0x11000, 0x1000));
        assert_eq!(l.stats().entries, 6, "the split used the reserved entry");
        assert_eq!(iommu.violations(), 0);
    }

    #[test]
    fn a_per_page_populate_refused_part_way_takes_back_its_own_pages() {
        // The IOMMU holds 4 mappings: the third page of the second run fails.
        let (iommu, l) = page_listener(Some(4), None);
        l.notify_populate(section(0x10000, 0x2000)).unwrap();
        assert!(l.notify_populate(section(0x20000, 0x4000)).is_err());
        assert_eq!(
            iommu.mappings(),
            [section(0x10000, 0x1000), section(0x11000, 0x1000)]
        );
        let stats = l.stats();
        assert_eq!((stats.entries, stats.maps, stats.unmaps), (2, 4, 2));
        assert!(l.failure().is_none(), "a refusal is not a failure");
    }

    #[test]
    fn a_per_page_populate_whose_take_back_is_refused_fails_the_device_not_the_conversion() {
        // The third page is refused and so is the unmap that takes back the
        // first: the device keeps a page it was not given, so it goes, and
        // the conversion goes on without it.
        let iommu = Arc::new(FakeIommu::keeping_mappings_on_cut_off(Some(2)));
        let l = DmaMappingListener::with_policy(iommu.clone(), None, MappingPolicy::Pages);
        iommu.fail_next_unmaps(1);
        l.notify_populate(section(0x20000, 0x3000)).unwrap();
        let why = l.failure().unwrap();
        assert!(why.contains("unmap of 0x20000+0x1000 failed"), "{why}");
        assert!(iommu.is_cut_off());
        assert_eq!((l.stats().refused, l.stats().entries), (0, 0));
    }

    #[test]
    fn a_per_page_populate_whose_device_breaks_fails_the_device() {
        let (iommu, l) = page_listener(None, None);
        l.notify_populate(section(0x10000, 0x1000)).unwrap();
        iommu.break_on_next_call();
        l.notify_populate(section(0x20000, 0x2000)).unwrap();
        assert!(l.failure().is_some());
        assert!(
            iommu.mappings().is_empty(),
            "severed: the server dropped all"
        );
    }

    #[test]
    fn unconverted_ram_is_one_mapping_whatever_the_policy() {
        let (iommu, l) = page_listener(None, Some(2));
        l.populate_unconverted(section(0, 0x10_0000)).unwrap();
        assert_eq!(iommu.mappings(), [section(0, 0x10_0000)]);
        // A single page in per-page mode is one mapping too.
        l.notify_populate(section(0x20_0000, 0x1000)).unwrap();
        assert_eq!(l.stats().entries, 2);
    }

    #[test]
    fn a_run_is_one_mapping_and_an_exact_discard_unmaps_it() {
        let (iommu, l) = listener(None);
        l.notify_populate(section(0x10000, 0x4000)).unwrap();
        assert_eq!(iommu.mappings(), vec![section(0x10000, 0x4000)]);
        l.notify_discard(section(0x10000, 0x4000));
        assert!(iommu.mappings().is_empty());
        let stats = l.stats();
        assert_eq!((stats.maps, stats.unmaps, stats.splits), (1, 1, 0));
        assert_eq!(iommu.violations(), 0);
    }

    #[test]
    fn a_partial_discard_splits_without_a_partial_unmap() {
        let (iommu, l) = listener(None);
        l.notify_populate(section(0x10000, 0x4000)).unwrap();
        l.notify_discard(section(0x11000, 0x1000));
        assert_eq!(
            iommu.mappings(),
            vec![section(0x10000, 0x1000), section(0x12000, 0x2000)]
        );
        assert_eq!(l.mappings(), iommu.mappings());
        assert_eq!(l.stats().splits, 1);
        assert_eq!(iommu.violations(), 0);
    }

    #[test]
    fn a_discard_across_mappings_unmaps_each_whole() {
        let (iommu, l) = listener(None);
        populate(
            &l,
            &[(0x10000, 0x2000), (0x12000, 0x2000), (0x20000, 0x1000)],
        );
        l.notify_discard(section(0x11000, 0x2000));
        assert_eq!(
            iommu.mappings(),
            vec![
                section(0x10000, 0x1000),
                section(0x13000, 0x1000),
                section(0x20000, 0x1000)
            ]
        );
        assert_eq!(iommu.violations(), 0);
    }

    #[test]
    fn the_entry_limit_refuses_a_populate_and_maps_nothing() {
        let (iommu, l) = entry_limited(2);
        populate(&l, &[(0x1000, 0x1000), (0x3000, 0x1000)]);
        let err = l.notify_populate(section(0x5000, 0x1000)).unwrap_err();
        assert!(
            matches!(
                err,
                ListenerError::Map {
                    source: MapError::EntryLimit { limit: 2 },
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(iommu.mappings().len(), 2);
        assert_eq!(l.stats().refused, 1);
    }

    #[test]
    fn a_device_refusal_is_reported_and_nothing_is_held() {
        let (iommu, l) = listener(Some(1));
        l.notify_populate(section(0x1000, 0x1000)).unwrap();
        let err = l.notify_populate(section(0x3000, 0x1000)).unwrap_err();
        assert!(err.to_string().contains("0x3000+0x1000"), "{err}");
        assert!(
            matches!(
                &err,
                ListenerError::Map {
                    source: MapError::Device(DmaError::Refused(_)),
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(l.mappings(), vec![section(0x1000, 0x1000)]);
        assert_eq!(l.mappings(), iommu.mappings());
    }

    #[test]
    fn a_split_at_the_entry_limit_is_refused_before_anything_changes() {
        let (iommu, l) = entry_limited(2);
        populate(&l, &[(0x10000, 0x4000), (0x20000, 0x1000)]);
        let middle = section(0x11000, 0x1000);
        let err = l.prepare_discard(middle).unwrap_err();
        assert!(err.to_string().contains("would split"), "{err}");
        // An edge cut needs no extra entry.
        let edge = section(0x10000, 0x1000);
        l.prepare_discard(edge).unwrap();
        l.notify_discard(edge);
        assert_eq!(
            iommu.mappings(),
            vec![section(0x11000, 0x3000), section(0x20000, 0x1000)]
        );
        // With room, a prepared split holds its entry against populates.
        let roomy = DmaMappingListener::new(iommu.clone(), Some(3));
        populate(&roomy, &[(0x40000, 0x3000), (0x50000, 0x1000)]);
        roomy.prepare_discard(section(0x41000, 0x1000)).unwrap();
        assert!(roomy.notify_populate(section(0x60000, 0x1000)).is_err());
        roomy.notify_discard(section(0x41000, 0x1000));
        assert_eq!(roomy.stats().entries, 3);
        assert_eq!(roomy.stats().lost_remaps, 0);
    }

    #[test]
    fn unmap_all_leaves_the_device_empty() {
        let (iommu, l) = listener(None);
        populate(&l, &[(0x1000, 0x1000), (0x9000, 0x3000)]);
        assert_eq!(l.unmap_all(), 2);
        assert!(iommu.mappings().is_empty());
        assert_eq!(l.stats().entries, 0);
        assert_eq!(l.stats().mapped_bytes, 0);
    }

    fn failing_listener(iommu: &Arc<FakeIommu>) -> (DmaMappingListener, Arc<Mutex<Vec<String>>>) {
        let l = DmaMappingListener::new(iommu.clone(), None);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        l.set_failure_hook(Box::new(move |why| {
            sink.lock().unwrap().push(why.to_string())
        }));
        (l, seen)
    }

    #[test]
    fn a_connection_lost_during_a_map_fails_the_device_not_the_conversion() {
        let iommu = Arc::new(FakeIommu::new(None));
        let (l, seen) = failing_listener(&iommu);
        l.notify_populate(section(0x1000, 0x1000)).unwrap();
        iommu.break_on_next_call();
        l.notify_populate(section(0x3000, 0x1000)).unwrap();
        assert!(iommu.is_cut_off());
        assert!(iommu.mappings().is_empty(), "a severed server drops all");
        assert!(l.mappings().is_empty());
        assert_eq!(l.failure().as_deref(), Some("connection lost"));
        assert_eq!(*seen.lock().unwrap(), vec!["connection lost".to_string()]);
        let stats = l.stats();
        assert_eq!(
            (stats.entries, stats.mapped_bytes, stats.refused),
            (0, 0, 0)
        );
        // Detached: later conversions neither reach the device nor fail.
        l.notify_populate(section(0x9000, 0x1000)).unwrap();
        l.prepare_discard(section(0x9000, 0x1000)).unwrap();
        l.notify_discard(section(0x9000, 0x1000));
        assert_eq!(seen.lock().unwrap().len(), 1, "the hook runs once");
        assert_eq!(l.stats().maps, 1);
    }

    #[test]
    fn a_connection_lost_during_an_unmap_leaves_nothing_mapped() {
        let iommu = Arc::new(FakeIommu::new(None));
        let (l, seen) = failing_listener(&iommu);
        populate(&l, &[(0x1000, 0x1000), (0x5000, 0x2000)]);
        iommu.break_on_next_call();
        l.notify_discard(section(0x1000, 0x1000));
        assert!(iommu.is_cut_off());
        assert!(iommu.mappings().is_empty());
        assert!(l.mappings().is_empty());
        assert_eq!(l.stats().unmap_failures, 1);
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_refused_remap_after_a_split_fails_the_device() {
        for keeps in [false, true] {
            let iommu = Arc::new(if keeps {
                FakeIommu::keeping_mappings_on_cut_off(None)
            } else {
                FakeIommu::new(None)
            });
            let (l, seen) = failing_listener(&iommu);
            populate(&l, &[(0x10000, 0x4000), (0x20000, 0x1000)]);
            l.prepare_discard(section(0x11000, 0x1000)).unwrap();
            iommu.fail_next_maps(1);
            l.notify_discard(section(0x11000, 0x1000));
            // Either way the device is left with nothing: no surviving part
            // and no unrelated mapping.
            assert!(iommu.mappings().is_empty(), "keeps={keeps}");
            assert!(l.mappings().is_empty());
            assert_eq!(l.stats().lost_remaps, 1);
            let why = l.failure().unwrap();
            assert!(why.contains("0x10000+0x1000 after a split"), "{why}");
            assert_eq!(seen.lock().unwrap().len(), 1);
            assert_eq!(iommu.violations(), 0);
        }
    }

    #[test]
    fn a_cancelled_discard_gives_its_reserved_entry_back() {
        let (_, l) = entry_limited(2);
        l.notify_populate(section(0x10000, 0x4000)).unwrap();
        let middle = section(0x11000, 0x1000);
        l.prepare_discard(middle).unwrap();
        // The reservation holds the second entry against a populate.
        assert!(l.notify_populate(section(0x30000, 0x1000)).is_err());
        l.cancel_discard(middle);
        l.notify_populate(section(0x30000, 0x1000)).unwrap();
        assert_eq!(l.stats().entries, 2);
        // And with both entries in use, the split is refused again.
        assert!(l.prepare_discard(middle).is_err());
        assert_eq!(l.stats().refused, 2);
    }

    #[test]
    fn extra_entries_follow_the_split_shape() {
        let iommu = Arc::new(FakeIommu::new(None));
        let l = DmaMappingListener::new(iommu.clone(), None);
        populate(&l, &[(0x10000, 0x4000), (0x20000, 0x1000)]);
        let m = l.lock();
        // Head cut, tail cut, the whole mapping, and a range that starts
        // where a mapping ends: no extra entry.
        for edge in [
            section(0x10000, 0x1000),
            section(0x13000, 0x1000),
            section(0x10000, 0x4000),
            section(0x14000, 0x1000),
            section(0x21000, 0x1000),
        ] {
            assert_eq!(m.extra_entries(edge), 0, "{edge:?}");
        }
        // A cut strictly inside one mapping: one more entry.
        assert_eq!(m.extra_entries(section(0x11000, 0x2000)), 1);
        assert_eq!(m.extra_entries(section(0x12000, 0x1000)), 1);
    }

    /// A device whose map blocks until told to go on.
    struct StalledDevice {
        go: Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl ExternalDmaMapping for StalledDevice {
        fn map(&self, _: u64, _: u64, _: u64) -> Result<(), DmaError> {
            let _ = self.go.lock().unwrap().recv();
            Ok(())
        }
        fn unmap(&self, _: u64, _: u64) -> Result<(), DmaError> {
            Ok(())
        }
    }

    #[test]
    fn stats_never_wait_for_a_stalled_device() {
        let (go, wait) = std::sync::mpsc::channel();
        let l = Arc::new(DmaMappingListener::new(
            Arc::new(StalledDevice {
                go: Mutex::new(wait),
            }),
            None,
        ));
        let mapper = {
            let l = l.clone();
            std::thread::spawn(move || l.notify_populate(section(0x1000, 0x1000)))
        };
        // The mapper now holds the mappings lock inside the device call.
        while l.mappings.try_lock().is_ok() {
            std::thread::yield_now();
        }
        let started = std::time::Instant::now();
        assert_eq!(l.stats().entries, 0);
        assert_eq!(l.failure(), None);
        assert!(started.elapsed() < std::time::Duration::from_millis(100));
        go.send(()).unwrap();
        mapper.join().unwrap().unwrap();
        assert_eq!(l.stats().entries, 1);
    }

    #[test]
    fn an_unmap_the_device_refuses_fails_the_device() {
        let iommu = Arc::new(FakeIommu::keeping_mappings_on_cut_off(None));
        let (l, seen) = failing_listener(&iommu);
        populate(&l, &[(0x1000, 0x1000), (0x5000, 0x1000)]);
        // Refused twice: at the discard, and again when the failed device
        // is emptied.
        iommu.fail_next_unmaps(2);
        l.notify_discard(section(0x1000, 0x1000));
        let why = l.failure().unwrap();
        assert!(why.contains("unmap of 0x1000+0x1000 failed"), "{why}");
        assert_eq!(seen.lock().unwrap().len(), 1);
        // Everything else it held was unmapped on the way out.
        assert_eq!(iommu.mappings(), vec![section(0x1000, 0x1000)]);
        assert_eq!(l.stats().unmap_failures, 2);
        assert_eq!(l.stats().entries, 0);
    }

    fn counts(l: &DmaMappingListener) -> (u64, u64, u64, u64, u64) {
        let s = l.stats();
        (s.entries, s.mapped_bytes, s.maps, s.unmaps, s.splits)
    }

    #[test]
    fn counters_follow_every_map_unmap_and_split() {
        let (iommu, l) = listener(None);
        populate(&l, &[(0x10000, 0x4000), (0x20000, 0x2000)]);
        assert_eq!(counts(&l), (2, 0x6000, 2, 0, 0));
        // Starts exactly where the first mapping ends: touches nothing.
        l.notify_discard(section(0x14000, 0x1000));
        assert_eq!(counts(&l), (2, 0x6000, 2, 0, 0));
        // Cuts the first mapping in two.
        l.notify_discard(section(0x11000, 0x1000));
        assert_eq!(counts(&l), (3, 0x5000, 4, 1, 1));
        // Exactly the second mapping.
        l.notify_discard(section(0x20000, 0x2000));
        assert_eq!(counts(&l), (2, 0x3000, 4, 2, 1));
        assert_eq!(
            iommu.mappings(),
            vec![section(0x10000, 0x1000), section(0x12000, 0x2000)]
        );
        assert_eq!(l.stats().refused, 0);
        assert_eq!(l.stats().unmap_failures, 0);
    }

    #[test]
    fn two_prepared_splits_share_the_room_left() {
        let (iommu, l) = entry_limited(3);
        populate(&l, &[(0x10000, 0x4000), (0x20000, 0x4000)]);
        l.prepare_discard(section(0x11000, 0x1000)).unwrap();
        // One entry is left and the first split holds it.
        assert!(l.prepare_discard(section(0x21000, 0x1000)).is_err());
        l.notify_discard(section(0x11000, 0x1000));
        assert_eq!(l.stats().entries, 3);
        assert_eq!(l.stats().lost_remaps, 0);
        assert_eq!(iommu.violations(), 0);
    }
}
