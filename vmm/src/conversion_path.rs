//! The guest-facing end of conversions: every source (hypercall, memory
//! fault, doorbell) calls `ConversionPath::convert`, which runs the memory
//! manager's conversion and reports it to the event monitor.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::{ConversionHandler, DoorbellStatus};
use hypervisor::MemoryConversion;
use log::{info, warn};

use crate::event_monitor::EventMonitor;
use crate::memory::{ConversionFailure, ConversionOutcome, MemoryManager};

pub struct ConversionPath {
    memory: Arc<MemoryManager>,
    events: Arc<EventMonitor>,
    refusal_log: RateLimit,
}

/// At most `BURST` log lines per second, so a guest that keeps asking for
/// refused conversions cannot flood the log; the rest are counted.
pub struct RateLimit {
    started: Instant,
    /// (second since `started`, lines logged in it, lines suppressed since
    /// the last logged one).
    window: Mutex<(u64, u32, u64)>,
}

impl RateLimit {
    pub const BURST: u32 = 10;

    pub fn new() -> Self {
        RateLimit {
            started: Instant::now(),
            window: Mutex::new((0, 0, 0)),
        }
    }

    /// `Some(suppressed before this one)` if this line may be logged.
    pub fn admit(&self) -> Option<u64> {
        let now = self.started.elapsed().as_secs();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        if w.0 != now {
            w.0 = now;
            w.1 = 0;
        }
        if w.1 >= Self::BURST {
            w.2 += 1;
            return None;
        }
        w.1 += 1;
        Some(std::mem::take(&mut w.2))
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl ConversionPath {
    pub fn new(memory: Arc<MemoryManager>, events: Arc<EventMonitor>) -> Self {
        ConversionPath {
            memory,
            events,
            refusal_log: RateLimit::new(),
        }
    }

    pub fn convert(
        &self,
        request: MemoryConversion,
        vcpu: u8,
    ) -> Result<ConversionOutcome, ConversionFailure> {
        let started = Instant::now();
        let result = self.memory.convert(request);
        let elapsed = started.elapsed();
        match &result {
            Ok(outcome) => info!(
                "vCPU {vcpu}: converted {:#x}+{:#x} to {} ({} pages changed)",
                request.gpa,
                request.size,
                request.direction.name(),
                outcome.changed_pages
            ),
            Err(e) => {
                if let Some(suppressed) = self.refusal_log.admit() {
                    warn!(
                        "vCPU {vcpu}: conversion of {:#x}+{:#x} to {} refused: {}{}",
                        request.gpa,
                        request.size,
                        request.direction.name(),
                        crate::error_chain(e),
                        if suppressed > 0 {
                            format!(" ({suppressed} more refusals not logged)")
                        } else {
                            String::new()
                        }
                    );
                }
            }
        }
        self.events.conversion(&request, &result, elapsed);
        result
    }
}

pub fn doorbell_status(result: &Result<ConversionOutcome, ConversionFailure>) -> DoorbellStatus {
    match result {
        Ok(_) => DoorbellStatus::Ok,
        Err(ConversionFailure::Invalid { .. }) => DoorbellStatus::Invalid,
        Err(ConversionFailure::OutOfRange { .. }) => DoorbellStatus::OutOfRange,
        Err(ConversionFailure::ListenerFailed(_)) => DoorbellStatus::ListenerFailed,
        Err(ConversionFailure::Hypervisor(_)) => DoorbellStatus::HypervisorError,
    }
}

pub struct DoorbellHandler(pub Arc<ConversionPath>);

impl ConversionHandler for DoorbellHandler {
    fn convert(&self, conversion: MemoryConversion, bank: u8) -> DoorbellStatus {
        doorbell_status(&self.0.convert(conversion, bank))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_logged_in_bursts_and_the_rest_counted() {
        let limit = RateLimit::new();
        let admitted: Vec<_> = (0..25).map(|_| limit.admit()).collect();
        assert_eq!(
            admitted.iter().filter(|a| a.is_some()).count(),
            RateLimit::BURST as usize
        );
        assert!(
            admitted[RateLimit::BURST as usize..]
                .iter()
                .all(Option::is_none)
        );
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(limit.admit(), Some(15));
        assert_eq!(limit.admit(), Some(0));
    }
}
