//! The client side of the vfio-user protocol: version negotiation, DMA_MAP
//! (with the memory's fd), DMA_UNMAP, the DMA_READ / DMA_WRITE requests a
//! server may send while it owes a reply, and what the PCI function model
//! needs (DEVICE_GET_REGION_INFO, REGION_READ / REGION_WRITE,
//! DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS with eventfds, DEVICE_RESET).
//!
//! Ours rather than `vfio_user::Client` (0.1.7) because that client ignores
//! the error flag of a DMA_MAP reply (a refused map looks like success) and
//! reads an error reply to DMA_UNMAP as a full DMA_UNMAP reply, blocking
//! forever; it also has no timeout, and a conversion runs on a vCPU thread.
//!
//! Faults: every request has an absolute deadline. A reply that does not
//! come in time, a malformed or out-of-order reply, EOF, or an error reply
//! to DMA_UNMAP closes the connection at once: a spec-following server then
//! drops every mapping, and no late reply can map anything. A closed client
//! refuses every later request with the reason it was closed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const CMD_VERSION: u16 = 1;
const CMD_DMA_MAP: u16 = 2;
const CMD_DMA_UNMAP: u16 = 3;
const CMD_DEVICE_GET_INFO: u16 = 4;
const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
const CMD_DEVICE_SET_IRQS: u16 = 8;
const CMD_REGION_READ: u16 = 9;
const CMD_REGION_WRITE: u16 = 10;
const CMD_DEVICE_RESET: u16 = 13;
const IRQ_SET_DATA_NONE: u32 = 1 << 0;
const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// Largest region access forwarded in one message (a BAR or config access
/// is at most 8 bytes; this bounds what a caller can ask for).
pub const MAX_REGION_ACCESS: usize = 4096;
const CMD_DMA_READ: u16 = 11;
const CMD_DMA_WRITE: u16 = 12;
const HEADER_SIZE: usize = 16;
const FLAG_TYPE_MASK: u32 = 0xf;
const FLAG_COMMAND: u32 = 0;
const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
const DMA_READ_WRITE: u32 = 0b11;
/// Largest DMA_READ / DMA_WRITE transfer we accept; advertised in VERSION.
const MAX_DATA_XFER: usize = 1 << 20;
/// A message larger than this is a protocol error, not something to allocate.
const MAX_MESSAGE: usize = HEADER_SIZE + 16 + MAX_DATA_XFER;
/// The spec's value when the server's VERSION reply does not say.
pub const DEFAULT_MAX_DMA_MAPS: u64 = 65535;
const CAPABILITIES: &str = r#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576}}"#;
const EFAULT: u32 = 14;
const EINVAL: u32 = 22;
const ENOSYS: u32 = 38;

#[derive(Debug, thiserror::Error)]
pub enum VfioUserError {
    #[error("cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("socket I/O")]
    Io(#[source] std::io::Error),
    #[error("cannot pass the memory fd")]
    SendFd(#[source] vmm_sys_util::errno::Error),
    #[error("no reply to {command} within {ms} ms")]
    Timeout { command: &'static str, ms: u128 },
    #[error("the server closed the connection")]
    Eof,
    #[error("the server refused {command} (errno {errno})")]
    Refused { command: &'static str, errno: u32 },
    #[error("malformed reply to {0}")]
    Protocol(&'static str),
    #[error("a region access of {0} bytes (1..=4096)")]
    AccessSize(usize),
    #[error("the connection was closed after an earlier failure: {0}")]
    Closed(String),
}

/// Guest memory as a server's DMA_READ / DMA_WRITE reaches it.
pub trait DmaMemory: Send + Sync {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String>;
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), String>;
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
        CMD_DEVICE_GET_INFO => "DEVICE_GET_INFO",
        CMD_DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        CMD_DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        CMD_DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        CMD_REGION_READ => "REGION_READ",
        CMD_REGION_WRITE => "REGION_WRITE",
        CMD_DEVICE_RESET => "DEVICE_RESET",
        _ => "request",
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The 16-byte head of REGION_READ / REGION_WRITE.
fn region_access(index: u32, offset: u64, len: usize) -> Result<[u8; 16], VfioUserError> {
    if len == 0 || len > MAX_REGION_ACCESS {
        return Err(VfioUserError::AccessSize(len));
    }
    let mut head = [0u8; 16];
    head[0..8].copy_from_slice(&offset.to_le_bytes());
    head[8..12].copy_from_slice(&index.to_le_bytes());
    head[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(head)
}

/// `max_dma_maps` from a VERSION reply's JSON, or the spec's default.
fn max_dma_maps(reply: &[u8]) -> Result<u64, VfioUserError> {
    let json = reply.get(4..).unwrap_or_default();
    let json = json.split(|&b| b == 0).next().unwrap_or_default();
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(DEFAULT_MAX_DMA_MAPS);
    }
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|_| VfioUserError::Protocol("VERSION"))?;
    match value.pointer("/capabilities/max_dma_maps") {
        None => Ok(DEFAULT_MAX_DMA_MAPS),
        Some(n) => n
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or(VfioUserError::Protocol("VERSION")),
    }
}

pub struct VfioUserClient {
    /// `None` once closed; `closed` says why.
    stream: Option<UnixStream>,
    closed: Option<String>,
    next_id: u16,
    timeout: Duration,
    max_dma_maps: u64,
    /// What the server has been given, so its DMA_READ / DMA_WRITE reach
    /// exactly that: IOVA -> size.
    mapped: BTreeMap<u64, u64>,
    memory: Option<std::sync::Arc<dyn DmaMemory>>,
    /// An fd that came with the current request's reply (a region's mmap
    /// fd); dropped, and so closed, unless the request takes it.
    received_fd: Option<std::fs::File>,
}

/// What DEVICE_GET_INFO says of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub flags: u32,
    pub regions: u32,
    pub irqs: u32,
}

impl DeviceInfo {
    pub const FLAG_RESET: u32 = 1 << 0;
    pub const FLAG_PCI: u32 = 1 << 1;

    /// Whether the device says it is a PCI function and has a region for
    /// its configuration space.
    pub fn claims_pci_function(&self) -> bool {
        self.flags & Self::FLAG_PCI != 0 && self.regions > pci::CONFIG_REGION
    }
}

/// What DEVICE_GET_REGION_INFO says of a region.
#[derive(Debug, Default)]
pub struct RegionInfo {
    pub size: u64,
    pub flags: u32,
    /// Where the region starts in `fd` for mmap.
    pub offset: u64,
    /// Mmappable (offset, size) areas inside the region (sparse-mmap
    /// capability), or the whole region when it is mmappable without one.
    pub mmap_areas: Vec<(u64, u64)>,
    pub fd: Option<std::fs::File>,
}

const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
/// Room for the capability chain of a region (a sparse-mmap list of up to
/// 60 areas).
const REGION_INFO_ARGSZ: u32 = 1024;

/// The sparse-mmap areas in a DEVICE_GET_REGION_INFO reply (`reply` starts
/// at the region info); areas outside the region or not page-aligned are
/// dropped, a malformed chain is a protocol error.
fn sparse_mmap_areas(reply: &[u8], size: u64) -> Option<Vec<(u64, u64)>> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(reply.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(reply.get(at..at + 8)?.try_into().ok()?))
    };
    let mut next = u32_at(12)? as usize;
    let mut areas = Vec::new();
    // A chain that loops ends here: each header is at least 8 bytes on.
    for _ in 0..(reply.len() / 8) {
        if next == 0 {
            return Some(areas);
        }
        let header = u32_at(next)?;
        let following = u32_at(next + 4)? as usize;
        if header as u16 == REGION_INFO_CAP_SPARSE_MMAP {
            let count = u32_at(next + 8)? as usize;
            for i in 0..count.min(reply.len() / 16) {
                let at = next + 16 + i * 16;
                let (offset, len) = (u64_at(at)?, u64_at(at + 8)?);
                let aligned = offset.is_multiple_of(4096) && len.is_multiple_of(4096) && len > 0;
                if aligned && offset.checked_add(len).is_some_and(|end| end <= size) {
                    areas.push((offset, len));
                }
            }
        }
        if following != 0 && following <= next {
            return None;
        }
        next = following;
    }
    None
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

    fn over(
        stream: UnixStream,
        timeout: Duration,
        memory: Option<std::sync::Arc<dyn DmaMemory>>,
    ) -> Self {
        // Sends are bounded too: a stopped server stops draining its socket.
        let _ = stream.set_write_timeout(Some(timeout));
        VfioUserClient {
            stream: Some(stream),
            closed: None,
            next_id: 0,
            timeout,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
            mapped: BTreeMap::new(),
            memory,
            received_fd: None,
        }
    }

    /// Most mappings the server accepts at once (from its VERSION reply).
    pub fn max_dma_maps(&self) -> u64 {
        self.max_dma_maps
    }

    /// Why the connection was closed, if it was.
    pub fn closed_reason(&self) -> Option<&str> {
        self.closed.as_deref()
    }

    /// A second handle on the socket, to wait on without holding the
    /// client (`None` once closed).
    pub fn watch_handle(&self) -> Option<UnixStream> {
        self.stream.as_ref()?.try_clone().ok()
    }

    /// Answers one DMA_READ / DMA_WRITE the server sent while no request of
    /// ours was in flight, if one is waiting (message-based DMA from a
    /// server's own threads). Anything else arriving then is out of step:
    /// the connection goes.
    pub fn serve_pending(&mut self) -> Result<(), VfioUserError> {
        if let Some(why) = &self.closed {
            return Err(VfioUserError::Closed(why.clone()));
        }
        let mut waiting = libc::pollfd {
            fd: self.stream().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd for a socket we own, no wait.
        if unsafe { libc::poll(&mut waiting, 1, 0) } <= 0 {
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        let result = self.serve_one(deadline);
        if let Err(e) = &result {
            self.close(&format!(
                "serving the server's request failed: {}",
                crate::error_chain(e)
            ));
        }
        result
    }

    fn serve_one(&mut self, deadline: Instant) -> Result<(), VfioUserError> {
        let mut raw = [0u8; HEADER_SIZE];
        self.read_header(&mut raw, deadline, "a server request")?;
        // Nothing comes with a server's DMA request.
        self.received_fd = None;
        let incoming = Header::decode(&raw);
        let size = incoming.size as usize;
        if !(HEADER_SIZE..=MAX_MESSAGE).contains(&size)
            || incoming.flags & FLAG_TYPE_MASK != FLAG_COMMAND
        {
            return Err(VfioUserError::Protocol("a server request"));
        }
        let mut body = vec![0u8; size - HEADER_SIZE];
        self.read_full(&mut body, deadline, "a server request")?;
        self.serve(incoming, &body)
    }

    /// Shuts the socket down and closes it: the server sees EOF at once
    /// and, following the spec, drops every mapping. Idempotent.
    pub fn close(&mut self, reason: &str) {
        if let Some(stream) = self.stream.take() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            self.closed = Some(reason.to_string());
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
    ) -> Result<(), VfioUserError> {
        self.map_range(iova, size, Some((fd, offset)))
    }

    /// Maps `iova..iova+size` read-write without an fd: the server reaches
    /// it only by DMA_READ / DMA_WRITE, which this client serves inside
    /// its current mappings.
    pub fn dma_map_for_messages(&mut self, iova: u64, size: u64) -> Result<(), VfioUserError> {
        self.map_range(iova, size, None)
    }

    fn map_range(
        &mut self,
        iova: u64,
        size: u64,
        backing: Option<(RawFd, u64)>,
    ) -> Result<(), VfioUserError> {
        let (fds, offset) = match &backing {
            Some((fd, offset)) => (std::slice::from_ref(fd), *offset),
            None => (&[][..], 0),
        };
        let mut payload = [0u8; 32];
        payload[0..4].copy_from_slice(&32u32.to_le_bytes()); // argsz
        payload[4..8].copy_from_slice(&DMA_READ_WRITE.to_le_bytes());
        payload[8..16].copy_from_slice(&offset.to_le_bytes());
        payload[16..24].copy_from_slice(&iova.to_le_bytes());
        payload[24..32].copy_from_slice(&size.to_le_bytes());
        self.request(CMD_DMA_MAP, &payload, fds)?;
        self.mapped.insert(iova, size);
        Ok(())
    }

    /// Unmaps exactly an earlier mapping. Any failure, a refusal included,
    /// closes the connection: the range could otherwise stay reachable.
    pub fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), VfioUserError> {
        let mut payload = [0u8; 24];
        payload[0..4].copy_from_slice(&24u32.to_le_bytes()); // argsz
        payload[8..16].copy_from_slice(&iova.to_le_bytes());
        payload[16..24].copy_from_slice(&size.to_le_bytes());
        match self.request(CMD_DMA_UNMAP, &payload, &[]) {
            Ok(_) => {
                self.mapped.remove(&iova);
                Ok(())
            }
            Err(e) => {
                self.close(&format!("DMA_UNMAP of {iova:#x}+{size:#x} failed: {e}"));
                Err(e)
            }
        }
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
        match self.region_size(pci::CONFIG_REGION) {
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
        let fd = self.received_fd.take();
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
        payload[16..20].copy_from_slice(&(fds.len() as u32).to_le_bytes());
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
        self.close(&crate::error_chain(&e));
        e
    }

    fn request(
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
                VfioUserError::Timeout { .. } | VfioUserError::Protocol(_) => {
                    Some(crate::error_chain(e))
                }
                _ => Some(format!(
                    "{} failed: {}",
                    command_name(command),
                    crate::error_chain(e)
                )),
            };
            if let Some(reason) = reason {
                self.close(&reason);
            }
        }
        result
    }

    fn stream(&self) -> &UnixStream {
        self.stream.as_ref().expect("checked open by request()")
    }

    fn send(&self, message: &[u8], fds: &[RawFd]) -> Result<(), VfioUserError> {
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

    /// Reads a message header; an fd sent with it (SCM_RIGHTS travels with
    /// a message's first byte) is kept in `received_fd`.
    fn read_header(
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
    fn serve(&mut self, request: Header, body: &[u8]) -> Result<(), VfioUserError> {
        let answer = self.dma_access(request.command, body);
        let (flags, error, payload) = match answer {
            Ok(payload) => (FLAG_REPLY, 0, payload),
            Err(errno) => (FLAG_REPLY | FLAG_ERROR, errno, Vec::new()),
        };
        let reply = Header {
            id: request.id,
            command: request.command,
            size: (HEADER_SIZE + payload.len()) as u32,
            flags,
            error,
        };
        let mut message = Vec::with_capacity(HEADER_SIZE + payload.len());
        message.extend_from_slice(&reply.encode());
        message.extend_from_slice(&payload);
        self.send(&message, &[])
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
            memory.read(addr, &mut reply[16..]).map_err(|_| EFAULT)?;
        } else {
            let data = body.get(16..16 + len).ok_or(EINVAL)?;
            memory.write(addr, data).map_err(|_| EFAULT)?;
        }
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::thread::JoinHandleExt;

    use super::*;

    extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

    #[test]
    fn a_pci_function_needs_the_pci_flag_and_a_configuration_region() {
        let info = |flags, regions| DeviceInfo {
            flags,
            regions,
            irqs: 0,
        };
        let pci = DeviceInfo::FLAG_PCI;
        assert!(info(pci, 9).claims_pci_function());
        assert!(info(pci | DeviceInfo::FLAG_RESET, 8).claims_pci_function());
        // Region 7 is the configuration space: 8 regions at least.
        assert!(!info(pci, 7).claims_pci_function());
        assert!(!info(DeviceInfo::FLAG_RESET, 9).claims_pci_function());
        assert!(!info(0, 9).claims_pci_function());
    }

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
        let mut client = VfioUserClient::over(client_end, Duration::from_secs(5), None);
        client.next_id = 7;
        let mapper = std::thread::spawn(move || {
            let result = client.dma_map(0x1000, 0x1000, memory_fd, 0);
            (
                result.map_err(|e| e.to_string()),
                client.closed_reason().map(str::to_string),
            )
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
        assert_eq!(mapper.join().unwrap(), (Ok(()), None));
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

    /// A server on the other end of a socket pair that answers each
    /// request with what `script` returns for it (raw bytes), then stops.
    fn scripted(
        script: impl Fn(Header, &[u8]) -> Vec<u8> + Send + 'static,
    ) -> (VfioUserClient, std::thread::JoinHandle<()>) {
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            loop {
                let mut raw = [0u8; HEADER_SIZE];
                if server_end.read_exact(&mut raw).is_err() {
                    return;
                }
                let header = Header::decode(&raw);
                let mut body = vec![0u8; header.size as usize - HEADER_SIZE];
                server_end.read_exact(&mut body).unwrap();
                let answer = script(header, &body);
                if answer.is_empty() || server_end.write_all(&answer).is_err() {
                    return;
                }
            }
        });
        let client = VfioUserClient::over(client_end, Duration::from_millis(300), None);
        (client, server)
    }

    fn reply_to(request: Header, flags: u32, error: u32, body: &[u8]) -> Vec<u8> {
        let mut out = Header {
            id: request.id,
            command: request.command,
            size: (HEADER_SIZE + body.len()) as u32,
            flags,
            error,
        }
        .encode()
        .to_vec();
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn a_pci_function_is_a_pci_device_with_a_configuration_space() {
        // What DEVICE_GET_INFO answers (None: refused) and the size of the
        // configuration region (None: refused).
        let ask = |info: Option<u32>, config: Option<u64>| {
            let (mut client, _server) = scripted(move |h, body| match (h.command, info, config) {
                (CMD_DEVICE_GET_INFO, Some(flags), _) => {
                    let mut reply = [0u8; 16];
                    reply[0] = 16;
                    reply[4..8].copy_from_slice(&flags.to_le_bytes());
                    reply[8] = 9;
                    reply_to(h, FLAG_REPLY, 0, &reply)
                }
                (CMD_DEVICE_GET_REGION_INFO, _, Some(size)) if body[8] == 7 => {
                    let mut reply = body.to_vec();
                    reply[16..24].copy_from_slice(&size.to_le_bytes());
                    reply_to(h, FLAG_REPLY, 0, &reply)
                }
                (CMD_DEVICE_GET_INFO | CMD_DEVICE_GET_REGION_INFO, _, _) => {
                    reply_to(h, FLAG_REPLY | FLAG_ERROR, ENOSYS, &[])
                }
                _ => Vec::new(),
            });
            client.is_pci_function()
        };
        let pci = DeviceInfo::FLAG_PCI;
        assert!(ask(Some(pci), Some(256)).unwrap());
        assert!(!ask(Some(pci), Some(0)).unwrap(), "no configuration space");
        assert!(!ask(Some(pci), None).unwrap(), "its size refused");
        assert!(
            !ask(Some(DeviceInfo::FLAG_RESET), Some(256)).unwrap(),
            "not PCI"
        );
        assert!(!ask(None, Some(256)).unwrap(), "the question refused");
        // A server that stops answering is an error, not a "no".
        let (mut client, _server) = scripted(|_, _| Vec::new());
        assert!(client.is_pci_function().is_err());
    }

    #[test]
    fn region_and_irq_requests_carry_their_fields_and_check_the_replies() {
        let (mut client, server) = scripted(|h, body| match h.command {
            CMD_DEVICE_GET_INFO => reply_to(
                h,
                FLAG_REPLY,
                0,
                &[16, 0, 0, 0, 3, 0, 0, 0, 9, 0, 0, 0, 5, 0, 0, 0],
            ),
            CMD_DEVICE_GET_REGION_INFO => {
                let mut info = body.to_vec();
                info[16..24].copy_from_slice(&0x1000u64.to_le_bytes());
                reply_to(h, FLAG_REPLY, 0, &info)
            }
            CMD_REGION_READ => {
                let count = u32::from_le_bytes(body[12..16].try_into().unwrap());
                let mut reply = body[..16].to_vec();
                reply.extend((0..count).map(|i| i as u8 + body[0]));
                reply_to(h, FLAG_REPLY, 0, &reply)
            }
            CMD_REGION_WRITE if body[16..] == [9, 9] => reply_to(h, FLAG_REPLY, 0, &body[..16]),
            CMD_DEVICE_GET_IRQ_INFO => {
                let mut info = body.to_vec();
                info[12..16].copy_from_slice(&3u32.to_le_bytes());
                reply_to(h, FLAG_REPLY, 0, &info)
            }
            CMD_DEVICE_SET_IRQS => {
                let flags = u32::from_le_bytes(body[4..8].try_into().unwrap());
                let count = u32::from_le_bytes(body[16..20].try_into().unwrap());
                let ok = (flags, count) == (IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE, 0);
                reply_to(
                    h,
                    if ok {
                        FLAG_REPLY
                    } else {
                        FLAG_REPLY | FLAG_ERROR
                    },
                    22,
                    &[],
                )
            }
            CMD_DEVICE_RESET => reply_to(h, FLAG_REPLY | FLAG_ERROR, ENOSYS, &[]),
            _ => Vec::new(),
        });
        let info = client.device_info().unwrap();
        assert_eq!((info.flags, info.regions, info.irqs), (3, 9, 5));
        assert_eq!(client.region_size(7).unwrap(), 0x1000);
        let mut data = [0u8; 4];
        client.region_read(0, 0x10, &mut data).unwrap();
        assert_eq!(data, [0x10, 0x11, 0x12, 0x13]);
        client.region_write(0, 0x20, &[9, 9]).unwrap();
        assert_eq!(client.irq_count(2).unwrap(), 3);
        client.set_irq_eventfds(2, &[]).unwrap();
        // A refused reset is an answer, not a broken connection.
        assert!(matches!(
            client.reset(),
            Err(VfioUserError::Refused { errno: 38, .. })
        ));
        assert!(matches!(
            client.region_read(0, 0, &mut [0u8; 0]),
            Err(VfioUserError::AccessSize(0))
        ));
        assert!(matches!(
            client.region_write(0, 0, &vec![0u8; MAX_REGION_ACCESS + 1]),
            Err(VfioUserError::AccessSize(_))
        ));
        assert!(client.closed_reason().is_none());
        drop(client);
        server.join().unwrap();
    }

    /// (offset, size) of mmappable areas.
    type Areas = Vec<(u64, u64)>;
    /// A capability: its id, the offset of the next one, its areas.
    type Capability = (u16, u32, Areas);

    /// A DEVICE_GET_REGION_INFO reply: the 32-byte info (index, flags,
    /// cap_offset, size, offset) and, at `caps`, a capability chain.
    fn region_reply(index: u32, flags: u32, size: u64, caps: &[Capability]) -> Vec<u8> {
        let mut reply = vec![0u8; 32];
        reply[0..4].copy_from_slice(&REGION_INFO_ARGSZ.to_le_bytes());
        reply[4..8].copy_from_slice(&flags.to_le_bytes());
        reply[8..12].copy_from_slice(&index.to_le_bytes());
        reply[16..24].copy_from_slice(&size.to_le_bytes());
        reply[24..32].copy_from_slice(&0x7000u64.to_le_bytes());
        if !caps.is_empty() {
            reply[12..16].copy_from_slice(&32u32.to_le_bytes());
        }
        for (i, (id, next, areas)) in caps.iter().enumerate() {
            let at = reply.len();
            let mut cap = vec![0u8; 16];
            cap[0..4].copy_from_slice(&u32::from(*id).to_le_bytes());
            cap[4..8].copy_from_slice(&next.to_le_bytes());
            cap[8..12].copy_from_slice(&(areas.len() as u32).to_le_bytes());
            for (offset, len) in areas {
                cap.extend_from_slice(&offset.to_le_bytes());
                cap.extend_from_slice(&len.to_le_bytes());
            }
            reply.extend_from_slice(&cap);
            debug_assert!(i > 0 || at == 32);
        }
        reply
    }

    #[test]
    fn region_accesses_may_be_as_large_as_the_limit_and_no_larger() {
        assert!(region_access(0, 0, MAX_REGION_ACCESS).is_ok());
        assert!(matches!(
            region_access(0, 0, MAX_REGION_ACCESS + 1),
            Err(VfioUserError::AccessSize(_))
        ));
        let head = region_access(3, 0x1234, 8).unwrap();
        assert_eq!(u64_at(&head, 0), 0x1234);
        assert_eq!(head[8..16], [3, 0, 0, 0, 8, 0, 0, 0]);
    }

    #[test]
    fn sparse_mmap_areas_keep_only_whole_pages_inside_the_region() {
        let size = 0x10000;
        let areas = vec![
            (0x0, 0x1000),    // kept
            (0x1000, 0),      // empty
            (0x2001, 0x1000), // unaligned offset
            (0x3000, 0x800),  // unaligned length
            (0xf000, 0x1000), // ends exactly at the region's end: kept
            (0xf000, 0x2000), // past the end
            (!0xfff, 0x1000), // overflows
            (0x4000, 0x3000), // kept
        ];
        let reply = region_reply(0, 0, size, &[(REGION_INFO_CAP_SPARSE_MMAP, 0, areas)]);
        assert_eq!(
            sparse_mmap_areas(&reply, size),
            Some(vec![(0x0, 0x1000), (0xf000, 0x1000), (0x4000, 0x3000)])
        );
        // No chain at all: nothing, and that is not an error.
        assert_eq!(
            sparse_mmap_areas(&region_reply(0, 0, size, &[]), size),
            Some(vec![])
        );
        // Another capability first, the sparse list after it.
        let first_len = 16u32;
        let reply = region_reply(
            0,
            0,
            size,
            &[
                (7, 32 + first_len, vec![]),
                (REGION_INFO_CAP_SPARSE_MMAP, 0, vec![(0x2000, 0x1000)]),
            ],
        );
        assert_eq!(
            sparse_mmap_areas(&reply, size),
            Some(vec![(0x2000, 0x1000)])
        );
        // A chain pointing back (a loop) or past the end is malformed.
        let looping = region_reply(0, 0, size, &[(7, 32, vec![])]);
        assert_eq!(sparse_mmap_areas(&looping, size), None);
        let dangling = region_reply(0, 0, size, &[(7, 4096, vec![])]);
        assert_eq!(sparse_mmap_areas(&dangling, size), None);
        // A count larger than what was sent is malformed too.
        let mut truncated = region_reply(
            0,
            0,
            size,
            &[(
                REGION_INFO_CAP_SPARSE_MMAP,
                0,
                vec![(0, 0x1000), (0x1000, 0x1000)],
            )],
        );
        truncated.truncate(truncated.len() - 8);
        assert_eq!(sparse_mmap_areas(&truncated, size), None);
    }

    #[test]
    fn region_info_offers_mmap_only_with_the_flag_and_an_fd() {
        let sparse = |areas: Areas| vec![(REGION_INFO_CAP_SPARSE_MMAP, 0, areas)];
        let both = REGION_INFO_FLAG_MMAP | REGION_INFO_FLAG_CAPS;
        let cases: [(u32, Vec<Capability>, bool, Areas); 7] = [
            // Mmappable, no capability, an fd: the whole region.
            (REGION_INFO_FLAG_MMAP, vec![], true, vec![(0, 0x4000)]),
            // Mmappable but no fd came: nothing to map.
            (REGION_INFO_FLAG_MMAP, vec![], false, vec![]),
            // An fd but no mmap flag: nothing either.
            (0, vec![], true, vec![]),
            // Capabilities: exactly the sparse areas.
            (
                both,
                sparse(vec![(0x1000, 0x1000)]),
                true,
                vec![(0x1000, 0x1000)],
            ),
            // Capabilities without the mmap flag: nothing.
            (
                REGION_INFO_FLAG_CAPS,
                sparse(vec![(0x1000, 0x1000)]),
                true,
                vec![],
            ),
            // A sparse list of nothing usable: nothing, not the whole region.
            (both, sparse(vec![(0x1001, 0x1000)]), true, vec![]),
            // Without the capability flag a chain is not read (even a bad one).
            (
                REGION_INFO_FLAG_MMAP,
                vec![(7, 32, vec![])],
                true,
                vec![(0, 0x4000)],
            ),
        ];
        for (flags, caps, with_fd, expected) in cases {
            let reply = region_reply(2, flags, 0x4000, &caps);
            let (client_end, mut server_end) = UnixStream::pair().unwrap();
            let server = std::thread::spawn(move || {
                let mut raw = [0u8; HEADER_SIZE];
                server_end.read_exact(&mut raw).unwrap();
                let header = Header::decode(&raw);
                let mut body = vec![0u8; header.size as usize - HEADER_SIZE];
                server_end.read_exact(&mut body).unwrap();
                let answer = reply_to(header, FLAG_REPLY, 0, &reply);
                if with_fd {
                    let file = std::fs::File::open("/dev/zero").unwrap();
                    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
                    server_end
                        .send_with_fd(&answer[..], file.as_raw_fd())
                        .unwrap();
                } else {
                    server_end.write_all(&answer).unwrap();
                }
            });
            let mut client = VfioUserClient::over(client_end, Duration::from_secs(5), None);
            let info = client.region_info(2).unwrap();
            server.join().unwrap();
            assert_eq!(info.mmap_areas, expected, "flags {flags:#x}, fd {with_fd}");
            assert_eq!(
                (info.size, info.offset, info.flags),
                (0x4000, 0x7000, flags)
            );
            assert_eq!(info.fd.is_some(), with_fd);
        }
    }

    #[test]
    fn short_and_mismatched_replies_to_device_requests_close_the_connection() {
        type Ask = fn(&mut VfioUserClient) -> Result<(), VfioUserError>;
        type Mangle = fn(Header, &[u8]) -> Vec<u8>;
        let cases: [(&str, Ask, Mangle); 6] = [
            (
                "device info short",
                |c| c.device_info().map(drop),
                |h, _| reply_to(h, FLAG_REPLY, 0, &[16, 0, 0, 0, 3, 0, 0, 0]),
            ),
            (
                "region info short",
                |c| c.region_info(1).map(drop),
                |h, body| reply_to(h, FLAG_REPLY, 0, &body[..24]),
            ),
            (
                "region info malformed chain",
                |c| c.region_info(1).map(drop),
                |h, _| {
                    let reply = region_reply(1, REGION_INFO_FLAG_CAPS, 0x1000, &[(7, 32, vec![])]);
                    reply_to(h, FLAG_REPLY, 0, &reply)
                },
            ),
            (
                "region write short",
                |c| c.region_write(0, 8, &[1]),
                |h, body| reply_to(h, FLAG_REPLY, 0, &body[..8]),
            ),
            (
                "region write other offset",
                |c| c.region_write(0, 8, &[1]),
                |h, body| {
                    let mut head = body[..16].to_vec();
                    head[0] ^= 8;
                    reply_to(h, FLAG_REPLY, 0, &head)
                },
            ),
            (
                "irq info short",
                |c| c.irq_count(2).map(drop),
                |h, body| reply_to(h, FLAG_REPLY, 0, &body[..12]),
            ),
        ];
        for (what, ask, mangle) in cases {
            let (mut client, server) = scripted(mangle);
            let err = ask(&mut client).unwrap_err();
            assert!(matches!(err, VfioUserError::Protocol(_)), "{what}: {err}");
            assert!(client.closed_reason().is_some(), "{what}");
            drop(client);
            server.join().unwrap();
        }
        // A reply for another irq index is refused too.
        let (mut client, server) = scripted(|h, body| {
            let mut info = body.to_vec();
            info[8] ^= 1;
            reply_to(h, FLAG_REPLY, 0, &info)
        });
        assert!(matches!(
            client.irq_count(2),
            Err(VfioUserError::Protocol(_))
        ));
        drop(client);
        server.join().unwrap();
        // A full-size reply is fine (the checks are "at least", not "exactly").
        let (mut client, server) = scripted(|h, _| {
            reply_to(
                h,
                FLAG_REPLY,
                0,
                &[20, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0],
            )
        });
        assert_eq!(client.device_info().unwrap().irqs, 3);
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn a_region_reply_of_the_wrong_shape_closes_the_connection() {
        type Mangle = fn(Header, &[u8]) -> Vec<u8>;
        let cases: [(&str, Mangle); 3] = [
            ("short data", |h, body| {
                reply_to(h, FLAG_REPLY, 0, &body[..16])
            }),
            ("other offset", |h, body| {
                let mut reply = body[..16].to_vec();
                reply[0] ^= 4;
                reply.extend([0u8; 4]);
                reply_to(h, FLAG_REPLY, 0, &reply)
            }),
            ("region info for another index", |h, body| {
                let mut info = body.to_vec();
                info[8] ^= 1;
                reply_to(h, FLAG_REPLY, 0, &info)
            }),
        ];
        for (what, mangle) in cases {
            let (mut client, server) = scripted(mangle);
            let err = if what.starts_with("region info") {
                client.region_size(7).unwrap_err()
            } else {
                client.region_read(0, 8, &mut [0u8; 4]).unwrap_err()
            };
            assert!(matches!(err, VfioUserError::Protocol(_)), "{what}: {err}");
            assert!(client.closed_reason().is_some(), "{what}");
            drop(client);
            server.join().unwrap();
        }
    }

    #[test]
    fn malformed_replies_close_the_connection() {
        type Mangle = fn(Header) -> Vec<u8>;
        let cases: [(&str, Mangle); 5] = [
            ("wrong id", |h| {
                reply_to(Header { id: h.id ^ 1, ..h }, FLAG_REPLY, 0, &[])
            }),
            ("wrong command", |h| {
                reply_to(
                    Header {
                        command: CMD_DMA_UNMAP,
                        ..h
                    },
                    FLAG_REPLY,
                    0,
                    &[],
                )
            }),
            ("no reply flag", |h| reply_to(h, 2, 0, &[])),
            ("oversize", |h| {
                Header {
                    size: (MAX_MESSAGE + 1) as u32,
                    flags: FLAG_REPLY,
                    ..h
                }
                .encode()
                .to_vec()
            }),
            ("undersize", |h| {
                Header {
                    size: 8,
                    flags: FLAG_REPLY,
                    ..h
                }
                .encode()
                .to_vec()
            }),
        ];
        for (what, mangle) in cases {
            let (mut client, server) = scripted(move |h, _| mangle(h));
            let err = client.dma_map(0x1000, 0x1000, 0, 0).unwrap_err();
            assert!(
                matches!(err, VfioUserError::Protocol("DMA_MAP")),
                "{what}: {err}"
            );
            assert!(client.closed_reason().is_some(), "{what}");
            assert!(
                matches!(
                    client.dma_map(0x3000, 0x1000, 0, 0),
                    Err(VfioUserError::Closed(_))
                ),
                "{what}: a closed client sends nothing more"
            );
            server.join().unwrap();
        }
    }

    #[test]
    fn a_refused_map_keeps_the_connection_and_a_refused_unmap_closes_it() {
        let (mut client, server) = scripted(|h, _| match h.command {
            CMD_DMA_MAP if h.id == 0 => reply_to(h, FLAG_REPLY | FLAG_ERROR, 12, &[]),
            _ if h.command == CMD_DMA_UNMAP => reply_to(h, FLAG_REPLY | FLAG_ERROR, 22, &[]),
            _ => reply_to(h, FLAG_REPLY, 0, &[]),
        });
        let err = client.dma_map(0x1000, 0x1000, 0, 0).unwrap_err();
        assert!(matches!(
            err,
            VfioUserError::Refused {
                command: "DMA_MAP",
                errno: 12
            }
        ));
        assert!(client.closed_reason().is_none());
        client.dma_map(0x1000, 0x1000, 0, 0).unwrap();
        let err = client.dma_unmap(0x1000, 0x1000).unwrap_err();
        assert!(matches!(
            err,
            VfioUserError::Refused {
                command: "DMA_UNMAP",
                errno: 22
            }
        ));
        let why = client.closed_reason().unwrap();
        assert!(why.contains("DMA_UNMAP of 0x1000+0x1000"), "{why}");
        server.join().unwrap();
    }

    #[test]
    fn a_silent_server_times_out_within_the_deadline_and_is_closed() {
        let (mut client, server) = scripted(|_, _| Vec::new());
        let started = std::time::Instant::now();
        let err = client.dma_unmap(0x1000, 0x1000).unwrap_err();
        let took = started.elapsed();
        // EOF from the scripted server (it stops) or the deadline.
        assert!(
            matches!(err, VfioUserError::Eof | VfioUserError::Timeout { .. }),
            "{err}"
        );
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert!(client.closed_reason().is_some());
        server.join().unwrap();

        let (client_end, _held_open) = UnixStream::pair().unwrap();
        let mut client = VfioUserClient::over(client_end, Duration::from_millis(200), None);
        let started = std::time::Instant::now();
        let err = client.dma_map(0x1000, 0x1000, 0, 0).unwrap_err();
        assert_eq!(err.to_string(), "no reply to DMA_MAP within 200 ms");
        assert!(started.elapsed() < Duration::from_millis(1000));
        assert_eq!(
            client.closed_reason(),
            Some("no reply to DMA_MAP within 200 ms")
        );
    }

    #[test]
    fn version_limits_are_read_or_defaulted() {
        let reply = |json: &str| {
            let mut r = vec![0, 0, 1, 0];
            r.extend_from_slice(json.as_bytes());
            r.push(0);
            r
        };
        assert_eq!(max_dma_maps(&reply("")).unwrap(), DEFAULT_MAX_DMA_MAPS);
        assert_eq!(
            max_dma_maps(&reply(r#"{"capabilities":{"max_msg_fds":8}}"#)).unwrap(),
            65535
        );
        assert_eq!(
            max_dma_maps(&reply(r#"{"capabilities":{"max_dma_maps":12}}"#)).unwrap(),
            12
        );
        for bad in [
            r#"{"capabilities":{"max_dma_maps":0}}"#,
            r#"{"capabilities":{"max_dma_maps":"many"}}"#,
            "not json",
        ] {
            assert!(max_dma_maps(&reply(bad)).is_err(), "{bad}");
        }
        assert_eq!(max_dma_maps(&[0, 0, 1, 0]).unwrap(), DEFAULT_MAX_DMA_MAPS);
    }

    /// Memory of 64 KiB at GPA 0.
    struct Ram(std::sync::Mutex<Vec<u8>>);

    impl DmaMemory for Ram {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
            let ram = self.0.lock().unwrap();
            buf.copy_from_slice(&ram[gpa as usize..gpa as usize + buf.len()]);
            Ok(())
        }
        fn write(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
            let mut ram = self.0.lock().unwrap();
            ram[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    #[test]
    fn dma_access_reaches_only_mapped_ranges() {
        let ram = std::sync::Arc::new(Ram(std::sync::Mutex::new(vec![0xab; 64 << 10])));
        let (client_end, _server_end) = UnixStream::pair().unwrap();
        let mut client =
            VfioUserClient::over(client_end, Duration::from_secs(1), Some(ram.clone()));
        client.mapped.insert(0x1000, 0x2000);
        let access = |addr: u64, count: u64, data: &[u8]| {
            let mut b = addr.to_le_bytes().to_vec();
            b.extend_from_slice(&count.to_le_bytes());
            b.extend_from_slice(data);
            b
        };
        let read = client
            .dma_access(CMD_DMA_READ, &access(0x1000, 4, &[]))
            .unwrap();
        assert_eq!(&read[16..], &[0xab; 4]);
        // The last byte of the mapping, and one past it.
        assert!(
            client
                .dma_access(CMD_DMA_READ, &access(0x2fff, 1, &[]))
                .is_ok()
        );
        assert_eq!(
            client.dma_access(CMD_DMA_READ, &access(0x2fff, 2, &[])),
            Err(EFAULT)
        );
        assert_eq!(
            client.dma_access(CMD_DMA_READ, &access(0x0fff, 2, &[])),
            Err(EFAULT)
        );
        assert_eq!(
            client.dma_access(CMD_DMA_READ, &access(u64::MAX, 2, &[])),
            Err(EFAULT)
        );
        client
            .dma_access(CMD_DMA_WRITE, &access(0x1008, 2, &[1, 2]))
            .unwrap();
        assert_eq!(ram.0.lock().unwrap()[0x1008..0x100a], [1, 2]);
        assert_eq!(
            client.dma_access(CMD_DMA_WRITE, &access(0x1008, 4, &[1, 2])),
            Err(EINVAL),
            "short data"
        );
        assert_eq!(client.dma_access(CMD_DMA_READ, &[0; 8]), Err(EINVAL));
        assert_eq!(
            client.dma_access(
                CMD_DMA_READ,
                &access(0x1000, (MAX_DATA_XFER + 1) as u64, &[])
            ),
            Err(EINVAL)
        );
        assert_eq!(
            client.dma_access(CMD_DMA_MAP, &access(0x1000, 1, &[])),
            Err(ENOSYS)
        );
        let mut no_memory =
            VfioUserClient::over(UnixStream::pair().unwrap().0, Duration::from_secs(1), None);
        no_memory.mapped.insert(0x1000, 0x2000);
        assert_eq!(
            no_memory.dma_access(CMD_DMA_READ, &access(0x1000, 1, &[])),
            Err(EFAULT)
        );
    }

    /// Connects to a one-shot server whose VERSION reply body is `reply`.
    fn connect_to(reply: Vec<u8>) -> Result<VfioUserClient, VfioUserError> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("vfu-version-{}-{n}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // Ends when the client goes.
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut raw = [0u8; HEADER_SIZE];
            s.read_exact(&mut raw).unwrap();
            let h = Header::decode(&raw);
            assert_eq!(h.command, CMD_VERSION);
            let mut body = vec![0u8; h.size as usize - HEADER_SIZE];
            s.read_exact(&mut body).unwrap();
            assert_eq!(&body[..4], &[0, 0, 1, 0], "we speak 0.1");
            let _ = s.write_all(&reply_to(h, FLAG_REPLY, 0, &reply));
            // Hold the connection until the client is done with it.
            let _ = s.read(&mut [0u8; 1]);
        });
        let client = VfioUserClient::connect(&path, Duration::from_secs(2), None);
        let _ = std::fs::remove_file(&path);
        client
    }

    #[test]
    fn version_is_negotiated_and_checked() {
        let mut good = vec![0, 0, 1, 0];
        good.extend_from_slice(br#"{"capabilities":{"max_dma_maps":7}}"#);
        good.push(0);
        assert_eq!(connect_to(good).unwrap().max_dma_maps(), 7);
        assert_eq!(
            connect_to(vec![0, 0, 1, 0]).unwrap().max_dma_maps(),
            DEFAULT_MAX_DMA_MAPS
        );
        for (what, reply) in [
            ("major 1", vec![1, 0, 0, 0]),
            ("major 256", vec![0, 1, 0, 0]),
            ("short", vec![0, 0, 1]),
            ("bad capabilities", b"\0\0\x01\0{not json}\0".to_vec()),
        ] {
            let err = connect_to(reply).err().unwrap();
            assert_eq!(err.to_string(), "malformed reply to VERSION", "{what}");
        }
    }

    #[test]
    fn a_message_past_the_largest_transfer_is_refused() {
        // A full-size DMA_WRITE fits; one byte more does not.
        let largest = HEADER_SIZE + 16 + (1 << 20);
        assert_eq!(MAX_MESSAGE, largest);
        let (mut client, server) = scripted(move |h, _| {
            Header {
                size: (largest + 1) as u32,
                flags: FLAG_REPLY,
                ..h
            }
            .encode()
            .to_vec()
        });
        let err = client.dma_unmap(0x1000, 0x1000).unwrap_err();
        assert!(matches!(err, VfioUserError::Protocol("DMA_UNMAP")), "{err}");
        server.join().unwrap();
    }

    fn read_request(s: &mut UnixStream) -> Header {
        let mut raw = [0u8; HEADER_SIZE];
        s.read_exact(&mut raw).unwrap();
        let h = Header::decode(&raw);
        let mut body = vec![0u8; h.size as usize - HEADER_SIZE];
        s.read_exact(&mut body).unwrap();
        h
    }

    #[test]
    fn an_out_of_order_version_reply_names_the_request() {
        let wrong_id = vec![0, 0, 1, 0];
        let path = std::env::temp_dir().join(format!("vfu-order-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let h = read_request(&mut s);
            let _ = s.write_all(&reply_to(
                Header { id: h.id + 1, ..h },
                FLAG_REPLY,
                0,
                &wrong_id,
            ));
            let _ = s.read(&mut [0u8; 1]);
        });
        let err = VfioUserClient::connect(&path, Duration::from_secs(2), None)
            .err()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(err.to_string(), "malformed reply to VERSION");
    }

    #[test]
    fn a_peer_that_went_away_fails_the_fd_send_at_once() {
        let (client_end, server_end) = UnixStream::pair().unwrap();
        drop(server_end);
        let mut client = VfioUserClient::over(client_end, Duration::from_secs(5), None);
        let memory = std::fs::File::open("/dev/zero").unwrap();
        let started = std::time::Instant::now();
        let err = client
            .dma_map(0x1000, 0x1000, memory.as_raw_fd(), 0)
            .unwrap_err();
        assert!(matches!(err, VfioUserError::SendFd(_)), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "retried a dead peer"
        );
        let why = client.closed_reason().unwrap();
        assert!(why.starts_with("DMA_MAP failed"), "{why}");
    }

    #[test]
    fn a_reset_connection_is_an_io_error_not_a_timeout() {
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        let mut client = VfioUserClient::over(client_end, Duration::from_secs(5), None);
        let server = std::thread::spawn(move || {
            // Read only the header, then go away with the body unread: the
            // client's read sees ECONNRESET.
            let mut raw = [0u8; HEADER_SIZE];
            server_end.read_exact(&mut raw).unwrap();
            drop(server_end);
        });
        let started = std::time::Instant::now();
        let err = client.dma_unmap(0x1000, 0x1000).unwrap_err();
        server.join().unwrap();
        assert!(matches!(err, VfioUserError::Io(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2), "{err}");
    }

    /// A vCPU kick that lands while the client waits for a reply must not
    /// fail the request or restart its deadline.
    #[test]
    fn a_signal_while_waiting_for_the_reply_is_retried() {
        let kick = vmm_sys_util::signal::SIGRTMIN() + 1;
        vmm_sys_util::signal::register_signal_handler(kick, ignore_signal).unwrap();
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        let mut client = VfioUserClient::over(client_end, Duration::from_secs(5), None);
        let waiter = std::thread::spawn(move || {
            let result = client.dma_unmap(0x1000, 0x1000);
            (
                result.map_err(|e| e.to_string()),
                client.closed_reason().map(str::to_string),
            )
        });
        let request = read_request(&mut server_end);
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: signals a live thread of this process; the handler is
        // installed above.
        let rc = unsafe { libc::pthread_kill(waiter.as_pthread_t(), kick) };
        assert_eq!(rc, 0);
        std::thread::sleep(Duration::from_millis(50));
        server_end
            .write_all(&reply_to(request, FLAG_REPLY, 0, &[]))
            .unwrap();
        assert_eq!(waiter.join().unwrap(), (Ok(()), None));
    }

    #[test]
    fn server_requests_before_the_reply_are_answered_in_line() {
        let ram = std::sync::Arc::new(Ram(std::sync::Mutex::new(vec![0x3c; 64 << 10])));
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        let mut client = VfioUserClient::over(client_end, Duration::from_secs(5), Some(ram));
        client.mapped.insert(0x1000, 0x1000);
        let server = std::thread::spawn(move || {
            let request = read_request(&mut server_end);
            // DMA_READs of 2 bytes, mapped and not, before the DMA_UNMAP
            // reply.
            let mut answers = Vec::new();
            for (id, addr) in [(77u16, 0x1000u64), (78, 0x8000)] {
                let mut body = addr.to_le_bytes().to_vec();
                body.extend_from_slice(&2u64.to_le_bytes());
                let ask = Header {
                    id,
                    command: CMD_DMA_READ,
                    size: (HEADER_SIZE + body.len()) as u32,
                    flags: FLAG_COMMAND,
                    error: 0,
                };
                server_end.write_all(&ask.encode()).unwrap();
                server_end.write_all(&body).unwrap();
                let mut raw = [0u8; HEADER_SIZE];
                server_end.read_exact(&mut raw).unwrap();
                let answer = Header::decode(&raw);
                let mut data = vec![0u8; answer.size as usize - HEADER_SIZE];
                server_end.read_exact(&mut data).unwrap();
                let bytes = data.get(16..).unwrap_or_default().to_vec();
                answers.push((answer.id, answer.command, answer.flags, answer.error, bytes));
            }
            server_end
                .write_all(&reply_to(request, FLAG_REPLY, 0, &[]))
                .unwrap();
            answers
        });
        client.dma_unmap(0x1000, 0x1000).unwrap();
        let answers = server.join().unwrap();
        assert_eq!(
            answers,
            [
                (77, CMD_DMA_READ, FLAG_REPLY, 0, vec![0x3c, 0x3c]),
                (78, CMD_DMA_READ, FLAG_REPLY | FLAG_ERROR, EFAULT, vec![]),
            ]
        );
        assert!(client.closed_reason().is_none());
        assert!(client.mapped.is_empty(), "the unmap went through");
    }

    /// A DMA_READ of `count` bytes at `addr` as the server sends it.
    fn dma_read_request(id: u16, addr: u64, count: u64) -> Vec<u8> {
        let mut body = addr.to_le_bytes().to_vec();
        body.extend_from_slice(&count.to_le_bytes());
        let mut out = Header {
            id,
            command: CMD_DMA_READ,
            size: (HEADER_SIZE + body.len()) as u32,
            flags: FLAG_COMMAND,
            error: 0,
        }
        .encode()
        .to_vec();
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn serve_pending_answers_a_waiting_dma_request_between_requests() {
        let ram = std::sync::Arc::new(Ram(std::sync::Mutex::new(vec![0x5d; 64 << 10])));
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        let mut client = VfioUserClient::over(client_end, Duration::from_secs(2), Some(ram));
        client.mapped.insert(0x1000, 0x1000);
        // An unanswered request fails the test rather than hanging it.
        server_end
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert!(client.watch_handle().is_some());
        // Nothing waiting: nothing to do, and no wait for it.
        let started = Instant::now();
        client.serve_pending().unwrap();
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(client.closed_reason().is_none());

        server_end
            .write_all(&dma_read_request(41, 0x1ffe, 2))
            .unwrap();
        client.serve_pending().unwrap();
        let mut raw = [0u8; HEADER_SIZE];
        server_end.read_exact(&mut raw).unwrap();
        let answer = Header::decode(&raw);
        let mut data = vec![0u8; answer.size as usize - HEADER_SIZE];
        server_end.read_exact(&mut data).unwrap();
        assert_eq!(
            (answer.id, answer.command, answer.flags, answer.error),
            (41, CMD_DMA_READ, FLAG_REPLY, 0)
        );
        assert_eq!(&data[16..], &[0x5d, 0x5d]);
        assert!(client.closed_reason().is_none());
    }

    #[test]
    fn a_waiting_message_out_of_step_closes_the_connection() {
        let oversize = Header {
            id: 1,
            command: CMD_DMA_READ,
            size: (MAX_MESSAGE + 1) as u32,
            flags: FLAG_COMMAND,
            error: 0,
        };
        let reply = Header {
            id: 2,
            command: CMD_DMA_READ,
            size: HEADER_SIZE as u32,
            flags: FLAG_REPLY,
            error: 0,
        };
        let undersize = Header {
            size: (HEADER_SIZE - 1) as u32,
            ..oversize
        };
        for (what, header) in [
            ("oversize", oversize),
            ("a reply", reply),
            ("undersize", undersize),
        ] {
            let (client_end, mut server_end) = UnixStream::pair().unwrap();
            let mut client = VfioUserClient::over(client_end, Duration::from_secs(2), None);
            server_end.write_all(&header.encode()).unwrap();
            let started = Instant::now();
            let err = client.serve_pending().unwrap_err();
            assert!(
                matches!(err, VfioUserError::Protocol("a server request")),
                "{what}: {err}"
            );
            assert!(started.elapsed() < Duration::from_secs(1), "{what}");
            let why = client.closed_reason().unwrap();
            assert!(
                why.starts_with("serving the server's request failed"),
                "{what}: {why}"
            );
            // Closed: the watcher has nothing to watch and learns it.
            assert!(client.watch_handle().is_none());
            assert!(matches!(
                client.serve_pending(),
                Err(VfioUserError::Closed(_))
            ));
        }
    }

    #[test]
    fn a_map_for_messages_sends_no_fd_and_lets_dma_in() {
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        let ram = std::sync::Arc::new(Ram(std::sync::Mutex::new(vec![0x6e; 64 << 10])));
        let (client_end, mut server_end) = UnixStream::pair().unwrap();
        let mut client = VfioUserClient::over(client_end, Duration::from_secs(2), Some(ram));
        // No request sent fails the test rather than hanging it.
        server_end
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let server = std::thread::spawn(move || {
            let mut raw = [0u8; HEADER_SIZE];
            let (n, fd) = server_end.recv_with_fd(&mut raw).unwrap();
            assert_eq!(n, HEADER_SIZE);
            let h = Header::decode(&raw);
            let mut body = vec![0u8; h.size as usize - HEADER_SIZE];
            server_end.read_exact(&mut body).unwrap();
            server_end
                .write_all(&reply_to(h, FLAG_REPLY, 0, &[]))
                .unwrap();
            (h.command, fd.is_some(), body)
        });
        client.dma_map_for_messages(0x2000, 0x1000).unwrap();
        let (command, had_fd, body) = server.join().unwrap();
        assert_eq!(command, CMD_DMA_MAP);
        assert!(!had_fd, "a map for messages passed an fd");
        let mut expected = 32u32.to_le_bytes().to_vec();
        expected.extend_from_slice(&DMA_READ_WRITE.to_le_bytes());
        expected.extend_from_slice(&0u64.to_le_bytes());
        expected.extend_from_slice(&0x2000u64.to_le_bytes());
        expected.extend_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(body, expected);
        // The server's DMA reaches the mapping, and only it.
        let mut access = 0x2ff0u64.to_le_bytes().to_vec();
        access.extend_from_slice(&16u64.to_le_bytes());
        assert_eq!(
            &client.dma_access(CMD_DMA_READ, &access).unwrap()[16..],
            &[0x6e; 16]
        );
        let mut past = 0x2ff0u64.to_le_bytes().to_vec();
        past.extend_from_slice(&17u64.to_le_bytes());
        assert_eq!(client.dma_access(CMD_DMA_READ, &past), Err(EFAULT));
    }
}
