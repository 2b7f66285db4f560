//! MRTD, the TD's build-time measurement, as the TDX module computes it:
//! one SHA-384 over a record per TDH.MEM.PAGE.ADD and per TDH.MR.EXTEND,
//! in the order the VMM issued them, finalized by TDH.MR.FINALIZE.
//!
//! - TDH.MEM.PAGE.ADD of the page at GPA g: one 128-byte block,
//!   "MEM.PAGE.ADD" in bytes 0..12, g (u64 LE) in bytes 16..24, zeros
//!   elsewhere. Only the address is measured, not the contents.
//! - TDH.MR.EXTEND of 256 bytes at GPA g: a 128-byte block, "MR.EXTEND"
//!   in bytes 0..9, g in bytes 16..24, zeros elsewhere, then the 256 bytes
//!   (three blocks in all).

use hypervisor::tdx::MR_EXTEND_CHUNK;
use sha2::{Digest, Sha384};

const BLOCK: usize = 128;
pub const MRTD_LEN: usize = 48;

#[derive(Clone, Default)]
pub struct Mrtd {
    hasher: Sha384,
}

fn header(tag: &[u8], gpa: u64) -> [u8; BLOCK] {
    let mut block = [0u8; BLOCK];
    block[..tag.len()].copy_from_slice(tag);
    block[16..24].copy_from_slice(&gpa.to_le_bytes());
    block
}

impl Mrtd {
    /// TDH.MEM.PAGE.ADD of the 4 KiB page at `gpa`.
    pub fn page_add(&mut self, gpa: u64) {
        self.hasher.update(header(b"MEM.PAGE.ADD", gpa));
    }

    /// TDH.MR.EXTEND of the 256 bytes at `gpa`.
    pub fn mr_extend(&mut self, gpa: u64, chunk: &[u8; MR_EXTEND_CHUNK]) {
        self.hasher.update(header(b"MR.EXTEND", gpa));
        self.hasher.update(chunk);
    }

    /// The value TDH.MR.FINALIZE would make of what was added so far.
    pub fn value(&self) -> [u8; MRTD_LEN] {
        self.hasher.clone().finalize().into()
    }

    pub fn hex(&self) -> String {
        self.value().iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for Mrtd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mrtd({})", self.hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The records are exactly the TDX module's buffers: checked against a
    /// hash of hand-written bytes.
    #[test]
    fn records_are_the_tdx_modules_buffers() {
        let mut mrtd = Mrtd::default();
        mrtd.page_add(0xffe2_0000);
        mrtd.mr_extend(0xffe2_0100, &[0xab; 256]);

        let mut expected = Vec::new();
        let mut add = vec![0u8; 128];
        add[..12].copy_from_slice(b"MEM.PAGE.ADD");
        add[16..20].copy_from_slice(&[0x00, 0x00, 0xe2, 0xff]);
        expected.extend_from_slice(&add);
        let mut extend = vec![0u8; 128];
        extend[..9].copy_from_slice(b"MR.EXTEND");
        extend[16..20].copy_from_slice(&[0x00, 0x01, 0xe2, 0xff]);
        expected.extend_from_slice(&extend);
        expected.extend_from_slice(&[0xab; 256]);
        assert_eq!(expected.len(), 4 * 128);
        assert_eq!(mrtd.value()[..], Sha384::digest(&expected)[..]);
    }

    #[test]
    fn an_empty_mrtd_is_sha384_of_nothing() {
        assert_eq!(
            Mrtd::default().hex(),
            "38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da274edebfe76f65fbd51ad2f14898b95b"
        );
    }
}
