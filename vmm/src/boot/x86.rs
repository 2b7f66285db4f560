//! x86 architectural values and the boot state both boot paths (our test
//! guests' and Linux's) build from them: the GDT, flat segments, long mode
//! and an identity map. The SEV-SNP VMSA uses the same bits.

use hypervisor::arch::{SegmentRegister, SpecialRegisters};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
/// Reads as one on every processor since the 486.
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_MCE: u64 = 1 << 6;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
/// AMD's SVM enable: KVM keeps it set in every VMCB it runs.
pub const EFER_SVME: u64 = 1 << 12;
/// RFLAGS bit 1 reads as one.
pub const RFLAGS_FIXED: u64 = 1 << 1;

/// The x87 control word and MXCSR after reset (and FNINIT, LDMXCSR's default).
pub const X87_FCW_RESET: u16 = 0x37f;
pub const MXCSR_RESET: u32 = 0x1f80;

/// Present and writable, in any level of the page tables.
pub const PTE_PRESENT_RW: u64 = 0x3;
/// A page directory entry that maps 2 MiB itself.
pub const PDE_HUGE: u64 = 0x80;

/// Descriptor flags (type, S, DPL, P, AVL, L, D/B, G) of flat segments:
/// 64-bit code, data, and 32-bit code.
pub const GDT_CODE64: u64 = 0xa09b;
pub const GDT_DATA: u64 = 0xc093;
pub const GDT_CODE32: u64 = 0xc09b;

/// One GDT descriptor from its flags, base and 20-bit limit.
pub fn gdt_entry(flags: u64, base: u64, limit: u64) -> u64 {
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0xf_0000) << 32)
        | ((flags & 0xf0ff) << 40)
}

/// Writes `entries` as the GDT at `at`.
pub fn write_gdt(mem: &GuestMemoryMmap, at: u64, entries: &[u64]) -> Result<(), GuestMemoryError> {
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(at))
}

/// A flat 4 GiB segment register: code (`type_` 0xb) or data (0x3), in
/// 64-bit mode or not.
pub fn segment(selector: u16, type_: u8, long: bool) -> SegmentRegister {
    SegmentRegister {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// `data` in every data segment register (DS, ES, FS, GS, SS).
pub fn load_data_segments(sregs: &mut SpecialRegisters, data: SegmentRegister) {
    for register in [
        &mut sregs.ds,
        &mut sregs.es,
        &mut sregs.fs,
        &mut sregs.gs,
        &mut sregs.ss,
    ] {
        *register = data;
    }
}

/// Long mode with paging from the tables at `pml4`, PAE and CR0 `cr0`
/// (which holds PG and PE, and what else the boot path wants).
pub fn enter_long_mode(sregs: &mut SpecialRegisters, pml4: u64, cr0: u64) {
    debug_assert_eq!(cr0 & (CR0_PG | CR0_PE), CR0_PG | CR0_PE);
    sregs.cr3 = pml4;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = cr0;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// Identity-maps the first `gib` GiB with 2 MiB pages: the PML4 at `pml4`,
/// one PDPT at `pdpt`, and `gib` page directories from `pd` on, a page
/// each.
pub fn write_identity_map(
    mem: &GuestMemoryMmap,
    pml4: u64,
    pdpt: u64,
    pd: u64,
    gib: u64,
) -> Result<(), GuestMemoryError> {
    mem.write_obj(pdpt | PTE_PRESENT_RW, GuestAddress(pml4))?;
    for g in 0..gib {
        let directory = pd + g * arch::layout::PAGE_SIZE;
        mem.write_obj(directory | PTE_PRESENT_RW, GuestAddress(pdpt + g * 8))?;
        let entries: Vec<u8> = (0..512u64)
            .flat_map(|i| (((g << 30) + (i << 21)) | PTE_PRESENT_RW | PDE_HUGE).to_le_bytes())
            .collect();
        mem.write_slice(&entries, GuestAddress(directory))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_architecture() {
        assert_eq!(gdt_entry(GDT_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(GDT_DATA, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(GDT_CODE32, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        // Base and limit split across the descriptor as the SDM lays it out.
        assert_eq!(gdt_entry(0, 0x1234_5678, 0xa_bcde), 0x120a_0034_5678_bcde);
    }

    #[test]
    fn the_identity_map_maps_each_2_mib_page_to_itself() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_identity_map(&mem, 0x1000, 0x2000, 0x3000, 2).unwrap();
        let at = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        assert_eq!(at(0x1000), 0x2003);
        assert_eq!(at(0x2000), 0x3003);
        assert_eq!(at(0x2008), 0x4003);
        assert_eq!(at(0x2010), 0, "a third GiB was not asked for");
        assert_eq!(at(0x3000), 0x83);
        assert_eq!(at(0x3008), (2 << 20) | 0x83);
        assert_eq!(at(0x3ff8), (511 << 21) | 0x83);
        assert_eq!(at(0x4000), (1 << 30) | 0x83);
    }

    #[test]
    fn the_gdt_is_written_in_order_and_long_mode_sets_its_bits() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_gdt(&mem, 0x500, &[0, 7, 9]).unwrap();
        let at = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        assert_eq!((at(0x500), at(0x508), at(0x510)), (0, 7, 9));
        let mut sregs = SpecialRegisters::default();
        enter_long_mode(&mut sregs, 0x9000, CR0_PG | CR0_ET | CR0_PE);
        assert_eq!(
            (sregs.cr3, sregs.cr4, sregs.cr0, sregs.efer),
            (0x9000, 0x20, 0x8000_0011, 0x500)
        );
        let data = segment(0x18, 0x3, false);
        load_data_segments(&mut sregs, data);
        for register in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(
                (register.selector, register.type_, register.db),
                (0x18, 3, 1)
            );
        }
        assert_eq!(sregs.cs.selector, 0, "code is not a data segment");
    }
}
