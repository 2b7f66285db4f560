//! The SEV-SNP launch digest as the security processor computes it.
//!
//! Every page a launch hands the processor extends the digest: the
//! processor fills a PAGE_INFO structure (SEV-SNP firmware ABI,
//! `SNP_LAUNCH_UPDATE`) with the digest so far, the SHA-384 of the page's
//! contents (zero for page types whose contents are not measured), the
//! page type and the guest physical address, and the SHA-384 of that
//! structure is the new digest. The digest starts as 48 zero bytes; what
//! it is after `SNP_LAUNCH_FINISH` is the MEASUREMENT of the guest's
//! attestation reports.

use hypervisor::SnpPageType;
use sha2::{Digest, Sha384};

pub const DIGEST_LEN: usize = 48;
use arch::layout::PAGE_BYTES as PAGE;

/// A page as PAGE_INFO records it: one the VMM launched, or a vCPU's
/// VMSA, which KVM launches itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeasuredPageType {
    Launched(SnpPageType),
    Vmsa,
}

/// PAGE_INFO's type number for a VMSA page; launched pages keep their
/// `SNP_LAUNCH_UPDATE` numbers.
const PAGE_TYPE_VMSA: u8 = 2;

impl From<SnpPageType> for MeasuredPageType {
    fn from(page_type: SnpPageType) -> Self {
        MeasuredPageType::Launched(page_type)
    }
}

impl MeasuredPageType {
    fn number(self) -> u8 {
        match self {
            MeasuredPageType::Launched(page_type) => page_type as u8,
            MeasuredPageType::Vmsa => PAGE_TYPE_VMSA,
        }
    }

    /// Only normal and VMSA pages have their contents hashed into PAGE_INFO.
    fn measures_contents(self) -> bool {
        matches!(
            self,
            MeasuredPageType::Launched(SnpPageType::Normal) | MeasuredPageType::Vmsa
        )
    }
}

/// PAGE_INFO, 0x70 bytes, as the firmware ABI lays it out.
#[repr(C)]
struct PageInfo {
    digest_cur: [u8; DIGEST_LEN],
    contents: [u8; DIGEST_LEN],
    length: u16,
    page_type: u8,
    /// Bit 0: the page belongs to an incoming migration image (never here).
    imi_page: u8,
    /// Permissions granted to VMPLs 3, 2, 1 (none: the launch gives them).
    vmpl3_perms: u8,
    vmpl2_perms: u8,
    vmpl1_perms: u8,
    reserved: u8,
    gpa: u64,
}

const PAGE_INFO_LEN: usize = 0x70;
const _: () = assert!(std::mem::size_of::<PageInfo>() == PAGE_INFO_LEN);

impl PageInfo {
    fn bytes(&self) -> [u8; PAGE_INFO_LEN] {
        let mut out = [0u8; PAGE_INFO_LEN];
        out[..0x30].copy_from_slice(&self.digest_cur);
        out[0x30..0x60].copy_from_slice(&self.contents);
        out[0x60..0x62].copy_from_slice(&self.length.to_le_bytes());
        out[0x62] = self.page_type;
        out[0x63] = self.imi_page;
        out[0x64] = self.vmpl3_perms;
        out[0x65] = self.vmpl2_perms;
        out[0x66] = self.vmpl1_perms;
        out[0x67] = self.reserved;
        out[0x68..].copy_from_slice(&self.gpa.to_le_bytes());
        out
    }
}

/// The running launch digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchDigest([u8; DIGEST_LEN]);

impl Default for LaunchDigest {
    fn default() -> Self {
        LaunchDigest([0; DIGEST_LEN])
    }
}

impl LaunchDigest {
    pub fn bytes(&self) -> &[u8; DIGEST_LEN] {
        &self.0
    }

    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Extends the digest by one page at `gpa`. `contents` is the page's
    /// 4096 bytes for the types whose contents are measured.
    pub fn extend_page(&mut self, gpa: u64, page_type: MeasuredPageType, contents: Option<&[u8]>) {
        let mut contents_digest = [0u8; DIGEST_LEN];
        if page_type.measures_contents() {
            let page = contents.expect("measured pages have contents");
            debug_assert_eq!(page.len(), PAGE);
            contents_digest.copy_from_slice(&Sha384::digest(page));
        }
        let info = PageInfo {
            digest_cur: self.0,
            contents: contents_digest,
            length: const { ::arch::fit_u16(PAGE_INFO_LEN as u64) },
            page_type: page_type.number(),
            imi_page: 0,
            vmpl3_perms: 0,
            vmpl2_perms: 0,
            vmpl1_perms: 0,
            reserved: 0,
            gpa,
        };
        self.0.copy_from_slice(&Sha384::digest(info.bytes()));
    }

    /// Extends the digest by every page of `gpa..gpa + len`; `data` (for
    /// measured types) holds `len` bytes, short data is zero-padded as the
    /// processor sees a page the VMM filled only in part.
    pub fn extend_range(
        &mut self,
        gpa: u64,
        len: u64,
        page_type: MeasuredPageType,
        data: Option<&[u8]>,
    ) {
        let mut page = [0u8; PAGE];
        for index in 0..len / PAGE as u64 {
            let page_gpa = gpa + index * PAGE as u64;
            let contents = data.map(|data| {
                let start = ::arch::usize_from(index) * PAGE;
                let chunk = data.get(start..).unwrap_or(&[]);
                let take = chunk.len().min(PAGE);
                page[..take].copy_from_slice(&chunk[..take]);
                page[take..].fill(0);
                &page[..]
            });
            self.extend_page(page_gpa, page_type, contents);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha384(data: &[u8]) -> [u8; 48] {
        Sha384::digest(data).into()
    }

    /// One normal page: the PAGE_INFO built by hand, byte by byte, from
    /// the ABI's offsets.
    #[test]
    fn one_page_hashes_its_page_info() {
        let page = [0xabu8; PAGE];
        let mut digest = LaunchDigest::default();
        digest.extend_page(0xffe0_0000, SnpPageType::Normal.into(), Some(&page));
        let mut info = vec![0u8; 0x30];
        info.extend_from_slice(&sha384(&page));
        info.extend_from_slice(&[0x70, 0x00, 1, 0, 0, 0, 0, 0]);
        info.extend_from_slice(&0xffe0_0000u64.to_le_bytes());
        assert_eq!(info.len(), 0x70);
        assert_eq!(digest.bytes(), &sha384(&info));
    }

    #[test]
    fn unmeasured_types_hash_zero_contents_and_chain() {
        let mut a = LaunchDigest::default();
        a.extend_page(0x1000, SnpPageType::Zero.into(), None);
        let mut info = vec![0u8; 0x60];
        info.extend_from_slice(&[0x70, 0x00, 3, 0, 0, 0, 0, 0]);
        info.extend_from_slice(&0x1000u64.to_le_bytes());
        let first = sha384(&info);
        assert_eq!(a.bytes(), &first);
        // The next page starts from the previous digest.
        a.extend_page(0x2000, SnpPageType::Cpuid.into(), None);
        info[..0x30].copy_from_slice(&first);
        info[0x62] = 6;
        info[0x68..].copy_from_slice(&0x2000u64.to_le_bytes());
        assert_eq!(a.bytes(), &sha384(&info));
    }

    #[test]
    fn a_range_is_its_pages_in_order() {
        let data: Vec<u8> = (0..3 * PAGE)
            .map(|i| u8::try_from(i / PAGE).unwrap())
            .collect();
        let mut range = LaunchDigest::default();
        range.extend_range(
            0x10000,
            3 * PAGE as u64,
            SnpPageType::Normal.into(),
            Some(&data),
        );
        let mut pages = LaunchDigest::default();
        for (i, chunk) in data.chunks(PAGE).enumerate() {
            pages.extend_page(
                0x10000 + (i * PAGE) as u64,
                SnpPageType::Normal.into(),
                Some(chunk),
            );
        }
        assert_eq!(range, pages);
        assert_ne!(range, LaunchDigest::default());
    }
}
