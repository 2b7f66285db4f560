//! The TD HOB: the memory map a TDX guest's firmware (TDVF) starts from,
//! written into the TD_HOB section before the launch adds it.
//!
//! It is a UEFI PI hand-off block list (TDVF specification, "TD HOB"):
//! the PHIT (hand-off information table) first, then one resource
//! descriptor per range, then the end-of-list HOB. Resource descriptors
//! say:
//! - the RAM the launch added (TEMP_MEM, TD_HOB and other sections in
//!   RAM): system memory, already accepted;
//! - the rest of RAM: unaccepted memory, which TDVF accepts (TDG.MEM.PAGE
//!   .ACCEPT) before it uses it or hands it to the OS as unaccepted;
//! - the MMIO the guest may use (the 32-bit hole below the firmware with
//!   the BAR window, ECAM, IOAPIC and LAPIC pages, and the 64-bit BAR
//!   window): memory-mapped I/O, uncached.
//!
//! The firmware's own range (BFV, CFV) is not described: TDVF knows it.

use super::tdvf::TdvfMetadata;
use crate::memory::{MMIO_HOLE_START, ram_ranges};
use crate::sev_snp::ovmf::OvmfImage;

pub const HOB_TYPE_HANDOFF: u16 = 0x0001;
pub const HOB_TYPE_RESOURCE_DESCRIPTOR: u16 = 0x0003;
pub const HOB_TYPE_END_OF_HOB_LIST: u16 = 0xffff;
/// `EFI_HOB_HANDOFF_TABLE_VERSION`.
pub const HANDOFF_VERSION: u32 = 9;
const HANDOFF_LEN: usize = 56;
const RESOURCE_LEN: usize = 48;
const END_LEN: usize = 8;

/// `EFI_RESOURCE_TYPE`.
pub const RESOURCE_SYSTEM_MEMORY: u32 = 0;
pub const RESOURCE_MEMORY_MAPPED_IO: u32 = 1;
/// Memory the guest must accept before use (PI 1.8, for TDX and SNP).
pub const RESOURCE_MEMORY_UNACCEPTED: u32 = 7;

/// `EFI_RESOURCE_ATTRIBUTE_*`.
pub const ATTR_PRESENT: u32 = 0x1;
pub const ATTR_INITIALIZED: u32 = 0x2;
pub const ATTR_TESTED: u32 = 0x4;
pub const ATTR_UNCACHEABLE: u32 = 0x400;
/// Private RAM, accepted or not.
pub const ATTR_RAM: u32 = ATTR_PRESENT | ATTR_INITIALIZED | ATTR_TESTED;
pub const ATTR_MMIO: u32 = ATTR_PRESENT | ATTR_INITIALIZED | ATTR_UNCACHEABLE;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HobError {
    #[error("the TD HOB needs {needed} bytes, the TD_HOB section has {size}")]
    TooLarge { needed: usize, size: u64 },
}

/// One resource descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resource {
    pub kind: u32,
    pub attributes: u32,
    pub start: u64,
    pub length: u64,
}

/// The resources of a TD with `ram_size` bytes of RAM: RAM split into
/// accepted (what the launch adds) and unaccepted, and the MMIO ranges.
/// Sorted by address.
pub fn resources(metadata: &TdvfMetadata, ram_size: u64, firmware: &OvmfImage) -> Vec<Resource> {
    let ram = ram_ranges(ram_size);
    // The pages KVM_TDX_INIT_MEM_REGION adds in RAM are accepted already.
    let mut added: Vec<(u64, u64)> = metadata
        .sections
        .iter()
        .filter(|s| !s.page_aug())
        .filter(|s| {
            ram.iter()
                .any(|(start, size)| s.memory_address >= *start && s.end() <= start + size)
        })
        .map(|s| (s.memory_address, s.end()))
        .collect();
    added.sort();
    let mut out = Vec::new();
    let mut push = |kind, attributes, start: u64, end: u64| {
        if end > start {
            out.push(Resource {
                kind,
                attributes,
                start,
                length: end - start,
            });
        }
    };
    for (start, size) in &ram {
        let end = start + size;
        let mut at = *start;
        for (s, e) in added.iter().filter(|(s, _)| *s >= *start && *s < end) {
            push(RESOURCE_MEMORY_UNACCEPTED, ATTR_RAM, at, *s);
            push(RESOURCE_SYSTEM_MEMORY, ATTR_RAM, *s, *e);
            at = *e;
        }
        push(RESOURCE_MEMORY_UNACCEPTED, ATTR_RAM, at, end);
    }
    let ram_end = ram.last().map_or(0, |(s, l)| s + l);
    let (_, mmio64) = crate::device_manager::pci_segment::bar_windows(ram_end);
    push(
        RESOURCE_MEMORY_MAPPED_IO,
        ATTR_MMIO,
        MMIO_HOLE_START,
        firmware.gpa(),
    );
    push(
        RESOURCE_MEMORY_MAPPED_IO,
        ATTR_MMIO,
        mmio64.start,
        mmio64.end,
    );
    out.sort_by_key(|r| r.start);
    out
}

fn header(out: &mut Vec<u8>, kind: u16, length: usize) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&u16::try_from(length).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
}

/// The HOB list for `resources`, placed at `gpa`, padded with zeros to
/// `size` bytes.
pub fn build(gpa: u64, size: u64, resources: &[Resource]) -> Result<Vec<u8>, HobError> {
    let needed = HANDOFF_LEN + resources.len() * RESOURCE_LEN + END_LEN;
    if needed as u64 > size {
        return Err(HobError::TooLarge { needed, size });
    }
    let mut out = Vec::with_capacity(::arch::usize_from(size));
    header(&mut out, HOB_TYPE_HANDOFF, HANDOFF_LEN);
    out.extend_from_slice(&HANDOFF_VERSION.to_le_bytes());
    // BOOT_WITH_FULL_CONFIGURATION.
    out.extend_from_slice(&0u32.to_le_bytes());
    // EfiMemoryTop, EfiMemoryBottom, EfiFreeMemoryTop, EfiFreeMemoryBottom:
    // TDVF finds its memory in the resource descriptors, not here.
    out.extend_from_slice(&[0u8; 32]);
    // EfiEndOfHobList: where the end-of-list HOB is, as edk2's PEI core
    // keeps it.
    let end_of_list = gpa + (needed - END_LEN) as u64;
    out.extend_from_slice(&end_of_list.to_le_bytes());
    for r in resources {
        header(&mut out, HOB_TYPE_RESOURCE_DESCRIPTOR, RESOURCE_LEN);
        // Owner: no GUID.
        out.extend_from_slice(&[0u8; 16]);
        out.extend_from_slice(&r.kind.to_le_bytes());
        out.extend_from_slice(&r.attributes.to_le_bytes());
        out.extend_from_slice(&r.start.to_le_bytes());
        out.extend_from_slice(&r.length.to_le_bytes());
    }
    header(&mut out, HOB_TYPE_END_OF_HOB_LIST, END_LEN);
    debug_assert_eq!(out.len(), needed);
    out.resize(::arch::usize_from(size), 0);
    Ok(out)
}

/// The TD_HOB section's contents for a launch, if the image has one.
pub fn for_launch(
    metadata: &TdvfMetadata,
    ram_size: u64,
    firmware: &OvmfImage,
) -> Result<Option<Vec<u8>>, HobError> {
    let Some(section) = metadata.td_hob() else {
        return Ok(None);
    };
    let resources = resources(metadata, ram_size, firmware);
    build(section.memory_address, section.memory_size, &resources).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::le_bytes::{u16_at, u32_at, u64_at};
    use crate::memory::MMIO_HOLE_END;
    use crate::sev_snp::ovmf::tests::debian_ovmf;
    use crate::tdx::tdvf::tests::{synthetic_sections, synthetic_tdvf};

    /// A HOB read back as TDVF reads it.
    #[derive(Debug, PartialEq, Eq)]
    enum Hob {
        Handoff {
            version: u32,
            boot_mode: u32,
            end_of_list: u64,
        },
        Resource(Resource),
        End,
    }

    /// Walks the list by each HOB's length up to the end-of-list HOB,
    /// returning the HOBs and the offset of the end-of-list one.
    fn parse(data: &[u8]) -> (Vec<Hob>, usize) {
        let mut hobs = Vec::new();
        let mut at = 0;
        loop {
            let kind = u16_at(data, at);
            let length = usize::from(u16_at(data, at + 2));
            assert!(
                length >= 8 && length.is_multiple_of(8),
                "HOB length {length}"
            );
            assert_eq!(u32_at(data, at + 4), 0, "reserved");
            let body = &data[at..at + length];
            match kind {
                HOB_TYPE_HANDOFF => {
                    assert_eq!(length, 56);
                    assert!(hobs.is_empty(), "the PHIT comes first");
                    assert!(body[16..48].iter().all(|b| *b == 0));
                    hobs.push(Hob::Handoff {
                        version: u32_at(body, 8),
                        boot_mode: u32_at(body, 12),
                        end_of_list: u64_at(body, 48),
                    });
                }
                HOB_TYPE_RESOURCE_DESCRIPTOR => {
                    assert_eq!(length, 48);
                    assert!(body[8..24].iter().all(|b| *b == 0), "no owner");
                    hobs.push(Hob::Resource(Resource {
                        kind: u32_at(body, 24),
                        attributes: u32_at(body, 28),
                        start: u64_at(body, 32),
                        length: u64_at(body, 40),
                    }));
                }
                HOB_TYPE_END_OF_HOB_LIST => {
                    hobs.push(Hob::End);
                    return (hobs, at);
                }
                other => panic!("unexpected HOB type {other:#x}"),
            }
            at += length;
        }
    }

    fn resources_of(hobs: &[Hob]) -> Vec<Resource> {
        hobs.iter()
            .filter_map(|h| match h {
                Hob::Resource(r) => Some(*r),
                _ => None,
            })
            .collect()
    }

    /// Every RAM byte is described once, and accepted exactly where the
    /// launch adds pages.
    fn check_ram(resources: &[Resource], ram_size: u64, added: &[(u64, u64)]) {
        let ram: Vec<&Resource> = resources
            .iter()
            .filter(|r| r.kind != RESOURCE_MEMORY_MAPPED_IO)
            .collect();
        // PI: PRESENT | INITIALIZED | TESTED, by number (not the constant
        // under test).
        assert!(ram.iter().all(|r| r.attributes == 0x7), "{ram:?}");
        assert_eq!(ram.iter().map(|r| r.length).sum::<u64>(), ram_size);
        // No empty descriptor (between adjacent added sections, say).
        assert!(resources.iter().all(|r| r.length > 0), "{resources:?}");
        for pair in resources.windows(2) {
            assert!(pair[0].start + pair[0].length <= pair[1].start, "{pair:?}");
        }
        let accepted: Vec<(u64, u64)> = ram
            .iter()
            .filter(|r| r.kind == RESOURCE_SYSTEM_MEMORY)
            .map(|r| (r.start, r.length))
            .collect();
        assert_eq!(accepted, added);
    }

    #[test]
    fn the_hob_describes_ram_as_accepted_or_unaccepted_and_the_mmio() {
        let image = synthetic_tdvf(&synthetic_sections());
        let metadata = TdvfMetadata::parse(&image).unwrap();
        let hob = for_launch(&metadata, 256 << 20, &image).unwrap().unwrap();
        assert_eq!(hob.len(), 0x1000, "the section's size");
        let (hobs, end) = parse(&hob);
        assert_eq!(
            hobs[0],
            Hob::Handoff {
                version: 9,
                boot_mode: 0,
                end_of_list: 0x80_2000 + end as u64
            }
        );
        assert_eq!(hobs.last(), Some(&Hob::End));
        assert!(hob[end + 8..].iter().all(|b| *b == 0));
        let resources = resources_of(&hobs);
        // TEMP_MEM 0x800000+0x2000 and TD_HOB 0x802000+0x1000 are added.
        check_ram(
            &resources,
            256 << 20,
            &[(0x80_0000, 0x2000), (0x80_2000, 0x1000)],
        );
        let mmio: Vec<(u64, u64)> = resources
            .iter()
            .filter(|r| r.kind == RESOURCE_MEMORY_MAPPED_IO)
            // PRESENT | INITIALIZED | UNCACHEABLE.
            .inspect(|r| assert_eq!(r.attributes, 0x403))
            .map(|r| (r.start, r.start + r.length))
            .collect();
        assert_eq!(
            mmio,
            [
                (MMIO_HOLE_START, image.gpa()),
                (MMIO_HOLE_END, MMIO_HOLE_END + (64 << 30))
            ]
        );
        assert_eq!(
            resources[0],
            Resource {
                kind: RESOURCE_MEMORY_UNACCEPTED,
                attributes: ATTR_RAM,
                start: 0,
                length: 0x80_0000
            }
        );
    }

    /// A section the launch adds only partly inside RAM is not RAM the
    /// HOB may call accepted: with RAM ending inside TEMP_MEM
    /// (0x800000+0x2000), all of RAM is unaccepted and nothing past it is
    /// described.
    #[test]
    fn a_section_reaching_past_ram_is_not_accepted_ram() {
        let image = synthetic_tdvf(&synthetic_sections());
        let metadata = TdvfMetadata::parse(&image).unwrap();
        let ram = 0x80_1000;
        let resources = resources(&metadata, ram, &image);
        check_ram(&resources, ram, &[]);
        assert_eq!(
            resources[0],
            Resource {
                kind: RESOURCE_MEMORY_UNACCEPTED,
                attributes: 0x7,
                start: 0,
                length: ram
            }
        );
    }

    #[test]
    fn ram_above_4g_and_page_aug_sections_stay_unaccepted() {
        let mut sections = synthetic_sections();
        sections.push((
            0,
            0,
            0x100_0000,
            0x10_0000,
            3,
            super::super::tdvf::ATTR_PAGE_AUG,
        ));
        let image = synthetic_tdvf(&sections);
        let metadata = TdvfMetadata::parse(&image).unwrap();
        let ram = 4u64 << 30;
        let (hobs, _) = parse(&for_launch(&metadata, ram, &image).unwrap().unwrap());
        let resources = resources_of(&hobs);
        check_ram(&resources, ram, &[(0x80_0000, 0x2000), (0x80_2000, 0x1000)]);
        assert!(resources.contains(&Resource {
            kind: RESOURCE_MEMORY_UNACCEPTED,
            attributes: ATTR_RAM,
            start: MMIO_HOLE_END,
            length: ram - MMIO_HOLE_START
        }));
        // The 64-bit window starts above the RAM, at a 1 GiB boundary.
        let top = resources.last().unwrap();
        assert_eq!((top.kind, top.start), (RESOURCE_MEMORY_MAPPED_IO, 5 << 30));
    }

    #[test]
    fn a_hob_larger_than_its_section_is_refused() {
        let resources = vec![
            Resource {
                kind: 0,
                attributes: ATTR_RAM,
                start: 0,
                length: 0x1000
            };
            100
        ];
        assert_eq!(
            build(0x1000, 0x1000, &resources),
            Err(HobError::TooLarge {
                needed: 56 + 100 * 48 + 8,
                size: 0x1000
            })
        );
        assert!(build(0x1000, 0x2000, &resources).is_ok());
        // A section exactly the list's size holds it, with no padding.
        let exact = 56 + 100 * 48 + 8;
        assert_eq!(build(0x1000, exact, &resources).unwrap().len(), 4864);
        assert!(build(0x1000, exact - 1, &resources).is_err());
    }

    #[test]
    fn debian_ovmf_fd_gets_a_hob_in_its_td_hob_section() {
        let Some(data) = debian_ovmf() else { return };
        let image = OvmfImage::parse(data).unwrap();
        let metadata = TdvfMetadata::parse(&image).unwrap();
        let hob = for_launch(&metadata, 1 << 30, &image).unwrap().unwrap();
        assert_eq!(hob.len(), 0x2000);
        let (hobs, end) = parse(&hob);
        assert!(
            matches!(hobs[0], Hob::Handoff { end_of_list, .. } if end_of_list == 0x80_9000 + end as u64)
        );
        // The three TEMP_MEM sections and the TD_HOB, one descriptor each.
        check_ram(
            &resources_of(&hobs),
            1 << 30,
            &[
                (0x80_0000, 0x6000),
                (0x80_9000, 0x2000),
                (0x80_b000, 0x2000),
                (0x81_0000, 0x1_0000),
            ],
        );
    }
}
