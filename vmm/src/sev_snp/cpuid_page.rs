//! The SNP CPUID page: the CPUID values the guest may trust, in the layout
//! the security processor validates and OVMF reads (the SEV-SNP firmware
//! ABI's CPUID function table; `struct snp_cpuid_table` in Linux).
//!
//! An SNP guest does not ask the hypervisor for CPUID: it looks the leaf
//! up in this table, which the security processor checked at launch. So
//! the table holds what the vCPUs are given (KVM's supported CPUID with
//! the VMM's adjustments and the hidden features, `boot::cpuid`), as
//! vCPU 0 sees it: the guest takes the APIC ids from the vCPU itself.
//!
//! Layout: a 16-byte header (the count, then 12 reserved bytes), then up
//! to 64 functions of 48 bytes: `eax_in`, `ecx_in` (u32), `xcr0_in`,
//! `xss_in` (u64), `eax`, `ebx`, `ecx`, `edx` (u32), 8 reserved bytes.

use arch::layout::PAGE_BYTES;
use hypervisor::CpuidEntry;

use crate::boot::cpuid::{CpuFeature, for_vcpu};

/// The firmware ABI's limit.
pub const MAX_CPUID_FUNCTIONS: usize = 64;
const HEADER: usize = 16;
const FUNCTION: usize = 48;
pub const TABLE_SIZE: usize = HEADER + MAX_CPUID_FUNCTIONS * FUNCTION;
const _: () = assert!(TABLE_SIZE <= PAGE_BYTES);

const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;
/// Leaves whose ECX input selects a sub-leaf, recorded with it even when
/// the source did not flag the index as significant.
const INDEXED_LEAVES: [u32; 9] = [0x4, 0x7, 0xb, 0xd, 0xf, 0x10, 0x14, 0x1f, 0x8000_001d];
const LEAF_XSAVE: u32 = 0xd;
/// XCR0 at reset: x87 only. The guest starts with it, and the processor
/// checks leaf 0xD's sizes against the XCR0/XSS inputs of the entry.
const XCR0_AT_RESET: u64 = 1;
/// The XSAVE area of XCR0 = x87 (XSS = 0): its legacy region and header,
/// what sub-leaves 0 and 1 report in EBX for those inputs.
const XSAVE_LEGACY_SIZE: u32 = 0x240;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuidPageError {
    #[error("{0} CPUID leaves, more than the {MAX_CPUID_FUNCTIONS} the CPUID page holds")]
    TooMany(usize),
    #[error("the CPUID page is {0} bytes, not {TABLE_SIZE}")]
    Short(usize),
    #[error("the CPUID page claims {0} functions")]
    Count(u32),
    #[error("the CPUID page's reserved header is not zero")]
    ReservedHeader,
    #[error("CPUID function {0}'s reserved field is not zero")]
    ReservedField(usize),
    #[error("the CPUID page has data past its last function")]
    TrailingData,
}

/// One function of the table, as the firmware ABI lays it out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidFunction {
    pub eax_in: u32,
    pub ecx_in: u32,
    pub xcr0_in: u64,
    pub xss_in: u64,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl CpuidFunction {
    /// The function the processor checks for `e`: its sub-leaf where one
    /// exists, and for leaf 0xD's sub-leaves 0 and 1 (whose EBX depends on
    /// the enabled state) the size at reset with the reset XCR0 as input.
    pub fn from_entry(e: &CpuidEntry) -> Self {
        let indexed =
            e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0 || INDEXED_LEAVES.contains(&e.function);
        let ecx_in = if indexed { e.index } else { 0 };
        let (ebx, xcr0_in) = if e.function == LEAF_XSAVE && ecx_in <= 1 {
            (XSAVE_LEGACY_SIZE, XCR0_AT_RESET)
        } else {
            (e.ebx, 0)
        };
        CpuidFunction {
            eax_in: e.function,
            ecx_in,
            xcr0_in,
            // No supervisor state is enabled at launch.
            xss_in: 0,
            eax: e.eax,
            ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }

    fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.eax_in.to_le_bytes());
        out[4..8].copy_from_slice(&self.ecx_in.to_le_bytes());
        out[8..16].copy_from_slice(&self.xcr0_in.to_le_bytes());
        out[16..24].copy_from_slice(&self.xss_in.to_le_bytes());
        out[24..28].copy_from_slice(&self.eax.to_le_bytes());
        out[28..32].copy_from_slice(&self.ebx.to_le_bytes());
        out[32..36].copy_from_slice(&self.ecx.to_le_bytes());
        out[36..40].copy_from_slice(&self.edx.to_le_bytes());
    }

    fn read(bytes: &[u8]) -> Self {
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        CpuidFunction {
            eax_in: u32_at(0),
            ecx_in: u32_at(4),
            xcr0_in: u64_at(8),
            xss_in: u64_at(16),
            eax: u32_at(24),
            ebx: u32_at(28),
            ecx: u32_at(32),
            edx: u32_at(36),
        }
    }
}

/// One page holding `entries`, in their order.
pub fn build(entries: &[CpuidEntry]) -> Result<Box<[u8; PAGE_BYTES]>, CpuidPageError> {
    if entries.len() > MAX_CPUID_FUNCTIONS {
        return Err(CpuidPageError::TooMany(entries.len()));
    }
    let mut page = Box::new([0u8; PAGE_BYTES]);
    // At most MAX_CPUID_FUNCTIONS (checked above).
    let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
    page[..4].copy_from_slice(&count.to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = HEADER + i * FUNCTION;
        CpuidFunction::from_entry(e).write(&mut page[at..at + FUNCTION]);
    }
    Ok(page)
}

/// Checks a CPUID page the way a consumer of the format must read it:
/// the table's size, a count within the limit, zero reserved fields and
/// nothing past the last function. Returns the functions.
pub fn validate(page: &[u8]) -> Result<Vec<CpuidFunction>, CpuidPageError> {
    if page.len() < TABLE_SIZE {
        return Err(CpuidPageError::Short(page.len()));
    }
    let count = u32::from_le_bytes(page[..4].try_into().expect("4 bytes"));
    let functions = usize::try_from(count).unwrap_or(usize::MAX);
    if functions > MAX_CPUID_FUNCTIONS {
        return Err(CpuidPageError::Count(count));
    }
    if page[4..HEADER].iter().any(|b| *b != 0) {
        return Err(CpuidPageError::ReservedHeader);
    }
    let mut table = Vec::with_capacity(functions);
    for i in 0..functions {
        let at = HEADER + i * FUNCTION;
        if page[at + 40..at + FUNCTION].iter().any(|b| *b != 0) {
            return Err(CpuidPageError::ReservedField(i));
        }
        table.push(CpuidFunction::read(&page[at..at + FUNCTION]));
    }
    if page[HEADER + functions * FUNCTION..]
        .iter()
        .any(|b| *b != 0)
    {
        return Err(CpuidPageError::TrailingData);
    }
    Ok(table)
}

/// The CPUID a launch of `vcpus` vCPUs puts in the page: what vCPU 0 is
/// given (`boot::cpuid::for_vcpu`) from KVM's `supported` CPUID, with the
/// `hidden` features taken away as from every vCPU.
pub fn for_launch(supported: &[CpuidEntry], vcpus: u8, hidden: &[CpuFeature]) -> Vec<CpuidEntry> {
    for_vcpu(supported, 0, vcpus, hidden)
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
mod tests;
