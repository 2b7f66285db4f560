//! The conversion doorbell: a port-I/O device through which a guest asks for
//! a shared/private conversion. It yields the same `MemoryConversion` as the
//! `KVM_HC_MAP_GPA_RANGE` exit, so one conversion path serves both.
//!
//! One 0x20-port bank per vCPU (bank = vCPU index), 32-bit registers:
//!
//! | offset | name    | access | meaning                                   |
//! |--------|---------|--------|-------------------------------------------|
//! | 0x00   | GPA_LO  | W/R    | guest physical address, bits 31:0         |
//! | 0x04   | GPA_HI  | W/R    | guest physical address, bits 63:32        |
//! | 0x08   | SIZE_LO | W/R    | size in bytes, bits 31:0                  |
//! | 0x0c   | SIZE_HI | W/R    | size in bytes, bits 63:32                 |
//! | 0x10   | COMMAND | W      | 0 = no-op, 1 = to shared, 2 = to private  |
//! | 0x14   | STATUS  | R      | `DoorbellStatus` of the last command      |

use std::sync::Mutex;

use hypervisor::{ConversionDirection, MemoryConversion};
use vm_device::BusDevice;

use crate::layout::DOORBELL_BANK_SIZE;

pub const REG_GPA_LO: u64 = 0x00;
pub const REG_GPA_HI: u64 = 0x04;
pub const REG_SIZE_LO: u64 = 0x08;
pub const REG_SIZE_HI: u64 = 0x0c;
pub const REG_COMMAND: u64 = 0x10;
pub const REG_STATUS: u64 = 0x14;

/// Completes with `Ok` without converting anything: lets a guest probe the
/// doorbell and measure the bare round trip.
pub const COMMAND_NOP: u32 = 0;
pub const COMMAND_TO_SHARED: u32 = 1;
pub const COMMAND_TO_PRIVATE: u32 = 2;

/// What the guest reads from STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum DoorbellStatus {
    Ok = 0,
    /// Unaligned, zero-sized or overflowing range.
    Invalid = 1,
    /// Not (entirely) guest_memfd RAM.
    OutOfRange = 2,
    /// A device could not map the range; nothing changed.
    ListenerFailed = 3,
    /// KVM refused the attribute change; nothing changed.
    HypervisorError = 4,
    BadCommand = 5,
    /// No command has run on this bank yet.
    Idle = 0xffff_ffff,
}

/// The VMM side of the doorbell: runs a conversion and says how it went.
/// `bank` is the doorbell bank used, which by convention is the vCPU index.
pub trait ConversionHandler: Send + Sync {
    fn convert(&self, conversion: MemoryConversion, bank: u8) -> DoorbellStatus;
}

#[derive(Clone, Copy)]
struct Bank {
    gpa: u64,
    size: u64,
    status: DoorbellStatus,
}

pub struct ConversionDoorbell {
    banks: Vec<Mutex<Bank>>,
    handler: std::sync::Arc<dyn ConversionHandler>,
}

fn set_half(word: &mut u64, high: bool, value: u32) {
    let shift = if high { 32 } else { 0 };
    *word = (*word & !(0xffff_ffffu64 << shift)) | (u64::from(value) << shift);
}

impl ConversionDoorbell {
    pub fn new(banks: usize, handler: std::sync::Arc<dyn ConversionHandler>) -> Self {
        let idle = Bank {
            gpa: 0,
            size: 0,
            status: DoorbellStatus::Idle,
        };
        ConversionDoorbell {
            banks: (0..banks).map(|_| Mutex::new(idle)).collect(),
            handler,
        }
    }

    /// Splits a bus offset into (bank, register) if the bank exists.
    fn locate(&self, offset: u64) -> Option<(usize, u64)> {
        let bank = usize::try_from(offset / DOORBELL_BANK_SIZE).ok()?;
        (bank < self.banks.len()).then_some((bank, offset % DOORBELL_BANK_SIZE))
    }

    /// Decodes a COMMAND write into the request it stands for.
    pub fn decode_command(gpa: u64, size: u64, command: u32) -> Option<MemoryConversion> {
        let direction = match command {
            COMMAND_TO_SHARED => ConversionDirection::ToShared,
            COMMAND_TO_PRIVATE => ConversionDirection::ToPrivate,
            _ => return None,
        };
        Some(MemoryConversion {
            gpa,
            size,
            direction,
        })
    }
}

impl ConversionDoorbell {
    /// A bank's registers. A panic elsewhere while a bank was held leaves
    /// plain register values behind, so a poisoned lock is still usable
    /// and must not take the vCPU thread down with it.
    fn bank(&self, bank: usize) -> std::sync::MutexGuard<'_, Bank> {
        self.banks[bank]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl BusDevice for ConversionDoorbell {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let value = match self.locate(offset) {
            Some((bank, reg)) => {
                let b = self.bank(bank);
                match reg {
                    REG_GPA_LO => arch::low32(b.gpa),
                    REG_GPA_HI => arch::high32(b.gpa),
                    REG_SIZE_LO => arch::low32(b.size),
                    REG_SIZE_HI => arch::high32(b.size),
                    REG_STATUS => b.status as u32,
                    _ => 0,
                }
            }
            None => u32::MAX,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Some((bank, reg)) = self.locate(offset) else {
            return;
        };
        // Registers are 32-bit; narrower writes are zero-extended.
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        // Each bank belongs to one vCPU, so holding its lock across the
        // conversion blocks nobody else; other banks convert in parallel.
        let mut b = self.bank(bank);
        match reg {
            REG_GPA_LO => set_half(&mut b.gpa, false, value),
            REG_GPA_HI => set_half(&mut b.gpa, true, value),
            REG_SIZE_LO => set_half(&mut b.size, false, value),
            REG_SIZE_HI => set_half(&mut b.size, true, value),
            REG_COMMAND => {
                b.status = match Self::decode_command(b.gpa, b.size, value) {
                    // A bank per vCPU: fewer than 256.
                    Some(conversion) => self
                        .handler
                        .convert(conversion, u8::try_from(bank).unwrap_or(u8::MAX)),
                    None if value == COMMAND_NOP => DoorbellStatus::Ok,
                    None => DoorbellStatus::BadCommand,
                };
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Recorder(Mutex<Vec<MemoryConversion>>);
    impl ConversionHandler for Recorder {
        fn convert(&self, conversion: MemoryConversion, _bank: u8) -> DoorbellStatus {
            self.0.lock().unwrap().push(conversion);
            if conversion.size == 0 {
                DoorbellStatus::Invalid
            } else {
                DoorbellStatus::Ok
            }
        }
    }

    fn write32(d: &ConversionDoorbell, offset: u64, value: u32) {
        d.write(offset, &value.to_le_bytes());
    }

    fn read32(d: &ConversionDoorbell, offset: u64) -> u32 {
        let mut buf = [0u8; 4];
        d.read(offset, &mut buf);
        u32::from_le_bytes(buf)
    }

    fn request(d: &ConversionDoorbell, bank: u64, gpa: u64, size: u64, cmd: u32) -> u32 {
        let base = bank * DOORBELL_BANK_SIZE;
        write32(d, base + REG_GPA_LO, arch::low32(gpa));
        write32(d, base + REG_GPA_HI, arch::high32(gpa));
        write32(d, base + REG_SIZE_LO, arch::low32(size));
        write32(d, base + REG_SIZE_HI, arch::high32(size));
        write32(d, base + REG_COMMAND, cmd);
        read32(d, base + REG_STATUS)
    }

    #[test]
    fn decodes_64_bit_requests_into_conversions() {
        let rec = Arc::new(Recorder::default());
        let d = ConversionDoorbell::new(2, rec.clone());
        assert_eq!(read32(&d, REG_STATUS), DoorbellStatus::Idle as u32);
        let status = request(&d, 1, 0x12_3456_7000, 0x2_0000_0000, COMMAND_TO_PRIVATE);
        assert_eq!(status, DoorbellStatus::Ok as u32);
        assert_eq!(
            rec.0.lock().unwrap().as_slice(),
            &[MemoryConversion {
                gpa: 0x12_3456_7000,
                size: 0x2_0000_0000,
                direction: ConversionDirection::ToPrivate
            }]
        );
        assert_eq!(read32(&d, DOORBELL_BANK_SIZE + REG_GPA_HI), 0x12);
        // Bank 0 is untouched by bank 1's request.
        assert_eq!(read32(&d, REG_STATUS), DoorbellStatus::Idle as u32);
    }

    #[test]
    fn registers_read_back_and_a_rewrite_replaces_the_old_half() {
        let rec = Arc::new(Recorder::default());
        let d = ConversionDoorbell::new(1, rec.clone());
        request(
            &d,
            0,
            0xffff_ffff_ffff_f000,
            0xffff_ffff_ffff_f000,
            COMMAND_NOP,
        );
        // Every half rewritten with fewer bits set than it had.
        let status = request(&d, 0, 0x12_3456_7000, 0x3_0000_5000, COMMAND_TO_SHARED);
        assert_eq!(status, DoorbellStatus::Ok as u32);
        assert_eq!(
            [REG_GPA_LO, REG_GPA_HI, REG_SIZE_LO, REG_SIZE_HI].map(|r| read32(&d, r)),
            [0x3456_7000, 0x12, 0x5000, 0x3]
        );
        assert_eq!(
            rec.0.lock().unwrap().as_slice(),
            &[MemoryConversion {
                gpa: 0x12_3456_7000,
                size: 0x3_0000_5000,
                direction: ConversionDirection::ToShared
            }]
        );
    }

    #[test]
    fn handler_status_is_reported() {
        let rec = Arc::new(Recorder::default());
        let d = ConversionDoorbell::new(1, rec);
        assert_eq!(
            request(&d, 0, 0x1000, 0, COMMAND_TO_SHARED),
            DoorbellStatus::Invalid as u32
        );
    }

    #[test]
    fn unknown_command_and_bank_never_reach_the_handler() {
        let rec = Arc::new(Recorder::default());
        let d = ConversionDoorbell::new(1, rec.clone());
        assert_eq!(
            request(&d, 0, 0x1000, 0x1000, 7),
            DoorbellStatus::BadCommand as u32
        );
        write32(&d, DOORBELL_BANK_SIZE + REG_COMMAND, COMMAND_TO_SHARED);
        assert_eq!(read32(&d, DOORBELL_BANK_SIZE + REG_STATUS), u32::MAX);
        assert!(rec.0.lock().unwrap().is_empty());
    }

    #[test]
    fn nop_succeeds_without_a_conversion() {
        let rec = Arc::new(Recorder::default());
        let d = ConversionDoorbell::new(1, rec.clone());
        assert_eq!(request(&d, 0, 0, 0, COMMAND_NOP), DoorbellStatus::Ok as u32);
        assert!(rec.0.lock().unwrap().is_empty());
    }
}
