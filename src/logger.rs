//! A `log` backend writing "[time level target] message" lines to stderr or
//! a file. Lines are formatted by the thread that logs and written by the
//! `log-writer` thread through a bounded queue, so a log sink that stops
//! draining (a full pipe) never stalls a vCPU: past the queue lines are
//! dropped, and how many is written once the sink drains again.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use vmm::event_monitor::flush_queue;
use vmm::seccomp_filters::{self, SeccompMode, Thread};

const QUEUE_DEPTH: usize = 1024;

enum Message {
    Line(String),
    /// Answered once every earlier line is written.
    Flush(SyncSender<()>),
}

struct Logger {
    queue: SyncSender<Message>,
    dropped: AtomicU64,
    started: Instant,
    level: log::LevelFilter,
}

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let elapsed = self.started.elapsed();
        let line = format!(
            "cloud-hypervisor: {:>6}.{:06}s: <{}> {}:{} -- {}",
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            std::thread::current().name().unwrap_or("anonymous"),
            record.level(),
            record.target(),
            record.args()
        );
        if self.queue.try_send(Message::Line(line)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits (at most a second) until every line logged so far is written.
    fn flush(&self) {
        let (done, written) = sync_channel(1);
        flush_queue(
            &self.queue,
            Message::Flush(done),
            &written,
            Duration::from_secs(1),
        );
    }
}

fn write_lines(mut out: Box<dyn Write + Send>, lines: Receiver<Message>, dropped: &AtomicU64) {
    for message in lines {
        match message {
            Message::Line(line) => {
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let _ = writeln!(
                        out,
                        "cloud-hypervisor: {lost} log lines dropped (slow log sink)"
                    );
                }
                let _ = writeln!(out, "{line}");
            }
            Message::Flush(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("cannot open log file")]
    Open(#[source] std::io::Error),
    #[error("cannot start the log writer")]
    Writer(#[source] seccomp_filters::SeccompError),
}

pub fn init(verbosity: u8, file: Option<&Path>, seccomp: SeccompMode) -> Result<(), LoggerError> {
    let level = match verbosity {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let out: Box<dyn Write + Send> = match file {
        Some(path) => Box::new(File::create(path).map_err(LoggerError::Open)?),
        None => Box::new(std::io::stderr()),
    };
    let (queue, lines) = sync_channel(QUEUE_DEPTH);
    // Leaked on purpose: the logger lives as long as the process.
    let logger: &'static Logger = Box::leak(Box::new(Logger {
        queue,
        dropped: AtomicU64::new(0),
        started: Instant::now(),
        level,
    }));
    let filter =
        seccomp_filters::filter(seccomp, Thread::LogWriter).map_err(LoggerError::Writer)?;
    seccomp_filters::spawn_filtered("log-writer".into(), filter, move || {
        write_lines(out, lines, &logger.dropped)
    })
    .map_err(LoggerError::Writer)?;
    // Only fails if a logger is already set, which main never does twice.
    let _ = log::set_logger(logger);
    log::set_max_level(level);
    Ok(())
}
