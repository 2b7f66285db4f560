//! RamBlockAttribute: the shared/private state of one guest_memfd region and
//! the discard listeners (assigned devices) that must follow it.
//!
//! Shared means populated (a device may map it), private means discarded.
//! Conversions and listener (un)registration run under the region's own
//! lock, so a conversion is atomic with respect to other conversions of the
//! region, while other regions convert in parallel. That lock is held across
//! device I/O; readers (the API) never take it: they read the committed
//! state (`View`), which a conversion only write-locks for its final commit.

use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::Serialize;
use smallvec::SmallVec;

pub use vm_device::{ListenerError, RamDiscardListener, Section, Started};

use super::page_states::PageStates;
use super::shared_bitmap::SharedBitmap;

pub const GRANULARITY: u64 = arch::layout::PAGE_SIZE;
const PAGE_SHIFT: u32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ListenerId(u64);

#[derive(Debug, thiserror::Error)]
pub enum AttributeError {
    #[error("empty range at offset {0:#x}")]
    Empty(u64),
    #[error("range {offset:#x}+{size:#x} is not aligned to {GRANULARITY:#x}")]
    Unaligned { offset: u64, size: u64 },
    #[error("range {offset:#x}+{size:#x} overflows")]
    Overflow { offset: u64, size: u64 },
    #[error("range {offset:#x}+{size:#x} is outside the region of {region_size:#x} bytes")]
    OutOfRegion {
        offset: u64,
        size: u64,
        region_size: u64,
    },
    #[error("listener refused to map {gpa:#x}+{size:#x}")]
    ListenerFailed {
        gpa: u64,
        size: u64,
        #[source]
        source: ListenerError,
    },
    #[error("no listener {0:?}")]
    UnknownListener(ListenerId),
    #[error("region {0:#x} refuses conversions: a listener panicked in the middle of one")]
    Poisoned(u64),
}

/// Per-region conversion counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ConversionCounters {
    pub to_shared: u64,
    pub to_private: u64,
    pub failed: u64,
    pub pages_to_shared: u64,
    pub pages_to_private: u64,
}

/// Validated page range inside a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRange {
    pub first: u64,
    pub count: u64,
}

struct Registered {
    id: ListenerId,
    listener: Arc<dyn RamDiscardListener>,
    section: Section,
}

/// The committed state: what readers see.
struct View<S> {
    bitmap: S,
    counters: ConversionCounters,
}

type SharedView<S> = Arc<RwLock<View<S>>>;

fn read<S>(view: &RwLock<View<S>>) -> RwLockReadGuard<'_, View<S>> {
    // Only `commit` writes, and a bitmap update cannot stop half-way.
    view.read().unwrap_or_else(|e| e.into_inner())
}

fn write<S>(view: &RwLock<View<S>>) -> RwLockWriteGuard<'_, View<S>> {
    view.write().unwrap_or_else(|e| e.into_inner())
}

/// The runs a change notifies: most changes have one, and up to two are
/// kept without allocating (more spill to the heap).
pub(super) type Runs = SmallVec<[Section; 2]>;

pub struct AttributeState<S = SharedBitmap> {
    gpa: u64,
    /// Fixed at creation; kept here so validating takes no lock.
    pages: u64,
    view: SharedView<S>,
    listeners: Vec<Registered>,
    next_id: u64,
}

/// `S` is the per-page state store: `SharedBitmap` in the VMM; the flat
/// bitmap baseline in the benchmarks.
pub struct RamBlockAttribute<S = SharedBitmap> {
    gpa: u64,
    size: u64,
    state: Mutex<AttributeState<S>>,
    view: SharedView<S>,
}

impl RamBlockAttribute {
    /// A region at `gpa` of `size` bytes (a multiple of `GRANULARITY`), all private.
    pub fn new(gpa: u64, size: u64) -> Self {
        Self::with_store(gpa, size)
    }
}

impl<S: PageStates> RamBlockAttribute<S> {
    /// As `new`, with `S` keeping the page states.
    pub fn with_store(gpa: u64, size: u64) -> Self {
        debug_assert_eq!(size % GRANULARITY, 0);
        let pages = size >> PAGE_SHIFT;
        let view = Arc::new(RwLock::new(View {
            bitmap: S::with_pages(pages),
            counters: ConversionCounters::default(),
        }));
        RamBlockAttribute {
            gpa,
            size,
            state: Mutex::new(AttributeState {
                gpa,
                pages,
                view: view.clone(),
                listeners: Vec::new(),
                next_id: 0,
            }),
            view,
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn min_granularity(&self) -> u64 {
        GRANULARITY
    }

    /// The region's conversion lock. Conversions spanning several regions
    /// lock them in ascending address order through this. A listener that
    /// panicked in the middle of a conversion leaves devices and state out
    /// of step: the region then refuses every conversion, loudly.
    pub fn lock(&self) -> Result<MutexGuard<'_, AttributeState<S>>, AttributeError> {
        self.state.lock().map_err(|_| {
            log::error!(
                "region {:#x}: conversion refused, a listener panicked during an earlier one",
                self.gpa
            );
            AttributeError::Poisoned(self.gpa)
        })
    }

    fn view(&self) -> RwLockReadGuard<'_, View<S>> {
        read(&self.view)
    }

    pub fn is_populated(&self, offset: u64, size: u64) -> Result<bool, AttributeError> {
        let view = self.view();
        let range = validate(view.bitmap.pages(), offset, size)?;
        Ok(view.bitmap.all_in_state(range.first, range.count, true))
    }

    /// One callback per maximal shared run inside `offset..offset+size`
    /// (clipped), stopping at the first error.
    pub fn replay_populated<E>(
        &self,
        offset: u64,
        size: u64,
        f: impl FnMut(Section) -> Result<(), E>,
    ) -> Result<(), ReplayError<E>> {
        replay(self.gpa, &self.view(), offset, size, true, f)
    }

    pub fn replay_discarded<E>(
        &self,
        offset: u64,
        size: u64,
        f: impl FnMut(Section) -> Result<(), E>,
    ) -> Result<(), ReplayError<E>> {
        replay(self.gpa, &self.view(), offset, size, false, f)
    }

    pub fn register_listener(
        &self,
        listener: Arc<dyn RamDiscardListener>,
        section: Section,
    ) -> Result<ListenerId, AttributeError> {
        self.lock()?.register_listener(listener, section)
    }

    pub fn unregister_listener(&self, id: ListenerId) -> Result<(), AttributeError> {
        self.lock()?.unregister_listener(id)
    }

    /// Removes a listener without notifying it: from now on no conversion
    /// reaches it, and undoing what it holds is the caller's job, outside
    /// this region's lock (so a slow device delays no conversion).
    pub fn detach_listener(
        &self,
        id: ListenerId,
    ) -> Result<Arc<dyn RamDiscardListener>, AttributeError> {
        let mut state = self.lock()?;
        let index = state
            .listeners
            .iter()
            .position(|r| r.id == id)
            .ok_or(AttributeError::UnknownListener(id))?;
        Ok(state.listeners.remove(index).listener)
    }

    /// Never waits for a conversion in progress.
    pub fn counters(&self) -> ConversionCounters {
        self.view().counters
    }

    /// Never waits for a conversion in progress.
    pub fn shared_bytes(&self) -> u64 {
        self.view().bitmap.shared_pages() << PAGE_SHIFT
    }
}

/// Checks `offset..offset+size` (region-relative) against a region of
/// `pages` pages and turns it into pages.
fn validate(pages: u64, offset: u64, size: u64) -> Result<PageRange, AttributeError> {
    if size == 0 {
        return Err(AttributeError::Empty(offset));
    }
    if !offset.is_multiple_of(GRANULARITY) || !size.is_multiple_of(GRANULARITY) {
        return Err(AttributeError::Unaligned { offset, size });
    }
    let end = offset
        .checked_add(size)
        .ok_or(AttributeError::Overflow { offset, size })?;
    let region_size = pages << PAGE_SHIFT;
    if end > region_size {
        return Err(AttributeError::OutOfRegion {
            offset,
            size,
            region_size,
        });
    }
    Ok(PageRange {
        first: offset >> PAGE_SHIFT,
        count: size >> PAGE_SHIFT,
    })
}

/// Where a listener sits in every region's list: the same order in all.
fn lock_order(listener: &Arc<dyn RamDiscardListener>) -> usize {
    Arc::as_ptr(listener).cast::<()>().addr()
}

fn section_of(gpa: u64, first: u64, count: u64) -> Section {
    Section {
        gpa: gpa + (first << PAGE_SHIFT),
        size: count << PAGE_SHIFT,
    }
}

fn replay<S: PageStates, E>(
    gpa: u64,
    view: &View<S>,
    offset: u64,
    size: u64,
    shared: bool,
    mut f: impl FnMut(Section) -> Result<(), E>,
) -> Result<(), ReplayError<E>> {
    let range = validate(view.bitmap.pages(), offset, size)?;
    view.bitmap
        .for_each_run(range.first, range.count, shared, |first, count| {
            f(section_of(gpa, first, count))
        })
        .map_err(ReplayError::Callback)
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError<E> {
    #[error(transparent)]
    Range(#[from] AttributeError),
    #[error("replay callback failed")]
    Callback(E),
}

impl<S: PageStates> AttributeState<S> {
    fn section_of(&self, first: u64, count: u64) -> Section {
        section_of(self.gpa, first, count)
    }

    fn view(&self) -> RwLockReadGuard<'_, View<S>> {
        read(&self.view)
    }

    fn pages(&self) -> u64 {
        self.pages
    }

    fn region_size(&self) -> u64 {
        self.pages() << PAGE_SHIFT
    }

    /// Checks `offset..offset+size` (region-relative) and turns it into pages.
    pub(super) fn validate(&self, offset: u64, size: u64) -> Result<PageRange, AttributeError> {
        validate(self.pages(), offset, size)
    }

    /// The part of `range` that lies in `section`, in pages.
    fn clip(&self, range: PageRange, section: &Section) -> Option<PageRange> {
        let whole = self.section_of(range.first, range.count);
        let part = whole.intersect(section)?;
        Some(PageRange {
            first: (part.gpa - self.gpa) >> PAGE_SHIFT,
            count: part.size >> PAGE_SHIFT,
        })
    }

    /// The runs of `range` in state `shared`: what a change of `range` to
    /// the other state notifies, walked once per conversion and kept by it
    /// for every listener and every phase.
    pub(super) fn changes(&self, range: PageRange, shared: bool) -> Runs {
        let mut runs = Runs::new();
        let _ = self.view().bitmap.for_each_change::<()>(
            range.first,
            range.count,
            shared,
            |first, count| {
                runs.push(self.section_of(first, count));
                Ok(())
            },
        );
        runs
    }

    /// Calls `f` for each of `runs` that `section` sees (clipped to it),
    /// stopping at the first error (with the failing run).
    fn each_seen<E>(
        runs: &[Section],
        section: &Section,
        mut f: impl FnMut(Section) -> Result<(), E>,
    ) -> Result<(), (Section, E)> {
        for run in runs {
            if let Some(part) = run.intersect(section) {
                f(part).map_err(|e| (part, e))?;
            }
        }
        Ok(())
    }

    /// Phase 1 of a change, shared by both directions: offers every listener
    /// each of `runs` through `offer`. On the first refusal every offer of
    /// this call (earlier listeners, and the refusing listener's runs
    /// before the refused one) is withdrawn through `withdraw`, and the
    /// refusal is returned. The bitmap is not touched.
    fn offer_all(
        &self,
        runs: &[Section],
        offer: impl Fn(&dyn RamDiscardListener, Section) -> Result<(), ListenerError>,
        withdraw: impl Fn(&dyn RamDiscardListener, Section),
    ) -> Result<(), AttributeError> {
        for (index, reg) in self.listeners.iter().enumerate() {
            if let Err((failed, source)) =
                Self::each_seen(runs, &reg.section, |s| offer(reg.listener.as_ref(), s))
            {
                for earlier in &self.listeners[..index] {
                    Self::withdraw(runs, earlier, None, &withdraw);
                }
                Self::withdraw(runs, reg, Some(failed.gpa), &withdraw);
                return Err(AttributeError::ListenerFailed {
                    gpa: failed.gpa,
                    size: failed.size,
                    source,
                });
            }
        }
        Ok(())
    }

    /// Withdraws from `reg` what `offer_all` gave it: all runs, or only
    /// those before `stop_at` (the run it refused).
    fn withdraw(
        runs: &[Section],
        reg: &Registered,
        stop_at: Option<u64>,
        withdraw: &impl Fn(&dyn RamDiscardListener, Section),
    ) {
        let _ = Self::each_seen(runs, &reg.section, |s| {
            if stop_at.is_some_and(|limit| s.gpa >= limit) {
                return Err(());
            }
            withdraw(reg.listener.as_ref(), s);
            Ok(())
        });
    }

    fn withdraw_all(&self, runs: &[Section], withdraw: impl Fn(&dyn RamDiscardListener, Section)) {
        for reg in &self.listeners {
            Self::withdraw(runs, reg, None, &withdraw);
        }
    }

    /// To-private, before anything changes: every listener reserves what
    /// unmapping `runs` (the shared runs of the change) needs. On failure
    /// nothing is reserved any more.
    pub(super) fn prepare_discard(&self, runs: &[Section]) -> Result<(), AttributeError> {
        self.offer_all(
            runs,
            |l, s| l.prepare_discard(s),
            |l, s| l.cancel_discard(s),
        )
    }

    /// Undoes a successful `prepare_discard` of `runs`.
    pub(super) fn cancel_discard(&self, runs: &[Section]) {
        self.withdraw_all(runs, |l, s| l.cancel_discard(s));
    }

    /// To-private, once reserved: listeners unmap every one of `runs`, all
    /// at once.
    pub(super) fn notify_discard(&self, runs: &[Section]) {
        self.discard_everywhere(runs);
    }

    /// Records the new state of `range`. Returns the number of pages that
    /// changed.
    pub(super) fn commit(&self, range: PageRange, to_shared: bool) -> u64 {
        let mut view = write(&self.view);
        let changed = view.bitmap.set_range(range.first, range.count, to_shared);
        if to_shared {
            view.counters.to_shared += 1;
            view.counters.pages_to_shared += changed;
        } else {
            view.counters.to_private += 1;
            view.counters.pages_to_private += changed;
        }
        changed
    }

    pub(super) fn record_failure(&self) {
        write(&self.view).counters.failed += 1;
    }

    /// Calls `f` for each run of `range` that is in the state `shared`.
    fn for_each_run(&self, range: PageRange, shared: bool, mut f: impl FnMut(Section)) {
        let _ = self.view().bitmap.for_each_run::<()>(
            range.first,
            range.count,
            shared,
            |first, count| {
                f(self.section_of(first, count));
                Ok(())
            },
        );
    }

    pub fn register_listener(
        &mut self,
        listener: Arc<dyn RamDiscardListener>,
        section: Section,
    ) -> Result<ListenerId, AttributeError> {
        let offset = section.gpa.wrapping_sub(self.gpa);
        let range = if section.gpa < self.gpa {
            return Err(AttributeError::OutOfRegion {
                offset,
                size: section.size,
                region_size: self.region_size(),
            });
        } else {
            self.validate(offset, section.size)?
        };
        let mut done: Option<u64> = None;
        let replay =
            self.view()
                .bitmap
                .for_each_run(range.first, range.count, true, |first, count| {
                    let s = self.section_of(first, count);
                    listener.notify_populate(s).map_err(|e| (s, e))?;
                    done = Some(s.gpa);
                    Ok(())
                });
        if let Err((failed, source)) = replay {
            if done.is_some() {
                self.for_each_run(range, true, |s| {
                    if s.gpa < failed.gpa {
                        listener.notify_discard(s);
                    }
                });
            }
            return Err(AttributeError::ListenerFailed {
                gpa: failed.gpa,
                size: failed.size,
                source,
            });
        }
        let id = ListenerId(self.next_id);
        self.next_id += 1;
        // A conversion holds every listener's lock of its region at once
        // (fan_out.rs); kept in one order for every region (by address),
        // two conversions of two regions never wait for each other.
        let key = lock_order(&listener);
        let at = self
            .listeners
            .partition_point(|r| lock_order(&r.listener) < key);
        self.listeners.insert(
            at,
            Registered {
                id,
                listener,
                section,
            },
        );
        Ok(id)
    }

    pub fn unregister_listener(&mut self, id: ListenerId) -> Result<(), AttributeError> {
        let index = self
            .listeners
            .iter()
            .position(|r| r.id == id)
            .ok_or(AttributeError::UnknownListener(id))?;
        let reg = self.listeners.remove(index);
        let range = self
            .clip(
                PageRange {
                    first: 0,
                    count: self.pages(),
                },
                &reg.section,
            )
            .expect("registered sections lie in the region");
        self.for_each_run(range, true, |s| reg.listener.notify_discard(s));
        Ok(())
    }

    pub fn shared_pages(&self) -> u64 {
        self.view().bitmap.shared_pages()
    }

    pub fn listener_count(&self) -> usize {
        self.listeners.len()
    }

    pub fn heap_bytes(&self) -> usize {
        self.view().bitmap.heap_bytes()
    }
}

#[path = "fan_out.rs"]
mod fan_out;

#[cfg(test)]
#[path = "ram_block_attribute_tests.rs"]
mod tests;
