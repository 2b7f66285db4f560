//! The connection: one request at a time with an absolute deadline,
//! fd passing, reads that survive signals, and closing the socket at the
//! first doubt about the stream.

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::client::VfioUserClient;
use crate::error::{VfioUserError, with_sources};
use crate::wire::*;

impl VfioUserClient {
    /// Shuts the socket down and closes it: the server sees EOF at once
    /// and, following the spec, drops every mapping. Idempotent.
    pub fn close(&mut self, reason: &str) {
        if let Some(stream) = self.stream.take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            self.closed = Some(reason.to_string());
            self.mapped.clear();
        }
    }

    /// A well-framed reply whose content is wrong: the stream may be out
    /// of step with the server, so the connection goes.
    pub(crate) fn protocol_failure(&mut self, command: &'static str) -> VfioUserError {
        let e = VfioUserError::Protocol(command);
        self.close(&with_sources(&e));
        e
    }

    pub(crate) fn request(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<Vec<u8>, VfioUserError> {
        if let Some(why) = &self.closed {
            return Err(VfioUserError::Closed(why.clone()));
        }
        self.received_fd = None;
        let deadline = Instant::now() + self.timeout;
        let result = self.exchange(command, payload, fds, deadline);
        // A failure in the middle of a message leaves the stream at an
        // unknown position, and a late reply could still take effect; only
        // a clean error reply keeps the connection.
        if let Err(e) = &result {
            let reason = match e {
                VfioUserError::Refused { .. } => None,
                VfioUserError::Timeout { .. } | VfioUserError::Protocol(_) => Some(with_sources(e)),
                _ => Some(format!(
                    "{} failed: {}",
                    command_name(command),
                    with_sources(e)
                )),
            };
            if let Some(reason) = reason {
                self.close(&reason);
            }
        }
        result
    }

    pub(crate) fn stream(&self) -> &UnixStream {
        self.stream.as_ref().expect("checked open by request()")
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

    /// Fills `buf` before `deadline`; an interrupted read does not move it.
    pub(crate) fn read_full(
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

    /// Reads a message header; an fd sent with it (SCM_RIGHTS travels with
    /// a message's first byte) is kept in `received_fd`.
    pub(crate) fn read_header(
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

    pub(crate) fn timeout_error(&self, command: &'static str) -> VfioUserError {
        VfioUserError::Timeout {
            command,
            ms: self.timeout.as_millis(),
        }
    }

    fn exchange(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: &[RawFd],
        deadline: Instant,
    ) -> Result<Vec<u8>, VfioUserError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let header = Header {
            id,
            command,
            size: (HEADER_SIZE + payload.len()) as u32,
            flags: 0,
            error: 0,
        };
        let mut message = Vec::with_capacity(HEADER_SIZE + payload.len());
        message.extend_from_slice(&header.encode());
        message.extend_from_slice(payload);
        self.send(&message, fds)?;

        let name = command_name(command);
        loop {
            let mut raw = [0u8; HEADER_SIZE];
            self.read_header(&mut raw, deadline, name)?;
            let incoming = Header::decode(&raw);
            let size = incoming.size as usize;
            if !(HEADER_SIZE..=MAX_MESSAGE).contains(&size) {
                return Err(VfioUserError::Protocol(name));
            }
            let mut body = vec![0u8; size - HEADER_SIZE];
            self.read_full(&mut body, deadline, name)?;
            if incoming.flags & FLAG_TYPE_MASK == FLAG_COMMAND {
                // The server may ask something of us before it answers.
                self.serve(incoming, &body)?;
                continue;
            }
            if incoming.id != id
                || incoming.command != command
                || incoming.flags & FLAG_TYPE_MASK != FLAG_REPLY
            {
                return Err(VfioUserError::Protocol(name));
            }
            if incoming.flags & FLAG_ERROR != 0 {
                return Err(VfioUserError::Refused {
                    command: name,
                    errno: incoming.error,
                });
            }
            return Ok(body);
        }
    }
}

#[cfg(test)]
mod tests;
