//! MSI-X as the VMM emulates it: the vector table lives with the VMM (the
//! guest's writes never reach the device), and every change of a vector's
//! message, mask or of the capability's enable / function-mask bits is
//! turned into a route on the interrupt controller.

use std::sync::Arc;

use log::warn;
use vm_device::{MsiMessage, MsiVectors};

pub const CAPABILITY_ID: u8 = 0x11;
pub const ENTRY_SIZE: u64 = 16;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const CONTROL_TABLE_SIZE: u16 = 0x7ff;
const VECTOR_MASKED: u32 = 1;

/// Where the table and the pending-bit array live, as the capability says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    /// Byte offset of the capability in configuration space.
    pub capability: usize,
    pub vectors: u16,
    pub table_bar: usize,
    pub table_offset: u64,
    pub pba_bar: usize,
    pub pba_offset: u64,
}

impl MsixLayout {
    /// Decodes the capability's message control, table and PBA dwords.
    pub fn decode(capability: usize, control: u16, table: u32, pba: u32) -> Self {
        MsixLayout {
            capability,
            vectors: (control & CONTROL_TABLE_SIZE) + 1,
            table_bar: (table & 7) as usize,
            table_offset: u64::from(table & !7),
            pba_bar: (pba & 7) as usize,
            pba_offset: u64::from(pba & !7),
        }
    }

    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * ENTRY_SIZE
    }

    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }

    /// Offset inside the table if `bar`/`offset` fall in it.
    pub fn in_table(&self, bar: usize, offset: u64) -> Option<u64> {
        (bar == self.table_bar
            && (self.table_offset..self.table_offset + self.table_len()).contains(&offset))
        .then(|| offset - self.table_offset)
    }

    pub fn in_pba(&self, bar: usize, offset: u64) -> Option<u64> {
        (bar == self.pba_bar
            && (self.pba_offset..self.pba_offset + self.pba_len()).contains(&offset))
        .then(|| offset - self.pba_offset)
    }

    /// Which MSI-X structure, if any, an access at `bar`/`offset` lands in
    /// (the table first, where a device overlaps them).
    pub fn locate(&self, bar: usize, offset: u64) -> Option<MsixPart> {
        if let Some(at) = self.in_table(bar, offset) {
            return Some(MsixPart::Table(at));
        }
        self.in_pba(bar, offset).map(|_| MsixPart::Pba)
    }
}

/// Where a BAR access lands among the MSI-X structures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixPart {
    /// The vector table, at this offset into it.
    Table(u64),
    /// The pending-bit array.
    Pba,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    address: u64,
    data: u32,
    control: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Vectors come out of reset masked.
        Entry {
            address: 0,
            data: 0,
            control: VECTOR_MASKED,
        }
    }
}

pub struct MsixTable {
    layout: MsixLayout,
    entries: Vec<Entry>,
    enabled: bool,
    function_masked: bool,
    vectors: Option<Arc<dyn MsiVectors>>,
    /// What each vector is routed to now (`None`: held back).
    routed: Vec<Option<MsiMessage>>,
}

impl MsixTable {
    /// `vectors` is where routes go; without one (no irqchip) the table
    /// still behaves for the guest but nothing is delivered.
    pub fn new(layout: MsixLayout, vectors: Option<Arc<dyn MsiVectors>>) -> Self {
        let n = usize::from(layout.vectors);
        MsixTable {
            layout,
            entries: vec![Entry::default(); n],
            enabled: false,
            function_masked: false,
            vectors,
            routed: vec![None; n],
        }
    }

    pub fn layout(&self) -> &MsixLayout {
        &self.layout
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The message control bits the guest sees (table size from layout).
    pub fn control(&self) -> u16 {
        let mut control = self.layout.vectors - 1;
        if self.enabled {
            control |= CONTROL_ENABLE;
        }
        if self.function_masked {
            control |= CONTROL_FUNCTION_MASK;
        }
        control
    }

    /// A guest write of message control; returns whether MSI-X was switched
    /// on (`Some(true)`) or off (`Some(false)`).
    pub fn set_control(&mut self, control: u16) -> Option<bool> {
        let was = self.enabled;
        self.enabled = control & CONTROL_ENABLE != 0;
        self.function_masked = control & CONTROL_FUNCTION_MASK != 0;
        self.update_routes();
        (was != self.enabled).then_some(self.enabled)
    }

    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let value = self.table_dword(offset);
        crate::configuration::extract_read(arch::low32(value), (offset & 3) as usize, data);
        if data.len() == 8 {
            let high = self.table_dword(offset + 4);
            data[4..].copy_from_slice(&high.to_le_bytes()[..4]);
        }
    }

    fn table_dword(&self, offset: u64) -> u64 {
        let Some(entry) = self.entries.get((offset / ENTRY_SIZE) as usize) else {
            return u64::from(u32::MAX);
        };
        u64::from(match (offset % ENTRY_SIZE) / 4 {
            0 => arch::low32(entry.address),
            1 => (entry.address >> 32) as u32,
            2 => entry.data,
            _ => entry.control,
        })
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 8 {
            self.write_table(offset, &data[..4]);
            self.write_table(offset + 4, &data[4..]);
            return;
        }
        let index = (offset / ENTRY_SIZE) as usize;
        let old = arch::low32(self.table_dword(offset));
        let value = crate::configuration::merge_write(old, (offset & 3) as usize, data);
        let Some(entry) = self.entries.get_mut(index) else {
            return;
        };
        match (offset % ENTRY_SIZE) / 4 {
            0 => entry.address = (entry.address & !0xffff_ffff) | u64::from(value),
            1 => entry.address = (entry.address & 0xffff_ffff) | (u64::from(value) << 32),
            2 => entry.data = value,
            _ => entry.control = value & VECTOR_MASKED,
        }
        self.update_routes();
    }

    /// Pending bits: a vector held back keeps its interrupt in its eventfd,
    /// so nothing is reported pending here.
    pub fn read_pba(&self, data: &mut [u8]) {
        data.fill(0);
    }

    /// What vector `index` should be routed to now.
    fn wanted(&self, index: usize) -> Option<MsiMessage> {
        let e = self.entries[index];
        (self.enabled && !self.function_masked && e.control & VECTOR_MASKED == 0).then_some(
            MsiMessage {
                address: e.address,
                data: e.data,
            },
        )
    }

    fn update_routes(&mut self) {
        for index in 0..self.entries.len() {
            let wanted = self.wanted(index);
            if wanted == self.routed[index] {
                continue;
            }
            if let Some(vectors) = &self.vectors
                && let Err(e) = vectors.route(
                    u16::try_from(index).expect("the table has layout.vectors (a u16) entries"),
                    wanted,
                )
            {
                warn!("MSI-X vector {index}: {e}");
                continue;
            }
            self.routed[index] = wanted;
        }
    }

    /// Withdraws every route (device reset or removal).
    pub fn reset(&mut self) {
        self.enabled = false;
        self.function_masked = false;
        self.entries.fill(Entry::default());
        self.update_routes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_device::InterruptError;

    #[derive(Default)]
    struct RecordedRoutes(Mutex<Vec<(u16, Option<MsiMessage>)>>);

    impl MsiVectors for RecordedRoutes {
        fn count(&self) -> u16 {
            2
        }
        fn notifier(&self, _: u16) -> Option<std::os::fd::RawFd> {
            None
        }
        fn route(&self, vector: u16, message: Option<MsiMessage>) -> Result<(), InterruptError> {
            self.0.lock().unwrap().push((vector, message));
            Ok(())
        }
    }

    fn table() -> (MsixTable, Arc<RecordedRoutes>) {
        let routes = Arc::new(RecordedRoutes::default());
        let layout = MsixLayout::decode(0x40, 1, 0x800, 0xc00);
        (MsixTable::new(layout, Some(routes.clone())), routes)
    }

    fn program(t: &mut MsixTable, vector: u64, address: u64, data: u32) {
        t.write_table(vector * 16, &arch::low32(address).to_le_bytes());
        t.write_table(vector * 16 + 4, &((address >> 32) as u32).to_le_bytes());
        t.write_table(vector * 16 + 8, &data.to_le_bytes());
    }

    #[test]
    fn layout_decodes_the_capability() {
        let l = MsixLayout::decode(0x40, 0x0003, 0x0000_2001, 0x0000_3002);
        assert_eq!(l.vectors, 4);
        assert_eq!((l.table_bar, l.table_offset), (1, 0x2000));
        assert_eq!((l.pba_bar, l.pba_offset), (2, 0x3000));
        assert_eq!(l.in_table(1, 0x2000 + 63), Some(63));
        assert_eq!(l.in_table(1, 0x2000 + 64), None);
        assert_eq!(l.in_table(0, 0x2000), None);
        assert_eq!(l.in_pba(2, 0x3007), Some(7));
        assert_eq!(l.in_pba(2, 0x3008), None);
        assert_eq!(l.locate(1, 0x2000 + 63), Some(MsixPart::Table(63)));
        assert_eq!(l.locate(2, 0x3007), Some(MsixPart::Pba));
        assert_eq!(l.locate(2, 0x3008), None);
        // Where a device puts both in one BAR over each other, the table
        // answers.
        let both = MsixLayout::decode(0x40, 0x0003, 0x0000_2001, 0x0000_2001);
        assert_eq!(both.locate(1, 0x2000), Some(MsixPart::Table(0)));
    }

    #[test]
    fn a_vector_is_routed_only_when_enabled_unmasked_and_not_function_masked() {
        let (mut t, routes) = table();
        program(&mut t, 0, 0xfee0_0000, 0x40);
        assert!(routes.0.lock().unwrap().is_empty(), "masked out of reset");
        t.write_table(12, &0u32.to_le_bytes());
        assert!(routes.0.lock().unwrap().is_empty(), "MSI-X still off");
        assert_eq!(t.set_control(1 << 15), Some(true));
        let msg = MsiMessage {
            address: 0xfee0_0000,
            data: 0x40,
        };
        assert_eq!(*routes.0.lock().unwrap(), vec![(0, Some(msg))]);
        assert_eq!(t.control(), (1 << 15) | 1);
        // Function mask holds every vector back; clearing it routes again.
        t.set_control((1 << 15) | (1 << 14));
        t.set_control(1 << 15);
        // Changing the message while routed re-routes.
        t.write_table(8, &0x41u32.to_le_bytes());
        t.write_table(12, &1u32.to_le_bytes());
        assert_eq!(t.set_control(0), Some(false));
        let expected = vec![
            (0, Some(msg)),
            (0, None),
            (0, Some(msg)),
            (0, Some(MsiMessage { data: 0x41, ..msg })),
            (0, None),
        ];
        assert_eq!(*routes.0.lock().unwrap(), expected);
    }

    #[test]
    fn the_function_mask_reads_back_and_qword_writes_split_into_dwords() {
        let (mut t, _) = table();
        t.set_control((1 << 15) | (1 << 14));
        assert_eq!(t.control(), (1 << 15) | (1 << 14) | 1);
        // A qword write of an entry's address, then a narrower low dword:
        // the high half stays, the low half is replaced, not merged.
        t.write_table(16, &0x3_ffff_0000u64.to_le_bytes());
        t.write_table(16, &0x1000u32.to_le_bytes());
        let mut eight = [0u8; 8];
        t.read_table(16, &mut eight);
        assert_eq!(u64::from_le_bytes(eight), 0x3_0000_1000);
        let mut four = [0u8; 4];
        t.read_table(20, &mut four);
        assert_eq!(u32::from_le_bytes(four), 3);
        t.read_table(0, &mut eight);
        assert_eq!(u64::from_le_bytes(eight), 0, "entry 0 untouched");
    }

    #[test]
    fn the_table_reads_back_what_was_written_and_resets_masked() {
        let (mut t, _) = table();
        program(&mut t, 1, 0x2_fee0_1000, 0x55);
        let mut eight = [0u8; 8];
        t.read_table(16, &mut eight);
        assert_eq!(u64::from_le_bytes(eight), 0x2_fee0_1000);
        let mut four = [0u8; 4];
        t.read_table(16 + 12, &mut four);
        assert_eq!(u32::from_le_bytes(four), 1, "masked");
        t.read_table(64, &mut four);
        assert_eq!(four, [0xff; 4], "past the table");
        t.reset();
        t.read_table(16 + 8, &mut four);
        assert_eq!(u32::from_le_bytes(four), 0);
        let mut pba = [0xffu8; 8];
        t.read_pba(&mut pba);
        assert_eq!(pba, [0; 8]);
    }
}
