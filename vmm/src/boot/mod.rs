//! x86_64 boot: loads the guest ELF and puts every vCPU straight into 64-bit
//! long mode with identity-mapped page tables. See docs/test-guest.md for the
//! layout (everything the VMM writes lies below 16 MiB).

pub mod acpi;
pub mod cpuid;
pub mod linux;
pub mod x86;

use hypervisor::Vcpu;
use hypervisor::arch::{SpecialRegisters, StandardRegisters};
use vm_memory::GuestMemoryMmap;

use self::x86::{
    CR0_ET, CR0_MP, CR0_NE, CR0_PE, CR0_PG, GDT_CODE64, GDT_DATA, RFLAGS_FIXED, enter_long_mode,
    gdt_entry, load_data_segments, segment,
};

use crate::elf::{self, ElfError};

pub use arch::layout::test_guest::{
    GDT_ADDR, IMAGE_END, IMAGE_START, MAX_IDENTITY_GIB, PD_ADDR, PDPT_ADDR, PML4_ADDR, STACK_SIZE,
    STACK_TOP,
};
pub const MAX_VCPUS: u8 = 32;

// Everything the VMM writes stays below 16 MiB, where test guests' ops begin.
const _: () = {
    assert!(IMAGE_END <= PD_ADDR);
    assert!(
        PD_ADDR + MAX_IDENTITY_GIB * arch::layout::PAGE_SIZE
            <= STACK_TOP - MAX_VCPUS as u64 * STACK_SIZE
    );
    assert!(STACK_TOP <= arch::layout::BOOT_AREA_END);
};

const CODE_SELECTOR: u16 = 0x8;
const DATA_SELECTOR: u16 = 0x10;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel image")]
    Elf(#[from] ElfError),
    #[error("cannot write boot structures to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("cannot set up vCPU {0} registers")]
    Registers(u8, #[source] hypervisor::HypervisorError),
    #[error(
        "guest RAM ends at {ram_end:#x}, past the {MAX_IDENTITY_GIB} GiB the test guest's page tables map (at most {max_ram} bytes of RAM)"
    )]
    RamPastIdentityMap { ram_end: u64, max_ram: u64 },
}

/// The most RAM our ELF test guests can reach: RAM above 3 GiB continues
/// at 4 GiB, past the MMIO hole, and the identity map ends at 512 GiB.
pub const MAX_GUEST_RAM: u64 = (MAX_IDENTITY_GIB << 30) - (1 << 30);

/// Loads `kernel` and writes GDT and page tables; returns the entry point.
pub fn load(mem: &GuestMemoryMmap, ram_end: u64, kernel: &[u8]) -> Result<u64, BootError> {
    // RAM the guest could never address would be memory it was promised
    // and cannot use; say so before loading anything.
    if ram_end > MAX_IDENTITY_GIB << 30 {
        return Err(BootError::RamPastIdentityMap {
            ram_end,
            max_ram: MAX_GUEST_RAM,
        });
    }
    let entry = elf::load(mem, kernel, IMAGE_START..IMAGE_END)?;
    write_gdt(mem)?;
    write_page_tables(mem, ram_end)?;
    Ok(entry)
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let table = [
        0,
        gdt_entry(GDT_CODE64, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
    ];
    x86::write_gdt(mem, GDT_ADDR, &table).map_err(BootError::GuestMemory)
}

/// Identity-maps [0, max(ram_end, 4 GiB) rounded up to 1 GiB) with 2 MiB
/// pages: RAM, and the MMIO hole where PCI BARs, ECAM and the LAPIC live.
fn write_page_tables(mem: &GuestMemoryMmap, ram_end: u64) -> Result<(), BootError> {
    let gib = ram_end
        .max(4 << 30)
        .div_ceil(1 << 30)
        .clamp(1, MAX_IDENTITY_GIB);
    x86::write_identity_map(mem, PML4_ADDR, PDPT_ADDR, PD_ADDR, gib).map_err(BootError::GuestMemory)
}

/// Entry registers: rdi = low RAM size, rsi = vCPU index, rdx = vCPU count.
pub fn setup_vcpu(
    vcpu: &dyn Vcpu,
    index: u8,
    count: u8,
    entry: u64,
    low_ram: u64,
) -> Result<(), BootError> {
    let err = |e| BootError::Registers(index, e);
    let mut sregs: SpecialRegisters = vcpu.get_sregs().map_err(err)?;
    sregs.cs = segment(CODE_SELECTOR, 0xb, true);
    load_data_segments(&mut sregs, segment(DATA_SELECTOR, 0x3, false));
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = 3 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let cr0 = CR0_PG | CR0_NE | CR0_ET | CR0_MP | CR0_PE;
    enter_long_mode(&mut sregs, PML4_ADDR, cr0);
    vcpu.set_sregs(&sregs).map_err(err)?;
    let regs = StandardRegisters {
        rip: entry,
        rsp: STACK_TOP - u64::from(index) * STACK_SIZE,
        rflags: RFLAGS_FIXED,
        rdi: low_ram,
        rsi: u64::from(index),
        rdx: u64::from(count),
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn ram_the_identity_map_cannot_reach_is_refused_before_loading() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let past = (MAX_IDENTITY_GIB << 30) + 4096;
        let err = load(&mem, past, &[]).unwrap_err();
        // RAM above 3 GiB continues at 4 GiB: 511 GiB of RAM end at 512 GiB.
        assert!(matches!(
            err,
            BootError::RamPastIdentityMap { ram_end, max_ram }
                if ram_end == past && max_ram == 511 << 30
        ));
        assert!(err.to_string().contains("512 GiB"), "{err}");
        // Nothing was written: the page tables are still zero.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PML4_ADDR)).unwrap(), 0);
        // At the limit the image is what is wrong, not the RAM.
        assert!(matches!(
            load(&mem, MAX_IDENTITY_GIB << 30, &[]),
            Err(BootError::Elf(_))
        ));
    }
}
