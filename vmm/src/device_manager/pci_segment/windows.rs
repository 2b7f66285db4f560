//! BAR placement: first-fit, naturally aligned, in the 32-bit window of the
//! MMIO hole and the 64-bit window above RAM.

use std::collections::BTreeMap;

use super::{MMIO32_END, MMIO32_START};

/// First-fit placement of naturally aligned BARs in one window.
pub(super) struct Window {
    start: u64,
    end: u64,
    used: BTreeMap<u64, u64>,
}

impl Window {
    pub(super) fn new(start: u64, end: u64) -> Self {
        Window {
            start,
            end,
            used: BTreeMap::new(),
        }
    }

    pub(super) fn allocate(&mut self, size: u64) -> Option<u64> {
        let mut candidate = self.start.next_multiple_of(size);
        for (&base, &len) in &self.used {
            if candidate + size <= base {
                break;
            }
            candidate = candidate.max((base + len).next_multiple_of(size));
        }
        (candidate.checked_add(size)? <= self.end).then(|| {
            self.used.insert(candidate, size);
            candidate
        })
    }

    pub(super) fn free(&mut self, base: u64) {
        self.used.remove(&base);
    }
}

/// The 32- and 64-bit BAR windows of segment 0 for RAM ending at
/// `ram_end`: the 64-bit one starts at the first GiB boundary above RAM
/// and 4 GiB (what the ACPI host bridge's _CRS reports too).
pub fn bar_windows(ram_end: u64) -> (std::ops::Range<u64>, std::ops::Range<u64>) {
    (
        MMIO32_START..MMIO32_END,
        arch::layout::mmio64_window(ram_end),
    )
}
