//! Every listener at once: a conversion's maps (or unmaps) are started at
//! every listener of the region before any is waited for, so devices work
//! on one conversion at the same time (`vm_device::Started`).

use smallvec::SmallVec;

use super::*;

/// Listeners a conversion fans out to without allocating (more spill to
/// the heap): a GPU, a NIC, an NVMe drive and one more.
const FAN_OUT: usize = 4;

/// The part of `runs` inside `section`.
fn part_seen(runs: &[Section], section: &Section) -> Runs {
    runs.iter().filter_map(|r| r.intersect(section)).collect()
}

/// A listener's refusal as the conversion reports it.
fn refusal((failed, source): (Section, ListenerError)) -> AttributeError {
    AttributeError::ListenerFailed {
        gpa: failed.gpa,
        size: failed.size,
        source,
    }
}

impl<S: PageStates> AttributeState<S> {
    /// To-shared: every listener maps `runs` (the private runs of the
    /// change), all of them at once: each is started, then each is waited
    /// for. If any refuses, every listener that took its part unmaps it
    /// again (a refusing listener holds none of its part), and the first
    /// refusal in listener order is returned.
    pub(in crate::memory) fn notify_populate(
        &self,
        runs: &[Section],
    ) -> Result<(), AttributeError> {
        // One listener has nothing to overlap with: no lists to keep.
        if let [only] = &self.listeners[..] {
            return only
                .listener
                .start_populate(&part_seen(runs, &only.section))
                .finish()
                .map_err(refusal);
        }
        let seen = self.seen_by_each(runs);
        let started = self.start_each(&seen, |_| true, |l, part| l.start_populate(part));
        let mut mapped: SmallVec<[bool; FAN_OUT]> = SmallVec::new();
        let mut first_refusal = None;
        for pending in started {
            let result = pending.finish();
            mapped.push(result.is_ok());
            if let Err(e) = result {
                first_refusal.get_or_insert(e);
            }
        }
        let Some(refused) = first_refusal else {
            return Ok(());
        };
        for pending in self.start_each(&seen, |i| mapped[i], |l, part| l.start_discard(part)) {
            let _ = pending.finish();
        }
        Err(refusal(refused))
    }

    /// Every listener unmaps its part of `runs`, all at once.
    pub(super) fn discard_everywhere(&self, runs: &[Section]) {
        if let [only] = &self.listeners[..] {
            let _ = only
                .listener
                .start_discard(&part_seen(runs, &only.section))
                .finish();
            return;
        }
        let seen = self.seen_by_each(runs);
        for pending in self.start_each(&seen, |_| true, |l, part| l.start_discard(part)) {
            let _ = pending.finish();
        }
    }

    /// Undoes a successful `notify_populate` of `runs` (bitmap unchanged since).
    pub(in crate::memory) fn undo_populate(&self, runs: &[Section]) {
        self.discard_everywhere(runs);
    }

    /// The part of `runs` each listener sees (clipped to its section), in
    /// listener order.
    fn seen_by_each(&self, runs: &[Section]) -> SmallVec<[Runs; FAN_OUT]> {
        self.listeners
            .iter()
            .map(|reg| part_seen(runs, &reg.section))
            .collect()
    }

    /// `start` at every listener `chosen` by its index, with its part.
    fn start_each<'a>(
        &'a self,
        seen: &[Runs],
        chosen: impl Fn(usize) -> bool,
        start: impl Fn(&'a dyn RamDiscardListener, &[Section]) -> Started<'a>,
    ) -> SmallVec<[Started<'a>; FAN_OUT]> {
        self.listeners
            .iter()
            .zip(seen)
            .enumerate()
            .filter(|&(index, _)| chosen(index))
            .map(|(_, (reg, part))| start(reg.listener.as_ref(), part))
            .collect()
    }
}
