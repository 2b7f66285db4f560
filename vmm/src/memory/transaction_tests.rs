//! The transaction's phases, each dropped where it stands: what every
//! phase's `Drop` undoes, and that a committed one undoes nothing.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use hypervisor::HypervisorError;

use super::*;
use crate::memory::shared_bitmap::SharedBitmap;
use crate::memory::{
    ListenerError, NoPrivateAttributes, PrivateAttributes, RamDiscardListener, Section,
};

const PAGE: u64 = 4096;
const BASE: u64 = 0x1_0000_0000;
const PAGES: u64 = 32;

/// Per-page private attributes as KVM keeps them, refusing on request.
#[derive(Default)]
struct Attributes {
    private: Mutex<BTreeSet<u64>>,
    refuse: Mutex<bool>,
}

impl Attributes {
    fn private_pages(&self) -> BTreeSet<u64> {
        self.private.lock().unwrap().clone()
    }
}

struct SharedAttributes(Arc<Attributes>);

impl PrivateAttributes for SharedAttributes {
    fn tracked(&self) -> bool {
        true
    }

    fn set_private(&self, gpa: u64, size: u64, private: bool) -> Result<(), HypervisorError> {
        if *self.0.refuse.lock().unwrap() {
            return Err(HypervisorError::MemoryAttributesUnsupported);
        }
        let mut pages = self.0.private.lock().unwrap();
        for page in (gpa..gpa + size).step_by(arch::usize_from(PAGE)) {
            if private {
                pages.insert(page);
            } else {
                pages.remove(&page);
            }
        }
        Ok(())
    }
}

/// Mapped pages, reservations held, and a page it refuses to map.
#[derive(Default)]
struct Device {
    mapped: Mutex<BTreeSet<u64>>,
    reserved: Mutex<Vec<Section>>,
    refuse: Mutex<Option<u64>>,
}

impl RamDiscardListener for Device {
    fn notify_populate(&self, s: Section) -> Result<(), ListenerError> {
        if self
            .refuse
            .lock()
            .unwrap()
            .is_some_and(|p| s.gpa <= p && p < s.end())
        {
            return Err(ListenerError::Other("refused by the test".into()));
        }
        let mut mapped = self.mapped.lock().unwrap();
        for page in (s.gpa..s.end()).step_by(arch::usize_from(PAGE)) {
            assert!(mapped.insert(page), "{page:#x} mapped twice");
        }
        Ok(())
    }

    fn prepare_discard(&self, s: Section) -> Result<(), ListenerError> {
        self.reserved.lock().unwrap().push(s);
        Ok(())
    }

    fn cancel_discard(&self, s: Section) {
        let mut reserved = self.reserved.lock().unwrap();
        let at = reserved.iter().position(|r| *r == s).expect("reserved");
        reserved.remove(at);
    }

    fn notify_discard(&self, s: Section) {
        let mut reserved = self.reserved.lock().unwrap();
        if let Some(at) = reserved.iter().position(|r| *r == s) {
            reserved.remove(at);
        }
        let mut mapped = self.mapped.lock().unwrap();
        for page in (s.gpa..s.end()).step_by(arch::usize_from(PAGE)) {
            assert!(mapped.remove(&page), "{page:#x} unmapped but not mapped");
        }
    }
}

fn pages(first: u64, count: u64) -> BTreeSet<u64> {
    (first..first + count).map(|p| BASE + p * PAGE).collect()
}

struct Fixture {
    ram: ConvertibleRam,
    attributes: Arc<Attributes>,
    devices: Vec<Arc<Device>>,
}

/// `regions` back-to-back regions of `PAGES` pages at `BASE`, all private,
/// with one device on each.
fn fixture(regions: u64) -> Fixture {
    let attributes = Arc::new(Attributes::default());
    let ram = ConvertibleRam::new(
        Box::new(SharedAttributes(attributes.clone())),
        (0..regions)
            .map(|r| RamRegion::without_backing(BASE + r * PAGES * PAGE, PAGES * PAGE))
            .collect(),
    );
    attributes
        .private
        .lock()
        .unwrap()
        .extend(pages(0, regions * PAGES));
    let devices = ram
        .regions()
        .iter()
        .map(|region| {
            let device = Arc::new(Device::default());
            region
                .attributes
                .as_ref()
                .unwrap()
                .register_listener(
                    device.clone(),
                    Section {
                        gpa: region.gpa,
                        size: region.size,
                    },
                )
                .unwrap();
            device
        })
        .collect();
    Fixture {
        ram,
        attributes,
        devices,
    }
}

/// `fixture(regions)` with pages `first..first+count` converted to shared,
/// and its shared pages then.
fn fixture_sharing(regions: u64, first: u64, count: u64) -> (Fixture, BTreeSet<u64>) {
    let f = fixture(regions);
    f.convert(first, count, true).unwrap();
    let before = f.shared();
    (f, before)
}

impl Fixture {
    fn begin(&self, first: u64, count: u64, to_shared: bool) -> Transaction<'_, SharedBitmap> {
        let (gpa, size) = (BASE + first * PAGE, count * PAGE);
        let spans = self.ram.route(gpa, size).unwrap();
        Transaction::begin(&self.ram, gpa, size, to_shared, spans).unwrap()
    }

    /// A transaction taken through reserve and set_attributes.
    fn attributes_set(
        &self,
        first: u64,
        count: u64,
        to_shared: bool,
    ) -> Transaction<'_, SharedBitmap> {
        let mut tx = self.begin(first, count, to_shared);
        tx.reserve().unwrap();
        tx.set_attributes().unwrap();
        tx
    }

    fn convert(&self, first: u64, count: u64, to_shared: bool) -> Result<u64, ConversionFailure> {
        self.ram
            .convert(crate::test_util::conversion(
                BASE + first * PAGE,
                count * PAGE,
                to_shared,
            ))
            .map(|o| o.changed_pages)
    }

    fn shared(&self) -> BTreeSet<u64> {
        let mut shared = BTreeSet::new();
        for region in self.ram.regions() {
            region
                .attributes
                .as_ref()
                .unwrap()
                .replay_populated::<()>(0, region.size, |s| {
                    shared.extend((s.gpa..s.end()).step_by(arch::usize_from(PAGE)));
                    Ok(())
                })
                .unwrap();
        }
        shared
    }

    fn mapped(&self) -> BTreeSet<u64> {
        self.devices
            .iter()
            .flat_map(|d| d.mapped.lock().unwrap().clone())
            .collect()
    }

    fn reservations(&self) -> usize {
        self.devices
            .iter()
            .map(|d| d.reserved.lock().unwrap().len())
            .sum()
    }

    /// State, every device and the hypervisor agree that `shared` (and
    /// nothing else) is shared.
    fn assert_in_step(&self, shared: &BTreeSet<u64>) {
        assert_eq!(&self.shared(), shared, "state");
        assert_eq!(&self.mapped(), shared, "devices");
        let private = self.attributes.private_pages();
        assert!(shared.is_disjoint(&private), "a shared page is private");
        assert_eq!(
            private.len() + shared.len(),
            arch::usize_from(self.ram.regions().len() as u64 * PAGES)
        );
        assert_eq!(self.reservations(), 0, "reservations left");
    }
}

#[test]
fn a_to_shared_dropped_after_populating_unmaps_and_restores_the_attributes() {
    let (f, before) = fixture_sharing(1, 4, 2);
    let mut tx = f.attributes_set(0, 8, true);
    assert!(f.attributes.private_pages().is_disjoint(&pages(0, 8)));
    tx.notify().unwrap();
    assert_eq!(f.mapped(), pages(0, 8));
    drop(tx);
    f.assert_in_step(&before);
}

#[test]
fn a_to_shared_dropped_after_its_attributes_restores_them() {
    let f = fixture(1);
    let tx = f.attributes_set(0, 8, true);
    drop(tx);
    f.assert_in_step(&BTreeSet::new());
}

#[test]
fn a_to_private_dropped_while_reserved_cancels_every_reservation() {
    let (f, before) = fixture_sharing(2, PAGES - 4, 8);
    let mut tx = f.begin(PAGES - 4, 8, false);
    tx.reserve().unwrap();
    assert_eq!(f.reservations(), 2, "one shared run in each region");
    drop(tx);
    f.assert_in_step(&before);
}

#[test]
fn a_to_private_dropped_after_its_attributes_restores_them_and_cancels() {
    let (f, before) = fixture_sharing(1, 0, 8);
    let tx = f.attributes_set(2, 4, false);
    assert!(f.attributes.private_pages().is_superset(&pages(2, 4)));
    drop(tx);
    f.assert_in_step(&before);
}

fn run_to_commit(mut tx: Transaction<'_, SharedBitmap>) -> u64 {
    tx.reserve().unwrap();
    tx.set_attributes().unwrap();
    tx.notify().unwrap();
    tx.commit()
}

#[test]
fn a_committed_transaction_undoes_nothing() {
    let f = fixture(2);
    let changed = run_to_commit(f.begin(PAGES - 2, 4, true));
    assert_eq!(changed, 4);
    f.assert_in_step(&pages(PAGES - 2, 4));
    assert_eq!(run_to_commit(f.begin(PAGES - 1, 2, false)), 2);
    let mut left = pages(PAGES - 2, 4);
    left.retain(|p| !pages(PAGES - 1, 2).contains(p));
    f.assert_in_step(&left);
    let counters = f.ram.conversion_totals();
    assert_eq!((counters.to_shared, counters.to_private), (2, 2));
    assert_eq!(counters.failed, 0);
}

#[test]
fn a_refusal_in_the_second_region_rolls_back_the_first() {
    let f = fixture(2);
    *f.devices[1].refuse.lock().unwrap() = Some(BASE + (PAGES + 1) * PAGE);
    let err = f.convert(PAGES - 4, 8, true).unwrap_err();
    assert!(matches!(err, ConversionFailure::ListenerFailed(_)), "{err}");
    f.assert_in_step(&BTreeSet::new());
    assert_eq!(f.ram.conversion_totals().failed, 1);
    // The region that refused counted it.
    let second = f.ram.regions()[1].attributes.as_ref().unwrap().counters();
    assert_eq!(second.failed, 1);
}

#[test]
fn a_hypervisor_refusal_cancels_the_reservations_and_counts_once() {
    let (f, before) = fixture_sharing(2, PAGES - 4, 8);
    *f.attributes.refuse.lock().unwrap() = true;
    let err = f.convert(PAGES - 4, 8, false).unwrap_err();
    assert!(matches!(err, ConversionFailure::Hypervisor(_)), "{err}");
    let err = f.convert(0, 2, true).unwrap_err();
    assert!(matches!(err, ConversionFailure::Hypervisor(_)), "{err}");
    *f.attributes.refuse.lock().unwrap() = false;
    f.assert_in_step(&before);
    assert_eq!(f.ram.conversion_totals().failed, 2);
}

#[test]
fn to_shared_outside_ram_is_counted_and_changes_nothing() {
    let f = fixture(1);
    assert_eq!(f.ram.unbacked_to_shared(), 0);
    let outside = BASE + 2 * PAGES * PAGE;
    for _ in 0..2 {
        let done = f
            .ram
            .convert(crate::test_util::conversion(outside, PAGE, true))
            .unwrap();
        assert_eq!(done.changed_pages, 0);
    }
    assert_eq!(f.ram.unbacked_to_shared(), 2);
    // To-private there, and a range only partly RAM, are refused.
    assert!(
        f.ram
            .convert(crate::test_util::conversion(outside, PAGE, false))
            .is_err()
    );
    let straddling = BASE + (PAGES - 1) * PAGE;
    assert!(
        f.ram
            .convert(crate::test_util::conversion(straddling, 2 * PAGE, true))
            .is_err()
    );
    assert_eq!(f.ram.conversion_totals().failed, 2);
    f.assert_in_step(&BTreeSet::new());
}

#[test]
fn a_hypervisor_without_attributes_is_never_asked_for_them() {
    let ram: ConvertibleRam = ConvertibleRam::without_backing(BASE, PAGES * PAGE);
    ram.convert(crate::test_util::conversion(BASE, PAGE, true))
        .expect("no attribute call on a hypervisor that keeps none");
    assert!(!NoPrivateAttributes.tracked());
    assert!(NoPrivateAttributes.set_private(BASE, PAGE, true).is_err());
}
