//! The typed client: connecting and negotiating the version, DMA_MAP /
//! DMA_UNMAP, and the requests the PCI function model needs.

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::batch::DmaRequest;
use crate::dma::DmaMemory;
use crate::error::{DmaRequestError, VfioUserError, with_sources};
use crate::transport::Transport;
use crate::wire::*;

pub struct VfioUserClient {
    pub(crate) transport: Transport,
    max_dma_maps: u64,
    /// What the server has been given, so its DMA_READ / DMA_WRITE reach
    /// exactly that: IOVA -> size.
    pub(crate) mapped: BTreeMap<u64, u64>,
    pub(crate) memory: Option<std::sync::Arc<dyn DmaMemory>>,
}

impl VfioUserClient {
    /// Connects and negotiates the protocol version. `timeout` bounds every
    /// request, this one included: a hung server fails the request, it does
    /// not hang the caller. `memory` serves the server's DMA_READ /
    /// DMA_WRITE within what it has mapped (refused when `None`).
    pub fn connect(
        socket: &Path,
        timeout: Duration,
        memory: Option<std::sync::Arc<dyn DmaMemory>>,
    ) -> Result<Self, VfioUserError> {
        let stream = UnixStream::connect(socket)
            .map_err(|e| VfioUserError::Connect(socket.display().to_string(), e))?;
        let mut client = VfioUserClient::over(stream, timeout, memory);
        let mut payload = Vec::with_capacity(4 + CAPABILITIES.len() + 1);
        payload.extend_from_slice(&0u16.to_le_bytes()); // major
        payload.extend_from_slice(&1u16.to_le_bytes()); // minor
        payload.extend_from_slice(CAPABILITIES.as_bytes());
        payload.push(0);
        let reply = client.request(CMD_VERSION, &payload, &[])?;
        if reply.len() < 4 || reply[0..2] != [0, 0] {
            client.close("malformed VERSION reply");
            return Err(VfioUserError::Protocol("VERSION"));
        }
        client.max_dma_maps = max_dma_maps(&reply).inspect_err(|_| {
            client.close("malformed VERSION capabilities");
        })?;
        Ok(client)
    }

    pub(crate) fn over(
        stream: UnixStream,
        timeout: Duration,
        memory: Option<std::sync::Arc<dyn DmaMemory>>,
    ) -> Self {
        VfioUserClient {
            transport: Transport::new(stream, timeout),
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            mapped: BTreeMap::new(),
            memory,
        }
    }

    /// Most mappings the server accepts at once (from its VERSION reply).
    pub fn max_dma_maps(&self) -> u64 {
        self.max_dma_maps
    }

    /// Why the connection was closed, if it was.
    pub fn closed_reason(&self) -> Option<&str> {
        self.transport.closed_reason()
    }

    /// A second handle on the socket, to wait on without holding the
    /// client (`None` once closed).
    pub fn watch_handle(&self) -> Option<UnixStream> {
        self.transport.watch_handle()
    }

    /// Shuts the socket down and closes it: the server sees EOF at once
    /// and, following the spec, drops every mapping. Idempotent.
    pub fn close(&mut self, reason: &str) {
        if self.transport.close(reason) {
            self.mapped.clear();
        }
    }

    /// Maps `size` bytes of `fd` at `offset` to `iova`, read-write.
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        fd: RawFd,
        offset: u64,
    ) -> Result<(), DmaRequestError> {
        self.map_range(iova, size, Some((fd, offset)))
    }

    /// Maps `iova..iova+size` read-write without an fd: the server reaches
    /// it only by DMA_READ / DMA_WRITE, which this client serves inside
    /// its current mappings.
    pub fn dma_map_for_messages(&mut self, iova: u64, size: u64) -> Result<(), DmaRequestError> {
        self.map_range(iova, size, None)
    }

    fn map_range(
        &mut self,
        iova: u64,
        size: u64,
        backing: Option<(RawFd, u64)>,
    ) -> Result<(), DmaRequestError> {
        self.one(DmaRequest::Map {
            iova,
            size,
            backing,
        })
    }

    /// Unmaps exactly an earlier mapping. Any failure, a refusal included,
    /// closes the connection: the range could otherwise stay reachable.
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), DmaRequestError> {
        self.one(DmaRequest::Unmap { iova, size })
    }

    /// A batch of one request: the same rules, one code path.
    fn one(&mut self, request: DmaRequest) -> Result<(), DmaRequestError> {
        if let Err(e) = self.transport.check_open() {
            return Err(DmaRequestError::Closed {
                reason: self.closed_reason().unwrap_or_default().to_string(),
                source: e,
            });
        }
        let batch = self.start_batch(vec![request]);
        self.finish_batch(batch)
            .pop()
            .expect("one result per request")
    }

    /// DEVICE_GET_INFO: the device's kind and how many regions and irq
    /// indices it has.
    pub fn device_info(&mut self) -> Result<DeviceInfo, VfioUserError> {
        let mut payload = [0u8; 16];
        payload[0..4].copy_from_slice(&16u32.to_le_bytes()); // argsz
        let reply = self.request(CMD_DEVICE_GET_INFO, &payload, &[])?;
        if reply.len() < 16 {
            return Err(self.protocol_failure("DEVICE_GET_INFO"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(reply[at..at + 4].try_into().expect("4 bytes"));
        Ok(DeviceInfo {
            flags: u32_at(4),
            regions: u32_at(8),
            irqs: u32_at(12),
        })
    }

    /// Size of region `index` (DEVICE_GET_REGION_INFO); 0 when absent.
    /// Whether the server is a PCI function: DEVICE_GET_INFO says PCI and
    /// its configuration space region is not empty. A server that refuses
    /// either question is a DMA target only.
    pub fn is_pci_function(&mut self) -> Result<bool, VfioUserError> {
        let info = match self.device_info() {
            Ok(info) => info,
            Err(VfioUserError::Refused { .. }) => return Ok(false),
            Err(e) => return Err(e),
        };
        if !info.claims_pci_function() {
            return Ok(false);
        }
        match self.region_size(CONFIG_REGION) {
            Ok(size) => Ok(size > 0),
            Err(VfioUserError::Refused { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn region_size(&mut self, index: u32) -> Result<u64, VfioUserError> {
        Ok(self.region_info(index)?.size)
    }

    /// DEVICE_GET_REGION_INFO, with the mmappable areas and the fd to map
    /// them from, when the server offers them.
    pub fn region_info(&mut self, index: u32) -> Result<RegionInfo, VfioUserError> {
        let mut payload = [0u8; 32];
        payload[0..4].copy_from_slice(&REGION_INFO_ARGSZ.to_le_bytes());
        payload[8..12].copy_from_slice(&index.to_le_bytes());
        let reply = self.request(CMD_DEVICE_GET_REGION_INFO, &payload, &[])?;
        let fd = self.transport.take_received_fd();
        if reply.len() < 32 || reply[8..12] != index.to_le_bytes() {
            return Err(self.protocol_failure("DEVICE_GET_REGION_INFO"));
        }
        let flags = u32::from_le_bytes(reply[4..8].try_into().expect("4 bytes"));
        let size = u64_at(&reply, 16);
        let mut mmap_areas = if flags & REGION_INFO_FLAG_CAPS != 0 {
            match sparse_mmap_areas(&reply, size) {
                Some(areas) => areas,
                None => return Err(self.protocol_failure("DEVICE_GET_REGION_INFO")),
            }
        } else {
            Vec::new()
        };
        if flags & REGION_INFO_FLAG_MMAP == 0 || fd.is_none() {
            mmap_areas.clear();
        } else if mmap_areas.is_empty()
            && flags & REGION_INFO_FLAG_CAPS == 0
            && size.is_multiple_of(4096)
        {
            mmap_areas.push((0, size));
        }
        Ok(RegionInfo {
            size,
            flags,
            offset: u64_at(&reply, 24),
            mmap_areas,
            fd,
        })
    }

    /// Reads `data.len()` bytes of region `index` at `offset` (REGION_READ).
    pub fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), VfioUserError> {
        let payload = region_access(index, offset, data.len())?;
        let reply = self.request(CMD_REGION_READ, &payload, &[])?;
        if reply.len() != 16 + data.len() || reply[..16] != payload[..] {
            return Err(self.protocol_failure("REGION_READ"));
        }
        data.copy_from_slice(&reply[16..]);
        Ok(())
    }

    /// Writes `data` to region `index` at `offset` (REGION_WRITE).
    pub fn region_write(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), VfioUserError> {
        let head = region_access(index, offset, data.len())?;
        let mut payload = Vec::with_capacity(16 + data.len());
        payload.extend_from_slice(&head);
        payload.extend_from_slice(data);
        let reply = self.request(CMD_REGION_WRITE, &payload, &[])?;
        if reply.len() < 16 || reply[..16] != head[..] {
            return Err(self.protocol_failure("REGION_WRITE"));
        }
        Ok(())
    }

    /// How many interrupts irq index `index` has (DEVICE_GET_IRQ_INFO).
    pub fn irq_count(&mut self, index: u32) -> Result<u32, VfioUserError> {
        let mut payload = [0u8; 16];
        payload[0..4].copy_from_slice(&16u32.to_le_bytes()); // argsz
        payload[8..12].copy_from_slice(&index.to_le_bytes());
        let reply = self.request(CMD_DEVICE_GET_IRQ_INFO, &payload, &[])?;
        if reply.len() < 16 || reply[8..12] != index.to_le_bytes() {
            return Err(self.protocol_failure("DEVICE_GET_IRQ_INFO"));
        }
        Ok(u32::from_le_bytes(
            reply[12..16].try_into().expect("4 bytes"),
        ))
    }

    /// Gives the server one eventfd per vector of irq index `index`, from
    /// vector 0 on; no fds takes every trigger back (DEVICE_SET_IRQS).
    pub fn set_irq_eventfds(&mut self, index: u32, fds: &[RawFd]) -> Result<(), VfioUserError> {
        let flags = IRQ_SET_ACTION_TRIGGER
            | if fds.is_empty() {
                IRQ_SET_DATA_NONE
            } else {
                IRQ_SET_DATA_EVENTFD
            };
        let mut payload = [0u8; 20];
        payload[0..4].copy_from_slice(&20u32.to_le_bytes()); // argsz
        payload[4..8].copy_from_slice(&flags.to_le_bytes());
        payload[8..12].copy_from_slice(&index.to_le_bytes());
        payload[16..20]
            .copy_from_slice(&u32::try_from(fds.len()).unwrap_or(u32::MAX).to_le_bytes());
        self.request(CMD_DEVICE_SET_IRQS, &payload, fds)?;
        Ok(())
    }

    /// DEVICE_RESET.
    pub fn reset(&mut self) -> Result<(), VfioUserError> {
        self.request(CMD_DEVICE_RESET, &[], &[])?;
        Ok(())
    }

    /// A well-framed reply whose content is wrong: the stream may be out
    /// of step with the server, so the connection goes.
    fn protocol_failure(&mut self, command: &'static str) -> VfioUserError {
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
        self.transport.check_open()?;
        drop(self.transport.take_received_fd());
        let deadline = self.transport.deadline();
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

    fn exchange(
        &mut self,
        command: u16,
        payload: &[u8],
        fds: &[RawFd],
        deadline: Instant,
    ) -> Result<Vec<u8>, VfioUserError> {
        let id = self.transport.next_id();
        let header = Header {
            id,
            command,
            size: u32::try_from(HEADER_SIZE + payload.len())
                .expect("a request is at most MAX_MESSAGE bytes"),
            flags: 0,
            error: 0,
        };
        let mut message = Vec::with_capacity(HEADER_SIZE + payload.len());
        message.extend_from_slice(&header.encode());
        message.extend_from_slice(payload);
        self.transport.send(&message, fds)?;

        let name = command_name(command);
        loop {
            let incoming = self.transport.read_header(deadline, name)?;
            let body = self.transport.read_body(&incoming, deadline, name)?;
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
