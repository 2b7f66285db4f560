//! A `log` backend writing "[time level target] message" lines to stderr or
//! a file. Lines are formatted by the thread that logs and written by the
//! `log-writer` thread through a bounded queue, so a log sink that stops
//! draining (a full pipe) never stalls a vCPU: past the queue lines are
//! dropped, and how many is written once the sink drains again.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm::lossy_writer::LossyWriter;
use vmm::seccomp_filters::{self, SeccompMode, Thread};

const QUEUE_DEPTH: usize = 1024;

struct Logger {
    writer: LossyWriter<String>,
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
        self.writer.send(line);
    }

    /// Waits (at most a second) until every line logged so far is written.
    fn flush(&self) {
        self.writer.flush(Duration::from_secs(1));
    }
}

/// Writes `line`, after how many lines were lost since the last one
/// written, if any (`dropped` counts every line lost so far).
fn write_line(
    out: &mut Box<dyn Write + Send>,
    line: &str,
    dropped: u64,
    reported: &mut u64,
) -> std::io::Result<()> {
    let lost = dropped - *reported;
    if lost > 0 {
        *reported = dropped;
        let _ = writeln!(
            out,
            "cloud-hypervisor: {lost} log lines dropped (slow log sink)"
        );
    }
    writeln!(out, "{line}")
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
    let filter =
        seccomp_filters::filter(seccomp, Thread::LogWriter).map_err(LoggerError::Writer)?;
    let mut reported = 0;
    let writer = LossyWriter::spawn(
        "log-writer",
        QUEUE_DEPTH,
        filter,
        out,
        Box::new(move |out, line: String, dropped| write_line(out, &line, dropped, &mut reported)),
        // Nowhere to report it: the log is what failed.
        Box::new(|_| {}),
    )
    .map_err(LoggerError::Writer)?;
    // Leaked on purpose: the logger lives as long as the process.
    let logger: &'static Logger = Box::leak(Box::new(Logger {
        writer,
        started: Instant::now(),
        level,
    }));
    // Only fails if a logger is already set, which main never does twice.
    let _ = log::set_logger(logger);
    log::set_max_level(level);
    Ok(())
}
