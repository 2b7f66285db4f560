//! The split irqchip's IOAPIC as the guest and KVM reach it: registers
//! through the MMIO bus, interrupts out as MSIs, EOIs in through the real
//! vCPU loop, and the pins' routes in KVM's table.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use hypervisor::MsiRoute;
use hypervisor::scripted_vcpu::{ScriptedExit, ScriptedVcpu};
use vm_device::{Bus, BusDevice};

use super::{SplitIoapic, SplitIrqchipError};
use crate::GuestEvents;
use crate::tdx::ioapic::{DEST_LOGICAL, MASKED, REMOTE_IRR, TRIGGER_LEVEL};

const BASE: u64 = ::arch::layout::IOAPIC_START;
const IOREGSEL: u64 = BASE;
const IOWIN: u64 = BASE + 0x10;
/// Remote IRR in an entry's low dword.
const IRR: u32 = ::arch::low32(REMOTE_IRR);

/// An IOAPIC on an MMIO bus at the IOAPIC's address, recording its MSIs.
fn recording() -> (Arc<SplitIoapic>, Arc<Bus>, Arc<Mutex<Vec<MsiRoute>>>) {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let log = sent.clone();
    let ioapic = Arc::new(SplitIoapic::new(
        Box::new(move |msi| {
            log.lock().unwrap().push(*msi);
            Ok(())
        }),
        None,
    ));
    let bus = Arc::new(Bus::new());
    bus.insert(ioapic.clone(), BASE, ::arch::layout::PAGE_SIZE)
        .unwrap();
    (ioapic, bus, sent)
}

fn write32(bus: &Bus, addr: u64, value: u32) {
    assert!(bus.write(addr, &value.to_le_bytes()), "{addr:#x} unclaimed");
}

fn read32(bus: &Bus, addr: u64) -> u32 {
    let mut data = [0u8; 4];
    assert!(bus.read(addr, &mut data));
    u32::from_le_bytes(data)
}

/// What a guest does: the high half (destination) first, then the low.
fn program(bus: &Bus, pin: u32, entry: u64) {
    write32(bus, IOREGSEL, 0x10 + 2 * pin + 1);
    write32(bus, IOWIN, (entry >> 32) as u32);
    write32(bus, IOREGSEL, 0x10 + 2 * pin);
    write32(bus, IOWIN, ::arch::low32(entry));
}

fn low_dword(bus: &Bus, pin: u32) -> u32 {
    write32(bus, IOREGSEL, 0x10 + 2 * pin);
    read32(bus, IOWIN)
}

#[test]
fn a_programmed_entry_turns_an_interrupt_into_its_msi() {
    let (ioapic, bus, sent) = recording();
    // The version register through the bus: 24 pins, version 0x11.
    write32(&bus, IOREGSEL, 1);
    assert_eq!(read32(&bus, IOWIN), 0x0017_0011);
    // Physical destination APIC 2, fixed delivery, vector 0x31, edge.
    program(&bus, 4, 0x0200_0000_0000_0000 | 0x31);
    ioapic.set_irq(4, true).unwrap();
    assert_eq!(
        *sent.lock().unwrap(),
        [MsiRoute {
            gsi: 4,
            address: 0xfee0_2000,
            data: 0x31
        }]
    );
    // Logical destination 0x0f, lowest priority (mode 1), level.
    program(
        &bus,
        9,
        0x0f00_0000_0000_0000 | TRIGGER_LEVEL | DEST_LOGICAL | 0x100 | 0x52,
    );
    ioapic.set_irq(9, true).unwrap();
    assert_eq!(
        sent.lock().unwrap()[1],
        MsiRoute {
            gsi: 9,
            address: 0xfee0_f004,
            data: 0x152 | 1 << 15
        }
    );
    // Accesses that are not 32 bits change nothing and read zeros.
    assert!(bus.write(IOREGSEL, &[1]));
    let mut two = [0xffu8; 2];
    assert!(bus.read(IOWIN, &mut two));
    assert_eq!(two, [0, 0]);
    assert_eq!(read32(&bus, IOREGSEL), 0x10 + 2 * 9, "IOREGSEL kept");
    // A pin that does not exist is an error, not a panic.
    assert!(matches!(
        ioapic.set_irq(24, true),
        Err(SplitIrqchipError::NoSuchPin(24))
    ));
    assert_eq!(sent.lock().unwrap().len(), 2);
}

#[test]
fn a_masked_entry_delivers_nothing() {
    let (ioapic, bus, sent) = recording();
    // Masked at reset.
    ioapic.set_irq(3, true).unwrap();
    ioapic.set_irq(3, false).unwrap();
    program(&bus, 3, MASKED | 0x33);
    ioapic.set_irq(3, true).unwrap();
    ioapic.set_irq(3, false).unwrap();
    // A masked level pin stays quiet while asserted, and its EOI too.
    program(&bus, 7, MASKED | TRIGGER_LEVEL | 0x37);
    ioapic.set_irq(7, true).unwrap();
    ioapic.end_of_interrupt(0x37);
    assert!(
        sent.lock().unwrap().is_empty(),
        "{:?}",
        sent.lock().unwrap()
    );
    assert_eq!(low_dword(&bus, 7) & IRR, 0);
    // Unmasking the asserted level pin delivers it once.
    program(&bus, 7, TRIGGER_LEVEL | 0x37);
    assert_eq!(sent.lock().unwrap().len(), 1);
}

/// A level-triggered interrupt holds Remote IRR until the guest's EOI,
/// which reaches the IOAPIC as `KVM_EXIT_IOAPIC_EOI` through the vCPU
/// loop: still asserted, it is delivered again; deasserted, Remote IRR
/// just clears.
#[test]
fn the_eoi_exit_clears_remote_irr_of_a_level_interrupt() {
    let (ioapic, bus, sent) = recording();
    program(&bus, 10, TRIGGER_LEVEL | 0x5a);
    ioapic.set_irq(10, true).unwrap();
    assert_eq!(sent.lock().unwrap().len(), 1);
    assert_ne!(low_dword(&bus, 10) & IRR, 0, "Remote IRR set");
    ioapic.set_irq(10, true).unwrap();
    assert_eq!(sent.lock().unwrap().len(), 1, "nothing more before the EOI");

    // The vCPU loop needs a conversion path; its memory is never used.
    let Some(kvm) = crate::test_util::kvm() else {
        return;
    };
    let vm = hypervisor::Hypervisor::create_vm(&kvm, hypervisor::VmType::Default).unwrap();
    let memory = Arc::new(
        crate::memory::MemoryManager::new(vm, 16 << 20, crate::memory::MemoryLayout::Auto).unwrap(),
    );
    let conversions = Arc::new(crate::conversion_path::ConversionPath::new(
        memory,
        Arc::new(crate::event_monitor::EventMonitor::disabled()),
    ));
    let run_eois = |vectors: &[u8]| {
        let (script, _) = ScriptedVcpu::new(vectors.iter().map(|v| ScriptedExit::IoapicEoi(*v)));
        let (tx, events) = channel();
        let ctx = Arc::new(crate::vcpu::VcpuContext {
            io_bus: Arc::new(Bus::new()),
            mmio_bus: bus.clone(),
            conversions: conversions.clone(),
            events: GuestEvents { vm: 1, tx },
            stop: Arc::new(AtomicBool::new(false)),
            pause: Arc::default(),
            ioapic: Some(ioapic.clone()),
        });
        let mut handle = crate::vcpu::start(0, Box::new(script), ctx, None).unwrap();
        // The script ends with a shutdown exit.
        events
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        handle.stop();
    };
    // Another vector's EOI changes nothing; this one's re-delivers.
    run_eois(&[0x5b, 0x5a]);
    assert_eq!(sent.lock().unwrap().len(), 2, "delivered again at the EOI");
    assert_ne!(low_dword(&bus, 10) & IRR, 0);
    ioapic.set_irq(10, false).unwrap();
    run_eois(&[0x5a]);
    assert_eq!(low_dword(&bus, 10) & IRR, 0, "cleared");
    assert_eq!(sent.lock().unwrap().len(), 2);
}

/// On a real VM with a split irqchip: the unmasked pins' messages are KVM's
/// GSI routes (what it scans for level vectors to report EOIs), beside
/// MSI-X routes, and an interrupt goes out through `KVM_SIGNAL_MSI`
/// without a warning.
#[test]
fn the_pins_routes_reach_kvm_and_interrupts_go_out_as_msis() {
    let Some(kvm) = crate::test_util::kvm() else {
        return;
    };
    let vm = kvm.create_split_irqchip_vm().unwrap();
    assert!(vm.has_split_irqchip() && vm.has_irqchip());
    let _vcpu = vm.create_vcpu(0).unwrap();
    let router = Arc::new(crate::device_manager::pci_segment::MsiRouter::new(
        vm.clone(),
    ));
    let ioapic = SplitIoapic::for_vm(vm.clone(), Some(router.clone()));
    let write = |offset: u64, value: u32| ioapic.write(offset, &value.to_le_bytes());
    let ((), warnings) = crate::test_util::capture_warnings(|| {
        write(0, 0x10 + 2 * 5);
        write(0x10, ::arch::low32(TRIGGER_LEVEL | 0x45));
        ioapic.set_irq(5, true).unwrap();
    });
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        router.routes(),
        [MsiRoute {
            gsi: 5,
            address: 0xfee0_0000,
            data: 0x45 | 1 << 15
        }]
    );
    // Masking the pin takes its route out again.
    write(0x10, ::arch::low32(MASKED | TRIGGER_LEVEL | 0x45));
    assert!(router.routes().is_empty());
    // A route KVM refuses leaves the table as it was.
    let bad = MsiRoute {
        gsi: 1 << 20,
        address: 0xfee0_0000,
        data: 0,
    };
    assert!(
        router.set_ioapic_routes(&[bad]).is_ok(),
        "only pins' GSIs are taken"
    );
    assert!(router.routes().is_empty());
}

/// Port `port` of the test guest: runs `f` on the vCPU thread.
struct Port(Box<dyn Fn() + Send + Sync>);

impl BusDevice for Port {
    fn read(&self, _: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _: u64, _: &[u8]) {
        (self.0)()
    }
}

/// The whole split irqchip on real KVM: a real-mode guest programs pin 5
/// of the userspace IOAPIC through the MMIO bus (level-triggered, vector
/// 0x40), a device asserts the pin, the IOAPIC's MSI reaches the guest
/// through KVM's LAPIC, the guest's handler lowers the line (through a
/// port) and EOIs, and KVM's `KVM_EXIT_IOAPIC_EOI` through the real vCPU
/// loop clears Remote IRR.
#[test]
fn a_real_guest_programs_the_ioapic_takes_its_interrupt_and_eois_it() {
    use vm_memory::{Bytes, GuestAddress};

    use crate::memory::{MemoryLayout, MemoryManager};

    let Some(kvm) = crate::test_util::kvm() else {
        return;
    };
    let vm = kvm.create_split_irqchip_vm().unwrap();
    let memory =
        Arc::new(MemoryManager::new(vm.clone(), 16 << 20, MemoryLayout::Anonymous).unwrap());
    let ram = memory.guest_memory();
    // Vector 0x40: the handler at 0x2000.
    ram.write_slice(&[0x00, 0x20, 0x00, 0x00], GuestAddress(0x40 * 4))
        .unwrap();
    // out 0x40 (the device lowers the line), EOI (a 32-bit write of 0 to
    // ES:0xb0, ES at the LAPIC), hlt.
    ram.write_slice(
        &[
            0xe6, 0x40, 0x26, 0x66, 0xc7, 0x06, 0xb0, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf4,
        ],
        GuestAddress(0x2000),
    )
    .unwrap();
    // Enable the LAPIC (SVR at ES:0xf0); pin 5's entry through IOREGSEL
    // (DS:0x00) and IOWIN (DS:0x10), DS at the IOAPIC: the high half
    // (destination APIC 0), then the low (level, vector 0x40); out 0x10
    // (the device raises the line); sti; hlt.
    let mov_ds = |offset: u8, value: u32| {
        let mut op = vec![0x66, 0xc7, 0x06, offset, 0x00];
        op.extend_from_slice(&value.to_le_bytes());
        op
    };
    let mut code = vec![0x26];
    code.extend(mov_ds(0xf0, 0x1ff));
    code.extend(mov_ds(0x00, 0x10 + 2 * 5 + 1));
    code.extend(mov_ds(0x10, 0));
    code.extend(mov_ds(0x00, 0x10 + 2 * 5));
    code.extend(mov_ds(0x10, 0x8040));
    code.extend([0xe6, 0x10, 0xfb, 0xf4]);
    ram.write_slice(&code, GuestAddress(0x1000)).unwrap();

    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    for segment in [&mut sregs.cs, &mut sregs.ss] {
        segment.base = 0;
        segment.selector = 0;
    }
    sregs.ds.base = BASE;
    sregs.es.base = 0xfee0_0000;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = 0x1000;
    regs.rsp = 0x8000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();

    let ioapic = Arc::new(SplitIoapic::for_vm(
        vm.clone(),
        Some(Arc::new(
            crate::device_manager::pci_segment::MsiRouter::new(vm.clone()),
        )),
    ));
    let mmio_bus = Arc::new(Bus::new());
    mmio_bus
        .insert(ioapic.clone(), BASE, ::arch::layout::PAGE_SIZE)
        .unwrap();
    let io_bus = Arc::new(Bus::new());
    let raise = ioapic.clone();
    io_bus
        .insert(
            Arc::new(Port(Box::new(move || raise.set_irq(5, true).unwrap()))),
            0x10,
            1,
        )
        .unwrap();
    let (handled_tx, handled) = channel();
    let handled_tx = Mutex::new(handled_tx);
    let lower = ioapic.clone();
    let bus = mmio_bus.clone();
    io_bus
        .insert(
            Arc::new(Port(Box::new(move || {
                // In the handler, before its EOI: Remote IRR is set.
                let irr = low_dword(&bus, 5) & IRR;
                lower.set_irq(5, false).unwrap();
                let _ = handled_tx.lock().unwrap().send(irr);
            }))),
            0x40,
            1,
        )
        .unwrap();
    let (tx, _events) = channel();
    let stop = Arc::new(AtomicBool::new(false));
    let ctx = Arc::new(crate::vcpu::VcpuContext {
        io_bus,
        mmio_bus: mmio_bus.clone(),
        conversions: Arc::new(crate::conversion_path::ConversionPath::new(
            memory.clone(),
            Arc::new(crate::event_monitor::EventMonitor::disabled()),
        )),
        events: GuestEvents { vm: 1, tx },
        stop: stop.clone(),
        pause: Arc::default(),
        ioapic: Some(ioapic.clone()),
    });
    let mut handle = crate::vcpu::start(0, vcpu, ctx, None).unwrap();
    let irr = handled.recv_timeout(std::time::Duration::from_secs(10));
    let cleared = irr.is_ok()
        && (0..1000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            low_dword(&mmio_bus, 5) & IRR == 0
        });
    stop.store(true, std::sync::atomic::Ordering::Release);
    handle.stop();
    assert_eq!(irr, Ok(IRR), "the guest took the interrupt, Remote IRR set");
    assert!(cleared, "the EOI exit cleared Remote IRR");
    assert_eq!(
        low_dword(&mmio_bus, 5),
        0x8040,
        "the guest's entry, unmasked"
    );
}
