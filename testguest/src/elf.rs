//! Wraps a flat image linked at `LOAD_ADDR` into a minimal ELF64 executable
//! (one PT_LOAD segment), the format `cloud-hypervisor --kernel` loads.

pub const LOAD_ADDR: u64 = arch::layout::test_guest::IMAGE_START;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const SEGMENT_OFFSET: usize = arch::layout::PAGE_BYTES;

pub fn wrap_flat_image(image: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; SEGMENT_OFFSET];
    let mut ehdr = Vec::with_capacity(EHDR_SIZE);
    ehdr.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    ehdr.extend_from_slice(&[0; 8]);
    ehdr.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    ehdr.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    ehdr.extend_from_slice(&1u32.to_le_bytes());
    ehdr.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    ehdr.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    ehdr.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    ehdr.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    ehdr.extend_from_slice(&const { arch::fit_u16(EHDR_SIZE as u64) }.to_le_bytes());
    ehdr.extend_from_slice(&const { arch::fit_u16(PHDR_SIZE as u64) }.to_le_bytes());
    ehdr.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    ehdr.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
    out[..EHDR_SIZE].copy_from_slice(&ehdr);

    let mut phdr = Vec::with_capacity(PHDR_SIZE);
    phdr.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    phdr.extend_from_slice(&7u32.to_le_bytes()); // RWX
    phdr.extend_from_slice(&(SEGMENT_OFFSET as u64).to_le_bytes());
    phdr.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    phdr.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    phdr.extend_from_slice(&(image.len() as u64).to_le_bytes());
    phdr.extend_from_slice(&(image.len() as u64).to_le_bytes());
    phdr.extend_from_slice(&0x1000u64.to_le_bytes());
    out[EHDR_SIZE..EHDR_SIZE + PHDR_SIZE].copy_from_slice(&phdr);

    out.extend_from_slice(image);
    out
}
