//! The Linux loader against synthetic kernels: a bzImage header with a
//! small payload, an ELF with and without a PVH note.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const MIB: u64 = 1 << 20;

fn ram(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ::arch::usize_from(size))]).unwrap()
}

/// A bzImage: one setup sector after the boot sector, `payload` bytes of
/// kernel, boot protocol `version`, 64-bit entry unless told otherwise.
fn bzimage(version: u16, payload: usize, kernel_64: bool) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut image = vec![0u8; (usize::from(setup_sects) + 1) * 512];
    image[0x1f1] = setup_sects;
    image[0x1f4..0x1f8]
        .copy_from_slice(&(u32::try_from(payload).unwrap().div_ceil(16)).to_le_bytes());
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    image[0x211] = 1; // LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    image[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    image[0x236..0x238].copy_from_slice(&u16::from(kernel_64).to_le_bytes()); // xloadflags
    image[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    image[0x260..0x264].copy_from_slice(&(4 * u32::try_from(MIB).unwrap()).to_le_bytes()); // init_size
    image.extend((0..payload.div_ceil(16) * 16).map(|i| u8::try_from(i % 251).unwrap()));
    image
}

fn spec<'a>(cmdline: &'a str, ram: &'a [(u64, u64)]) -> LinuxBootSpec<'a> {
    LinuxBootSpec {
        cmdline,
        initramfs: None,
        ram,
        reserved: &[(0xe000_0000, MIB)],
        rsdp: 0xe_0000,
    }
}

fn initramfs(bytes: &[u8]) -> std::fs::File {
    crate::test_util::scratch_file("initramfs", bytes)
}

fn zero_page(mem: &GuestMemoryMmap) -> boot_params {
    mem.read_obj(GuestAddress(ZERO_PAGE)).unwrap()
}

#[test]
fn e820_has_ram_on_both_sides_of_the_hole_and_reserves_the_bios_area_and_ecam() {
    let map = e820_map(&[(0, 3 << 30), (1 << 32, 1 << 30)], &[(0xe000_0000, MIB)]);
    let entries: Vec<(u64, u64, u32)> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
    assert_eq!(
        entries,
        [
            (0, EBDA_START, E820_RAM),
            (EBDA_START, HIGH_RAM_START - EBDA_START, E820_RESERVED),
            (HIGH_RAM_START, (3 << 30) - HIGH_RAM_START, E820_RAM),
            (0xe000_0000, MIB, E820_RESERVED),
            (1 << 32, 1 << 30, E820_RAM),
        ]
    );
}

#[test]
fn a_bzimage_gets_its_zero_page_command_line_and_initramfs() {
    let mem = ram(64 * MIB);
    let regions = [(0, 64 * MIB)];
    let image = bzimage(0x020f, 4096, true);
    let mut rd = initramfs(&[0x5a; 10_000]);
    let entry = load(
        &mem,
        &image,
        LinuxBootSpec {
            initramfs: Some(&mut rd),
            ..spec("console=ttyS0 root=/dev/ram0", &regions)
        },
    )
    .unwrap();
    assert_eq!(entry, LinuxEntry::Long64 { entry: 0x10_0200 });
    let params = zero_page(&mem);
    let hdr = params.hdr;
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.cmd_line_ptr }, u32::try_from(CMDLINE).unwrap());
    assert_eq!(
        { hdr.cmdline_size } as usize,
        "console=ttyS0 root=/dev/ram0".len()
    );
    let mut line = [0u8; 29];
    mem.read_slice(&mut line, GuestAddress(CMDLINE)).unwrap();
    assert_eq!(&line, b"console=ttyS0 root=/dev/ram0\0");
    assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
    // The initramfs: page-aligned, at the top of RAM, and all there.
    let (at, size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
    assert_eq!(size, 10_000);
    assert_eq!(at % 4096, 0);
    assert!(at + size <= 64 * MIB && at + size > 64 * MIB - 4096);
    let mut rd_back = vec![0u8; 10_000];
    mem.read_slice(&mut rd_back, GuestAddress(at)).unwrap();
    assert!(rd_back.iter().all(|&b| b == 0x5a));
    // The e820 map as built.
    let n = usize::from(params.e820_entries);
    assert_eq!(n, 4);
    let e = params.e820_table[2];
    assert_eq!(
        ({ e.addr }, { e.size }, { e.r#type }),
        (HIGH_RAM_START, 63 * MIB, E820_RAM)
    );
    // The kernel is where the protocol puts it, and the boot page tables
    // and GDT are written.
    let mut kernel = [0u8; 16];
    mem.read_slice(&mut kernel, GuestAddress(HIGH_RAM_START))
        .unwrap();
    assert_eq!(kernel, image[1024..1040]);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(PML4)).unwrap(), PDPT | 3);
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(PD + 8)).unwrap(),
        (2 * MIB) | 0x83
    );
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(GDT + 0x10)).unwrap(),
        super::super::gdt_entry(0xa09b, 0, 0xfffff)
    );
}

/// Nothing reaches guest memory when a kernel is refused.
fn refused(image: &[u8], cmdline: &str, rd: Option<&[u8]>, ram_size: u64) -> LinuxBootError {
    let mem = ram(ram_size);
    let regions = [(0, ram_size)];
    let mut file = rd.map(initramfs);
    let err = load(
        &mem,
        image,
        LinuxBootSpec {
            initramfs: file.as_mut(),
            ..spec(cmdline, &regions)
        },
    )
    .unwrap_err();
    let mut first = vec![0u8; 2 * ::arch::usize_from(MIB)];
    mem.read_slice(&mut first, GuestAddress(0)).unwrap();
    assert!(
        first.iter().all(|&b| b == 0),
        "{err}: something was written"
    );
    err
}

#[test]
fn refused_kernels_leave_guest_memory_untouched() {
    let good = bzimage(0x020f, 4096, true);
    let truncated = &good[..good.len() - 100];
    assert!(matches!(
        refused(truncated, "", None, 64 * MIB),
        LinuxBootError::Truncated { .. }
    ));
    assert!(matches!(
        refused(&bzimage(0x0205, 4096, true), "", None, 64 * MIB),
        LinuxBootError::Protocol(0x0205)
    ));
    assert!(matches!(
        refused(&bzimage(0x020f, 4096, false), "", None, 64 * MIB),
        LinuxBootError::Protocol(_)
    ));
    let long = "x".repeat(2049);
    let err = refused(&good, &long, None, 64 * MIB);
    assert!(
        matches!(
            err,
            LinuxBootError::CmdlineTooLong {
                len: 2049,
                max: 2048
            }
        ),
        "{err}"
    );
    assert!(matches!(
        refused(&good, "a\0b", None, 64 * MIB),
        LinuxBootError::CmdlineNul
    ));
    // 8 MiB of RAM: the kernel needs 1 MiB + 4 MiB (init_size); a 4 MiB
    // initramfs cannot go anywhere above it.
    let err = refused(
        &good,
        "",
        Some(&vec![1u8; 4 * ::arch::usize_from(MIB)]),
        8 * MIB,
    );
    assert!(
        matches!(err, LinuxBootError::InitramfsTooLarge { .. }),
        "{err}"
    );
    // The kernel alone past low RAM.
    let err = refused(&good, "", None, 4 * MIB);
    assert!(
        matches!(err, LinuxBootError::KernelTooLarge { .. }),
        "{err}"
    );
}

#[test]
fn the_initramfs_goes_high_and_clear_of_the_kernel() {
    assert_eq!(
        plan_initramfs(4096, 5 * MIB, 64 * MIB).unwrap(),
        64 * MIB - 4096
    );
    assert_eq!(
        plan_initramfs(5000, 5 * MIB, 64 * MIB).unwrap(),
        64 * MIB - 8192
    );
    assert_eq!(
        plan_initramfs(59 * MIB, 5 * MIB, 64 * MIB).unwrap(),
        5 * MIB
    );
    assert!(plan_initramfs(59 * MIB + 1, 5 * MIB, 64 * MIB).is_err());
    assert!(plan_initramfs(u64::MAX, 0, 64 * MIB).is_err());
}

/// An ELF64 executable with one PT_LOAD at 1 MiB and, if `pvh`, a PT_NOTE
/// holding a Xen PHYS32_ENTRY note.
fn elf(pvh: Option<u32>) -> Vec<u8> {
    let phnum: u16 = if pvh.is_some() { 2 } else { 1 };
    let mut image = vec![0u8; 0x1000];
    image[..4].copy_from_slice(b"\x7fELF");
    image[4] = 2; // 64-bit
    image[5] = 1; // little-endian
    image[6] = 1;
    image[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    image[0x12..0x14].copy_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    image[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    image[0x18..0x20].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    image[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // phoff
    image[0x34..0x36].copy_from_slice(&0x40u16.to_le_bytes()); // ehsize
    image[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes()); // phentsize
    image[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
    let ph = |image: &mut Vec<u8>, at: usize, kind: u32, offset: u64, addr: u64, size: u64| {
        image[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        image[at + 4..at + 8].copy_from_slice(&7u32.to_le_bytes());
        image[at + 8..at + 16].copy_from_slice(&offset.to_le_bytes());
        image[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
        image[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
        image[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        image[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
        image[at + 48..at + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    };
    ph(&mut image, 0x40, 1, 0x800, 0x10_0000, 0x400);
    if let Some(entry) = pvh {
        ph(&mut image, 0x78, 4, 0x200, 0, 20);
        let note = &mut image[0x200..0x214];
        note[0..4].copy_from_slice(&4u32.to_le_bytes()); // "Xen\0"
        note[4..8].copy_from_slice(&4u32.to_le_bytes());
        note[8..12].copy_from_slice(&18u32.to_le_bytes());
        note[12..16].copy_from_slice(b"Xen\0");
        note[16..20].copy_from_slice(&entry.to_le_bytes());
        // linux-loader reads the note with alignment 4.
        image[0x78 + 48..0x78 + 56].copy_from_slice(&4u64.to_le_bytes());
    }
    image[0x800..0xc00].fill(0x90);
    image
}

#[test]
fn an_elf_with_a_pvh_note_boots_by_pvh_and_one_without_is_a_test_guest() {
    assert!(!has_pvh_note(&elf(None)));
    assert!(has_pvh_note(&elf(Some(0x10_0100))));
    assert!(!has_pvh_note(b"not an elf at all"));
    assert_eq!(
        format_of(&bzimage(0x020f, 16, true)),
        Some(KernelFormat::BzImage)
    );
    assert_eq!(format_of(&elf(None)), Some(KernelFormat::Elf));
    assert_eq!(format_of(b"MZ"), None);

    let mem = ram(64 * MIB);
    let regions = [(0, 64 * MIB)];
    let mut rd = initramfs(&[7; 3000]);
    let entry = load(
        &mem,
        &elf(Some(0x10_0100)),
        LinuxBootSpec {
            initramfs: Some(&mut rd),
            ..spec("console=ttyS0", &regions)
        },
    )
    .unwrap();
    assert_eq!(entry, LinuxEntry::Pvh { entry: 0x10_0100 });
    let start: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO)).unwrap();
    assert_eq!(start.magic, PVH_MAGIC);
    assert_eq!(start.cmdline_paddr, CMDLINE);
    assert_eq!(start.rsdp_paddr, 0xe_0000);
    assert_eq!(start.memmap_entries, 4);
    assert_eq!(start.nr_modules, 1);
    let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(start.memmap_paddr)).unwrap();
    assert_eq!(
        (first.addr, first.size, first.type_),
        (0, EBDA_START, E820_RAM)
    );
    let module: hvm_modlist_entry = mem.read_obj(GuestAddress(start.modlist_paddr)).unwrap();
    assert_eq!(module.size, 3000);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(module.paddr)).unwrap(), 7);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0x90);
}
