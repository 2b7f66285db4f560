//! What a RamBlockAttribute needs from its per-page state store. Two stores
//! implement it: `SharedBitmap` (ours: sparse chunks, the one the VMM
//! uses) and `FlatBitmap` (one bit per page with QEMU's notification
//! algorithm: the baseline of `benches/state_tracking.rs`, so the two are
//! compared behind the same lock, validation and listener calls).

pub trait PageStates: Send + Sync + 'static {
    /// `pages` pages, all private.
    fn with_pages(pages: u64) -> Self;
    fn pages(&self) -> u64;
    fn shared_pages(&self) -> u64;
    fn heap_bytes(&self) -> usize;
    /// True iff every page of `start..start+count` is in state `shared`.
    fn all_in_state(&self, start: u64, count: u64, shared: bool) -> bool;
    /// Each maximal run of pages in state `shared` inside
    /// `start..start+count`, ascending, stopping at the first error.
    fn for_each_run<E>(
        &self,
        start: u64,
        count: u64,
        shared: bool,
        f: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), E>;
    /// The pieces a change of `start..start+count` notifies listeners of:
    /// the pages in state `shared` there. By default one per maximal run.
    fn for_each_change<E>(
        &self,
        start: u64,
        count: u64,
        shared: bool,
        f: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        self.for_each_run(start, count, shared, f)
    }
    /// Sets `start..start+count` to `shared`; returns how many pages changed.
    fn set_range(&mut self, start: u64, count: u64, shared: bool) -> u64;
}

const WORD_BITS: u64 = 64;

/// One bit per page, as QEMU keeps it: 32 MiB per TiB whatever the state.
/// A change notifies a uniform range once and a mixed one page by page
/// (QEMU's algorithm); replays walk maximal runs.
pub struct FlatBitmap {
    pages: u64,
    words: Vec<u64>,
    shared_pages: u64,
}

impl FlatBitmap {
    fn bit(&self, page: u64) -> bool {
        self.words[(page / WORD_BITS) as usize] & (1 << (page % WORD_BITS)) != 0
    }

    /// First page in `from..end` in state `shared`.
    fn next_in_state(&self, from: u64, end: u64, shared: bool) -> Option<u64> {
        super::shared_bitmap::next_bit(&self.words, from, end, shared)
    }
}

impl PageStates for FlatBitmap {
    fn with_pages(pages: u64) -> Self {
        FlatBitmap {
            pages,
            words: vec![0; arch::usize_from(pages.div_ceil(WORD_BITS))],
            shared_pages: 0,
        }
    }
    fn pages(&self) -> u64 {
        self.pages
    }
    fn shared_pages(&self) -> u64 {
        self.shared_pages
    }
    fn heap_bytes(&self) -> usize {
        self.words.capacity() * 8
    }
    fn all_in_state(&self, start: u64, count: u64, shared: bool) -> bool {
        self.next_in_state(start, start + count, !shared).is_none()
    }
    fn for_each_run<E>(
        &self,
        start: u64,
        count: u64,
        shared: bool,
        mut f: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        let end = start.saturating_add(count).min(self.pages);
        let mut page = start;
        while let Some(run_start) = self.next_in_state(page, end, shared) {
            let run_end = self.next_in_state(run_start, end, !shared).unwrap_or(end);
            f(run_start, run_end - run_start)?;
            page = run_end;
        }
        Ok(())
    }
    fn for_each_change<E>(
        &self,
        start: u64,
        count: u64,
        shared: bool,
        mut f: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.all_in_state(start, count, shared) {
            return f(start, count);
        }
        for page in start..start + count {
            if self.bit(page) == shared {
                f(page, 1)?;
            }
        }
        Ok(())
    }
    fn set_range(&mut self, start: u64, count: u64, shared: bool) -> u64 {
        // Word by word, as QEMU's bitmap_set / bitmap_clear.
        let changed = super::shared_bitmap::set_bits(&mut self.words, start, start + count, shared);
        if shared {
            self.shared_pages += changed;
        } else {
            self.shared_pages -= changed;
        }
        changed
    }
}

/// What the stores' walks report, collected, for the tests of both stores.
#[cfg(test)]
pub(super) mod test_util {
    use super::PageStates;

    /// A walk's callback that appends every `(start, count)` to `out`.
    fn push_to(out: &mut Vec<(u64, u64)>) -> impl FnMut(u64, u64) -> Result<(), ()> + '_ {
        |a, n| {
            out.push((a, n));
            Ok(())
        }
    }

    /// The pieces `for_each_change` notifies.
    pub fn changes<S: PageStates>(s: &S, start: u64, count: u64, shared: bool) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        s.for_each_change(start, count, shared, push_to(&mut out))
            .unwrap();
        out
    }

    /// A xorshift64 generator from `seed`: each call gives a number below
    /// its argument, the same sequence every run.
    pub fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        }
    }

    /// The runs `for_each_run` reports.
    pub fn runs<S: PageStates>(s: &S, start: u64, count: u64, shared: bool) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        s.for_each_run(start, count, shared, push_to(&mut out))
            .unwrap();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::{changes, runs};
    use super::*;
    use crate::memory::shared_bitmap::SharedBitmap;

    #[test]
    fn both_stores_agree_and_the_flat_one_notifies_mixed_ranges_page_by_page() {
        let mut flat = FlatBitmap::with_pages(300);
        let mut ours = SharedBitmap::with_pages(300);
        for (start, count, shared) in [
            (10, 100, true),
            (50, 3, false),
            (200, 99, true),
            (60, 1, false),
        ] {
            assert_eq!(
                flat.set_range(start, count, shared),
                ours.set_range(start, count, shared)
            );
        }
        assert_eq!(flat.shared_pages(), ours.shared_pages());
        assert_eq!(runs(&flat, 0, 300, true), runs(&ours, 0, 300, true));
        assert_eq!(runs(&flat, 0, 300, false), runs(&ours, 0, 300, false));
        // A uniform range: one notification from both.
        assert_eq!(changes(&flat, 10, 40, true), vec![(10, 40)]);
        assert_eq!(changes(&ours, 10, 40, true), vec![(10, 40)]);
        // A mixed range: QEMU's per page, ours per run.
        assert_eq!(
            changes(&flat, 48, 7, false),
            vec![(50, 1), (51, 1), (52, 1)]
        );
        assert_eq!(changes(&ours, 48, 7, false), vec![(50, 3)]);
        assert!(flat.all_in_state(200, 99, true));
        assert!(!flat.all_in_state(199, 2, true));
        assert_eq!(flat.heap_bytes(), 5 * 8);
    }

    #[test]
    fn a_region_of_whole_words_is_walked_to_its_end_and_no_further() {
        // 128 pages: the last word ends exactly at the region's end.
        let mut flat = FlatBitmap::with_pages(128);
        assert_eq!(flat.pages(), 128);
        assert!(flat.all_in_state(0, 128, false));
        assert_eq!(runs(&flat, 0, 128, false), vec![(0, 128)]);
        assert_eq!(runs(&flat, 0, 128, true), vec![]);
        flat.set_range(64, 64, true);
        assert!(flat.all_in_state(64, 64, true));
        assert_eq!(runs(&flat, 0, 128, true), vec![(64, 64)]);
        assert_eq!(changes(&flat, 64, 64, true), vec![(64, 64)]);
    }

    #[test]
    fn runs_agree_between_the_stores_on_random_patterns_and_windows() {
        use crate::memory::shared_bitmap::CHUNK_PAGES;
        let pages = 2 * CHUNK_PAGES + 300;
        let mut flat = FlatBitmap::with_pages(pages);
        let mut ours = SharedBitmap::with_pages(pages);
        let mut next = test_util::xorshift(0x1234_5678_9abc_def1);
        for round in 0..300 {
            let start = next(pages);
            let count =
                (next(if round % 3 == 0 { CHUNK_PAGES } else { 200 }) + 1).min(pages - start);
            let shared = next(2) == 0;
            assert_eq!(
                flat.set_range(start, count, shared),
                ours.set_range(start, count, shared)
            );
            let (ws, wc) = (next(pages), next(pages));
            let wc = wc.min(pages - ws);
            for state in [true, false] {
                assert_eq!(
                    runs(&flat, ws, wc, state),
                    runs(&ours, ws, wc, state),
                    "round {round}: window {ws}+{wc} state {state}"
                );
            }
        }
    }
}
