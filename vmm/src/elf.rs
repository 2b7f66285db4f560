//! Loading our test guests' ELF64 images. What a test guest may be is
//! checked here first, before guest memory is touched (x86_64, every
//! PT_LOAD segment inside the image window, the entry inside a loaded
//! segment); linux-loader's `Elf::load` then copies the segments to their
//! physical addresses.

use std::io::Cursor;
use std::ops::Range;

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PT_LOAD: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian x86_64 executable")]
    WrongKind,
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("no loadable segment")]
    NoSegments,
    #[error("segment {start:#x}+{size:#x} is outside {window:#x?}")]
    OutsideWindow {
        start: u64,
        size: u64,
        window: Range<u64>,
    },
    #[error("entry point {0:#x} is not inside a loaded segment")]
    BadEntry(u64),
    #[error("cannot load the image's segments into guest memory")]
    Load(#[source] linux_loader::loader::Error),
    #[error("cannot clear a segment's uninitialised part in guest memory")]
    Copy(#[source] vm_memory::GuestMemoryError),
    #[error("an initramfs needs a Linux kernel (a bzImage or an ELF with a PVH note)")]
    NotLinux,
}

fn read<const N: usize>(image: &[u8], at: usize) -> Result<[u8; N], ElfError> {
    at.checked_add(N)
        .and_then(|end| image.get(at..end))
        .and_then(|s| s.try_into().ok())
        .ok_or(ElfError::Truncated(at.saturating_add(N)))
}

pub(crate) fn u16_at(image: &[u8], at: usize) -> Result<u16, ElfError> {
    Ok(u16::from_le_bytes(read(image, at)?))
}

pub(crate) fn u32_at(image: &[u8], at: usize) -> Result<u32, ElfError> {
    Ok(u32::from_le_bytes(read(image, at)?))
}

pub(crate) fn u64_at(image: &[u8], at: usize) -> Result<u64, ElfError> {
    Ok(u64::from_le_bytes(read(image, at)?))
}

/// What the loaders need of one ELF program header.
pub(crate) struct ProgramHeader {
    pub(crate) kind: u32,
    pub(crate) offset: u64,
    pub(crate) paddr: u64,
    pub(crate) filesz: u64,
    pub(crate) memsz: u64,
}

/// The program headers of an ELF64 little-endian image (its identification
/// is the caller's to check).
pub(crate) fn program_headers(image: &[u8]) -> Result<Vec<ProgramHeader>, ElfError> {
    let phoff = usize::try_from(u64_at(image, 32)?).map_err(|_| ElfError::Truncated(usize::MAX))?;
    let phentsize = usize::from(u16_at(image, 54)?);
    let phnum = usize::from(u16_at(image, 56)?);
    (0..phnum)
        .map(|i| {
            let ph = phoff
                .checked_add(i * phentsize)
                .ok_or(ElfError::Truncated(usize::MAX))?;
            Ok(ProgramHeader {
                kind: u32_at(image, ph)?,
                offset: u64_at(image, ph + 8)?,
                paddr: u64_at(image, ph + 24)?,
                filesz: u64_at(image, ph + 32)?,
                memsz: u64_at(image, ph + 40)?,
            })
        })
        .collect()
}

/// One PT_LOAD segment: where it goes and which file bytes fill it.
#[derive(Debug, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub memsz: u64,
    pub file: Range<usize>,
}

/// Parses and checks an image without touching guest memory.
pub fn parse(image: &[u8], window: Range<u64>) -> Result<(u64, Vec<Segment>), ElfError> {
    if image.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ElfError::NotElf);
    }
    let ident: [u8; 3] = read(image, 4)?;
    if ident != [2, 1, 1] || u16_at(image, 18)? != 62 {
        return Err(ElfError::WrongKind);
    }
    let entry = u64_at(image, 24)?;
    let mut segments = Vec::new();
    for ph in program_headers(image)? {
        if ph.kind != PT_LOAD {
            continue;
        }
        let ProgramHeader {
            offset,
            paddr,
            filesz,
            memsz,
            ..
        } = ph;
        let end = paddr.checked_add(memsz);
        if filesz > memsz || end.is_none_or(|e| paddr < window.start || e > window.end) {
            return Err(ElfError::OutsideWindow {
                start: paddr,
                size: memsz,
                window,
            });
        }
        let file_end = offset
            .checked_add(filesz)
            .filter(|e| usize::try_from(*e).is_ok_and(|e| e <= image.len()))
            .ok_or(ElfError::Truncated(image.len() + 1))?;
        segments.push(Segment {
            paddr,
            memsz,
            file: to_usize(offset)?..to_usize(file_end)?,
        });
    }
    if segments.is_empty() {
        return Err(ElfError::NoSegments);
    }
    if !segments
        .iter()
        .any(|s| entry >= s.paddr && entry < s.paddr + s.memsz)
    {
        return Err(ElfError::BadEntry(entry));
    }
    Ok((entry, segments))
}

/// A file offset already checked to lie inside the image.
fn to_usize(offset: u64) -> Result<usize, ElfError> {
    usize::try_from(offset).map_err(|_| ElfError::Truncated(usize::MAX))
}

/// Checks `image` (`parse`), loads its segments and returns its entry point.
pub fn load(mem: &GuestMemoryMmap, image: &[u8], window: Range<u64>) -> Result<u64, ElfError> {
    let (entry, segments) = parse(image, window.clone())?;
    Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(window.start)),
    )
    .map_err(ElfError::Load)?;
    // What a segment takes in memory past its file bytes (.bss) reads as
    // zeros; linux-loader copies the file bytes only.
    for s in segments {
        let filesz = s.file.len() as u64;
        let zeros = vec![
            0u8;
            usize::try_from(s.memsz - filesz).map_err(|_| ElfError::OutsideWindow {
                start: s.paddr,
                size: s.memsz,
                window: window.clone(),
            })?
        ];
        mem.write_slice(&zeros, GuestAddress(s.paddr + filesz))
            .map_err(ElfError::Copy)?;
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Range<u64> = 0x10_0000..0x40_0000;

    fn guest() -> Vec<u8> {
        test_guest::memconv_elf(
            &[test_guest::parse_ops("shared@0x1000000+4K").unwrap()],
            Default::default(),
        )
    }

    #[test]
    fn parses_our_own_guest() {
        let image = guest();
        let (entry, segments) = parse(&image, WINDOW).unwrap();
        assert_eq!(entry, test_guest::LOAD_ADDR);
        assert_eq!(segments.len(), 1);
        assert_eq!(segments[0].paddr, test_guest::LOAD_ADDR);
    }

    #[test]
    fn rejects_malformed_images() {
        assert!(matches!(parse(b"hello", WINDOW), Err(ElfError::NotElf)));
        assert!(matches!(
            parse(b"\x7fELF", WINDOW),
            Err(ElfError::Truncated(_))
        ));
        let mut wrong_machine = guest();
        wrong_machine[18] = 40;
        assert!(matches!(
            parse(&wrong_machine, WINDOW),
            Err(ElfError::WrongKind)
        ));
        let image = guest();
        assert!(matches!(
            parse(&image[..image.len() - 1], WINDOW),
            Err(ElfError::Truncated(_))
        ));
        assert!(matches!(
            parse(&image, 0x20_0000..0x40_0000),
            Err(ElfError::OutsideWindow { .. })
        ));
        let mut bad_entry = guest();
        bad_entry[24..32].copy_from_slice(&0x5000u64.to_le_bytes());
        assert!(matches!(
            parse(&bad_entry, WINDOW),
            Err(ElfError::BadEntry(0x5000))
        ));
    }
}
