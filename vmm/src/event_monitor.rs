//! The event stream (`--event-monitor path=FILE|fd=N`): one JSON object per
//! line, each with a timestamp, a source and an event name.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hypervisor::MemoryConversion;
use log::warn;
use serde_json::{Value, json};

use crate::config::EventMonitorConfig;
use crate::memory::{ConversionFailure, ConversionOutcome};

pub struct EventMonitor {
    sink: Option<Mutex<File>>,
    started: Instant,
}

impl EventMonitor {
    pub fn disabled() -> Self {
        EventMonitor {
            sink: None,
            started: Instant::now(),
        }
    }

    pub fn open(config: &EventMonitorConfig) -> std::io::Result<Self> {
        let file = match config {
            EventMonitorConfig::Path(path) => {
                OpenOptions::new().create(true).append(true).open(path)?
            }
            EventMonitorConfig::Fd(fd) => {
                // SAFETY: the user handed this fd to us on the command line;
                // fcntl checks it is open before we take ownership.
                if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: checked open above; nothing else in the VMM uses it.
                unsafe { File::from_raw_fd(*fd) }
            }
        };
        Ok(EventMonitor {
            sink: Some(Mutex::new(file)),
            started: Instant::now(),
        })
    }

    pub fn emit(&self, source: &str, event: &str, properties: Value) {
        let Some(sink) = &self.sink else {
            return;
        };
        let line = json!({
            "timestamp_us": self.started.elapsed().as_micros() as u64,
            "source": source,
            "event": event,
            "properties": properties,
        });
        let mut file = sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = writeln!(file, "{line}") {
            warn!("event monitor write failed: {e}");
        }
    }

    pub fn conversion(
        &self,
        request: &MemoryConversion,
        result: &Result<ConversionOutcome, ConversionFailure>,
        elapsed: Duration,
    ) {
        let (outcome, changed, error) = match result {
            Ok(o) => ("ok", o.changed_pages, None),
            Err(e) => ("error", 0, Some(crate::error_chain(e))),
        };
        self.emit(
            "memory",
            "conversion",
            json!({
                "gpa": request.gpa,
                "size": request.size,
                "direction": request.direction.name(),
                "result": outcome,
                "error": error,
                "changed_pages": changed,
                "duration_us": elapsed.as_micros() as u64,
            }),
        );
    }
}
