//! A conversion's maps and unmaps at one device, as batches: every request
//! the conversion needs goes to the device at once (`start_batch`), the
//! listener's lock held from the first request to the last reply, and the
//! outcome is settled from the replies. A populate the device refuses in
//! part takes back what it did map, so a refused populate holds nothing; a
//! device that breaks, fails an unmap or will not map back the surviving
//! parts of a split is failed and cut off, and the conversion goes on.

use super::*;

/// Why an unmap failing fails the device, as its reason reads.
fn unmap_failure(iova: u64, size: u64, e: DmaError) -> String {
    match e {
        DmaError::Broken(why) => why.to_string(),
        // The device keeps a page it must not: it cannot stay live.
        DmaError::Refused(e) => {
            format!("DMA unmap of {iova:#x}+{size:#x} failed, the range may stay reachable: {e}")
        }
    }
}

/// The maps a populate makes, and the section each is for.
struct Plan {
    maps: Vec<DmaOp>,
    sections: Vec<Section>,
}

impl Plan {
    fn push(&mut self, section: Section, iova: u64, size: u64) {
        self.maps.push(DmaOp::Map {
            iova,
            gpa: iova,
            size,
        });
        self.sections.push(section);
    }
}

impl Mappings {
    fn record_map(&mut self, iova: u64, size: u64) {
        self.by_iova.insert(iova, size);
        self.stats.entries += 1;
        self.stats.mapped_bytes += size;
        self.stats.maps += 1;
    }
}

impl DmaMappingListener {
    /// The maps a populate of `sections` makes under `policy` (per page:
    /// one per 4 KiB page of a section larger than a page), or the first
    /// section that would take more entries than the limit allows.
    fn plan_populate(
        &self,
        m: &Mappings,
        sections: &[Section],
        policy: MappingPolicy,
    ) -> Result<Plan, (Section, MapError)> {
        let mut plan = Plan {
            maps: Vec::with_capacity(sections.len()),
            sections: Vec::with_capacity(sections.len()),
        };
        let mut used = m.stats.entries + m.reserved;
        for &section in sections {
            if policy == MappingPolicy::Pages && section.size > PAGE_SIZE {
                // Sections are page-aligned (the RamBlockAttribute's granularity).
                let pages = section.size.div_ceil(PAGE_SIZE);
                if let Some(limit) = self.entry_limit
                    && used + pages > limit
                {
                    return Err((section, MapError::PagesPastLimit { limit, pages }));
                }
                for page in 0..pages {
                    plan.push(section, section.gpa + page * PAGE_SIZE, PAGE_SIZE);
                }
                used += pages;
            } else {
                if let Some(limit) = self.entry_limit
                    && used >= limit
                {
                    return Err((section, MapError::EntryLimit { limit }));
                }
                plan.push(section, section.gpa, section.size);
                used += 1;
            }
        }
        Ok(plan)
    }

    /// Starts mapping every one of `sections` under `policy`.
    pub(super) fn start_populate_as(
        &self,
        sections: &[Section],
        policy: MappingPolicy,
    ) -> Started<'_> {
        let mut m = self.lock();
        if m.failure.is_some() || sections.is_empty() {
            return Started::Done(Ok(()));
        }
        let plan = match self.plan_populate(&m, sections, policy) {
            Ok(plan) => plan,
            Err((section, source)) => {
                m.stats.refused += 1;
                self.publish(&m);
                return Started::Done(Err((
                    section,
                    ListenerError::Map {
                        gpa: section.gpa,
                        size: section.size,
                        source,
                    },
                )));
            }
        };
        let batch = self.dma.start_batch(&plan.maps);
        Started::InFlight(Box::new(move || {
            let results = batch.finish();
            let outcome = self.settle_populate(&mut m, &plan, results);
            self.publish(&m);
            outcome
        }))
    }

    fn settle_populate(
        &self,
        m: &mut Mappings,
        plan: &Plan,
        results: Vec<Result<(), DmaError>>,
    ) -> Result<(), (Section, ListenerError)> {
        let mut made = Vec::new();
        let mut refused: Option<(Section, DmaError)> = None;
        let mut broken: Option<DmaError> = None;
        for ((&op, &section), result) in plan.maps.iter().zip(&plan.sections).zip(results) {
            let DmaOp::Map { iova, size, .. } = op else {
                continue;
            };
            match result {
                Ok(()) => {
                    m.record_map(iova, size);
                    made.push((iova, size));
                }
                Err(e) if e.is_broken() => {
                    broken.get_or_insert(e);
                }
                Err(e) => {
                    refused.get_or_insert((section, e));
                }
            }
        }
        if let Some(why) = broken {
            // A failed device no longer takes part; the conversion goes on.
            self.fail(m, why.to_string());
            return Ok(());
        }
        let Some((section, e)) = refused else {
            return Ok(());
        };
        // Taking back what was mapped; if that fails, the device is failed
        // and the conversion goes on without it.
        if !self.unmap_batch(m, &made) {
            return Ok(());
        }
        m.stats.refused += 1;
        Err((
            section,
            ListenerError::Map {
                gpa: section.gpa,
                size: section.size,
                source: MapError::Device(e),
            },
        ))
    }

    /// Unmaps exactly `mappings`, all at once. A failure fails the device;
    /// returns whether every unmap went.
    pub(super) fn unmap_batch(&self, m: &mut Mappings, mappings: &[(u64, u64)]) -> bool {
        if mappings.is_empty() {
            return true;
        }
        let ops: Vec<DmaOp> = mappings
            .iter()
            .map(|&(iova, size)| DmaOp::Unmap { iova, size })
            .collect();
        let results = self.dma.start_batch(&ops).finish();
        self.settle_unmaps(m, mappings, results)
    }

    fn settle_unmaps(
        &self,
        m: &mut Mappings,
        mappings: &[(u64, u64)],
        results: Vec<Result<(), DmaError>>,
    ) -> bool {
        let mut failure = None;
        for (&(iova, size), result) in mappings.iter().zip(results) {
            match result {
                Ok(()) => {
                    m.by_iova.remove(&iova);
                    m.stats.entries -= 1;
                    m.stats.mapped_bytes -= size;
                    m.stats.unmaps += 1;
                }
                Err(e) if failure.is_none() => failure = Some((iova, size, e)),
                Err(_) => {}
            }
        }
        let Some((iova, size, e)) = failure else {
            return true;
        };
        m.stats.unmap_failures += 1;
        self.fail(m, unmap_failure(iova, size, e));
        false
    }

    /// Starts unmapping every mapping `sections` cut; the parts of them
    /// outside `sections` stay shared and are mapped back once the unmaps
    /// are done (a split).
    pub(super) fn start_discard_batch(&self, sections: &[Section]) -> Started<'_> {
        let mut m = self.lock();
        for &section in sections {
            m.release(section);
        }
        if m.failure.is_some() {
            self.publish(&m);
            return Started::Done(Ok(()));
        }
        let mut cut: Vec<(u64, u64)> = Vec::new();
        let mut survivors: Vec<Section> = Vec::new();
        let mut splits = 0;
        for &section in sections {
            let overlapping = m
                .by_iova
                .range(..section.end())
                .rev()
                .take_while(|&(&iova, &size)| iova + size > section.gpa)
                .map(|(&iova, &size)| (iova, size));
            for (iova, size) in overlapping {
                cut.push((iova, size));
                let parts = [
                    Section {
                        gpa: iova,
                        size: section.gpa.saturating_sub(iova),
                    },
                    Section {
                        gpa: section.end(),
                        size: (iova + size).saturating_sub(section.end()),
                    },
                ];
                let before = survivors.len();
                survivors.extend(parts.into_iter().filter(|p| p.size > 0));
                splits += u64::from(survivors.len() > before);
            }
        }
        if cut.is_empty() {
            return Started::Done(Ok(()));
        }
        // Ascending, so back-to-back mappings can go as one unmap where the
        // device allows it.
        cut.sort_unstable();
        let ops: Vec<DmaOp> = cut
            .iter()
            .map(|&(iova, size)| DmaOp::Unmap { iova, size })
            .collect();
        let batch = self.dma.start_batch(&ops);
        Started::InFlight(Box::new(move || {
            let results = batch.finish();
            if self.settle_unmaps(&mut m, &cut, results) && self.map_back(&mut m, &survivors) {
                m.stats.splits += splits;
            }
            self.publish(&m);
            Ok(())
        }))
    }

    /// Maps back the surviving parts of split mappings, all at once. A part
    /// that cannot be mapped is still shared: a live device without it
    /// would break the guest's view, so the device goes.
    fn map_back(&self, m: &mut Mappings, survivors: &[Section]) -> bool {
        if survivors.is_empty() {
            return true;
        }
        if let Some(limit) = self.entry_limit
            && m.stats.entries + m.reserved + survivors.len() as u64 > limit
        {
            self.lose_remap(m, survivors[0], MapError::EntryLimit { limit });
            return false;
        }
        let ops: Vec<DmaOp> = survivors
            .iter()
            .map(|p| DmaOp::Map {
                iova: p.gpa,
                gpa: p.gpa,
                size: p.size,
            })
            .collect();
        let results = self.dma.start_batch(&ops).finish();
        let mut lost = None;
        for (part, result) in survivors.iter().zip(results) {
            match result {
                Ok(()) => m.record_map(part.gpa, part.size),
                Err(e) if lost.is_none() => lost = Some((*part, e)),
                Err(_) => {}
            }
        }
        let Some((part, e)) = lost else {
            return true;
        };
        self.lose_remap(m, part, MapError::Device(e));
        false
    }

    /// A surviving part of a split that could not be mapped back fails the
    /// device.
    fn lose_remap(&self, m: &mut Mappings, part: Section, cause: MapError) {
        m.stats.lost_remaps += 1;
        self.fail(
            m,
            format!(
                "cannot map back {:#x}+{:#x} after a split: {cause}",
                part.gpa, part.size
            ),
        );
    }
}

#[cfg(test)]
mod tests;
