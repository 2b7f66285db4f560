use std::os::fd::RawFd;

use hypervisor::{EventFd, MsiRoute, UserMemoryRegion};
use vm_device::{InterruptError, MsiMessage};

use super::kvm_slots::*;
use super::msi::*;
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
    unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> hypervisor::Result<()> {
        if self.fail_slots.load(AtomicOrdering::Relaxed) {
            return Err(hypervisor::HypervisorError::NoIrqchip);
        }
        self.slots.lock().unwrap().push((region.slot, region.size));
        // SAFETY: the caller's promise is passed on unchanged.
        unsafe { self.inner.set_user_memory_region(region) }
    }
    fn set_memory_attributes(&self, gpa: u64, size: u64, private: bool) -> hypervisor::Result<()> {
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

/// Where RAM ends for the BAR window tests: above the 4 GiB hole, so the
/// 64-bit window starts there.
const HIGH_RAM_END: u64 = 6 << 30;

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
        seg.msi_vectors(u16::try_from(GSI_LIMIT - FIRST_MSI_GSI).unwrap())
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
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError> {
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
    let seg = segment(&vm, HIGH_RAM_END);
    let a = seg.plug(function(), None).unwrap();
    assert_eq!(a.slot, 1);
    assert_eq!(seg.function(1), 0xd3a0_c0de);
    assert_eq!(
        a.bars,
        [
            (BarKind::Mem32, MMIO32_START),
            (BarKind::Mem64, HIGH_RAM_END)
        ],
        "32-bit in the hole, 64-bit above RAM"
    );
    let b = seg.plug(function(), Some(5)).unwrap();
    assert_eq!(b.slot, 5);
    assert_eq!(
        b.bars,
        [
            (BarKind::Mem32, MMIO32_START + 0x1000),
            (BarKind::Mem64, HIGH_RAM_END + 0x10_0000)
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
    let seg = segment(&vm, HIGH_RAM_END);
    let f = seg.plug(function(), None).unwrap();
    let bus = seg.bus();
    let write = |reg: usize, value: u32| {
        bus.config_write(0, usize::from(f.slot), 0, reg, 0, &value.to_le_bytes())
    };
    write(1, 2);
    assert_eq!(bus.mapped_windows(f.slot).len(), 2);
    for outside in [
        0x1000_0000,
        u32::try_from(ECAM_BASE).unwrap(),
        0xfec0_0000,
        0xfee0_0000,
    ] {
        write(4, outside);
        let mapped = bus.mapped_windows(f.slot);
        assert_eq!(mapped.len(), 1, "{outside:#x}");
        assert_eq!(mapped[0].bar, 2);
    }
    // BAR2 onto RAM above 4 GiB, then to the end of its window.
    write(6, 0);
    write(7, 1);
    assert_eq!(bus.mapped_windows(f.slot).len(), 0);
    write(4, u32::try_from(MMIO32_END - 0x1000).unwrap());
    let end = HIGH_RAM_END + MMIO64_SIZE - 0x10_0000;
    write(6, ::arch::low32(end));
    write(7, (end >> 32) as u32);
    let mapped = bus.mapped_windows(f.slot);
    assert_eq!(
        mapped.iter().map(|w| w.address).collect::<Vec<_>>(),
        [MMIO32_END - 0x1000, end]
    );
    seg.unplug(&f);
}
