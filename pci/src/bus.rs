//! PCI segment 0: 32 device slots on bus 0, slot 0 the host bridge. The
//! guest reaches configuration space through the legacy 0xCF8 / 0xCFC
//! ports or the ECAM window; each device's memory BARs are windows on the
//! MMIO bus that follow what the guest programs (decoded only while the
//! command register's memory bit is set, and only inside the host
//! bridge's apertures when it has any).

use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock, Weak};

use log::{debug, warn};
use vm_device::{Bus, BusDevice};

use crate::configuration::{
    COMMAND_REG, CONFIG_SIZE, LEGACY_CONFIG_SIZE, extract_read, merge_write,
};

pub const SLOTS: usize = 32;

/// A memory window a function decodes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarWindow {
    pub bar: usize,
    pub address: u64,
    pub size: u64,
}

/// Part of a BAR backed by host memory the guest may reach directly (a
/// device's mmappable area): accesses there do not exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectArea {
    /// Offset inside the BAR.
    pub offset: u64,
    pub size: u64,
    /// Host virtual address of the mapping; it stays mapped as long as the
    /// function exists.
    pub host: u64,
}

/// Why host memory could not be put into the guest's address space.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error("no free memory slot")]
    NoFreeSlot,
    /// The hypervisor refused the slot.
    #[error(transparent)]
    Refused(vm_device::BoxError),
}

/// Puts host memory into the guest's physical address space (a KVM memory
/// slot) and takes it out again.
pub trait GuestMemoryWindows: Send + Sync {
    /// Makes `gpa..gpa+size` the host memory at `host`; returns a handle.
    fn map(&self, gpa: u64, size: u64, host: u64) -> Result<u32, WindowError>;
    fn unmap(&self, handle: u32);
}

/// A PCI function as the bus sees it.
pub trait PciDevice: Send + Sync {
    /// Dword `reg` (0..1024) of configuration space.
    fn config_read(&self, reg: usize) -> u32;
    /// `data` (1, 2 or 4 bytes) at byte `offset` of dword `reg`.
    fn config_write(&self, reg: usize, offset: usize, data: &[u8]);
    /// The memory windows it decodes now.
    fn bar_windows(&self) -> Vec<BarWindow>;
    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]);
    /// Parts of `bar` the guest may reach without exits.
    fn direct_areas(&self, _bar: usize) -> Vec<DirectArea> {
        Vec::new()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciBusError {
    #[error("no free PCI slot on bus 0")]
    NoFreeSlot,
    #[error("PCI slot {0} is empty")]
    EmptySlot(u8),
    #[error("PCI slot {0} is taken or does not exist")]
    SlotTaken(u8),
}

/// The host bridge in slot 0: ids and class, nothing else.
pub struct HostBridge;

/// Host bridge ids (Intel's generic host bridge id, as other VMMs use).
pub const HOST_BRIDGE_VENDOR: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE: u16 = 0x0d57;

impl PciDevice for HostBridge {
    fn config_read(&self, reg: usize) -> u32 {
        match reg {
            0 => u32::from(HOST_BRIDGE_DEVICE) << 16 | u32::from(HOST_BRIDGE_VENDOR),
            // Class 06 (bridge), subclass 00 (host).
            2 => 0x0600_0000,
            _ => 0,
        }
    }
    fn config_write(&self, _: usize, _: usize, _: &[u8]) {}
    fn bar_windows(&self) -> Vec<BarWindow> {
        Vec::new()
    }
    fn bar_read(&self, _: usize, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&self, _: usize, _: u64, _: &[u8]) {}
}

/// One decoded BAR on the MMIO bus.
struct BarMmio {
    device: Arc<dyn PciDevice>,
    bar: usize,
}

impl BusDevice for BarMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.device.bar_read(self.bar, offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.device.bar_write(self.bar, offset, data);
    }
}

/// A window on the MMIO bus and the guest memory windows of the direct
/// areas inside it.
struct Mapped {
    window: BarWindow,
    direct: Vec<u32>,
}

struct Slot {
    device: Arc<dyn PciDevice>,
    /// Windows currently on the MMIO bus, by BAR.
    mapped: Vec<Mapped>,
    /// Taken off the bus: a sync that got hold of the slot before the
    /// removal (a vCPU's config write, another removal's retry of waiting
    /// windows) must not put its windows back.
    removed: bool,
}

/// Locks are taken poison-tolerant: every update under them completes
/// before release, and a vCPU must never panic on a config access.
pub struct PciBus {
    slots: RwLock<[Option<Arc<Mutex<Slot>>>; SLOTS]>,
    mmio: Arc<Bus>,
    memory: Option<Arc<dyn GuestMemoryWindows>>,
    /// Where BARs may decode; empty: anywhere.
    apertures: Vec<Range<u64>>,
}

impl PciBus {
    /// A bus with the host bridge in slot 0; BAR windows go on `mmio`.
    pub fn new(mmio: Arc<Bus>) -> Self {
        Self::with_memory_windows(mmio, None)
    }

    /// As `new`; direct BAR areas become guest memory through `memory`
    /// (without it every BAR access is trapped).
    pub fn with_memory_windows(
        mmio: Arc<Bus>,
        memory: Option<Arc<dyn GuestMemoryWindows>>,
    ) -> Self {
        let bus = PciBus {
            slots: RwLock::new(Default::default()),
            mmio,
            memory,
            apertures: Vec::new(),
        };
        bus.slots.write().unwrap_or_else(|e| e.into_inner())[0] =
            Some(Arc::new(Mutex::new(Slot {
                device: Arc::new(HostBridge),
                mapped: Vec::new(),
                removed: false,
            })));
        bus
    }

    /// Decodes BAR windows only when they lie wholly inside one of
    /// `apertures`, as a host bridge forwards only its windows to PCI: a
    /// guest that points a BAR at RAM, the LAPIC, the IOAPIC or the ECAM
    /// window gets a BAR that decodes nothing (its register still reads
    /// back what was written, so sizing works), instead of a device
    /// window or memory slot over what lives there.
    pub fn with_apertures(mut self, apertures: Vec<Range<u64>>) -> Self {
        self.apertures = apertures;
        self
    }

    fn in_aperture(&self, window: &BarWindow) -> bool {
        self.apertures.is_empty()
            || window.address.checked_add(window.size).is_some_and(|end| {
                self.apertures
                    .iter()
                    .any(|a| a.start <= window.address && end <= a.end)
            })
    }

    /// Puts `device` in the lowest free slot and decodes its windows.
    pub fn add(&self, device: Arc<dyn PciDevice>) -> Result<u8, PciBusError> {
        self.add_at(None, device)
    }

    /// Puts `device` in `slot` (or the lowest free one) and decodes its
    /// windows.
    pub fn add_at(&self, slot: Option<u8>, device: Arc<dyn PciDevice>) -> Result<u8, PciBusError> {
        let slot = {
            let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            let index = match slot {
                Some(wanted) => Some(usize::from(wanted))
                    .filter(|&i| slots.get(i).is_some_and(Option::is_none))
                    .ok_or(PciBusError::SlotTaken(wanted))?,
                None => slots
                    .iter()
                    .position(Option::is_none)
                    .ok_or(PciBusError::NoFreeSlot)?,
            };
            let slot = Arc::new(Mutex::new(Slot {
                device,
                mapped: Vec::new(),
                removed: false,
            }));
            slots[index] = Some(slot.clone());
            (
                u8::try_from(index).expect("a bus has SLOTS (32) slots"),
                slot,
            )
        };
        self.sync_windows(&slot.1);
        Ok(slot.0)
    }

    /// Takes the function out of `slot`: its windows leave the MMIO bus and
    /// its configuration space reads all ones from now on.
    pub fn remove(&self, slot: u8) -> Result<Arc<dyn PciDevice>, PciBusError> {
        if slot == 0 {
            // The host bridge is part of the segment.
            return Err(PciBusError::EmptySlot(slot));
        }
        let taken = self
            .slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(usize::from(slot))
            .and_then(Option::take)
            .ok_or(PciBusError::EmptySlot(slot))?;
        let device = {
            let mut s = taken.lock().unwrap_or_else(|e| e.into_inner());
            s.removed = true;
            self.unmap_windows(&mut s);
            s.device.clone()
        };
        self.sync_waiting();
        Ok(device)
    }

    fn slot(&self, device: usize) -> Option<Arc<Mutex<Slot>>> {
        self.slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .cloned()
            .flatten()
    }

    /// Dword `reg` of bus 0, `device`, `function`; all ones where nothing is.
    pub fn config_read(&self, bus: u8, device: usize, function: u8, reg: usize) -> u32 {
        if bus != 0 || function != 0 {
            return u32::MAX;
        }
        match self.slot(device) {
            Some(slot) => {
                let dev = slot
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .device
                    .clone();
                dev.config_read(reg)
            }
            None => u32::MAX,
        }
    }

    pub fn config_write(
        &self,
        bus: u8,
        device: usize,
        function: u8,
        reg: usize,
        offset: usize,
        data: &[u8],
    ) {
        if bus != 0 || function != 0 {
            return;
        }
        let Some(slot) = self.slot(device) else {
            return;
        };
        let dev = slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device
            .clone();
        dev.config_write(reg, offset, data);
        // Only the command register and BARs change what is decoded.
        if (reg == COMMAND_REG || (4..10).contains(&reg)) && self.sync_windows(&slot) {
            self.sync_waiting();
        }
    }

    /// Puts the MMIO bus in line with the windows the function decodes:
    /// windows it no longer decodes leave, new ones come, and the ones
    /// that stay are not touched (a vCPU using them never sees a gap).
    /// A window that overlaps another on the MMIO bus (another device's
    /// BAR, the ECAM window) or lies outside the apertures is not decoded:
    /// whatever is there keeps the addresses. Returns whether any window
    /// left the bus, which may let a waiting one in.
    fn sync_windows(&self, slot: &Mutex<Slot>) -> bool {
        let mut s = slot.lock().unwrap_or_else(|e| e.into_inner());
        if s.removed {
            return false;
        }
        let wanted = s.device.bar_windows();
        let (kept, gone): (Vec<Mapped>, Vec<Mapped>) = std::mem::take(&mut s.mapped)
            .into_iter()
            .partition(|m| wanted.contains(&m.window));
        s.mapped = kept;
        let released = !gone.is_empty();
        for mapped in gone {
            self.unmap_window(mapped);
        }
        for window in wanted {
            if s.mapped.iter().any(|m| m.window == window) {
                continue;
            }
            if !self.in_aperture(&window) {
                // Debug only: sizing a BAR with decoding on parks it here
                // for a moment, which is no fault.
                debug!(
                    "BAR {} at {:#x} is outside the PCI windows: not decoded",
                    window.bar, window.address
                );
                continue;
            }
            let mmio = Arc::new(BarMmio {
                device: s.device.clone(),
                bar: window.bar,
            });
            if let Err(e) = self.mmio.insert(mmio, window.address, window.size) {
                warn!("BAR {} not decoded: {e}", window.bar);
                continue;
            }
            let mut direct = Vec::new();
            if let Some(memory) = &self.memory {
                for area in s.device.direct_areas(window.bar) {
                    match memory.map(window.address + area.offset, area.size, area.host) {
                        Ok(handle) => direct.push(handle),
                        // The area stays reachable, by trapping.
                        Err(e) => warn!(
                            "BAR {} area {:#x} stays trapped: {}",
                            window.bar,
                            area.offset,
                            crate::Chain(&e)
                        ),
                    }
                }
            }
            s.mapped.push(Mapped { window, direct });
        }
        s.mapped.sort_by_key(|m| m.window.bar);
        released
    }

    /// Gives every function whose windows are not all decoded (their place
    /// was taken) another try, once some window has left the bus: as on a
    /// real bus, a BAR decodes as soon as its addresses are free, without
    /// the guest having to touch it again.
    fn sync_waiting(&self) {
        let slots: Vec<Arc<Mutex<Slot>>> = self
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
            .cloned()
            .collect();
        // A sync here normally only adds windows; it releases one only if
        // another vCPU changed that function meanwhile, and then the
        // others get another pass (bounded: each pass follows a change).
        for _ in 0..SLOTS {
            let mut released = false;
            for slot in &slots {
                released |= self.sync_windows(slot);
            }
            if !released {
                break;
            }
        }
    }

    fn unmap_window(&self, mapped: Mapped) {
        if let Some(memory) = &self.memory {
            for handle in mapped.direct {
                memory.unmap(handle);
            }
        }
        self.mmio.remove(mapped.window.address);
    }

    /// Takes every window of the slot off the MMIO bus and out of guest
    /// memory.
    fn unmap_windows(&self, s: &mut Slot) {
        for mapped in s.mapped.drain(..) {
            self.unmap_window(mapped);
        }
    }

    /// Windows of the function in `slot` that are on the MMIO bus.
    pub fn mapped_windows(&self, slot: u8) -> Vec<BarWindow> {
        self.slot(usize::from(slot))
            .map(|s| {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .mapped
                    .iter()
                    .map(|m| m.window)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The legacy configuration mechanism: an address register at 0xCF8 and a
/// data window at 0xCFC..0xD00.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: Mutex<u32>,
}

pub const CONFIG_IO_PORT: u64 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;
const CONFIG_ENABLE: u32 = 1 << 31;

impl PciConfigIo {
    pub fn new(bus: Arc<PciBus>) -> Self {
        PciConfigIo {
            bus,
            address: Mutex::new(0),
        }
    }

    /// (bus, device, function, register) the address register selects.
    fn target(&self) -> Option<(u8, usize, u8, usize)> {
        let a = *self.address.lock().unwrap_or_else(|e| e.into_inner());
        (a & CONFIG_ENABLE != 0).then_some((
            ((a >> 16) & 0xff) as u8,
            ((a >> 11) & 0x1f) as usize,
            ((a >> 8) & 0x7) as u8,
            ((a >> 2) & 0x3f) as usize,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match offset {
            0..4 => {
                let value = *self.address.lock().unwrap_or_else(|e| e.into_inner());
                extract_read(value, arch::usize_from(offset), data);
            }
            _ => {
                let value = self
                    .target()
                    .map_or(u32::MAX, |(b, d, f, r)| self.bus.config_read(b, d, f, r));
                extract_read(value, arch::usize_from(offset - 4), data);
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        match offset {
            0..4 => {
                let mut a = self.address.lock().unwrap_or_else(|e| e.into_inner());
                *a = merge_write(*a, arch::usize_from(offset), data) & !0x3;
            }
            _ => {
                if let Some((b, d, f, r)) = self.target() {
                    self.bus
                        .config_write(b, d, f, r, arch::usize_from(offset - 4), data);
                }
            }
        }
    }
}

/// The ECAM window: 4 KiB of configuration space per function, bus 0 only
/// (the window is 1 MiB). It sits on the MMIO bus the PCI bus places BAR
/// windows on, so it holds the PCI bus weakly: a strong reference would be
/// a cycle that keeps both buses, every device and the VM alive forever.
pub struct PciConfigMmio {
    bus: Weak<PciBus>,
}

pub use arch::layout::ECAM_SIZE;

impl PciConfigMmio {
    pub fn new(bus: &Arc<PciBus>) -> Self {
        PciConfigMmio {
            bus: Arc::downgrade(bus),
        }
    }

    fn decode(offset: u64) -> (u8, usize, u8, usize, usize) {
        (
            ((offset >> 20) & 0xff) as u8,
            ((offset >> 15) & 0x1f) as usize,
            ((offset >> 12) & 0x7) as u8,
            (arch::usize_from(offset) & (CONFIG_SIZE - 1)) >> 2,
            (offset & 3) as usize,
        )
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let (b, d, f, r, within) = Self::decode(offset);
        // A bus that is gone has no functions: all ones, as for an empty slot.
        let value = self
            .bus
            .upgrade()
            .map_or(u32::MAX, |bus| bus.config_read(b, d, f, r));
        extract_read(value, within, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let (b, d, f, r, within) = Self::decode(offset);
        if let Some(bus) = self.bus.upgrade() {
            bus.config_write(b, d, f, r, within, data);
        }
    }
}

/// Legacy ports reach only the first 256 bytes; the register index they
/// carry cannot exceed that.
const _: () = assert!(0x3f * 4 < LEGACY_CONFIG_SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    /// A function whose windows are whatever the test sets, without a
    /// config write (as when another vCPU reprograms it meanwhile).
    struct Movable(Mutex<Vec<BarWindow>>);

    impl Movable {
        fn at(address: u64) -> Arc<Self> {
            Arc::new(Movable(Mutex::new(vec![BarWindow {
                bar: 0,
                address,
                size: 0x1000,
            }])))
        }
        fn move_to(&self, address: u64) {
            self.0.lock().unwrap()[0].address = address;
        }
    }

    impl PciDevice for Movable {
        fn config_read(&self, _: usize) -> u32 {
            0
        }
        fn config_write(&self, _: usize, _: usize, _: &[u8]) {}
        fn bar_windows(&self) -> Vec<BarWindow> {
            self.0.lock().unwrap().clone()
        }
        fn bar_read(&self, _: usize, _: u64, data: &mut [u8]) {
            data.fill(0x22);
        }
        fn bar_write(&self, _: usize, _: u64, _: &[u8]) {}
    }

    /// A vCPU's config write (or another removal's retry) that took hold
    /// of the slot just before it was removed syncs it after the removal:
    /// the removed function's window must stay off the bus.
    #[test]
    fn a_sync_after_removal_puts_nothing_back() {
        let mmio = Arc::new(Bus::new());
        let bus = PciBus::new(mmio.clone());
        let slot = bus.add(Movable::at(0xc000_0000)).unwrap();
        let mut b = [0u8; 1];
        assert!(mmio.read(0xc000_0000, &mut b));
        let held = bus.slot(usize::from(slot)).unwrap();
        bus.remove(slot).unwrap();
        assert!(!bus.sync_windows(&held));
        assert!(!mmio.read(0xc000_0000, &mut b), "the window came back");
        // Its place is free for the next function.
        let next = bus.add(Movable::at(0xc000_0000)).unwrap();
        assert_eq!(bus.mapped_windows(next).len(), 1);
    }

    /// Only the command register and the BARs change what is decoded: a
    /// write to any other register leaves the bus as it is.
    #[test]
    fn a_write_to_another_register_does_not_sync_the_windows() {
        let mmio = Arc::new(Bus::new());
        let bus = PciBus::new(mmio.clone());
        let device = Movable::at(0xc000_0000);
        let slot = bus.add(device.clone()).unwrap();
        device.move_to(0xd000_0000);
        // Interrupt line (dword 15) and the expansion ROM BAR (dword 12).
        for reg in [15, 12] {
            bus.config_write(0, usize::from(slot), 0, reg, 0, &[0xff]);
            assert_eq!(
                bus.mapped_windows(slot)[0].address,
                0xc000_0000,
                "a write to dword {reg} moved the window"
            );
        }
        // A BAR write does.
        bus.config_write(0, usize::from(slot), 0, 4, 0, &[0]);
        assert_eq!(bus.mapped_windows(slot)[0].address, 0xd000_0000);
    }

    /// A waiting function earlier on the bus than the one whose window
    /// leaves during the same pass gets its place on the next pass.
    #[test]
    fn a_window_released_during_the_retry_lets_an_earlier_waiting_one_in() {
        let mmio = Arc::new(Bus::new());
        let bus = PciBus::new(mmio.clone());
        let holder = Movable::at(0xd000_0000);
        bus.add_at(Some(3), holder.clone()).unwrap();
        let waiting = bus.add_at(Some(2), Movable::at(0xd000_0000)).unwrap();
        assert!(bus.mapped_windows(waiting).is_empty(), "place was taken");
        // The holder moves without a config write; the retry finds it
        // only after it passed the waiting function.
        holder.move_to(0xe000_0000);
        bus.sync_waiting();
        assert_eq!(bus.mapped_windows(3)[0].address, 0xe000_0000);
        assert_eq!(
            bus.mapped_windows(waiting),
            vec![BarWindow {
                bar: 0,
                address: 0xd000_0000,
                size: 0x1000,
            }]
        );
        let mut b = [0u8; 1];
        assert!(mmio.read(0xd000_0000, &mut b));
    }
}
