//! TDVF metadata: what a TDX launch needs from an OVMF image built for TDX
//! (TDVF), before any of it runs.
//!
//! OVMF's GUIDed table (parsed by `sev_snp::ovmf`, which both launches
//! share) has an entry, the TDX metadata offset, holding a 32-bit offset
//! from the end of the image to the "TDVF" descriptor. The descriptor
//! lists sections: where each lies in the image (data offset and size),
//! where it goes in guest memory (address and size), what it is, and
//! how the TDX module is to add it (MR.EXTEND: its contents are measured
//! into MRTD; PAGE.AUG: it is not added at launch, the guest accepts it
//! later).

use crate::le_bytes::{u32_at, u64_at};
use crate::sev_snp::ovmf::{DescriptorTable, Guid, OvmfImage, TableError};

/// The GUIDed table entry that points at the TDVF descriptor.
pub const TDX_METADATA_OFFSET_GUID: Guid = Guid::new(
    0xe47a6535,
    0x984a,
    0x4798,
    [0x86, 0x5e, 0x46, 0x85, 0xa7, 0xbf, 0x8e, 0xc2],
);

/// The TDVF descriptor: sections of 32 bytes.
const TDVF_DESCRIPTOR: DescriptorTable = DescriptorTable {
    signature: *b"TDVF",
    descriptor_size: 32,
    // More sections than this cannot be a real descriptor (TDVF has six).
    max_descriptors: 256,
};
use arch::layout::PAGE_SIZE as PAGE;

/// Section attribute bit 0: the TDX module measures the contents
/// (TDH.MR.EXTEND per 256 bytes) when the pages are added.
pub const ATTR_MR_EXTEND: u32 = 1 << 0;
/// Section attribute bit 1: the pages are not added at launch
/// (TDH.MEM.PAGE.ADD) but added later as the guest accepts them
/// (TDH.MEM.PAGE.AUG).
pub const ATTR_PAGE_AUG: u32 = 1 << 1;
const KNOWN_ATTRIBUTES: u32 = ATTR_MR_EXTEND | ATTR_PAGE_AUG;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TdvfError {
    #[error("the image has no TDX metadata offset entry: not a TDX build of OVMF")]
    NoMetadata,
    #[error("the TDX metadata offset entry is {0} bytes, 4 expected")]
    EntrySize(usize),
    #[error("the TDVF descriptor is refused")]
    Descriptor(#[source] TableError),
    #[error("TDVF section {index} has unknown type {kind:#x}")]
    Type { index: usize, kind: u32 },
    #[error("TDVF section {index} has unknown attributes {attributes:#x}")]
    Attributes { index: usize, attributes: u32 },
    #[error("TDVF section {index} ({kind:?}) {why}")]
    Section {
        index: usize,
        kind: SectionType,
        why: String,
    },
    #[error("TDVF section {index} ({gpa:#x}+{size:#x}) overlaps section {other}")]
    Overlap {
        index: usize,
        gpa: u64,
        size: u64,
        other: usize,
    },
    #[error("the TDVF descriptor has no BFV section: no firmware code")]
    NoBfv,
    #[error("the TDVF descriptor has {0} TD_HOB sections, at most one allowed")]
    TwoHobs(usize),
}

/// What a section is (the TDVF specification's section types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionType {
    /// Boot firmware volume: the firmware's code, measured.
    Bfv,
    /// Configuration firmware volume: UEFI variables, not measured into
    /// MRTD (the firmware measures them into an RTMR).
    Cfv,
    /// Where the VMM puts the TD HOB (the memory map handed to TDVF).
    TdHob,
    /// Memory the firmware uses before it accepts RAM itself.
    TempMem,
    /// Memory the firmware keeps for good.
    PermMem,
    /// A payload (a kernel) loaded by the VMM.
    Payload,
    /// The payload's parameters (a command line).
    PayloadParam,
    /// TD information (a shim's own data).
    TdInfo,
}

impl SectionType {
    fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => SectionType::Bfv,
            1 => SectionType::Cfv,
            2 => SectionType::TdHob,
            3 => SectionType::TempMem,
            4 => SectionType::PermMem,
            5 => SectionType::Payload,
            6 => SectionType::PayloadParam,
            7 => SectionType::TdInfo,
            _ => return None,
        })
    }

    /// Whether the section's contents must come from the image.
    fn has_image_data(self) -> bool {
        matches!(self, SectionType::Bfv | SectionType::Cfv)
    }

    /// Whether the section must take nothing from the image (payloads and
    /// TD information may or may not).
    fn memory_only(self) -> bool {
        matches!(
            self,
            SectionType::TdHob | SectionType::TempMem | SectionType::PermMem
        )
    }
}

/// One TDVF section, as the descriptor gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TdvfSection {
    /// Where the section's bytes start in the image.
    pub data_offset: u32,
    /// How many bytes of the image it takes (0 for memory-only sections).
    pub raw_data_size: u32,
    pub memory_address: u64,
    pub memory_size: u64,
    pub kind: SectionType,
    pub attributes: u32,
}

impl TdvfSection {
    pub fn mr_extend(&self) -> bool {
        self.attributes & ATTR_MR_EXTEND != 0
    }

    pub fn page_aug(&self) -> bool {
        self.attributes & ATTR_PAGE_AUG != 0
    }

    pub fn end(&self) -> u64 {
        self.memory_address + self.memory_size
    }
}

/// The TDVF descriptor of an OVMF image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdvfMetadata {
    pub sections: Vec<TdvfSection>,
}

impl TdvfMetadata {
    /// Finds and checks the TDVF descriptor of `image`.
    pub fn parse(image: &OvmfImage) -> Result<Self, TdvfError> {
        let entry = image
            .table_entry(TDX_METADATA_OFFSET_GUID)
            .ok_or(TdvfError::NoMetadata)?;
        if entry.len() != 4 {
            return Err(TdvfError::EntrySize(entry.len() + 18));
        }
        let offset = u32_at(entry, 0);
        let data = image.data();
        let len = data.len();
        let descriptors = TDVF_DESCRIPTOR
            .descriptors(data, offset)
            .map_err(TdvfError::Descriptor)?;
        let mut sections: Vec<TdvfSection> = Vec::with_capacity(descriptors.len());
        for (index, descriptor) in descriptors.enumerate() {
            let raw_kind = u32_at(descriptor, 24);
            let kind = SectionType::from_raw(raw_kind).ok_or(TdvfError::Type {
                index,
                kind: raw_kind,
            })?;
            let attributes = u32_at(descriptor, 28);
            if attributes & !KNOWN_ATTRIBUTES != 0 {
                return Err(TdvfError::Attributes { index, attributes });
            }
            let section = TdvfSection {
                data_offset: u32_at(descriptor, 0),
                raw_data_size: u32_at(descriptor, 4),
                memory_address: u64_at(descriptor, 8),
                memory_size: u64_at(descriptor, 16),
                kind,
                attributes,
            };
            Self::check_section(index, &section, len)?;
            if let Some(other) = sections
                .iter()
                .position(|s| section.memory_address < s.end() && s.memory_address < section.end())
            {
                return Err(TdvfError::Overlap {
                    index,
                    gpa: section.memory_address,
                    size: section.memory_size,
                    other,
                });
            }
            sections.push(section);
        }
        if !sections.iter().any(|s| s.kind == SectionType::Bfv) {
            return Err(TdvfError::NoBfv);
        }
        let hobs = sections
            .iter()
            .filter(|s| s.kind == SectionType::TdHob)
            .count();
        if hobs > 1 {
            return Err(TdvfError::TwoHobs(hobs));
        }
        Ok(TdvfMetadata { sections })
    }

    /// The rules one section must keep on its own.
    fn check_section(index: usize, s: &TdvfSection, image_len: usize) -> Result<(), TdvfError> {
        let refuse = |why: &str| {
            Err(TdvfError::Section {
                index,
                kind: s.kind,
                why: why.to_string(),
            })
        };
        // The TDX module adds and measures whole 4 KiB pages.
        if s.memory_size == 0
            || !s.memory_address.is_multiple_of(PAGE)
            || !s.memory_size.is_multiple_of(PAGE)
        {
            return refuse(&format!(
                "at {:#x}+{:#x} is not whole 4 KiB pages",
                s.memory_address, s.memory_size
            ));
        }
        if s.memory_address.checked_add(s.memory_size).is_none() {
            return refuse("wraps past the end of the address space");
        }
        if u64::from(s.raw_data_size) > s.memory_size {
            return refuse(&format!(
                "has {:#x} bytes of data for {:#x} bytes of memory",
                s.raw_data_size, s.memory_size
            ));
        }
        if u64::from(s.data_offset) + u64::from(s.raw_data_size) > image_len as u64 {
            return refuse(&format!(
                "data {:#x}+{:#x} runs past the {image_len:#x}-byte image",
                s.data_offset, s.raw_data_size
            ));
        }
        if s.kind.has_image_data() && s.raw_data_size == 0 {
            return refuse("has no data in the image");
        }
        if s.kind.memory_only() && s.raw_data_size != 0 {
            return refuse("is memory only but has data in the image");
        }
        if s.kind == SectionType::Bfv && !s.mr_extend() {
            return refuse("is not measured (no MR.EXTEND): the firmware's code must be");
        }
        if s.page_aug() && (s.mr_extend() || s.raw_data_size != 0) {
            return refuse("is PAGE.AUG, so added after the launch, yet has contents to add");
        }
        if s.page_aug() && !matches!(s.kind, SectionType::TempMem | SectionType::PermMem) {
            return refuse("is PAGE.AUG, which only temporary or permanent memory may be");
        }
        Ok(())
    }

    /// The section the TD HOB goes in.
    pub fn td_hob(&self) -> Option<&TdvfSection> {
        self.sections.iter().find(|s| s.kind == SectionType::TdHob)
    }

    /// The contents the launch gives a section's memory: the image's bytes
    /// zero padded to the section's size (zeros for memory-only sections).
    pub fn initial_contents(section: &TdvfSection, image: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; ::arch::usize_from(section.memory_size)];
        let start = section.data_offset as usize;
        let raw = section.raw_data_size as usize;
        out[..raw].copy_from_slice(&image[start..start + raw]);
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sev_snp::ovmf::tests::{debian_ovmf, entry, synthetic_image};

    /// One descriptor entry as written: (data_offset, raw_size, gpa,
    /// memory size, type, attributes).
    pub type RawSection = (u32, u32, u64, u64, u32, u32);

    /// A TDVF descriptor with `sections` as (data_offset, raw_size, gpa,
    /// memory size, type, attributes).
    pub fn descriptor(version: u32, sections: &[RawSection]) -> Vec<u8> {
        let descriptors: Vec<Vec<u8>> = sections
            .iter()
            .map(|&(offset, raw, gpa, size, kind, attributes)| {
                let mut out = [offset, raw].map(u32::to_le_bytes).concat();
                out.extend_from_slice(&[gpa, size].map(u64::to_le_bytes).concat());
                out.extend_from_slice(&[kind, attributes].map(u32::to_le_bytes).concat());
                out
            })
            .collect();
        TDVF_DESCRIPTOR.build(version, &descriptors)
    }

    /// A 64 KiB image: the first 16 KiB are the CFV, the rest the BFV;
    /// the descriptor sits 0x800 bytes before the end.
    pub const SYNTHETIC_SIZE: usize = 64 << 10;
    pub const SYNTHETIC_GPA: u64 = (1 << 32) - SYNTHETIC_SIZE as u64;

    pub fn synthetic_sections() -> Vec<RawSection> {
        vec![
            (
                0x4000,
                0xc000,
                SYNTHETIC_GPA + 0x4000,
                0xc000,
                0,
                ATTR_MR_EXTEND,
            ),
            (0, 0x4000, SYNTHETIC_GPA, 0x4000, 1, 0),
            (0, 0, 0x80_0000, 0x2000, 3, 0),
            (0, 0, 0x80_2000, 0x1000, 2, 0),
        ]
    }

    pub fn synthetic_tdvf(sections: &[RawSection]) -> OvmfImage {
        let image = synthetic_image(
            SYNTHETIC_SIZE,
            &[entry(TDX_METADATA_OFFSET_GUID, &0x800u32.to_le_bytes())],
            Some((0x800, descriptor(1, sections))),
        );
        OvmfImage::parse(image).unwrap()
    }

    /// The edges of the descriptor's bounds: what ends exactly at a limit
    /// is read on, what passes it by one is refused.
    #[test]
    fn descriptor_bounds_hold_to_the_byte() {
        let at = |size: usize, offset: u32, bytes: Vec<u8>| {
            TdvfMetadata::parse(
                &OvmfImage::parse(synthetic_image(
                    size,
                    &[entry(TDX_METADATA_OFFSET_GUID, &offset.to_le_bytes())],
                    Some((offset, bytes)),
                ))
                .unwrap(),
            )
        };
        // The length must cover every section, to the byte.
        let four = descriptor(1, &synthetic_sections());
        let exact = u32::try_from(four.len()).unwrap();
        let mut short = four.clone();
        short[4..8].copy_from_slice(&(exact - 1).to_le_bytes());
        assert_eq!(
            at(SYNTHETIC_SIZE, 0x800, short),
            Err(TdvfError::Descriptor(TableError::Length {
                sections: 4,
                length: exact - 1
            }))
        );
        assert_eq!(at(SYNTHETIC_SIZE, 0x800, four).unwrap().sections.len(), 4);

        // A header may end at the image's last byte (then it has no
        // sections, so no BFV); one section more would pass the end.
        let empty = descriptor(1, &[]);
        let end = u32::try_from(empty.len()).unwrap();
        assert_eq!(at(16384, end, empty.clone()), Err(TdvfError::NoBfv));
        let mut past = empty;
        past[12..16].copy_from_slice(&1u32.to_le_bytes());
        past[4..8].copy_from_slice(&(end + 32).to_le_bytes());
        assert_eq!(
            at(16384, end, past),
            Err(TdvfError::Descriptor(TableError::Length {
                sections: 1,
                length: end + 32
            }))
        );

        // At most `max_descriptors` sections: the BFV and one-page
        // temporary memory for the rest.
        let sections = |count: u32| -> Vec<RawSection> {
            let mut out = vec![synthetic_sections()[0]];
            out.extend((1..u64::from(count)).map(|i| (0, 0, 0x80_0000 + i * 0x1000, 0x1000, 3, 0)));
            out
        };
        let most = at(
            SYNTHETIC_SIZE,
            0x8000,
            descriptor(1, &sections(TDVF_DESCRIPTOR.max_descriptors)),
        );
        assert_eq!(
            most.unwrap().sections.len(),
            TDVF_DESCRIPTOR.max_descriptors as usize
        );
        let too_many = descriptor(1, &sections(TDVF_DESCRIPTOR.max_descriptors + 1));
        let length = u32::try_from(too_many.len()).unwrap();
        assert_eq!(
            at(SYNTHETIC_SIZE, 0x8000, too_many),
            Err(TdvfError::Descriptor(TableError::Length {
                sections: TDVF_DESCRIPTOR.max_descriptors + 1,
                length
            }))
        );
    }

    #[test]
    fn a_synthetic_descriptor_gives_its_sections_in_order() {
        let image = synthetic_tdvf(&synthetic_sections());
        let metadata = TdvfMetadata::parse(&image).unwrap();
        let kinds: Vec<SectionType> = metadata.sections.iter().map(|s| s.kind).collect();
        use SectionType::*;
        assert_eq!(kinds, [Bfv, Cfv, TempMem, TdHob]);
        let bfv = metadata.sections[0];
        assert_eq!(
            (bfv.data_offset, bfv.raw_data_size, bfv.memory_address),
            (0x4000, 0xc000, SYNTHETIC_GPA + 0x4000)
        );
        assert!(bfv.mr_extend() && !bfv.page_aug());
        assert_eq!(metadata.td_hob().unwrap().memory_address, 0x80_2000);
        let contents = TdvfMetadata::initial_contents(&bfv, image.data());
        assert_eq!(contents, image.data()[0x4000..]);
    }

    #[test]
    fn later_section_types_and_page_aug_are_read() {
        let mut sections = synthetic_sections();
        sections.push((0, 0, 0x90_0000, 0x10_0000, 4, ATTR_PAGE_AUG));
        sections.push((0, 0, 0xa0_0000, 0x1000, 5, 0));
        sections.push((0, 0, 0xa0_1000, 0x1000, 6, 0));
        sections.push((0, 0, 0xa0_2000, 0x1000, 7, 0));
        sections.push((0, 0, 0xb0_0000, 0x1000, 3, ATTR_PAGE_AUG));
        let metadata = TdvfMetadata::parse(&synthetic_tdvf(&sections)).unwrap();
        use SectionType::*;
        let kinds: Vec<SectionType> = metadata.sections[4..].iter().map(|s| s.kind).collect();
        assert_eq!(kinds, [PermMem, Payload, PayloadParam, TdInfo, TempMem]);
        assert!(metadata.sections[4].page_aug());
        assert!(metadata.sections[8].page_aug());
    }

    #[test]
    fn malformed_descriptors_are_refused_with_the_reason() {
        let parse = |image: Vec<u8>| TdvfMetadata::parse(&OvmfImage::parse(image).unwrap());
        assert_eq!(
            parse(synthetic_image(8192, &[], None)),
            Err(TdvfError::NoMetadata)
        );
        assert_eq!(
            parse(synthetic_image(
                8192,
                &[entry(TDX_METADATA_OFFSET_GUID, &[0; 8])],
                None
            )),
            Err(TdvfError::EntrySize(26))
        );
        for offset in [8u32, 0x10_0000] {
            assert_eq!(
                parse(synthetic_image(
                    16384,
                    &[entry(TDX_METADATA_OFFSET_GUID, &offset.to_le_bytes())],
                    None
                )),
                Err(TdvfError::Descriptor(TableError::Offset(offset)))
            );
        }
        let with = |bytes: Vec<u8>| {
            parse(synthetic_image(
                SYNTHETIC_SIZE,
                &[entry(TDX_METADATA_OFFSET_GUID, &0x800u32.to_le_bytes())],
                Some((0x800, bytes)),
            ))
        };
        let mut bad = descriptor(1, &synthetic_sections());
        bad[0] = b'X';
        assert_eq!(
            with(bad),
            Err(TdvfError::Descriptor(TableError::Signature {
                found: *b"XDVF",
                expected: *b"TDVF"
            }))
        );
        assert_eq!(
            with(descriptor(2, &synthetic_sections())),
            Err(TdvfError::Descriptor(TableError::Version(2)))
        );
        let mut short = descriptor(1, &synthetic_sections());
        short[4..8].copy_from_slice(&48u32.to_le_bytes());
        assert_eq!(
            with(short),
            Err(TdvfError::Descriptor(TableError::Length {
                sections: 4,
                length: 48
            }))
        );
        let mut many = descriptor(1, &[]);
        many[12..16].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            with(many),
            Err(TdvfError::Descriptor(TableError::Length { .. }))
        ));

        let changed = |index: usize, f: &dyn Fn(&mut RawSection)| {
            let mut sections = synthetic_sections();
            f(&mut sections[index]);
            with(descriptor(1, &sections))
        };
        assert_eq!(
            changed(2, &|s| s.4 = 9),
            Err(TdvfError::Type { index: 2, kind: 9 })
        );
        assert_eq!(
            changed(2, &|s| s.5 = 4),
            Err(TdvfError::Attributes {
                index: 2,
                attributes: 4
            })
        );
        let why = |result: Result<TdvfMetadata, TdvfError>| match result {
            Err(TdvfError::Section { why, .. }) => why,
            other => panic!("{other:?}"),
        };
        assert!(why(changed(2, &|s| s.2 = 0x80_0800)).contains("not whole 4 KiB pages"));
        assert!(why(changed(2, &|s| s.3 = 0)).contains("not whole 4 KiB pages"));
        assert!(why(changed(2, &|s| s.2 = u64::MAX - 0xfff)).contains("wraps"));
        assert!(why(changed(1, &|s| s.1 = 0x5000)).contains("bytes of data for"));
        assert!(why(changed(1, &|s| s.0 = 0xe000)).contains("runs past"));
        assert!(why(changed(1, &|s| s.1 = 0)).contains("no data in the image"));
        assert!(why(changed(3, &|s| s.1 = 0x1000)).contains("memory only"));
        assert!(why(changed(0, &|s| s.5 = 0)).contains("must be"));
        assert!(why(changed(2, &|s| s.5 = ATTR_PAGE_AUG | ATTR_MR_EXTEND)).contains("PAGE.AUG"));
        assert!(why(changed(3, &|s| s.5 = ATTR_PAGE_AUG)).contains("only temporary"));
        assert_eq!(
            changed(3, &|s| s.2 = 0x80_1000),
            Err(TdvfError::Overlap {
                index: 3,
                gpa: 0x80_1000,
                size: 0x1000,
                other: 2
            })
        );
        let mut no_bfv = synthetic_sections();
        no_bfv.remove(0);
        assert_eq!(with(descriptor(1, &no_bfv)), Err(TdvfError::NoBfv));
        let mut two_hobs = synthetic_sections();
        two_hobs.push((0, 0, 0x90_0000, 0x1000, 2, 0));
        assert_eq!(with(descriptor(1, &two_hobs)), Err(TdvfError::TwoHobs(2)));
    }

    /// What edk2 2022.11 as Debian builds it carries (read with a hex dump
    /// of the descriptor 0x840 bytes before the end of the image).
    #[test]
    fn debian_ovmf_fd_has_the_tdvf_sections() {
        let Some(data) = debian_ovmf() else { return };
        let image = OvmfImage::parse(data).unwrap();
        let metadata = TdvfMetadata::parse(&image).unwrap();
        use SectionType::*;
        let sections: Vec<_> = metadata
            .sections
            .iter()
            .map(|s| {
                (
                    s.data_offset,
                    s.raw_data_size,
                    s.memory_address,
                    s.memory_size,
                    s.kind,
                    s.attributes,
                )
            })
            .collect();
        assert_eq!(
            sections,
            [
                (
                    0x2_0000,
                    0x1e_0000,
                    0xffe2_0000,
                    0x1e_0000,
                    Bfv,
                    ATTR_MR_EXTEND
                ),
                (0, 0x2_0000, 0xffe0_0000, 0x2_0000, Cfv, 0),
                (0, 0, 0x81_0000, 0x1_0000, TempMem, 0),
                (0, 0, 0x80_b000, 0x2000, TempMem, 0),
                (0, 0, 0x80_9000, 0x2000, TdHob, 0),
                (0, 0, 0x80_0000, 0x6000, TempMem, 0),
            ]
        );
    }
}
