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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use log::error;
use serde::Serialize;

use crate::discard_listener::{ListenerError, RamDiscardListener, Section};
use crate::dma_mapping::ExternalDmaMapping;

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
    /// Surviving parts of a split the device would not map again.
    pub lost_remaps: u64,
}

struct Mappings {
    /// IOVA -> size of every mapping made and not yet unmapped.
    by_iova: BTreeMap<u64, u64>,
    /// Entries promised to prepared discards (a split needs one more).
    reserved: u64,
    pending: Vec<(Section, u64)>,
    stats: DmaStats,
}

impl Mappings {
    /// Extra entries a discard of `section` needs: a mapping that extends
    /// past both ends of it leaves two survivors where it was one.
    fn extra_entries(&self, section: Section) -> u64 {
        self.by_iova
            .range(..section.gpa)
            .next_back()
            .is_some_and(|(&iova, &size)| iova < section.gpa && iova + size > section.end())
            .into()
    }

    fn release(&mut self, section: Section) {
        if let Some(i) = self.pending.iter().position(|(s, _)| *s == section) {
            let (_, extra) = self.pending.swap_remove(i);
            self.reserved -= extra;
        }
    }
}

pub struct DmaMappingListener {
    dma: Arc<dyn ExternalDmaMapping>,
    entry_limit: Option<u64>,
    mappings: Mutex<Mappings>,
}

impl DmaMappingListener {
    /// `entry_limit`: most mappings the IOMMU backend accepts, if bounded.
    pub fn new(dma: Arc<dyn ExternalDmaMapping>, entry_limit: Option<u64>) -> Self {
        DmaMappingListener {
            dma,
            entry_limit,
            mappings: Mutex::new(Mappings {
                by_iova: BTreeMap::new(),
                reserved: 0,
                pending: Vec::new(),
                stats: DmaStats::default(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Mappings> {
        self.mappings.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> DmaStats {
        self.lock().stats
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
        for &(iova, size) in &held {
            self.unmap_exact(&mut m, iova, size);
        }
        held.len()
    }

    fn map(&self, m: &mut Mappings, iova: u64, size: u64) -> std::io::Result<()> {
        if let Some(limit) = self.entry_limit
            && m.stats.entries + m.reserved >= limit
        {
            return Err(std::io::Error::other(format!(
                "DMA entry limit of {limit} mappings reached"
            )));
        }
        self.dma.map(iova, iova, size)?;
        m.by_iova.insert(iova, size);
        m.stats.entries += 1;
        m.stats.mapped_bytes += size;
        m.stats.maps += 1;
        Ok(())
    }

    fn unmap_exact(&self, m: &mut Mappings, iova: u64, size: u64) -> bool {
        if let Err(e) = self.dma.unmap(iova, size) {
            error!("DMA unmap of {iova:#x}+{size:#x} failed, the range may stay reachable: {e}");
            m.stats.unmap_failures += 1;
            return false;
        }
        m.by_iova.remove(&iova);
        m.stats.entries -= 1;
        m.stats.mapped_bytes -= size;
        m.stats.unmaps += 1;
        true
    }
}

impl RamDiscardListener for DmaMappingListener {
    fn notify_populate(&self, section: Section) -> Result<(), ListenerError> {
        let mut m = self.lock();
        self.map(&mut m, section.gpa, section.size).map_err(|e| {
            m.stats.refused += 1;
            ListenerError(format!(
                "DMA map of {:#x}+{:#x}: {e}",
                section.gpa, section.size
            ))
        })
    }

    fn prepare_discard(&self, section: Section) -> Result<(), ListenerError> {
        let mut m = self.lock();
        let extra = m.extra_entries(section);
        if let Some(limit) = self.entry_limit
            && m.stats.entries + m.reserved + extra > limit
        {
            m.stats.refused += 1;
            return Err(ListenerError(format!(
                "DMA entry limit of {limit} mappings reached: unmapping {:#x}+{:#x} would split a mapping",
                section.gpa, section.size
            )));
        }
        m.reserved += extra;
        m.pending.push((section, extra));
        Ok(())
    }

    fn cancel_discard(&self, section: Section) {
        self.lock().release(section);
    }

    fn notify_discard(&self, section: Section) {
        let mut m = self.lock();
        m.release(section);
        let overlapping: Vec<(u64, u64)> = m
            .by_iova
            .range(..section.end())
            .rev()
            .take_while(|&(&iova, &size)| iova + size > section.gpa)
            .map(|(&iova, &size)| (iova, size))
            .collect();
        for (iova, size) in overlapping {
            if !self.unmap_exact(&mut m, iova, size) {
                continue;
            }
            let mapping = Section { gpa: iova, size };
            let survivors = [
                Section {
                    gpa: iova,
                    size: section.gpa.saturating_sub(iova),
                },
                Section {
                    gpa: section.end(),
                    size: mapping.end().saturating_sub(section.end()),
                },
            ];
            let survivors: Vec<Section> = survivors.into_iter().filter(|s| s.size > 0).collect();
            if !survivors.is_empty() {
                m.stats.splits += 1;
            }
            for part in survivors {
                if let Err(e) = self.map(&mut m, part.gpa, part.size) {
                    error!(
                        "cannot map back {:#x}+{:#x} after a split, the device lost it: {e}",
                        part.gpa, part.size
                    );
                    m.stats.lost_remaps += 1;
                }
            }
        }
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
        l.notify_populate(section(0x10000, 0x2000)).unwrap();
        l.notify_populate(section(0x12000, 0x2000)).unwrap();
        l.notify_populate(section(0x20000, 0x1000)).unwrap();
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
        let iommu = Arc::new(FakeIommu::new(None));
        let l = DmaMappingListener::new(iommu.clone(), Some(2));
        l.notify_populate(section(0x1000, 0x1000)).unwrap();
        l.notify_populate(section(0x3000, 0x1000)).unwrap();
        let err = l.notify_populate(section(0x5000, 0x1000)).unwrap_err();
        assert!(err.0.contains("entry limit of 2"), "{err}");
        assert_eq!(iommu.mappings().len(), 2);
        assert_eq!(l.stats().refused, 1);
    }

    #[test]
    fn a_device_refusal_is_reported_and_nothing_is_held() {
        let (iommu, l) = listener(Some(1));
        l.notify_populate(section(0x1000, 0x1000)).unwrap();
        let err = l.notify_populate(section(0x3000, 0x1000)).unwrap_err();
        assert!(err.0.contains("0x3000+0x1000"), "{err}");
        assert_eq!(l.mappings(), vec![section(0x1000, 0x1000)]);
        assert_eq!(l.mappings(), iommu.mappings());
    }

    #[test]
    fn a_split_at_the_entry_limit_is_refused_before_anything_changes() {
        let iommu = Arc::new(FakeIommu::new(None));
        let l = DmaMappingListener::new(iommu.clone(), Some(2));
        l.notify_populate(section(0x10000, 0x4000)).unwrap();
        l.notify_populate(section(0x20000, 0x1000)).unwrap();
        let middle = section(0x11000, 0x1000);
        let err = l.prepare_discard(middle).unwrap_err();
        assert!(err.0.contains("would split"), "{err}");
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
        roomy.notify_populate(section(0x40000, 0x3000)).unwrap();
        roomy.notify_populate(section(0x50000, 0x1000)).unwrap();
        roomy.prepare_discard(section(0x41000, 0x1000)).unwrap();
        assert!(roomy.notify_populate(section(0x60000, 0x1000)).is_err());
        roomy.notify_discard(section(0x41000, 0x1000));
        assert_eq!(roomy.stats().entries, 3);
        assert_eq!(roomy.stats().lost_remaps, 0);
    }

    #[test]
    fn unmap_all_leaves_the_device_empty() {
        let (iommu, l) = listener(None);
        l.notify_populate(section(0x1000, 0x1000)).unwrap();
        l.notify_populate(section(0x9000, 0x3000)).unwrap();
        assert_eq!(l.unmap_all(), 2);
        assert!(iommu.mappings().is_empty());
        assert_eq!(l.stats().entries, 0);
        assert_eq!(l.stats().mapped_bytes, 0);
    }
}
