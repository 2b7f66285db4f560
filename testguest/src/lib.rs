// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! Test guests built from this repository's own assembly (see `guest/`),
//! and the op language of the `memconv` guest.

mod elf;
mod ops;

pub use elf::{LOAD_ADDR, wrap_flat_image};
pub use ops::{Op, OpKind, ParseError, SYNTAX as OPS_SYNTAX, parse_ops, parse_size, parse_u64};

/// The assembled `memconv` interpreter, linked at `LOAD_ADDR`.
pub const MEMCONV_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memconv.bin"));

const TABLE_MAGIC: &[u8; 8] = b"MEMCONV1";
const FLAG_POWEROFF: u64 = 1;
const FLAG_QUIET: u64 = 2;
const OP_BYTES: usize = 32;

/// How a `memconv` guest behaves around its ops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemconvOptions {
    /// Power the VM off after the summary line instead of idling.
    pub poweroff: bool,
    /// Print only the summary line, not one line per op: console output costs
    /// far more than a doorbell round trip, so benchmarks need it off.
    pub quiet: bool,
}

impl MemconvOptions {
    fn flags(self) -> u64 {
        (if self.poweroff { FLAG_POWEROFF } else { 0 }) | (if self.quiet { FLAG_QUIET } else { 0 })
    }
}

/// Builds a `memconv` guest ELF: the interpreter followed by its op table.
/// `lists[i]` is run by vCPU i.
pub fn memconv_elf(lists: &[Vec<Op>], options: MemconvOptions) -> Vec<u8> {
    let mut image = MEMCONV_IMAGE.to_vec();
    debug_assert_eq!(image.len() % 8, 0, "op table must be 8-byte aligned");
    image.extend_from_slice(&op_table(lists, options.flags()));
    wrap_flat_image(&image)
}

/// Table layout (little-endian u64s): magic, flags, list count, then one
/// (offset from table start, op count) pair per list, then the ops as
/// (kind, gpa, size, value); `cfg-*` ops carry the device number as gpa
/// and the register offset as size.
fn op_table(lists: &[Vec<Op>], flags: u64) -> Vec<u8> {
    let mut words: Vec<u64> = vec![u64::from_le_bytes(*TABLE_MAGIC), flags, lists.len() as u64];
    let mut offset = (3 + 2 * lists.len()) as u64 * 8;
    for list in lists {
        words.push(offset);
        words.push(list.len() as u64);
        offset += (list.len() * OP_BYTES) as u64;
    }
    for op in lists.iter().flatten() {
        words.extend([op.kind.code(), op.gpa, op.size, u64::from(op.value)]);
    }
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_points_each_list_at_its_ops() {
        let lists = vec![
            parse_ops("shared@0x1000000+4K").unwrap(),
            parse_ops("private@0x2000000+8K,write@0x2000000+16=0xab").unwrap(),
        ];
        let options = MemconvOptions {
            poweroff: true,
            quiet: true,
        };
        let table = op_table(&lists, options.flags());
        let word = |i: usize| u64::from_le_bytes(table[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(&table[..8], TABLE_MAGIC);
        assert_eq!(word(1), FLAG_POWEROFF | FLAG_QUIET);
        assert_eq!(word(2), 2);
        let (first, first_count) = (arch::usize_from(word(3)), word(4));
        let (second, second_count) = (arch::usize_from(word(5)), word(6));
        assert_eq!(first_count, 1);
        assert_eq!(second_count, 2);
        assert_eq!(second - first, OP_BYTES);
        let op_word = |base: usize, i: usize| word(base / 8 + i);
        assert_eq!(op_word(second, 0), OpKind::Private.code());
        assert_eq!(op_word(second, 1), 0x200_0000);
        assert_eq!(op_word(second + OP_BYTES, 3), 0xab);
        assert_eq!(table.len(), second + 2 * OP_BYTES);
    }

    #[test]
    fn interpreter_ends_where_the_table_begins() {
        assert!(!MEMCONV_IMAGE.is_empty());
        assert_eq!(MEMCONV_IMAGE.len() % 8, 0);
    }
}
