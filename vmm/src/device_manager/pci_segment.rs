//! PCI segment 0 as the VMM wires it: the bus and its configuration access
//! (ports 0xCF8..0xD00 and the ECAM window), BAR placement in the MMIO hole
//! and above RAM, and MSI-X vectors routed through KVM's irqchip by irqfd.
//! See docs/design.md ("PCI layout") for the addresses.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use hypervisor::UserMemoryRegion;
use hypervisor::{EventFd, MsiRoute, Vm};
use log::{debug, warn};
use pci::configuration::BarKind;
use pci::{GuestMemoryWindows, PciBus, PciConfigIo, PciConfigMmio, VfioPciDevice};
use vm_device::{Bus, BusError, InterruptError, MsiMessage, MsiVectors};

/// ECAM window for bus 0 (1 MiB), at the top of the 32-bit BAR window.
pub const ECAM_BASE: u64 = 0xe000_0000;
/// 32-bit BARs go here, in the MMIO hole below 4 GiB.
pub const MMIO32_START: u64 = 0xc000_0000;
pub const MMIO32_END: u64 = ECAM_BASE;
/// 64-bit BARs go above RAM and 4 GiB, in a window of this size.
pub const MMIO64_SIZE: u64 = 64 << 30;
/// GSIs below this belong to the irqchip's IOAPIC / PIC pins.
const FIRST_MSI_GSI: u32 = 24;
/// KVM's default routing table size bounds the GSIs a VM can route.
const GSI_LIMIT: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PciSegmentError {
    #[error("no room for a {size:#x}-byte BAR")]
    NoBarSpace { size: u64 },
    #[error("cannot place the PCI function")]
    Bus(#[source] pci::PciBusError),
    #[error("cannot claim the configuration window")]
    Window(#[source] BusError),
}

/// First-fit placement of naturally aligned BARs in one window.
struct Window {
    start: u64,
    end: u64,
    used: BTreeMap<u64, u64>,
}

impl Window {
    fn new(start: u64, end: u64) -> Self {
        Window {
            start,
            end,
            used: BTreeMap::new(),
        }
    }

    fn allocate(&mut self, size: u64) -> Option<u64> {
        let mut candidate = self.start.next_multiple_of(size);
        for (&base, &len) in &self.used {
            if candidate + size <= base {
                break;
            }
            candidate = candidate.max((base + len).next_multiple_of(size));
        }
        (candidate.checked_add(size)? <= self.end).then(|| {
            self.used.insert(candidate, size);
            candidate
        })
    }

    fn free(&mut self, base: u64) {
        self.used.remove(&base);
    }
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
    /// Builds segment 0 and claims its configuration access windows.
    pub fn new(
        io_bus: &Bus,
        mmio_bus: Arc<Bus>,
        ram_end: u64,
        vm: Arc<dyn Vm>,
    ) -> Result<Self, PciSegmentError> {
        let windows: Arc<dyn GuestMemoryWindows> = Arc::new(BarMemorySlots::new(vm.clone()));
        let bus = Arc::new(PciBus::with_memory_windows(mmio_bus.clone(), Some(windows)));
        io_bus
            .insert(
                Arc::new(PciConfigIo::new(bus.clone())),
                pci::CONFIG_IO_PORT,
                pci::CONFIG_IO_LEN,
            )
            .map_err(PciSegmentError::Window)?;
        mmio_bus
            .insert(
                Arc::new(PciConfigMmio::new(bus.clone())),
                ECAM_BASE,
                pci::ECAM_SIZE,
            )
            .map_err(PciSegmentError::Window)?;
        let high = ram_end.max(1 << 32).next_multiple_of(1 << 30);
        let router = vm.has_irqchip().then(|| Arc::new(MsiRouter::new(vm)));
        Ok(PciSegment {
            bus,
            windows: Mutex::new((
                Window::new(MMIO32_START, MMIO32_END),
                Window::new(high, high + MMIO64_SIZE),
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

/// KVM memory slots for mmapped BAR areas, above the slots RAM uses.
const FIRST_BAR_SLOT: u32 = 256;
/// x86 KVM's user memory slot count.
const SLOT_LIMIT: u32 = 509;

/// Mmapped BAR areas as KVM memory slots: guest accesses there do not exit.
struct BarMemorySlots {
    vm: Arc<dyn Vm>,
    taken: Mutex<std::collections::BTreeSet<u32>>,
}

impl BarMemorySlots {
    fn new(vm: Arc<dyn Vm>) -> Self {
        BarMemorySlots {
            vm,
            taken: Mutex::new(std::collections::BTreeSet::new()),
        }
    }
}

impl GuestMemoryWindows for BarMemorySlots {
    fn map(&self, gpa: u64, size: u64, host: u64) -> Result<u32, String> {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (FIRST_BAR_SLOT..SLOT_LIMIT)
            .find(|s| !taken.contains(s))
            .ok_or("no free memory slot")?;
        let region = UserMemoryRegion {
            slot,
            guest_phys_addr: gpa,
            size,
            userspace_addr: host,
            guest_memfd: None,
        };
        // SAFETY: `host..host+size` is a device's mmapped BAR area, which
        // its PCI function keeps mapped until after the bus has removed
        // this slot (unmap below), as `PciBus` does on every window change
        // and on unplug.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| crate::error_chain(&e))?;
        taken.insert(slot);
        Ok(slot)
    }

    fn unmap(&self, slot: u32) {
        let region = UserMemoryRegion {
            slot,
            guest_phys_addr: 0,
            size: 0,
            userspace_addr: 0,
            guest_memfd: None,
        };
        // SAFETY: a zero-size region deletes the slot; no host memory is
        // handed to KVM.
        match unsafe { self.vm.set_user_memory_region(region) } {
            Ok(()) => {
                self.taken
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&slot);
            }
            Err(e) => warn!("cannot delete BAR memory slot {slot}: {e}"),
        }
    }
}

/// The VM's MSI routing table: KVM takes it whole, so every change rewrites
/// it from this copy.
pub struct MsiRouter {
    vm: Arc<dyn Vm>,
    table: Mutex<RouterTable>,
}

#[derive(Default)]
struct RouterTable {
    routes: BTreeMap<u32, MsiRoute>,
    taken: std::collections::BTreeSet<u32>,
}

impl MsiRouter {
    fn new(vm: Arc<dyn Vm>) -> Self {
        MsiRouter {
            vm,
            table: Mutex::new(RouterTable::default()),
        }
    }

    fn table(&self) -> MutexGuard<'_, RouterTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn allocate(&self, count: u16) -> Option<Vec<u32>> {
        let mut t = self.table();
        let free: Vec<u32> = (FIRST_MSI_GSI..GSI_LIMIT)
            .filter(|g| !t.taken.contains(g))
            .take(usize::from(count))
            .collect();
        (free.len() == usize::from(count)).then(|| {
            t.taken.extend(&free);
            free
        })
    }

    fn release(&self, gsis: &[u32]) {
        let mut t = self.table();
        for g in gsis {
            t.taken.remove(g);
            t.routes.remove(g);
        }
        let routes: Vec<MsiRoute> = t.routes.values().copied().collect();
        if let Err(e) = self.vm.set_msi_routes(&routes) {
            warn!("cannot drop MSI routes: {e}");
        }
    }

    /// Sets or clears one GSI's route; the table is unchanged on failure.
    fn set(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), InterruptError> {
        let mut t = self.table();
        let previous = match message {
            Some(m) => t.routes.insert(
                gsi,
                MsiRoute {
                    gsi,
                    address: m.address,
                    data: m.data,
                },
            ),
            None => t.routes.remove(&gsi),
        };
        let routes: Vec<MsiRoute> = t.routes.values().copied().collect();
        self.vm.set_msi_routes(&routes).map_err(|e| {
            match previous {
                Some(p) => t.routes.insert(gsi, p),
                None => t.routes.remove(&gsi),
            };
            InterruptError::Route(crate::error_chain(&e))
        })
    }
}

/// One device's MSI-X vectors: a GSI and an eventfd each; the eventfd is
/// bound to its GSI by irqfd while the vector is routed.
struct KvmMsiVectors {
    router: Arc<MsiRouter>,
    gsis: Vec<u32>,
    fds: Vec<EventFd>,
    bound: Mutex<Vec<bool>>,
}

impl KvmMsiVectors {
    fn new(router: Arc<MsiRouter>, count: u16) -> Result<Self, String> {
        let gsis = router
            .allocate(count)
            .ok_or_else(|| format!("no {count} free GSIs"))?;
        let fds = (0..count)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                router.release(&gsis);
                format!("cannot create eventfds: {e}")
            })?;
        Ok(KvmMsiVectors {
            router,
            gsis,
            fds,
            bound: Mutex::new(vec![false; usize::from(count)]),
        })
    }
}

impl MsiVectors for KvmMsiVectors {
    fn count(&self) -> u16 {
        self.gsis.len() as u16
    }

    fn notifier(&self, vector: u16) -> Option<RawFd> {
        self.fds.get(usize::from(vector)).map(AsRawFd::as_raw_fd)
    }

    fn route(&self, vector: u16, message: Option<MsiMessage>) -> Result<(), InterruptError> {
        let i = usize::from(vector);
        let (Some(&gsi), Some(fd)) = (self.gsis.get(i), self.fds.get(i)) else {
            return Err(InterruptError::NoSuchVector(vector));
        };
        let mut bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        debug!("MSI vector {vector} (GSI {gsi}) routed to {message:?}");
        match message {
            Some(_) => {
                self.router.set(gsi, message)?;
                if !bound[i] {
                    // An interrupt raised while unbound waits in the eventfd;
                    // KVM delivers it as soon as the irqfd is bound.
                    self.router
                        .vm
                        .register_irqfd(fd, gsi)
                        .map_err(|e| InterruptError::Route(crate::error_chain(&e)))?;
                    bound[i] = true;
                }
            }
            None => {
                if bound[i] {
                    self.router
                        .vm
                        .unregister_irqfd(fd, gsi)
                        .map_err(|e| InterruptError::Route(crate::error_chain(&e)))?;
                    bound[i] = false;
                }
                self.router.set(gsi, None)?;
            }
        }
        Ok(())
    }
}

impl Drop for KvmMsiVectors {
    fn drop(&mut self) {
        let bound = self.bound.lock().unwrap_or_else(|e| e.into_inner());
        for (i, &b) in bound.iter().enumerate() {
            if b {
                let _ = self.router.vm.unregister_irqfd(&self.fds[i], self.gsis[i]);
            }
        }
        self.router.release(&self.gsis);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_are_placed_naturally_aligned_first_fit_and_reused_after_free() {
        let mut w = Window::new(0xc000_0000, 0xc001_0000);
        assert_eq!(w.allocate(0x1000), Some(0xc000_0000));
        assert_eq!(w.allocate(0x4000), Some(0xc000_4000), "aligned to its size");
        assert_eq!(w.allocate(0x1000), Some(0xc000_1000), "fills the gap");
        assert_eq!(w.allocate(0x8000), Some(0xc000_8000));
        assert_eq!(w.allocate(0x8000), None, "window full");
        w.free(0xc000_4000);
        assert_eq!(w.allocate(0x4000), Some(0xc000_4000));
        assert_eq!(Window::new(0, 0x1000).allocate(0x2000), None);
    }
}
