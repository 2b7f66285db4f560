use crate::test_support::*;

/// A vCPU kick (a signal without SA_RESTART) that lands while DMA_MAP's
/// fd-passing sendmsg is blocked must not fail the map or break the
/// connection.
#[test]
fn a_signal_during_the_fd_send_is_retried() {
    let kick = vmm_sys_util::signal::SIGRTMIN() + 1;
    vmm_sys_util::signal::register_signal_handler(kick, ignore_signal).unwrap();
    let (client_end, mut server_end) = UnixStream::pair().unwrap();
    // Fill the socket so the next send blocks.
    client_end.set_nonblocking(true).unwrap();
    let filler = [0u8; 4096];
    let mut queued = 0;
    loop {
        match (&client_end).write(&filler) {
            Ok(n) => queued += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    client_end.set_nonblocking(false).unwrap();
    let memory = std::fs::File::open("/dev/zero").unwrap();
    let memory_fd = memory.as_raw_fd();
    let mut client = VfioUserClient::over(client_end, Duration::from_secs(5), None);
    client.transport.next_id = 7;
    let mapper = std::thread::spawn(move || {
        let result = client.dma_map(0x1000, 0x1000, memory_fd, 0);
        (
            result.map_err(|e| e.to_string()),
            client.closed_reason().map(str::to_string),
        )
    });
    // Let the mapper block in sendmsg, then interrupt it.
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: signals a live thread of this process; the handler is
    // installed above.
    let rc = unsafe { libc::pthread_kill(mapper.as_pthread_t(), kick) };
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_millis(50));

    let mut skipped = vec![0u8; queued];
    server_end.read_exact(&mut skipped).unwrap();
    let mut request = [0u8; HEADER_SIZE + 32];
    server_end.read_exact(&mut request).unwrap();
    let header = Header::decode(request[..HEADER_SIZE].try_into().unwrap());
    assert_eq!((header.id, header.command), (7, CMD_DMA_MAP));
    let reply = Header {
        size: u32::try_from(HEADER_SIZE).unwrap(),
        flags: FLAG_REPLY,
        ..header
    };
    server_end.write_all(&reply.encode()).unwrap();
    assert_eq!(mapper.join().unwrap(), (Ok(()), None));
    drop(memory);
}

#[test]
fn malformed_replies_close_the_connection() {
    type Mangle = fn(Header) -> Vec<u8>;
    let cases: [(&str, Mangle); 5] = [
        ("wrong id", |h| {
            reply_to(Header { id: h.id ^ 1, ..h }, FLAG_REPLY, 0, &[])
        }),
        ("wrong command", |h| {
            reply_to(
                Header {
                    command: CMD_DMA_UNMAP,
                    ..h
                },
                FLAG_REPLY,
                0,
                &[],
            )
        }),
        ("no reply flag", |h| reply_to(h, 2, 0, &[])),
        ("oversize", |h| {
            Header {
                size: u32::try_from(MAX_MESSAGE + 1).unwrap(),
                flags: FLAG_REPLY,
                ..h
            }
            .encode()
            .to_vec()
        }),
        ("undersize", |h| {
            Header {
                size: 8,
                flags: FLAG_REPLY,
                ..h
            }
            .encode()
            .to_vec()
        }),
    ];
    for (what, mangle) in cases {
        let (mut client, server) = scripted(move |h, _| mangle(h));
        let err = client.dma_map(0x1000, 0x1000, 0, 0).unwrap_err();
        assert!(
            matches!(err.cause(), VfioUserError::Protocol("DMA_MAP")),
            "{what}: {err}"
        );
        assert!(client.closed_reason().is_some(), "{what}");
        assert!(
            matches!(
                client.dma_map(0x3000, 0x1000, 0, 0),
                Err(DmaRequestError::Closed {
                    source: VfioUserError::Closed(_),
                    ..
                })
            ),
            "{what}: a closed client sends nothing more"
        );
        server.join().unwrap();
    }
}

#[test]
fn a_silent_server_times_out_within_the_deadline_and_is_closed() {
    let (mut client, server) = scripted(|_, _| Vec::new());
    let started = std::time::Instant::now();
    let err = client.dma_unmap(0x1000, 0x1000).unwrap_err();
    let took = started.elapsed();
    // EOF from the scripted server (it stops) or the deadline.
    assert!(
        matches!(
            err.cause(),
            VfioUserError::Eof | VfioUserError::Timeout { .. }
        ),
        "{err}"
    );
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert!(client.closed_reason().is_some());
    server.join().unwrap();

    let (mut client, _held_open) = client_and_server(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let err = client.dma_map(0x1000, 0x1000, 0, 0).unwrap_err();
    assert_eq!(err.to_string(), "no reply to DMA_MAP within 200 ms");
    assert!(started.elapsed() < Duration::from_millis(1000));
    assert_eq!(
        client.closed_reason(),
        Some("no reply to DMA_MAP within 200 ms")
    );
}

#[test]
fn a_message_past_the_largest_transfer_is_refused() {
    // A full-size DMA_WRITE fits; one byte more does not.
    let largest = HEADER_SIZE + 16 + (1 << 20);
    assert_eq!(MAX_MESSAGE, largest);
    let (mut client, server) = scripted(move |h, _| {
        Header {
            size: u32::try_from(largest + 1).unwrap(),
            flags: FLAG_REPLY,
            ..h
        }
        .encode()
        .to_vec()
    });
    let err = client.dma_unmap(0x1000, 0x1000).unwrap_err();
    assert!(
        matches!(err.cause(), VfioUserError::Protocol("DMA_UNMAP")),
        "{err}"
    );
    server.join().unwrap();
}

#[test]
fn an_out_of_order_version_reply_names_the_request() {
    let wrong_id = vec![0, 0, 1, 0];
    let path = std::env::temp_dir().join(format!("vfu-order-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let h = read_request(&mut s);
        let _ = s.write_all(&reply_to(
            Header { id: h.id + 1, ..h },
            FLAG_REPLY,
            0,
            &wrong_id,
        ));
        let _ = s.read(&mut [0u8; 1]);
    });
    let err = VfioUserClient::connect(&path, Duration::from_secs(2), None)
        .err()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(err.to_string(), "malformed reply to VERSION");
}

#[test]
fn a_peer_that_went_away_fails_the_fd_send_at_once() {
    let (client_end, server_end) = UnixStream::pair().unwrap();
    drop(server_end);
    let mut client = VfioUserClient::over(client_end, Duration::from_secs(5), None);
    let memory = std::fs::File::open("/dev/zero").unwrap();
    let started = std::time::Instant::now();
    let err = client
        .dma_map(0x1000, 0x1000, memory.as_raw_fd(), 0)
        .unwrap_err();
    assert!(matches!(err.cause(), VfioUserError::SendFd(_)), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "retried a dead peer"
    );
    let why = client.closed_reason().unwrap();
    assert!(why.starts_with("DMA_MAP failed"), "{why}");
}

#[test]
fn a_reset_connection_is_an_io_error_not_a_timeout() {
    let (mut client, mut server_end) = client_and_server(Duration::from_secs(5));
    let server = std::thread::spawn(move || {
        // Read only the header, then go away with the body unread: the
        // client's read sees ECONNRESET.
        let mut raw = [0u8; HEADER_SIZE];
        server_end.read_exact(&mut raw).unwrap();
        drop(server_end);
    });
    let started = std::time::Instant::now();
    let err = client.dma_unmap(0x1000, 0x1000).unwrap_err();
    server.join().unwrap();
    assert!(matches!(err.cause(), VfioUserError::Io(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "{err}");
}

/// A vCPU kick that lands while the client waits for a reply must not
/// fail the request or restart its deadline.
#[test]
fn a_signal_while_waiting_for_the_reply_is_retried() {
    let kick = vmm_sys_util::signal::SIGRTMIN() + 1;
    vmm_sys_util::signal::register_signal_handler(kick, ignore_signal).unwrap();
    let (mut client, mut server_end) = client_and_server(Duration::from_secs(5));
    let waiter = std::thread::spawn(move || {
        let result = client.dma_unmap(0x1000, 0x1000);
        (
            result.map_err(|e| e.to_string()),
            client.closed_reason().map(str::to_string),
        )
    });
    let request = read_request(&mut server_end);
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: signals a live thread of this process; the handler is
    // installed above.
    let rc = unsafe { libc::pthread_kill(waiter.as_pthread_t(), kick) };
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_millis(50));
    server_end
        .write_all(&reply_to(request, FLAG_REPLY, 0, &[]))
        .unwrap();
    assert_eq!(waiter.join().unwrap(), (Ok(()), None));
}

/// A DEVICE_GET_INFO reply cut short after its header and `sent` bytes of
/// its 16-byte body: the cases below differ in what the server does next.
fn info_reply_head(request: Header, sent: usize) -> (Vec<u8>, Vec<u8>) {
    let mut body = vec![0u8; 16];
    body[0..4].copy_from_slice(&16u32.to_le_bytes());
    body[4..8].copy_from_slice(&DeviceInfo::FLAG_PCI.to_le_bytes());
    body[8..12].copy_from_slice(&9u32.to_le_bytes());
    let whole = reply_to(request, FLAG_REPLY, 0, &body);
    let (head, rest) = whole.split_at(HEADER_SIZE + sent);
    (head.to_vec(), rest.to_vec())
}

/// A kick while the body of a reply is still on its way is retried too.
#[test]
fn a_signal_inside_a_reply_body_is_retried() {
    let kick = vmm_sys_util::signal::SIGRTMIN() + 1;
    vmm_sys_util::signal::register_signal_handler(kick, ignore_signal).unwrap();
    let (mut client, mut server_end) = client_and_server(Duration::from_secs(5));
    let waiter = std::thread::spawn(move || {
        let info = client.device_info().map_err(|e| e.to_string());
        (
            info.map(|i| (i.flags, i.regions)),
            client.closed_reason().map(str::to_string),
        )
    });
    let request = read_request(&mut server_end);
    let (head, rest) = info_reply_head(request, 4);
    server_end.write_all(&head).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // SAFETY: signals a live thread of this process; the handler is
    // installed above.
    let rc = unsafe { libc::pthread_kill(waiter.as_pthread_t(), kick) };
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_millis(50));
    server_end.write_all(&rest).unwrap();
    assert_eq!(
        waiter.join().unwrap(),
        (Ok((DeviceInfo::FLAG_PCI, 9)), None)
    );
}

/// A server that stops inside a reply body is a timeout, not an I/O error.
#[test]
fn a_server_silent_inside_a_reply_body_times_out() {
    let (mut client, mut server_end) = client_and_server(Duration::from_millis(200));
    let server = std::thread::spawn(move || {
        let request = read_request(&mut server_end);
        server_end
            .write_all(&info_reply_head(request, 4).0)
            .unwrap();
        // Held open, silent, until the client gives up.
        let _ = server_end.read(&mut [0u8; 1]);
    });
    let started = std::time::Instant::now();
    let err = client.device_info().unwrap_err();
    assert!(matches!(err, VfioUserError::Timeout { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "{err}");
    assert_eq!(
        client.closed_reason(),
        Some("no reply to DEVICE_GET_INFO within 200 ms")
    );
    drop(client);
    server.join().unwrap();
}

/// A server that goes away inside a reply body is an I/O error, not a
/// timeout or a clean end.
#[test]
fn a_reset_inside_a_reply_body_is_an_io_error() {
    let (mut client, mut server_end) = client_and_server(Duration::from_secs(5));
    let server = std::thread::spawn(move || {
        // The request's body stays unread, so closing resets the client.
        let mut raw = [0u8; HEADER_SIZE];
        server_end.read_exact(&mut raw).unwrap();
        let request = Header::decode(&raw);
        server_end
            .write_all(&info_reply_head(request, 4).0)
            .unwrap();
        drop(server_end);
    });
    let started = std::time::Instant::now();
    let err = client.device_info().unwrap_err();
    server.join().unwrap();
    assert!(matches!(err, VfioUserError::Io(_)), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "{err}");
}
