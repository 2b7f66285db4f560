//! A userspace IOAPIC for the split irqchip KVM requires of a TD: the
//! LAPICs stay in the kernel, the IOAPIC is the VMM's. An 82093AA-style
//! IOAPIC (version 0x11, 24 pins) as the guest sees it at 0xfec00000:
//! IOREGSEL at offset 0x00 selects a register, IOWIN at offset 0x10 reads
//! or writes it; registers 0x10 + 2n and 0x11 + 2n are the low and high
//! halves of pin n's redirection entry.
//!
//! An interrupt is delivered as the MSI the entry describes (what KVM's
//! LAPICs take from userspace, `KVM_SIGNAL_MSI`, or from the GSI routes
//! `msi_routes` gives, which also tell KVM which vectors are level
//! triggered so it reports their EOIs: `KVM_EXIT_IOAPIC_EOI`).
//! Level-triggered pins keep Remote IRR set from delivery until the EOI of
//! their vector; a line still asserted at the EOI is delivered again.
//! Masked pins deliver nothing; a level entry unmasked or rewritten while
//! its line is asserted is delivered at that write, as KVM's IOAPIC does;
//! an entry made edge loses its Remote IRR.

use hypervisor::MsiRoute;

pub const IOAPIC_PINS: usize = 24;
const PINS: u32 = ::arch::fit_u32(IOAPIC_PINS as u64);
pub const IOREGSEL: u64 = 0x00;
pub const IOWIN: u64 = 0x10;
const VERSION: u32 = 0x11;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_REDIRECTION: u32 = 0x10;

/// Redirection entry fields.
pub const VECTOR: u64 = 0xff;
pub const DELIVERY_MODE: u64 = 0x7 << 8;
pub const DEST_LOGICAL: u64 = 1 << 11;
/// Read-only: a delivery is pending (never, here: delivery is at once).
pub const DELIVERY_STATUS: u64 = 1 << 12;
pub const POLARITY_LOW: u64 = 1 << 13;
/// Read-only: a level interrupt was delivered and not yet EOIed.
pub const REMOTE_IRR: u64 = 1 << 14;
pub const TRIGGER_LEVEL: u64 = 1 << 15;
pub const MASKED: u64 = 1 << 16;
const DESTINATION_SHIFT: u32 = 56;
const READ_ONLY: u64 = DELIVERY_STATUS | REMOTE_IRR;
/// Bits 17..55 are reserved.
const WRITABLE: u64 = VECTOR
    | DELIVERY_MODE
    | DEST_LOGICAL
    | POLARITY_LOW
    | TRIGGER_LEVEL
    | MASKED
    | (0xff << DESTINATION_SHIFT);

/// One interrupt to deliver: pin and the MSI its entry makes of it.
pub type Delivery = MsiRoute;

#[derive(Debug, Clone)]
pub struct Ioapic {
    id: u32,
    ioregsel: u32,
    entries: [u64; IOAPIC_PINS],
    /// Lines currently asserted, one bit per pin (level semantics; an
    /// edge is a rising transition of this).
    lines: u32,
}

impl Default for Ioapic {
    fn default() -> Self {
        Self::new()
    }
}

impl Ioapic {
    /// At reset every pin is masked, edge triggered, vector 0.
    pub fn new() -> Self {
        Ioapic {
            id: 0,
            ioregsel: 0,
            entries: [MASKED; IOAPIC_PINS],
            lines: 0,
        }
    }

    pub fn entry(&self, pin: usize) -> u64 {
        self.entries[pin]
    }

    /// The MSI pin `pin`'s entry describes: to the LAPIC(s) of its
    /// destination, with its vector, delivery and trigger modes.
    fn message(&self, pin: usize) -> Delivery {
        let e = self.entries[pin];
        let destination = (e >> DESTINATION_SHIFT) & 0xff;
        let logical = u64::from(e & DEST_LOGICAL != 0);
        let level = e & TRIGGER_LEVEL != 0;
        MsiRoute {
            gsi: u32::try_from(pin).unwrap_or(u32::MAX),
            address: arch::layout::LAPIC_START | destination << 12 | logical << 2,
            // Bit 15 is the trigger mode; KVM takes every MSI as asserted.
            data: (e & (VECTOR | DELIVERY_MODE)) as u32 | u32::from(level) << 15,
        }
    }

    /// Delivers pin `pin` if its entry and state allow: unmasked, and for
    /// level pins no delivery awaiting its EOI.
    fn try_deliver(&mut self, pin: usize) -> Option<Delivery> {
        let e = self.entries[pin];
        if e & MASKED != 0 {
            return None;
        }
        if e & TRIGGER_LEVEL != 0 {
            if e & REMOTE_IRR != 0 {
                return None;
            }
            self.entries[pin] |= REMOTE_IRR;
        }
        Some(self.message(pin))
    }

    /// The device side: pin `pin`'s line is now `asserted`. Returns the
    /// interrupt to deliver, if any. Edge pins fire on a rising edge (and
    /// an edge while masked is lost, as on the chip); level pins fire
    /// while asserted.
    pub fn set_irq(&mut self, pin: usize, asserted: bool) -> Option<Delivery> {
        assert!(pin < IOAPIC_PINS, "IOAPIC pin {pin}");
        let bit = 1u32 << pin;
        let was = self.lines & bit != 0;
        if asserted {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
        let level = self.entries[pin] & TRIGGER_LEVEL != 0;
        match (asserted, level) {
            (true, true) => self.try_deliver(pin),
            (true, false) if !was => self.try_deliver(pin),
            _ => None,
        }
    }

    /// The LAPIC's EOI of `vector` (`KVM_EXIT_IOAPIC_EOI`): clears Remote
    /// IRR of the level pins with that vector and delivers those whose
    /// line is still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) -> Vec<Delivery> {
        let mut out = Vec::new();
        for pin in 0..IOAPIC_PINS {
            let e = self.entries[pin];
            // Only level entries carry Remote IRR (a write making an entry
            // edge clears it).
            if e & REMOTE_IRR == 0 || (e & VECTOR) as u8 != vector {
                continue;
            }
            self.entries[pin] &= !REMOTE_IRR;
            if self.lines & (1 << pin) != 0
                && let Some(d) = self.try_deliver(pin)
            {
                out.push(d);
            }
        }
        out
    }

    /// A 32-bit read at `offset` in the IOAPIC's page.
    pub fn read(&self, offset: u64) -> u32 {
        match offset {
            IOREGSEL => self.ioregsel,
            IOWIN => self.read_register(self.ioregsel),
            // Nothing else is decoded.
            _ => 0,
        }
    }

    /// A 32-bit write at `offset`; returns what it makes deliverable (a
    /// level pin unmasked while asserted).
    pub fn write(&mut self, offset: u64, value: u32) -> Option<Delivery> {
        match offset {
            IOREGSEL => {
                self.ioregsel = value & 0xff;
                None
            }
            IOWIN => self.write_register(self.ioregsel, value),
            _ => None,
        }
    }

    fn read_register(&self, register: u32) -> u32 {
        match register {
            REG_ID => self.id << 24,
            REG_VERSION => ((PINS - 1) << 16) | VERSION,
            REG_ARBITRATION => self.id << 24,
            r if (REG_REDIRECTION..REG_REDIRECTION + 2 * PINS).contains(&r) => {
                let e = self.entries[((r - REG_REDIRECTION) / 2) as usize];
                if r % 2 == 0 {
                    ::arch::low32(e)
                } else {
                    ::arch::high32(e)
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, register: u32, value: u32) -> Option<Delivery> {
        match register {
            REG_ID => {
                self.id = (value >> 24) & 0xf;
                None
            }
            r if (REG_REDIRECTION..REG_REDIRECTION + 2 * PINS).contains(&r) => {
                let pin = ((r - REG_REDIRECTION) / 2) as usize;
                let old = self.entries[pin];
                let written = if r % 2 == 0 {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | u64::from(value) << 32
                };
                let mut new = (written & WRITABLE) | (old & READ_ONLY);
                // An edge pin has no interrupt awaiting an EOI.
                if new & TRIGGER_LEVEL == 0 {
                    new &= !REMOTE_IRR;
                }
                self.entries[pin] = new;
                // As KVM's IOAPIC does: a level entry written while its
                // line is asserted is delivered if it can be (unmasked, no
                // interrupt awaiting its EOI), whatever it was before.
                if new & TRIGGER_LEVEL != 0 && self.lines & (1 << pin) != 0 {
                    return self.try_deliver(pin);
                }
                None
            }
            // Version and arbitration are read-only.
            _ => None,
        }
    }

    /// GSI routes for the unmasked pins (GSI n = pin n), what KVM scans
    /// for level-triggered vectors to report their EOIs.
    pub fn msi_routes(&self) -> Vec<MsiRoute> {
        (0..IOAPIC_PINS)
            .filter(|pin| self.entries[*pin] & MASKED == 0)
            .map(|pin| self.message(pin))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(ioapic: &mut Ioapic, pin: usize, entry: u64) {
        let low = REG_REDIRECTION + 2 * u32::try_from(pin).unwrap();
        ioapic.write(IOREGSEL, low + 1);
        ioapic.write(IOWIN, (entry >> 32) as u32);
        ioapic.write(IOREGSEL, low);
        ioapic.write(IOWIN, ::arch::low32(entry));
    }

    fn read_entry(ioapic: &mut Ioapic, pin: usize) -> u64 {
        let low = REG_REDIRECTION + 2 * u32::try_from(pin).unwrap();
        ioapic.write(IOREGSEL, low);
        let lo = ioapic.read(IOWIN);
        ioapic.write(IOREGSEL, low + 1);
        let hi = ioapic.read(IOWIN);
        u64::from(hi) << 32 | u64::from(lo)
    }

    #[test]
    fn registers_read_and_write_through_ioregsel_and_iowin() {
        let mut ioapic = Ioapic::new();
        ioapic.write(IOREGSEL, REG_VERSION);
        assert_eq!(ioapic.read(IOREGSEL), REG_VERSION);
        assert_eq!(ioapic.read(IOWIN), 0x0017_0011, "24 pins, version 0x11");
        ioapic.write(IOWIN, 0);
        assert_eq!(ioapic.read(IOWIN), 0x0017_0011, "read-only");
        ioapic.write(IOREGSEL, REG_ID);
        ioapic.write(IOWIN, 0x0500_0000);
        assert_eq!(ioapic.read(IOWIN), 0x0500_0000);
        // The arbitration ID follows the ID, and is read-only.
        ioapic.write(IOREGSEL, REG_ARBITRATION);
        assert_eq!(ioapic.read(IOWIN), 0x0500_0000);
        ioapic.write(IOWIN, 0x0700_0000);
        assert_eq!(ioapic.read(IOWIN), 0x0500_0000);
        // Every pin starts masked.
        for pin in 0..IOAPIC_PINS {
            assert_eq!(read_entry(&mut ioapic, pin), MASKED);
        }
        // Level, active low, logical destination 3, vector 0x31: the
        // guest's bits, by the 82093AA's numbers.
        let entry = 0x0300_0000_0000_a831;
        assert_eq!(
            entry,
            0x0300_0000_0000_0000 | TRIGGER_LEVEL | POLARITY_LOW | DEST_LOGICAL | 0x31
        );
        program(&mut ioapic, 23, entry);
        assert_eq!(read_entry(&mut ioapic, 23), entry);
        assert_eq!(ioapic.entry(23), entry);
        // Each half is written alone: a new destination keeps the rest.
        ioapic.write(IOREGSEL, REG_REDIRECTION + 47);
        ioapic.write(IOWIN, 0x0900_0000);
        assert_eq!(ioapic.entry(23), 0x0900_0000_0000_a831);
        ioapic.write(IOREGSEL, REG_REDIRECTION + 46);
        ioapic.write(IOWIN, 0x0001_0031);
        assert_eq!(ioapic.entry(23), 0x0900_0000_0001_0031);
        // Reserved and read-only bits do not stick.
        program(&mut ioapic, 5, 0x00ff_ffff_fffe_0000 | 0x5000 | 0x40);
        assert_eq!(read_entry(&mut ioapic, 5), 0x40);
        // Past the last entry, and other offsets, read zero.
        ioapic.write(IOREGSEL, REG_REDIRECTION + 48);
        assert_eq!(ioapic.read(IOWIN), 0);
        // And a write there changes nothing.
        let before: Vec<u64> = (0..IOAPIC_PINS).map(|pin| ioapic.entry(pin)).collect();
        for register in [REG_REDIRECTION + 48, REG_REDIRECTION + 49, 0x40, 0xff] {
            ioapic.write(IOREGSEL, register);
            assert_eq!(ioapic.write(IOWIN, 0x31), None);
            assert_eq!(ioapic.read(IOWIN), 0);
        }
        let after: Vec<u64> = (0..IOAPIC_PINS).map(|pin| ioapic.entry(pin)).collect();
        assert_eq!(before, after);
        assert_eq!(ioapic.read(0x20), 0);
    }

    #[test]
    fn masked_pins_deliver_nothing_and_edges_fire_once() {
        let mut ioapic = Ioapic::new();
        assert_eq!(ioapic.set_irq(4, true), None, "masked at reset");
        ioapic.set_irq(4, false);
        program(&mut ioapic, 4, 0x0100_0000_0000_0000 | 0x24);
        let d = ioapic.set_irq(4, true).unwrap();
        assert_eq!(
            d,
            MsiRoute {
                gsi: 4,
                address: 0xfee0_1000,
                data: 0x24
            }
        );
        assert_eq!(ioapic.set_irq(4, true), None, "no new edge");
        ioapic.set_irq(4, false);
        assert!(ioapic.set_irq(4, true).is_some());
        assert_eq!(ioapic.entry(4) & REMOTE_IRR, 0, "edges have no Remote IRR");
        // An edge while masked is lost, unmasking does not replay it.
        ioapic.set_irq(4, false);
        program(&mut ioapic, 4, MASKED | 0x24);
        assert_eq!(ioapic.set_irq(4, true), None);
        ioapic.write(IOREGSEL, REG_REDIRECTION + 8);
        assert_eq!(ioapic.write(IOWIN, 0x24), None);
    }

    #[test]
    fn level_pins_hold_remote_irr_until_their_eoi() {
        let mut ioapic = Ioapic::new();
        program(&mut ioapic, 9, TRIGGER_LEVEL | DEST_LOGICAL | 0x59);
        let d = ioapic.set_irq(9, true).unwrap();
        assert_eq!(d.address, 0xfee0_0004, "logical destination 0");
        assert_eq!(d.data, 0x59 | 1 << 15, "level triggered");
        assert_ne!(ioapic.entry(9) & REMOTE_IRR, 0);
        // The guest rewriting the entry while it awaits its EOI keeps
        // Remote IRR (read-only to it).
        program(&mut ioapic, 9, TRIGGER_LEVEL | DEST_LOGICAL | 0x59);
        assert_eq!(ioapic.entry(9), 0xc859);
        // Still asserted, but awaiting its EOI: nothing more.
        assert_eq!(ioapic.set_irq(9, true), None);
        // Another vector's EOI changes nothing.
        assert!(ioapic.end_of_interrupt(0x60).is_empty());
        assert_ne!(ioapic.entry(9) & REMOTE_IRR, 0);
        // The EOI with the line still asserted delivers again.
        let again = ioapic.end_of_interrupt(0x59);
        assert_eq!(again, vec![d]);
        assert_ne!(ioapic.entry(9) & REMOTE_IRR, 0);
        // Deasserted, the EOI only clears Remote IRR.
        ioapic.set_irq(9, false);
        assert!(ioapic.end_of_interrupt(0x59).is_empty());
        assert_eq!(ioapic.entry(9) & REMOTE_IRR, 0);
        // Remote IRR is not writable by the guest.
        ioapic.write(IOREGSEL, REG_REDIRECTION + 18);
        ioapic.write(
            IOWIN,
            u32::try_from(TRIGGER_LEVEL | REMOTE_IRR | 0x59).unwrap(),
        );
        assert_eq!(ioapic.entry(9) & REMOTE_IRR, 0);
    }

    /// An edge pin's line held asserted, its entry then made level: it is
    /// delivered at the write (KVM's rule), once until its EOI.
    #[test]
    fn an_entry_made_level_while_its_line_is_asserted_is_delivered() {
        let mut ioapic = Ioapic::new();
        program(&mut ioapic, 7, 0x37);
        assert!(ioapic.set_irq(7, true).is_some(), "the rising edge");
        assert!(ioapic.end_of_interrupt(0x37).is_empty(), "an edge pin");
        ioapic.write(IOREGSEL, REG_REDIRECTION + 14);
        let d = ioapic.write(IOWIN, 0x8037).expect("delivered at the write");
        assert_eq!((d.gsi, d.data), (7, 0x8037));
        assert_eq!(ioapic.entry(7), 0xc037, "Remote IRR set");
        assert_eq!(ioapic.write(IOWIN, 0x8037), None, "awaiting its EOI");
        assert_eq!(ioapic.end_of_interrupt(0x37), vec![d]);
        // Made edge again, Remote IRR goes, and the EOI delivers nothing.
        assert_eq!(ioapic.write(IOWIN, 0x37), None);
        assert_eq!(ioapic.entry(7), 0x37);
        assert!(ioapic.end_of_interrupt(0x37).is_empty());
    }

    #[test]
    fn a_level_pin_unmasked_while_asserted_is_delivered() {
        let mut ioapic = Ioapic::new();
        program(&mut ioapic, 11, MASKED | TRIGGER_LEVEL | 0x3b);
        assert_eq!(ioapic.set_irq(11, true), None);
        ioapic.write(IOREGSEL, REG_REDIRECTION + 22);
        let d = ioapic
            .write(IOWIN, u32::try_from(TRIGGER_LEVEL | 0x3b).unwrap())
            .unwrap();
        assert_eq!((d.gsi, d.data & 0xff), (11, 0x3b));
        // Masked again while awaiting its EOI: the EOI clears Remote IRR
        // and delivers nothing.
        ioapic.write(IOWIN, u32::try_from(MASKED | TRIGGER_LEVEL | 0x3b).unwrap());
        assert!(ioapic.end_of_interrupt(0x3b).is_empty());
        assert_eq!(ioapic.entry(11) & REMOTE_IRR, 0);
        // Switching a pin to edge clears a pending Remote IRR.
        program(&mut ioapic, 11, TRIGGER_LEVEL | 0x3b);
        assert!(
            ioapic.set_irq(11, true).is_none(),
            "delivered at unmask above"
        );
        assert_ne!(ioapic.entry(11) & REMOTE_IRR, 0);
        program(&mut ioapic, 11, 0x3b);
        assert_eq!(ioapic.entry(11) & REMOTE_IRR, 0);
    }

    #[test]
    fn routes_cover_the_unmasked_pins() {
        let mut ioapic = Ioapic::new();
        assert!(ioapic.msi_routes().is_empty());
        program(&mut ioapic, 2, 0x0200_0000_0000_0000 | 0x30);
        program(&mut ioapic, 14, TRIGGER_LEVEL | 0x3e);
        let routes = ioapic.msi_routes();
        assert_eq!(
            routes,
            [
                MsiRoute {
                    gsi: 2,
                    address: 0xfee0_2000,
                    data: 0x30
                },
                MsiRoute {
                    gsi: 14,
                    address: 0xfee0_0000,
                    data: 0x3e | 1 << 15
                },
            ]
        );
    }
}
