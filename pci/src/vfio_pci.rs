//! The PCI function of an assigned device, over the region / irq interface
//! VFIO and vfio-user share (`VfioOps`). What a VMM must own stays here:
//! BAR addresses (the device's own BAR registers are never trusted), the
//! expansion ROM (hidden), and the MSI-X table and enable bits (turned into
//! interrupt routes; the device only gets eventfds). Everything else in
//! configuration space and every BAR access outside the MSI-X structures is
//! forwarded to the device as a region read or write.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, warn};
use vm_device::MsiVectors;

use crate::Chain;
use crate::bus::{BarWindow, DirectArea, PciDevice};
use crate::configuration::{
    BAR0_REG, Bar, BarKind, BarRegisters, CAPABILITY_POINTER_REG, COMMAND_MEMORY, COMMAND_REG,
    NUM_BARS, ROM_REG, STATUS_CAPABILITIES, merge_write,
};
use crate::msix::{CAPABILITY_ID as MSIX_CAPABILITY_ID, MsixLayout, MsixPart, MsixTable};

/// Region indices of a PCI device (VFIO's numbering, vfio-user's too).
pub const CONFIG_REGION: u32 = 7;
pub const MSIX_IRQ_INDEX: u32 = 2;
use arch::layout::PAGE_SIZE as PAGE;
const MAX_CAPABILITIES: usize = 48;

/// A VFIO or vfio-user device's failure to do what the model asked; shows
/// its cause's message and keeps the cause's sources.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct VfioOpsError(vm_device::BoxError);

impl VfioOpsError {
    pub fn new(cause: impl Into<vm_device::BoxError>) -> Self {
        VfioOpsError(cause.into())
    }
}

/// What the device model needs from a VFIO or vfio-user device.
pub trait VfioOps: Send + Sync {
    /// Size of region `index` (0 when absent).
    fn region_size(&self, index: u32) -> Result<u64, VfioOpsError>;
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError>;
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioOpsError>;
    /// How many interrupts irq index `index` has.
    fn irq_count(&self, index: u32) -> Result<u32, VfioOpsError>;
    /// Triggers irq `index`'s vectors 0.. through `fds`; empty disables them.
    fn set_irq_eventfds(&self, index: u32, fds: &[RawFd]) -> Result<(), VfioOpsError>;
    fn reset(&self) -> Result<(), VfioOpsError>;
    /// Maps the mmappable areas of region `index` into the host and returns
    /// them; they stay mapped as long as `self`. None by default.
    fn map_region_areas(&self, _index: u32) -> Result<Vec<DirectArea>, VfioOpsError> {
        Ok(Vec::new())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    #[error("cannot read the device's configuration space")]
    Config(#[source] VfioOpsError),
    #[error("no PCI function answers (vendor id {0:#06x})")]
    NoFunction(u16),
    #[error("cannot query region {0}")]
    Region(u32, #[source] VfioOpsError),
    #[error("the device has {offered} MSI-X interrupts, its capability says {needed}")]
    MsixCount { offered: u32, needed: u16 },
    #[error("cannot query the MSI-X interrupts")]
    IrqInfo(#[source] VfioOpsError),
    #[error("BAR {index} of {size:#x} bytes is larger than a {kind} BAR may be ({limit:#x})")]
    BarTooLarge {
        index: usize,
        size: u64,
        kind: &'static str,
        limit: u64,
    },
    #[error("the MSI-X {structure} ({len:#x} bytes at offset {offset:#x} of BAR {bar}) {why}")]
    MsixLayout {
        structure: &'static str,
        bar: usize,
        offset: u64,
        len: u64,
        why: &'static str,
    },
}

/// The largest BARs a device may ask for. A 32-bit BAR cannot decode more
/// than 2 GiB; 64-bit BARs stop at 2^47 bytes, past any window a guest's
/// physical address space offers, so sizes from a device never overflow
/// the BAR arithmetic (rounding, masks, window ends).
pub const MAX_BAR32_SIZE: u64 = 1 << 31;
pub const MAX_BAR64_SIZE: u64 = 1 << 47;

/// The BAR size the guest sees for a region of `size` bytes: a page at
/// least, so no BAR shares a page with another, and a power of two.
fn bar_size(index: usize, size: u64, kind: BarKind) -> Result<u64, VfioPciError> {
    let (limit, name) = match kind {
        BarKind::Mem32 => (MAX_BAR32_SIZE, "32-bit"),
        BarKind::Mem64 => (MAX_BAR64_SIZE, "64-bit"),
    };
    size.max(PAGE)
        .checked_next_power_of_two()
        .filter(|&rounded| rounded <= limit)
        .ok_or(VfioPciError::BarTooLarge {
            index,
            size,
            kind: name,
            limit,
        })
}

/// Checks that the MSI-X table and PBA each lie inside a memory BAR the
/// device really has (`regions`: each BAR's region size, 0 when absent),
/// so every vector the capability names is one the guest can reach.
fn check_msix_layout(
    layout: &MsixLayout,
    bars: &BarRegisters,
    regions: &[u64; NUM_BARS],
) -> Result<(), VfioPciError> {
    let structures = [
        (
            "table",
            layout.table_bar,
            layout.table_offset,
            layout.table_len(),
        ),
        ("PBA", layout.pba_bar, layout.pba_offset, layout.pba_len()),
    ];
    for (structure, bar, offset, len) in structures {
        let refuse = |why| VfioPciError::MsixLayout {
            structure,
            bar,
            offset,
            len,
            why,
        };
        if bar >= NUM_BARS {
            return Err(refuse("names a BAR indicator past BAR 5"));
        }
        if bars.get(bar).is_none() {
            return Err(refuse("is in a BAR the device does not have"));
        }
        if offset.checked_add(len).is_none_or(|end| end > regions[bar]) {
            return Err(refuse("runs past the end of its BAR"));
        }
    }
    Ok(())
}

/// Whether a mappable area a device offers lies whole, page-aligned,
/// inside its region of `region_size` bytes. An area reaching past the BAR
/// would become guest memory over whatever follows the BAR.
fn area_fits(area: &DirectArea, region_size: u64) -> bool {
    area.size > 0
        && area.offset.is_multiple_of(PAGE)
        && area.size.is_multiple_of(PAGE)
        && area
            .offset
            .checked_add(area.size)
            .is_some_and(|end| end <= region_size)
}

struct State {
    bars: BarRegisters,
    command: u16,
    msix: Option<MsixTable>,
}

pub struct VfioPciDevice {
    ops: Arc<dyn VfioOps>,
    vectors: Option<Arc<dyn MsiVectors>>,
    msix_layout: Option<MsixLayout>,
    vendor_device: u32,
    /// Mmapped BAR areas, by BAR, without the pages of the MSI-X table and
    /// PBA (which must stay trapped).
    direct: Vec<(usize, DirectArea)>,
    state: Mutex<State>,
}

impl VfioPciDevice {
    /// Resets the device and learns its BARs and MSI-X capability.
    /// `vectors` builds the interrupt routes for a given vector count
    /// (`None` where the VM has no irqchip: MSI-X then delivers nothing).
    pub fn new(
        ops: Arc<dyn VfioOps>,
        vectors: impl FnOnce(u16) -> Option<Arc<dyn MsiVectors>>,
    ) -> Result<Self, VfioPciError> {
        Self::with_trapped_bars(ops, vectors, &[])
    }

    /// As `new`, but the BARs in `trapped` are never mmapped: every guest
    /// access to them goes through the VMM (Cloud Hypervisor's
    /// `x_exclude_mmap_bars`, for devices whose mapped BARs misbehave).
    pub fn with_trapped_bars(
        ops: Arc<dyn VfioOps>,
        vectors: impl FnOnce(u16) -> Option<Arc<dyn MsiVectors>>,
        trapped: &[usize],
    ) -> Result<Self, VfioPciError> {
        if let Err(e) = ops.reset() {
            // Resetting is optional for a device (vfio-user servers may
            // refuse it); the VMM emulates the state that matters anyway.
            debug!("device reset refused: {}", Chain(&e));
        }
        let read = |reg: usize| -> Result<u32, VfioPciError> {
            let mut b = [0u8; 4];
            ops.region_read(CONFIG_REGION, reg as u64 * 4, &mut b)
                .map_err(VfioPciError::Config)?;
            Ok(u32::from_le_bytes(b))
        };
        let vendor_device = read(0)?;
        if matches!((vendor_device & 0xffff) as u16, 0 | 0xffff) {
            return Err(VfioPciError::NoFunction((vendor_device & 0xffff) as u16));
        }
        let mut bars = BarRegisters::default();
        let mut regions = [0u64; NUM_BARS];
        let mut index = 0;
        while index < NUM_BARS {
            let size = ops
                .region_size(region_index(index))
                .map_err(|e| VfioPciError::Region(region_index(index), e))?;
            let raw = read(BAR0_REG + index)?;
            let is_io = raw & 1 != 0;
            let kind = if raw & 0b110 == 0b100 {
                BarKind::Mem64
            } else {
                BarKind::Mem32
            };
            if size > 0 && is_io {
                warn!("BAR {index} is an I/O BAR: not supported, left unassigned");
            } else if size > 0 && (kind == BarKind::Mem32 || index + 1 < NUM_BARS) {
                regions[index] = size;
                bars.set(
                    index,
                    Bar {
                        size: bar_size(index, size, kind)?,
                        kind,
                        prefetchable: raw & 0b1000 != 0,
                        address: 0,
                    },
                );
            }
            index += if kind == BarKind::Mem64 && !is_io {
                2
            } else {
                1
            };
        }
        let msix_layout = Self::find_msix(&read)?;
        let msix = match msix_layout {
            Some(layout) => {
                check_msix_layout(&layout, &bars, &regions)?;
                let offered = ops
                    .irq_count(MSIX_IRQ_INDEX)
                    .map_err(VfioPciError::IrqInfo)?;
                if offered < u32::from(layout.vectors) {
                    return Err(VfioPciError::MsixCount {
                        offered,
                        needed: layout.vectors,
                    });
                }
                Some(layout)
            }
            None => None,
        };
        let mut direct = Vec::new();
        for (index, _) in bars.iter().filter(|(i, _)| !trapped.contains(i)) {
            let areas = ops
                .map_region_areas(region_index(index))
                .unwrap_or_else(|e| {
                    warn!("BAR {index} stays trapped: {}", Chain(&e));
                    Vec::new()
                });
            let trapped = |area: &DirectArea| {
                msix.is_some_and(|l| {
                    let pages = |bar: usize, at: u64, len: u64| {
                        bar == index
                            && at / PAGE < (area.offset + area.size).div_ceil(PAGE)
                            && (at + len).div_ceil(PAGE) > area.offset / PAGE
                    };
                    pages(l.table_bar, l.table_offset, l.table_len())
                        || pages(l.pba_bar, l.pba_offset, l.pba_len())
                })
            };
            let fits = |area: &DirectArea| {
                let fits = area_fits(area, regions[index]);
                if !fits {
                    warn!(
                        "BAR {index}: mappable area {:#x}+{:#x} is not inside the BAR, kept trapped",
                        area.offset, area.size
                    );
                }
                fits
            };
            direct.extend(
                areas
                    .into_iter()
                    .filter(|a| fits(a) && !trapped(a))
                    .map(|a| (index, a)),
            );
        }
        let vectors = msix.and_then(|l| vectors(l.vectors));
        Ok(VfioPciDevice {
            direct,
            state: Mutex::new(State {
                bars,
                command: 0,
                msix: msix.map(|l| MsixTable::new(l, vectors.clone())),
            }),
            ops,
            vectors,
            msix_layout: msix,
            vendor_device,
        })
    }

    /// Walks the capability list for MSI-X (bounded: a looping list ends).
    fn find_msix(
        read: &impl Fn(usize) -> Result<u32, VfioPciError>,
    ) -> Result<Option<MsixLayout>, VfioPciError> {
        if (read(COMMAND_REG)? >> 16) as u16 & STATUS_CAPABILITIES == 0 {
            return Ok(None);
        }
        let mut next = (read(CAPABILITY_POINTER_REG)? & 0xfc) as usize;
        for _ in 0..MAX_CAPABILITIES {
            if next < 0x40 {
                return Ok(None);
            }
            let header = read(next / 4)?;
            if (header & 0xff) as u8 == MSIX_CAPABILITY_ID {
                return Ok(Some(MsixLayout::decode(
                    next,
                    (header >> 16) as u16,
                    read(next / 4 + 1)?,
                    read(next / 4 + 2)?,
                )));
            }
            next = ((header >> 8) & 0xfc) as usize;
        }
        Ok(None)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn vendor_id(&self) -> u16 {
        (self.vendor_device & 0xffff) as u16
    }

    pub fn device_id(&self) -> u16 {
        (self.vendor_device >> 16) as u16
    }

    /// The BARs to place: (index, size, kind).
    pub fn bar_requests(&self) -> Vec<(usize, u64, BarKind)> {
        self.state()
            .bars
            .iter()
            .map(|(i, b)| (i, b.size, b.kind))
            .collect()
    }

    /// Places BAR `index` at `address` (as firmware would before the guest
    /// looks).
    pub fn set_bar_address(&self, index: usize, address: u64) {
        let mut s = self.state();
        if let Some(mut bar) = s.bars.get(index) {
            bar.address = address;
            s.bars.set(index, bar);
        }
    }

    pub fn msix_layout(&self) -> Option<MsixLayout> {
        self.msix_layout
    }

    pub fn msix_enabled(&self) -> bool {
        self.state().msix.as_ref().is_some_and(MsixTable::enabled)
    }

    fn device_read(&self, reg: usize) -> u32 {
        let mut b = [0u8; 4];
        match self.ops.region_read(CONFIG_REGION, reg as u64 * 4, &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(e) => {
                debug!("config read of register {reg} failed: {}", Chain(&e));
                u32::MAX
            }
        }
    }

    fn device_write(&self, reg: usize, offset: usize, data: &[u8]) {
        if let Err(e) = self
            .ops
            .region_write(CONFIG_REGION, (reg * 4 + offset) as u64, data)
        {
            debug!("config write of register {reg} failed: {}", Chain(&e));
        }
    }

    /// Hands the device its MSI-X eventfds, or takes them back.
    fn switch_msix(&self, on: bool) {
        let fds: Vec<RawFd> = match (&self.vectors, on) {
            (Some(v), true) => (0..v.count()).filter_map(|i| v.notifier(i)).collect(),
            _ => Vec::new(),
        };
        if let Err(e) = self.ops.set_irq_eventfds(MSIX_IRQ_INDEX, &fds) {
            warn!(
                "cannot {} MSI-X on the device: {}",
                if on { "enable" } else { "disable" },
                Chain(&e)
            );
        }
    }

    /// Withdraws the interrupt routes (removal).
    pub fn shut_down(&self) {
        let was_on = {
            let mut s = self.state();
            let on = s.msix.as_ref().is_some_and(MsixTable::enabled);
            if let Some(t) = s.msix.as_mut() {
                t.reset();
            }
            on
        };
        if was_on {
            self.switch_msix(false);
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn config_read(&self, reg: usize) -> u32 {
        let msix_reg = self.msix_layout.map(|l| l.capability / 4);
        match reg {
            r if BarRegisters::is_bar_register(r.wrapping_sub(BAR0_REG)) => {
                self.state().bars.read(r - BAR0_REG)
            }
            ROM_REG => 0,
            COMMAND_REG => {
                let status = self.device_read(reg) & 0xffff_0000;
                status | u32::from(self.state().command)
            }
            r if Some(r) == msix_reg => {
                let header = self.device_read(reg) & 0xffff;
                let control = self.state().msix.as_ref().map_or(0, MsixTable::control);
                header | (u32::from(control) << 16)
            }
            _ => self.device_read(reg),
        }
    }

    fn config_write(&self, reg: usize, offset: usize, data: &[u8]) {
        let msix_reg = self.msix_layout.map(|l| l.capability / 4);
        match reg {
            r if BarRegisters::is_bar_register(r.wrapping_sub(BAR0_REG)) => {
                let mut s = self.state();
                let old = s.bars.read(r - BAR0_REG);
                s.bars.write(r - BAR0_REG, merge_write(old, offset, data));
            }
            ROM_REG => {}
            COMMAND_REG => {
                {
                    let mut s = self.state();
                    let merged = merge_write(u32::from(s.command), offset, data);
                    s.command = (merged & 0xffff) as u16;
                }
                self.device_write(reg, offset, data);
            }
            r if Some(r) == msix_reg => {
                // Only message control (bytes 2..4) is writable.
                let switched = {
                    let mut s = self.state();
                    let Some(table) = s.msix.as_mut() else { return };
                    let old = u32::from(table.control()) << 16;
                    let merged = merge_write(old, offset, data);
                    if merged == old {
                        return;
                    }
                    table.set_control((merged >> 16) as u16)
                };
                if let Some(on) = switched {
                    self.switch_msix(on);
                }
            }
            _ => self.device_write(reg, offset, data),
        }
    }

    fn direct_areas(&self, bar: usize) -> Vec<DirectArea> {
        self.direct
            .iter()
            .filter(|(b, _)| *b == bar)
            .map(|&(_, a)| a)
            .collect()
    }

    fn bar_windows(&self) -> Vec<BarWindow> {
        let s = self.state();
        if s.command & COMMAND_MEMORY == 0 {
            return Vec::new();
        }
        s.bars
            .iter()
            .filter(|(_, b)| b.address != 0)
            .map(|(bar, b)| BarWindow {
                bar,
                address: b.address,
                size: b.size,
            })
            .collect()
    }

    fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.msix_layout.and_then(|l| l.locate(bar, offset)) {
            Some(MsixPart::Table(at)) => {
                if let Some(t) = self.state().msix.as_ref() {
                    t.read_table(at, data);
                }
                return;
            }
            Some(MsixPart::Pba) => {
                if let Some(t) = self.state().msix.as_ref() {
                    t.read_pba(data);
                }
                return;
            }
            None => {}
        }
        if let Err(e) = self.ops.region_read(region_index(bar), offset, data) {
            debug!("BAR {bar} read at {offset:#x} failed: {}", Chain(&e));
            data.fill(0xff);
        }
    }

    fn bar_write(&self, bar: usize, offset: u64, data: &[u8]) {
        match self.msix_layout.and_then(|l| l.locate(bar, offset)) {
            Some(MsixPart::Table(at)) => {
                if let Some(t) = self.state().msix.as_mut() {
                    t.write_table(at, data);
                }
                return;
            }
            // The pending bits are read-only.
            Some(MsixPart::Pba) => return,
            None => {}
        }
        if let Err(e) = self.ops.region_write(region_index(bar), offset, data) {
            debug!("BAR {bar} write at {offset:#x} failed: {}", Chain(&e));
        }
    }
}

/// The vfio region index of BAR `bar` (VFIO numbers the BARs' regions as
/// the BARs).
fn region_index(bar: usize) -> u32 {
    u32::try_from(bar).expect("a BAR index is below NUM_BARS")
}
