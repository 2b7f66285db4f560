//! The conversion path. The hypercall exit, the memory-fault exit and the
//! doorbell all end in `ConvertibleRam::convert` (through
//! `MemoryManager::convert`), which
//! 1. validates the request and splits it across regions (all or nothing),
//! 2. runs it as a `Transaction` (transaction.rs): lock the regions in
//!    ascending address order; to-private, let every listener reserve what
//!    its unmaps need (refusable, before anything changes); set the KVM
//!    memory attributes where the VM type keeps them; notify listeners
//!    (to-shared maps, rolled back everywhere on the first refusal;
//!    to-private unmaps); record the new state and discard the backing no
//!    longer used.
//!
//! To-private unmaps before the shared backing is discarded, so no device
//! ever points at freed memory. To-shared maps before the private backing is
//! discarded: a refused conversion must leave private contents intact, and
//! what gets mapped is the shared view, which never held private data.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hypervisor::{ConversionDirection, HypervisorError, MemoryConversion, Vm};
use log::debug;

use super::backing::Backing;
use super::page_states::PageStates;
use super::ram_block_attribute::{
    AttributeError, ConversionCounters, GRANULARITY, RamBlockAttribute,
};
use super::shared_bitmap::SharedBitmap;
use super::transaction::{RegionSpan, Spans, Transaction};

#[derive(Debug, thiserror::Error)]
pub enum ConversionFailure {
    #[error("range {gpa:#x}+{size:#x} is empty, unaligned or overflows")]
    Invalid { gpa: u64, size: u64 },
    #[error("range {gpa:#x}+{size:#x} is not entirely guest_memfd RAM")]
    OutOfRange { gpa: u64, size: u64 },
    #[error("a device refused the conversion")]
    ListenerFailed(#[source] AttributeError),
    #[error("the hypervisor refused the attribute change")]
    Hypervisor(#[source] HypervisorError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversionOutcome {
    /// Pages whose state actually changed (the rest already were in the target state).
    pub changed_pages: u64,
}

/// Where the hypervisor keeps per-page private attributes (KVM's
/// `KVM_SET_MEMORY_ATTRIBUTES`), for a conversion to set.
pub trait PrivateAttributes: Send + Sync {
    /// Whether this VM keeps them at all (the default VM type does not).
    fn tracked(&self) -> bool;
    fn set_private(&self, gpa: u64, size: u64, private: bool) -> Result<(), HypervisorError>;
}

/// A VM's own attributes.
pub struct VmAttributes(pub Arc<dyn Vm>);

impl PrivateAttributes for VmAttributes {
    fn tracked(&self) -> bool {
        self.0.supports_memory_attributes()
    }

    fn set_private(&self, gpa: u64, size: u64, private: bool) -> Result<(), HypervisorError> {
        self.0.set_memory_attributes(gpa, size, private)
    }
}

/// A hypervisor that keeps no attributes: what the default VM type is, and
/// what benchmarks of the bookkeeping run against.
pub struct NoPrivateAttributes;

impl PrivateAttributes for NoPrivateAttributes {
    fn tracked(&self) -> bool {
        false
    }

    fn set_private(&self, _gpa: u64, _size: u64, _private: bool) -> Result<(), HypervisorError> {
        Err(HypervisorError::MemoryAttributesUnsupported)
    }
}

/// One contiguous RAM region. `S` keeps the page states (the VMM's
/// `SharedBitmap`; the flat bitmap baseline in the benchmarks).
pub struct RamRegion<S: PageStates = SharedBitmap> {
    pub gpa: u64,
    pub size: u64,
    pub backing: Backing,
    /// Present for guest_memfd regions only.
    pub attributes: Option<RamBlockAttribute<S>>,
}

impl<S: PageStates> RamRegion<S> {
    /// A convertible region with no memory behind it: the whole conversion
    /// path runs on it except the I/O (benchmarks and tests).
    pub fn without_backing(gpa: u64, size: u64) -> Self {
        RamRegion {
            gpa,
            size,
            backing: Backing::Anonymous,
            attributes: Some(RamBlockAttribute::with_store(gpa, size)),
        }
    }
}

/// The RAM regions of a VM in ascending address order, as far as
/// conversions go: their states and listeners, and the hypervisor's
/// attributes that follow them.
pub struct ConvertibleRam<S: PageStates = SharedBitmap> {
    attributes: Box<dyn PrivateAttributes>,
    regions: Vec<RamRegion<S>>,
    /// Requests refused before reaching a region (invalid or outside RAM).
    rejected: AtomicU64,
    /// To-shared requests for GPAs no RAM backs (MMIO, holes), accepted
    /// with nothing changed.
    unbacked_to_shared: AtomicU64,
}

impl<S: PageStates> ConvertibleRam<S> {
    /// `regions` must be sorted and must not overlap.
    pub fn new(attributes: Box<dyn PrivateAttributes>, regions: Vec<RamRegion<S>>) -> Self {
        debug_assert!(regions.windows(2).all(|w| w[0].gpa + w[0].size <= w[1].gpa));
        ConvertibleRam {
            attributes,
            regions,
            rejected: AtomicU64::new(0),
            unbacked_to_shared: AtomicU64::new(0),
        }
    }

    /// One region of `size` bytes at `gpa` with no memory behind it and no
    /// hypervisor attributes: the production path for benchmarks, fuzzers
    /// and property tests.
    pub fn without_backing(gpa: u64, size: u64) -> Self {
        Self::new(
            Box::new(NoPrivateAttributes),
            vec![RamRegion::without_backing(gpa, size)],
        )
    }

    pub fn regions(&self) -> &[RamRegion<S>] {
        &self.regions
    }

    pub(super) fn attributes(&self) -> &dyn PrivateAttributes {
        self.attributes.as_ref()
    }

    /// Splits `gpa..gpa+size` over the guest_memfd regions, or says why not.
    pub(super) fn route(&self, gpa: u64, size: u64) -> Result<Spans, ConversionFailure> {
        let invalid = ConversionFailure::Invalid { gpa, size };
        if size == 0 || !gpa.is_multiple_of(GRANULARITY) || !size.is_multiple_of(GRANULARITY) {
            return Err(invalid);
        }
        let end = gpa.checked_add(size).ok_or(invalid)?;
        let mut spans = Spans::new();
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
            let span_end = end.min(region_end);
            spans.push(RegionSpan {
                region: index,
                offset: cursor - region.gpa,
                size: span_end - cursor,
            });
            cursor = span_end;
        }
        if cursor != end {
            return Err(ConversionFailure::OutOfRange { gpa, size });
        }
        Ok(spans)
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
        let spans = match self.route(gpa, size) {
            Ok(spans) => spans,
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
        let mut transaction = Transaction::begin(self, gpa, size, to_shared, spans)
            .inspect_err(|_| self.record_rejected())?;
        // Each failure drops the transaction, which undoes what it did.
        transaction.reserve()?;
        transaction.set_attributes()?;
        transaction.notify()?;
        let changed_pages = transaction.commit();
        debug!(
            "converted {gpa:#x}+{size:#x} to {}: {changed_pages} pages changed",
            direction.name()
        );
        Ok(ConversionOutcome { changed_pages })
    }

    fn record_rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// To-shared requests accepted for GPAs without RAM (MMIO, holes).
    pub fn unbacked_to_shared(&self) -> u64 {
        self.unbacked_to_shared.load(Ordering::Relaxed)
    }

    /// Whether any byte of `gpa..end` is RAM (guest_memfd or not).
    fn overlaps_ram(&self, gpa: u64, end: u64) -> bool {
        self.regions
            .iter()
            .any(|r| gpa < r.gpa + r.size && r.gpa < end)
    }

    /// Conversion counters of all regions, plus refused requests that
    /// belonged to no region.
    pub fn conversion_totals(&self) -> ConversionCounters {
        let mut total = ConversionCounters {
            failed: self.rejected.load(Ordering::Relaxed),
            ..Default::default()
        };
        for c in self
            .regions
            .iter()
            .filter_map(|r| r.attributes.as_ref())
            .map(|a| a.counters())
        {
            total.to_shared += c.to_shared;
            total.to_private += c.to_private;
            total.failed += c.failed;
            total.pages_to_shared += c.pages_to_shared;
            total.pages_to_private += c.pages_to_private;
        }
        total
    }
}
