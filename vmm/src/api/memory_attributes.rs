//! `GET /api/v1/vm.memory-attributes`: shared ranges per region, clipped to
//! an optional window and capped at `MAX_RANGES` with a continuation marker
//! (`truncated` + `next_gpa`), so the answer stays bounded for any guest.

use serde_json::{Value, json};

use crate::memory::{GRANULARITY, MemoryManager, Section};

/// Upper bound of ranges in one answer (about 3 MiB of JSON).
pub const MAX_RANGES: usize = 65536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttributeWindow {
    pub gpa: u64,
    pub size: u64,
    pub limit: usize,
}

impl Default for AttributeWindow {
    fn default() -> Self {
        AttributeWindow {
            gpa: 0,
            size: u64::MAX,
            limit: MAX_RANGES,
        }
    }
}

impl AttributeWindow {
    fn end(&self) -> u64 {
        self.gpa.saturating_add(self.size)
    }
}

pub fn memory_attributes(memory: &MemoryManager, window: AttributeWindow) -> Value {
    let mut budget = window.limit;
    let mut next_gpa: Option<u64> = None;
    let mut regions = Vec::new();
    for region in memory.regions() {
        let mut ranges = Vec::new();
        let (shared_bytes, attrs) = match &region.attributes {
            Some(a) => (a.shared_bytes(), Some(a)),
            None => (0, None),
        };
        let start = window.gpa.max(region.gpa);
        let end = window.end().min(region.gpa + region.size);
        if let (Some(attrs), true, None) = (attrs, start < end, next_gpa) {
            // Windows need not be page aligned; widen to pages, then clip.
            let first = start / GRANULARITY * GRANULARITY;
            let last = end.div_ceil(GRANULARITY) * GRANULARITY;
            let _ = attrs.replay_populated(first - region.gpa, last - first, |s: Section| {
                if budget == 0 {
                    next_gpa = Some(s.gpa.max(start));
                    return Err(());
                }
                budget -= 1;
                let gpa = s.gpa.max(start);
                ranges.push(json!({ "gpa": gpa, "size": s.end().min(end) - gpa }));
                Ok(())
            });
        }
        regions.push(json!({
            "gpa": region.gpa,
            "size": region.size,
            "guest_memfd": attrs.is_some(),
            "shared_bytes": shared_bytes,
            "private_bytes": if attrs.is_some() { region.size - shared_bytes } else { 0 },
            "shared_ranges": ranges,
        }));
    }
    let totals = memory.conversion_totals();
    let mut answer = json!({
        "granularity": GRANULARITY,
        "regions": regions,
        "conversions": {
            "to_shared": totals.to_shared,
            "to_private": totals.to_private,
            "failed": totals.failed,
        },
    });
    if let Some(next) = next_gpa {
        answer["truncated"] = json!(true);
        answer["next_gpa"] = json!(next);
    }
    answer
}
