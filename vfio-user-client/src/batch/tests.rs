//! Pipelined batches against servers on a socket pair that read requests
//! as they come and answer as each test tells them: in order, last first,
//! refusing some, or falling silent part-way.

use super::*;
use crate::test_support::*;

fn maps(count: u64) -> Vec<DmaRequest> {
    (0..count)
        .map(|i| DmaRequest::Map {
            iova: 0x10_0000 + i * 0x1000,
            size: 0x1000,
            backing: None,
        })
        .collect()
}

/// A server that reads `expect` requests (recording how many it had read
/// before it sent its first reply), then answers each with
/// `answer(index, header)` in the order `order` gives.
fn batch_server(
    expect: usize,
    order: fn(usize) -> Vec<usize>,
    answer: fn(usize, Header) -> Option<Vec<u8>>,
) -> (VfioUserClient, std::thread::JoinHandle<usize>) {
    let (client_end, mut server_end) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let requests: Vec<Header> = (0..expect).map(|_| read_request(&mut server_end)).collect();
        for index in order(expect) {
            let Some(reply) = answer(index, requests[index]) else {
                // Silent from here on, the connection held open.
                let _ = server_end.read(&mut [0u8; 1]);
                return expect;
            };
            server_end.write_all(&reply).unwrap();
        }
        let _ = server_end.read(&mut [0u8; 1]);
        expect
    });
    let client = VfioUserClient::over(client_end, Duration::from_millis(300), None);
    (client, server)
}

fn in_order(n: usize) -> Vec<usize> {
    (0..n).collect()
}

fn last_first(n: usize) -> Vec<usize> {
    (0..n).rev().collect()
}

fn accept(_: usize, h: Header) -> Option<Vec<u8>> {
    Some(reply_to(h, FLAG_REPLY, 0, &[]))
}

#[test]
fn a_whole_window_is_in_flight_before_the_first_reply() {
    // The server reads all 64 requests before it answers any: a client
    // that waited for each reply would deadlock here (and time out).
    let (mut client, server) = batch_server(BATCH_WINDOW, in_order, accept);
    let batch = client.start_batch(maps(BATCH_WINDOW as u64));
    let results = client.finish_batch(batch);
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(client.mapped.len(), BATCH_WINDOW);
    assert!(client.closed_reason().is_none());
    drop(client);
    assert_eq!(server.join().unwrap(), BATCH_WINDOW);
}

#[test]
fn replies_out_of_order_are_matched_by_id() {
    fn refuse_odd(index: usize, h: Header) -> Option<Vec<u8>> {
        Some(if index % 2 == 1 {
            reply_to(h, FLAG_REPLY | FLAG_ERROR, 12, &[])
        } else {
            reply_to(h, FLAG_REPLY, 0, &[])
        })
    }
    let (mut client, _server) = batch_server(8, last_first, refuse_odd);
    let requests = maps(8);
    let batch = client.start_batch(requests.clone());
    let results = client.finish_batch(batch);
    for (index, result) in results.iter().enumerate() {
        if index % 2 == 1 {
            assert!(
                matches!(
                    result,
                    Err(DmaRequestError::Refused(VfioUserError::Refused {
                        errno: 12,
                        ..
                    }))
                ),
                "{index}: {result:?}"
            );
        } else {
            assert!(result.is_ok(), "{index}: {result:?}");
        }
    }
    // A refused map keeps the connection; only the accepted ones count.
    assert!(client.closed_reason().is_none());
    let mapped: Vec<u64> = client.mapped.keys().copied().collect();
    let expected: Vec<u64> = (0..8u64)
        .step_by(2)
        .map(|i| 0x10_0000 + i * 0x1000)
        .collect();
    assert_eq!(mapped, expected);
}

#[test]
fn more_requests_than_the_window_go_out_as_replies_come_back() {
    let count = 3 * BATCH_WINDOW + 5;
    let (client_end, mut server_end) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        let mut most_waiting = 0;
        let mut read = 0;
        while read < count {
            // Everything the client has sent so far, then replies to all.
            let mut batch = vec![read_request(&mut server_end)];
            while has_more(&server_end) {
                batch.push(read_request(&mut server_end));
            }
            read += batch.len();
            most_waiting = most_waiting.max(batch.len());
            for h in batch {
                server_end
                    .write_all(&reply_to(h, FLAG_REPLY, 0, &[]))
                    .unwrap();
            }
        }
        most_waiting
    });
    let mut client = VfioUserClient::over(client_end, Duration::from_secs(2), None);
    let batch = client.start_batch(maps(count as u64));
    let results = client.finish_batch(batch);
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(client.mapped.len(), count);
    let most_waiting = server.join().unwrap();
    assert!(most_waiting <= BATCH_WINDOW, "{most_waiting} in flight");
    assert!(most_waiting > 1, "nothing was pipelined");
}

fn has_more(s: &UnixStream) -> bool {
    let mut readable = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd for a socket this test owns; waits 20 ms at most.
    unsafe { libc::poll(&mut readable, 1, 20) > 0 }
}

#[test]
fn a_server_that_stops_half_way_is_cut_off_within_its_timeout() {
    fn half(index: usize, h: Header) -> Option<Vec<u8>> {
        (index < 16).then(|| reply_to(h, FLAG_REPLY, 0, &[]))
    }
    let (mut client, _server) = batch_server(32, in_order, half);
    let started = Instant::now();
    let batch = client.start_batch(maps(32));
    let results = client.finish_batch(batch);
    let waited = started.elapsed();
    assert!(waited < Duration::from_millis(300 + 250), "{waited:?}");
    assert!(waited >= Duration::from_millis(290), "{waited:?}");
    assert!(results[..16].iter().all(Result::is_ok));
    for result in &results[16..] {
        assert!(
            matches!(result, Err(DmaRequestError::Closed { .. })),
            "{result:?}"
        );
    }
    // The request that waited longest carries the timeout as its cause.
    assert!(matches!(
        results[16].as_ref().unwrap_err().cause(),
        VfioUserError::Timeout {
            command: "DMA_MAP",
            ..
        }
    ));
    let why = client.closed_reason().unwrap();
    assert!(why.contains("no reply to DMA_MAP"), "{why}");
    // Closed: what it had been given is forgotten (the server must drop it).
    assert!(client.mapped.is_empty());
    assert!(client.dma_map_for_messages(0x1000, 0x1000).is_err());
}

#[test]
fn a_refused_unmap_in_a_batch_closes_the_connection_and_fails_the_rest() {
    fn refuse_second(index: usize, h: Header) -> Option<Vec<u8>> {
        Some(if index == 1 {
            reply_to(h, FLAG_REPLY | FLAG_ERROR, 1, &[])
        } else {
            reply_to(h, FLAG_REPLY, 0, &[])
        })
    }
    let (mut client, _server) = batch_server(4, in_order, refuse_second);
    client
        .mapped
        .extend((0..4u64).map(|i| (0x10_0000 + i * 0x1000, 0x1000)));
    let unmaps: Vec<DmaRequest> = (0..4u64)
        .map(|i| DmaRequest::Unmap {
            iova: 0x10_0000 + i * 0x1000,
            size: 0x1000,
        })
        .collect();
    let batch = client.start_batch(unmaps);
    let results = client.finish_batch(batch);
    assert!(results[0].is_ok());
    for result in &results[1..] {
        assert!(
            matches!(result, Err(DmaRequestError::Closed { .. })),
            "{result:?}"
        );
    }
    let why = client.closed_reason().unwrap();
    assert!(
        why.starts_with("DMA_UNMAP of 0x101000+0x1000 failed"),
        "{why}"
    );
}

#[test]
fn a_reply_to_no_request_in_flight_closes_the_connection() {
    fn stray(_: usize, h: Header) -> Option<Vec<u8>> {
        Some(reply_to(
            Header {
                id: h.id.wrapping_add(100),
                ..h
            },
            FLAG_REPLY,
            0,
            &[],
        ))
    }
    let (mut client, _server) = batch_server(2, in_order, stray);
    let batch = client.start_batch(maps(2));
    let results = client.finish_batch(batch);
    assert!(results.iter().all(Result::is_err));
    assert!(
        client.mapped.is_empty(),
        "no late or stray reply maps anything"
    );
    let why = client.closed_reason().unwrap();
    assert!(why.contains("malformed reply to DMA_MAP"), "{why}");
}
