//! Shared/private state of every 4 KiB page of one region, stored sparsely:
//! the region is cut into chunks of `CHUNK_PAGES` pages, and a chunk whose
//! pages are all in one state costs 16 bytes instead of its 4 KiB of bits.
//!
//! Memory: 16 bytes per chunk plus 4 KiB per mixed chunk, so a 1 TiB region
//! needs 128 KiB when uniform and at most 32 MiB + 128 KiB when every chunk is
//! fragmented. Run iteration costs O(chunks + words of the mixed chunks it
//! crosses), never O(pages).

const WORD_BITS: u64 = 64;
pub const CHUNK_PAGES: u64 = 32 * 1024;
const CHUNK_WORDS: usize = (CHUNK_PAGES / WORD_BITS) as usize;

type Words = Box<[u64; CHUNK_WORDS]>;

enum Chunk {
    Private,
    Shared,
    Mixed(Words),
}

pub struct SharedBitmap {
    pages: u64,
    chunks: Vec<Chunk>,
    shared_pages: u64,
}

/// Bits `from..to` (0..=64) of a word set.
fn word_mask(from: u64, to: u64) -> u64 {
    let high = if to >= WORD_BITS {
        u64::MAX
    } else {
        (1u64 << to) - 1
    };
    high & !((1u64 << from) - 1)
}

impl SharedBitmap {
    /// All pages private.
    pub fn new(pages: u64) -> Self {
        let chunks = pages.div_ceil(CHUNK_PAGES);
        SharedBitmap {
            pages,
            chunks: (0..chunks).map(|_| Chunk::Private).collect(),
            shared_pages: 0,
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn shared_pages(&self) -> u64 {
        self.shared_pages
    }

    /// Bytes of heap this bitmap holds (for tests and docs).
    pub fn heap_bytes(&self) -> usize {
        let mixed = self
            .chunks
            .iter()
            .filter(|c| matches!(c, Chunk::Mixed(_)))
            .count();
        self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + mixed * std::mem::size_of::<[u64; CHUNK_WORDS]>()
    }

    fn chunk_len(&self, index: u64) -> u64 {
        (self.pages - index * CHUNK_PAGES).min(CHUNK_PAGES)
    }

    pub fn is_shared(&self, page: u64) -> bool {
        debug_assert!(page < self.pages);
        match &self.chunks[(page / CHUNK_PAGES) as usize] {
            Chunk::Private => false,
            Chunk::Shared => true,
            Chunk::Mixed(words) => {
                let bit = page % CHUNK_PAGES;
                words[(bit / WORD_BITS) as usize] & (1 << (bit % WORD_BITS)) != 0
            }
        }
    }

    /// First page in `from..end` whose state is `shared`, if any.
    pub fn next_in_state(&self, from: u64, end: u64, shared: bool) -> Option<u64> {
        let end = end.min(self.pages);
        let mut page = from;
        while page < end {
            let index = page / CHUNK_PAGES;
            let chunk_start = index * CHUNK_PAGES;
            let chunk_end = (chunk_start + CHUNK_PAGES).min(end);
            match &self.chunks[index as usize] {
                Chunk::Private if !shared => return Some(page),
                Chunk::Shared if shared => return Some(page),
                Chunk::Private | Chunk::Shared => {}
                Chunk::Mixed(words) => {
                    let mut bit = page - chunk_start;
                    let last = chunk_end - chunk_start;
                    while bit < last {
                        let w = (bit / WORD_BITS) as usize;
                        let raw = if shared { words[w] } else { !words[w] };
                        let hits = raw & word_mask(bit % WORD_BITS, WORD_BITS);
                        if hits != 0 {
                            let found = w as u64 * WORD_BITS + u64::from(hits.trailing_zeros());
                            return (found < last).then_some(chunk_start + found);
                        }
                        bit = (w as u64 + 1) * WORD_BITS;
                    }
                }
            }
            page = chunk_end;
        }
        None
    }

    /// Calls `f(first_page, page_count)` for each maximal run of pages in
    /// state `shared` inside `start..start+count`, in ascending order,
    /// stopping at the first error.
    pub fn for_each_run<E>(
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

    /// True iff every page of `start..start+count` is in state `shared`.
    pub fn all_in_state(&self, start: u64, count: u64, shared: bool) -> bool {
        self.next_in_state(start, start + count, !shared).is_none()
    }

    fn chunk_shared_count(&self, index: u64) -> u64 {
        match &self.chunks[index as usize] {
            Chunk::Private => 0,
            Chunk::Shared => self.chunk_len(index),
            Chunk::Mixed(words) => words.iter().map(|w| u64::from(w.count_ones())).sum(),
        }
    }

    /// Sets `start..start+count` to `shared`; returns how many pages changed.
    pub fn set_range(&mut self, start: u64, count: u64, shared: bool) -> u64 {
        let end = start + count;
        debug_assert!(end <= self.pages);
        let before = self.shared_pages;
        let mut page = start;
        while page < end {
            let index = page / CHUNK_PAGES;
            let chunk_start = index * CHUNK_PAGES;
            let len = self.chunk_len(index);
            let from = page - chunk_start;
            let to = (end - chunk_start).min(len);
            let old = self.chunk_shared_count(index);
            let chunk = &mut self.chunks[index as usize];
            if from == 0 && to == len {
                *chunk = if shared {
                    Chunk::Shared
                } else {
                    Chunk::Private
                };
            } else {
                Self::set_bits(chunk, from, to, shared, len);
            }
            let new = self.chunk_shared_count(index);
            self.shared_pages = self.shared_pages - old + new;
            page = chunk_start + to;
        }
        self.shared_pages.abs_diff(before)
    }

    fn set_bits(chunk: &mut Chunk, from: u64, to: u64, shared: bool, len: u64) {
        let mut words = match std::mem::replace(chunk, Chunk::Private) {
            Chunk::Mixed(words) => words,
            Chunk::Private => Box::new([0u64; CHUNK_WORDS]),
            Chunk::Shared => {
                let mut w = Box::new([0u64; CHUNK_WORDS]);
                Self::fill(&mut w, 0, len, true);
                w
            }
        };
        Self::fill(&mut words, from, to, shared);
        let shared_count: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        *chunk = match shared_count {
            0 => Chunk::Private,
            n if n == len => Chunk::Shared,
            _ => Chunk::Mixed(words),
        };
    }

    fn fill(words: &mut [u64; CHUNK_WORDS], from: u64, to: u64, shared: bool) {
        let mut bit = from;
        while bit < to {
            let w = (bit / WORD_BITS) as usize;
            let word_end = ((w as u64 + 1) * WORD_BITS).min(to);
            let mask = word_mask(bit % WORD_BITS, word_end - w as u64 * WORD_BITS);
            if shared {
                words[w] |= mask;
            } else {
                words[w] &= !mask;
            }
            bit = word_end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(b: &SharedBitmap, start: u64, count: u64, shared: bool) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        b.for_each_run::<()>(start, count, shared, |s, n| {
            out.push((s, n));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn starts_private() {
        let b = SharedBitmap::new(100);
        assert_eq!(runs(&b, 0, 100, true), vec![]);
        assert_eq!(runs(&b, 0, 100, false), vec![(0, 100)]);
        assert_eq!(b.shared_pages(), 0);
    }

    #[test]
    fn runs_merge_across_words_and_chunks() {
        let mut b = SharedBitmap::new(3 * CHUNK_PAGES + 7);
        assert_eq!(b.set_range(CHUNK_PAGES - 70, 200, true), 200);
        assert_eq!(runs(&b, 0, b.pages(), true), vec![(CHUNK_PAGES - 70, 200)]);
        assert_eq!(b.set_range(CHUNK_PAGES - 70, 200, true), 0, "no-op");
        b.set_range(CHUNK_PAGES, 1, false);
        assert_eq!(
            runs(&b, 0, b.pages(), true),
            vec![(CHUNK_PAGES - 70, 70), (CHUNK_PAGES + 1, 129)]
        );
        // Clipping.
        assert_eq!(
            runs(&b, CHUNK_PAGES + 10, 5, true),
            vec![(CHUNK_PAGES + 10, 5)]
        );
        assert_eq!(b.shared_pages(), 199);
    }

    #[test]
    fn whole_and_partial_last_chunk() {
        let pages = 2 * CHUNK_PAGES + 5;
        let mut b = SharedBitmap::new(pages);
        b.set_range(0, pages, true);
        assert!(b.all_in_state(0, pages, true));
        assert_eq!(b.heap_bytes(), 3 * 16, "uniform chunks hold no words");
        b.set_range(pages - 1, 1, false);
        assert_eq!(runs(&b, 0, pages, false), vec![(pages - 1, 1)]);
        b.set_range(pages - 1, 1, true);
        assert_eq!(b.heap_bytes(), 3 * 16, "collapsed back to uniform");
        assert_eq!(b.shared_pages(), pages);
    }

    #[test]
    fn sixteen_tib_without_overflow() {
        let pages = (16u64 << 40) / 4096;
        let mut b = SharedBitmap::new(pages);
        b.set_range(pages - 3, 3, true);
        b.set_range(1, 1, true);
        assert_eq!(runs(&b, 0, pages, true), vec![(1, 1), (pages - 3, 3)]);
        assert!(b.heap_bytes() < 3 << 20);
    }

    #[test]
    fn a_chunk_cleared_back_to_private_gives_its_words_back() {
        let mut b = SharedBitmap::new(2 * CHUNK_PAGES);
        let uniform = b.heap_bytes();
        b.set_range(CHUNK_PAGES + 3, 2, true);
        assert_eq!(
            b.heap_bytes(),
            uniform + CHUNK_PAGES as usize / 8,
            "one mixed chunk holds its bits"
        );
        for page in [
            CHUNK_PAGES + 2,
            CHUNK_PAGES + 3,
            CHUNK_PAGES + 4,
            CHUNK_PAGES + 5,
        ] {
            let expected = (CHUNK_PAGES + 3..CHUNK_PAGES + 5).contains(&page);
            assert_eq!(b.is_shared(page), expected, "page {page}");
        }
        assert_eq!(b.set_range(CHUNK_PAGES + 3, 2, false), 2);
        assert_eq!(b.heap_bytes(), uniform, "collapsed back to private");
        assert!(!b.is_shared(CHUNK_PAGES + 3));
        assert_eq!(b.shared_pages(), 0);
    }
}
