//! HTTP/1.1 over the API's Unix socket: the wire only (framing, limits,
//! connection threads); routing lives in `http.rs`. Written for this API
//! rather than taken from a general-purpose server so every resource a
//! client can make us hold is bounded:
//!
//! - at most `MAX_CONNECTIONS` connections, one `http-conn` thread each.
//!   The next one takes the slot of the connection that has waited longest
//!   for its next request (closed at that request boundary, so nothing is
//!   lost or half-answered): open connections, busy or silent, cannot lock
//!   out a new client such as an operator's `vmm.shutdown`. Only when every
//!   connection is in the middle of a request (arriving, which takes at
//!   most `REQUEST_DEADLINE`, handled or answered) is the new one answered
//!   503 and closed at once. A connection is evicted only while it waits:
//!   one that always has its next request pipelined behind the current one
//!   is never evicted;
//! - request line and headers together at most `MAX_HEAD_BYTES` (431 past
//!   it, before anything more is read), the body at most `MAX_BODY` (413);
//! - a request must arrive whole within `REQUEST_DEADLINE` of its first
//!   byte, and an idle keep-alive connection is closed after `IDLE_TIMEOUT`.
//!
//! Heads are read strictly (`Malformed`): a method and header names are
//! RFC 9110 tokens, CR and LF only come as CRLF line ends, no folded lines,
//! `Content-Length` is digits only, no `Transfer-Encoding`. Whatever a front
//! end could frame differently from us is answered 400 once and the
//! connection closed, so bytes behind it never run as a request.
//!
//! Answers are framed the way Cloud Hypervisor's server frames them
//! (`HTTP/1.1 200 ` with an empty reason, `Server: Cloud Hypervisor API`,
//! always a `Content-Length`), which is what its `api_client` parses.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};

pub const MAX_CONNECTIONS: usize = 64;
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Larger bodies are refused with 413 before being read.
pub const MAX_BODY: usize = 64 * 1024;
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection may wait between requests (`idle`) and take to
/// send one (`request`, from its first byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    pub idle: Duration,
    pub request: Duration,
}

impl Deadlines {
    pub const API: Deadlines = Deadlines {
        idle: IDLE_TIMEOUT,
        request: REQUEST_DEADLINE,
    };
}
const SERVER_NAME: &str = "Cloud Hypervisor API";

/// A request as read off the wire.
#[derive(Debug, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
    /// The client asked to close after the answer (or spoke HTTP/1.0).
    pub close: bool,
}

/// An answer: status and JSON body (empty for 204).
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// Why no request could be read. `Gone` ends the connection silently;
/// the others are answered with their status, then the connection closes.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    Gone,
    HeadTooLarge,
    BodyTooLarge(usize),
    Bad(Malformed),
    TimedOut,
}

/// Why a request head was refused (400). Each shape a front end could read
/// differently from us is refused rather than guessed at, so no bytes meant
/// as one request's body or header can run as another request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("malformed request line")]
    RequestLine,
    #[error("method is not a token")]
    Method,
    #[error("request target is not an absolute path")]
    Target,
    #[error("only HTTP/1.0 and HTTP/1.1 are spoken here")]
    Version,
    #[error("request head is not UTF-8")]
    NotUtf8,
    #[error("CR or LF outside a CRLF line end")]
    BareLineEnd,
    #[error("folded header line")]
    Folded,
    #[error("header line without a colon")]
    NoColon,
    #[error("header name is not a token")]
    HeaderName,
    #[error("control character in a header value")]
    HeaderValue,
    #[error("Content-Length is not a decimal number")]
    ContentLength,
    #[error("conflicting Content-Length headers")]
    ConflictingLength,
    #[error("Transfer-Encoding is not supported; send Content-Length")]
    TransferEncoding,
    #[error("connection closed mid-request")]
    ClosedMidHead,
    #[error("connection closed mid-body")]
    ClosedMidBody,
}

impl ReadError {
    pub fn response(&self) -> Option<HttpResponse> {
        let (status, message) = match self {
            ReadError::Gone => return None,
            ReadError::HeadTooLarge => (
                431,
                format!("request line and headers exceed {MAX_HEAD_BYTES} bytes"),
            ),
            ReadError::BodyTooLarge(n) => (
                413,
                format!("body of {n} bytes exceeds the {MAX_BODY}-byte limit"),
            ),
            ReadError::Bad(why) => (400, format!("bad request: {why}")),
            ReadError::TimedOut => (408, "request not complete in time".to_string()),
        };
        Some(HttpResponse {
            status,
            body: super::http::error_body(&message),
        })
    }
}

pub fn encode_response(response: &HttpResponse, close: bool) -> Vec<u8> {
    // The reason phrase stays empty (HTTP allows that): Cloud Hypervisor's
    // clients parse everything after "HTTP/1.1 " to the line end as the code.
    let mut head = format!(
        "HTTP/1.1 {} \r\nServer: {SERVER_NAME}\r\nConnection: {}\r\n",
        response.status,
        if close { "close" } else { "keep-alive" },
    );
    if !response.body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", response.body.len()));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(response.body.as_bytes());
    bytes
}

/// Reads one request from `stream`. `pending` carries bytes read past the
/// previous request (pipelining) and keeps those past this one.
pub fn read_request(
    stream: &mut UnixStream,
    pending: &mut Vec<u8>,
    deadlines: Deadlines,
) -> Result<HttpRequest, ReadError> {
    // Wait for the first byte with the idle timeout, then give the whole
    // request its deadline.
    let mut deadline: Option<Instant> =
        (!pending.is_empty()).then(|| Instant::now() + deadlines.request);
    let head_end = loop {
        if let Some(end) = find(pending, b"\r\n\r\n") {
            break end;
        }
        // The head may take MAX_HEAD_BYTES, plus its blank-line terminator.
        if pending.len() >= MAX_HEAD_BYTES + 4 {
            return Err(ReadError::HeadTooLarge);
        }
        let limit = deadline.map_or(deadlines.idle, |d| {
            d.saturating_duration_since(Instant::now())
        });
        let room = MAX_HEAD_BYTES + 4 - pending.len();
        match read_some(stream, pending, room.min(4096), limit) {
            Ok(0) if pending.is_empty() => return Err(ReadError::Gone),
            Ok(0) => return Err(ReadError::Bad(Malformed::ClosedMidHead)),
            Ok(_) => {}
            Err(ReadError::TimedOut) if deadline.is_none() => return Err(ReadError::Gone),
            Err(e) => return Err(e),
        }
        deadline.get_or_insert_with(|| Instant::now() + deadlines.request);
    };
    if head_end > MAX_HEAD_BYTES {
        return Err(ReadError::HeadTooLarge);
    }
    // Set by now: at entry when bytes were pending, else by the first read.
    let deadline = deadline.unwrap_or_else(Instant::now);
    let parsed = parse_head(&pending[..head_end]).map_err(ReadError::Bad)?;
    let body_start = head_end + 4;
    if parsed.content_length > MAX_BODY {
        return Err(ReadError::BodyTooLarge(parsed.content_length));
    }
    if parsed.expect_continue && pending.len() < body_start + parsed.content_length {
        stream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|_| ReadError::Gone)?;
    }
    while pending.len() < body_start + parsed.content_length {
        let want = body_start + parsed.content_length - pending.len();
        let limit = deadline.saturating_duration_since(Instant::now());
        if read_some(stream, pending, want.min(16384), limit)? == 0 {
            return Err(ReadError::Bad(Malformed::ClosedMidBody));
        }
    }
    let body = pending[body_start..body_start + parsed.content_length].to_vec();
    pending.drain(..body_start + parsed.content_length);
    Ok(HttpRequest {
        method: parsed.method,
        target: parsed.target,
        body,
        close: parsed.close,
    })
}

struct Head {
    method: String,
    target: String,
    content_length: usize,
    close: bool,
    expect_continue: bool,
}

/// RFC 9110 `tchar`: what a method and a header name are made of.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// `head` is the request line and header lines, without the blank line
/// that ends them.
fn parse_head(head: &[u8]) -> Result<Head, Malformed> {
    // A lone CR or LF is a line end to some parsers and not to others: a
    // header hidden behind one would be seen by them and not by us.
    let crlf_only = head.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => head.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && head[i - 1] == b'\r',
        _ => true,
    });
    if !crlf_only {
        return Err(Malformed::BareLineEnd);
    }
    let head = std::str::from_utf8(head).map_err(|_| Malformed::NotUtf8)?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Malformed::RequestLine);
    };
    if !is_token(method) {
        return Err(Malformed::Method);
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Malformed::Target);
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(Malformed::Version),
    };
    let mut content_length: Option<usize> = None;
    let mut connection: Option<String> = None;
    let mut expect_continue = false;
    for line in lines {
        // obs-fold: joined to the previous value by some, a header of its
        // own (or garbage) to others.
        if line.starts_with([' ', '\t']) {
            return Err(Malformed::Folded);
        }
        let (name, value) = line.split_once(':').ok_or(Malformed::NoColon)?;
        // No whitespace before the colon either: `Content-Length\t:` must
        // not be a header we ignore and a front end honours.
        if !is_token(name) {
            return Err(Malformed::HeaderName);
        }
        let value = value.trim_matches([' ', '\t']);
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(Malformed::HeaderValue);
        }
        if name.eq_ignore_ascii_case("content-length") {
            // 1*DIGIT: `parse` alone would take a sign.
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(Malformed::ContentLength);
            }
            let n: usize = value.parse().map_err(|_| Malformed::ContentLength)?;
            if content_length.is_some_and(|old| old != n) {
                return Err(Malformed::ConflictingLength);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Malformed::TransferEncoding);
        } else if name.eq_ignore_ascii_case("connection") {
            connection = Some(value.to_ascii_lowercase());
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    let close = match connection.as_deref() {
        Some(c) if c.contains("close") => true,
        Some(c) if c.contains("keep-alive") => false,
        _ => http10,
    };
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        content_length: content_length.unwrap_or(0),
        close,
        expect_continue,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Appends up to `max` bytes read within `limit`; `Ok(0)` at EOF.
fn read_some(
    stream: &mut UnixStream,
    into: &mut Vec<u8>,
    max: usize,
    limit: Duration,
) -> Result<usize, ReadError> {
    loop {
        if limit.is_zero() {
            return Err(ReadError::TimedOut);
        }
        stream
            .set_read_timeout(Some(limit))
            .map_err(|_| ReadError::Gone)?;
        let mut chunk = [0u8; 16384];
        let max = max.min(chunk.len());
        match stream.read(&mut chunk[..max]) {
            Ok(n) => {
                into.extend_from_slice(&chunk[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::TimedOut);
            }
            Err(_) => return Err(ReadError::Gone),
        }
    }
}

/// Where a connection is, as the acceptor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting, since then, for its next request (or its first): nothing
    /// of a request is read or owed, so ending it now loses nothing.
    Waiting(Instant),
    /// Reading, handling or answering a request.
    Busy,
    /// Told to end by the acceptor, which needs its slot: it ends without
    /// reading another byte.
    Evicted,
}

/// A connection's state shared with the acceptor, and a clone of its
/// socket: shut down (at stop, or to evict it) so a wait for the next
/// request ends at once. The connection thread empties `wake` when it
/// ends, so no fd outlives its connection.
struct Slot {
    phase: Phase,
    wake: Option<UnixStream>,
}

type SharedSlot = Arc<std::sync::Mutex<Slot>>;

fn lock_slot(slot: &SharedSlot) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves one connection until it closes, `handler` answering each request.
fn serve_connection(
    stream: UnixStream,
    stop: &AtomicBool,
    handler: &(dyn Fn(HttpRequest) -> HttpResponse + Sync),
    deadlines: Deadlines,
    slot: &SharedSlot,
) {
    let mut stream = stream;
    exchange(&mut stream, stop, handler, deadlines, slot);
    // The acceptor keeps a clone of this socket (to wake it at stop): shut
    // it down so the client sees the end now, not when the clone goes.
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// How a wait for the next request ended.
enum Wait {
    Request,
    Idle,
    Evicted,
}

/// Waits up to `idle` for the next request to begin, as `Waiting` (so the
/// acceptor may evict this connection meanwhile), and leaves as `Busy`
/// unless evicted. The phase only changes under the lock, so either the
/// acceptor evicts a connection that has read nothing of its next request
/// or the connection reads it and is never evicted in the middle of it.
fn wait_for_request(stream: &UnixStream, slot: &SharedSlot, idle: Duration) -> Wait {
    {
        let mut slot = lock_slot(slot);
        if slot.phase == Phase::Evicted {
            return Wait::Evicted;
        }
        slot.phase = Phase::Waiting(Instant::now());
    }
    let readable = wait_readable(stream.as_raw_fd(), idle);
    let mut slot = lock_slot(slot);
    if slot.phase == Phase::Evicted {
        return Wait::Evicted;
    }
    slot.phase = Phase::Busy;
    if readable { Wait::Request } else { Wait::Idle }
}

fn exchange(
    stream: &mut UnixStream,
    stop: &AtomicBool,
    handler: &(dyn Fn(HttpRequest) -> HttpResponse + Sync),
    deadlines: Deadlines,
    slot: &SharedSlot,
) {
    let _ = stream.set_write_timeout(Some(deadlines.request));
    let mut pending = Vec::new();
    while !stop.load(Ordering::Acquire) {
        // Bytes already read are a pipelined request begun: not waiting.
        if pending.is_empty() {
            match wait_for_request(stream, slot, deadlines.idle) {
                Wait::Request => {}
                Wait::Idle => return,
                Wait::Evicted => {
                    debug!("API connection evicted for a new one");
                    return;
                }
            }
        }
        match read_request(stream, &mut pending, deadlines) {
            Ok(request) => {
                let close = request.close;
                let response = handler(request);
                if stream
                    .write_all(&encode_response(&response, close))
                    .is_err()
                    || close
                {
                    return;
                }
            }
            Err(e) => {
                if let Some(response) = e.response() {
                    debug!("API request refused: {e:?}");
                    let _ = stream.write_all(&encode_response(&response, true));
                }
                return;
            }
        }
    }
}

/// Whether `fd` has something to read within `timeout`: data, a
/// connection to accept, or an end (hang-up and errors are always
/// reported, and a read then says which).
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    loop {
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let left = end.saturating_duration_since(Instant::now());
        // Rounded up: a wait is never cut short of `timeout`.
        let ms = libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd for an fd that outlives the call.
        let rc = unsafe { libc::poll(&mut pollfd, 1, ms) };
        // A signal is no reason to give up the wait (and end a connection).
        if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        // The kernel fills `revents` only for a ready fd.
        return pollfd.revents != 0;
    }
}

struct Connection {
    thread: JoinHandle<()>,
    slot: SharedSlot,
}

/// Frees a slot for a new connection: ends the connection that has waited
/// longest for its next request, at that request boundary, and waits for
/// its thread so no more than `MAX_CONNECTIONS` ever run. False when every
/// connection is in the middle of a request.
fn evict_longest_waiting(connections: &mut Vec<Connection>) -> bool {
    // Another try only when the chosen one began a request meanwhile.
    for _ in 0..MAX_CONNECTIONS {
        let oldest = connections
            .iter()
            .enumerate()
            .filter_map(|(i, c)| match lock_slot(&c.slot).phase {
                Phase::Waiting(since) => Some((since, i)),
                _ => None,
            })
            .min();
        let Some((_, i)) = oldest else {
            return false;
        };
        {
            let mut slot = lock_slot(&connections[i].slot);
            if !matches!(slot.phase, Phase::Waiting(_)) {
                continue;
            }
            slot.phase = Phase::Evicted;
            if let Some(wake) = slot.wake.as_ref() {
                let _ = wake.shutdown(std::net::Shutdown::Read);
            }
        }
        // It ends without reading or writing: the join is short.
        let evicted = connections.swap_remove(i);
        let _ = evicted.thread.join();
        return true;
    }
    false
}

/// Accepts connections until `stop`, each on its own `http-conn` thread
/// (which inherits the caller's seccomp filter); then wakes and joins them.
pub fn serve(
    listener: &UnixListener,
    stop: &AtomicBool,
    handler: Arc<dyn Fn(HttpRequest) -> HttpResponse + Send + Sync>,
    deadlines: Deadlines,
) {
    let stop_flag: Arc<AtomicBool> = Arc::new(AtomicBool::new(false));
    let active = Arc::new(AtomicUsize::new(0));
    let mut connections: Vec<Connection> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        if !wait_readable(listener.as_raw_fd(), Duration::from_millis(50)) {
            continue;
        }
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("API accept failed: {e}");
                continue;
            }
        };
        connections.retain(|c| !c.thread.is_finished());
        if active.load(Ordering::Acquire) >= MAX_CONNECTIONS
            && !evict_longest_waiting(&mut connections)
        {
            let busy = HttpResponse {
                status: 503,
                body: super::http::error_body(&format!(
                    "all {MAX_CONNECTIONS} API connections are in the middle of a request"
                )),
            };
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = stream.write_all(&encode_response(&busy, true));
            continue;
        }
        active.fetch_add(1, Ordering::AcqRel);
        let slot: SharedSlot = Arc::new(std::sync::Mutex::new(Slot {
            phase: Phase::Waiting(Instant::now()),
            wake: stream.try_clone().ok(),
        }));
        let (count, conn_stop, handler) = (active.clone(), stop_flag.clone(), handler.clone());
        let own_slot = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || {
                serve_connection(stream, &conn_stop, handler.as_ref(), deadlines, &own_slot);
                lock_slot(&own_slot).wake.take();
                count.fetch_sub(1, Ordering::AcqRel);
            });
        match spawned {
            Ok(thread) => connections.push(Connection { thread, slot }),
            Err(e) => {
                active.fetch_sub(1, Ordering::AcqRel);
                warn!("cannot start an API connection thread: {e}");
            }
        }
    }
    stop_flag.store(true, Ordering::Release);
    for connection in &connections {
        if let Some(wake) = lock_slot(&connection.slot).wake.as_ref() {
            let _ = wake.shutdown(std::net::Shutdown::Read);
        }
    }
    for connection in connections {
        let _ = connection.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let request = read(raw).unwrap_or_else(|e| {
                panic!("{e:?}: {}", String::from_utf8_lossy(raw).escape_debug())
            });
            assert_eq!(
                (request.target.as_str(), &request.body[..]),
                ("/t", &b"ok"[..])
            );
        }
    }

    #[test]
    fn answers_are_framed_as_cloud_hypervisor_frames_them() {
        let bytes = encode_response(
            &HttpResponse {
                status: 200,
                body: "{}".into(),
            },
            false,
        );
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 \r\n"), "{text}");
        assert!(text.contains("\r\nServer: Cloud Hypervisor API\r\n"));
        assert!(text.contains("\r\nContent-Length: 2\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
        let empty = String::from_utf8(encode_response(
            &HttpResponse {
                status: 204,
                body: String::new(),
            },
            true,
        ))
        .unwrap();
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
        let mut full =
            format!("PUT /b HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n").into_bytes();
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
        let with = String::from_utf8(encode_response(
            &HttpResponse {
                status: 200,
                body: "{}".into(),
            },
            false,
        ))
        .unwrap();
        assert!(with.contains("Content-Type: application/json\r\n"));
        let without = String::from_utf8(encode_response(
            &HttpResponse {
                status: 204,
                body: String::new(),
            },
            false,
        ))
        .unwrap();
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
            assert_eq!(
                unsafe { libc::pthread_kill(waiter.as_pthread_t(), kick) },
                0
            );
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
}

/// `serve` over a real socket, with short deadlines.
#[cfg(test)]
mod serve_tests {
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
            let path =
                std::env::temp_dir().join(format!("ch-serve-{tag}-{}.sock", std::process::id()));
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
    fn answer_or_close(
        reader: &mut BufReader<UnixStream>,
    ) -> Result<Option<(u16, String)>, String> {
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
            if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0
                || !line.ends_with("\r\n")
            {
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
                    while !done.load(Ordering::Acquire)
                        && started.elapsed() < Duration::from_secs(20)
                    {
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
        eprintln!(
            "newcomer waits {waits:?} with {MAX_CONNECTIONS} busy clients; {evicted} evicted"
        );
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
}
