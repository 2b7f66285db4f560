use crate::test_support::*;

/// A client over a socket pair, serving 64 KiB of RAM filled with `fill`;
/// the other end is the server's.
fn over_ram(fill: u8, timeout: Duration) -> (VfioUserClient, UnixStream) {
    let ram = std::sync::Arc::new(Ram(std::sync::Mutex::new(vec![fill; 64 << 10])));
    let (client_end, server_end) = UnixStream::pair().unwrap();
    (
        VfioUserClient::over(client_end, timeout, Some(ram)),
        server_end,
    )
}

#[test]
fn dma_access_reaches_only_mapped_ranges() {
    let ram = std::sync::Arc::new(Ram(std::sync::Mutex::new(vec![0xab; 64 << 10])));
    let (client_end, _server_end) = UnixStream::pair().unwrap();
    let mut client = VfioUserClient::over(client_end, Duration::from_secs(1), Some(ram.clone()));
    client.mapped.insert(0x1000, 0x2000);
    let access = |addr: u64, count: u64, data: &[u8]| {
        let mut b = addr.to_le_bytes().to_vec();
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(data);
        b
    };
    let read = client
        .dma_access(CMD_DMA_READ, &access(0x1000, 4, &[]))
        .unwrap();
    assert_eq!(&read[16..], &[0xab; 4]);
    // The last byte of the mapping, and one past it.
    assert!(
        client
            .dma_access(CMD_DMA_READ, &access(0x2fff, 1, &[]))
            .is_ok()
    );
    assert_eq!(
        client.dma_access(CMD_DMA_READ, &access(0x2fff, 2, &[])),
        Err(EFAULT)
    );
    assert_eq!(
        client.dma_access(CMD_DMA_READ, &access(0x0fff, 2, &[])),
        Err(EFAULT)
    );
    assert_eq!(
        client.dma_access(CMD_DMA_READ, &access(u64::MAX, 2, &[])),
        Err(EFAULT)
    );
    client
        .dma_access(CMD_DMA_WRITE, &access(0x1008, 2, &[1, 2]))
        .unwrap();
    assert_eq!(ram.0.lock().unwrap()[0x1008..0x100a], [1, 2]);
    assert_eq!(
        client.dma_access(CMD_DMA_WRITE, &access(0x1008, 4, &[1, 2])),
        Err(EINVAL),
        "short data"
    );
    assert_eq!(client.dma_access(CMD_DMA_READ, &[0; 8]), Err(EINVAL));
    assert_eq!(
        client.dma_access(
            CMD_DMA_READ,
            &access(0x1000, (MAX_DATA_XFER + 1) as u64, &[])
        ),
        Err(EINVAL)
    );
    assert_eq!(
        client.dma_access(CMD_DMA_MAP, &access(0x1000, 1, &[])),
        Err(ENOSYS)
    );
    let mut no_memory =
        VfioUserClient::over(UnixStream::pair().unwrap().0, Duration::from_secs(1), None);
    no_memory.mapped.insert(0x1000, 0x2000);
    assert_eq!(
        no_memory.dma_access(CMD_DMA_READ, &access(0x1000, 1, &[])),
        Err(EFAULT)
    );
}

#[test]
fn server_requests_before_the_reply_are_answered_in_line() {
    let (mut client, mut server_end) = over_ram(0x3c, Duration::from_secs(5));
    client.mapped.insert(0x1000, 0x1000);
    let server = std::thread::spawn(move || {
        let request = read_request(&mut server_end);
        // DMA_READs of 2 bytes, mapped and not, before the DMA_UNMAP
        // reply.
        let mut answers = Vec::new();
        for (id, addr) in [(77u16, 0x1000u64), (78, 0x8000)] {
            let mut body = addr.to_le_bytes().to_vec();
            body.extend_from_slice(&2u64.to_le_bytes());
            let ask = Header {
                id,
                command: CMD_DMA_READ,
                size: u32::try_from(HEADER_SIZE + body.len()).unwrap(),
                flags: FLAG_COMMAND,
                error: 0,
            };
            server_end.write_all(&ask.encode()).unwrap();
            server_end.write_all(&body).unwrap();
            let mut raw = [0u8; HEADER_SIZE];
            server_end.read_exact(&mut raw).unwrap();
            let answer = Header::decode(&raw);
            let mut data = vec![0u8; answer.size as usize - HEADER_SIZE];
            server_end.read_exact(&mut data).unwrap();
            let bytes = data.get(16..).unwrap_or_default().to_vec();
            answers.push((answer.id, answer.command, answer.flags, answer.error, bytes));
        }
        server_end
            .write_all(&reply_to(request, FLAG_REPLY, 0, &[]))
            .unwrap();
        answers
    });
    client.dma_unmap(0x1000, 0x1000).unwrap();
    let answers = server.join().unwrap();
    assert_eq!(
        answers,
        [
            (77, CMD_DMA_READ, FLAG_REPLY, 0, vec![0x3c, 0x3c]),
            (78, CMD_DMA_READ, FLAG_REPLY | FLAG_ERROR, EFAULT, vec![]),
        ]
    );
    assert!(client.closed_reason().is_none());
    assert!(client.mapped.is_empty(), "the unmap went through");
}

/// A device request waits for its reply the same way: what the server
/// asks first is served, then the reply is read.
#[test]
fn server_requests_before_a_device_reply_are_answered() {
    let (mut client, mut server_end) = over_ram(0x5d, Duration::from_secs(5));
    client.mapped.insert(0x2000, 0x1000);
    let server = std::thread::spawn(move || {
        let request = read_request(&mut server_end);
        server_end
            .write_all(&dma_read_request(91, 0x2000, 2))
            .unwrap();
        let answer = read_request_bytes(&mut server_end);
        server_end
            .write_all(&reply_to(
                request,
                FLAG_REPLY,
                0,
                &[16, 0, 0, 0, 2, 0, 0, 0, 9, 0, 0, 0, 1, 0, 0, 0],
            ))
            .unwrap();
        answer
    });
    let info = client.device_info().unwrap();
    let (answer, data) = server.join().unwrap();
    assert_eq!((info.flags, info.regions, info.irqs), (2, 9, 1));
    assert_eq!(
        (answer.id, answer.command, answer.flags, answer.error),
        (91, CMD_DMA_READ, FLAG_REPLY, 0)
    );
    assert_eq!(data.get(16..), Some(&[0x5d, 0x5d][..]));
    assert!(client.closed_reason().is_none());
}

#[test]
fn serve_pending_answers_a_waiting_dma_request_between_requests() {
    let (mut client, mut server_end) = over_ram(0x5d, Duration::from_secs(2));
    client.mapped.insert(0x1000, 0x1000);
    // An unanswered request fails the test rather than hanging it.
    server_end
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    assert!(client.watch_handle().is_some());
    // Nothing waiting: nothing to do, and no wait for it.
    let started = Instant::now();
    client.serve_pending().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(client.closed_reason().is_none());

    server_end
        .write_all(&dma_read_request(41, 0x1ffe, 2))
        .unwrap();
    client.serve_pending().unwrap();
    let mut raw = [0u8; HEADER_SIZE];
    server_end.read_exact(&mut raw).unwrap();
    let answer = Header::decode(&raw);
    let mut data = vec![0u8; answer.size as usize - HEADER_SIZE];
    server_end.read_exact(&mut data).unwrap();
    assert_eq!(
        (answer.id, answer.command, answer.flags, answer.error),
        (41, CMD_DMA_READ, FLAG_REPLY, 0)
    );
    assert_eq!(&data[16..], &[0x5d, 0x5d]);
    assert!(client.closed_reason().is_none());
}

#[test]
fn a_waiting_message_out_of_step_closes_the_connection() {
    let oversize = Header {
        id: 1,
        command: CMD_DMA_READ,
        size: u32::try_from(MAX_MESSAGE + 1).unwrap(),
        flags: FLAG_COMMAND,
        error: 0,
    };
    let reply = Header {
        id: 2,
        command: CMD_DMA_READ,
        size: u32::try_from(HEADER_SIZE).unwrap(),
        flags: FLAG_REPLY,
        error: 0,
    };
    let undersize = Header {
        size: u32::try_from(HEADER_SIZE - 1).unwrap(),
        ..oversize
    };
    for (what, header) in [
        ("oversize", oversize),
        ("a reply", reply),
        ("undersize", undersize),
    ] {
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        let mut client = VfioUserClient::over(client_end, Duration::from_secs(2), None);
        server_end.write_all(&header.encode()).unwrap();
        let started = Instant::now();
        let err = client.serve_pending().unwrap_err();
        assert!(
            matches!(err, VfioUserError::Protocol("a server request")),
            "{what}: {err}"
        );
        assert!(started.elapsed() < Duration::from_secs(1), "{what}");
        let why = client.closed_reason().unwrap();
        assert!(
            why.starts_with("serving the server's request failed"),
            "{what}: {why}"
        );
        // Closed: the watcher has nothing to watch and learns it.
        assert!(client.watch_handle().is_none());
        assert!(matches!(
            client.serve_pending(),
            Err(VfioUserError::Closed(_))
        ));
    }
}

#[test]
fn a_map_for_messages_sends_no_fd_and_lets_dma_in() {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let (mut client, mut server_end) = over_ram(0x6e, Duration::from_secs(2));
    // No request sent fails the test rather than hanging it.
    server_end
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let server = std::thread::spawn(move || {
        let mut raw = [0u8; HEADER_SIZE];
        let (n, fd) = server_end.recv_with_fd(&mut raw).unwrap();
        assert_eq!(n, HEADER_SIZE);
        let h = Header::decode(&raw);
        let mut body = vec![0u8; h.size as usize - HEADER_SIZE];
        server_end.read_exact(&mut body).unwrap();
        server_end
            .write_all(&reply_to(h, FLAG_REPLY, 0, &[]))
            .unwrap();
        (h.command, fd.is_some(), body)
    });
    client.dma_map_for_messages(0x2000, 0x1000).unwrap();
    let (command, had_fd, body) = server.join().unwrap();
    assert_eq!(command, CMD_DMA_MAP);
    assert!(!had_fd, "a map for messages passed an fd");
    let mut expected = 32u32.to_le_bytes().to_vec();
    expected.extend_from_slice(&DMA_READ_WRITE.to_le_bytes());
    expected.extend_from_slice(&0u64.to_le_bytes());
    expected.extend_from_slice(&0x2000u64.to_le_bytes());
    expected.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(body, expected);
    // The server's DMA reaches the mapping, and only it.
    let mut access = 0x2ff0u64.to_le_bytes().to_vec();
    access.extend_from_slice(&16u64.to_le_bytes());
    assert_eq!(
        &client.dma_access(CMD_DMA_READ, &access).unwrap()[16..],
        &[0x6e; 16]
    );
    let mut past = 0x2ff0u64.to_le_bytes().to_vec();
    past.extend_from_slice(&17u64.to_le_bytes());
    assert_eq!(client.dma_access(CMD_DMA_READ, &past), Err(EFAULT));
}

/// Guest memory that is mapped but out of reach (a hole the memory
/// manager refuses): the server is answered EFAULT, read or write.
#[test]
fn memory_that_refuses_an_access_answers_efault() {
    struct Unreachable;
    impl DmaMemory for Unreachable {
        fn read(&self, _: u64, _: &mut [u8]) -> Result<(), DmaMemoryError> {
            Err("no memory here".into())
        }
        fn write(&self, _: u64, _: &[u8]) -> Result<(), DmaMemoryError> {
            Err("no memory here".into())
        }
    }
    let (client_end, _server_end) = UnixStream::pair().unwrap();
    let mut client = VfioUserClient::over(
        client_end,
        Duration::from_secs(1),
        Some(std::sync::Arc::new(Unreachable)),
    );
    client.mapped.insert(0x4000, 0x1000);
    let mut access = 0x4000u64.to_le_bytes().to_vec();
    access.extend_from_slice(&4u64.to_le_bytes());
    assert_eq!(client.dma_access(CMD_DMA_READ, &access), Err(EFAULT));
    access.extend_from_slice(&[1, 2, 3, 4]);
    assert_eq!(client.dma_access(CMD_DMA_WRITE, &access), Err(EFAULT));
}
