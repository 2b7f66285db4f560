//! The memory manager: guest RAM regions, their backing, and the
//! RamBlockAttribute of every guest_memfd region.

#[cfg(test)]
mod attribute_tests;
mod backing;
mod conversion;
pub mod page_states;
pub mod ram_block_attribute;
pub mod shared_bitmap;
#[cfg(test)]
mod state_change_fuzz;
mod transaction;

use std::sync::Arc;

use hypervisor::{UserMemoryRegion, Vm};
use log::info;
use serde::Serialize;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

pub use backing::{Backing, BackingError, MemoryLayout};
pub use conversion::{
    ConversionFailure, ConversionOutcome, ConvertibleRam, NoPrivateAttributes, PrivateAttributes,
    RamRegion, VmAttributes,
};
pub use ram_block_attribute::{
    AttributeError, ConversionCounters, GRANULARITY, ListenerError, ListenerId, RamBlockAttribute,
    RamDiscardListener, Section,
};

/// Start of the 32-bit MMIO hole; RAM above it continues at 4 GiB.
pub use arch::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
/// Largest KVM memory slot this manager creates (KVM's limit is 2^31 - 1
/// pages).
pub const MAX_SLOT_BYTES: u64 = 4 << 40;
/// Guests need their boot area (page tables, image, stacks) below this.
pub const MIN_RAM: u64 = arch::layout::BOOT_AREA_END;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memory size {0:#x} is below the 16 MiB minimum")]
    TooSmall(u64),
    #[error("memory size {0:#x} is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("cannot create the backing of region {index}")]
    Backing {
        index: usize,
        #[source]
        source: BackingError,
    },
    #[error("cannot map region {0} into the VMM")]
    Mmap(usize, #[source] vm_memory::mmap::MmapRegionError),
    #[error("cannot build the guest memory map")]
    GuestMemory(#[source] vm_memory::GuestRegionCollectionError),
    #[error("cannot register region {0} with the hypervisor")]
    Register(usize, #[source] hypervisor::HypervisorError),
    #[error("cannot mark region {0} private")]
    InitialAttributes(usize, #[source] hypervisor::HypervisorError),
    #[error(
        "the firmware range {gpa:#x}+{size:#x} is not whole pages inside the flash window below 4 GiB"
    )]
    FirmwarePlacement { gpa: u64, size: u64 },
    #[error("cannot set up the firmware region")]
    Firmware(#[source] Box<MemoryError>),
}

/// The flash window: firmware ends at 4 GiB, in the top of the MMIO hole,
/// above the PCI windows, ECAM, the IOAPIC and the LAPIC.
pub use arch::layout::FIRMWARE_WINDOW_START;

/// The firmware's region: guest_memfd memory an SEV-SNP launch measures
/// the image into. Not RAM: it is in no `regions()` and the guest cannot
/// convert it.
pub struct FirmwareRegion {
    pub gpa: u64,
    pub size: u64,
    pub backing: Backing,
    /// The shared view the slot points at, kept for the slot's life.
    _mapping: vm_memory::mmap::MmapRegion,
}

#[derive(Debug, Clone, Serialize)]
pub struct RegionInfo {
    pub gpa: u64,
    pub size: u64,
    pub backing: &'static str,
    pub guest_memfd: bool,
}

pub struct MemoryManager {
    vm: Arc<dyn Vm>,
    ram: ConvertibleRam,
    guest_memory: GuestMemoryMmap,
    firmware: Option<FirmwareRegion>,
    /// The next free memory slot.
    next_slot: u32,
}

/// Splits `size` bytes of RAM around the MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

impl MemoryManager {
    /// Creates the RAM of `size` bytes and registers it with the hypervisor.
    pub fn new(vm: Arc<dyn Vm>, size: u64, layout: MemoryLayout) -> Result<Self, MemoryError> {
        if !size.is_multiple_of(GRANULARITY) {
            return Err(MemoryError::Unaligned(size));
        }
        if size < MIN_RAM {
            return Err(MemoryError::TooSmall(size));
        }
        let mut regions = Vec::new();
        let mut mmaps = Vec::new();
        let mut next_slot = 0;
        for (index, (gpa, len)) in ram_ranges(size).into_iter().enumerate() {
            let backing = Backing::create(vm.as_ref(), len, layout)
                .map_err(|source| MemoryError::Backing { index, source })?;
            let mapping = backing
                .map_shared_view(len)
                .map_err(|e| MemoryError::Mmap(index, e))?;
            let host = mapping.as_ptr() as u64;
            // KVM takes at most 2^31 - 1 pages (8 TiB) per slot: a larger
            // region is several slots over the same mapping and guest_memfd.
            let mut offset = 0;
            while offset < len {
                let piece = (len - offset).min(MAX_SLOT_BYTES);
                let region = UserMemoryRegion {
                    slot: next_slot,
                    guest_phys_addr: gpa + offset,
                    size: piece,
                    userspace_addr: host + offset,
                    guest_memfd: backing.guest_memfd().map(|fd| (fd, offset)),
                };
                // SAFETY: the mapping lives in `guest_memory`, which this
                // manager owns for as long as the VM (and so the slot) exists.
                unsafe { vm.set_user_memory_region(region) }
                    .map_err(|e| MemoryError::Register(index, e))?;
                next_slot += 1;
                offset += piece;
            }
            info!(
                "RAM region {index}: {gpa:#x}+{len:#x} backed by {}",
                backing.name()
            );
            // The bitmap starts all private; where the VM type tracks
            // attributes, KVM must agree before any vCPU runs (its default
            // is shared).
            if backing.is_guest_memfd() && vm.supports_memory_attributes() {
                vm.set_memory_attributes(gpa, len, true)
                    .map_err(|e| MemoryError::InitialAttributes(index, e))?;
            }
            let attributes = backing
                .is_guest_memfd()
                .then(|| RamBlockAttribute::new(gpa, len));
            mmaps.push(GuestRegionMmap::new(mapping, GuestAddress(gpa)).expect("no overflow"));
            regions.push(RamRegion {
                gpa,
                size: len,
                backing,
                attributes,
            });
        }
        let guest_memory =
            GuestMemoryMmap::from_regions(mmaps).map_err(MemoryError::GuestMemory)?;
        Ok(MemoryManager {
            ram: ConvertibleRam::new(Box::new(VmAttributes(vm.clone())), regions),
            vm,
            guest_memory,
            firmware: None,
            next_slot,
        })
    }

    /// Adds the firmware's region: `size` bytes of guest_memfd at `gpa`,
    /// inside the flash window and ending at 4 GiB, private where the VM
    /// type tracks attributes (an SEV-SNP launch measures into private
    /// pages only).
    pub fn with_firmware(
        mut self,
        gpa: u64,
        size: u64,
        layout: MemoryLayout,
    ) -> Result<Self, MemoryError> {
        let placed = gpa >= FIRMWARE_WINDOW_START
            && size != 0
            && gpa.checked_add(size) == Some(MMIO_HOLE_END)
            && gpa.is_multiple_of(GRANULARITY);
        if !placed {
            return Err(MemoryError::FirmwarePlacement { gpa, size });
        }
        let index = self.ram.regions().len();
        let fail = |e| MemoryError::Firmware(Box::new(e));
        // Always guest_memfd: the launch needs private memory.
        let layout = match layout {
            MemoryLayout::Anonymous => MemoryLayout::Auto,
            other => other,
        };
        let backing = Backing::create(self.vm.as_ref(), size, layout)
            .map_err(|source| fail(MemoryError::Backing { index, source }))?;
        let mapping = backing
            .map_shared_view(size)
            .map_err(|e| fail(MemoryError::Mmap(index, e)))?;
        let region = UserMemoryRegion {
            slot: self.next_slot,
            guest_phys_addr: gpa,
            size,
            userspace_addr: mapping.as_ptr() as u64,
            guest_memfd: backing.guest_memfd().map(|fd| (fd, 0)),
        };
        // SAFETY: the mapping lives in the FirmwareRegion, which this
        // manager owns for as long as the VM (and so the slot) exists.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| fail(MemoryError::Register(index, e)))?;
        self.next_slot += 1;
        if self.vm.supports_memory_attributes() {
            self.vm
                .set_memory_attributes(gpa, size, true)
                .map_err(|e| fail(MemoryError::InitialAttributes(index, e)))?;
        }
        info!(
            "firmware region: {gpa:#x}+{size:#x} backed by {}",
            backing.name()
        );
        self.firmware = Some(FirmwareRegion {
            gpa,
            size,
            backing,
            _mapping: mapping,
        });
        Ok(self)
    }

    pub fn firmware(&self) -> Option<&FirmwareRegion> {
        self.firmware.as_ref()
    }

    /// Every guest_memfd range, RAM and firmware, as (gpa, size),
    /// ascending: where an SEV-SNP launch may place pages.
    pub fn guest_memfd_ranges(&self) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = self
            .regions()
            .iter()
            .filter(|r| r.attributes.is_some())
            .map(|r| (r.gpa, r.size))
            .chain(
                self.firmware
                    .iter()
                    .filter(|f| f.backing.is_guest_memfd())
                    .map(|f| (f.gpa, f.size)),
            )
            .collect();
        ranges.sort_unstable();
        ranges
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.guest_memory
    }

    pub fn regions(&self) -> &[RamRegion] {
        self.ram.regions()
    }

    /// Converts a range for the guest (see `ConvertibleRam::convert`).
    pub fn convert(
        &self,
        request: hypervisor::MemoryConversion,
    ) -> Result<ConversionOutcome, ConversionFailure> {
        self.ram.convert(request)
    }

    /// Size of the RAM that starts at GPA 0.
    pub fn low_ram_size(&self) -> u64 {
        self.regions()[0].size
    }

    /// Guest physical address just past the highest RAM byte.
    pub fn ram_end(&self) -> u64 {
        self.regions().last().map_or(0, |r| r.gpa + r.size)
    }

    pub fn region_info(&self) -> Vec<RegionInfo> {
        self.regions()
            .iter()
            .map(|r| RegionInfo {
                gpa: r.gpa,
                size: r.size,
                backing: r.backing.name(),
                guest_memfd: r.attributes.is_some(),
            })
            .collect()
    }

    /// To-shared requests accepted for GPAs without RAM (MMIO, holes).
    pub fn unbacked_to_shared(&self) -> u64 {
        self.ram.unbacked_to_shared()
    }

    /// Conversion counters of all regions, plus refused requests that
    /// belonged to no region.
    pub fn conversion_totals(&self) -> ConversionCounters {
        self.ram.conversion_totals()
    }

    /// Whether KVM keeps per-page private/shared attributes for this VM
    /// (conversions set them); false for the default VM type.
    pub fn tracks_attributes(&self) -> bool {
        self.vm.supports_memory_attributes()
    }

    pub fn is_guest_memfd(&self) -> bool {
        self.regions().iter().any(|r| r.attributes.is_some())
    }
}
