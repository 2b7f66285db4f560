// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! Guest-visible devices: the serial console, the conversion doorbell and
//! the power-off port.

pub mod doorbell;
pub mod power_off;
pub mod serial;

pub use doorbell::{ConversionDoorbell, ConversionHandler, DoorbellStatus};
pub use power_off::PowerOffPort;
pub use serial::SerialConsole;

/// Legacy I/O port layout of the platform.
pub mod layout {
    pub const SERIAL_PORT: u64 = 0x3f8;
    pub const SERIAL_LEN: u64 = 8;
    pub const POWER_OFF_PORT: u64 = 0xf4;
    pub const DOORBELL_BASE: u64 = 0x600;
    pub const DOORBELL_BANK_SIZE: u64 = 0x20;
    /// Banks 0..DOORBELL_BANKS, one per vCPU so vCPUs never share registers.
    pub const DOORBELL_BANKS: u64 = 32;
}
