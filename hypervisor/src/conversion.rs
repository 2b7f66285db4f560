//! The one request every conversion source (hypercall exit, memory-fault
//! exit, doorbell device) is turned into.

pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// Attribute bit of KVM_HC_MAP_GPA_RANGE: the range becomes private (encrypted).
pub const MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
const MAP_GPA_RANGE_PAGE_SIZE_MASK: u64 = 0xf;
const MAP_GPA_RANGE_KNOWN_ATTRS: u64 = MAP_GPA_RANGE_ENCRYPTED | MAP_GPA_RANGE_PAGE_SIZE_MASK;
const PAGE_SHIFT: u32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConversionDirection {
    ToShared,
    ToPrivate,
}

impl ConversionDirection {
    pub fn name(self) -> &'static str {
        match self {
            ConversionDirection::ToShared => "shared",
            ConversionDirection::ToPrivate => "private",
        }
    }
}

/// A guest request to change the shared/private state of `gpa..gpa+size`.
/// Values are passed through as the guest gave them; validation is the
/// memory manager's job so that every source gets the same answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConversion {
    pub gpa: u64,
    pub size: u64,
    pub direction: ConversionDirection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConversionError {
    #[error("unknown MAP_GPA_RANGE attributes {0:#x}")]
    UnknownAttributes(u64),
    #[error("page count {0} overflows the guest physical address space")]
    PageCountOverflow(u64),
    #[error("memory fault with unknown flags {0:#x}")]
    UnknownFaultFlags(u64),
}

/// Decodes the arguments of `KVM_HC_MAP_GPA_RANGE` (a0 = gpa, a1 = number of
/// 4 KiB pages, a2 = attributes).
pub fn decode_map_gpa_range(args: &[u64; 6]) -> Result<MemoryConversion, ConversionError> {
    let (gpa, pages, attrs) = (args[0], args[1], args[2]);
    if attrs & !MAP_GPA_RANGE_KNOWN_ATTRS != 0 {
        return Err(ConversionError::UnknownAttributes(attrs));
    }
    let size = pages
        .checked_mul(1 << PAGE_SHIFT)
        .ok_or(ConversionError::PageCountOverflow(pages))?;
    Ok(conversion(gpa, size, attrs & MAP_GPA_RANGE_ENCRYPTED != 0))
}

/// What a decoded request asks: `gpa..gpa+size` to private or to shared.
fn conversion(gpa: u64, size: u64, to_private: bool) -> MemoryConversion {
    let direction = if to_private {
        ConversionDirection::ToPrivate
    } else {
        ConversionDirection::ToShared
    };
    MemoryConversion {
        gpa,
        size,
        direction,
    }
}

/// Decodes a `KVM_EXIT_MEMORY_FAULT`: the guest touched memory whose
/// attributes do not match the access, so it asks for the other state.
/// Flags other than PRIVATE mean a kernel this code does not understand:
/// refused rather than guessed at.
pub fn decode_memory_fault(
    flags: u64,
    gpa: u64,
    size: u64,
) -> Result<MemoryConversion, ConversionError> {
    let private = u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE);
    if flags & !private != 0 {
        return Err(ConversionError::UnknownFaultFlags(flags));
    }
    Ok(conversion(gpa, size, flags & private != 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_are_named_as_the_api_and_the_events_show_them() {
        assert_eq!(ConversionDirection::ToShared.name(), "shared");
        assert_eq!(ConversionDirection::ToPrivate.name(), "private");
    }

    #[test]
    fn map_gpa_range_to_private() {
        let c = decode_map_gpa_range(&[0x20_0000, 4, MAP_GPA_RANGE_ENCRYPTED, 0, 0, 0]).unwrap();
        assert_eq!(c.gpa, 0x20_0000);
        assert_eq!(c.size, 0x4000);
        assert_eq!(c.direction, ConversionDirection::ToPrivate);
    }

    #[test]
    fn map_gpa_range_to_shared_with_page_size_hint() {
        let c = decode_map_gpa_range(&[0x1000, 1, 1, 0, 0, 0]).unwrap();
        assert_eq!(c.direction, ConversionDirection::ToShared);
        assert_eq!(c.size, 0x1000);
    }

    #[test]
    fn map_gpa_range_rejects_garbage() {
        assert_eq!(
            decode_map_gpa_range(&[0, 1, 1 << 7, 0, 0, 0]),
            Err(ConversionError::UnknownAttributes(1 << 7))
        );
        assert_eq!(
            decode_map_gpa_range(&[0, u64::MAX, 0, 0, 0, 0]),
            Err(ConversionError::PageCountOverflow(u64::MAX))
        );
    }

    /// What KVM makes of an SNP guest's page-state changes: the GHCB MSR
    /// protocol converts one 4 KiB page (page-size attribute 0); a GHCB
    /// page-state-change entry for a 2 MiB page is 512 pages with the
    /// 2 MiB attribute (1), and TDX's MapGPA and a 1 GiB request carry the
    /// 1 GiB one (2). The count is always of 4 KiB pages; the size bits
    /// are a hint that changes nothing.
    #[test]
    fn page_state_changes_of_every_page_size_decode_to_their_bytes() {
        for (pages, attrs, size, direction) in [
            (
                1,
                MAP_GPA_RANGE_ENCRYPTED,
                0x1000,
                ConversionDirection::ToPrivate,
            ),
            (1, 0, 0x1000, ConversionDirection::ToShared),
            (
                512,
                MAP_GPA_RANGE_ENCRYPTED | 1,
                2 << 20,
                ConversionDirection::ToPrivate,
            ),
            (512, 1, 2 << 20, ConversionDirection::ToShared),
            (1 << 18, 2, 1 << 30, ConversionDirection::ToShared),
            (
                1 << 18,
                MAP_GPA_RANGE_ENCRYPTED | 2,
                1 << 30,
                ConversionDirection::ToPrivate,
            ),
        ] {
            let c = decode_map_gpa_range(&[0x4000_0000, pages, attrs, 0, 0, 0]).unwrap();
            assert_eq!(
                (c.gpa, c.size, c.direction),
                (0x4000_0000, size, direction),
                "{pages} pages, attributes {attrs:#x}"
            );
        }
    }

    #[test]
    fn memory_fault_direction_follows_private_flag() {
        let p = decode_memory_fault(
            u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE),
            0,
            4096,
        )
        .unwrap();
        assert_eq!(p.direction, ConversionDirection::ToPrivate);
        assert_eq!(
            decode_memory_fault(0, 0, 4096).unwrap().direction,
            ConversionDirection::ToShared
        );
        assert_eq!(
            decode_memory_fault(1 << 4 | 1 << 3, 0, 4096),
            Err(ConversionError::UnknownFaultFlags(0x18))
        );
    }
}
