//! The guest's x86_64 physical address layout (`layout`), shared by the
//! hypervisor boundary, the PCI model and the VMM.

pub mod layout;

/// This VMM runs x86_64 guests on x86_64 hosts only: `usize` is 64 bits.
const _: () = assert!(usize::BITS == u64::BITS);

/// A guest-width integer (an address, a size or an offset) as a host
/// `usize`: lossless, since `usize` is 64 bits wide here (asserted above).
#[allow(
    clippy::cast_possible_truncation,
    reason = "usize is 64 bits on every host this builds for (asserted)"
)]
pub const fn usize_from(value: u64) -> usize {
    value as usize
}

/// The low 32 bits of `value` (a register or table field split in halves).
#[allow(
    clippy::cast_possible_truncation,
    reason = "keeping the low half is the point"
)]
pub const fn low32(value: u64) -> u32 {
    value as u32
}

/// The high 32 bits of `value`.
#[allow(
    clippy::cast_possible_truncation,
    reason = "the shifted value has 32 bits"
)]
pub const fn high32(value: u64) -> u32 {
    (value >> 32) as u32
}

/// `value` as a `u8`, in a constant: a value that does not fit stops the
/// build (use it as `const { fit_u8(X) }`).
#[allow(clippy::cast_possible_truncation, reason = "checked first")]
pub const fn fit_u8(value: u64) -> u8 {
    assert!(value <= u8::MAX as u64);
    value as u8
}

/// `value` as a `u16`, in a constant (see `fit_u8`).
#[allow(clippy::cast_possible_truncation, reason = "checked first")]
pub const fn fit_u16(value: u64) -> u16 {
    assert!(value <= u16::MAX as u64);
    value as u16
}

/// `value` as a `u32`, in a constant (see `fit_u8`).
#[allow(clippy::cast_possible_truncation, reason = "checked first")]
pub const fn fit_u32(value: u64) -> u32 {
    assert!(value <= u32::MAX as u64);
    value as u32
}
