use crate::test_support::*;

#[test]
fn a_pci_function_is_a_pci_device_with_a_configuration_space() {
    // What DEVICE_GET_INFO answers (None: refused) and the size of the
    // configuration region (None: refused).
    let ask = |info: Option<u32>, config: Option<u64>| {
        let (mut client, _server) = scripted(move |h, body| match (h.command, info, config) {
            (CMD_DEVICE_GET_INFO, Some(flags), _) => {
                let mut reply = [0u8; 16];
                reply[0] = 16;
                reply[4..8].copy_from_slice(&flags.to_le_bytes());
                reply[8] = 9;
                reply_to(h, FLAG_REPLY, 0, &reply)
            }
            (CMD_DEVICE_GET_REGION_INFO, _, Some(size)) if body[8] == 7 => {
                let mut reply = body.to_vec();
                reply[16..24].copy_from_slice(&size.to_le_bytes());
                reply_to(h, FLAG_REPLY, 0, &reply)
            }
            (CMD_DEVICE_GET_INFO | CMD_DEVICE_GET_REGION_INFO, _, _) => {
                reply_to(h, FLAG_REPLY | FLAG_ERROR, ENOSYS, &[])
            }
            _ => Vec::new(),
        });
        client.is_pci_function()
    };
    let pci = DeviceInfo::FLAG_PCI;
    assert!(ask(Some(pci), Some(256)).unwrap());
    assert!(!ask(Some(pci), Some(0)).unwrap(), "no configuration space");
    assert!(!ask(Some(pci), None).unwrap(), "its size refused");
    assert!(
        !ask(Some(DeviceInfo::FLAG_RESET), Some(256)).unwrap(),
        "not PCI"
    );
    assert!(!ask(None, Some(256)).unwrap(), "the question refused");
    // A server that stops answering is an error, not a "no".
    let (mut client, _server) = scripted(|_, _| Vec::new());
    assert!(client.is_pci_function().is_err());
}

#[test]
fn region_and_irq_requests_carry_their_fields_and_check_the_replies() {
    let (mut client, server) = scripted(|h, body| match h.command {
        CMD_DEVICE_GET_INFO => reply_to(
            h,
            FLAG_REPLY,
            0,
            &[16, 0, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0, 5, 0, 0, 0],
        ),
        CMD_DEVICE_GET_REGION_INFO => {
            let mut info = body.to_vec();
            info[16..24].copy_from_slice(&0x1000u64.to_le_bytes());
            reply_to(h, FLAG_REPLY, 0, &info)
        }
        CMD_REGION_READ => {
            let count = u32::from_le_bytes(body[12..16].try_into().unwrap());
            let mut reply = body[..16].to_vec();
            reply.extend((0..count).map(|i| (i & 0xff) as u8 + body[0]));
            reply_to(h, FLAG_REPLY, 0, &reply)
        }
        CMD_REGION_WRITE if body[16..] == [9, 9] => reply_to(h, FLAG_REPLY, 0, &body[..16]),
        CMD_DEVICE_GET_IRQ_INFO => {
            let mut info = body.to_vec();
            info[12..16].copy_from_slice(&3u32.to_le_bytes());
            reply_to(h, FLAG_REPLY, 0, &info)
        }
        CMD_DEVICE_SET_IRQS => {
            let flags = u32::from_le_bytes(body[4..8].try_into().unwrap());
            let count = u32::from_le_bytes(body[16..20].try_into().unwrap());
            let index = u32::from_le_bytes(body[8..12].try_into().unwrap());
            let ok = index == 2
                && [
                    (IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE, 0),
                    (IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD, 1),
                ]
                .contains(&(flags, count));
            reply_to(
                h,
                if ok {
                    FLAG_REPLY
                } else {
                    FLAG_REPLY | FLAG_ERROR
                },
                22,
                &[],
            )
        }
        CMD_DEVICE_RESET => reply_to(h, FLAG_REPLY | FLAG_ERROR, ENOSYS, &[]),
        _ => Vec::new(),
    });
    let info = client.device_info().unwrap();
    assert_eq!((info.flags, info.regions, info.irqs), (3, 9, 5));
    assert_eq!(client.region_size(7).unwrap(), 0x1000);
    let mut data = [0u8; 4];
    client.region_read(0, 0x10, &mut data).unwrap();
    assert_eq!(data, [0x10, 0x11, 0x12, 0x13]);
    client.region_write(0, 0x20, &[9, 9]).unwrap();
    assert_eq!(client.irq_count(2).unwrap(), 3);
    client.set_irq_eventfds(2, &[]).unwrap();
    let trigger = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    client.set_irq_eventfds(2, &[trigger.as_raw_fd()]).unwrap();
    // The server's refusal reaches the caller.
    assert!(matches!(
        client.set_irq_eventfds(4, &[]),
        Err(VfioUserError::Refused { errno: 22, .. })
    ));
    // A refused reset is an answer, not a broken connection.
    assert!(matches!(
        client.reset(),
        Err(VfioUserError::Refused { errno: 38, .. })
    ));
    assert!(matches!(
        client.region_read(0, 0, &mut [0u8; 0]),
        Err(VfioUserError::AccessSize(0))
    ));
    assert!(matches!(
        client.region_write(0, 0, &vec![0u8; MAX_REGION_ACCESS + 1]),
        Err(VfioUserError::AccessSize(_))
    ));
    assert!(client.closed_reason().is_none());
    drop(client);
    server.join().unwrap();
}

#[test]
fn region_accesses_may_be_as_large_as_the_limit_and_no_larger() {
    assert!(region_access(0, 0, MAX_REGION_ACCESS).is_ok());
    assert!(matches!(
        region_access(0, 0, MAX_REGION_ACCESS + 1),
        Err(VfioUserError::AccessSize(_))
    ));
    let head = region_access(3, 0x1234, 8).unwrap();
    assert_eq!(u64_at(&head, 0), 0x1234);
    assert_eq!(head[8..16], [3, 0, 0, 0, 8, 0, 0, 0]);
}

#[test]
fn region_info_offers_mmap_only_with_the_flag_and_an_fd() {
    let sparse = |areas: Areas| vec![(REGION_INFO_CAP_SPARSE_MMAP, 0, areas)];
    let both = REGION_INFO_FLAG_MMAP | REGION_INFO_FLAG_CAPS;
    let cases: [(u32, Vec<Capability>, bool, Areas); 7] = [
        // Mmappable, no capability, an fd: the whole region.
        (REGION_INFO_FLAG_MMAP, vec![], true, vec![(0, 0x4000)]),
        // Mmappable but no fd came: nothing to map.
        (REGION_INFO_FLAG_MMAP, vec![], false, vec![]),
        // An fd but no mmap flag: nothing either.
        (0, vec![], true, vec![]),
        // Capabilities: exactly the sparse areas.
        (
            both,
            sparse(vec![(0x1000, 0x1000)]),
            true,
            vec![(0x1000, 0x1000)],
        ),
        // Capabilities without the mmap flag: nothing.
        (
            REGION_INFO_FLAG_CAPS,
            sparse(vec![(0x1000, 0x1000)]),
            true,
            vec![],
        ),
        // A sparse list of nothing usable: nothing, not the whole region.
        (both, sparse(vec![(0x1001, 0x1000)]), true, vec![]),
        // Without the capability flag a chain is not read (even a bad one).
        (
            REGION_INFO_FLAG_MMAP,
            vec![(7, 32, vec![])],
            true,
            vec![(0, 0x4000)],
        ),
    ];
    for (flags, caps, with_fd, expected) in cases {
        let reply = region_reply(2, flags, 0x4000, &caps);
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let mut raw = [0u8; HEADER_SIZE];
            server_end.read_exact(&mut raw).unwrap();
            let header = Header::decode(&raw);
            let mut body = vec![0u8; header.size as usize - HEADER_SIZE];
            server_end.read_exact(&mut body).unwrap();
            let answer = reply_to(header, FLAG_REPLY, 0, &reply);
            if with_fd {
                let file = std::fs::File::open("/dev/zero").unwrap();
                use vmm_sys_util::sock_ctrl_msg::ScmSocket;
                server_end
                    .send_with_fd(&answer[..], file.as_raw_fd())
                    .unwrap();
            } else {
                server_end.write_all(&answer).unwrap();
            }
        });
        let mut client = VfioUserClient::over(client_end, Duration::from_secs(5), None);
        let info = client.region_info(2).unwrap();
        server.join().unwrap();
        assert_eq!(info.mmap_areas, expected, "flags {flags:#x}, fd {with_fd}");
        assert_eq!(
            (info.size, info.offset, info.flags),
            (0x4000, 0x7000, flags)
        );
        assert_eq!(info.fd.is_some(), with_fd);
    }
}

#[test]
fn short_and_mismatched_replies_to_device_requests_close_the_connection() {
    type Ask = fn(&mut VfioUserClient) -> Result<(), VfioUserError>;
    type Mangle = fn(Header, &[u8]) -> Vec<u8>;
    let cases: [(&str, Ask, Mangle); 6] = [
        (
            "device info short",
            |c| c.device_info().map(drop),
            |h, _| reply_to(h, FLAG_REPLY, 0, &[16, 0, 0, 0, 3, 0, 0, 0]),
        ),
        (
            "region info short",
            |c| c.region_info(1).map(drop),
            |h, body| reply_to(h, FLAG_REPLY, 0, &body[..24]),
        ),
        (
            "region info malformed chain",
            |c| c.region_info(1).map(drop),
            |h, _| {
                let reply = region_reply(1, REGION_INFO_FLAG_CAPS, 0x1000, &[(7, 32, vec![])]);
                reply_to(h, FLAG_REPLY, 0, &reply)
            },
        ),
        (
            "region write short",
            |c| c.region_write(0, 8, &[1]),
            |h, body| reply_to(h, FLAG_REPLY, 0, &body[..8]),
        ),
        (
            "region write other offset",
            |c| c.region_write(0, 8, &[1]),
            |h, body| {
                let mut head = body[..16].to_vec();
                head[0] ^= 8;
                reply_to(h, FLAG_REPLY, 0, &head)
            },
        ),
        (
            "irq info short",
            |c| c.irq_count(2).map(drop),
            |h, body| reply_to(h, FLAG_REPLY, 0, &body[..12]),
        ),
    ];
    for (what, ask, mangle) in cases {
        let (mut client, server) = scripted(mangle);
        let err = ask(&mut client).unwrap_err();
        assert!(matches!(err, VfioUserError::Protocol(_)), "{what}: {err}");
        assert!(client.closed_reason().is_some(), "{what}");
        drop(client);
        server.join().unwrap();
    }
    // A reply to another request (its id, or its command) closes it, and
    // says so by name.
    let other_id: Mangle = |h, body| {
        let other = Header {
            id: h.id.wrapping_add(1),
            ..h
        };
        reply_to(other, FLAG_REPLY, 0, body)
    };
    let other_command: Mangle = |h, body| {
        let other = Header {
            command: CMD_DEVICE_GET_IRQ_INFO,
            ..h
        };
        reply_to(other, FLAG_REPLY, 0, body)
    };
    for (what, mangle) in [("other id", other_id), ("other command", other_command)] {
        let (mut client, server) = scripted(mangle);
        assert!(
            matches!(
                client.device_info(),
                Err(VfioUserError::Protocol("DEVICE_GET_INFO"))
            ),
            "{what}"
        );
        assert_eq!(
            client.closed_reason(),
            Some("malformed reply to DEVICE_GET_INFO"),
            "{what}"
        );
        drop(client);
        server.join().unwrap();
    }
    // A reply for another irq index is refused too.
    let (mut client, server) = scripted(|h, body| {
        let mut info = body.to_vec();
        info[8] ^= 1;
        reply_to(h, FLAG_REPLY, 0, &info)
    });
    assert!(matches!(
        client.irq_count(2),
        Err(VfioUserError::Protocol(_))
    ));
    drop(client);
    server.join().unwrap();
    // A full-size reply is fine (the checks are "at least", not "exactly").
    let (mut client, server) = scripted(|h, _| {
        reply_to(
            h,
            FLAG_REPLY,
            0,
            &[20, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0],
        )
    });
    assert_eq!(client.device_info().unwrap().irqs, 3);
    drop(client);
    server.join().unwrap();
}

#[test]
fn a_region_reply_of_the_wrong_shape_closes_the_connection() {
    type Mangle = fn(Header, &[u8]) -> Vec<u8>;
    let cases: [(&str, Mangle); 3] = [
        ("short data", |h, body| {
            reply_to(h, FLAG_REPLY, 0, &body[..16])
        }),
        ("other offset", |h, body| {
            let mut reply = body[..16].to_vec();
            reply[0] ^= 4;
            reply.extend([0u8; 4]);
            reply_to(h, FLAG_REPLY, 0, &reply)
        }),
        ("region info for another index", |h, body| {
            let mut info = body.to_vec();
            info[8] ^= 1;
            reply_to(h, FLAG_REPLY, 0, &info)
        }),
    ];
    for (what, mangle) in cases {
        let (mut client, server) = scripted(mangle);
        let err = if what.starts_with("region info") {
            client.region_size(7).unwrap_err()
        } else {
            client.region_read(0, 8, &mut [0u8; 4]).unwrap_err()
        };
        assert!(matches!(err, VfioUserError::Protocol(_)), "{what}: {err}");
        assert!(client.closed_reason().is_some(), "{what}");
        drop(client);
        server.join().unwrap();
    }
}

#[test]
fn a_refused_map_keeps_the_connection_and_a_refused_unmap_closes_it() {
    let (mut client, server) = scripted(|h, _| match h.command {
        CMD_DMA_MAP if h.id == 0 => reply_to(h, FLAG_REPLY | FLAG_ERROR, 12, &[]),
        _ if h.command == CMD_DMA_UNMAP => reply_to(h, FLAG_REPLY | FLAG_ERROR, 22, &[]),
        _ => reply_to(h, FLAG_REPLY, 0, &[]),
    });
    let err = client.dma_map(0x1000, 0x1000, 0, 0).unwrap_err();
    assert!(matches!(
        err,
        DmaRequestError::Refused(VfioUserError::Refused {
            command: "DMA_MAP",
            errno: 12
        })
    ));
    assert!(client.closed_reason().is_none());
    client.dma_map(0x1000, 0x1000, 0, 0).unwrap();
    let err = client.dma_unmap(0x1000, 0x1000).unwrap_err();
    assert!(matches!(
        err,
        DmaRequestError::Closed {
            source: VfioUserError::Refused {
                command: "DMA_UNMAP",
                errno: 22
            },
            ..
        }
    ));
    let why = client.closed_reason().unwrap();
    assert!(why.contains("DMA_UNMAP of 0x1000+0x1000"), "{why}");
    server.join().unwrap();
}

#[test]
fn version_is_negotiated_and_checked() {
    let mut good = vec![0, 0, 1, 0];
    good.extend_from_slice(br#"{"capabilities":{"max_dma_maps":7}}"#);
    good.push(0);
    assert_eq!(connect_to(good).unwrap().max_dma_maps(), 7);
    assert_eq!(
        connect_to(vec![0, 0, 1, 0]).unwrap().max_dma_maps(),
        DEFAULT_MAX_DMA_MAPS
    );
    for (what, reply) in [
        ("major 1", vec![1, 0, 0, 0]),
        ("major 256", vec![0, 1, 0, 0]),
        ("short", vec![0, 0, 1]),
        ("bad capabilities", b"\0\0\x01\0{not json}\0".to_vec()),
    ] {
        let err = connect_to(reply).err().unwrap();
        assert_eq!(err.to_string(), "malformed reply to VERSION", "{what}");
    }
}
