//! Guest physical memory layout (x86_64), from the bottom up:
//!
//! ```text
//! 0x0000_0000  RAM (low): boot areas below BOOT_AREA_END (16 MiB), then guest RAM
//! 0xc000_0000  MMIO hole (1 GiB):
//!                32-bit PCI BAR window  0xc000_0000..0xe000_0000
//!                PCI ECAM (bus 0)       0xe000_0000..0xe010_0000
//!                IOAPIC                 0xfec0_0000
//!                LAPIC                  0xfee0_0000
//!                flash (firmware)       0xff00_0000..0x1_0000_0000
//!                KVM TSS / identity map 0xfffb_c000..0xfffc_0000 (inside the flash window's span)
//! 0x1_0000_0000  RAM (high): the rest of RAM, then the 64-bit PCI BAR window
//! ```

use std::ops::Range;

/// log2 of the page size.
pub const PAGE_SHIFT: u32 = 12;
/// The page size: memory conversions, DMA mappings, attributes and every
/// guest-visible table are in 4 KiB pages.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// `PAGE_SIZE` for buffer lengths.
pub const PAGE_BYTES: usize = 1 << PAGE_SHIFT;

/// Guest RAM starts at address 0.
pub const RAM_START: u64 = 0;

/// Start of the 32-bit MMIO hole; RAM above it continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = 1 << 30;
/// End of the 32-bit MMIO hole (exclusive): 4 GiB.
pub const MMIO_HOLE_END: u64 = MMIO_HOLE_START + MMIO_HOLE_SIZE;

/// PCI ECAM window for bus 0 (1 MiB), at the top of the 32-bit BAR window.
pub const ECAM_BASE: u64 = 0xe000_0000;
/// ECAM for one bus: 32 devices x 8 functions x 4 KiB.
pub const ECAM_SIZE: u64 = 1 << 20;

/// 32-bit BARs go here, at the bottom of the MMIO hole, below ECAM.
pub const MMIO32_START: u64 = MMIO_HOLE_START;
pub const MMIO32_END: u64 = ECAM_BASE;
/// 64-bit BARs go above RAM and 4 GiB, in a window of this size...
pub const MMIO64_SIZE: u64 = 64 << 30;
/// ...starting at a boundary of this alignment.
pub const MMIO64_ALIGN: u64 = 1 << 30;

/// The 64-bit BAR window for RAM ending at `ram_end`: from the first
/// `MMIO64_ALIGN` boundary above RAM and 4 GiB, `MMIO64_SIZE` long.
pub fn mmio64_window(ram_end: u64) -> Range<u64> {
    let start = ram_end.max(MMIO_HOLE_END).next_multiple_of(MMIO64_ALIGN);
    start..start + MMIO64_SIZE
}

/// The IOAPIC's registers (one page).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APICs' registers, and the base of MSI addresses.
pub const LAPIC_START: u64 = 0xfee0_0000;

/// KVM's TSS (three pages, `KVM_SET_TSS_ADDR`) and identity-map page
/// (`KVM_SET_IDENTITY_MAP_ADDR`, one page below it), where KVM places them
/// by default relative to each other.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const KVM_TSS_SIZE: u64 = 3 * PAGE_SIZE;
pub const KVM_IDENTITY_MAP_START: u64 = KVM_TSS_START - PAGE_SIZE;

/// The flash window: firmware ends at 4 GiB, in the top of the MMIO hole,
/// above the PCI windows, ECAM, the IOAPIC and the LAPIC.
pub const FIRMWARE_WINDOW_SIZE: u64 = 16 << 20;
pub const FIRMWARE_WINDOW_END: u64 = MMIO_HOLE_END;
pub const FIRMWARE_WINDOW_START: u64 = FIRMWARE_WINDOW_END - FIRMWARE_WINDOW_SIZE;

/// Everything the VMM writes for a boot stays below this; guest RAM must
/// reach at least this far.
pub const BOOT_AREA_END: u64 = 16 << 20;

/// Where our test guests' boot state goes (`vmm/src/boot`, docs/test-guest.md).
pub mod test_guest {
    /// The GDT every vCPU starts with.
    pub const GDT_ADDR: u64 = 0x500;
    /// The identity map's top-level table...
    pub const PML4_ADDR: u64 = 0x1000;
    /// ...and its one page-directory-pointer table.
    pub const PDPT_ADDR: u64 = 0x2000;
    /// Page directories, one per identity-mapped GiB (up to 512: 2 MiB of tables).
    pub const PD_ADDR: u64 = 0x40_0000;
    pub const MAX_IDENTITY_GIB: u64 = 512;
    /// Guest images must be linked inside this window.
    pub const IMAGE_START: u64 = 0x10_0000;
    pub const IMAGE_END: u64 = 0x40_0000;
    /// vCPU n's stack grows down from STACK_TOP - n * STACK_SIZE.
    pub const STACK_TOP: u64 = 0xf0_0000;
    pub const STACK_SIZE: u64 = 0x1_0000;
}

/// Where the Linux boot structures go: low conventional memory, which the
/// kernel reads them from before it reuses it (it reserves what it keeps).
pub mod linux {
    /// The GDT of the 64-bit and PVH entries.
    pub const GDT: u64 = 0x500;
    /// PVH's `hvm_start_info`, its module list and its memory map.
    pub const PVH_INFO: u64 = 0x6000;
    pub const PVH_MODLIST: u64 = 0x6040;
    pub const PVH_MEMMAP: u64 = 0x6080;
    /// The boot protocol's `boot_params`.
    pub const ZERO_PAGE: u64 = 0x7000;
    /// The boot vCPU's stack, below the page tables.
    pub const BOOT_STACK: u64 = 0x8ff0;
    /// The 64-bit entry's identity map: PML4, PDPT and one page directory.
    pub const PML4: u64 = 0x9000;
    pub const PDPT: u64 = 0xa000;
    pub const PD: u64 = 0xb000;
    /// The kernel command line...
    pub const CMDLINE: u64 = 0x2_0000;
    /// ...and the longest this layout has room for (the kernel's own
    /// limit, `cmdline_size` in its header, is usually smaller).
    pub const CMDLINE_ROOM: usize = 0x1_0000;
    /// The 640 KiB of conventional memory end where the EBDA would start.
    pub const EBDA_START: u64 = 0x9_fc00;
    /// Where the kernel itself is loaded from.
    pub const HIGH_RAM_START: u64 = 0x10_0000;
    /// The ACPI tables: the BIOS area, which the kernel also scans for the
    /// RSDP when the boot protocol does not name it.
    pub const ACPI_TABLES_START: u64 = 0xe_0000;
    pub const ACPI_TABLES_END: u64 = 0x10_0000;
}

// The areas above keep out of one another's way.
const _: () = {
    assert!(MMIO_HOLE_END == 1 << 32);
    assert!(MMIO32_START < MMIO32_END && MMIO32_END == ECAM_BASE);
    assert!(ECAM_BASE + ECAM_SIZE <= IOAPIC_START);
    assert!(IOAPIC_START + PAGE_SIZE <= LAPIC_START);
    assert!(LAPIC_START + PAGE_SIZE <= FIRMWARE_WINDOW_START);
    assert!(FIRMWARE_WINDOW_START >= MMIO_HOLE_START);
    assert!(KVM_TSS_START + KVM_TSS_SIZE <= FIRMWARE_WINDOW_END);
    assert!(test_guest::IMAGE_END <= test_guest::PD_ADDR);
    assert!(test_guest::STACK_TOP <= BOOT_AREA_END);
    assert!(linux::CMDLINE + linux::CMDLINE_ROOM as u64 <= linux::EBDA_START);
    assert!(linux::EBDA_START <= linux::ACPI_TABLES_START);
    assert!(linux::ACPI_TABLES_END <= linux::HIGH_RAM_START);
    assert!(BOOT_AREA_END <= MMIO_HOLE_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_64_bit_window_starts_above_ram_and_4_gib_on_a_gib_boundary() {
        assert_eq!(mmio64_window(1 << 30).start, MMIO_HOLE_END);
        assert_eq!(mmio64_window((5 << 30) + 1).start, 6 << 30);
        assert_eq!(mmio64_window(0).end - mmio64_window(0).start, MMIO64_SIZE);
    }
}
