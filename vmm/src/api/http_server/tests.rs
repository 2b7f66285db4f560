use super::*;

/// The bytes `encode_response` writes for an answer, as text.
fn encoded(status: u16, body: impl Into<String>, close: bool) -> String {
    let response = HttpResponse {
        status,
        body: body.into(),
    };
    String::from_utf8(encode_response(&response, close)).unwrap()
}
use std::io::Read;

fn read(raw: &[u8]) -> Result<HttpRequest, ReadError> {
    let (mut server, mut client) = UnixStream::pair().unwrap();
    client.write_all(raw).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    read_request(&mut server, &mut Vec::new(), Deadlines::API)
}

#[test]
fn reads_what_cloud_hypervisors_client_sends() {
    let request = read(
        b"PUT /api/v1/vm.remove-device HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\nContent-Length: 11\r\n\r\n{\"id\":\"d0\"}",
    )
    .unwrap();
    assert_eq!(request.method, "PUT");
    assert_eq!(request.target, "/api/v1/vm.remove-device");
    assert_eq!(request.body, b"{\"id\":\"d0\"}");
    assert!(!request.close, "HTTP/1.1 keeps the connection");
}

#[test]
fn pipelined_requests_are_read_one_by_one() {
    let (mut server, mut client) = UnixStream::pair().unwrap();
    client
        .write_all(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
        .unwrap();
    let mut pending = Vec::new();
    assert_eq!(
        read_request(&mut server, &mut pending, Deadlines::API)
            .unwrap()
            .target,
        "/a"
    );
    let second = read_request(&mut server, &mut pending, Deadlines::API).unwrap();
    assert_eq!((second.target.as_str(), second.close), ("/b", true));
}

#[test]
fn oversize_and_malformed_requests_are_refused_by_status() {
    let mut huge = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
    huge.extend_from_slice(b"\r\n\r\n");
    let status = |r: Result<HttpRequest, ReadError>| r.unwrap_err().response().unwrap().status;
    assert_eq!(status(read(&huge)), 431);
    assert_eq!(
        status(read(b"PUT / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n")),
        413
    );
    for bad in [
        &b"GET / HTTP/2\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
    ] {
        assert_eq!(status(read(bad)), 400, "{}", String::from_utf8_lossy(bad));
    }
    assert_eq!(read(b"").unwrap_err(), ReadError::Gone);
    // Closed after part of a head: a request cut short, not a
    // connection that simply ended.
    assert_eq!(
        read(b"GET / HTTP/1.1\r\nHost: x").unwrap_err(),
        ReadError::Bad(Malformed::ClosedMidHead)
    );
}

#[test]
fn heads_a_front_end_could_read_another_way_are_refused() {
    use Malformed::*;
    for (raw, why) in [
        (
            &b"PUT / HTTP/1.1\r\nContent-Length\t: 5\r\n\r\n"[..],
            HeaderName,
        ),
        (b"PUT / HTTP/1.1\r\nContent-Length : 5\r\n\r\n", HeaderName),
        (b"PUT / HTTP/1.1\r\nContent-Length\0: 5\r\n\r\n", HeaderName),
        (b"PUT / HTTP/1.1\r\nContent(Length): 5\r\n\r\n", HeaderName),
        (b"PUT / HTTP/1.1\r\n: 5\r\n\r\n", HeaderName),
        (
            b"PUT / HTTP/1.1\r\nX-A: b\nContent-Length: 5\r\n\r\n",
            BareLineEnd,
        ),
        (
            b"PUT / HTTP/1.1\r\nX-A: b\rContent-Length: 5\r\n\r\n",
            BareLineEnd,
        ),
        (b"PUT / HTTP/1.1\nContent-Length: 5\r\n\r\n", BareLineEnd),
        (b"\nGET / HTTP/1.1\r\n\r\n", BareLineEnd),
        (b"PUT / HTTP/1.1\r\nX-A: b\r\r\n\r\n", BareLineEnd),
        (
            b"PUT / HTTP/1.1\r\nX-A: b\r\n\tContent-Length: 5\r\n\r\n",
            Folded,
        ),
        (
            b"PUT / HTTP/1.1\r\nX-A: b\r\n Content-Length: 5\r\n\r\n",
            Folded,
        ),
        (b"PUT / HTTP/1.1\r\nX-A: b\0c\r\n\r\n", HeaderValue),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: +0\r\n\r\n",
            ContentLength,
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: -0\r\n\r\n",
            ContentLength,
        ),
        (b"PUT / HTTP/1.1\r\nContent-Length:\r\n\r\n", ContentLength),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n",
            ContentLength,
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n",
            ContentLength,
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 0x5\r\n\r\n",
            ContentLength,
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            ContentLength,
        ),
        (
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 2\r\n\r\n",
            ConflictingLength,
        ),
        (
            b"PUT / HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n",
            TransferEncoding,
        ),
        (b"G@T / HTTP/1.1\r\n\r\n", Method),
        (b"GET\t/ HTTP/1.1\r\n\r\n", RequestLine),
        (b"GET  / HTTP/1.1\r\n\r\n", RequestLine),
        (b" GET / HTTP/1.1\r\n\r\n", RequestLine),
        (b"GET / HTTP/1.1 \r\n\r\n", RequestLine),
        (b"\r\nGET / HTTP/1.1\r\n\r\n", RequestLine),
        (b"GET /a\0b HTTP/1.1\r\n\r\n", Target),
        (b"GET /a\x7f HTTP/1.1\r\n\r\n", Target),
        (b"GET * HTTP/1.1\r\n\r\n", Target),
        (b"GET / http/1.1\r\n\r\n", Version),
        (b"GET / HTTP/1.2\r\n\r\n", Version),
        (b"GET / HTTP/1.1\r\nX-A: \xff\r\n\r\n", NotUtf8),
    ] {
        assert_eq!(
            read(raw).unwrap_err(),
            ReadError::Bad(why),
            "{}",
            String::from_utf8_lossy(raw).escape_debug()
        );
    }
}

#[test]
fn heads_within_the_rules_are_read() {
    for raw in [
        &b"PUT /t HTTP/1.1\r\nContent-Length:2\r\n\r\nok"[..],
        b"PUT /t HTTP/1.1\r\nContent-Length: \t2\t \r\n\r\nok",
        b"PUT /t HTTP/1.1\r\nContent-Length: 2\r\nCONTENT-LENGTH: 02\r\n\r\nok",
        b"PUT /t HTTP/1.0\r\nX-!#$%&'*+-.^_`|~09az: a\tb c\r\nContent-Length: 2\r\n\r\nok",
        b"PUT /t HTTP/1.1\r\nX-Empty:\r\nContent-Length: 2\r\n\r\nok",
    ] {
        let request = read(raw)
            .unwrap_or_else(|e| panic!("{e:?}: {}", String::from_utf8_lossy(raw).escape_debug()));
        assert_eq!(
            (request.target.as_str(), &request.body[..]),
            ("/t", &b"ok"[..])
        );
    }
}

#[test]
fn answers_are_framed_as_cloud_hypervisor_frames_them() {
    let text = encoded(200, "{}", false);
    assert!(text.starts_with("HTTP/1.1 200 \r\n"), "{text}");
    assert!(text.contains("\r\nServer: Cloud Hypervisor API\r\n"));
    assert!(text.contains("\r\nContent-Length: 2\r\n"));
    assert!(text.ends_with("\r\n\r\n{}"));
    let empty = encoded(204, "", true);
    assert!(empty.contains("Content-Length: 0\r\n"), "{empty}");
    assert!(empty.contains("Connection: close\r\n"));
}

#[test]
fn the_limits_are_the_documented_ones_and_inclusive() {
    assert_eq!((MAX_HEAD_BYTES, MAX_BODY), (16 << 10, 64 << 10));
    // A head of exactly MAX_HEAD_BYTES is read; one byte more is not.
    let head = |total: usize| {
        let mut h = b"GET /x HTTP/1.1\r\nX-Pad: ".to_vec();
        // Request line and headers of `total` bytes, then the blank line.
        let pad = total - h.len();
        h.extend(std::iter::repeat_n(b'a', pad));
        h.extend_from_slice(b"\r\n\r\n");
        assert_eq!(h.len(), total + 4);
        h
    };
    assert_eq!(read(&head(MAX_HEAD_BYTES)).unwrap().target, "/x");
    assert_eq!(
        read(&head(MAX_HEAD_BYTES + 1)).unwrap_err(),
        ReadError::HeadTooLarge
    );
    // A body of exactly MAX_BODY is read whole; one byte more is 413.
    let mut full = format!("PUT /b HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n").into_bytes();
    full.extend(std::iter::repeat_n(b'z', MAX_BODY));
    let request = read(&full).unwrap();
    assert_eq!(request.body.len(), MAX_BODY);
    assert_eq!(
        read(
            format!(
                "PUT /b HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                MAX_BODY + 1
            )
            .as_bytes()
        )
        .unwrap_err(),
        ReadError::BodyTooLarge(MAX_BODY + 1)
    );
}

#[test]
fn a_body_in_pieces_and_the_next_request_behind_it() {
    let (mut server, mut client) = UnixStream::pair().unwrap();
    let writer = std::thread::spawn(move || {
        client
            .write_all(b"PUT /a HTTP/1.1\r\nContent-Length: 6\r\n\r\nab")
            .unwrap();
        std::thread::sleep(Duration::from_millis(50));
        client.write_all(b"cdefGET /next HTTP/1.1\r\n\r\n").unwrap();
        client
    });
    let mut pending = Vec::new();
    let first = read_request(&mut server, &mut pending, Deadlines::API).unwrap();
    assert_eq!(
        (first.target.as_str(), first.body.as_slice()),
        ("/a", &b"abcdef"[..])
    );
    let _client = writer.join().unwrap();
    assert_eq!(
        read_request(&mut server, &mut pending, Deadlines::API)
            .unwrap()
            .target,
        "/next"
    );
    assert!(pending.is_empty());
}

#[test]
fn expect_continue_is_answered_before_the_body_is_sent() {
    let (mut server, mut client) = UnixStream::pair().unwrap();
    client
        .write_all(b"PUT /c HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut pending = Vec::new();
        read_request(&mut server, &mut pending, Deadlines::API)
    });
    let mut interim = [0u8; 25];
    client.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    client.write_all(b"ok").unwrap();
    assert_eq!(reader.join().unwrap().unwrap().body, b"ok");
    // With the body already sent, no interim answer.
    let (mut server, mut client) = UnixStream::pair().unwrap();
    client
        .write_all(b"PUT /c HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok")
        .unwrap();
    read_request(&mut server, &mut Vec::new(), Deadlines::API).unwrap();
    client.set_nonblocking(true).unwrap();
    assert!(
        client.read(&mut [0u8; 8]).is_err(),
        "nothing was written back"
    );
}

#[test]
fn only_answers_with_a_body_say_it_is_json() {
    let with = encoded(200, "{}", false);
    assert!(with.contains("Content-Type: application/json\r\n"));
    let without = encoded(204, "", false);
    assert!(!without.contains("Content-Type"), "{without}");
    assert!(without.contains("Connection: keep-alive\r\n"));
}

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// A signal landing on a waiting thread (poll fails with EINTR) is no
/// reason to give up the wait: it goes on to the data or the timeout.
#[test]
fn a_signal_does_not_cut_a_wait_short() {
    use std::os::unix::thread::JoinHandleExt;
    let kick = vmm_sys_util::signal::SIGRTMIN() + 1;
    vmm_sys_util::signal::register_signal_handler(kick, ignore_signal).unwrap();
    let timeout = Duration::from_millis(400);
    for data in [true, false] {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (done, result) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let started = Instant::now();
            let ready = wait_readable(ours.as_raw_fd(), timeout);
            let _ = done.send((ready, started.elapsed()));
        });
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: signals a live thread of this process (it waits up
        // to 400 ms); the handler is installed above.
        let sent = unsafe { libc::pthread_kill(waiter.as_pthread_t(), kick) };
        assert_eq!(sent, 0);
        std::thread::sleep(Duration::from_millis(50));
        if data {
            theirs.write_all(b"x").unwrap();
        }
        let (ready, took) = result
            .recv_timeout(Duration::from_secs(5))
            .expect("the wait never ended");
        assert_eq!(ready, data, "after {took:?}");
        if !data {
            assert!(took >= timeout, "cut short after {took:?}");
        }
        waiter.join().unwrap();
    }
}
