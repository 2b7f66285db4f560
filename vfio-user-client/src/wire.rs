//! The wire format: message header, command numbers, flags, and the
//! request and reply layouts the client sends and parses.

use crate::error::VfioUserError;

pub(crate) const CMD_VERSION: u16 = 1;
pub(crate) const CMD_DMA_MAP: u16 = 2;
pub(crate) const CMD_DMA_UNMAP: u16 = 3;
pub(crate) const CMD_DEVICE_GET_INFO: u16 = 4;
pub(crate) const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
pub(crate) const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
pub(crate) const CMD_DEVICE_SET_IRQS: u16 = 8;
pub(crate) const CMD_REGION_READ: u16 = 9;
pub(crate) const CMD_REGION_WRITE: u16 = 10;
pub(crate) const CMD_DEVICE_RESET: u16 = 13;
pub(crate) const IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub(crate) const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub(crate) const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// Largest region access forwarded in one message (a BAR or config access
/// is at most 8 bytes; this bounds what a caller can ask for).
pub const MAX_REGION_ACCESS: usize = 4096;
pub(crate) const CMD_DMA_READ: u16 = 11;
pub(crate) const CMD_DMA_WRITE: u16 = 12;
pub(crate) const HEADER_SIZE: usize = 16;
pub(crate) const FLAG_TYPE_MASK: u32 = 0xf;
pub(crate) const FLAG_COMMAND: u32 = 0;
pub(crate) const FLAG_REPLY: u32 = 1;
pub(crate) const FLAG_ERROR: u32 = 1 << 5;
pub(crate) const DMA_READ_WRITE: u32 = 0b11;
/// Largest DMA_READ / DMA_WRITE transfer we accept; advertised in VERSION.
pub(crate) const MAX_DATA_XFER: usize = 1 << 20;
/// A message larger than this is a protocol error, not something to allocate.
pub(crate) const MAX_MESSAGE: usize = HEADER_SIZE + 16 + MAX_DATA_XFER;
/// The spec's value when the server's VERSION reply does not say.
pub const DEFAULT_MAX_DMA_MAPS: u64 = 65535;
pub(crate) const CAPABILITIES: &str =
    r#"{"capabilities":{"max_msg_fds":1,"max_data_xfer_size":1048576}}"#;
pub(crate) const EFAULT: u32 = 14;
pub(crate) const EINVAL: u32 = 22;
pub(crate) const ENOSYS: u32 = 38;
/// The configuration space's region index (VFIO's PCI numbering, which
/// vfio-user follows).
pub const CONFIG_REGION: u32 = 7;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    pub(crate) id: u16,
    pub(crate) command: u16,
    pub(crate) size: u32,
    pub(crate) flags: u32,
    pub(crate) error: u32,
}

impl Header {
    pub(crate) fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    pub(crate) fn decode(b: &[u8; HEADER_SIZE]) -> Self {
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

pub(crate) fn command_name(command: u16) -> &'static str {
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

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The 16-byte head of REGION_READ / REGION_WRITE.
pub(crate) fn region_access(
    index: u32,
    offset: u64,
    len: usize,
) -> Result<[u8; 16], VfioUserError> {
    if len == 0 || len > MAX_REGION_ACCESS {
        return Err(VfioUserError::AccessSize(len));
    }
    let mut head = [0u8; 16];
    head[0..8].copy_from_slice(&offset.to_le_bytes());
    head[8..12].copy_from_slice(&index.to_le_bytes());
    head[12..16].copy_from_slice(
        &u32::try_from(len)
            .expect("len is at most MAX_REGION_ACCESS (checked above)")
            .to_le_bytes(),
    );
    Ok(head)
}

/// `max_dma_maps` from a VERSION reply's JSON, or the spec's default.
pub(crate) fn max_dma_maps(reply: &[u8]) -> Result<u64, VfioUserError> {
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
        self.flags & Self::FLAG_PCI != 0 && self.regions > CONFIG_REGION
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

pub(crate) const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
pub(crate) const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
pub(crate) const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
/// Room for the capability chain of a region (a sparse-mmap list of up to
/// 60 areas).
pub(crate) const REGION_INFO_ARGSZ: u32 = 1024;

/// The sparse-mmap areas in a DEVICE_GET_REGION_INFO reply (`reply` starts
/// at the region info); areas outside the region or not page-aligned are
/// dropped, a malformed chain is a protocol error.
pub(crate) fn sparse_mmap_areas(reply: &[u8], size: u64) -> Option<Vec<(u64, u64)>> {
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(reply.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(reply.get(at..at + 8)?.try_into().ok()?))
    };
    let mut next = u32_at(12)? as usize;
    let mut areas = Vec::new();
    // The chain must move forward and every read is bounded by the reply,
    // so a looping chain or an inflated count ends as a protocol error.
    loop {
        if next == 0 {
            return Some(areas);
        }
        let header = u32_at(next)?;
        let following = u32_at(next + 4)? as usize;
        if (header & 0xffff) as u16 == REGION_INFO_CAP_SPARSE_MMAP {
            let count = u32_at(next + 8)? as usize;
            for i in 0..count {
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
}

#[cfg(test)]
mod tests;
