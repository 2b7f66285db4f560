//! PCI segment 0 as the VMM wires it: the bus and its configuration access
//! (ports 0xCF8..0xD00 and the ECAM window), BAR placement in the MMIO hole
//! and above RAM, and MSI-X vectors routed through KVM's irqchip by irqfd.
//! See docs/design.md ("PCI layout") for the addresses.

use std::sync::{Arc, Mutex, MutexGuard};

use hypervisor::Vm;
use log::warn;
use pci::configuration::BarKind;
use pci::{GuestMemoryWindows, PciBus, PciConfigIo, PciConfigMmio, VfioPciDevice};
use vm_device::{Bus, BusError, MsiVectors};

pub use arch::layout::{ECAM_BASE, MMIO32_END, MMIO32_START, MMIO64_SIZE};

mod kvm_slots;
mod msi;
#[cfg(test)]
mod tests;
mod windows;

use kvm_slots::BarMemorySlots;
use msi::KvmMsiVectors;
pub use msi::MsiRouter;
use windows::Window;
pub use windows::bar_windows;

#[derive(Debug, thiserror::Error)]
pub enum PciSegmentError {
    #[error("no room for a {size:#x}-byte BAR")]
    NoBarSpace { size: u64 },
    #[error("cannot place the PCI function")]
    Bus(#[source] pci::PciBusError),
    #[error("cannot claim the configuration window")]
    Window(#[source] BusError),
}

/// A plugged function and what it was given.
pub struct PluggedFunction {
    pub slot: u8,
    pub function: Arc<VfioPciDevice>,
    bars: Vec<(BarKind, u64)>,
}

pub struct PciSegment {
    bus: Arc<PciBus>,
    windows: Mutex<(Window, Window)>,
    router: Option<Arc<MsiRouter>>,
}

impl PciSegment {
    /// The VM's MSI routing table, where the VM has an irqchip.
    pub fn msi_router(&self) -> Option<&Arc<MsiRouter>> {
        self.router.as_ref()
    }

    /// Builds segment 0 and claims its configuration access windows.
    pub fn new(
        io_bus: &Bus,
        mmio_bus: Arc<Bus>,
        ram_end: u64,
        vm: Arc<dyn Vm>,
    ) -> Result<Self, PciSegmentError> {
        let windows: Arc<dyn GuestMemoryWindows> = Arc::new(BarMemorySlots::new(vm.clone()));
        let (low, high) = bar_windows(ram_end);
        // BARs decode only in the windows they are placed in: a guest
        // moving one onto RAM, the LAPIC or ECAM gets a BAR that decodes
        // nothing, never a memory slot over RAM or a window over ECAM.
        let bus = Arc::new(
            PciBus::with_memory_windows(mmio_bus.clone(), Some(windows))
                .with_apertures(vec![low.clone(), high.clone()]),
        );
        io_bus
            .insert(
                Arc::new(PciConfigIo::new(bus.clone())),
                pci::CONFIG_IO_PORT,
                pci::CONFIG_IO_LEN,
            )
            .map_err(PciSegmentError::Window)?;
        mmio_bus
            .insert(
                Arc::new(PciConfigMmio::new(&bus)),
                ECAM_BASE,
                pci::ECAM_SIZE,
            )
            .map_err(PciSegmentError::Window)?;
        let router = vm.has_irqchip().then(|| Arc::new(MsiRouter::new(vm)));
        Ok(PciSegment {
            bus,
            windows: Mutex::new((
                Window::new(low.start, low.end),
                Window::new(high.start, high.end),
            )),
            router,
        })
    }

    pub fn bus(&self) -> &Arc<PciBus> {
        &self.bus
    }

    fn windows(&self) -> MutexGuard<'_, (Window, Window)> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `count` MSI vectors routed through the irqchip, if the VM has one.
    pub fn msi_vectors(&self, count: u16) -> Option<Arc<dyn MsiVectors>> {
        let router = self.router.as_ref()?;
        match KvmMsiVectors::new(router.clone(), count) {
            Ok(v) => Some(Arc::new(v)),
            Err(e) => {
                warn!("no MSI-X for this device: {e}");
                None
            }
        }
    }

    /// Places the function's BARs and puts it in `slot` (Cloud
    /// Hypervisor's `pci_device_id`) or the lowest free slot.
    pub fn plug(
        &self,
        function: Arc<VfioPciDevice>,
        slot: Option<u8>,
    ) -> Result<PluggedFunction, PciSegmentError> {
        let mut bars = Vec::new();
        {
            let mut windows = self.windows();
            for (index, size, kind) in function.bar_requests() {
                let window = match kind {
                    BarKind::Mem32 => &mut windows.0,
                    BarKind::Mem64 => &mut windows.1,
                };
                let Some(base) = window.allocate(size) else {
                    drop(windows);
                    self.free(&bars);
                    return Err(PciSegmentError::NoBarSpace { size });
                };
                function.set_bar_address(index, base);
                bars.push((kind, base));
            }
        }
        match self.bus.add_at(slot, function.clone()) {
            Ok(slot) => Ok(PluggedFunction {
                slot,
                function,
                bars,
            }),
            Err(e) => {
                self.free(&bars);
                Err(PciSegmentError::Bus(e))
            }
        }
    }

    /// Takes the function off the bus (its configuration space reads all
    /// ones from now on), withdraws its interrupts and frees its BARs.
    pub fn unplug(&self, plugged: &PluggedFunction) {
        if let Err(e) = self.bus.remove(plugged.slot) {
            warn!("unplugging slot {}: {e}", plugged.slot);
        }
        plugged.function.shut_down();
        self.free(&plugged.bars);
    }

    fn free(&self, bars: &[(BarKind, u64)]) {
        let mut windows = self.windows();
        for &(kind, base) in bars {
            match kind {
                BarKind::Mem32 => windows.0.free(base),
                BarKind::Mem64 => windows.1.free(base),
            }
        }
    }

    /// A plugged function as the bus reaches it (tests).
    pub fn function(&self, slot: u8) -> u32 {
        self.bus.config_read(0, usize::from(slot), 0, 0)
    }
}
