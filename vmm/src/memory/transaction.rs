//! One conversion as an explicit state machine. Each step moves the
//! transaction one phase further, or fails (and the caller drops it);
//! whatever phase a transaction is dropped in, its `Drop` undoes exactly
//! what that phase did. (The steps take `&mut self` rather than the
//! transaction by value: it is a few hundred bytes, and moving it through
//! every phase showed in the bookkeeping benchmark.) Rollback is written once, here, and every caller (the guest's
//! hypercalls, faults and doorbell, the fuzzers, the benchmarks) runs it.
//!
//! To-shared: locked -> attributes set -> populated (piece by piece) ->
//! committed. To-private: locked -> reserved (piece by piece) -> attributes
//! set -> discarded -> committed. A to-private change is past undoing once
//! the devices have unmapped, so from there only `commit` follows.

use std::sync::MutexGuard;

use smallvec::SmallVec;

use log::warn;

use super::conversion::{ConversionFailure, ConvertibleRam, RamRegion};
use super::page_states::PageStates;
use super::ram_block_attribute::{AttributeError, AttributeState, PageRange, Runs, Section};

/// A conversion touches one region, unless a layout puts two RAM regions
/// back to back: room for two without allocating.
pub(super) const INLINE_PIECES: usize = 2;

/// Where a conversion lands in one region: the region's index and the
/// region-relative byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RegionSpan {
    pub region: usize,
    pub offset: u64,
    pub size: u64,
}

pub(super) type Spans = SmallVec<[RegionSpan; INLINE_PIECES]>;

/// The part of a conversion inside one locked region.
struct LockedSpan<'a, S: PageStates> {
    region: &'a RamRegion<S>,
    offset: u64,
    size: u64,
    range: PageRange,
    /// The runs that change state, walked once when the region was locked
    /// (it stays locked, so they hold) and used by every phase.
    runs: Runs,
    state: MutexGuard<'a, AttributeState<S>>,
}

/// How far a transaction got, and so what dropping it undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Regions locked, nothing changed.
    Locked,
    /// To-private: the first `spans` spans have their unmaps reserved at
    /// every listener.
    Reserved {
        spans: usize,
    },
    /// The hypervisor's attributes follow the target state (if it keeps
    /// any); to-private reservations all held.
    AttributesSet,
    /// To-shared: the first `spans` spans are mapped by every listener.
    Populated {
        spans: usize,
    },
    /// To-private: every listener unmapped. Nothing can be undone.
    Discarded,
    Committed,
}

pub(super) struct Transaction<'a, S: PageStates> {
    ram: &'a ConvertibleRam<S>,
    gpa: u64,
    size: u64,
    to_shared: bool,
    spans: SmallVec<[LockedSpan<'a, S>; INLINE_PIECES]>,
    phase: Phase,
}

impl<'a, S: PageStates> Transaction<'a, S> {
    /// Locks the regions of `spans` in their (ascending address) order and
    /// finds the runs that change.
    pub(super) fn begin(
        ram: &'a ConvertibleRam<S>,
        gpa: u64,
        size: u64,
        to_shared: bool,
        spans: Spans,
    ) -> Result<Self, ConversionFailure> {
        let mut locked = SmallVec::new();
        for span in spans {
            let region = &ram.regions()[span.region];
            let Some(attributes) = region.attributes.as_ref() else {
                return Err(ConversionFailure::OutOfRange { gpa, size });
            };
            let state = attributes
                .lock()
                .map_err(ConversionFailure::ListenerFailed)?;
            let range = state
                .validate(span.offset, span.size)
                .map_err(ConversionFailure::ListenerFailed)?;
            locked.push(LockedSpan {
                region,
                offset: span.offset,
                size: span.size,
                range,
                runs: state.changes(range, !to_shared),
                state,
            });
        }
        Ok(Transaction {
            ram,
            gpa,
            size,
            to_shared,
            spans: locked,
            phase: Phase::Locked,
        })
    }

    /// To-private: every listener reserves what its unmaps will need, so a
    /// device that would run out of IOMMU entries refuses while nothing
    /// (KVM attributes included) has changed. To-shared reserves nothing.
    pub(super) fn reserve(&mut self) -> Result<(), ConversionFailure> {
        if self.to_shared {
            return Ok(());
        }
        self.offer_each_span(
            |state, runs| state.prepare_discard(runs),
            |spans| Phase::Reserved { spans },
        )
    }

    /// Tells the hypervisor the new state of the whole range, where it
    /// keeps per-page attributes.
    pub(super) fn set_attributes(&mut self) -> Result<(), ConversionFailure> {
        let hypervisor = self.ram.attributes();
        if hypervisor.tracked()
            && let Err(e) = hypervisor.set_private(self.gpa, self.size, !self.to_shared)
        {
            self.spans[0].state.record_failure();
            return Err(ConversionFailure::Hypervisor(e));
        }
        self.phase = Phase::AttributesSet;
        Ok(())
    }

    /// To-shared: every listener maps the runs (the first refusal rolls
    /// back every listener of every span). To-private: every listener
    /// unmaps them.
    pub(super) fn notify(&mut self) -> Result<(), ConversionFailure> {
        if !self.to_shared {
            for span in &self.spans {
                span.state.notify_discard(&span.runs);
            }
            self.phase = Phase::Discarded;
            return Ok(());
        }
        self.phase = Phase::Populated { spans: 0 };
        self.offer_each_span(
            |state, runs| state.notify_populate(runs),
            |spans| Phase::Populated { spans },
        )
    }

    /// Offers every span's runs to its listeners with `offer`, span by
    /// span; after each span the phase says how many have taken it
    /// (`phase(done)`), so that a drop undoes exactly those. The first
    /// refusal is recorded on its region and returned.
    #[inline]
    fn offer_each_span(
        &mut self,
        offer: impl Fn(&AttributeState<S>, &[Section]) -> Result<(), AttributeError>,
        phase: impl Fn(usize) -> Phase,
    ) -> Result<(), ConversionFailure> {
        for index in 0..self.spans.len() {
            let span = &self.spans[index];
            if let Err(e) = offer(&span.state, &span.runs) {
                span.state.record_failure();
                return Err(ConversionFailure::ListenerFailed(e));
            }
            self.phase = phase(index + 1);
        }
        Ok(())
    }

    /// Records the new state and counters and frees the backing the range
    /// no longer uses. Returns the pages that changed.
    pub(super) fn commit(mut self) -> u64 {
        let mut changed = 0;
        for span in &self.spans {
            changed += span.state.commit(span.range, self.to_shared);
            span.region
                .backing
                .discard_after_conversion(span.offset, span.size, self.to_shared);
        }
        self.phase = Phase::Committed;
        changed
    }

    /// Puts the hypervisor's attributes of the changing runs back as they
    /// were (the bitmap still says what that was).
    fn restore_attributes(&self) {
        let hypervisor = self.ram.attributes();
        if !hypervisor.tracked() {
            return;
        }
        for span in &self.spans {
            for run in &span.runs {
                if let Err(e) = hypervisor.set_private(run.gpa, run.size, self.to_shared) {
                    warn!(
                        "cannot restore the attribute of {:#x}+{:#x}: {e}",
                        run.gpa, run.size
                    );
                }
            }
        }
    }

    fn cancel_reservations(&self, spans: usize) {
        for span in &self.spans[..spans] {
            span.state.cancel_discard(&span.runs);
        }
    }
}

impl<S: PageStates> Drop for Transaction<'_, S> {
    fn drop(&mut self) {
        match self.phase {
            Phase::Locked | Phase::Committed => {}
            Phase::Reserved { spans } => self.cancel_reservations(spans),
            Phase::AttributesSet => {
                self.restore_attributes();
                if !self.to_shared {
                    self.cancel_reservations(self.spans.len());
                }
            }
            Phase::Populated { spans } => {
                for span in &self.spans[..spans] {
                    span.state.undo_populate(&span.runs);
                }
                self.restore_attributes();
            }
            // Only a panic in `commit` gets here; the unwinding poisons the
            // region locks, and the regions then refuse every conversion.
            Phase::Discarded => {}
        }
    }
}

#[cfg(test)]
#[path = "transaction_tests.rs"]
mod tests;
