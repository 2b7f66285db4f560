//! The SNP CPUID page: the CPUID values the guest may trust, in the layout
//! the security processor validates and OVMF reads (the SEV-SNP firmware
//! ABI's CPUID function table; `struct snp_cpuid_table` in Linux).

use hypervisor::CpuidEntry;

/// The firmware ABI's limit.
use arch::layout::PAGE_BYTES;

pub const MAX_CPUID_FUNCTIONS: usize = 64;
const HEADER: usize = 16;
const FUNCTION: usize = 48;
pub const TABLE_SIZE: usize = HEADER + MAX_CPUID_FUNCTIONS * FUNCTION;
const _: () = assert!(TABLE_SIZE <= PAGE_BYTES);

const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;
/// The XSAVE area of XCR0 = x87 | SSE: its legacy region and header.
const XSAVE_LEGACY_SIZE: u32 = 0x240;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuidPageError {
    #[error("{0} CPUID leaves, more than the {MAX_CPUID_FUNCTIONS} the CPUID page holds")]
    TooMany(usize),
}

/// One page holding `entries`. Sub-leaves count only where KVM says the
/// index matters; XSAVE leaves 0xD.0 and 0xD.1 describe the initial XCR0
/// (x87 only), the state the guest starts in, so the processor checks
/// them against that.
pub fn build(entries: &[CpuidEntry]) -> Result<Box<[u8; PAGE_BYTES]>, CpuidPageError> {
    if entries.len() > MAX_CPUID_FUNCTIONS {
        return Err(CpuidPageError::TooMany(entries.len()));
    }
    let mut page = Box::new([0u8; PAGE_BYTES]);
    // At most MAX_CPUID_FUNCTIONS (checked above).
    page[..4].copy_from_slice(
        &u32::try_from(entries.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    for (i, e) in entries.iter().enumerate() {
        let at = HEADER + i * FUNCTION;
        let index = if e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0 {
            e.index
        } else {
            0
        };
        let (mut ebx, mut xcr0_in) = (e.ebx, 0u64);
        if e.function == 0xd && index <= 1 {
            ebx = XSAVE_LEGACY_SIZE;
            xcr0_in = 1;
        }
        let field = &mut page[at..at + FUNCTION];
        field[0..4].copy_from_slice(&e.function.to_le_bytes());
        field[4..8].copy_from_slice(&index.to_le_bytes());
        field[8..16].copy_from_slice(&xcr0_in.to_le_bytes());
        // xss_in stays 0: no supervisor state is enabled at launch.
        field[24..28].copy_from_slice(&e.eax.to_le_bytes());
        field[28..32].copy_from_slice(&ebx.to_le_bytes());
        field[32..36].copy_from_slice(&e.ecx.to_le_bytes());
        field[36..40].copy_from_slice(&e.edx.to_le_bytes());
    }
    Ok(page)
}

/// Checks a CPUID page the way a consumer of the format must read it:
/// a count within the limit and zero reserved fields. Returns the count.
pub fn validate(page: &[u8]) -> Result<usize, String> {
    if page.len() < TABLE_SIZE {
        return Err(format!("the CPUID page is {} bytes", page.len()));
    }
    let count = u32::from_le_bytes(page[..4].try_into().expect("4 bytes")) as usize;
    if count > MAX_CPUID_FUNCTIONS {
        return Err(format!("the CPUID page claims {count} functions"));
    }
    if page[4..HEADER].iter().any(|b| *b != 0) {
        return Err("the CPUID page's reserved header is not zero".into());
    }
    for i in 0..count {
        let at = HEADER + i * FUNCTION;
        if page[at + 40..at + 48].iter().any(|b| *b != 0) {
            return Err(format!("CPUID function {i}'s reserved field is not zero"));
        }
    }
    if page[HEADER + count * FUNCTION..].iter().any(|b| *b != 0) {
        return Err("the CPUID page has data past its last function".into());
    }
    Ok(count)
}

/// The leaves of this host's processor that a CPUID page needs at the
/// least (vendor and signature), for predicting a measurement without
/// KVM: the CPUID page's contents are not part of the digest.
pub fn host_minimal() -> Vec<CpuidEntry> {
    (0..2)
        .map(|function| {
            // Leaves 0 and 1 exist on every x86_64 processor.
            let r = std::arch::x86_64::__cpuid(function);
            CpuidEntry {
                function,
                eax: r.eax,
                ebx: r.ebx,
                ecx: r.ecx,
                edx: r.edx,
                ..Default::default()
            }
        })
        .collect()
}

/// The vCPU signature (CPUID 1 EAX: family, model, stepping) of `entries`.
pub fn signature(entries: &[CpuidEntry]) -> Option<u32> {
    entries.iter().find(|e| e.function == 1).map(|e| e.eax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_land_in_the_abi_layout() {
        let entries = [
            CpuidEntry {
                function: 1,
                eax: 0xa00f11,
                ebx: 2,
                ecx: 3,
                edx: 4,
                index: 9,
                flags: 0,
            },
            CpuidEntry {
                function: 0xd,
                index: 1,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ebx: 0x988,
                ..Default::default()
            },
        ];
        let page = build(&entries).unwrap();
        assert_eq!(validate(&page[..]), Ok(2));
        assert_eq!(&page[16..20], &1u32.to_le_bytes());
        // The index of a leaf without sub-leaves is not recorded.
        assert_eq!(&page[20..24], &[0; 4]);
        assert_eq!(&page[40..44], &0xa00f11u32.to_le_bytes());
        let d = 16 + 48;
        assert_eq!(&page[d + 4..d + 8], &1u32.to_le_bytes());
        assert_eq!(&page[d + 8..d + 16], &1u64.to_le_bytes());
        assert_eq!(&page[d + 28..d + 32], &0x240u32.to_le_bytes());
        assert_eq!(signature(&entries), Some(0xa00f11));
    }

    #[test]
    fn too_many_or_malformed_tables_are_refused() {
        let many = vec![CpuidEntry::default(); 65];
        assert_eq!(build(&many).unwrap_err(), CpuidPageError::TooMany(65));
        let mut page = build(&[CpuidEntry::default()]).unwrap();
        page[0] = 65;
        assert!(validate(&page[..]).is_err());
        page[0] = 1;
        page[16 + 40] = 1;
        assert!(validate(&page[..]).is_err());
        page[16 + 40] = 0;
        page[4000] = 1;
        assert!(validate(&page[..]).is_err());
        assert!(validate(&[0u8; 100]).is_err());
        assert!(host_minimal().len() == 2 && signature(&host_minimal()).is_some());
    }
}
