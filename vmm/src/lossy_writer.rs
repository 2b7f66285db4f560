//! One shape for the VMM's line writers (the log and the event stream): a
//! bounded queue in front of a named thread that writes to a sink. Senders
//! never wait: past the queue's depth a record is dropped and counted. An
//! idle thread blocks on the queue (it does not poll). Once woken it writes
//! what has arrived, flushes the sink, and while records keep coming it
//! takes what gathered every `GATHER` instead of blocking again: a thread
//! blocked on the queue is woken by every send (a futex wake on the
//! sender's thread, a vCPU's for conversion events), one that is not costs
//! the sender nothing.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use crate::seccomp_filters::{SeccompError, spawn_filtered};

/// How long a busy writer lets records gather before it takes them: the
/// most a record waits in a burst.
const GATHER: Duration = Duration::from_millis(5);

enum Item<R> {
    Record(R),
    /// Answered once every earlier record is written and the sink flushed.
    Flush(SyncSender<()>),
}

/// Writes one record to the sink. `dropped` is how many records were lost
/// so far (the log reports them in its stream).
pub type Format<R, S> = Box<dyn FnMut(&mut S, R, u64) -> std::io::Result<()> + Send>;

/// What the writer thread does with a failed write (once: a reader that
/// went away stays away).
pub type OnError = Box<dyn FnOnce(&std::io::Error) + Send>;

/// The sending side of a lossy writer; the thread ends when it is dropped.
pub struct LossyWriter<R> {
    queue: SyncSender<Item<R>>,
    dropped: Arc<AtomicU64>,
}

impl<R: Send + 'static> LossyWriter<R> {
    /// Starts the thread `name` under `filter`, writing records to `sink`
    /// through `format`, with room for `depth` records in flight.
    pub fn spawn<S: Write + Send + 'static>(
        name: &str,
        depth: usize,
        filter: Option<seccompiler::BpfProgram>,
        sink: S,
        format: Format<R, S>,
        on_error: OnError,
    ) -> Result<Self, SeccompError> {
        let (queue, items) = sync_channel(depth);
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = dropped.clone();
        spawn_filtered(name.to_string(), filter, move || {
            write_records(sink, items, format, on_error, &counted);
        })?;
        Ok(LossyWriter { queue, dropped })
    }

    /// Queues `record`, or counts it dropped when the queue is full (or the
    /// thread is gone). Never blocks.
    pub fn send(&self, record: R) {
        match self.queue.try_send(Item::Record(record)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records lost because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits (at most `timeout`) until every record sent so far is written.
    pub fn flush(&self, timeout: Duration) {
        let (done, written) = sync_channel(1);
        flush_queue(&self.queue, Item::Flush(done), &written, timeout);
    }
}

/// The writer thread: blocks for the next record, writes it and whatever
/// else is already queued, then flushes the sink and answers the flushes
/// that came with them. Ends when every sender is gone.
fn write_records<R, S: Write>(
    mut sink: S,
    items: Receiver<Item<R>>,
    mut format: Format<R, S>,
    on_error: OnError,
    dropped: &AtomicU64,
) {
    let mut on_error = Some(on_error);
    let mut report = |result: std::io::Result<()>| {
        if let Err(e) = result
            && let Some(report) = on_error.take()
        {
            report(&e);
        }
    };
    while let Ok(first) = items.recv() {
        let mut next = Some(first);
        while let Some(first) = next.take() {
            let mut flushes = Vec::new();
            for item in std::iter::once(first).chain(std::iter::from_fn(|| items.try_recv().ok())) {
                match item {
                    Item::Record(record) => {
                        report(format(&mut sink, record, dropped.load(Ordering::Relaxed)));
                    }
                    Item::Flush(done) => flushes.push(done),
                }
            }
            report(sink.flush());
            for done in flushes {
                let _ = done.send(());
            }
            // A burst: let the next records gather unwoken; back to
            // blocking once a pause leaves nothing.
            std::thread::sleep(GATHER);
            next = items.try_recv().ok();
        }
    }
    report(sink.flush());
}

/// Queues `flush`, a marker its writer answers on `written` once every
/// earlier message is out, and waits for that answer; all within
/// `timeout`, so a stalled writer delays shutdown by no more.
pub fn flush_queue<M>(queue: &SyncSender<M>, flush: M, written: &Receiver<()>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let mut message = flush;
    loop {
        match queue.try_send(message) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                message = m;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
    let _ = written.recv_timeout(deadline.saturating_duration_since(Instant::now()));
}
