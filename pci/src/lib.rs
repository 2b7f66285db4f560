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

/// An error with its sources, `top: cause: root`, for the logs: a device's
/// error keeps its causes as sources rather than in its own message.
pub(crate) struct Chain<'a>(pub(crate) &'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(e) = cause {
            write!(f, ": {e}")?;
            cause = e.source();
        }
        Ok(())
    }
}

/// A function's address on segment 0 as Cloud Hypervisor prints it.
pub fn bdf(slot: u8) -> String {
    format!("0000:00:{slot:02x}.0")
}

#[cfg(test)]
mod tests;
