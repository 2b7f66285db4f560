//! The tables an OVMF GUIDed table entry points at, by an offset back from
//! the end of the image: SEV's metadata ("ASEV") and TDX's TDVF descriptor
//! ("TDVF") share one layout. A 16-byte header (signature, the table's
//! length, version 1, the descriptor count), then the descriptors, all of
//! one size.

use std::fmt;

use crate::le_bytes::u32_at;

const HEADER: usize = 16;

/// One kind of table: its signature, the size of its descriptors, and the
/// most descriptors a real one has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorTable {
    pub signature: [u8; 4],
    pub descriptor_size: usize,
    pub max_descriptors: u32,
}

/// Why a table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("its offset {0:#x} is outside the image")]
    Offset(u32),
    #[error("its signature is {}, not {}", Signature(.found), Signature(.expected))]
    Signature { found: [u8; 4], expected: [u8; 4] },
    #[error("its version {0} is not supported (only 1)")]
    Version(u32),
    #[error("it claims {sections} descriptors in {length} bytes")]
    Length { sections: u32, length: u32 },
}

/// A signature as text where it is text, as bytes where it is not.
struct Signature<'a>(&'a [u8; 4]);

impl fmt::Display for Signature<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match std::str::from_utf8(self.0) {
            Ok(text) if text.bytes().all(|b| b.is_ascii_graphic()) => write!(f, "{text:?}"),
            _ => write!(f, "{:?}", self.0),
        }
    }
}

impl DescriptorTable {
    /// The bytes a table of `count` descriptors takes.
    pub fn length(&self, count: usize) -> usize {
        HEADER + count * self.descriptor_size
    }

    /// The descriptors of the table `offset` bytes before the end of
    /// `image`, each `descriptor_size` bytes, in order. The header must fit
    /// the image, carry this kind's signature and version 1, and its length
    /// must cover every descriptor, which must all lie inside the image.
    pub fn descriptors<'a>(
        &self,
        image: &'a [u8],
        offset: u32,
    ) -> Result<std::slice::ChunksExact<'a, u8>, TableError> {
        let len = image.len();
        let Some(start) = len
            .checked_sub(offset as usize)
            .filter(|start| start + HEADER <= len)
        else {
            return Err(TableError::Offset(offset));
        };
        let table = &image[start..];
        let found: [u8; 4] = table[..4].try_into().expect("4 bytes");
        if found != self.signature {
            return Err(TableError::Signature {
                found,
                expected: self.signature,
            });
        }
        let length = u32_at(table, 4);
        let version = u32_at(table, 8);
        let sections = u32_at(table, 12);
        if version != 1 {
            return Err(TableError::Version(version));
        }
        let needed = HEADER as u64 + u64::from(sections) * self.descriptor_size as u64;
        if sections > self.max_descriptors
            || u64::from(length) < needed
            || start as u64 + needed > len as u64
        {
            return Err(TableError::Length { sections, length });
        }
        let end = self.length(sections as usize);
        Ok(table[HEADER..end].chunks_exact(self.descriptor_size))
    }

    /// A table of this kind at version `version` holding `descriptors`
    /// (for tests that build images).
    #[cfg(test)]
    pub fn build(&self, version: u32, descriptors: &[Vec<u8>]) -> Vec<u8> {
        let mut out = self.signature.to_vec();
        let length = u32::try_from(self.length(descriptors.len())).unwrap();
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&version.to_le_bytes());
        let count = u32::try_from(descriptors.len()).unwrap();
        out.extend_from_slice(&count.to_le_bytes());
        for descriptor in descriptors {
            assert_eq!(descriptor.len(), self.descriptor_size);
            out.extend_from_slice(descriptor);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: DescriptorTable = DescriptorTable {
        signature: *b"TEST",
        descriptor_size: 8,
        max_descriptors: 3,
    };

    /// `table` placed so that it ends `tail` bytes before a 64-byte image's end.
    fn image(table: &[u8], tail: usize) -> (Vec<u8>, u32) {
        let mut image = vec![0xee; 64];
        let start = 64 - tail - table.len();
        image[start..start + table.len()].copy_from_slice(table);
        (image, u32::try_from(64 - start).unwrap())
    }

    #[test]
    fn descriptors_come_back_in_order_and_every_bound_holds_to_the_byte() {
        let two = TABLE.build(1, &[vec![1; 8], vec![2; 8]]);
        let (data, offset) = image(&two, 0);
        let got: Vec<&[u8]> = TABLE.descriptors(&data, offset).unwrap().collect();
        assert_eq!(got, [&[1u8; 8][..], &[2u8; 8][..]]);
        // The header may end at the image's last byte.
        let empty = TABLE.build(1, &[]);
        let (data, offset) = image(&empty, 0);
        assert_eq!(TABLE.descriptors(&data, offset).unwrap().len(), 0);
        // An offset past the start, or leaving no room for the header.
        assert_eq!(
            TABLE.descriptors(&data, 65).err(),
            Some(TableError::Offset(65))
        );
        assert_eq!(
            TABLE.descriptors(&data, 15).err(),
            Some(TableError::Offset(15))
        );
        // A length one byte short of the descriptors.
        let mut short = two.clone();
        short[4..8].copy_from_slice(&31u32.to_le_bytes());
        let (data, offset) = image(&short, 0);
        assert_eq!(
            TABLE.descriptors(&data, offset).err(),
            Some(TableError::Length {
                sections: 2,
                length: 31
            })
        );
        // A count whose descriptors pass the image's end, by one.
        let mut past = two.clone();
        past[12..16].copy_from_slice(&3u32.to_le_bytes());
        past[4..8].copy_from_slice(&40u32.to_le_bytes());
        let (data, offset) = image(&past, 0);
        assert!(matches!(
            TABLE.descriptors(&data, offset).err(),
            Some(TableError::Length { sections: 3, .. })
        ));
        let (data, offset) = image(&past, 8);
        assert_eq!(TABLE.descriptors(&data, offset).unwrap().len(), 3);
        // More than the most a real table has.
        let mut many = TABLE.build(1, &vec![vec![0; 8]; 3]);
        many[12..16].copy_from_slice(&4u32.to_le_bytes());
        many[4..8].copy_from_slice(&48u32.to_le_bytes());
        many.extend_from_slice(&[0; 8]);
        let (data, offset) = image(&many, 0);
        assert!(matches!(
            TABLE.descriptors(&data, offset).err(),
            Some(TableError::Length { sections: 4, .. })
        ));
    }

    #[test]
    fn a_wrong_signature_or_version_is_named() {
        let mut wrong = TABLE.build(1, &[]);
        wrong[0] = b'B';
        let (data, offset) = image(&wrong, 0);
        let err = TABLE.descriptors(&data, offset).unwrap_err();
        assert_eq!(
            err,
            TableError::Signature {
                found: *b"BEST",
                expected: *b"TEST"
            }
        );
        assert_eq!(err.to_string(), "its signature is \"BEST\", not \"TEST\"");
        wrong[..4].copy_from_slice(&[0, 1, 2, 3]);
        let (data, offset) = image(&wrong, 0);
        assert_eq!(
            TABLE.descriptors(&data, offset).unwrap_err().to_string(),
            "its signature is [0, 1, 2, 3], not \"TEST\""
        );
        let (data, offset) = image(&TABLE.build(2, &[]), 0);
        assert_eq!(
            TABLE.descriptors(&data, offset).err(),
            Some(TableError::Version(2))
        );
    }
}
