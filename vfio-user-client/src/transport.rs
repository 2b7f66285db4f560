//! The connection: framing of whole messages under an absolute deadline,
//! fd passing both ways, reads and sends that survive signals, and
//! closing the socket. It knows no command's layout and serves nothing.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::error::VfioUserError;
use crate::wire::{HEADER_SIZE, Header, MAX_MESSAGE};

/// One connection to a server, open until `close`.
pub(crate) struct Transport {
    /// `None` once closed; `closed` says why.
    stream: Option<UnixStream>,
    closed: Option<String>,
    next_id: u16,
    timeout: Duration,
    /// An fd that came with the last header read (a region's mmap fd);
    /// dropped, and so closed, unless someone takes it.
    received_fd: Option<File>,
}

impl Transport {
    pub(crate) fn new(stream: UnixStream, timeout: Duration) -> Self {
        // Sends are bounded too: a stopped server stops draining its socket.
        let _ = stream.set_write_timeout(Some(timeout));
        Transport {
            stream: Some(stream),
            closed: None,
            next_id: 0,
            timeout,
            received_fd: None,
        }
    }

    /// Why the connection was closed, if it was.
    pub(crate) fn closed_reason(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// Refuses with the reason once closed.
    pub(crate) fn check_open(&self) -> Result<(), VfioUserError> {
        match &self.closed {
            Some(why) => Err(VfioUserError::Closed(why.clone())),
            None => Ok(()),
        }
    }

    /// A second handle on the socket (`None` once closed).
    pub(crate) fn watch_handle(&self) -> Option<UnixStream> {
        self.stream.as_ref()?.try_clone().ok()
    }

    /// Shuts the socket down and closes it: the server sees EOF at once.
    /// Returns whether this call closed it (false if it already was).
    pub(crate) fn close(&mut self, reason: &str) -> bool {
        let Some(stream) = self.stream.take() else {
            return false;
        };
        let _ = stream.shutdown(std::net::Shutdown::Both);
        self.closed = Some(reason.to_string());
        true
    }

    /// When a request sent now must have its answer.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// The id for the next request.
    pub(crate) fn next_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// The fd that came with the last header, if any.
    pub(crate) fn take_received_fd(&mut self) -> Option<File> {
        self.received_fd.take()
    }

    /// Whether a message is waiting to be read, without waiting for one.
    pub(crate) fn has_pending(&self) -> bool {
        let mut waiting = libc::pollfd {
            fd: self.stream().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd for a socket we own, no wait.
        unsafe { libc::poll(&mut waiting, 1, 0) > 0 }
    }

    fn stream(&self) -> &UnixStream {
        self.stream.as_ref().expect("checked open by the caller")
    }

    pub(crate) fn send(&self, message: &[u8], fds: &[RawFd]) -> Result<(), VfioUserError> {
        let mut stream = self.stream();
        match fds {
            [] => stream.write_all(message).map_err(VfioUserError::Io),
            fds => {
                // The vCPU kick signal has no SA_RESTART; an interrupted
                // sendmsg sent nothing and is simply retried.
                let sent = loop {
                    match stream.send_with_fds(&[message], fds) {
                        Err(e) if e.errno() == libc::EINTR => continue,
                        other => break other.map_err(VfioUserError::SendFd)?,
                    }
                };
                // The fds travel with the first byte; finish a short send.
                stream
                    .write_all(&message[sent..])
                    .map_err(VfioUserError::Io)
            }
        }
    }

    /// Reads a message's header before `deadline` and checks its size;
    /// `command` names what was awaited, in errors.
    pub(crate) fn read_header(
        &mut self,
        deadline: Instant,
        command: &'static str,
    ) -> Result<Header, VfioUserError> {
        let mut raw = [0u8; HEADER_SIZE];
        self.read_header_bytes(&mut raw, deadline, command)?;
        let header = Header::decode(&raw);
        if !(HEADER_SIZE..=MAX_MESSAGE).contains(&(header.size as usize)) {
            return Err(VfioUserError::Protocol(command));
        }
        Ok(header)
    }

    /// Reads the rest of the message `header` began.
    pub(crate) fn read_body(
        &self,
        header: &Header,
        deadline: Instant,
        command: &'static str,
    ) -> Result<Vec<u8>, VfioUserError> {
        let mut body = vec![0u8; header.size as usize - HEADER_SIZE];
        self.read_full(&mut body, deadline, command)?;
        Ok(body)
    }

    /// Fills `buf` before `deadline`; an interrupted read does not move it.
    fn read_full(
        &self,
        buf: &mut [u8],
        deadline: Instant,
        command: &'static str,
    ) -> Result<(), VfioUserError> {
        let mut stream = self.stream();
        let mut filled = 0;
        while filled < buf.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_error(command));
            }
            stream
                .set_read_timeout(Some(left))
                .map_err(VfioUserError::Io)?;
            match stream.read(&mut buf[filled..]) {
                Ok(0) => return Err(VfioUserError::Eof),
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.timeout_error(command));
                }
                Err(e) => return Err(VfioUserError::Io(e)),
            }
        }
        Ok(())
    }

    /// Reads the raw bytes of a header; an fd sent with it (SCM_RIGHTS
    /// travels with a message's first byte) is kept in `received_fd`.
    fn read_header_bytes(
        &mut self,
        buf: &mut [u8; HEADER_SIZE],
        deadline: Instant,
        command: &'static str,
    ) -> Result<(), VfioUserError> {
        let filled = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.timeout_error(command));
            }
            let stream = self.stream();
            stream
                .set_read_timeout(Some(left))
                .map_err(VfioUserError::Io)?;
            match stream.recv_with_fd(buf) {
                Ok((0, _)) => return Err(VfioUserError::Eof),
                Ok((n, fd)) => {
                    if fd.is_some() {
                        self.received_fd = fd;
                    }
                    break n;
                }
                Err(e) if e.errno() == libc::EINTR => {}
                Err(e) if e.errno() == libc::EAGAIN => return Err(self.timeout_error(command)),
                Err(e) => {
                    return Err(VfioUserError::Io(std::io::Error::from_raw_os_error(
                        e.errno(),
                    )));
                }
            }
        };
        self.read_full(&mut buf[filled..], deadline, command)
    }

    fn timeout_error(&self, command: &'static str) -> VfioUserError {
        VfioUserError::Timeout {
            command,
            ms: self.timeout.as_millis(),
        }
    }
}

#[cfg(test)]
mod tests;
