use std::io::Read;
use std::io::{BufRead, BufReader};
use std::sync::atomic::AtomicUsize;

use super::*;

const QUICK: Deadlines = Deadlines {
    idle: Duration::from_millis(300),
    request: Duration::from_millis(300),
};

struct Server {
    path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Requests the handler answered.
    answered: Arc<AtomicUsize>,
}

impl Server {
    fn start(tag: &str) -> Server {
        Self::start_with(tag, QUICK)
    }

    fn start_with(tag: &str, deadlines: Deadlines) -> Server {
        let path = std::env::temp_dir().join(format!("ch-serve-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        let (thread_stop, count) = (stop.clone(), answered.clone());
        let handler: Arc<dyn Fn(HttpRequest) -> HttpResponse + Send + Sync> =
            Arc::new(move |request: HttpRequest| {
                count.fetch_add(1, Ordering::AcqRel);
                HttpResponse {
                    status: 200,
                    body: format!("{{\"target\":{:?}}}", request.target),
                }
            });
        let thread = std::thread::spawn(move || {
            serve(&listener, &thread_stop, handler, deadlines);
        });
        Server {
            path,
            stop,
            thread: Some(thread),
            answered,
        }
    }

    fn connect(&self) -> UnixStream {
        let stream = UnixStream::connect(&self.path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
    }

    /// Stops the server; how long `serve` took to return.
    fn stop(&mut self) -> Duration {
        let started = Instant::now();
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().unwrap();
        started.elapsed()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One answer off `reader`: (status, body).
fn answer(reader: &mut BufReader<UnixStream>) -> Option<(u16, String)> {
    let mut status_line = String::new();
    if reader.read_line(&mut status_line).ok()? == 0 {
        return None;
    }
    let status = status_line.split_whitespace().nth(1)?.parse().ok()?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((status, String::from_utf8(body).ok()?))
}

fn at_eof(reader: &mut BufReader<UnixStream>) -> bool {
    let mut rest = Vec::new();
    matches!(reader.read_to_end(&mut rest), Ok(0))
}

#[test]
fn a_kept_alive_connection_is_served_until_it_asks_to_close() {
    let server = Server::start("keepalive");
    let mut stream = server.connect();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    stream.write_all(b"GET /a HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(
        answer(&mut reader).unwrap(),
        (200, "{\"target\":\"/a\"}".into())
    );
    let asked = Instant::now();
    stream
        .write_all(b"GET /b HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(answer(&mut reader).unwrap().1, "{\"target\":\"/b\"}");
    assert!(at_eof(&mut reader), "closed after the answer it asked for");
    // At once, not when the idle time runs out.
    assert!(asked.elapsed() < QUICK.idle, "{:?}", asked.elapsed());
    assert_eq!(server.answered.load(Ordering::Acquire), 2);
}

#[test]
fn idle_and_slow_connections_are_let_go_at_their_deadlines() {
    let server = Server::start("deadlines");
    // Idle: closed without an answer once the idle time is over.
    let started = Instant::now();
    let mut idle = BufReader::new(server.connect());
    assert!(at_eof(&mut idle));
    let waited = started.elapsed();
    assert!(
        waited >= QUICK.idle && waited < QUICK.idle * 5,
        "{waited:?}"
    );
    // Slow: a request begun and never finished gets 408.
    let mut slow = server.connect();
    slow.write_all(b"GET /slow HTTP/1.1\r\n").unwrap();
    let mut reader = BufReader::new(slow);
    assert_eq!(answer(&mut reader).unwrap().0, 408);
    assert!(at_eof(&mut reader));
    // A malformed one is answered with its status and closed.
    let mut bad = server.connect();
    bad.write_all(b"GET / HTTP/2\r\n\r\n").unwrap();
    let mut reader = BufReader::new(bad);
    assert_eq!(answer(&mut reader).unwrap().0, 400);
    assert!(at_eof(&mut reader));
    assert_eq!(server.answered.load(Ordering::Acquire), 0);
}

#[test]
fn a_malformed_head_is_answered_400_once_and_nothing_behind_it_runs() {
    let server = Server::start("smuggle");
    let smuggled = "GET /smuggled HTTP/1.1\r\n\r\n";
    let len = smuggled.len();
    for head in [
        format!("PUT /a HTTP/1.1\r\nContent-Length\t: {len}\r\n\r\n"),
        format!("PUT /a HTTP/1.1\r\nContent-Length\0: {len}\r\n\r\n"),
        format!("PUT /a HTTP/1.1\r\nX-A: b\nContent-Length: {len}\r\n\r\n"),
        format!("PUT /a HTTP/1.1\r\nX-A: b\rContent-Length: {len}\r\n\r\n"),
        format!("PUT /a HTTP/1.1\r\nX-A: b\r\n\tContent-Length: {len}\r\n\r\n"),
        "PUT /a HTTP/1.1\r\nTransfer-Encoding\t: chunked\r\n\r\n".to_string(),
        format!("PUT /a HTTP/1.1\r\nContent-Length: +{len}\r\n\r\n"),
        "G@T /a HTTP/1.1\r\n\r\n".to_string(),
        "GET /a\0 HTTP/1.1\r\n\r\n".to_string(),
    ] {
        let mut stream = server.connect();
        // One write: the smuggled request is already in the server's
        // buffer when the bad head is refused.
        stream
            .write_all(format!("{head}{smuggled}").as_bytes())
            .unwrap();
        let mut reader = BufReader::new(stream);
        let first = answer(&mut reader);
        assert!(
            matches!(&first, Some((400, body)) if body.contains("bad request")),
            "{}: {first:?}",
            head.escape_debug()
        );
        assert!(
            at_eof(&mut reader),
            "{}: more after the 400",
            head.escape_debug()
        );
    }
    assert_eq!(server.answered.load(Ordering::Acquire), 0);
}

/// `count` connections, each answered once and then in the middle of
/// its next request (sent with the first, so the server has read it
/// before it answered: no race with the phase it is in).
fn mid_request(server: &Server, count: usize) -> Vec<BufReader<UnixStream>> {
    (0..count)
        .map(|_| {
            let mut stream = server.connect();
            stream
                .write_all(b"GET /x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\nX-Slow: 1\r\n")
                .unwrap();
            let mut reader = BufReader::new(stream);
            assert_eq!(answer(&mut reader).unwrap().0, 200);
            reader
        })
        .collect()
}

#[test]
fn a_new_connection_gets_503_only_when_every_one_is_mid_request() {
    let patient = Deadlines {
        idle: Duration::from_secs(5),
        request: Duration::from_secs(5),
    };
    let server = Server::start_with("limit", patient);
    let mut slow = mid_request(&server, MAX_CONNECTIONS);
    let mut reader = BufReader::new(server.connect());
    let (status, body) = answer(&mut reader).unwrap();
    assert_eq!(status, 503);
    assert!(
        body.contains("all 64 API connections are in the middle of a request"),
        "{body}"
    );
    // One closes: its slot is free again.
    drop(slow.pop());
    let kept = (0..100).find_map(|_| {
        let mut stream = server.connect();
        // A refused connection may be closed before this write lands.
        let _ = stream.write_all(b"GET /z HTTP/1.1\r\n\r\n");
        let mut reader = BufReader::new(stream);
        if answer(&mut reader).map(|(s, _)| s) == Some(200) {
            return Some(reader);
        }
        std::thread::sleep(Duration::from_millis(20));
        None
    });
    let mut kept = kept.expect("the freed slot was never reused");
    // `kept` now waits for its next request, the only one that does: a
    // new connection takes its slot, and `kept` sees the end, cleanly.
    let mut newcomer = server.connect();
    newcomer.write_all(b"GET /new HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(answer(&mut BufReader::new(newcomer)).unwrap().0, 200);
    assert!(at_eof(&mut kept));
    // The ones in the middle of a request were left alone.
    let mut first = slow.remove(0);
    first.get_mut().write_all(b"\r\n").unwrap();
    assert_eq!(
        answer(&mut first).unwrap(),
        (200, "{\"target\":\"/y\"}".into())
    );
}

/// The next answer on `reader`, or `None` if the server closed the
/// connection (EOF, or reset over a request it never read) before
/// sending a byte of one. A close in the middle of an answer is an error.
fn answer_or_close(reader: &mut BufReader<UnixStream>) -> Result<Option<(u16, String)>, String> {
    let mut status_line = String::new();
    match reader.read_line(&mut status_line) {
        Ok(0) => return Ok(None),
        Err(e) if status_line.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Ok(None);
        }
        Err(e) => return Err(format!("{e} after {status_line:?}")),
        Ok(_) => {}
    }
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("truncated status line {status_line:?}"))?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 || !line.ends_with("\r\n") {
            return Err(format!("truncated head after {status_line:?}"));
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v
                .trim()
                .parse()
                .map_err(|_| format!("bad length {line:?}"))?;
        }
    }
    let mut body = vec![0; length];
    reader
        .read_exact(&mut body)
        .map_err(|e| format!("truncated body: {e}"))?;
    Ok(Some((status, String::from_utf8_lossy(&body).into_owned())))
}

#[test]
fn a_new_client_is_served_at_once_while_64_busy_ones_are_connected() {
    // Long enough that no busy client is let go for being idle.
    let server = Arc::new(Server::start_with("busy", Deadlines::API));
    let ready = Arc::new(std::sync::Barrier::new(MAX_CONNECTIONS + 1));
    let done = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let (server, ready, done) = (server.clone(), ready.clone(), done.clone());
            std::thread::spawn(move || -> Result<(usize, bool), String> {
                let mut stream = server.connect();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut answered = 0;
                let mut evicted = false;
                let started = Instant::now();
                while !done.load(Ordering::Acquire) && started.elapsed() < Duration::from_secs(20) {
                    // The server may have closed before this request
                    // was sent: then it was never read, and that is a
                    // clean end too.
                    if stream
                        .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
                        .is_err()
                    {
                        evicted = true;
                        break;
                    }
                    match answer_or_close(&mut reader)? {
                        Some((200, _)) => answered += 1,
                        Some(other) => return Err(format!("{other:?}")),
                        None => {
                            evicted = true;
                            break;
                        }
                    }
                    if answered == 1 {
                        ready.wait();
                    }
                    std::thread::sleep(Duration::from_millis(30));
                }
                if answered == 0 {
                    // Never reached the barrier: let the test go on.
                    ready.wait();
                }
                Ok((answered, evicted))
            })
        })
        .collect();
    // Every busy client holds a slot and has been answered.
    ready.wait();
    let mut waits = Vec::new();
    for _ in 0..5 {
        let asked = Instant::now();
        let mut stream = server.connect();
        stream
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut reader = BufReader::new(stream);
        let got = answer(&mut reader);
        waits.push(asked.elapsed());
        assert_eq!(got.map(|(s, _)| s), Some(200));
        assert!(at_eof(&mut reader));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Let the busy clients go on a little after the last newcomer.
    std::thread::sleep(Duration::from_millis(200));
    done.store(true, Ordering::Release);
    let mut evicted = 0;
    for client in busy {
        let (answered, was_evicted) = client.join().unwrap().unwrap();
        assert!(answered >= 1);
        evicted += usize::from(was_evicted);
    }
    let slowest = waits.iter().max().unwrap();
    eprintln!("newcomer waits {waits:?} with {MAX_CONNECTIONS} busy clients; {evicted} evicted");
    assert!(*slowest < Duration::from_secs(1), "{waits:?}");
    // Each newcomer took one busy client's slot at most.
    assert!((1..=5).contains(&evicted), "{evicted}");
}

#[test]
fn stop_ends_kept_alive_connections_at_once() {
    // Idle connections would last seconds: only stop ends them sooner.
    let patient = Deadlines {
        idle: Duration::from_secs(3),
        request: Duration::from_secs(3),
    };
    let mut server = Server::start_with("stop", patient);
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut stream = server.connect();
        stream.write_all(b"GET /z HTTP/1.1\r\n\r\n").unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        assert_eq!(answer(&mut reader).unwrap().0, 200);
        streams.push(reader);
    }
    // Well inside the idle time: stop must not wait for it, and every
    // connection (the first accepted too) is ended by it, not by its
    // idle time running out.
    let stopped = Instant::now();
    let took = server.stop();
    assert!(took < Duration::from_secs(1), "{took:?}");
    for reader in &mut streams {
        assert!(at_eof(reader));
    }
    assert!(
        stopped.elapsed() < Duration::from_secs(1),
        "{:?}",
        stopped.elapsed()
    );
}
