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

/// The 32- and 64-bit BAR windows of segment 0 for RAM ending at
/// `ram_end`: the 64-bit one starts at the first GiB boundary above RAM
/// and 4 GiB (what the ACPI host bridge's _CRS reports too).
pub fn bar_windows(ram_end: u64) -> (std::ops::Range<u64>, std::ops::Range<u64>) {
    let high = ram_end.max(1 << 32).next_multiple_of(1 << 30);
    (MMIO32_START..MMIO32_END, high..high + MMIO64_SIZE)
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
    fn map(&self, gpa: u64, size: u64, host: u64) -> Result<u32, pci::WindowError> {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (FIRST_BAR_SLOT..SLOT_LIMIT)
            .find(|s| !taken.contains(s))
            .ok_or(pci::WindowError::NoFreeSlot)?;
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
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| pci::WindowError::Refused(e.into()))?;
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

    use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};

    use hypervisor::{Hypervisor, VmType};
    use pci::{VfioOps, VfioOpsError};

    /// A real KVM VM (with its irqchip) whose route, irqfd and memory-slot
    /// calls are recorded on their way to KVM, and can be made to fail.
    struct RecordingVm {
        inner: Arc<dyn Vm>,
        routes: Mutex<Vec<MsiRoute>>,
        irqfds: Mutex<Vec<(u32, bool)>>,
        slots: Mutex<Vec<(u32, u64)>>,
        fail_routes: AtomicBool,
        fail_slots: AtomicBool,
    }

    impl Vm for RecordingVm {
        fn vm_type(&self) -> VmType {
            self.inner.vm_type()
        }
        fn capabilities(&self) -> &hypervisor::Capabilities {
            self.inner.capabilities()
        }
        fn create_guest_memfd(
            &self,
            size: u64,
            flags: u64,
        ) -> hypervisor::Result<std::os::fd::OwnedFd> {
            self.inner.create_guest_memfd(size, flags)
        }
        unsafe fn set_user_memory_region(
            &self,
            region: UserMemoryRegion,
        ) -> hypervisor::Result<()> {
            if self.fail_slots.load(AtomicOrdering::Relaxed) {
                return Err(hypervisor::HypervisorError::NoIrqchip);
            }
            self.slots.lock().unwrap().push((region.slot, region.size));
            // SAFETY: the caller's promise is passed on unchanged.
            unsafe { self.inner.set_user_memory_region(region) }
        }
        fn set_memory_attributes(
            &self,
            gpa: u64,
            size: u64,
            private: bool,
        ) -> hypervisor::Result<()> {
            self.inner.set_memory_attributes(gpa, size, private)
        }
        fn supports_memory_attributes(&self) -> bool {
            self.inner.supports_memory_attributes()
        }
        fn create_vcpu(&self, id: u8) -> hypervisor::Result<Box<dyn hypervisor::Vcpu>> {
            self.inner.create_vcpu(id)
        }
        fn supported_cpuid(&self) -> Vec<hypervisor::arch::CpuidEntry> {
            self.inner.supported_cpuid()
        }
        fn create_pit(&self) -> hypervisor::Result<()> {
            self.inner.create_pit()
        }
        fn has_irqchip(&self) -> bool {
            self.inner.has_irqchip()
        }
        fn set_msi_routes(&self, routes: &[MsiRoute]) -> hypervisor::Result<()> {
            if self.fail_routes.load(AtomicOrdering::Relaxed) {
                return Err(hypervisor::HypervisorError::NoIrqchip);
            }
            self.inner.set_msi_routes(routes)?;
            *self.routes.lock().unwrap() = routes.to_vec();
            Ok(())
        }
        fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> hypervisor::Result<()> {
            self.inner.register_irqfd(fd, gsi)?;
            self.irqfds.lock().unwrap().push((gsi, true));
            Ok(())
        }
        fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> hypervisor::Result<()> {
            self.inner.unregister_irqfd(fd, gsi)?;
            self.irqfds.lock().unwrap().push((gsi, false));
            Ok(())
        }
        fn create_vfio_device(&self) -> hypervisor::Result<hypervisor::KvmVfioDevice> {
            self.inner.create_vfio_device()
        }
    }

    fn recording_vm() -> Option<Arc<RecordingVm>> {
        let hv = crate::test_util::kvm()?;
        Some(Arc::new(RecordingVm {
            inner: hv.create_vm(VmType::Default).unwrap(),
            routes: Mutex::default(),
            irqfds: Mutex::default(),
            slots: Mutex::default(),
            fail_routes: AtomicBool::new(false),
            fail_slots: AtomicBool::new(false),
        }))
    }

    fn segment(vm: &Arc<RecordingVm>, ram_end: u64) -> PciSegment {
        PciSegment::new(&Bus::new(), Arc::new(Bus::new()), ram_end, vm.clone()).unwrap()
    }

    fn message(n: u32) -> Option<MsiMessage> {
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x40 + n,
        })
    }

    #[test]
    fn msi_vectors_get_their_own_gsis_routes_and_irqfds_and_give_them_back() {
        let Some(vm) = recording_vm() else { return };
        let seg = segment(&vm, 1 << 30);
        let first = seg.msi_vectors(4).unwrap();
        let second = seg.msi_vectors(2).unwrap();
        assert_eq!((first.count(), second.count()), (4, 2));
        assert_ne!(first.notifier(0), first.notifier(1));
        assert!(first.notifier(4).is_none());
        first.route(1, message(1)).unwrap();
        second.route(0, message(7)).unwrap();
        let routes = vm.routes.lock().unwrap().clone();
        assert_eq!(
            routes,
            [
                MsiRoute {
                    gsi: 25,
                    address: 0xfee0_0000,
                    data: 0x41
                },
                MsiRoute {
                    gsi: 28,
                    address: 0xfee0_0000,
                    data: 0x47
                },
            ],
            "GSIs from 24 on, one per vector, in order"
        );
        // Re-routing a bound vector moves the route, binds nothing again.
        first.route(1, message(2)).unwrap();
        assert_eq!(*vm.irqfds.lock().unwrap(), [(25, true), (28, true)]);
        // Masking unbinds and drops the route.
        first.route(1, None).unwrap();
        assert_eq!(vm.irqfds.lock().unwrap().last(), Some(&(25, false)));
        assert_eq!(vm.routes.lock().unwrap().len(), 1);
        assert!(matches!(
            first.route(9, message(0)),
            Err(InterruptError::NoSuchVector(9))
        ));
        // A refused routing table changes nothing.
        vm.fail_routes.store(true, AtomicOrdering::Relaxed);
        assert!(first.route(0, message(3)).is_err());
        vm.fail_routes.store(false, AtomicOrdering::Relaxed);
        first.route(2, message(4)).unwrap();
        let gsis: Vec<u32> = vm.routes.lock().unwrap().iter().map(|r| r.gsi).collect();
        assert_eq!(gsis, [26, 28], "the refused route of GSI 24 never landed");
        // Dropping a device unbinds its vectors and frees its GSIs.
        drop(second);
        assert_eq!(vm.irqfds.lock().unwrap().last(), Some(&(28, false)));
        let gsis: Vec<u32> = vm.routes.lock().unwrap().iter().map(|r| r.gsi).collect();
        assert_eq!(gsis, [26]);
        let third = seg.msi_vectors(2).unwrap();
        third.route(0, message(5)).unwrap();
        third.route(1, message(6)).unwrap();
        let gsis: Vec<u32> = vm.routes.lock().unwrap().iter().map(|r| r.gsi).collect();
        assert_eq!(gsis, [26, 28, 29], "freed GSIs are reused");
        // More vectors than GSIs left: none at all.
        assert!(
            seg.msi_vectors((GSI_LIMIT - FIRST_MSI_GSI) as u16)
                .is_none()
        );
    }

    #[test]
    fn bar_memory_slots_start_above_ram_slots_and_are_reused() {
        let Some(vm) = recording_vm() else { return };
        let slots = BarMemorySlots::new(vm.clone());
        // SAFETY: a private anonymous mapping, alive until the end of the
        // test, after the slots are gone.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                0x2000,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as u64;
        assert_eq!(
            slots.map(0xc000_0000, 0x1000, host).unwrap(),
            FIRST_BAR_SLOT
        );
        assert_eq!(
            slots.map(0xc000_1000, 0x1000, host + 0x1000).unwrap(),
            FIRST_BAR_SLOT + 1
        );
        slots.unmap(FIRST_BAR_SLOT);
        assert_eq!(
            vm.slots.lock().unwrap().last(),
            Some(&(FIRST_BAR_SLOT, 0)),
            "deleted"
        );
        assert_eq!(
            slots.map(0xc000_2000, 0x1000, host).unwrap(),
            FIRST_BAR_SLOT
        );
        // A slot KVM refuses is not taken.
        vm.fail_slots.store(true, AtomicOrdering::Relaxed);
        assert!(slots.map(0xc000_3000, 0x1000, host).is_err());
        vm.fail_slots.store(false, AtomicOrdering::Relaxed);
        assert_eq!(
            slots.map(0xc000_3000, 0x1000, host + 0x1000).unwrap(),
            FIRST_BAR_SLOT + 2
        );
        for slot in [FIRST_BAR_SLOT, FIRST_BAR_SLOT + 1, FIRST_BAR_SLOT + 2] {
            slots.unmap(slot);
        }
        // SAFETY: the mapping made above; no slot refers to it any more.
        unsafe { libc::munmap(host as *mut libc::c_void, 0x2000) };
    }

    /// A PCI function with a 32-bit BAR0 of 4 KiB and a 64-bit BAR2 of
    /// 1 MiB, and no capabilities.
    struct Function;

    impl VfioOps for Function {
        fn region_size(&self, index: u32) -> Result<u64, VfioOpsError> {
            Ok(match index {
                0 => 0x1000,
                2 => 0x10_0000,
                _ => 0,
            })
        }
        fn region_read(
            &self,
            index: u32,
            offset: u64,
            data: &mut [u8],
        ) -> Result<(), VfioOpsError> {
            let value: u32 = match (index, offset) {
                (7, 0x00) => 0xd3a0_c0de,
                (7, 0x18) => 0b100, // BAR2: 64-bit memory
                _ => 0,
            };
            let bytes = value.to_le_bytes();
            data.copy_from_slice(&bytes[..data.len()]);
            Ok(())
        }
        fn region_write(&self, _: u32, _: u64, _: &[u8]) -> Result<(), VfioOpsError> {
            Ok(())
        }
        fn irq_count(&self, _: u32) -> Result<u32, VfioOpsError> {
            Ok(0)
        }
        fn set_irq_eventfds(&self, _: u32, _: &[RawFd]) -> Result<(), VfioOpsError> {
            Ok(())
        }
        fn reset(&self) -> Result<(), VfioOpsError> {
            Ok(())
        }
    }

    fn function() -> Arc<VfioPciDevice> {
        Arc::new(VfioPciDevice::new(Arc::new(Function), |_| None).unwrap())
    }

    #[test]
    fn functions_get_bars_in_their_windows_a_slot_and_give_both_back() {
        let Some(vm) = recording_vm() else { return };
        let ram_end = 6u64 << 30;
        let seg = segment(&vm, ram_end);
        let a = seg.plug(function(), None).unwrap();
        assert_eq!(a.slot, 1);
        assert_eq!(seg.function(1), 0xd3a0_c0de);
        assert_eq!(
            a.bars,
            [(BarKind::Mem32, MMIO32_START), (BarKind::Mem64, ram_end)],
            "32-bit in the hole, 64-bit above RAM"
        );
        let b = seg.plug(function(), Some(5)).unwrap();
        assert_eq!(b.slot, 5);
        assert_eq!(
            b.bars,
            [
                (BarKind::Mem32, MMIO32_START + 0x1000),
                (BarKind::Mem64, ram_end + 0x10_0000)
            ]
        );
        // A taken slot: refused, and its BARs were given back.
        assert!(matches!(
            seg.plug(function(), Some(5)),
            Err(PciSegmentError::Bus(_))
        ));
        seg.unplug(&a);
        assert_eq!(seg.function(1), u32::MAX, "gone: reads all ones");
        let c = seg.plug(function(), None).unwrap();
        assert_eq!(c.slot, 1);
        assert_eq!(
            c.bars, a.bars,
            "the freed BARs (and no leaked ones) are reused"
        );
        // Below 4 GiB of RAM the 64-bit window starts at 4 GiB.
        let low = segment(&vm, 1 << 30).plug(function(), None).unwrap();
        assert_eq!(low.bars[1], (BarKind::Mem64, 1 << 32));
    }

    /// A guest moving a BAR onto RAM, the ECAM window or the LAPIC page
    /// gets a BAR that decodes nothing; in the 32-bit window, or a 64-bit
    /// BAR in the window above RAM, it decodes where the guest put it.
    #[test]
    fn bars_decode_only_inside_the_segments_windows() {
        let Some(vm) = recording_vm() else { return };
        let ram_end = 6u64 << 30;
        let seg = segment(&vm, ram_end);
        let f = seg.plug(function(), None).unwrap();
        let bus = seg.bus();
        let write = |reg: usize, value: u32| {
            bus.config_write(0, usize::from(f.slot), 0, reg, 0, &value.to_le_bytes())
        };
        write(1, 2);
        assert_eq!(bus.mapped_windows(f.slot).len(), 2);
        for outside in [0x1000_0000, ECAM_BASE as u32, 0xfec0_0000, 0xfee0_0000] {
            write(4, outside);
            let mapped = bus.mapped_windows(f.slot);
            assert_eq!(mapped.len(), 1, "{outside:#x}");
            assert_eq!(mapped[0].bar, 2);
        }
        // BAR2 onto RAM above 4 GiB, then to the end of its window.
        write(6, 0);
        write(7, 1);
        assert_eq!(bus.mapped_windows(f.slot).len(), 0);
        write(4, (MMIO32_END - 0x1000) as u32);
        let end = ram_end + MMIO64_SIZE - 0x10_0000;
        write(6, end as u32);
        write(7, (end >> 32) as u32);
        let mapped = bus.mapped_windows(f.slot);
        assert_eq!(
            mapped.iter().map(|w| w.address).collect::<Vec<_>>(),
            [MMIO32_END - 0x1000, end]
        );
        seg.unplug(&f);
    }
}
