// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! Narrow traits between guest-visible devices and the VMM: the I/O bus that
//! routes port and MMIO accesses, DMA mapping for assigned devices, and the
//! discard-listener adapter that makes a DMA mapping follow the shared pages.

mod bus;
mod discard_listener;
mod dma_listener;
mod dma_mapping;
#[cfg(any(test, feature = "test-utils"))]
pub mod fake_iommu;
mod interrupt;

pub use bus::{Bus, BusDevice, BusError};
pub use discard_listener::{ListenerError, MapError, RamDiscardListener, Section, Started};
pub use dma_listener::{DmaMappingListener, DmaStats, FailureHook, MappingPolicy};
pub use dma_mapping::{BoxError, CutOff, DmaBatch, DmaError, DmaOp, ExternalDmaMapping};
pub use interrupt::{InterruptError, MsiMessage, MsiVectors};
