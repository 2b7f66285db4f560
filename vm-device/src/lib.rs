// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! Narrow traits between guest-visible devices and the VMM: the I/O bus that
//! routes port and MMIO accesses, and DMA mapping for assigned devices.

mod bus;
mod dma_mapping;

pub use bus::{Bus, BusDevice, BusError};
pub use dma_mapping::ExternalDmaMapping;
