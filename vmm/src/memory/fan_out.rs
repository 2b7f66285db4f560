//! Every listener at once: a conversion's maps (or unmaps) are started at
//! every listener of the region before any is waited for, so devices work
//! on one conversion at the same time (`vm_device::Started`).

use smallvec::SmallVec;

use super::*;

/// Listeners a conversion fans out to without allocating (more spill to
/// the heap): a GPU, a NIC, an NVMe drive and one more.
const FAN_OUT: usize = 4;

impl<S: PageStates> AttributeState<S> {
    /// The part of `runs` each listener sees (clipped to its section), in
    /// listener order.
    fn seen_by_each(&self, runs: &[Section]) -> SmallVec<[Runs; FAN_OUT]> {
        self.listeners
            .iter()
            .map(|reg| {
                runs.iter()
                    .filter_map(|r| r.intersect(&reg.section))
                    .collect()
            })
            .collect()
    }

    /// To-shared: every listener maps `runs` (the private runs of the
    /// change), all of them at once: each is started, then each is waited
    /// for. If any refuses, every listener that took its part unmaps it
    /// again (a refusing listener holds none of its part), and the first
    /// refusal in listener order is returned.
    pub(in crate::memory) fn notify_populate(
        &self,
        runs: &[Section],
    ) -> Result<(), AttributeError> {
        // Nothing to overlap with one listener or none: no lists to keep.
        match &self.listeners[..] {
            [] => return Ok(()),
            [only] => {
                let part: Runs = runs
                    .iter()
                    .filter_map(|r| r.intersect(&only.section))
                    .collect();
                return only
                    .listener
                    .start_populate(&part)
                    .finish()
                    .map_err(|(failed, source)| AttributeError::ListenerFailed {
                        gpa: failed.gpa,
                        size: failed.size,
                        source,
                    });
            }
            _ => {}
        }
        let seen = self.seen_by_each(runs);
        let started: SmallVec<[Started<'_>; FAN_OUT]> = self
            .listeners
            .iter()
            .zip(&seen)
            .map(|(reg, part)| reg.listener.start_populate(part))
            .collect();
        let results: SmallVec<[_; FAN_OUT]> = started.into_iter().map(Started::finish).collect();
        let Some(index) = results.iter().position(Result::is_err) else {
            return Ok(());
        };
        let undo: SmallVec<[Started<'_>; FAN_OUT]> = self
            .listeners
            .iter()
            .zip(&seen)
            .zip(&results)
            .filter(|(_, result)| result.is_ok())
            .map(|((reg, part), _)| reg.listener.start_discard(part))
            .collect();
        for pending in undo {
            let _ = pending.finish();
        }
        let mut results = results;
        let Err((failed, source)) = results.swap_remove(index) else {
            unreachable!("the position of an error")
        };
        Err(AttributeError::ListenerFailed {
            gpa: failed.gpa,
            size: failed.size,
            source,
        })
    }

    /// Every listener unmaps its part of `runs`, all at once.
    pub(super) fn discard_everywhere(&self, runs: &[Section]) {
        match &self.listeners[..] {
            [] => return,
            [only] => {
                let part: Runs = runs
                    .iter()
                    .filter_map(|r| r.intersect(&only.section))
                    .collect();
                let _ = only.listener.start_discard(&part).finish();
                return;
            }
            _ => {}
        }
        let seen = self.seen_by_each(runs);
        let started: SmallVec<[Started<'_>; FAN_OUT]> = self
            .listeners
            .iter()
            .zip(&seen)
            .map(|(reg, part)| reg.listener.start_discard(part))
            .collect();
        for pending in started {
            let _ = pending.finish();
        }
    }

    /// Undoes a successful `notify_populate` of `runs` (bitmap unchanged since).
    pub(in crate::memory) fn undo_populate(&self, runs: &[Section]) {
        self.discard_everywhere(runs);
    }
}
