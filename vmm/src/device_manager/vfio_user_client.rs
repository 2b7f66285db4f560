//! The client side of the vfio-user protocol, as far as DMA needs it:
//! version negotiation, DMA_MAP (with the memory's fd) and DMA_UNMAP.
//!
//! Ours rather than `vfio_user::Client` (0.1.7) because that client ignores
//! the error flag of a DMA_MAP reply (a refused map looks like success) and
//! reads an error reply to DMA_UNMAP as a full DMA_UNMAP reply, blocking
//! forever; it also has no timeout, and a conversion runs on a vCPU thread.
//! Here every reply is checked (id, command, error flag), every read has a
//! deadline, and a client whose stream lost sync refuses further requests
//! instead of misreading them. Interoperability is tested against
//! `vfio_user::Server` (tests/devices.rs, the test device).

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const CMD_VERSION: u16 = 1;
const CMD_DMA_MAP: u16 = 2;
const CMD_DMA_UNMAP: u16 = 3;
const HEADER_SIZE: usize = 16;
const FLAG_TYPE_MASK: u32 = 0xf;
const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
const DMA_READ_WRITE: u32 = 0b11;
/// A reply larger than this is a protocol error, not something to allocate.
const MAX_REPLY: usize = 64 << 10;
const CAPABILITIES: &str = r#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576}}"#;

#[derive(Debug, thiserror::Error)]
pub enum VfioUserError {
    #[error("cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("socket I/O")]
    Io(#[source] std::io::Error),
    #[error("cannot pass the memory fd")]
    SendFd(#[source] vmm_sys_util::errno::Error),
    #[error("the server refused {command} (errno {errno})")]
    Refused { command: &'static str, errno: u32 },
    #[error("malformed reply to {0}")]
    Protocol(&'static str),
    #[error("the connection is unusable after an earlier failure")]
    Broken,
}

#[derive(Debug, Clone, Copy)]
struct Header {
    id: u16,
    command: u16,
    size: u32,
    flags: u32,
    error: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_SIZE]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        Header {
            id: u16_at(0),
            command: u16_at(2),
            size: u32_at(4),
            flags: u32_at(8),
            error: u32_at(12),
        }
    }
}

fn command_name(command: u16) -> &'static str {
    match command {
        CMD_VERSION => "VERSION",
        CMD_DMA_MAP => "DMA_MAP",
        CMD_DMA_UNMAP => "DMA_UNMAP",
        _ => "request",
    }
}

pub struct VfioUserClient {
    stream: UnixStream,
    next_id: u16,
    broken: bool,
}

impl VfioUserClient {
    /// Connects and negotiates the protocol version. `timeout` bounds every
    /// later request: a hung server fails the conversion, it does not hang
    /// the vCPU.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, VfioUserError> {
        let stream = UnixStream::connect(socket)
            .map_err(|e| VfioUserError::Connect(socket.display().to_string(), e))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(VfioUserError::Io)?;
        let mut client = VfioUserClient {
            stream,
            next_id: 0,
            broken: false,
        };
        let mut payload = Vec::with_capacity(4 + CAPABILITIES.len() + 1);
        payload.extend_from_slice(&0u16.to_le_bytes()); // major
        payload.extend_from_slice(&1u16.to_le_bytes()); // minor
        payload.extend_from_slice(CAPABILITIES.as_bytes());
        payload.push(0);
        let reply = client.request(CMD_VERSION, &payload, None)?;
        if reply.len() < 4 || reply[0..2] != [0, 0] {
            return Err(VfioUserError::Protocol("VERSION"));
        }
        Ok(client)
    }

    /// Maps `size` bytes of `fd` at `offset` to `iova`, read-write.
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        fd: RawFd,
        offset: u64,
    ) -> Result<(), VfioUserError> {
        let mut payload = Vec::with_capacity(32);
        payload.extend_from_slice(&32u32.to_le_bytes()); // argsz
        payload.extend_from_slice(&DMA_READ_WRITE.to_le_bytes());
        payload.extend_from_slice(&offset.to_le_bytes());
        payload.extend_from_slice(&iova.to_le_bytes());
        payload.extend_from_slice(&size.to_le_bytes());
        self.request(CMD_DMA_MAP, &payload, Some(fd)).map(drop)
    }

    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), VfioUserError> {
        let mut payload = Vec::with_capacity(24);
        payload.extend_from_slice(&24u32.to_le_bytes()); // argsz
        payload.extend_from_slice(&0u32.to_le_bytes()); // flags
        payload.extend_from_slice(&iova.to_le_bytes());
        payload.extend_from_slice(&size.to_le_bytes());
        self.request(CMD_DMA_UNMAP, &payload, None).map(drop)
    }

    fn request(
        &mut self,
        command: u16,
        payload: &[u8],
        fd: Option<RawFd>,
    ) -> Result<Vec<u8>, VfioUserError> {
        if self.broken {
            return Err(VfioUserError::Broken);
        }
        let result = self.exchange(command, payload, fd);
        // A failure in the middle of a message leaves the stream at an
        // unknown position; only a clean error reply keeps it usable.
        if matches!(
            result,
            Err(VfioUserError::Io(_) | VfioUserError::SendFd(_) | VfioUserError::Protocol(_))
        ) {
            self.broken = true;
        }
        result
    }

    fn exchange(
        &mut self,
        command: u16,
        payload: &[u8],
        fd: Option<RawFd>,
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
        let mut message = header.encode().to_vec();
        message.extend_from_slice(payload);
        match fd {
            Some(fd) => {
                // The vCPU kick signal has no SA_RESTART; an interrupted
                // sendmsg sent nothing and is simply retried.
                let sent = loop {
                    match self.stream.send_with_fd(&message[..], fd) {
                        Err(e) if e.errno() == libc::EINTR => continue,
                        other => break other.map_err(VfioUserError::SendFd)?,
                    }
                };
                // The fd travels with the first byte; finish a short send.
                self.stream
                    .write_all(&message[sent..])
                    .map_err(VfioUserError::Io)?;
            }
            None => self.stream.write_all(&message).map_err(VfioUserError::Io)?,
        }

        let mut raw = [0u8; HEADER_SIZE];
        self.stream
            .read_exact(&mut raw)
            .map_err(VfioUserError::Io)?;
        let reply = Header::decode(&raw);
        let name = command_name(command);
        let size = reply.size as usize;
        if reply.id != id
            || reply.command != command
            || reply.flags & FLAG_TYPE_MASK != FLAG_REPLY
            || !(HEADER_SIZE..=MAX_REPLY).contains(&size)
        {
            return Err(VfioUserError::Protocol(name));
        }
        let mut body = vec![0u8; size - HEADER_SIZE];
        self.stream
            .read_exact(&mut body)
            .map_err(VfioUserError::Io)?;
        if reply.flags & FLAG_ERROR != 0 {
            return Err(VfioUserError::Refused {
                command: name,
                errno: reply.error,
            });
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::thread::JoinHandleExt;

    use super::*;

    extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

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
        let mut client = VfioUserClient {
            stream: client_end,
            next_id: 7,
            broken: false,
        };
        let mapper = std::thread::spawn(move || {
            let result = client.dma_map(0x1000, 0x1000, memory_fd, 0);
            (result.map_err(|e| e.to_string()), client.broken)
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
            size: HEADER_SIZE as u32,
            flags: FLAG_REPLY,
            ..header
        };
        server_end.write_all(&reply.encode()).unwrap();
        assert_eq!(mapper.join().unwrap(), (Ok(()), false));
        drop(memory);
    }

    #[test]
    fn header_round_trips() {
        let h = Header {
            id: 0xbeef,
            command: CMD_DMA_UNMAP,
            size: 40,
            flags: FLAG_REPLY | FLAG_ERROR,
            error: 22,
        };
        let d = Header::decode(&h.encode());
        assert_eq!(
            (d.id, d.command, d.size, d.flags, d.error),
            (0xbeef, 3, 40, 0x21, 22)
        );
    }
}
