//! The guest-facing end of conversions: every source (hypercall, memory
//! fault, doorbell) calls `ConversionPath::convert`, which runs the memory
//! manager's conversion and reports it to the event monitor.

use std::sync::Arc;
use std::time::Instant;

use devices::{ConversionHandler, DoorbellStatus};
use hypervisor::MemoryConversion;
use log::{info, warn};

use crate::event_monitor::EventMonitor;
use crate::memory::{ConversionFailure, ConversionOutcome, MemoryManager};

pub struct ConversionPath {
    memory: Arc<MemoryManager>,
    events: Arc<EventMonitor>,
}

impl ConversionPath {
    pub fn new(memory: Arc<MemoryManager>, events: Arc<EventMonitor>) -> Self {
        ConversionPath { memory, events }
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
            Err(e) => warn!(
                "vCPU {vcpu}: conversion of {:#x}+{:#x} to {} refused: {}",
                request.gpa,
                request.size,
                request.direction.name(),
                crate::error_chain(e)
            ),
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
