use super::*;

/// The image Debian's `ovmf` package installs (`.ci/run` installs it).
pub const DEBIAN_OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// Debian's OVMF.fd, or `None` with a loud skip (a failure in CI,
/// where `.ci/run` installs it).
pub fn debian_ovmf() -> Option<Vec<u8>> {
    match std::fs::read(DEBIAN_OVMF) {
        Ok(data) => Some(data),
        Err(e) => {
            assert_ne!(
                std::env::var("CH_REQUIRE_KVM").as_deref(),
                Ok("1"),
                "{DEBIAN_OVMF} is required in CI (apt-get install ovmf): {e}"
            );
            eprintln!("*** SKIPPED: {DEBIAN_OVMF}: {e} (apt-get install ovmf) ***");
            None
        }
    }
}

/// Builds a GUIDed table entry: data, then its length and GUID.
pub fn entry(guid: Guid, data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    out.extend_from_slice(
        &u16::try_from(data.len() + ENTRY_TRAILER)
            .unwrap()
            .to_le_bytes(),
    );
    out.extend_from_slice(&guid.bytes());
    out
}

/// A synthetic image of `size` bytes whose table holds `entries`
/// (listed from the lowest address up), and `metadata` placed
/// `metadata_offset` bytes before the end.
pub fn synthetic_image(
    size: usize,
    entries: &[Vec<u8>],
    metadata: Option<(u32, Vec<u8>)>,
) -> Vec<u8> {
    let mut image = vec![0xf4u8; size];
    let mut table: Vec<u8> = entries.concat();
    table.extend_from_slice(
        &u16::try_from(table.len() + ENTRY_TRAILER)
            .unwrap()
            .to_le_bytes(),
    );
    table.extend_from_slice(&TABLE_FOOTER_GUID.bytes());
    let end = size - BYTES_AFTER_TABLE;
    image[end - table.len()..end].copy_from_slice(&table);
    if let Some((offset, bytes)) = metadata {
        let start = size - offset as usize;
        image[start..start + bytes.len()].copy_from_slice(&bytes);
    }
    image
}

pub fn metadata(version: u32, sections: &[(u32, u32, u32)]) -> Vec<u8> {
    let descriptors: Vec<Vec<u8>> = sections
        .iter()
        .map(|&(gpa, size, kind)| [gpa, size, kind].map(u32::to_le_bytes).concat())
        .collect();
    SEV_METADATA.build(version, &descriptors)
}

const OTHER_GUID: Guid = Guid::new(0x12345678, 0x9abc, 0xdef0, [1, 2, 3, 4, 5, 6, 7, 8]);

/// An image of `size` bytes whose GUIDed table holds the SEV metadata
/// (0x800 bytes before the end, version 1, `sections`), the entries
/// `also`, and the reset block (APs start at 0x80_0000:0xb004).
pub fn sev_image(size: usize, also: &[Vec<u8>], sections: &[(u32, u32, u32)]) -> Vec<u8> {
    let mut entries = vec![entry(SEV_METADATA_GUID, &0x800u32.to_le_bytes())];
    entries.extend_from_slice(also);
    entries.push(entry(
        SEV_ES_RESET_BLOCK_GUID,
        &0x0080_b004u32.to_le_bytes(),
    ));
    synthetic_image(size, &entries, Some((0x800, metadata(1, sections))))
}

fn well_formed() -> Vec<u8> {
    let sections = [
        (0x80_0000, 0x9000, 1),
        (0x80_d000, 0x1000, 2),
        (0x80_e000, 0x1000, 3),
    ];
    sev_image(64 << 10, &[entry(OTHER_GUID, &[9; 8])], &sections)
}

#[test]
fn a_synthetic_table_gives_its_reset_block_and_sections() {
    let image = OvmfImage::parse(well_formed()).unwrap();
    assert_eq!(image.gpa(), FIRMWARE_END - (64 << 10));
    let reset = image.reset_block().unwrap();
    assert_eq!((reset.cs_base(), reset.ip()), (0x80_0000, 0xb004));
    assert_eq!(
        image.metadata_sections(),
        &[
            MetadataSection {
                gpa: 0x80_0000,
                size: 0x9000,
                kind: SectionKind::PrevalidatedZero
            },
            MetadataSection {
                gpa: 0x80_d000,
                size: 0x1000,
                kind: SectionKind::Secrets
            },
            MetadataSection {
                gpa: 0x80_e000,
                size: 0x1000,
                kind: SectionKind::Cpuid
            },
        ]
    );
    // Read from the footer down; unknown entries are kept, not refused.
    assert_eq!(
        image.table_guids(),
        &[SEV_ES_RESET_BLOCK_GUID, OTHER_GUID, SEV_METADATA_GUID]
    );
    assert_eq!(image.table_entry(OTHER_GUID), Some(&[9u8; 8][..]));
    assert_eq!(
        image.table_entry(SEV_METADATA_GUID),
        Some(&0x800u32.to_le_bytes()[..])
    );
    let absent = Guid::new(1, 2, 3, [4; 8]);
    assert_eq!(image.table_entry(absent), None);
}

/// Every section type the SEV metadata defines reads as its kind, at its
/// place and size; a type it does not define is refused by number.
#[test]
fn every_metadata_section_type_reads_as_its_kind() {
    let kinds = [
        (1, SectionKind::PrevalidatedZero),
        (2, SectionKind::Secrets),
        (3, SectionKind::Cpuid),
        (4, SectionKind::SvsmCallingArea),
        (0x10, SectionKind::KernelHashes),
    ];
    let image_with = |raw: &[(u32, u32, u32)]| {
        OvmfImage::parse(synthetic_image(
            64 << 10,
            &[entry(SEV_METADATA_GUID, &0x800u32.to_le_bytes())],
            Some((0x800, metadata(1, raw))),
        ))
    };
    let raw: Vec<(u32, u32, u32)> = (0u32..)
        .zip(kinds)
        .map(|(i, (kind, _))| (0x80_0000 + i * 0x1000, 0x1000, kind))
        .collect();
    let image = image_with(&raw).unwrap();
    let read: Vec<(u64, u64, SectionKind)> = image
        .metadata_sections()
        .iter()
        .map(|s| (s.gpa, s.size, s.kind))
        .collect();
    let expected: Vec<(u64, u64, SectionKind)> = raw
        .iter()
        .zip(kinds)
        .map(|((gpa, size, _), (_, kind))| (u64::from(*gpa), u64::from(*size), kind))
        .collect();
    assert_eq!(read, expected);
    for unknown in [0, 5, 0xf, 0x11] {
        let err = image_with(&[(0x80_0000, 0x1000, unknown)]).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("unknown type {unknown:#x}")),
            "{unknown}: {err}"
        );
    }
}

/// An image prints as its size and what its table says, not its bytes.
#[test]
fn an_image_prints_its_table_not_its_bytes() {
    let image = OvmfImage::parse(well_formed()).unwrap();
    let printed = format!("{image:?}");
    for part in [
        "OvmfImage",
        "size: 65536",
        "reset_block: Some(",
        "PrevalidatedZero",
        "Secrets",
        "Cpuid",
    ] {
        assert!(printed.contains(part), "{part} in {printed}");
    }
    assert!(printed.len() < 2048, "{printed}");
}

#[test]
fn an_image_without_sev_entries_parses_empty() {
    let image = OvmfImage::parse(synthetic_image(8192, &[], None)).unwrap();
    assert!(image.reset_block().is_none());
    assert!(image.metadata_sections().is_empty());
}

#[test]
fn malformed_images_are_refused_with_the_reason() {
    let refused = |data: Vec<u8>| OvmfImage::parse(data).unwrap_err();
    assert_eq!(refused(vec![0; 4097]), OvmfError::Unaligned(4097));
    assert_eq!(refused(Vec::new()), OvmfError::Unaligned(0));
    assert_eq!(
        refused(vec![0; MAX_FIRMWARE_SIZE + 4096]),
        OvmfError::TooLarge(MAX_FIRMWARE_SIZE + 4096)
    );
    assert_eq!(refused(vec![0; 8192]), OvmfError::NoTable);

    // A table longer than the image.
    let mut image = synthetic_image(8192, &[], None);
    let footer = 8192 - BYTES_AFTER_TABLE - ENTRY_TRAILER;
    image[footer..footer + 2].copy_from_slice(&9000u16.to_le_bytes());
    assert_eq!(refused(image), OvmfError::TableLength(9000));

    // An entry claiming more than the table holds, or less than its trailer.
    for bad in [200u16, 3] {
        let mut image = synthetic_image(8192, &[entry(OTHER_GUID, &[0; 4])], None);
        let at = footer - ENTRY_TRAILER;
        image[at..at + 2].copy_from_slice(&bad.to_le_bytes());
        assert_eq!(
            refused(image),
            OvmfError::EntryLength {
                index: 0,
                length: bad.into()
            }
        );
    }

    // A fragment shorter than an entry's trailer below the entries: its
    // size is the error, whatever bytes lie under it.
    for fragment in [1usize, ENTRY_TRAILER - 1] {
        let entries = [vec![0xff; fragment], entry(OTHER_GUID, &[0; 4])];
        assert_eq!(
            refused(synthetic_image(8192, &entries, None)),
            OvmfError::EntryLength {
                index: 1,
                length: fragment
            },
            "{fragment}"
        );
    }
    // An entry with no data is whole: exactly its trailer.
    let image = OvmfImage::parse(synthetic_image(8192, &[entry(OTHER_GUID, &[])], None)).unwrap();
    assert_eq!(image.table_entry(OTHER_GUID), Some(&[][..]));

    // A reset block of the wrong size.
    let image = synthetic_image(8192, &[entry(SEV_ES_RESET_BLOCK_GUID, &[0; 8])], None);
    assert!(matches!(
        refused(image),
        OvmfError::EntrySize {
            length: 26,
            expected: 22,
            ..
        }
    ));

    let with_metadata = |offset: u32, bytes: Vec<u8>| {
        synthetic_image(
            16384,
            &[entry(SEV_METADATA_GUID, &offset.to_le_bytes())],
            Some((offset.min(16384), bytes)),
        )
    };
    // Too close to the end for a header, and before the image's start.
    for offset in [8u32, 0x10_0000] {
        assert_eq!(
            refused(synthetic_image(
                16384,
                &[entry(SEV_METADATA_GUID, &offset.to_le_bytes())],
                None
            )),
            OvmfError::Metadata(TableError::Offset(offset))
        );
    }
    let mut wrong_signature = metadata(1, &[]);
    wrong_signature[0] = b'B';
    assert_eq!(
        refused(with_metadata(0x800, wrong_signature)),
        OvmfError::Metadata(TableError::Signature {
            found: *b"BSEV",
            expected: *b"ASEV"
        })
    );
    assert_eq!(
        refused(with_metadata(0x800, metadata(2, &[]))),
        OvmfError::Metadata(TableError::Version(2))
    );
    let mut short = metadata(1, &[(0x1000, 0x1000, 1)]);
    short[4..8].copy_from_slice(&16u32.to_le_bytes());
    assert_eq!(
        refused(with_metadata(0x800, short)),
        OvmfError::Metadata(TableError::Length {
            sections: 1,
            length: 16
        })
    );
    assert_eq!(
        refused(with_metadata(0x800, metadata(1, &[(0x1000, 0x1000, 7)]))),
        OvmfError::SectionType { index: 0, kind: 7 }
    );
    assert!(matches!(
        refused(with_metadata(0x800, metadata(1, &[(0x1800, 0x1000, 1)]))),
        OvmfError::SectionUnaligned { index: 0, .. }
    ));
    assert!(matches!(
        refused(with_metadata(0x800, metadata(1, &[(0x1000, 0, 1)]))),
        OvmfError::SectionUnaligned { index: 0, .. }
    ));
    assert!(matches!(
        refused(with_metadata(
            0x800,
            metadata(1, &[(0x1000, 0x2000, 1), (0x2000, 0x1000, 3)])
        )),
        OvmfError::SectionOverlap { index: 1, .. }
    ));
    assert!(matches!(
        refused(with_metadata(
            0x800,
            metadata(1, &[(0xffff_f000, 0x1000, 1)])
        )),
        OvmfError::SectionOverlap { index: 0, .. }
    ));
}

/// The edges of the metadata's bounds: what ends exactly at a limit is
/// accepted, what passes it by one is refused.
#[test]
fn metadata_bounds_hold_to_the_byte() {
    let image = |size: usize, offset: u32, bytes: Vec<u8>| {
        OvmfImage::parse(synthetic_image(
            size,
            &[entry(SEV_METADATA_GUID, &offset.to_le_bytes())],
            Some((offset, bytes)),
        ))
    };
    // The descriptors may end at the image's last byte, not past it (one
    // descriptor fits in the bytes after the table).
    let one = metadata(1, &[(0x1000, 0x1000, 1)]);
    let fits = u32::try_from(one.len()).unwrap();
    assert!(one.len() <= BYTES_AFTER_TABLE);
    assert_eq!(
        image(16384, fits, one.clone())
            .unwrap()
            .metadata_sections()
            .len(),
        1
    );
    let mut past = one;
    past[12..16].copy_from_slice(&2u32.to_le_bytes());
    past[4..8].copy_from_slice(&(fits + 12).to_le_bytes());
    assert_eq!(
        image(16384, fits, past).unwrap_err(),
        OvmfError::Metadata(TableError::Length {
            sections: 2,
            length: fits + 12
        })
    );

    // At most `max_descriptors` sections.
    let pages = |count: u32| -> Vec<(u32, u32, u32)> {
        (0..count)
            .map(|i| (0x10_0000 + i * 0x1000, 0x1000, 1))
            .collect()
    };
    let most = metadata(1, &pages(SEV_METADATA.max_descriptors));
    let parsed = image(64 << 10, 0x8000, most).unwrap();
    assert_eq!(
        parsed.metadata_sections().len(),
        SEV_METADATA.max_descriptors as usize
    );
    let too_many = metadata(1, &pages(SEV_METADATA.max_descriptors + 1));
    let length = u32::try_from(too_many.len()).unwrap();
    assert_eq!(
        image(64 << 10, 0x8000, too_many).unwrap_err(),
        OvmfError::Metadata(TableError::Length {
            sections: SEV_METADATA.max_descriptors + 1,
            length
        })
    );

    // A section may end where the image begins, and where another starts.
    let size = 16384usize;
    let below_image = u32::try_from(FIRMWARE_END - size as u64 - 0x1000).unwrap();
    let edges = metadata(
        1,
        &[
            (below_image, 0x1000, 1),
            (0x1000, 0x1000, 1),
            (0x2000, 0x1000, 3),
            (0x0000, 0x1000, 2),
        ],
    );
    let kinds: Vec<SectionKind> = image(size, 0x2000, edges)
        .unwrap()
        .metadata_sections()
        .iter()
        .map(|s| s.kind)
        .collect();
    use SectionKind::*;
    assert_eq!(kinds, [PrevalidatedZero, PrevalidatedZero, Cpuid, Secrets]);
    // A later section reaching over an earlier one from below is refused
    // (from address 0 too).
    let under = metadata(1, &[(0x1000, 0x1000, 1), (0, 0x2000, 2)]);
    assert!(matches!(
        image(size, 0x2000, under).unwrap_err(),
        OvmfError::SectionOverlap { index: 1, .. }
    ));
    let over = metadata(1, &[(below_image + 0x1000, 0x1000, 1)]);
    assert!(matches!(
        image(size, 0x2000, over).unwrap_err(),
        OvmfError::SectionOverlap { index: 0, .. }
    ));
}

#[test]
fn guids_print_in_their_textual_form() {
    assert_eq!(
        format!("{SEV_ES_RESET_BLOCK_GUID:?}"),
        "00f771de-1a7e-4fcb-890e-68c77e2fb44e"
    );
    assert_eq!(
        format!("{TABLE_FOOTER_GUID:?}"),
        "96b582de-1fb2-45f7-baea-a366c55a082d"
    );
}

/// What edk2 2022.11 as Debian builds it carries (read with a hex
/// dump of the image's last page).
#[test]
fn debian_ovmf_fd_has_the_sev_entries() {
    let Some(data) = debian_ovmf() else { return };
    let image = OvmfImage::parse(data).unwrap();
    assert_eq!(image.gpa(), FIRMWARE_END - (2 << 20));
    assert_eq!(image.reset_block().unwrap().ap_reset_address, 0x0080_b004);
    let sections: Vec<(u64, u64, SectionKind)> = image
        .metadata_sections()
        .iter()
        .map(|s| (s.gpa, s.size, s.kind))
        .collect();
    use SectionKind::*;
    assert_eq!(
        sections,
        [
            (0x80_0000, 0x9000, PrevalidatedZero),
            (0x80_a000, 0x3000, PrevalidatedZero),
            (0x80_d000, 0x1000, Secrets),
            (0x80_e000, 0x1000, Cpuid),
            (0x80_f000, 0x11000, PrevalidatedZero),
        ]
    );
    assert!(!sections.iter().any(|s| s.2 == KernelHashes));
}
