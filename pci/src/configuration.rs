//! Type-0 configuration space pieces a VMM emulates itself: BAR registers
//! (sizing, address masking, decode state) and partial-register writes.

/// Dword index of the command / status register.
pub const COMMAND_REG: usize = 1;
/// Dword index of BAR0; BAR5 is `BAR0_REG + 5`.
pub const BAR0_REG: usize = 4;
pub const NUM_BARS: usize = 6;
/// Dword index of the expansion ROM BAR.
pub const ROM_REG: usize = 12;
/// Dword index of the capability pointer.
pub const CAPABILITY_POINTER_REG: usize = 13;
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Status register bit: a capability list exists.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Size of legacy configuration space; ECAM offers 4 KiB per function.
pub const LEGACY_CONFIG_SIZE: usize = 256;
pub const CONFIG_SIZE: usize = 4096;

const BAR_MEM64: u32 = 0b100;
const BAR_PREFETCHABLE: u32 = 0b1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Mem32,
    Mem64,
}

/// One memory BAR: its size (a power of two, at least 4 KiB here so a BAR
/// never shares a page) and where it currently points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
    pub address: u64,
}

/// The six BAR registers. A write keeps only the address bits the size
/// allows, so writing all ones and reading back yields the size, as the
/// PCI specification's sizing procedure expects.
#[derive(Debug, Default, Clone)]
pub struct BarRegisters {
    bars: [Option<Bar>; NUM_BARS],
}

impl BarRegisters {
    /// Declares BAR `index`; a 64-bit BAR also takes register `index + 1`.
    pub fn set(&mut self, index: usize, bar: Bar) {
        assert!(bar.size.is_power_of_two(), "BAR sizes are powers of two");
        assert!(bar.kind == BarKind::Mem32 || index + 1 < NUM_BARS);
        self.bars[index] = Some(bar);
    }

    pub fn get(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, Bar)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.map(|b| (i, b)))
    }

    /// The BAR whose upper half register `index` is, if any.
    fn upper_half_of(&self, index: usize) -> Option<(usize, Bar)> {
        let lower = index.checked_sub(1)?;
        self.get(lower)
            .filter(|b| b.kind == BarKind::Mem64)
            .map(|b| (lower, b))
    }

    /// Value of BAR register `index` (0..6).
    pub fn read(&self, index: usize) -> u32 {
        if let Some((_, bar)) = self.upper_half_of(index) {
            return (bar.address >> 32) as u32;
        }
        match self.get(index) {
            None => 0,
            Some(bar) => {
                let mut flags = 0;
                if bar.kind == BarKind::Mem64 {
                    flags |= BAR_MEM64;
                }
                if bar.prefetchable {
                    flags |= BAR_PREFETCHABLE;
                }
                (arch::low32(bar.address) & !0xf) | flags
            }
        }
    }

    /// Writes BAR register `index`; the address keeps only the bits the
    /// size allows. Registers of absent BARs ignore writes.
    pub fn write(&mut self, index: usize, value: u32) {
        if let Some((lower, mut bar)) = self.upper_half_of(index) {
            let mask = !(bar.size - 1);
            bar.address = ((u64::from(value) << 32) | (bar.address & 0xffff_ffff)) & mask;
            self.bars[lower] = Some(bar);
            return;
        }
        if let Some(mut bar) = self.get(index) {
            let mask = !(bar.size - 1);
            bar.address = ((bar.address & !0xffff_ffff) | u64::from(value & !0xf)) & mask;
            self.bars[index] = Some(bar);
        }
    }

    /// Whether register `index` belongs to some BAR.
    pub fn is_bar_register(index: usize) -> bool {
        (0..NUM_BARS).contains(&index)
    }
}

/// `old` with `data` written at byte `offset` inside the dword (a guest
/// may write 1, 2 or 4 bytes of a register).
pub fn merge_write(old: u32, offset: usize, data: &[u8]) -> u32 {
    let mut bytes = old.to_le_bytes();
    for (i, b) in data.iter().enumerate() {
        if let Some(slot) = bytes.get_mut(offset + i) {
            *slot = *b;
        }
    }
    u32::from_le_bytes(bytes)
}

/// The bytes a guest read of `data.len()` at `offset` inside `value` sees.
pub fn extract_read(value: u32, offset: usize, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    for (i, slot) in data.iter_mut().enumerate() {
        *slot = bytes.get(offset + i).copied().unwrap_or(0xff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem32(size: u64, address: u64) -> Bar {
        Bar {
            size,
            kind: BarKind::Mem32,
            prefetchable: false,
            address,
        }
    }

    #[test]
    fn sizing_a_32_bit_bar_reads_back_its_size_and_restoring_keeps_the_address() {
        let mut bars = BarRegisters::default();
        bars.set(0, mem32(0x1000, 0xc000_0000));
        assert_eq!(bars.read(0), 0xc000_0000);
        bars.write(0, 0xffff_ffff);
        let sized = bars.read(0);
        assert_eq!(!(sized & !0xf) + 1, 0x1000);
        bars.write(0, 0xc000_0000);
        assert_eq!(bars.get(0).unwrap().address, 0xc000_0000);
        // Low bits below the size are not addressable.
        bars.write(0, 0xc000_0123);
        assert_eq!(bars.get(0).unwrap().address, 0xc000_0000);
    }

    #[test]
    fn a_64_bit_bar_spans_two_registers_and_sizes_across_both() {
        let mut bars = BarRegisters::default();
        bars.set(
            2,
            Bar {
                size: 1 << 33,
                kind: BarKind::Mem64,
                prefetchable: true,
                address: 0x40_0000_0000,
            },
        );
        assert_eq!(bars.read(2), 0b1100);
        assert_eq!(bars.read(3), 0x40);
        bars.write(2, 0xffff_ffff);
        bars.write(3, 0xffff_ffff);
        let size = !((u64::from(bars.read(3)) << 32) | u64::from(bars.read(2) & !0xf)) + 1;
        assert_eq!(size, 1 << 33);
        bars.write(2, 0);
        bars.write(3, 0x80);
        assert_eq!(bars.get(2).unwrap().address, 0x80_0000_0000);
        assert_eq!(bars.read(4), 0, "the register after a 64-bit BAR is free");
    }

    #[test]
    fn absent_bars_read_zero_and_ignore_writes() {
        let mut bars = BarRegisters::default();
        bars.write(1, 0xffff_ffff);
        assert_eq!(bars.read(1), 0);
        assert_eq!(bars.iter().count(), 0);
        assert!(BarRegisters::is_bar_register(5));
        assert!(!BarRegisters::is_bar_register(6));
    }

    #[test]
    fn partial_writes_and_reads_touch_only_their_bytes() {
        assert_eq!(merge_write(0x1122_3344, 2, &[0xaa]), 0x11aa_3344);
        assert_eq!(merge_write(0x1122_3344, 0, &[0xaa, 0xbb]), 0x1122_bbaa);
        assert_eq!(merge_write(0x1122_3344, 0, &[1, 2, 3, 4]), 0x0403_0201);
        let mut two = [0u8; 2];
        extract_read(0x1122_3344, 2, &mut two);
        assert_eq!(two, [0x22, 0x11]);
        let mut one = [0u8; 1];
        extract_read(0x1122_3344, 1, &mut one);
        assert_eq!(one, [0x33]);
    }
}
