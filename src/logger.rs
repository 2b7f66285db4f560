//! A `log` backend writing "[time level target] message" lines to stderr or a file.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

struct Logger {
    out: Mutex<Box<dyn Write + Send>>,
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
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(
            out,
            "cloud-hypervisor: {:>6}.{:06}s: <{}> {}:{} -- {}",
            elapsed.as_secs(),
            elapsed.subsec_micros(),
            std::thread::current().name().unwrap_or("anonymous"),
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {
        let _ = self.out.lock().map(|mut o| o.flush());
    }
}

pub fn init(verbosity: u8, file: Option<&Path>) -> std::io::Result<()> {
    let level = match verbosity {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let out: Box<dyn Write + Send> = match file {
        Some(path) => Box::new(File::create(path)?),
        None => Box::new(std::io::stderr()),
    };
    let logger = Logger {
        out: Mutex::new(out),
        started: Instant::now(),
        level,
    };
    // Only fails if a logger is already set, which main never does twice.
    let _ = log::set_boxed_logger(Box::new(logger));
    log::set_max_level(level);
    Ok(())
}
