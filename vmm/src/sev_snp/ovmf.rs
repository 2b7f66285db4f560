//! OVMF's GUIDed table: the data an SEV-SNP launch needs from the firmware
//! image before any of it runs.
//!
//! OVMF ends with a table of GUID-tagged entries just below its last 32
//! bytes (the AP entry point and the reset vector). It is read backwards:
//! the footer, a 16-bit length then the footer GUID, covers the whole
//! table, and each entry before it ends with its own length (data, length
//! and GUID together) and GUID. Two entries matter for SNP:
//!
//! - the SEV-ES reset block: where application processors start (KVM has
//!   no INIT-SIPI for an encrypted vCPU, so their first state is built in
//!   advance);
//! - the SEV metadata: guest ranges the launch must hand the security
//!   processor with a page type (pre-validated zero pages, the secrets
//!   page, the CPUID page, the kernel-hashes page).

use std::fmt;

use crate::le_bytes::{u16_at, u32_at};

mod descriptor_table;

pub use descriptor_table::{DescriptorTable, TableError};

/// Bytes after the table footer: the AP entry point (16) and the reset
/// vector (16) at the very end of the image.
const BYTES_AFTER_TABLE: usize = 32;
/// A 16-bit length and a 16-byte GUID close every entry.
const ENTRY_TRAILER: usize = 2 + 16;
/// Images are placed so that they end at 4 GiB.
pub use arch::layout::FIRMWARE_WINDOW_END as FIRMWARE_END;
/// Largest image accepted: the flash window QEMU leaves below 4 GiB.
#[allow(
    clippy::cast_possible_truncation,
    reason = "16 MiB fits every usize this VMM builds for"
)]
pub const MAX_FIRMWARE_SIZE: usize = arch::layout::FIRMWARE_WINDOW_SIZE as usize;
use arch::layout::PAGE_SIZE as PAGE;

/// A GUID as OVMF stores it (mixed-endian, as `EFI_GUID` is laid out).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Guid([u8; 16]);

impl Guid {
    /// From the textual form's fields, as the GUID is written in OVMF's sources.
    pub const fn new(a: u32, b: u16, c: u16, d: [u8; 8]) -> Self {
        let a = a.to_le_bytes();
        let b = b.to_le_bytes();
        let c = c.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }

    pub fn bytes(&self) -> [u8; 16] {
        self.0
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
            u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
            u16::from_le_bytes([g[4], g[5]]),
            u16::from_le_bytes([g[6], g[7]]),
            g[8],
            g[9],
            g[10..]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    }
}

pub const TABLE_FOOTER_GUID: Guid = Guid::new(
    0x96b582de,
    0x1fb2,
    0x45f7,
    [0xba, 0xea, 0xa3, 0x66, 0xc5, 0x5a, 0x08, 0x2d],
);
pub const SEV_ES_RESET_BLOCK_GUID: Guid = Guid::new(
    0x00f771de,
    0x1a7e,
    0x4fcb,
    [0x89, 0x0e, 0x68, 0xc7, 0x7e, 0x2f, 0xb4, 0x4e],
);
pub const SEV_METADATA_GUID: Guid = Guid::new(
    0xdc886566,
    0x984a,
    0x4798,
    [0xa7, 0x5e, 0x55, 0x85, 0xa7, 0xbf, 0x67, 0xcc],
);

/// SEV's metadata: descriptors of a guest range (GPA, size) and its type.
pub(crate) const SEV_METADATA: DescriptorTable = DescriptorTable {
    signature: *b"ASEV",
    descriptor_size: 12,
    // More descriptors than pages in 4 GiB cannot be a real table.
    max_descriptors: 1024,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OvmfError {
    #[error("the image is {0} bytes: not a whole number of 4 KiB pages")]
    Unaligned(usize),
    #[error("the image is {0} bytes, more than the {MAX_FIRMWARE_SIZE}-byte flash window")]
    TooLarge(usize),
    #[error("the image has no OVMF GUIDed table (no footer GUID {TABLE_FOOTER_GUID:?})")]
    NoTable,
    #[error("the GUIDed table claims {0} bytes, which do not fit the image")]
    TableLength(usize),
    #[error("entry {index} of the GUIDed table has length {length}, past the table")]
    EntryLength { index: usize, length: usize },
    #[error("entry {guid:?} is {length} bytes, {expected} expected")]
    EntrySize {
        guid: Guid,
        length: usize,
        expected: usize,
    },
    #[error("the SEV metadata is refused")]
    Metadata(#[source] TableError),
    #[error("SEV metadata section {index} has unknown type {kind:#x}")]
    SectionType { index: usize, kind: u32 },
    #[error("SEV metadata section {index} ({gpa:#x}+{size:#x}) is not whole pages")]
    SectionUnaligned { index: usize, gpa: u32, size: u32 },
    #[error("SEV metadata section {index} ({gpa:#x}+{size:#x}) overlaps {what}")]
    SectionOverlap {
        index: usize,
        gpa: u32,
        size: u32,
        what: String,
    },
}

/// Where application processors start: CS base and IP of their first
/// instruction (OVMF stores them as one 32-bit address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SevEsResetBlock {
    pub ap_reset_address: u32,
}

impl SevEsResetBlock {
    pub fn cs_base(&self) -> u64 {
        u64::from(self.ap_reset_address & 0xffff_0000)
    }

    pub fn ip(&self) -> u64 {
        u64::from(self.ap_reset_address & 0xffff)
    }
}

/// What a metadata section is, by OVMF's `SEV_DESC_TYPE_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    /// Memory the firmware uses before it can validate pages itself:
    /// launched as pre-validated zero pages.
    PrevalidatedZero,
    /// The page the security processor fills with the guest's secrets
    /// (VM platform communication keys).
    Secrets,
    /// The page the security processor checks CPUID values in.
    Cpuid,
    /// The SVSM calling-area page (only for images built for an SVSM).
    SvsmCallingArea,
    /// Where the hashes of a `-kernel` / initrd / command line go.
    KernelHashes,
}

impl SectionKind {
    fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => SectionKind::PrevalidatedZero,
            2 => SectionKind::Secrets,
            3 => SectionKind::Cpuid,
            4 => SectionKind::SvsmCallingArea,
            0x10 => SectionKind::KernelHashes,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataSection {
    pub gpa: u64,
    pub size: u64,
    pub kind: SectionKind,
}

/// An OVMF image and what its GUIDed table says.
#[derive(Clone)]
pub struct OvmfImage {
    data: Vec<u8>,
    reset_block: Option<SevEsResetBlock>,
    sections: Vec<MetadataSection>,
    entries: Vec<Guid>,
    /// Where each entry's data lies in the image, nearest the footer first.
    entry_data: Vec<(Guid, std::ops::Range<usize>)>,
}

impl fmt::Debug for OvmfImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OvmfImage")
            .field("size", &self.data.len())
            .field("reset_block", &self.reset_block)
            .field("sections", &self.sections)
            .field("entries", &self.entries)
            .finish()
    }
}

fn guid_at(data: &[u8], offset: usize) -> Guid {
    Guid(data[offset..offset + 16].try_into().expect("16 bytes"))
}

impl OvmfImage {
    /// Parses `data`, a whole OVMF image (`OVMF.fd`, code and variables).
    pub fn parse(data: Vec<u8>) -> Result<Self, OvmfError> {
        let len = data.len();
        if len == 0 || !(len as u64).is_multiple_of(PAGE) {
            return Err(OvmfError::Unaligned(len));
        }
        if len > MAX_FIRMWARE_SIZE {
            return Err(OvmfError::TooLarge(len));
        }
        let entries = Self::table_entries(&data)?;
        let mut image = OvmfImage {
            data,
            reset_block: None,
            sections: Vec::new(),
            entries: entries.iter().map(|(guid, _)| *guid).collect(),
            entry_data: entries.clone(),
        };
        for (guid, range) in entries {
            let entry = &image.data[range.clone()];
            let exactly = |expected: usize| {
                if entry.len() == expected {
                    Ok(())
                } else {
                    Err(OvmfError::EntrySize {
                        guid,
                        length: entry.len() + ENTRY_TRAILER,
                        expected: expected + ENTRY_TRAILER,
                    })
                }
            };
            if guid == SEV_ES_RESET_BLOCK_GUID {
                exactly(4)?;
                image.reset_block = Some(SevEsResetBlock {
                    ap_reset_address: u32_at(entry, 0),
                });
            } else if guid == SEV_METADATA_GUID {
                exactly(4)?;
                image.sections = image.parse_metadata(u32_at(entry, 0))?;
            }
        }
        Ok(image)
    }

    /// The table's entries, from the one nearest the footer down, as
    /// (GUID, range of its data in the image).
    fn table_entries(data: &[u8]) -> Result<Vec<(Guid, std::ops::Range<usize>)>, OvmfError> {
        let len = data.len();
        let Some(footer) = len.checked_sub(BYTES_AFTER_TABLE + ENTRY_TRAILER) else {
            return Err(OvmfError::NoTable);
        };
        if guid_at(data, footer + 2) != TABLE_FOOTER_GUID {
            return Err(OvmfError::NoTable);
        }
        let table_len = usize::from(u16_at(data, footer));
        // The footer's length counts the footer itself.
        let Some(start) = (footer + ENTRY_TRAILER)
            .checked_sub(table_len)
            .filter(|_| table_len >= ENTRY_TRAILER)
        else {
            return Err(OvmfError::TableLength(table_len));
        };
        let mut entries = Vec::new();
        let mut end = footer;
        while end > start {
            let index = entries.len();
            if end - start < ENTRY_TRAILER {
                return Err(OvmfError::EntryLength {
                    index,
                    length: end - start,
                });
            }
            let length = usize::from(u16_at(data, end - ENTRY_TRAILER));
            if length < ENTRY_TRAILER || length > end - start {
                return Err(OvmfError::EntryLength { index, length });
            }
            let guid = guid_at(data, end - 16);
            entries.push((guid, end - length..end - ENTRY_TRAILER));
            end -= length;
        }
        Ok(entries)
    }

    /// The metadata lies `offset` bytes before the end of the image.
    fn parse_metadata(&self, offset: u32) -> Result<Vec<MetadataSection>, OvmfError> {
        let descriptors = SEV_METADATA
            .descriptors(&self.data, offset)
            .map_err(OvmfError::Metadata)?;
        let firmware_gpa = self.gpa();
        let mut parsed: Vec<MetadataSection> = Vec::with_capacity(descriptors.len());
        for (index, descriptor) in descriptors.enumerate() {
            let gpa = u32_at(descriptor, 0);
            let size = u32_at(descriptor, 4);
            let raw_kind = u32_at(descriptor, 8);
            let kind = SectionKind::from_raw(raw_kind).ok_or(OvmfError::SectionType {
                index,
                kind: raw_kind,
            })?;
            let (base, bytes) = (u64::from(gpa), u64::from(size));
            if size == 0 || !base.is_multiple_of(PAGE) || !bytes.is_multiple_of(PAGE) {
                return Err(OvmfError::SectionUnaligned { index, gpa, size });
            }
            let overlap = |what: String| OvmfError::SectionOverlap {
                index,
                gpa,
                size,
                what,
            };
            // A u32 base plus a u32 size can pass 4 GiB, and so reach the image.
            if base + bytes > firmware_gpa {
                return Err(overlap("the firmware image".into()));
            }
            // Each page gets exactly one page type.
            if let Some(other) = parsed
                .iter()
                .position(|s| base < s.gpa + s.size && s.gpa < base + bytes)
            {
                return Err(overlap(format!("section {other}")));
            }
            parsed.push(MetadataSection {
                gpa: base,
                size: bytes,
                kind,
            });
        }
        Ok(parsed)
    }

    /// The image's bytes, as they are loaded at `gpa()`.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Where the image starts: it ends at 4 GiB, as QEMU maps it.
    pub fn gpa(&self) -> u64 {
        FIRMWARE_END - self.data.len() as u64
    }

    pub fn reset_block(&self) -> Option<SevEsResetBlock> {
        self.reset_block
    }

    /// The SEV metadata sections, in the image's order (the launch order).
    pub fn metadata_sections(&self) -> &[MetadataSection] {
        &self.sections
    }

    /// The GUIDs of all table entries, nearest the footer first.
    pub fn table_guids(&self) -> &[Guid] {
        &self.entries
    }

    /// The data of the first entry tagged `guid` (without its length and
    /// GUID), for the parts of the table other launches read (TDX's
    /// metadata offset).
    pub fn table_entry(&self, guid: Guid) -> Option<&[u8]> {
        self.entry_data
            .iter()
            .find(|(g, _)| *g == guid)
            .map(|(_, range)| &self.data[range.clone()])
    }
}

#[cfg(test)]
pub(crate) mod tests;
