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

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};

mod request;
#[cfg(test)]
mod serve_tests;
#[cfg(test)]
mod tests;

pub use request::{HttpRequest, HttpResponse, encode_response, read_request};
#[cfg(test)]
pub use request::{Malformed, ReadError};

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
pub(super) const SERVER_NAME: &str = "Cloud Hypervisor API";

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
        // Joined, not just dropped: a thread whose work is done may not
        // have exited yet, and the bound is on threads, not on work.
        for ended in connections.extract_if(.., |c| c.thread.is_finished()) {
            let _ = ended.thread.join();
        }
        if connections.len() >= MAX_CONNECTIONS && !evict_longest_waiting(&mut connections) {
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
        let slot: SharedSlot = Arc::new(std::sync::Mutex::new(Slot {
            phase: Phase::Waiting(Instant::now()),
            wake: stream.try_clone().ok(),
        }));
        let (conn_stop, handler) = (stop_flag.clone(), handler.clone());
        let own_slot = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("http-conn".into())
            .spawn(move || {
                serve_connection(stream, &conn_stop, handler.as_ref(), deadlines, &own_slot);
                lock_slot(&own_slot).wake.take();
            });
        match spawned {
            Ok(thread) => connections.push(Connection { thread, slot }),
            Err(e) => warn!("cannot start an API connection thread: {e}"),
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
