//! One request off the wire and one answer onto it: framing, limits and
//! the strict reading of request heads.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::{Deadlines, MAX_BODY, MAX_HEAD_BYTES, SERVER_NAME};

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
            body: crate::api::http::error_body(&message),
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
