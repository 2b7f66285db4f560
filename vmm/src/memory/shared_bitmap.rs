//! Shared/private state of every 4 KiB page of one region, stored sparsely:
//! the region is cut into chunks of `CHUNK_PAGES` pages, and a chunk whose
//! pages are all in one state costs 16 bytes instead of its 4 KiB of bits.
//!
//! Memory: 16 bytes per chunk plus 4 KiB per mixed chunk plus at most two
//! spare 4 KiB blocks, so a 1 TiB region needs 128 KiB when uniform (1/256 of
//! a flat bitmap) and at most 32 MiB + 128 KiB + 8 KiB when every chunk is
//! fragmented. Run iteration costs O(chunks + words of the mixed chunks it
//! crosses), never O(pages).
//!
//! Speed: a mixed chunk keeps its count of shared pages, so changing a few
//! pages costs the words they touch, and telling whether the chunk became
//! uniform costs nothing. A chunk that becomes uniform gives its block back
//! as a spare (all zeros, or all ones for a full chunk), and the next chunk
//! that needs one takes it without allocating or filling: converting a page
//! and back, the commonest thing guests do, never allocates.

use super::page_states::PageStates;

const WORD_BITS: u64 = 64;
pub const CHUNK_PAGES: u64 = 32 * 1024;
const CHUNK_WORDS: usize = (CHUNK_PAGES / WORD_BITS) as usize;

type Words = Box<[u64; CHUNK_WORDS]>;

enum Chunk {
    Private,
    Shared,
    /// Neither all private nor all shared: the bits, and how many are set.
    Mixed(Words, u32),
}

pub struct SharedBitmap {
    pages: u64,
    chunks: Vec<Chunk>,
    shared_pages: u64,
    /// A block with every bit clear, kept from a chunk that became private.
    spare_zeros: Option<Words>,
    /// A block with every bit set, kept from a full chunk that became shared.
    spare_ones: Option<Words>,
    /// The last chunk that became uniform through a partial change keeps
    /// its block (as `Mixed` with a count of 0 or all): a guest converting
    /// pages of one chunk back and forth then never changes its kind.
    lingering: Option<usize>,
    /// The last range set, `start..end` and its state: every page of it is
    /// still in that state (only `set_range` changes pages, and it records
    /// each change here). A guest commonly takes back exactly what it just
    /// converted, and this answers that walk without reading a word.
    last_set: (u64, u64, bool),
}

/// Sets or clears bits `from..to` of `words`; returns how many changed.
/// Serves both stores (`page_states::FlatBitmap` too).
pub(super) fn set_bits(words: &mut [u64], from: u64, to: u64, shared: bool) -> u64 {
    if from >= to {
        return 0;
    }
    let first = (from / WORD_BITS) as usize;
    let last = ((to - 1) / WORD_BITS) as usize;
    let head = u64::MAX << (from % WORD_BITS);
    let tail = u64::MAX >> (WORD_BITS - 1 - (to - 1) % WORD_BITS);
    if first == last {
        return set_word(&mut words[first], head & tail, shared);
    }
    let mut changed = set_word(&mut words[first], head, shared);
    for word in &mut words[first + 1..last] {
        // Inside a large change whole words are the rule, and they
        // usually flip whole (or not at all): no bit count then.
        let old = *word;
        let new = if shared { u64::MAX } else { 0 };
        *word = new;
        changed += match old ^ new {
            0 => 0,
            u64::MAX => WORD_BITS,
            flipped => count_bits(flipped),
        };
    }
    changed + set_word(&mut words[last], tail, shared)
}

/// Sets or clears `mask` in `word`; returns how many bits changed.
#[inline(always)]
fn set_word(word: &mut u64, mask: u64, shared: bool) -> u64 {
    let old = *word;
    let new = if shared { old | mask } else { old & !mask };
    *word = new;
    u64::from((old ^ new).count_ones())
}

/// Out of line so the whole-word loop stays a loop of stores and compares
/// (without POPCNT on the baseline x86-64 target a bit count is a dozen
/// instructions, which the compiler would otherwise run for every word).
#[cold]
#[inline(never)]
fn count_bits(bits: u64) -> u64 {
    u64::from(bits.count_ones())
}

/// First bit in `from..end` of `words` that is set (`shared`) or clear,
/// a word at a time. Serves both stores (`page_states::FlatBitmap` too).
#[inline]
pub(super) fn next_bit(words: &[u64], from: u64, end: u64, shared: bool) -> Option<u64> {
    let mut bit = from;
    while bit < end {
        let w = (bit / WORD_BITS) as usize;
        let raw = if shared { words[w] } else { !words[w] };
        // The bits of this word from `bit` on.
        let hits = raw & (u64::MAX << (bit % WORD_BITS));
        if hits != 0 {
            let found = w as u64 * WORD_BITS + u64::from(hits.trailing_zeros());
            return (found < end).then_some(found);
        }
        bit = (w as u64 + 1) * WORD_BITS;
    }
    None
}

impl PageStates for SharedBitmap {
    /// All pages private.
    fn with_pages(pages: u64) -> Self {
        let chunks = pages.div_ceil(CHUNK_PAGES);
        SharedBitmap {
            pages,
            chunks: (0..chunks).map(|_| Chunk::Private).collect(),
            shared_pages: 0,
            spare_zeros: None,
            spare_ones: None,
            lingering: None,
            last_set: (0, pages, false),
        }
    }

    fn pages(&self) -> u64 {
        self.pages
    }

    fn shared_pages(&self) -> u64 {
        self.shared_pages
    }

    /// Bytes of heap this bitmap holds (for tests and docs).
    fn heap_bytes(&self) -> usize {
        let blocks = self
            .chunks
            .iter()
            .filter(|c| matches!(c, Chunk::Mixed(..)))
            .count()
            + usize::from(self.spare_zeros.is_some())
            + usize::from(self.spare_ones.is_some());
        self.chunks.capacity() * std::mem::size_of::<Chunk>()
            + blocks * std::mem::size_of::<[u64; CHUNK_WORDS]>()
    }

    /// Calls `f(first_page, page_count)` for each maximal run of pages in
    /// state `shared` inside `start..start+count`, in ascending order,
    /// stopping at the first error. One pass: uniform chunks cost O(1), a
    /// mixed chunk a word at a time, and a run may span chunks.
    #[inline]
    fn for_each_run<E>(
        &self,
        start: u64,
        count: u64,
        shared: bool,
        mut f: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        // The commonest question, one page: answer it without the walk.
        if count == 1 && start < self.pages {
            return if self.is_shared(start) == shared {
                f(start, 1)
            } else {
                Ok(())
            };
        }
        let (last_start, last_end, last_shared) = self.last_set;
        if count > 0 && start >= last_start && start.saturating_add(count) <= last_end {
            return if last_shared == shared {
                f(start, count)
            } else {
                Ok(())
            };
        }
        self.walk_runs(start, count, shared, f)
    }

    /// True iff every page of `start..start+count` is in state `shared`.
    fn all_in_state(&self, start: u64, count: u64, shared: bool) -> bool {
        self.next_in_state(start, start + count, !shared).is_none()
    }

    /// Sets `start..start+count` to `shared`; returns how many pages changed.
    #[inline]
    fn set_range(&mut self, start: u64, count: u64, shared: bool) -> u64 {
        debug_assert!(start + count <= self.pages);
        self.last_set = (start, start + count, shared);
        // The commonest changes stay inside one mixed (or lingering) chunk
        // without covering it: a few pages of one word (no loop), or a
        // larger range of its words. The chunk stays mixed; whether it
        // became uniform is its count. (A whole chunk drops its bits instead,
        // in `set_in_chunk`; the partial last chunk changed whole keeps them,
        // lingering like any chunk made uniform by a change.)
        let from = start % CHUNK_PAGES;
        if count > 0
            && count < CHUNK_PAGES
            && from + count <= CHUNK_PAGES
            && let index = (start / CHUNK_PAGES) as usize
            && let Chunk::Mixed(words, n) = &mut self.chunks[index]
        {
            let bit = from % WORD_BITS;
            let word = &mut words[(from / WORD_BITS) as usize];
            let delta = if count == 1 {
                // One page changed or not: no bit count.
                let old = *word;
                *word = if shared {
                    old | 1 << bit
                } else {
                    old & !(1 << bit)
                };
                u64::from(*word != old)
            } else if count <= WORD_BITS - bit {
                let mask = (u64::MAX >> (WORD_BITS - count)) << bit;
                set_word(word, mask, shared)
            } else {
                set_bits(&mut words[..], from, from + count, shared)
            };
            // At most CHUNK_PAGES: the count of a chunk fits its u32.
            let delta32 = u32::try_from(delta).expect("a chunk changes at most CHUNK_PAGES pages");
            *n = if shared { *n + delta32 } else { *n - delta32 };
            let after = u64::from(*n);
            if shared {
                self.shared_pages += delta;
            } else {
                self.shared_pages -= delta;
            }
            self.linger_if_uniform(index, after, self.chunk_len(index as u64));
            return delta;
        }
        self.set_chunks(start, count, shared)
    }
}

impl SharedBitmap {
    fn chunk_len(&self, index: u64) -> u64 {
        (self.pages - index * CHUNK_PAGES).min(CHUNK_PAGES)
    }

    #[inline]
    pub fn is_shared(&self, page: u64) -> bool {
        debug_assert!(page < self.pages);
        match &self.chunks[(page / CHUNK_PAGES) as usize] {
            Chunk::Private => false,
            Chunk::Shared => true,
            Chunk::Mixed(words, _) => {
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
                Chunk::Mixed(words, _) => {
                    let found = next_bit(
                        &words[..],
                        page - chunk_start,
                        chunk_end - chunk_start,
                        shared,
                    );
                    if let Some(found) = found {
                        return Some(chunk_start + found);
                    }
                }
            }
            page = chunk_end;
        }
        None
    }

    fn walk_runs<E>(
        &self,
        start: u64,
        count: u64,
        shared: bool,
        mut f: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        let end = start.saturating_add(count).min(self.pages);
        // Whether a run is open, and where it began.
        let mut open = false;
        let mut run_start = 0;
        let mut page = start;
        while page < end {
            let index = page / CHUNK_PAGES;
            let chunk_start = index * CHUNK_PAGES;
            let chunk_end = (chunk_start + CHUNK_PAGES).min(end);
            let chunk = &self.chunks[index as usize];
            let uniform = match chunk {
                Chunk::Private | Chunk::Mixed(_, 0) => Some(false),
                Chunk::Shared => Some(true),
                Chunk::Mixed(_, n) if u64::from(*n) == self.chunk_len(index) => Some(true),
                Chunk::Mixed(..) => None,
            };
            match (uniform, chunk) {
                (Some(all_shared), _) => {
                    if (all_shared == shared) != open {
                        if open {
                            f(run_start, page - run_start)?;
                        } else {
                            run_start = page;
                        }
                        open = !open;
                    }
                }
                (None, Chunk::Mixed(words, _)) => {
                    // A word at a time: the edges of runs inside a word come
                    // from its bits; whole words in one state are skipped.
                    let flip = if shared { 0 } else { u64::MAX };
                    let lo = page - chunk_start;
                    let hi = chunk_end - chunk_start;
                    let last_word = ((hi - 1) / WORD_BITS) as usize;
                    let mut w = (lo / WORD_BITS) as usize;
                    let mut range = u64::MAX << (lo % WORD_BITS);
                    loop {
                        if w == last_word {
                            range &= u64::MAX >> (WORD_BITS - 1 - (hi - 1) % WORD_BITS);
                        }
                        let wanted = words[w] ^ flip;
                        let base = chunk_start + w as u64 * WORD_BITS;
                        // Bits that would end the open run, or start one.
                        let mut looking = if open { !wanted } else { wanted };
                        let mut left = range;
                        loop {
                            let edges = looking & left;
                            if edges == 0 {
                                break;
                            }
                            let at = edges.trailing_zeros();
                            let edge = base + u64::from(at);
                            if open {
                                f(run_start, edge - run_start)?;
                            } else {
                                run_start = edge;
                            }
                            open = !open;
                            looking = !looking;
                            left &= u64::MAX << at;
                        }
                        if w == last_word {
                            break;
                        }
                        w += 1;
                        range = u64::MAX;
                        let skip = if open { !flip } else { flip };
                        while w < last_word && words[w] == skip {
                            w += 1;
                        }
                    }
                }
                (None, _) => unreachable!("only mixed chunks have no uniform state"),
            }
            page = chunk_end;
        }
        if open {
            f(run_start, end - run_start)
        } else {
            Ok(())
        }
    }

    fn set_chunks(&mut self, start: u64, count: u64, shared: bool) -> u64 {
        let end = start + count;
        let mut changed = 0;
        let mut page = start;
        while page < end {
            let index = page / CHUNK_PAGES;
            let chunk_start = index * CHUNK_PAGES;
            let len = self.chunk_len(index);
            let from = page - chunk_start;
            let to = (end - chunk_start).min(len);
            changed += self.set_in_chunk(index as usize, from, to, len, shared);
            page = chunk_start + to;
        }
        if shared {
            self.shared_pages += changed;
        } else {
            self.shared_pages -= changed;
        }
        changed
    }

    /// Sets bits `from..to` of chunk `index` (`len` pages long); returns how
    /// many changed.
    fn set_in_chunk(&mut self, index: usize, from: u64, to: u64, len: u64, shared: bool) -> u64 {
        let uniform = if shared {
            Chunk::Shared
        } else {
            Chunk::Private
        };
        if from == 0 && to == len {
            // A whole chunk: its old bits, if any, are simply dropped.
            if self.lingering == Some(index) {
                self.lingering = None;
            }
            let before = match std::mem::replace(&mut self.chunks[index], uniform) {
                Chunk::Private => 0,
                Chunk::Shared => len,
                Chunk::Mixed(_, n) => u64::from(n),
            };
            return if shared { len - before } else { before };
        }
        match &mut self.chunks[index] {
            // The common case: bits change inside a chunk that stays mixed.
            Chunk::Mixed(words, n) => {
                let delta = set_bits(&mut **words, from, to, shared);
                let after = if shared {
                    u64::from(*n) + delta
                } else {
                    u64::from(*n) - delta
                };
                *n = u32::try_from(after).expect("a chunk has at most CHUNK_PAGES pages");
                self.linger_if_uniform(index, after, len);
                delta
            }
            Chunk::Private if !shared => 0,
            Chunk::Shared if shared => 0,
            // A uniform chunk becomes mixed.
            Chunk::Private | Chunk::Shared => {
                let mut words = if shared { self.zeros() } else { self.ones(len) };
                let delta = set_bits(&mut *words, from, to, shared);
                let after = if shared { delta } else { len - delta };
                self.chunks[index] = Chunk::Mixed(
                    words,
                    u32::try_from(after).expect("a chunk has at most CHUNK_PAGES pages"),
                );
                delta
            }
        }
    }

    /// After a partial change left mixed chunk `index` (`len` pages) with
    /// `shared` pages set: if that made it uniform, it lingers with its
    /// bits, and the chunk that lingered before gives its block back.
    fn linger_if_uniform(&mut self, index: usize, shared: u64, len: u64) {
        if (shared == 0 || shared == len)
            && self.lingering != Some(index)
            && let Some(previous) = self.lingering.replace(index)
        {
            self.settle(previous);
        }
    }

    /// Makes chunk `index` uniform again if its bits say it is, giving its
    /// block back as a spare.
    fn settle(&mut self, index: usize) {
        let len = self.chunk_len(index as u64);
        let uniform = match &self.chunks[index] {
            Chunk::Mixed(_, 0) => Chunk::Private,
            Chunk::Mixed(_, n) if u64::from(*n) == len => Chunk::Shared,
            _ => return,
        };
        let shared = matches!(uniform, Chunk::Shared);
        if let Chunk::Mixed(words, _) = std::mem::replace(&mut self.chunks[index], uniform) {
            self.keep_spare(words, shared, len);
        }
    }

    /// A block of zeros: the spare one if there is one, else the lingering
    /// chunk's if it is all private.
    fn zeros(&mut self) -> Words {
        if self.spare_zeros.is_none()
            && let Some(index) = self.lingering.take()
        {
            self.settle(index);
        }
        self.spare_zeros
            .take()
            .unwrap_or_else(|| Box::new([0; CHUNK_WORDS]))
    }

    /// A block with bits `0..len` set.
    fn ones(&mut self, len: u64) -> Words {
        if len == CHUNK_PAGES
            && let Some(words) = self.spare_ones.take()
        {
            return words;
        }
        let mut words = self.zeros();
        set_bits(&mut *words, 0, len, true);
        words
    }

    /// Keeps the block of a chunk that just became uniform for the next
    /// chunk that needs one. A block whose bits are `0..len` all set is all
    /// ones only for a full chunk; any other is dropped.
    fn keep_spare(&mut self, mut words: Words, shared: bool, len: u64) {
        if !shared {
            self.spare_zeros.get_or_insert(words);
        } else if len == CHUNK_PAGES {
            self.spare_ones.get_or_insert(words);
        } else if self.spare_zeros.is_none() {
            set_bits(&mut *words, 0, len, false);
            self.spare_zeros = Some(words);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::page_states::test_util::{runs, xorshift};

    #[test]
    fn set_bits_sets_exactly_its_range_and_counts_what_flipped() {
        // Every range over four words, from patterns with whole words in
        // either state and words in both (the body's three count paths).
        let patterns = [
            [0, u64::MAX, 0x00ff_00ff_00ff_00ff, u64::MAX],
            [u64::MAX, 0, 0xf0f0_0000_0000_0001, 0],
        ];
        for pattern in patterns {
            for from in 0..256u64 {
                for to in from..=256 {
                    for shared in [true, false] {
                        let mut words = pattern;
                        let changed = set_bits(&mut words, from, to, shared);
                        let mut expected = pattern;
                        let mut flipped = 0;
                        for bit in from..to {
                            let (w, b) = ((bit / 64) as usize, bit % 64);
                            if (expected[w] >> b & 1 == 1) != shared {
                                expected[w] ^= 1 << b;
                                flipped += 1;
                            }
                        }
                        assert_eq!(words, expected, "{from}..{to} {shared}");
                        assert_eq!(changed, flipped, "{from}..{to} {shared}");
                    }
                }
            }
        }
    }

    #[test]
    fn an_empty_change_changes_nothing_in_any_kind_of_chunk() {
        let mut b = SharedBitmap::with_pages(2 * CHUNK_PAGES);
        b.set_range(10, 3, true);
        for start in [0, 11, 64, CHUNK_PAGES, CHUNK_PAGES + 5] {
            for shared in [true, false] {
                assert_eq!(b.set_range(start, 0, shared), 0);
            }
        }
        assert_eq!(b.shared_pages(), 3);
        assert_eq!(runs(&b, 0, 2 * CHUNK_PAGES, true), vec![(10, 3)]);
    }

    #[test]
    fn the_last_range_set_answers_walks_inside_it_and_only_inside_it() {
        let mut b = SharedBitmap::with_pages(1000);
        assert_eq!(runs(&b, 0, 1000, false), vec![(0, 1000)]);
        assert_eq!(runs(&b, 10, 20, true), vec![]);
        b.set_range(100, 200, true);
        assert_eq!(runs(&b, 150, 50, true), vec![(150, 50)]);
        assert_eq!(runs(&b, 150, 50, false), vec![]);
        assert_eq!(runs(&b, 100, 200, true), vec![(100, 200)]);
        b.set_range(120, 10, false);
        // Inside the last range: its state.
        assert_eq!(runs(&b, 121, 5, true), vec![]);
        assert_eq!(runs(&b, 121, 5, false), vec![(121, 5)]);
        assert_eq!(runs(&b, 121, 0, false), vec![]);
        // Past the end: nothing, one page or more.
        for count in [1, 5] {
            assert_eq!(runs(&b, 1000, count, false), vec![]);
            assert_eq!(runs(&b, 1000, count, true), vec![]);
        }
        // Reaching out of it on either side: the pages themselves.
        assert_eq!(runs(&b, 110, 15, true), vec![(110, 10)]);
        assert_eq!(runs(&b, 125, 10, true), vec![(130, 5)]);
        assert_eq!(runs(&b, 100, 200, true), vec![(100, 20), (130, 170)]);
        assert_eq!(
            runs(&b, 0, 1000, false),
            vec![(0, 100), (120, 10), (300, 700)]
        );
    }

    #[test]
    fn starts_private() {
        let b = SharedBitmap::with_pages(100);
        assert_eq!(runs(&b, 0, 100, true), vec![]);
        assert_eq!(runs(&b, 0, 100, false), vec![(0, 100)]);
        assert_eq!(b.shared_pages(), 0);
    }

    #[test]
    fn runs_merge_across_words_and_chunks() {
        let mut b = SharedBitmap::with_pages(3 * CHUNK_PAGES + 7);
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
        let mut b = SharedBitmap::with_pages(pages);
        b.set_range(0, pages, true);
        assert!(b.all_in_state(0, pages, true));
        assert_eq!(b.heap_bytes(), 3 * 16, "uniform chunks hold no words");
        b.set_range(pages - 1, 1, false);
        assert_eq!(runs(&b, 0, pages, false), vec![(pages - 1, 1)]);
        b.set_range(pages - 1, 1, true);
        assert_eq!(
            b.heap_bytes(),
            3 * 16 + BLOCK,
            "collapsed back to uniform, the block kept as the one spare"
        );
        assert_eq!(b.shared_pages(), pages);
        assert!(b.all_in_state(0, pages, true));
    }

    #[test]
    fn sixteen_tib_without_overflow() {
        let pages = (16u64 << 40) / 4096;
        let mut b = SharedBitmap::with_pages(pages);
        b.set_range(pages - 3, 3, true);
        b.set_range(1, 1, true);
        assert_eq!(runs(&b, 0, pages, true), vec![(1, 1), (pages - 3, 3)]);
        assert!(b.heap_bytes() < 3 << 20);
    }

    /// How many 4 KiB blocks `b` holds beyond the directory of a bitmap of
    /// its size with none.
    fn blocks_held(b: &SharedBitmap) -> usize {
        let block = std::mem::size_of::<[u64; CHUNK_WORDS]>();
        let beyond = b.heap_bytes() - SharedBitmap::with_pages(b.pages()).heap_bytes();
        assert_eq!(beyond % block, 0, "{beyond} bytes beyond the directory");
        beyond / block
    }

    /// Chunks that become uniform through changes of many pages linger
    /// one at a time and give their blocks back: three chunks cycled that
    /// way hold two blocks, never three (all private) or more (all shared).
    #[test]
    fn chunks_made_uniform_by_large_changes_give_their_blocks_back() {
        for shared_end in [false, true] {
            let mut b = SharedBitmap::with_pages(3 * CHUNK_PAGES);
            for chunk in 0..3 {
                let start = chunk * CHUNK_PAGES;
                if shared_end {
                    b.set_range(start, CHUNK_PAGES - 100, true);
                    b.set_range(start + CHUNK_PAGES - 100, 100, true);
                } else {
                    b.set_range(start, 200, true);
                    b.set_range(start, 200, false);
                }
            }
            assert!(blocks_held(&b) <= 2, "shared {shared_end}");
            let expected = if shared_end { 3 * CHUNK_PAGES } else { 0 };
            assert_eq!(b.shared_pages(), expected);
        }
    }

    /// The block of a partial last chunk that became all shared is not all
    /// ones past its end: it must never serve a full chunk as all ones.
    #[test]
    fn a_partial_chunks_block_never_becomes_a_full_chunks_ones() {
        let half = CHUNK_PAGES / 2;
        let mut b = SharedBitmap::with_pages(CHUNK_PAGES + half);
        // The partial chunk 1 becomes all shared in two steps, then settles
        // (chunk 0 lingering next makes it give its block back).
        b.set_range(CHUNK_PAGES, 10, true);
        b.set_range(CHUNK_PAGES + 10, half - 10, true);
        b.set_range(0, 1, true);
        b.set_range(0, 1, false);
        // Chunk 0 all shared, then one page of it private: it needs a
        // block of ones.
        b.set_range(0, CHUNK_PAGES, true);
        b.set_range(5, 1, false);
        assert!(
            b.is_shared(half + 100),
            "a page past the partial chunk's length"
        );
        assert!(b.is_shared(CHUNK_PAGES - 1));
        assert_eq!(
            runs(&b, 0, CHUNK_PAGES, true),
            [(0, 5), (6, CHUNK_PAGES - 6)]
        );
        assert_eq!(b.shared_pages(), CHUNK_PAGES - 1 + half);
    }

    #[test]
    fn a_whole_chunk_change_drops_a_mixed_chunks_block() {
        let mut b = SharedBitmap::with_pages(2 * CHUNK_PAGES);
        let uniform = b.heap_bytes();
        for shared in [true, false] {
            b.set_range(5, 3, true);
            assert!(b.heap_bytes() > uniform);
            b.set_range(0, CHUNK_PAGES, shared);
            assert_eq!(b.heap_bytes(), uniform, "whole chunk to {shared}");
            let expected: &[(u64, u64)] = if shared { &[(0, CHUNK_PAGES)] } else { &[] };
            assert_eq!(runs(&b, 0, 2 * CHUNK_PAGES, true), expected);
            b.set_range(0, CHUNK_PAGES, false);
        }
    }

    #[test]
    fn a_full_chunk_that_needs_ones_takes_the_spare_ones() {
        let mut b = SharedBitmap::with_pages(3 * CHUNK_PAGES);
        // Chunk 0 becomes all shared by parts and lingers; chunk 1 taking a
        // block settles it, and its block becomes the spare ones.
        b.set_range(0, 1, true);
        b.set_range(1, CHUNK_PAGES - 1, true);
        b.set_range(CHUNK_PAGES, 1, true);
        b.set_range(CHUNK_PAGES, 1, false);
        assert_eq!(blocks_held(&b), 2);
        // Chunk 2, all shared, loses a page: the spare ones serve it, and
        // chunk 1 keeps lingering with its block.
        b.set_range(2 * CHUNK_PAGES, CHUNK_PAGES, true);
        b.set_range(2 * CHUNK_PAGES + 7, 1, false);
        assert_eq!(blocks_held(&b), 2);
        b.set_range(CHUNK_PAGES + 3, 1, true);
        assert_eq!(blocks_held(&b), 2);
        assert_eq!(
            runs(&b, 0, 3 * CHUNK_PAGES, true),
            [
                (0, CHUNK_PAGES),
                (CHUNK_PAGES + 3, 1),
                (2 * CHUNK_PAGES, 7),
                (2 * CHUNK_PAGES + 8, CHUNK_PAGES - 8)
            ]
        );
    }

    /// A lingering private chunk that settles when another chunk starts
    /// lingering keeps its block as the spare zeros, and the heap counts
    /// it: two blocks, the lingering one and the spare.
    #[test]
    fn a_settled_chunks_block_stays_as_the_spare_zeros_and_is_counted() {
        let mut b = SharedBitmap::with_pages(3 * CHUNK_PAGES);
        b.set_range(0, 1, true);
        b.set_range(CHUNK_PAGES, 1, true);
        assert_eq!(blocks_held(&b), 2, "two mixed chunks");
        b.set_range(0, 1, false);
        assert_eq!(blocks_held(&b), 2, "chunk 0 lingers with its block");
        b.set_range(CHUNK_PAGES, 1, false);
        assert_eq!(
            blocks_held(&b),
            2,
            "chunk 1 lingers; chunk 0's block is the spare"
        );
        assert!(b.spare_zeros.is_some());
        // The next chunk to need bits takes the spare: no third block.
        b.set_range(2 * CHUNK_PAGES, 1, true);
        assert_eq!(blocks_held(&b), 2);
        assert!(b.spare_zeros.is_none());
        assert_eq!(b.shared_pages(), 1);
    }

    #[test]
    fn a_whole_chunk_change_does_not_strand_the_lingering_chunks_block() {
        let mut b = SharedBitmap::with_pages(3 * CHUNK_PAGES);
        // Chunk 0: a page shared and back; it lingers with its block.
        b.set_range(0, 1, true);
        b.set_range(0, 1, false);
        assert_eq!(blocks_held(&b), 1);
        // Chunk 1 changes whole: no block, and chunk 0 still lingers.
        b.set_range(CHUNK_PAGES, CHUNK_PAGES, true);
        assert_eq!(blocks_held(&b), 1);
        // Chunk 2 needs a block: it takes chunk 0's, not a new one.
        b.set_range(2 * CHUNK_PAGES, 1, true);
        b.set_range(2 * CHUNK_PAGES, 1, false);
        assert_eq!(blocks_held(&b), 1);
        assert_eq!(b.shared_pages(), CHUNK_PAGES);
    }

    #[test]
    fn a_chunk_cleared_back_to_private_gives_its_words_back() {
        let mut b = SharedBitmap::with_pages(2 * CHUNK_PAGES);
        let uniform = b.heap_bytes();
        b.set_range(CHUNK_PAGES + 3, 2, true);
        assert_eq!(
            b.heap_bytes(),
            uniform + arch::usize_from(CHUNK_PAGES) / 8,
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
        assert_eq!(
            b.heap_bytes(),
            uniform + BLOCK,
            "collapsed back to private; the block stays as the spare"
        );
        assert!(!b.is_shared(CHUNK_PAGES + 3));
        assert_eq!(b.shared_pages(), 0);
        // The next chunk to need bits takes the spare: still one block.
        b.set_range(7, 1, true);
        assert_eq!(b.heap_bytes(), uniform + BLOCK);
        assert_eq!(runs(&b, 0, b.pages(), true), vec![(7, 1)]);
    }

    const BLOCK: usize = arch::usize_from(CHUNK_PAGES) / 8;

    /// The flat bitmap of `pages` pages: one bit each.
    fn flat_bytes(pages: u64) -> usize {
        arch::usize_from(pages.div_ceil(8))
    }

    #[test]
    fn uniform_state_costs_at_most_a_hundredth_of_a_flat_bitmap() {
        let pages = (1u64 << 40) / 4096;
        let mut b = SharedBitmap::with_pages(pages);
        assert!(
            b.heap_bytes() * 100 <= flat_bytes(pages),
            "{}",
            b.heap_bytes()
        );
        b.set_range(0, pages, true);
        assert!(b.heap_bytes() * 100 <= flat_bytes(pages));
        // Pages converted and converted back leave at most the two spares.
        for page in [5, CHUNK_PAGES * 3 + 9, pages - 1] {
            b.set_range(page, 1, false);
            b.set_range(page, 1, true);
        }
        b.set_range(0, pages, false);
        b.set_range(11, 1, true);
        b.set_range(11, 1, false);
        assert!(
            b.heap_bytes() <= 128 * 1024 + 2 * BLOCK,
            "{}",
            b.heap_bytes()
        );
        assert!(b.heap_bytes() * 100 <= flat_bytes(pages));
    }

    #[test]
    fn fragmented_state_never_costs_more_than_a_flat_bitmap_plus_the_directory() {
        // Every chunk mixed: one block each, plus 16 bytes a chunk (1/256)
        // and at most two spares.
        let pages = 64 * CHUNK_PAGES + 100;
        let mut b = SharedBitmap::with_pages(pages);
        let mut page = 0;
        while page < pages {
            b.set_range(page, 1, true);
            page += 2;
        }
        let chunks = arch::usize_from(pages.div_ceil(CHUNK_PAGES));
        assert_eq!(b.shared_pages(), pages / 2);
        assert!(b.heap_bytes() <= flat_bytes(pages) + BLOCK + chunks * 16 + 2 * BLOCK);
        assert!(b.heap_bytes() <= flat_bytes(pages) * 257 / 256 + 3 * BLOCK);
    }

    #[test]
    fn counts_follow_every_kind_of_change_and_spares_never_leak_bits() {
        // A model check: random changes against a plain Vec<bool>.
        let pages = 3 * CHUNK_PAGES + 77;
        let mut b = SharedBitmap::with_pages(pages);
        let mut model = vec![false; arch::usize_from(pages)];
        let mut model_shared = 0u64;
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..2000 {
            let start = next(pages);
            let count = match next(4) {
                0 => 1,
                1 => next(70) + 1,
                2 => next(CHUNK_PAGES) + 1,
                _ => next(3 * CHUNK_PAGES) + 1,
            }
            .min(pages - start);
            let shared = next(2) == 0;
            let expected = model[arch::usize_from(start)..arch::usize_from(start + count)]
                .iter()
                .filter(|&&m| m != shared)
                .count() as u64;
            assert_eq!(b.set_range(start, count, shared), expected);
            model[arch::usize_from(start)..arch::usize_from(start + count)].fill(shared);
            if shared {
                model_shared += expected;
            } else {
                model_shared -= expected;
            }
            assert_eq!(b.shared_pages(), model_shared);
        }
        for (page, &m) in model.iter().enumerate() {
            assert_eq!(b.is_shared(page as u64), m, "page {page}");
        }
        let runs_shared: u64 = runs(&b, 0, pages, true).iter().map(|r| r.1).sum();
        assert_eq!(runs_shared, b.shared_pages());
    }
}
