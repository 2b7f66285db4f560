//! Serving the server's DMA_READ / DMA_WRITE (message-based DMA): inside
//! what it has been given only, whether it asks while it owes us a reply
//! or between our requests.

use std::time::Instant;

use log::debug;

use crate::client::VfioUserClient;
use crate::error::{VfioUserError, with_sources};
use crate::wire::*;

/// Why guest memory could not be reached (the server is answered EFAULT).
pub type DmaMemoryError = Box<dyn std::error::Error + Send + Sync>;

/// Guest memory as a server's DMA_READ / DMA_WRITE reaches it.
pub trait DmaMemory: Send + Sync {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaMemoryError>;
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaMemoryError>;
}

impl VfioUserClient {
    /// Answers one DMA_READ / DMA_WRITE the server sent while no request of
    /// ours was in flight, if one is waiting (message-based DMA from a
    /// server's own threads). Anything else arriving then is out of step:
    /// the connection goes.
    pub fn serve_pending(&mut self) -> Result<(), VfioUserError> {
        self.transport.check_open()?;
        if !self.transport.has_pending() {
            return Ok(());
        }
        let deadline = self.transport.deadline();
        let result = self.serve_one(deadline);
        if let Err(e) = &result {
            self.close(&format!(
                "serving the server's request failed: {}",
                with_sources(e)
            ));
        }
        result
    }

    fn serve_one(&mut self, deadline: Instant) -> Result<(), VfioUserError> {
        const WHAT: &str = "a server request";
        let incoming = self.transport.read_header(deadline, WHAT)?;
        // Nothing comes with a server's DMA request.
        drop(self.transport.take_received_fd());
        if incoming.flags & FLAG_TYPE_MASK != FLAG_COMMAND {
            return Err(VfioUserError::Protocol(WHAT));
        }
        let body = self.transport.read_body(&incoming, deadline, WHAT)?;
        self.serve(incoming, &body)
    }

    /// Whether `addr..addr+count` lies inside one current mapping.
    fn is_mapped(&self, addr: u64, count: u64) -> bool {
        let Some(end) = addr.checked_add(count) else {
            return false;
        };
        self.mapped
            .range(..=addr)
            .next_back()
            .is_some_and(|(&iova, &size)| end <= iova + size)
    }

    /// Answers a server's DMA_READ / DMA_WRITE: served inside what it has
    /// mapped, refused with an error reply otherwise (so a private page is
    /// never touched and the stream stays in sync).
    pub(crate) fn serve(&mut self, request: Header, body: &[u8]) -> Result<(), VfioUserError> {
        let answer = self.dma_access(request.command, body);
        let (flags, error, payload) = match answer {
            Ok(payload) => (FLAG_REPLY, 0, payload),
            Err(errno) => (FLAG_REPLY | FLAG_ERROR, errno, Vec::new()),
        };
        let reply = Header {
            id: request.id,
            command: request.command,
            size: u32::try_from(HEADER_SIZE + payload.len())
                .expect("a DMA reply is at most MAX_MESSAGE bytes"),
            flags,
            error,
        };
        let mut message = Vec::with_capacity(HEADER_SIZE + payload.len());
        message.extend_from_slice(&reply.encode());
        message.extend_from_slice(&payload);
        self.transport.send(&message, &[])
    }

    fn dma_access(&self, command: u16, body: &[u8]) -> Result<Vec<u8>, u32> {
        if !matches!(command, CMD_DMA_READ | CMD_DMA_WRITE) {
            return Err(ENOSYS);
        }
        if body.len() < 16 {
            return Err(EINVAL);
        }
        let (addr, count) = (u64_at(body, 0), u64_at(body, 8));
        let len = usize::try_from(count)
            .ok()
            .filter(|&n| n <= MAX_DATA_XFER)
            .ok_or(EINVAL)?;
        let memory = self.memory.as_ref().ok_or(EFAULT)?;
        if !self.is_mapped(addr, count) {
            return Err(EFAULT);
        }
        let mut reply = body[..16].to_vec();
        if command == CMD_DMA_READ {
            reply.resize(16 + len, 0);
            memory
                .read(addr, &mut reply[16..])
                .map_err(|e| refused_access("DMA_READ", addr, count, &*e))?;
        } else {
            let data = body.get(16..16 + len).ok_or(EINVAL)?;
            memory
                .write(addr, data)
                .map_err(|e| refused_access("DMA_WRITE", addr, count, &*e))?;
        }
        Ok(reply)
    }
}

/// Logs why guest memory was out of reach; the server is answered EFAULT.
fn refused_access(what: &str, addr: u64, count: u64, e: &dyn std::error::Error) -> u32 {
    debug!("{what} of {addr:#x}+{count:#x} answered EFAULT: {e}");
    EFAULT
}

#[cfg(test)]
mod tests;
