// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! PCI: segment 0 with its host bridge and configuration access (legacy
//! ports and ECAM), BAR registers, MSI-X emulation, and the PCI function
//! model of assigned devices (VFIO and vfio-user share it through
//! `VfioOps`). Knows nothing of KVM or of guest memory conversions.

mod bus;
pub mod configuration;
pub mod msix;
mod vfio_pci;

pub use bus::{
    BarWindow, CONFIG_IO_LEN, CONFIG_IO_PORT, DirectArea, ECAM_SIZE, GuestMemoryWindows,
    HostBridge, PciBus, PciBusError, PciConfigIo, PciConfigMmio, PciDevice, SLOTS, WindowError,
};
pub use vfio_pci::{
    CONFIG_REGION, MAX_BAR32_SIZE, MAX_BAR64_SIZE, MSIX_IRQ_INDEX, VfioOps, VfioOpsError,
    VfioPciDevice, VfioPciError,
};

/// A function's address on segment 0 as Cloud Hypervisor prints it.
pub fn bdf(slot: u8) -> String {
    format!("0000:00:{slot:02x}.0")
}

#[cfg(test)]
mod tests;
