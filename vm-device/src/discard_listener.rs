//! What an assigned device implements to follow shared/private conversions
//! of guest RAM (QEMU calls it a RamDiscardListener): populate = the range
//! became shared, discard = it stops being shared.

use serde::Serialize;

use crate::dma_mapping::{BoxError, DmaError};

/// A guest-physical range handed to a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Section {
    pub gpa: u64,
    pub size: u64,
}

impl Section {
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    pub fn intersect(&self, other: &Section) -> Option<Section> {
        let start = self.gpa.max(other.gpa);
        let end = self.end().min(other.end());
        (start < end).then(|| Section {
            gpa: start,
            size: end - start,
        })
    }
}

/// Why a range could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("DMA entry limit of {limit} mappings reached")]
    EntryLimit { limit: u64 },
    #[error("DMA entry limit of {limit} mappings reached ({pages} pages to map)")]
    PagesPastLimit { limit: u64, pages: u64 },
    /// The device refused or broke.
    #[error(transparent)]
    Device(#[from] DmaError),
}

/// A device-side failure to make a range usable, with its cause.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("DMA map of {gpa:#x}+{size:#x}")]
    Map {
        gpa: u64,
        size: u64,
        #[source]
        source: MapError,
    },
    #[error(
        "DMA entry limit of {limit} mappings reached: unmapping {gpa:#x}+{size:#x} would split a mapping"
    )]
    SplitPastLimit { limit: u64, gpa: u64, size: u64 },
    /// Another kind of listener's refusal.
    #[error(transparent)]
    Other(BoxError),
}

/// A listener's part of one conversion, started at every listener before
/// any is waited for, so devices work on it at the same time.
pub enum Started<'a> {
    /// Settled while starting (a listener whose device answers in the call).
    Done(Result<(), (Section, ListenerError)>),
    /// In flight at the device; `finish` waits for its answers.
    InFlight(Box<dyn FnOnce() -> Result<(), (Section, ListenerError)> + 'a>),
}

impl Started<'_> {
    /// Waits for the device. An error names the section it refused.
    pub fn finish(self) -> Result<(), (Section, ListenerError)> {
        match self {
            Started::Done(result) => result,
            Started::InFlight(wait) => wait(),
        }
    }
}

pub trait RamDiscardListener: Send + Sync {
    /// The range became shared: map it. An error refuses the conversion, and
    /// the listener must then hold no mapping of the range.
    fn notify_populate(&self, section: Section) -> Result<(), ListenerError>;
    /// Asked, with the conversion's lock held, before a `notify_discard` of
    /// the same section: reserve what unmapping it will need, or refuse the
    /// conversion now while nothing has changed. Either `notify_discard` or
    /// `cancel_discard` of the section follows.
    fn prepare_discard(&self, _section: Section) -> Result<(), ListenerError> {
        Ok(())
    }
    /// Releases what `prepare_discard` reserved; the range stays shared.
    fn cancel_discard(&self, _section: Section) {}
    /// The range stops being shared: unmap it. Cannot be refused.
    fn notify_discard(&self, section: Section);
    /// Starts `notify_populate` of every one of `sections` (ascending,
    /// disjoint, one conversion's). Finishing it has the same contract as
    /// one populate for the whole set: on an error the listener holds none
    /// of `sections`. The default maps them one by one in the call.
    fn start_populate(&self, sections: &[Section]) -> Started<'_> {
        for (index, &section) in sections.iter().enumerate() {
            if let Err(e) = self.notify_populate(section) {
                for &done in &sections[..index] {
                    self.notify_discard(done);
                }
                return Started::Done(Err((section, e)));
            }
        }
        Started::Done(Ok(()))
    }
    /// Starts `notify_discard` of every one of `sections`; finishing it
    /// cannot fail. The default unmaps them one by one in the call.
    fn start_discard(&self, sections: &[Section]) -> Started<'_> {
        for &section in sections {
            self.notify_discard(section);
        }
        Started::Done(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intersection_is_clipped_or_absent() {
        let a = Section {
            gpa: 0x1000,
            size: 0x3000,
        };
        let b = Section {
            gpa: 0x3000,
            size: 0x2000,
        };
        assert_eq!(
            a.intersect(&b),
            Some(Section {
                gpa: 0x3000,
                size: 0x1000
            })
        );
        let c = Section {
            gpa: 0x4000,
            size: 0x1000,
        };
        assert_eq!(a.intersect(&c), None);
    }
}
