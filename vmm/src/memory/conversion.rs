//! The conversion path. The hypercall exit, the memory-fault exit and the
//! doorbell all end in `MemoryManager::convert`, which
//! 1. validates the request and splits it across regions (all or nothing),
//! 2. locks the regions involved, in ascending address order,
//! 3. sets the KVM memory attributes where the VM type supports them,
//! 4. notifies listeners: to-shared maps (rolled back everywhere on the first
//!    refusal); to-private first lets every listener reserve what its unmaps
//!    need (refusable, before step 3), then unmaps,
//! 5. records the new state and discards the backing no longer used.
//!
//! To-private unmaps before the shared backing is discarded, so no device
//! ever points at freed memory. To-shared maps before the private backing is
//! discarded: a refused conversion must leave private contents intact, and
//! what gets mapped is the shared view, which never held private data.

use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use smallvec::SmallVec;

use hypervisor::{ConversionDirection, MemoryConversion};
use log::{debug, warn};

use super::ram_block_attribute::{AttributeError, AttributeState, PageRange};
use super::{GRANULARITY, MemoryManager};

#[derive(Debug, thiserror::Error)]
pub enum ConversionFailure {
    #[error("range {gpa:#x}+{size:#x} is empty, unaligned or overflows")]
    Invalid { gpa: u64, size: u64 },
    #[error("range {gpa:#x}+{size:#x} is not entirely guest_memfd RAM")]
    OutOfRange { gpa: u64, size: u64 },
    #[error("a device refused the conversion")]
    ListenerFailed(#[source] AttributeError),
    #[error("the hypervisor refused the attribute change")]
    Hypervisor(#[source] hypervisor::HypervisorError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionOutcome {
    /// Pages whose state actually changed (the rest already were in the target state).
    pub changed_pages: u64,
}

/// A conversion touches one region, unless a layout puts two RAM regions
/// back to back: room for two without allocating.
const INLINE_PIECES: usize = 2;

type Routes = SmallVec<[(usize, u64, u64); INLINE_PIECES]>;

struct Piece<'a> {
    region: usize,
    range: PageRange,
    offset: u64,
    size: u64,
    state: MutexGuard<'a, AttributeState>,
}

impl MemoryManager {
    /// Splits `gpa..gpa+size` over the guest_memfd regions, or says why not.
    fn route(&self, gpa: u64, size: u64) -> Result<Routes, ConversionFailure> {
        let invalid = ConversionFailure::Invalid { gpa, size };
        if size == 0 || !gpa.is_multiple_of(GRANULARITY) || !size.is_multiple_of(GRANULARITY) {
            return Err(invalid);
        }
        let end = gpa.checked_add(size).ok_or(invalid)?;
        let mut pieces = Routes::new();
        let mut cursor = gpa;
        for (index, region) in self.regions.iter().enumerate() {
            let region_end = region.gpa + region.size;
            if cursor >= end {
                break;
            }
            if cursor < region.gpa || cursor >= region_end {
                continue;
            }
            if region.attributes.is_none() {
                break;
            }
            let piece_end = end.min(region_end);
            pieces.push((index, cursor - region.gpa, piece_end - cursor));
            cursor = piece_end;
        }
        if cursor != end {
            return Err(ConversionFailure::OutOfRange { gpa, size });
        }
        Ok(pieces)
    }

    /// Converts a range for the guest. On any error nothing has changed:
    /// not the state, not a device mapping, not the KVM attributes.
    pub fn convert(
        &self,
        request: MemoryConversion,
    ) -> Result<ConversionOutcome, ConversionFailure> {
        let MemoryConversion {
            gpa,
            size,
            direction,
        } = request;
        let to_shared = direction == ConversionDirection::ToShared;
        let routes = match self.route(gpa, size) {
            Ok(routes) => routes,
            // Confidential guests' firmware makes MMIO (the 32-bit PCI hole,
            // the IOAPIC page) shared before using it; there is nothing to
            // track there, and refusing would stop the boot. Making such a
            // page private cannot be honoured, so that stays an error.
            Err(ConversionFailure::OutOfRange { .. })
                if to_shared && !self.overlaps_ram(gpa, gpa + size) =>
            {
                self.unbacked_to_shared.fetch_add(1, Ordering::Relaxed);
                debug!("to-shared of {gpa:#x}+{size:#x} outside RAM: nothing to convert");
                return Ok(ConversionOutcome { changed_pages: 0 });
            }
            Err(e) => {
                self.record_rejected();
                return Err(e);
            }
        };

        let mut pieces: SmallVec<[Piece<'_>; INLINE_PIECES]> = SmallVec::new();
        for (region, offset, size) in routes {
            let attrs = self.regions[region].attributes.as_ref().expect("routed");
            let state = match attrs.lock() {
                Ok(state) => state,
                Err(e) => {
                    self.record_rejected();
                    return Err(ConversionFailure::ListenerFailed(e));
                }
            };
            let range = state.validate(offset, size).expect("routed inside region");
            pieces.push(Piece {
                region,
                range,
                offset,
                size,
                state,
            });
        }

        // Devices that cannot unmap without more IOMMU entries than they may
        // use refuse here, before anything (KVM attributes included) changes.
        if !to_shared {
            for i in 0..pieces.len() {
                if let Err(e) = pieces[i].state.prepare_discard(pieces[i].range) {
                    for done in &pieces[..i] {
                        done.state.cancel_discard(done.range);
                    }
                    pieces[i].state.record_failure();
                    return Err(ConversionFailure::ListenerFailed(e));
                }
            }
        }

        if self.vm.supports_memory_attributes()
            && let Err(e) = self.vm.set_memory_attributes(gpa, size, !to_shared)
        {
            if !to_shared {
                for piece in &pieces {
                    piece.state.cancel_discard(piece.range);
                }
            }
            pieces[0].state.record_failure();
            return Err(ConversionFailure::Hypervisor(e));
        }

        if to_shared {
            for i in 0..pieces.len() {
                if let Err(e) = pieces[i].state.notify_populate(pieces[i].range) {
                    for done in &pieces[..i] {
                        done.state.undo_populate(done.range);
                    }
                    self.restore_private_attributes(&pieces);
                    pieces[i].state.record_failure();
                    return Err(ConversionFailure::ListenerFailed(e));
                }
            }
        } else {
            for piece in &pieces {
                piece.state.notify_discard(piece.range);
            }
        }

        let mut changed_pages = 0;
        for piece in &mut pieces {
            changed_pages += piece.state.commit(piece.range, to_shared);
            self.regions[piece.region].backing.discard_after_conversion(
                piece.offset,
                piece.size,
                to_shared,
            );
        }
        debug!(
            "converted {gpa:#x}+{size:#x} to {}: {changed_pages} pages changed",
            direction.name()
        );
        Ok(ConversionOutcome { changed_pages })
    }

    /// After a refused to-shared change: pages that were private (the bitmap
    /// still says which) get their private attribute back.
    fn restore_private_attributes(&self, pieces: &[Piece<'_>]) {
        if !self.vm.supports_memory_attributes() {
            return;
        }
        for piece in pieces {
            piece.state.for_each_run(piece.range, false, |s| {
                if let Err(e) = self.vm.set_memory_attributes(s.gpa, s.size, true) {
                    warn!(
                        "cannot restore private attribute of {:#x}+{:#x}: {e}",
                        s.gpa, s.size
                    );
                }
            });
        }
    }
}
