//! The bus and the VFIO PCI function model against a fake device that
//! keeps the rules a VFIO / vfio-user device keeps: region accesses inside
//! the region's size, configuration space in region 7, MSI-X eventfds only
//! through SET_IRQS.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vm_device::{Bus, InterruptError, MsiMessage, MsiVectors};

use crate::configuration::BarKind;
use crate::{
    DirectArea, GuestMemoryWindows, MAX_BAR32_SIZE, MAX_BAR64_SIZE, PciBus, PciConfigIo,
    PciConfigMmio, PciDevice, VfioOps, VfioOpsError, VfioPciDevice, VfioPciError,
};
use vm_device::BusDevice;

const BAR0_SIZE: u64 = 0x1000;
const BAR2_SIZE: u64 = 0x10_0000;

#[derive(Default)]
struct FakeState {
    config: Vec<u8>,
    bar0: Vec<u8>,
    bar0_writes: Vec<(u64, Vec<u8>)>,
    irq_sets: Vec<(u32, usize)>,
    resets: u32,
    fail_config: bool,
    /// Every configuration write that reached the device: (offset, bytes).
    config_writes: Vec<(u64, Vec<u8>)>,
    /// A device that keeps no command register of its own.
    drops_command: bool,
    /// BARs whose areas the VMM asked to mmap.
    mapped_regions: Vec<u32>,
    /// Region sizes that replace the defaults (a lying device).
    region_sizes: Vec<(u32, u64)>,
    /// Mappable areas that replace the defaults.
    areas: Option<Vec<DirectArea>>,
}

struct FakeFunction(Mutex<FakeState>);

impl FakeFunction {
    /// A function with a 32-bit BAR0, a 64-bit BAR2 and MSI-X (4 vectors,
    /// table at BAR0+0x800, PBA at BAR0+0xc00); `capability_loop` makes
    /// the capability list point at itself after a dummy entry.
    fn new(capability_loop: bool) -> Arc<Self> {
        Self::with_msix_at(capability_loop, 0x60)
    }

    /// As `new`, the MSI-X capability at `msix` (0x40 or 0x60).
    fn with_msix_at(capability_loop: bool, msix: usize) -> Arc<Self> {
        let mut config = vec![0u8; 256];
        config[0..4].copy_from_slice(&0x5678_1234u32.to_le_bytes());
        config[6] = 0x10; // capability list
        config[0x18] = 0b100; // BAR2: 64-bit memory
        config[0x30..0x34].copy_from_slice(&0xfffe_0001u32.to_le_bytes()); // a ROM
        config[0x34] = 0x50;
        // A vendor capability first, then MSI-X.
        config[0x50] = 0x09;
        config[0x51] = if capability_loop {
            0x50
        } else {
            u8::try_from(msix).unwrap()
        };
        config[msix] = 0x11;
        config[msix + 2..msix + 4].copy_from_slice(&3u16.to_le_bytes());
        config[msix + 4..msix + 8].copy_from_slice(&0x800u32.to_le_bytes());
        config[msix + 8..msix + 12].copy_from_slice(&0xc00u32.to_le_bytes());
        Arc::new(FakeFunction(Mutex::new(FakeState {
            config,
            bar0: vec![0; arch::usize_from(BAR0_SIZE)],
            ..Default::default()
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }
}

fn out_of_range() -> VfioOpsError {
    VfioOpsError::new("access outside the region")
}

impl VfioOps for FakeFunction {
    fn region_size(&self, index: u32) -> Result<u64, VfioOpsError> {
        if let Some(&(_, size)) = self.state().region_sizes.iter().find(|(i, _)| *i == index) {
            return Ok(size);
        }
        Ok(match index {
            0 => BAR0_SIZE,
            2 => BAR2_SIZE,
            7 => 256,
            _ => 0,
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError> {
        let s = self.state();
        let region = match index {
            7 if s.fail_config => return Err(VfioOpsError::new("gone")),
            7 => &s.config,
            0 => &s.bar0,
            _ => return Err(out_of_range()),
        };
        let at = arch::usize_from(offset);
        let bytes = region.get(at..at + data.len()).ok_or_else(out_of_range)?;
        data.copy_from_slice(bytes);
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioOpsError> {
        let mut s = self.state();
        let at = arch::usize_from(offset);
        match index {
            7 => {
                s.config_writes.push((offset, data.to_vec()));
                // Only the command register is writable on this function.
                for (i, b) in data.iter().enumerate() {
                    if (4..6).contains(&(at + i)) && !s.drops_command {
                        s.config[at + i] = *b;
                    }
                }
            }
            0 => {
                let slot = s
                    .bar0
                    .get_mut(at..at + data.len())
                    .ok_or_else(out_of_range)?;
                slot.copy_from_slice(data);
                s.bar0_writes.push((offset, data.to_vec()));
            }
            _ => return Err(out_of_range()),
        }
        Ok(())
    }

    fn irq_count(&self, index: u32) -> Result<u32, VfioOpsError> {
        Ok(if index == 2 { 4 } else { 0 })
    }

    fn set_irq_eventfds(&self, index: u32, fds: &[RawFd]) -> Result<(), VfioOpsError> {
        self.state().irq_sets.push((index, fds.len()));
        Ok(())
    }

    fn reset(&self) -> Result<(), VfioOpsError> {
        self.state().resets += 1;
        Ok(())
    }

    /// BAR0's first page holds the MSI-X table (so it must stay trapped);
    /// BAR2 has one mappable page at 0x2000.
    fn map_region_areas(&self, index: u32) -> Result<Vec<DirectArea>, VfioOpsError> {
        self.state().mapped_regions.push(index);
        if let Some(areas) = self.state().areas.clone() {
            return Ok(if index == 2 { areas } else { Vec::new() });
        }
        Ok(match index {
            0 => vec![DirectArea {
                offset: 0,
                size: 0x1000,
                host: 0x7000_0000,
            }],
            2 => vec![DirectArea {
                offset: 0x2000,
                size: 0x1000,
                host: 0x7100_0000,
            }],
            _ => Vec::new(),
        })
    }
}

#[derive(Default)]
struct FakeWindows {
    live: Mutex<Vec<(u32, u64, u64, u64)>>,
    next: Mutex<u32>,
}

impl GuestMemoryWindows for FakeWindows {
    fn map(&self, gpa: u64, size: u64, host: u64) -> Result<u32, crate::WindowError> {
        let mut next = self.next.lock().unwrap();
        *next += 1;
        self.live.lock().unwrap().push((*next, gpa, size, host));
        Ok(*next)
    }
    fn unmap(&self, handle: u32) {
        let mut live = self.live.lock().unwrap();
        let before = live.len();
        live.retain(|&(h, ..)| h != handle);
        assert_eq!(
            live.len() + 1,
            before,
            "unmapped a handle that was not live"
        );
    }
}

#[derive(Default)]
struct Routes(Mutex<Vec<(u16, Option<MsiMessage>)>>);

impl MsiVectors for Routes {
    fn count(&self) -> u16 {
        4
    }
    fn notifier(&self, vector: u16) -> Option<RawFd> {
        Some(100 + RawFd::from(vector))
    }
    fn route(&self, vector: u16, message: Option<MsiMessage>) -> Result<(), InterruptError> {
        self.0.lock().unwrap().push((vector, message));
        Ok(())
    }
}

struct Rig {
    fake: Arc<FakeFunction>,
    function: Arc<VfioPciDevice>,
    routes: Arc<Routes>,
    bus: Arc<PciBus>,
    mmio: Arc<Bus>,
    ports: PciConfigIo,
    slot: u8,
}

fn rig() -> Rig {
    let fake = FakeFunction::new(false);
    let routes = Arc::new(Routes::default());
    let r = routes.clone();
    let function = Arc::new(
        VfioPciDevice::new(fake.clone(), move |n| {
            assert_eq!(n, 4);
            Some(r as Arc<dyn MsiVectors>)
        })
        .unwrap(),
    );
    function.set_bar_address(0, 0xc000_0000);
    function.set_bar_address(2, 0x1_0000_0000);
    let mmio = Arc::new(Bus::new());
    let bus = Arc::new(PciBus::new(mmio.clone()));
    let slot = bus.add(function.clone()).unwrap();
    let ports = PciConfigIo::new(bus.clone());
    Rig {
        fake,
        function,
        routes,
        bus,
        mmio,
        ports,
        slot,
    }
}

impl Rig {
    fn select(&self, reg: u32) {
        let address = 0x8000_0000 | (u32::from(self.slot) << 11) | (reg << 2);
        self.ports.write(0, &address.to_le_bytes());
    }

    fn config_read(&self, reg: u32) -> u32 {
        self.select(reg);
        let mut b = [0u8; 4];
        self.ports.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    fn config_write(&self, reg: u32, offset: u64, data: &[u8]) {
        self.select(reg);
        self.ports.write(4 + offset, data);
    }

    fn mmio_read32(&self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio.read(addr, &mut b);
        u32::from_le_bytes(b)
    }
}

#[test]
fn the_function_is_reset_and_its_bars_and_msix_are_learned() {
    let r = rig();
    assert_eq!(r.fake.state().resets, 1);
    assert_eq!(r.slot, 1, "slot 0 is the host bridge");
    assert_eq!(
        (r.function.vendor_id(), r.function.device_id()),
        (0x1234, 0x5678)
    );
    assert_eq!(
        r.function.bar_requests(),
        [
            (0, BAR0_SIZE, BarKind::Mem32),
            (2, BAR2_SIZE, BarKind::Mem64)
        ]
    );
    let layout = r.function.msix_layout().unwrap();
    assert_eq!((layout.capability, layout.vectors), (0x60, 4));
    assert_eq!((layout.table_bar, layout.table_offset), (0, 0x800));
    assert_eq!((layout.pba_bar, layout.pba_offset), (0, 0xc00));
}

#[test]
fn msix_is_found_at_the_first_capability_offset_and_only_with_a_capability_list() {
    let at_0x40 = FakeFunction::with_msix_at(false, 0x40);
    at_0x40.state().config[0x34] = 0x40;
    let function = VfioPciDevice::new(at_0x40, |_| None).unwrap();
    assert_eq!(function.msix_layout().map(|l| l.capability), Some(0x40));

    // Without the status bit there is no list to walk, whatever it holds.
    let no_list = FakeFunction::new(false);
    no_list.state().config[6] = 0;
    let function = VfioPciDevice::new(no_list, |_| None).unwrap();
    assert!(function.msix_layout().is_none());
}

#[test]
fn configuration_space_through_ports_and_ecam_with_all_ones_where_nothing_is() {
    let r = rig();
    assert_eq!(r.config_read(0), 0x5678_1234);
    let ecam = PciConfigMmio::new(&r.bus);
    let mut b = [0u8; 4];
    ecam.read(u64::from(r.slot) << 15, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x5678_1234);
    ecam.read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x0d57_8086, "host bridge");
    for absent in [5u64 << 15, (u64::from(r.slot) << 15) | (1 << 12), 1 << 20] {
        ecam.read(absent, &mut b);
        assert_eq!(b, [0xff; 4], "{absent:#x}");
    }
    // Without the enable bit the data port reads all ones.
    r.ports.write(0, &(u32::from(r.slot) << 11).to_le_bytes());
    r.ports.read(4, &mut b);
    assert_eq!(b, [0xff; 4]);
    // A 2-byte read of the upper half of the first dword: the device id.
    r.select(0);
    let mut two = [0u8; 2];
    r.ports.read(6, &mut two);
    assert_eq!(u16::from_le_bytes(two), 0x5678);
    assert_eq!(r.config_read(12), 0, "expansion ROM hidden");
}

#[test]
fn bars_are_sized_by_the_guest_and_decoded_only_with_memory_enabled() {
    let r = rig();
    assert_eq!(r.config_read(4), 0xc000_0000);
    r.config_write(4, 0, &u32::MAX.to_le_bytes());
    assert_eq!(
        !(r.config_read(4) & !0xf) + 1,
        const { arch::fit_u32(BAR0_SIZE) }
    );
    r.config_write(4, 0, &0xc000_0000u32.to_le_bytes());
    assert_eq!((r.config_read(6), r.config_read(7)), (0b100, 1));
    assert!(r.bus.mapped_windows(r.slot).is_empty());
    assert_eq!(r.mmio_read32(0xc000_0010), u32::MAX, "not decoded yet");

    r.config_write(1, 0, &6u16.to_le_bytes());
    assert_eq!(r.config_read(1) & 0xffff, 6);
    assert_eq!(
        r.fake.state().config[4],
        6,
        "the command reaches the device"
    );
    assert_eq!(r.bus.mapped_windows(r.slot).len(), 2);
    r.fake.state().bar0[0x10..0x14].copy_from_slice(&0xabcdu32.to_le_bytes());
    assert_eq!(r.mmio_read32(0xc000_0010), 0xabcd);
    r.mmio.write(0xc000_0020, &7u32.to_le_bytes());
    assert_eq!(r.fake.state().bar0_writes, [(0x20, vec![7, 0, 0, 0])]);

    // The guest moves BAR0: the window follows.
    r.config_write(4, 0, &0xc010_0000u32.to_le_bytes());
    assert_eq!(r.mmio_read32(0xc010_0010), 0xabcd);
    assert_eq!(r.mmio_read32(0xc000_0010), u32::MAX);
    // Memory decoding off: no window at all.
    r.config_write(1, 0, &0u16.to_le_bytes());
    assert_eq!(r.mmio_read32(0xc010_0010), u32::MAX);
}

#[test]
fn msix_is_emulated_and_the_device_gets_eventfds_only_while_enabled() {
    let r = rig();
    r.config_write(1, 0, &2u16.to_le_bytes());
    let table = 0xc000_0800;
    r.mmio.write(table, &0xfee0_0000u32.to_le_bytes());
    r.mmio.write(table + 8, &0x41u32.to_le_bytes());
    r.mmio.write(table + 12, &0u32.to_le_bytes());
    assert!(
        r.fake.state().bar0_writes.is_empty(),
        "the table stays with the VMM"
    );
    assert_eq!(r.mmio_read32(table + 8), 0x41);
    assert_eq!(r.mmio_read32(0xc000_0c00), 0, "PBA");
    assert!(r.routes.0.lock().unwrap().is_empty());

    // Message control is the upper half of the capability's first dword.
    let cap = 0x60 / 4;
    assert_eq!(r.config_read(cap) >> 16, 3);
    r.config_write(cap, 2, &0x8000u16.to_le_bytes());
    assert!(r.function.msix_enabled());
    assert_eq!(r.config_read(cap) >> 16, 0x8003);
    assert_eq!(r.fake.state().irq_sets, [(2, 4)]);
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    assert_eq!(*r.routes.0.lock().unwrap(), [(0, Some(msg))]);
    // Writing the capability's read-only bytes changes nothing.
    r.config_write(cap, 0, &[0xff]);
    assert_eq!(r.fake.state().irq_sets.len(), 1);

    r.config_write(cap, 2, &0u16.to_le_bytes());
    assert_eq!(r.fake.state().irq_sets, [(2, 4), (2, 0)]);
    assert_eq!(r.routes.0.lock().unwrap().last(), Some(&(0, None)));
}

#[test]
fn a_removed_function_reads_all_ones_and_leaves_the_mmio_bus() {
    let r = rig();
    r.config_write(1, 0, &2u16.to_le_bytes());
    let cap = 0x60 / 4;
    r.config_write(cap, 2, &0x8000u16.to_le_bytes());
    assert_eq!(r.mmio_read32(0xc000_0000), 0);
    let removed = r.bus.remove(r.slot).unwrap();
    assert_eq!(r.config_read(0), u32::MAX);
    assert_eq!(r.mmio_read32(0xc000_0000), u32::MAX);
    assert!(r.bus.mapped_windows(r.slot).is_empty());
    assert!(r.bus.remove(r.slot).is_err());
    assert!(r.bus.remove(0).is_err(), "the host bridge stays");
    drop(removed);
    r.function.shut_down();
    assert!(!r.function.msix_enabled());
    assert_eq!(r.fake.state().irq_sets.last(), Some(&(2, 0)));
    // The slot is free again.
    assert_eq!(r.bus.add(r.function.clone()).unwrap(), r.slot);
}

#[test]
fn a_failing_device_reads_all_ones_and_a_looping_capability_list_ends() {
    let r = rig();
    r.fake.state().fail_config = true;
    assert_eq!(r.config_read(0), u32::MAX);
    assert_eq!(r.config_read(4), 0xc000_0000, "BARs stay emulated");

    let looping = FakeFunction::new(true);
    let function = VfioPciDevice::new(looping, |_| None).unwrap();
    assert!(function.msix_layout().is_none());

    let dead = FakeFunction::new(false);
    dead.state().fail_config = true;
    assert!(VfioPciDevice::new(dead, |_| None).is_err());
}

#[test]
fn all_32_slots_fill_and_the_next_add_is_refused() {
    let mmio = Arc::new(Bus::new());
    let bus = PciBus::new(mmio);
    for expected in 1..32u8 {
        let f = VfioPciDevice::new(FakeFunction::new(false), |_| None).unwrap();
        assert_eq!(bus.add(Arc::new(f)).unwrap(), expected);
    }
    let f = VfioPciDevice::new(FakeFunction::new(false), |_| None).unwrap();
    assert_eq!(
        bus.add(Arc::new(f)).unwrap_err(),
        crate::PciBusError::NoFreeSlot
    );
}

#[test]
fn bars_the_user_excludes_are_never_mmapped() {
    let fake = FakeFunction::new(false);
    let function = VfioPciDevice::with_trapped_bars(fake.clone(), |_| None, &[2]).unwrap();
    assert!(function.direct_areas(2).is_empty());
    assert_eq!(
        fake.state().mapped_regions,
        [0],
        "BAR2 was not even mmapped by the VMM; BAR0 was asked for"
    );
}

#[test]
fn mappable_areas_become_guest_memory_only_while_decoded_and_never_over_msix() {
    let fake = FakeFunction::new(false);
    let function = Arc::new(VfioPciDevice::new(fake, |_| None).unwrap());
    assert!(
        function.direct_areas(0).is_empty(),
        "BAR0's page holds the MSI-X table"
    );
    assert_eq!(function.direct_areas(2).len(), 1);
    function.set_bar_address(0, 0xc000_0000);
    function.set_bar_address(2, 0x1_0000_0000);
    let windows = Arc::new(FakeWindows::default());
    let bus = PciBus::with_memory_windows(Arc::new(Bus::new()), Some(windows.clone()));
    let slot = bus.add(function.clone()).unwrap();
    assert!(
        windows.live.lock().unwrap().is_empty(),
        "memory decoding is off"
    );
    let command =
        |value: u16| bus.config_write(0, usize::from(slot), 0, 1, 0, &value.to_le_bytes());
    command(2);
    let live = windows.live.lock().unwrap().clone();
    assert_eq!(live.len(), 1);
    assert_eq!(
        live[0].1..live[0].1 + live[0].2,
        0x1_0000_2000..0x1_0000_3000
    );
    assert_eq!(live[0].3, 0x7100_0000);
    // Moving BAR2 moves the memory window with it.
    bus.config_write(0, usize::from(slot), 0, 7, 0, &2u32.to_le_bytes());
    let live = windows.live.lock().unwrap().clone();
    assert_eq!((live.len(), live[0].1), (1, 0x2_0000_2000));
    command(0);
    assert!(windows.live.lock().unwrap().is_empty());
    command(2);
    bus.remove(slot).unwrap();
    assert!(windows.live.lock().unwrap().is_empty(), "unplug removes it");
}

#[test]
fn the_address_register_reads_back_and_selects_bus_device_function_and_register() {
    let r = rig();
    let address = 0x8000_0000 | (u32::from(r.slot) << 11) | (2 << 2) | 3;
    r.ports.write(0, &address.to_le_bytes());
    let mut b = [0u8; 4];
    r.ports.read(0, &mut b);
    assert_eq!(u32::from_le_bytes(b), address & !3, "low two bits are zero");
    // Bus 1 and function 1 of the same slot hold nothing.
    let command = 0x8000_0000 | (u32::from(r.slot) << 11) | (1 << 2);
    for other in [1u32 << 16, 1 << 8] {
        r.ports.write(0, &(address | other).to_le_bytes());
        r.ports.read(4, &mut b);
        assert_eq!(b, [0xff; 4], "{other:#x}");
        // Writes to their command register reach nobody either.
        r.ports.write(0, &(command | other).to_le_bytes());
        r.ports.write(4, &0x6u16.to_le_bytes());
    }
    assert!(r.bus.mapped_windows(r.slot).is_empty());
    assert_eq!(
        r.fake.state().config[4],
        0,
        "the command never reached the device"
    );
    // The host bridge says what it is: class 06 (bridge), subclass 00.
    assert_eq!(r.bus.config_read(0, 0, 0, 2), 0x0600_0000);
    assert_eq!(r.bus.config_read(0, 0, 0, 0), 0x0d57_8086);
    // ECAM covers bus 0: 32 devices of 8 functions of 4 KiB.
    assert_eq!(crate::ECAM_SIZE, 32 * 8 * 4096);
}

#[test]
fn ecam_reaches_every_register_and_writes_too() {
    let r = rig();
    let ecam = PciConfigMmio::new(&r.bus);
    let function = u64::from(r.slot) << 15;
    let mut b = [0u8; 4];
    ecam.read(function + 0x10, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0xc000_0000, "BAR0 through ECAM");
    let mut two = [0u8; 2];
    ecam.read(function + 0x62, &mut two);
    assert_eq!(u16::from_le_bytes(two), 3, "MSI-X control, a 2-byte read");
    // A write through ECAM: memory decoding on.
    ecam.write(function + 0x4, &2u16.to_le_bytes());
    assert_eq!(r.bus.mapped_windows(r.slot).len(), 2);
    assert_eq!(r.fake.state().config[4], 2);
    // Registers past the legacy 256 bytes exist only through ECAM.
    ecam.read(function + 0x100, &mut b);
    assert_eq!(b, [0xff; 4], "the fake has no extended space");
}

#[test]
fn what_the_vmm_owns_in_configuration_space_is_emulated_and_the_rest_forwarded() {
    let r = rig();
    // The ROM is hidden, whatever the device says, and writes to it stay.
    assert_eq!(r.config_read(12), 0);
    r.config_write(12, 0, &u32::MAX.to_le_bytes());
    // The command register reads back from the VMM's copy with the
    // device's status above it, even from a device that keeps none.
    r.fake.state().drops_command = true;
    r.config_write(1, 0, &2u16.to_le_bytes());
    r.config_write(1, 1, &[0x01]);
    assert_eq!(r.config_read(1), 0x0010_0102);
    // MSI-X: the device's id and next pointer, the VMM's control bits.
    let cap = 0x60 / 4;
    r.config_write(cap, 2, &0x8000u16.to_le_bytes());
    assert_eq!(r.config_read(cap), 0x8003_0011);
    // Anything else goes to the device, at its byte offset.
    r.config_write(15, 1, &[0x0a]);
    let writes = r.fake.state().config_writes.clone();
    assert_eq!(
        writes,
        [(4, vec![2, 0]), (5, vec![1]), (61, vec![0x0a])],
        "no ROM or MSI-X control write reached the device"
    );
    // A partial BAR write keeps the bytes it does not cover.
    r.config_write(4, 2, &0xc010u16.to_le_bytes());
    assert_eq!(r.config_read(4), 0xc010_0000);
    r.config_write(4, 2, &0xc000u16.to_le_bytes());
    r.config_write(4, 1, &[0x10]);
    assert_eq!(r.config_read(4), 0xc000_1000);
}

#[test]
fn the_ecam_window_on_the_mmio_bus_does_not_keep_the_pci_bus_alive() {
    let mmio = Arc::new(Bus::new());
    let bus = Arc::new(PciBus::new(mmio.clone()));
    mmio.insert(Arc::new(PciConfigMmio::new(&bus)), 0, crate::ECAM_SIZE)
        .unwrap();
    let weak = Arc::downgrade(&bus);
    drop(bus);
    assert!(weak.upgrade().is_none(), "the bus outlived its owner");
    // The window answers as an empty bus would.
    let mut b = [0u8; 4];
    assert!(mmio.read(0, &mut b));
    assert_eq!(b, [0xff; 4]);
    assert!(mmio.write(0, &[0; 4]));
}

/// A device with the default layout and `edit` applied to its state.
fn lying(edit: impl FnOnce(&mut FakeState)) -> Result<VfioPciDevice, VfioPciError> {
    let fake = FakeFunction::new(false);
    edit(&mut fake.state());
    VfioPciDevice::new(fake, |_| None)
}

#[test]
fn bar_sizes_past_what_a_bar_can_decode_are_refused_without_wrapping() {
    let huge = [1u64 << 63 | 1, u64::MAX, (1 << 63) + 0x1000];
    for (bar, size) in huge.iter().flat_map(|&s| [(0u32, s), (2, s)]) {
        let err = lying(|s| s.region_sizes.push((bar, size))).err().unwrap();
        assert!(
            matches!(err, VfioPciError::BarTooLarge { index, .. } if index == bar as usize),
            "BAR {bar} of {size:#x}: {err}"
        );
    }
    // The limits are inclusive: 2 GiB for a 32-bit BAR, 2^47 for a 64-bit one.
    let at_limits = lying(|s| {
        s.region_sizes.push((0, MAX_BAR32_SIZE));
        s.region_sizes.push((2, MAX_BAR64_SIZE));
    })
    .unwrap();
    let sizes: Vec<u64> = at_limits.bar_requests().iter().map(|r| r.1).collect();
    assert_eq!(sizes, [MAX_BAR32_SIZE, MAX_BAR64_SIZE]);
    let err = lying(|s| s.region_sizes.push((0, MAX_BAR32_SIZE + 1))).err();
    assert!(matches!(
        err,
        Some(VfioPciError::BarTooLarge { kind: "32-bit", .. })
    ));
    let err = lying(|s| s.region_sizes.push((2, MAX_BAR64_SIZE + 1))).err();
    assert!(matches!(
        err,
        Some(VfioPciError::BarTooLarge { kind: "64-bit", .. })
    ));
    // Small sizes still round up to a page and a power of two.
    let small = lying(|s| s.region_sizes.push((2, 0x1001))).unwrap();
    assert_eq!(small.bar_requests()[1].1, 0x2000);
}

#[test]
fn msix_structures_outside_the_devices_bars_are_refused() {
    // The capability is at 0x60: table dword at 0x64, PBA dword at 0x68.
    let with = |table: u32, pba: u32, vectors: u16| {
        lying(move |s| {
            s.config[0x62..0x64].copy_from_slice(&(vectors - 1).to_le_bytes());
            s.config[0x64..0x68].copy_from_slice(&table.to_le_bytes());
            s.config[0x68..0x6c].copy_from_slice(&pba.to_le_bytes());
        })
    };
    let refused =
        |result: Result<VfioPciDevice, VfioPciError>, structure: &str, why: &str| match result {
            Err(VfioPciError::MsixLayout {
                structure: s,
                why: w,
                ..
            }) => assert!(s == structure && w.contains(why), "{s}: {w}"),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a bad {structure} was accepted"),
        };
    // BAR0 is BAR0_SIZE bytes: 64 vectors (1 KiB) at 0xc00 run past it.
    let past = const { arch::fit_u32(BAR0_SIZE - 0x100) };
    refused(with(past, 0xc00, 64), "table", "past the end");
    refused(with(0x800, past + 0xf8 + 8, 4), "PBA", "past the end");
    // Indicators 6 and 7 name no BAR.
    refused(with(0x800 | 6, 0xc00, 4), "table", "past BAR 5");
    refused(with(0x800, 0xc00 | 7, 4), "PBA", "past BAR 5");
    // BAR1 does not exist; BAR3 is the upper half of the 64-bit BAR2.
    refused(with(0x800 | 1, 0xc00, 4), "table", "does not have");
    refused(with(0x800, 0xc00 | 3, 4), "PBA", "does not have");
    // Exactly filling the BAR is fine, as is a table in the 64-bit BAR.
    let fits = const { arch::fit_u32(BAR0_SIZE - 4 * 16) };
    assert!(with(fits, 0xc00, 4).is_ok());
    assert!(with(0x2, 0xc00, 4).is_ok());
}

#[test]
fn mappable_areas_outside_their_bar_stay_trapped() {
    let area = |offset: u64, size: u64| DirectArea {
        offset,
        size,
        host: 0x7100_0000,
    };
    let good = area(0x2000, 0x1000);
    let function = lying(|s| {
        s.areas = Some(vec![
            good,
            area(BAR2_SIZE - 0x1000, 0x2000),
            area(u64::MAX - 0xfff, 0x2000),
            area(0x1800, 0x1000),
            area(0x3000, 0x800),
            area(0x4000, 0),
        ])
    })
    .unwrap();
    let direct = function.direct_areas(2);
    assert_eq!(direct.len(), 1, "only the area inside BAR2 is mapped");
    assert_eq!((direct[0].offset, direct[0].size), (good.offset, good.size));
}

/// A function on `bus` with BAR0 at `bar0` and BAR2 at `bar2`, memory
/// decoding on; returns its fake and slot.
fn plug_decoding(bus: &PciBus, bar0: u64, bar2: u64) -> (Arc<FakeFunction>, u8) {
    let fake = FakeFunction::new(false);
    let function = Arc::new(VfioPciDevice::new(fake.clone(), |_| None).unwrap());
    function.set_bar_address(0, bar0);
    function.set_bar_address(2, bar2);
    let slot = bus.add(function).unwrap();
    bus.config_write(0, usize::from(slot), 0, 1, 0, &2u16.to_le_bytes());
    (fake, slot)
}

fn write_bar(bus: &PciBus, slot: u8, reg: usize, value: u32) {
    bus.config_write(0, usize::from(slot), 0, reg, 0, &value.to_le_bytes());
}

fn mmio_read32(mmio: &Bus, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    mmio.read(addr, &mut b);
    u32::from_le_bytes(b)
}

/// A guest pointing a BAR at RAM, the LAPIC or past the end of the address
/// space (sizing a 64-bit BAR with decoding on) gets a BAR that decodes
/// nothing there, while its register reads back what it wrote; the other
/// BAR's memory window is never touched meanwhile, and back inside an
/// aperture the BAR decodes again.
#[test]
fn a_bar_outside_the_apertures_decodes_nothing_and_its_register_follows_the_guest() {
    let mmio = Arc::new(Bus::new());
    let windows = Arc::new(FakeWindows::default());
    let bus = PciBus::with_memory_windows(mmio.clone(), Some(windows.clone()))
        .with_apertures(vec![0xc000_0000..0xe000_0000, 0x1_0000_0000..0x2_0000_0000]);
    let (fake, slot) = plug_decoding(&bus, 0xc000_0000, 0x1_0000_0000);
    fake.state().bar0[0x10] = 0x5a;
    assert_eq!(bus.mapped_windows(slot).len(), 2);
    let bar2_memory = windows.live.lock().unwrap().clone();
    assert_eq!(bar2_memory.len(), 1);
    for outside in [0x1000_0000u32, 0xfee0_0000, 0xe000_0000, 0xffff_f000] {
        write_bar(&bus, slot, 4, outside);
        assert_eq!(bus.config_read(0, usize::from(slot), 0, 4), outside);
        let mapped = bus.mapped_windows(slot);
        assert_eq!(mapped.len(), 1, "{outside:#x}");
        assert_eq!(mapped[0].bar, 2);
        assert_eq!(mmio_read32(&mmio, u64::from(outside) + 0x10), u32::MAX);
        assert_eq!(
            *windows.live.lock().unwrap(),
            bar2_memory,
            "BAR2's memory window stayed put"
        );
    }
    // The last place in an aperture is inside, its end outside.
    write_bar(&bus, slot, 7, 1);
    write_bar(&bus, slot, 6, 0xfff0_0000);
    assert_eq!(bus.mapped_windows(slot).len(), 1);
    write_bar(&bus, slot, 7, 2);
    write_bar(&bus, slot, 6, 0);
    assert_eq!(bus.mapped_windows(slot).len(), 0);
    assert!(windows.live.lock().unwrap().is_empty());
    // All ones in both halves: the window would end past 2^64.
    write_bar(&bus, slot, 6, u32::MAX);
    write_bar(&bus, slot, 7, u32::MAX);
    assert_eq!(bus.config_read(0, usize::from(slot), 0, 7), u32::MAX);
    assert!(bus.mapped_windows(slot).is_empty());
    write_bar(&bus, slot, 4, 0xc000_0000);
    write_bar(&bus, slot, 6, 0);
    write_bar(&bus, slot, 7, 1);
    assert_eq!(bus.mapped_windows(slot).len(), 2);
    assert_eq!(mmio_read32(&mmio, 0xc000_0010), 0x5a);
    assert_eq!(windows.live.lock().unwrap().len(), 1);

    // Without apertures a window past 2^64 is refused by the MMIO bus, and
    // nothing panics either.
    let open = PciBus::with_memory_windows(Arc::new(Bus::new()), Some(windows.clone()));
    let (_, slot) = plug_decoding(&open, 0xc000_0000, 0x1_0000_0000);
    write_bar(&open, slot, 6, u32::MAX);
    write_bar(&open, slot, 7, u32::MAX);
    assert_eq!(open.mapped_windows(slot).len(), 1);
}

/// Two functions' BARs on the same addresses: the one decoding there first
/// keeps them; once it stops decoding, moves away or is removed, the other
/// decodes there without the guest touching it again.
#[test]
fn a_bar_whose_place_is_taken_decodes_as_soon_as_the_place_is_free() {
    let mmio = Arc::new(Bus::new());
    let bus = PciBus::new(mmio.clone());
    let (first, a) = plug_decoding(&bus, 0xc000_0000, 0x1_0000_0000);
    let (second, b) = plug_decoding(&bus, 0xc010_0000, 0x1_0010_0000);
    first.state().bar0[0x10] = 1;
    second.state().bar0[0x10] = 2;
    write_bar(&bus, b, 4, 0xc000_0000);
    assert_eq!(bus.mapped_windows(b).len(), 1, "only BAR2 decodes");
    assert_eq!(mmio_read32(&mmio, 0xc000_0010), 1, "the first keeps it");
    // The first stops decoding: the second gets the place at once.
    bus.config_write(0, usize::from(a), 0, 1, 0, &0u16.to_le_bytes());
    assert_eq!(mmio_read32(&mmio, 0xc000_0010), 2);
    // Decoding again, the first waits for its place.
    bus.config_write(0, usize::from(a), 0, 1, 0, &2u16.to_le_bytes());
    assert_eq!(bus.mapped_windows(a).len(), 1);
    assert_eq!(mmio_read32(&mmio, 0xc000_0010), 2);
    // The second moves away: the first decodes, the second at its place.
    write_bar(&bus, b, 4, 0xc010_0000);
    assert_eq!(bus.mapped_windows(a).len(), 2);
    assert_eq!(mmio_read32(&mmio, 0xc000_0010), 1);
    assert_eq!(mmio_read32(&mmio, 0xc010_0010), 2);
    // Removal frees a place too.
    write_bar(&bus, a, 4, 0xc010_0000);
    assert_eq!(bus.mapped_windows(a).len(), 1);
    bus.remove(b).unwrap();
    assert_eq!(bus.mapped_windows(a).len(), 2);
    assert_eq!(mmio_read32(&mmio, 0xc010_0010), 1);
}
