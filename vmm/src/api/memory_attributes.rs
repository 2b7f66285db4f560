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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hypervisor::{Hypervisor, VmType};
    use serde_json::json;

    use super::*;
    use crate::memory::MemoryLayout;
    use crate::test_util::{convert, kvm};

    const MIB: u64 = 1 << 20;
    const HIGH: u64 = 1 << 32;

    /// 3 GiB below the MMIO hole and 64 MiB above it, with shared runs
    /// 16M+8K and 20M+4K below, 4G+1M+12K above; one refused conversion.
    fn two_regions() -> Option<Arc<MemoryManager>> {
        let vm = kvm()?.create_vm(VmType::Default).unwrap();
        let memory =
            Arc::new(MemoryManager::new(vm, (3 << 30) + 64 * MIB, MemoryLayout::Auto).unwrap());
        convert(&memory, 16 * MIB, 8192, true).unwrap();
        convert(&memory, 20 * MIB, 4096, true).unwrap();
        convert(&memory, HIGH + MIB, 3 * 4096, true).unwrap();
        convert(&memory, 24 * MIB + 1, 4096, true).unwrap_err();
        Some(memory)
    }

    fn ranges(answer: &Value) -> Vec<Vec<(u64, u64)>> {
        answer["regions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r["shared_ranges"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| (s["gpa"].as_u64().unwrap(), s["size"].as_u64().unwrap()))
                    .collect()
            })
            .collect()
    }

    fn window(gpa: u64, end: u64, limit: usize) -> AttributeWindow {
        AttributeWindow {
            gpa,
            size: end - gpa,
            limit,
        }
    }

    #[test]
    fn every_region_answers_with_its_shared_ranges_and_byte_counts() {
        let Some(memory) = two_regions() else { return };
        let answer = memory_attributes(&memory, AttributeWindow::default());
        assert_eq!(
            answer,
            json!({
                "granularity": 4096,
                "regions": [
                    {
                        "gpa": 0, "size": 3u64 << 30, "guest_memfd": true,
                        "shared_bytes": 3 * 4096, "private_bytes": (3u64 << 30) - 3 * 4096,
                        "shared_ranges": [
                            { "gpa": 16 * MIB, "size": 8192 },
                            { "gpa": 20 * MIB, "size": 4096 },
                        ],
                    },
                    {
                        "gpa": HIGH, "size": 64 * MIB, "guest_memfd": true,
                        "shared_bytes": 3 * 4096, "private_bytes": 64 * MIB - 3 * 4096,
                        "shared_ranges": [{ "gpa": HIGH + MIB, "size": 3 * 4096 }],
                    },
                ],
                "conversions": { "to_shared": 3, "to_private": 0, "failed": 1 },
            })
        );
    }

    #[test]
    fn an_unaligned_window_clips_the_ranges_at_both_ends() {
        let Some(memory) = two_regions() else { return };
        let answer = memory_attributes(&memory, window(16 * MIB + 100, HIGH + MIB + 5000, 10));
        assert_eq!(
            ranges(&answer),
            [
                vec![(16 * MIB + 100, 8192 - 100), (20 * MIB, 4096)],
                vec![(HIGH + MIB, 5000)],
            ]
        );
        assert!(answer.get("truncated").is_none());
        // A window in the upper region only, one below all RAM's shared
        // pages, one past all RAM.
        let upper = memory_attributes(&memory, window(HIGH, HIGH + 2 * MIB, 10));
        assert_eq!(ranges(&upper), [vec![], vec![(HIGH + MIB, 3 * 4096)]]);
        let below = memory_attributes(&memory, window(0, 16 * MIB, 10));
        assert_eq!(ranges(&below), [vec![], vec![]]);
        // An empty window inside a shared page has no range, not an empty
        // one.
        let empty = memory_attributes(&memory, window(16 * MIB + 100, 16 * MIB + 100, 10));
        assert_eq!(ranges(&empty), [vec![], vec![]]);
        let past = memory_attributes(&memory, window(HIGH + 64 * MIB, u64::MAX, 10));
        assert_eq!(ranges(&past), [vec![], vec![]]);
        // Byte counts are the regions' whole, whatever the window.
        assert_eq!(past["regions"][1]["shared_bytes"], 3 * 4096);
    }

    #[test]
    fn the_range_limit_ends_the_answer_with_where_to_go_on() {
        let Some(memory) = two_regions() else { return };
        // The limit reached at the end of the lower region: the marker is
        // the upper region's first range.
        let answer = memory_attributes(&memory, window(0, u64::MAX, 2));
        assert_eq!(
            ranges(&answer),
            [vec![(16 * MIB, 8192), (20 * MIB, 4096)], vec![]]
        );
        assert_eq!(answer["truncated"], true);
        assert_eq!(answer["next_gpa"], HIGH + MIB);
        // Inside the lower region, from a window starting mid-run: the
        // upper region is not looked at once the answer is full.
        let answer = memory_attributes(&memory, window(16 * MIB + 4096, u64::MAX, 1));
        assert_eq!(ranges(&answer), [vec![(16 * MIB + 4096, 4096)], vec![]]);
        assert_eq!(answer["next_gpa"], 20 * MIB);
        // Going on from the marker gives the rest.
        let rest = memory_attributes(&memory, window(20 * MIB, u64::MAX, 10));
        assert_eq!(
            ranges(&rest),
            [vec![(20 * MIB, 4096)], vec![(HIGH + MIB, 3 * 4096)]]
        );
        assert!(rest.get("next_gpa").is_none());
    }

    #[test]
    fn anonymous_ram_has_no_private_bytes_and_no_ranges() {
        let Some(hv) = kvm() else { return };
        let vm = hv.create_vm(VmType::Default).unwrap();
        let memory = MemoryManager::new(vm, 64 * MIB, MemoryLayout::Anonymous).unwrap();
        let answer = memory_attributes(&memory, AttributeWindow::default());
        assert_eq!(
            answer["regions"],
            json!([{
                "gpa": 0, "size": 64 * MIB, "guest_memfd": false,
                "shared_bytes": 0, "private_bytes": 0, "shared_ranges": [],
            }])
        );
    }
}
