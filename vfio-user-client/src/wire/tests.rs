use crate::test_support::*;

#[test]
fn a_pci_function_needs_the_pci_flag_and_a_configuration_region() {
    let info = |flags, regions| DeviceInfo {
        flags,
        regions,
        irqs: 0,
    };
    let pci = DeviceInfo::FLAG_PCI;
    assert!(info(pci, 9).claims_pci_function());
    assert!(info(pci | DeviceInfo::FLAG_RESET, 8).claims_pci_function());
    // Region 7 is the configuration space: 8 regions at least.
    assert!(!info(pci, 7).claims_pci_function());
    assert!(!info(DeviceInfo::FLAG_RESET, 9).claims_pci_function());
    assert!(!info(0, 9).claims_pci_function());
}

#[test]
fn header_round_trips() {
    let h = Header {
        id: 0xbeef,
        command: CMD_DMA_UNMAP,
        size: 40,
        flags: FLAG_REPLY | FLAG_ERROR,
        error: 22,
    };
    let d = Header::decode(&h.encode());
    assert_eq!(
        (d.id, d.command, d.size, d.flags, d.error),
        (0xbeef, 3, 40, 0x21, 22)
    );
}

#[test]
fn sparse_mmap_areas_keep_only_whole_pages_inside_the_region() {
    let size = 0x10000;
    let areas = vec![
        (0x0, 0x1000),    // kept
        (0x1000, 0),      // empty
        (0x2001, 0x1000), // unaligned offset
        (0x3000, 0x800),  // unaligned length
        (0xf000, 0x1000), // ends exactly at the region's end: kept
        (0xf000, 0x2000), // past the end
        (!0xfff, 0x1000), // overflows
        (0x4000, 0x3000), // kept
    ];
    let reply = region_reply(0, 0, size, &[(REGION_INFO_CAP_SPARSE_MMAP, 0, areas)]);
    assert_eq!(
        sparse_mmap_areas(&reply, size),
        Some(vec![(0x0, 0x1000), (0xf000, 0x1000), (0x4000, 0x3000)])
    );
    // No chain at all: nothing, and that is not an error.
    assert_eq!(
        sparse_mmap_areas(&region_reply(0, 0, size, &[]), size),
        Some(vec![])
    );
    // Another capability first, the sparse list after it.
    let first_len = 16u32;
    let reply = region_reply(
        0,
        0,
        size,
        &[
            (7, 32 + first_len, vec![]),
            (REGION_INFO_CAP_SPARSE_MMAP, 0, vec![(0x2000, 0x1000)]),
        ],
    );
    assert_eq!(
        sparse_mmap_areas(&reply, size),
        Some(vec![(0x2000, 0x1000)])
    );
    // A chain pointing back (a loop) or past the end is malformed.
    let looping = region_reply(0, 0, size, &[(7, 32, vec![])]);
    assert_eq!(sparse_mmap_areas(&looping, size), None);
    let dangling = region_reply(0, 0, size, &[(7, 4096, vec![])]);
    assert_eq!(sparse_mmap_areas(&dangling, size), None);
    // A count larger than what was sent is malformed too.
    let mut truncated = region_reply(
        0,
        0,
        size,
        &[(
            REGION_INFO_CAP_SPARSE_MMAP,
            0,
            vec![(0, 0x1000), (0x1000, 0x1000)],
        )],
    );
    truncated.truncate(truncated.len() - 8);
    assert_eq!(sparse_mmap_areas(&truncated, size), None);
    // So is a count no reply could hold: refused, not walked.
    let mut inflated = region_reply(
        0,
        0,
        size,
        &[(REGION_INFO_CAP_SPARSE_MMAP, 0, vec![(0, 0x1000)])],
    );
    let count_at = inflated.len() - 16 - 8;
    inflated[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(sparse_mmap_areas(&inflated, size), None);
}

/// vfio-user takes its flag values from VFIO's uapi: checked against the
/// kernel's bindings, not against our own copy.
#[test]
fn flags_are_vfio_uapi_values() {
    use vfio_bindings::bindings::vfio as uapi;
    assert_eq!(IRQ_SET_DATA_NONE, uapi::VFIO_IRQ_SET_DATA_NONE);
    assert_eq!(IRQ_SET_DATA_EVENTFD, uapi::VFIO_IRQ_SET_DATA_EVENTFD);
    assert_eq!(IRQ_SET_ACTION_TRIGGER, uapi::VFIO_IRQ_SET_ACTION_TRIGGER);
    assert_eq!(DeviceInfo::FLAG_RESET, uapi::VFIO_DEVICE_FLAGS_RESET);
    assert_eq!(DeviceInfo::FLAG_PCI, uapi::VFIO_DEVICE_FLAGS_PCI);
    assert_eq!(REGION_INFO_FLAG_MMAP, uapi::VFIO_REGION_INFO_FLAG_MMAP);
    assert_eq!(REGION_INFO_FLAG_CAPS, uapi::VFIO_REGION_INFO_FLAG_CAPS);
    assert_eq!(
        u32::from(REGION_INFO_CAP_SPARSE_MMAP),
        uapi::VFIO_REGION_INFO_CAP_SPARSE_MMAP
    );
}

/// Errors name the request they were about, so every command has its own
/// name and only an unknown one is a plain "request".
#[test]
fn every_command_has_its_own_name() {
    let commands = [
        (CMD_VERSION, "VERSION"),
        (CMD_DMA_MAP, "DMA_MAP"),
        (CMD_DMA_UNMAP, "DMA_UNMAP"),
        (CMD_DEVICE_GET_INFO, "DEVICE_GET_INFO"),
        (CMD_DEVICE_GET_REGION_INFO, "DEVICE_GET_REGION_INFO"),
        (CMD_DEVICE_GET_IRQ_INFO, "DEVICE_GET_IRQ_INFO"),
        (CMD_DEVICE_SET_IRQS, "DEVICE_SET_IRQS"),
        (CMD_REGION_READ, "REGION_READ"),
        (CMD_REGION_WRITE, "REGION_WRITE"),
        (CMD_DEVICE_RESET, "DEVICE_RESET"),
    ];
    for (command, name) in commands {
        assert_eq!(command_name(command), name, "command {command}");
    }
    assert_eq!(command_name(0xffff), "request");
}

#[test]
fn version_limits_are_read_or_defaulted() {
    let reply = |json: &str| {
        let mut r = vec![0, 0, 1, 0];
        r.extend_from_slice(json.as_bytes());
        r.push(0);
        r
    };
    assert_eq!(max_dma_maps(&reply("")).unwrap(), DEFAULT_MAX_DMA_MAPS);
    assert_eq!(
        max_dma_maps(&reply(r#"{"capabilities":{"max_msg_fds":8}}"#)).unwrap(),
        65535
    );
    assert_eq!(
        max_dma_maps(&reply(r#"{"capabilities":{"max_dma_maps":12}}"#)).unwrap(),
        12
    );
    for bad in [
        r#"{"capabilities":{"max_dma_maps":0}}"#,
        r#"{"capabilities":{"max_dma_maps":"many"}}"#,
        "not json",
    ] {
        assert!(max_dma_maps(&reply(bad)).is_err(), "{bad}");
    }
    assert_eq!(max_dma_maps(&[0, 0, 1, 0]).unwrap(), DEFAULT_MAX_DMA_MAPS);
}
