//! Booting a Linux kernel with `linux-loader`: a bzImage through the 64-bit
//! boot protocol (zero page, entry in long mode), or an ELF vmlinux with a
//! PVH note (hvm_start_info, entry in 32-bit protected mode). Both get the
//! same e820 map, command line, initramfs and ACPI tables. An ELF without a
//! PVH note is one of our test guests and does not come here.

use std::io::Cursor;

use hypervisor::Vcpu;
use hypervisor::arch::{FpuState, SpecialRegisters, StandardRegisters};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::x86::{
    self, CR0_ET, CR0_PE, CR0_PG, GDT_CODE32, GDT_CODE64, GDT_DATA, MXCSR_RESET, RFLAGS_FIXED,
    X87_FCW_RESET, enter_long_mode, gdt_entry, load_data_segments, segment,
};

/// Where the boot structures go (arch::layout::linux).
pub use arch::layout::linux::{
    BOOT_STACK, CMDLINE, CMDLINE_ROOM, EBDA_START, GDT, HIGH_RAM_START, PD, PDPT, PML4, PVH_INFO,
    PVH_MEMMAP, PVH_MODLIST, ZERO_PAGE,
};
const BOOT_CODE_SELECTOR: u16 = 0x10;
const BOOT_DATA_SELECTOR: u16 = 0x18;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// The 64-bit boot protocol needs version 2.06 or later (cmdline_size).
const MIN_BOOT_PROTOCOL: u16 = 0x0206;
const XLF_KERNEL_64: u16 = 1 << 0;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const PVH_MAGIC: u32 = 0x336e_c578;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRINGS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LinuxBootError {
    #[error("cannot load the bzImage")]
    BzImage(#[source] linux_loader::loader::Error),
    #[error("cannot load the ELF kernel")]
    Elf(#[source] linux_loader::loader::Error),
    #[error(
        "the bzImage speaks boot protocol {0:#06x}; 2.06 or later with a 64-bit entry is needed"
    )]
    Protocol(u16),
    #[error("the command line is {len} bytes; this kernel takes at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("the command line has a NUL byte")]
    CmdlineNul,
    #[error("the bzImage is {have} bytes, its header says {need}")]
    Truncated { have: u64, need: u64 },
    #[error("the kernel needs RAM up to {end:#x}; low RAM ends at {ram_end:#x}")]
    KernelTooLarge { end: u64, ram_end: u64 },
    #[error("the initramfs of {size} bytes does not fit in RAM below {limit:#x} above the kernel")]
    InitramfsTooLarge { size: u64, limit: u64 },
    #[error("cannot read the initramfs")]
    ReadInitramfs(#[source] std::io::Error),
    #[error("cannot write the boot structures to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("cannot write the boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
    #[error("cannot set up vCPU {0}")]
    Vcpu(u8, #[source] hypervisor::HypervisorError),
}

/// One entry of the e820 map (also PVH's memory map).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map a Linux guest gets: conventional memory below the EBDA,
/// the BIOS area (where the ACPI tables are) reserved, RAM from 1 MiB on,
/// the ECAM window reserved, RAM above the MMIO hole.
pub fn e820_map(ram: &[(u64, u64)], reserved: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for &(gpa, size) in ram {
        let end = gpa + size;
        if gpa < HIGH_RAM_START {
            map.push(E820Entry {
                addr: gpa,
                size: EBDA_START.min(end) - gpa,
                kind: E820_RAM,
            });
            map.push(E820Entry {
                addr: EBDA_START,
                size: HIGH_RAM_START - EBDA_START,
                kind: E820_RESERVED,
            });
            if end > HIGH_RAM_START {
                map.push(E820Entry {
                    addr: HIGH_RAM_START,
                    size: end - HIGH_RAM_START,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(E820Entry {
                addr: gpa,
                size,
                kind: E820_RAM,
            });
        }
    }
    map.extend(reserved.iter().map(|&(addr, size)| E820Entry {
        addr,
        size,
        kind: E820_RESERVED,
    }));
    map.sort_by_key(|e| e.addr);
    map
}

/// Loads `image` with linux-loader's `L` at the addresses it asks for,
/// none below `HIGH_RAM_START`.
fn load_high<L: KernelLoader>(
    mem: &GuestMemoryMmap,
    image: &[u8],
) -> linux_loader::loader::Result<linux_loader::loader::KernelLoaderResult> {
    L::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIGH_RAM_START)),
    )
}

/// What a kernel is, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    BzImage,
    Elf,
}

pub fn format_of(image: &[u8]) -> Option<KernelFormat> {
    if image.get(0x202..0x206) == Some(&KERNEL_HDR_MAGIC.to_le_bytes()[..]) {
        Some(KernelFormat::BzImage)
    } else if image.starts_with(b"\x7fELF") {
        Some(KernelFormat::Elf)
    } else {
        None
    }
}

/// Whether an ELF image is a Linux kernel with a PVH entry (as opposed to
/// one of our test guests). Decided before anything is loaded, so an ELF
/// without the note goes to the test-guest loader untouched.
pub fn has_pvh_note(image: &[u8]) -> bool {
    pvh_entry(image).is_some()
}

fn u32_in(image: &[u8], at: usize) -> Option<u32> {
    crate::elf::u32_at(image, at).ok()
}

fn u64_in(image: &[u8], at: usize) -> Option<u64> {
    crate::elf::u64_at(image, at).ok()
}

/// The program headers of an ELF64 little-endian image.
fn program_headers(image: &[u8]) -> Option<Vec<crate::elf::ProgramHeader>> {
    if image.get(4..6) != Some(&[2, 1]) {
        return None;
    }
    crate::elf::program_headers(image).ok()
}

/// Where an ELF kernel's loaded segments end (physical addresses).
fn elf_load_end(image: &[u8]) -> Option<u64> {
    const PT_LOAD: u32 = 1;
    program_headers(image)?
        .into_iter()
        .filter(|ph| ph.kind == PT_LOAD)
        .map(|ph| ph.paddr.checked_add(ph.memsz))
        .try_fold(0u64, |end, seg| Some(end.max(seg?)))
}

/// XEN_ELFNOTE_PHYS32_ENTRY (18) in a PT_NOTE segment named "Xen".
fn pvh_entry(image: &[u8]) -> Option<u64> {
    const PT_NOTE: u32 = 4;
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    for ph in program_headers(image)? {
        if ph.kind != PT_NOTE {
            continue;
        }
        let mut at = usize::try_from(ph.offset).ok()?;
        let end = at.checked_add(usize::try_from(ph.filesz).ok()?)?;
        while at.checked_add(12)? <= end {
            let name_size = usize::try_from(u32_in(image, at)?).ok()?;
            let desc_size = usize::try_from(u32_in(image, at + 4)?).ok()?;
            let note = u32_in(image, at + 8)?;
            let name_at = at + 12;
            let desc_at = name_at.checked_add(name_size.next_multiple_of(4))?;
            if note == XEN_ELFNOTE_PHYS32_ENTRY && image.get(name_at..name_at + 3) == Some(b"Xen") {
                return match desc_size {
                    4 => u32_in(image, desc_at).map(u64::from),
                    8 => u64_in(image, desc_at),
                    _ => None,
                };
            }
            at = desc_at.checked_add(desc_size.next_multiple_of(4))?;
        }
    }
    None
}

/// What a Linux boot needs besides the kernel.
pub struct LinuxBootSpec<'a> {
    pub cmdline: &'a str,
    pub initramfs: Option<&'a mut std::fs::File>,
    /// (gpa, size) of every RAM region.
    pub ram: &'a [(u64, u64)],
    /// Ranges the e820 map reserves besides the BIOS area (ECAM).
    pub reserved: &'a [(u64, u64)],
    pub rsdp: u64,
}

/// How the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinuxEntry {
    /// 64-bit boot protocol: long mode at `entry`, RSI the zero page.
    Long64 { entry: u64 },
    /// PVH: 32-bit protected mode, paging off, EBX the start info.
    Pvh { entry: u64 },
}

/// The highest RAM address below 4 GiB (the low region's end).
fn low_ram_end(ram: &[(u64, u64)]) -> u64 {
    ram.iter()
        .filter(|(gpa, _)| *gpa < 1 << 32)
        .map(|(gpa, size)| (gpa + size).min(1 << 32))
        .max()
        .unwrap_or(0)
}

fn check_cmdline(cmdline: &str, max: usize) -> Result<(), LinuxBootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(LinuxBootError::CmdlineNul);
    }
    if cmdline.len() > max {
        return Err(LinuxBootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// Where an initramfs of `size` bytes goes: as high as possible below
/// `limit`, page-aligned, and clear of the kernel (`kernel_end`).
pub fn plan_initramfs(size: u64, kernel_end: u64, limit: u64) -> Result<u64, LinuxBootError> {
    limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end.next_multiple_of(arch::layout::PAGE_SIZE))
        .ok_or(LinuxBootError::InitramfsTooLarge { size, limit })
}

fn file_size(file: &mut std::fs::File) -> Result<u64, LinuxBootError> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::End(0))
        .and_then(|s| file.seek(SeekFrom::Start(0)).map(|_| s))
        .map_err(LinuxBootError::ReadInitramfs)
}

/// Reads the whole initramfs into guest memory at `addr`.
fn read_initramfs(
    mem: &GuestMemoryMmap,
    file: &mut std::fs::File,
    addr: u64,
    size: u64,
) -> Result<(), LinuxBootError> {
    let mut at = addr;
    let mut left = ::arch::usize_from(size);
    while left > 0 {
        let n = mem
            .read_volatile_from(GuestAddress(at), file, left)
            .map_err(LinuxBootError::GuestMemory)?;
        if n == 0 {
            return Err(LinuxBootError::ReadInitramfs(std::io::Error::from(
                std::io::ErrorKind::UnexpectedEof,
            )));
        }
        at += n as u64;
        left -= n;
    }
    Ok(())
}

fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), LinuxBootError> {
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE))
        .map_err(LinuxBootError::GuestMemory)
}

/// Loads `image` and writes every boot structure; nothing is written for
/// a kernel that is refused before loading (bad protocol, long command
/// line).
pub fn load(
    mem: &GuestMemoryMmap,
    image: &[u8],
    spec: LinuxBootSpec<'_>,
) -> Result<LinuxEntry, LinuxBootError> {
    let e820 = e820_map(spec.ram, spec.reserved);
    let loader = Loader {
        mem,
        low_end: low_ram_end(spec.ram),
        e820: &e820,
        spec,
    };
    match format_of(image) {
        Some(KernelFormat::BzImage) => loader.bzimage(image),
        _ => loader.pvh(image),
    }
}

/// One load in progress: what both kernel formats are loaded against.
struct Loader<'a> {
    mem: &'a GuestMemoryMmap,
    spec: LinuxBootSpec<'a>,
    /// Where RAM below the MMIO hole ends: the kernel and the initramfs
    /// stay under it.
    low_end: u64,
    e820: &'a [E820Entry],
}

impl Loader<'_> {
    fn bzimage(self, image: &[u8]) -> Result<LinuxEntry, LinuxBootError> {
        // The header's fields are checked before anything is loaded.
        let version = image
            .get(0x206..0x208)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        let xloadflags = image
            .get(0x236..0x238)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]));
        if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
            return Err(LinuxBootError::Protocol(version));
        }
        let cmdline_max = u32_in(image, 0x238)
            .map_or(0, |n| n as usize)
            .min(CMDLINE_ROOM - 1);
        check_cmdline(self.spec.cmdline, cmdline_max)?;
        // The setup sectors, then `syssize` 16-byte paragraphs of kernel.
        let setup_sects = match image.get(0x1f1).copied().unwrap_or(0) {
            0 => 4,
            n => u64::from(n),
        };
        let payload = u64::from(u32_in(image, 0x1f4).unwrap_or(0)) * 16;
        let need = (setup_sects + 1) * 512 + payload;
        if (image.len() as u64) < need {
            return Err(LinuxBootError::Truncated {
                have: image.len() as u64,
                need,
            });
        }
        // The kernel decompresses in place: it needs `init_size` from its
        // load address, which the initramfs must stay clear of.
        let init_size = u64::from(u32_in(image, 0x260).unwrap_or(0));
        let kernel_end = HIGH_RAM_START + payload.max(init_size);
        let initrd_max = u64::from(u32_in(image, 0x22c).unwrap_or(0x37ff_ffff)) + 1;
        let initramfs = match self.spec.initramfs {
            Some(file) => {
                let size = file_size(file)?;
                let addr = plan_initramfs(size, kernel_end, self.low_end.min(initrd_max))?;
                Some((file, addr, size))
            }
            None => None,
        };
        if kernel_end > self.low_end {
            return Err(LinuxBootError::KernelTooLarge {
                end: kernel_end,
                ram_end: self.low_end,
            });
        }
        let loaded = load_high::<BzImage>(self.mem, image).map_err(LinuxBootError::BzImage)?;
        let mut hdr = loaded
            .setup_header
            .ok_or(LinuxBootError::Protocol(version))?;
        write_cmdline(self.mem, self.spec.cmdline)?;
        hdr.type_of_loader = KERNEL_LOADER_OTHER;
        hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        hdr.header = KERNEL_HDR_MAGIC;
        hdr.cmd_line_ptr = const { ::arch::fit_u32(CMDLINE) };
        // At most CMDLINE_ROOM (write_cmdline checked).
        hdr.cmdline_size = u32::try_from(self.spec.cmdline.len()).unwrap_or(u32::MAX);
        if let Some((file, addr, size)) = initramfs {
            read_initramfs(self.mem, file, addr, size)?;
            // Placed below 4 GiB.
            hdr.ramdisk_image = u32::try_from(addr).unwrap_or(u32::MAX);
            hdr.ramdisk_size = u32::try_from(size).unwrap_or(u32::MAX);
        }
        let mut params = boot_params {
            hdr,
            acpi_rsdp_addr: self.spec.rsdp,
            ..Default::default()
        };
        for (slot, entry) in params.e820_table.iter_mut().zip(self.e820) {
            *slot = boot_e820_entry {
                addr: entry.addr,
                size: entry.size,
                r#type: entry.kind,
            };
        }
        params.e820_entries =
            u8::try_from(self.e820.len().min(params.e820_table.len())).unwrap_or(u8::MAX);
        linux_loader::configurator::linux::LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE)),
        self.mem,
    )
    .map_err(LinuxBootError::BootParams)?;
        write_gdt(self.mem)?;
        write_page_tables(self.mem)?;
        // The 64-bit entry is 0x200 past the protected-mode kernel's start.
        Ok(LinuxEntry::Long64 {
            entry: loaded.kernel_load.0 + 0x200,
        })
    }

    fn pvh(self, image: &[u8]) -> Result<LinuxEntry, LinuxBootError> {
        check_cmdline(self.spec.cmdline, CMDLINE_ROOM - 1)?;
        let kernel_end = elf_load_end(image).ok_or(LinuxBootError::Elf(
            linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadProgramHeader),
        ))?;
        let initramfs = match self.spec.initramfs {
            Some(file) => {
                let size = file_size(file)?;
                Some((file, plan_initramfs(size, kernel_end, self.low_end)?, size))
            }
            None => None,
        };
        let loaded = load_high::<Elf>(self.mem, image).map_err(LinuxBootError::Elf)?;
        let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
            return Err(LinuxBootError::Elf(linux_loader::loader::Error::Elf(
                linux_loader::loader::elf::Error::InvalidPvhNote,
            )));
        };
        write_cmdline(self.mem, self.spec.cmdline)?;
        let mut start = hvm_start_info {
            magic: PVH_MAGIC,
            version: 1,
            cmdline_paddr: CMDLINE,
            rsdp_paddr: self.spec.rsdp,
            memmap_paddr: PVH_MEMMAP,
            memmap_entries: u32::try_from(self.e820.len()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        let memmap: Vec<hvm_memmap_table_entry> = self
            .e820
            .iter()
            .map(|e| hvm_memmap_table_entry {
                addr: e.addr,
                size: e.size,
                type_: e.kind,
                reserved: 0,
            })
            .collect();
        let mut modules = Vec::new();
        if let Some((file, addr, size)) = initramfs {
            read_initramfs(self.mem, file, addr, size)?;
            modules.push(hvm_modlist_entry {
                paddr: addr,
                size,
                ..Default::default()
            });
            start.nr_modules = 1;
            start.modlist_paddr = PVH_MODLIST;
        }
        let mut params = BootParams::new(&start, GuestAddress(PVH_INFO));
        params.set_sections(&memmap, GuestAddress(PVH_MEMMAP));
        if !modules.is_empty() {
            params.set_modules(&modules, GuestAddress(PVH_MODLIST));
        }
        PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, self.mem)
            .map_err(LinuxBootError::BootParams)?;
        write_gdt(self.mem)?;
        Ok(LinuxEntry::Pvh { entry: entry.0 })
    }
}

/// The boot GDT Linux expects: code at 0x10, data at 0x18; PVH's 32-bit
/// code at 0x20.
fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), LinuxBootError> {
    let table = [
        0,
        0,
        gdt_entry(GDT_CODE64, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
        gdt_entry(GDT_CODE32, 0, 0xfffff),
    ];
    x86::write_gdt(mem, GDT, &table).map_err(LinuxBootError::GuestMemory)
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the kernel's
/// own early page tables to take over.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), LinuxBootError> {
    x86::write_identity_map(mem, PML4, PDPT, PD, 1).map_err(LinuxBootError::GuestMemory)
}

/// The boot vCPU's registers for `entry`; application processors wait
/// for their startup IPI instead.
pub fn setup_boot_vcpu(vcpu: &dyn Vcpu, entry: LinuxEntry) -> Result<(), LinuxBootError> {
    let err = |e| LinuxBootError::Vcpu(0, e);
    let mut sregs: SpecialRegisters = vcpu.get_sregs().map_err(err)?;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 5 * 8 - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let (regs, long) = match entry {
        LinuxEntry::Long64 { entry } => (
            StandardRegisters {
                rip: entry,
                rsp: BOOT_STACK,
                rbp: BOOT_STACK,
                rsi: ZERO_PAGE,
                rflags: RFLAGS_FIXED,
                ..Default::default()
            },
            true,
        ),
        LinuxEntry::Pvh { entry } => (
            StandardRegisters {
                rip: entry,
                rbx: PVH_INFO,
                rflags: RFLAGS_FIXED,
                ..Default::default()
            },
            false,
        ),
    };
    sregs.cs = segment(if long { BOOT_CODE_SELECTOR } else { 0x20 }, 0xb, long);
    load_data_segments(&mut sregs, segment(BOOT_DATA_SELECTOR, 0x3, false));
    if long {
        enter_long_mode(&mut sregs, PML4, CR0_PG | CR0_ET | CR0_PE);
    } else {
        sregs.cr0 = CR0_ET | CR0_PE;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    vcpu.set_sregs(&sregs).map_err(err)?;
    vcpu.set_regs(&regs).map_err(err)
}

/// What every vCPU of a Linux guest gets: FPU defaults, fast strings.
pub fn setup_common_vcpu_state(vcpu: &dyn Vcpu, index: u8) -> Result<(), LinuxBootError> {
    let err = |e| LinuxBootError::Vcpu(index, e);
    vcpu.set_fpu(&FpuState {
        fcw: X87_FCW_RESET,
        mxcsr: MXCSR_RESET,
        ..Default::default()
    })
    .map_err(err)?;
    vcpu.set_msrs(&[(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRINGS)])
        .map_err(err)
}

#[cfg(test)]
#[path = "linux_tests.rs"]
mod tests;
