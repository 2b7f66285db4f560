//! The ACPI tables a Linux guest reads (built with the `acpi_tables`
//! crate): RSDP, XSDT, a hardware-reduced FADT, a DSDT with the PCI host
//! bridge (its `_CRS` the BAR windows the PCI segment really uses), COM1
//! and the ECAM reservation, a MADT (every vCPU's local APIC, the IOAPIC,
//! the legacy timer's override, LINT1 as NMI) and an MCFG for our ECAM.
//! They live in the BIOS area below 1 MiB, which the e820 map reserves.

use std::ops::Range;

use acpi_tables::Aml;
use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, IO, Interrupt, Memory32Fixed, Name,
    Path, ResourceTemplate, Scope, ZERO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the tables go (arch::layout::linux).
pub use arch::layout::linux::{ACPI_TABLES_END as TABLES_END, ACPI_TABLES_START as TABLES_START};
/// The MADT's 32-bit fields take the LAPIC and IOAPIC addresses, both
/// below 4 GiB.
pub const LAPIC_ADDRESS: u32 = below_4g(arch::layout::LAPIC_START);
pub const IOAPIC_ADDRESS: u32 = below_4g(arch::layout::IOAPIC_START);

#[allow(
    clippy::cast_possible_truncation,
    reason = "checked to fit 32 bits first (at compile time, in a constant)"
)]
const fn below_4g(address: u64) -> u32 {
    assert!(address <= u32::MAX as u64);
    address as u32
}
const OEM_ID: [u8; 6] = *b"CLOUDH";
const OEM_TABLE_ID: [u8; 8] = *b"CHSHARED";
const OEM_REVISION: u32 = 1;
const COM1_PORT: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;
const PCI_CONFIG_PORT: u16 = 0xcf8;
/// MADT flags: the machine also has 8259 PICs (KVM's in-kernel irqchip).
const MADT_PCAT_COMPAT: u32 = 1;

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct Platform {
    pub vcpus: u8,
    pub ecam_base: u64,
    pub ecam_size: u64,
    /// The PCI segment's 32- and 64-bit BAR windows.
    pub mmio32: Range<u64>,
    pub mmio64: Range<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(usize),
    #[error("cannot write the ACPI tables to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// The tables, each at its guest address; the first is the RSDP.
#[derive(Debug, Clone)]
pub struct Tables {
    pub rsdp: u64,
    pub placed: Vec<(u64, Vec<u8>)>,
}

impl Tables {
    /// The table with `signature` (the RSDP's is "RSD PTR ").
    pub fn get(&self, signature: &[u8]) -> Option<&[u8]> {
        self.placed
            .iter()
            .map(|(_, bytes)| bytes.as_slice())
            .find(|bytes| bytes.starts_with(signature))
    }

    pub fn write(&self, mem: &GuestMemoryMmap) -> Result<(), AcpiError> {
        for (addr, bytes) in &self.placed {
            mem.write_slice(bytes, GuestAddress(*addr))
                .map_err(AcpiError::GuestMemory)?;
        }
        Ok(())
    }
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Appends `extra` to a finished table and fixes its length and checksum.
fn extend_table(table: &mut Vec<u8>, extra: &[u8]) {
    table.extend_from_slice(extra);
    let len = u32::try_from(table.len()).unwrap_or(u32::MAX);
    table[4..8].copy_from_slice(&len.to_le_bytes());
    table[9] = 0;
    let sum = table.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    table[9] = sum.wrapping_neg();
}

/// An interrupt source override of ISA `source` to `gsi` (MADT type 2).
fn interrupt_override(source: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut e = vec![2, 10, 0, source];
    e.extend_from_slice(&gsi.to_le_bytes());
    e.extend_from_slice(&flags.to_le_bytes());
    e
}

/// LINT1 of every processor is the NMI (MADT type 4, processor 0xff).
fn lint1_nmi() -> Vec<u8> {
    vec![4, 6, 0xff, 0, 0, 1]
}

fn dsdt(platform: &Platform) -> Vec<u8> {
    // The AML builders borrow their children: each lives in a local.
    let buses = AddressSpace::new_bus_number(0u16, 0u16);
    let config_ports = IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, 8);
    let window32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        // The 32-bit window is below 4 GiB.
        u32::try_from(platform.mmio32.start).unwrap_or(u32::MAX),
        u32::try_from(platform.mmio32.end - 1).unwrap_or(u32::MAX),
        None,
    );
    let window64 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        platform.mmio64.start,
        platform.mmio64.end - 1,
        None,
    );
    let crs_pci = ResourceTemplate::new(vec![&buses, &config_ports, &window32, &window64]);
    let (host_bridge, pcie) = (EISAName::new("PNP0A08"), EISAName::new("PNP0A03"));
    let pci_names = [
        Name::new("_HID".into(), &host_bridge),
        Name::new("_CID".into(), &pcie),
        Name::new("_ADR".into(), &ZERO),
        Name::new("_SEG".into(), &ZERO),
        Name::new("_UID".into(), &ZERO),
        Name::new("_BBN".into(), &ZERO),
        Name::new("_CRS".into(), &crs_pci),
    ];
    let pci = device("PCI0", &pci_names);

    let com1_ports = IO::new(COM1_PORT, COM1_PORT, 1, 8);
    let com1_irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs_com1 = ResourceTemplate::new(vec![&com1_ports, &com1_irq]);
    let com1_names = identified("PNP0501", &crs_com1);
    let com1 = device("COM1", &com1_names);

    // The ECAM window among the motherboard's resources, where Linux looks
    // before it trusts an MCFG entry.
    let ecam = Memory32Fixed::new(
        true,
        u32::try_from(platform.ecam_base).unwrap_or(u32::MAX),
        u32::try_from(platform.ecam_size).unwrap_or(u32::MAX),
    );
    let crs_ecam = ResourceTemplate::new(vec![&ecam]);
    let board_names = identified("PNP0C02", &crs_ecam);
    let motherboard = device("MRES", &board_names);
    let sb = Scope::new(Path::new("\\_SB_"), vec![&pci, &com1, &motherboard]);
    let mut table = bytes_of(&Sdt::new(
        *b"DSDT",
        36,
        6,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    ));
    extend_table(&mut table, &bytes_of(&sb));
    table
}

/// The device `name` with these named objects.
fn device<'a>(name: &str, names: &'a [Name]) -> Device<'a> {
    Device::new(name.into(), names.iter().map(|n| n as &dyn Aml).collect())
}

/// What a device with one identity and its resources names: `_HID`, `_UID`
/// 0 and `_CRS`.
fn identified(hid: &str, crs: &ResourceTemplate) -> [Name; 3] {
    [
        Name::new("_HID".into(), &EISAName::new(hid)),
        Name::new("_UID".into(), &ZERO),
        Name::new("_CRS".into(), crs),
    ]
}

fn madt(platform: &Platform) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDRESS),
    );
    for cpu in 0..platform.vcpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDRESS, 0));
    let mut table = bytes_of(&madt);
    // `acpi_tables` writes flags 0 and has no override or NMI structures.
    table[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    let mut extra = interrupt_override(0, 2, 0);
    extra.extend(lint1_nmi());
    extend_table(&mut table, &extra);
    table
}

fn mcfg(platform: &Platform) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let last_bus = (platform.ecam_size >> 20).saturating_sub(1).min(255) as u8;
    mcfg.add_ecam(platform.ecam_base, 0, 0, last_bus);
    bytes_of(&mcfg)
}

/// Lays the tables out from `TABLES_START`, 8-byte aligned.
pub fn build(platform: &Platform) -> Result<Tables, AcpiError> {
    let align = |at: u64| at.next_multiple_of(8);
    let rsdp_addr = TABLES_START;
    let mut at = align(rsdp_addr + Rsdp::len() as u64);
    let mut placed = Vec::new();
    let mut place = |bytes: Vec<u8>, placed: &mut Vec<(u64, Vec<u8>)>| {
        let addr = at;
        at = align(at + bytes.len() as u64);
        placed.push((addr, bytes));
        addr
    };
    let dsdt_addr = place(dsdt(platform), &mut placed);
    let fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .dsdt_64(dsdt_addr)
        .finalize();
    let fadt_addr = place(bytes_of(&fadt), &mut placed);
    let madt_addr = place(madt(platform), &mut placed);
    let mcfg_addr = place(mcfg(platform), &mut placed);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt_addr = place(bytes_of(&xsdt), &mut placed);
    placed.insert(0, (rsdp_addr, bytes_of(&Rsdp::new(OEM_ID, xsdt_addr))));
    if at > TABLES_END {
        return Err(AcpiError::TooLarge(::arch::usize_from(at - TABLES_START)));
    }
    Ok(Tables {
        rsdp: rsdp_addr,
        placed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::le_bytes::{u32_at, u64_at};

    fn platform(vcpus: u8) -> Platform {
        Platform {
            vcpus,
            ecam_base: 0xe000_0000,
            ecam_size: 1 << 20,
            mmio32: 0xc000_0000..0xe000_0000,
            mmio64: 0x1_0000_0000..0x11_0000_0000,
        }
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn every_table_checksums_and_points_at_the_next() {
        let tables = build(&platform(2)).unwrap();
        let rsdp = tables.get(b"RSD PTR ").unwrap();
        assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(rsdp), 0, "extended checksum");
        let at = |addr: u64| {
            tables
                .placed
                .iter()
                .find(|(a, _)| *a == addr)
                .map(|(_, b)| b.as_slice())
                .unwrap()
        };
        let xsdt = at(u64_at(rsdp, 24));
        assert!(xsdt.starts_with(b"XSDT"));
        let entries: Vec<&[u8]> = (36..xsdt.len())
            .step_by(8)
            .map(|o| at(u64_at(xsdt, o)))
            .collect();
        let names: Vec<&[u8]> = entries.iter().map(|t| &t[..4]).collect();
        assert_eq!(names, [b"FACP", b"APIC", b"MCFG"]);
        for table in entries.iter().chain([&xsdt]) {
            assert_eq!(sum(table), 0, "{:?}", std::str::from_utf8(&table[..4]));
            assert_eq!(u32_at(table, 4) as usize, table.len());
        }
        let fadt = entries[0];
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "hardware-reduced");
        let dsdt = at(u64_at(fadt, 140));
        assert!(dsdt.starts_with(b"DSDT"));
        assert_eq!(sum(dsdt), 0);
        // Everything in the BIOS area, nothing overlapping.
        let mut spans: Vec<(u64, u64)> = tables
            .placed
            .iter()
            .map(|(a, b)| (*a, *a + b.len() as u64))
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0));
        assert!(spans[0].0 >= TABLES_START && spans.last().unwrap().1 <= TABLES_END);
    }

    #[test]
    fn the_tables_land_in_guest_memory_at_their_addresses() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let tables = build(&platform(2)).unwrap();
        tables.write(&mem).unwrap();
        for (addr, bytes) in &tables.placed {
            let mut back = vec![0u8; bytes.len()];
            mem.read_slice(&mut back, GuestAddress(*addr)).unwrap();
            assert_eq!(&back, bytes, "table at {addr:#x}");
        }
        let mut signature = [0u8; 8];
        mem.read_slice(&mut signature, GuestAddress(tables.rsdp))
            .unwrap();
        assert_eq!(&signature, b"RSD PTR ");
        // Memory that ends before the BIOS area takes none of them.
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        assert!(matches!(
            tables.write(&small),
            Err(AcpiError::GuestMemory(_))
        ));
    }

    #[test]
    fn the_madt_has_every_vcpu_the_ioapic_and_the_timer_override() {
        let tables = build(&platform(4)).unwrap();
        let madt = tables.get(b"APIC").unwrap();
        assert_eq!(u32_at(madt, 36), LAPIC_ADDRESS);
        assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
        let mut structures = Vec::new();
        let mut at = 44;
        while at < madt.len() {
            structures.push(&madt[at..at + usize::from(madt[at + 1])]);
            at += usize::from(madt[at + 1]);
        }
        let lapics: Vec<(u8, u8)> = structures
            .iter()
            .filter(|s| s[0] == 0)
            .map(|s| (s[2], s[3]))
            .collect();
        assert_eq!(lapics, [(0, 0), (1, 1), (2, 2), (3, 3)]);
        assert!(
            structures
                .iter()
                .filter(|s| s[0] == 0)
                .all(|s| u32_at(s, 4) & 1 == 1)
        );
        let ioapic = structures.iter().find(|s| s[0] == 1).unwrap();
        assert_eq!(u32_at(ioapic, 4), IOAPIC_ADDRESS);
        let iso = structures.iter().find(|s| s[0] == 2).unwrap();
        assert_eq!((iso[3], u32_at(iso, 4)), (0, 2), "IRQ0 on GSI 2");
        assert!(
            structures.iter().any(|s| s[0] == 4 && s[5] == 1),
            "LINT1 NMI"
        );
        let mcfg = tables.get(b"MCFG").unwrap();
        assert_eq!(u64_at(mcfg, 44), 0xe000_0000);
        assert_eq!((mcfg[54], mcfg[55]), (0, 0), "bus 0 only");
    }

    /// ACPICA's disassembler (Debian's `acpica-tools`, installed by
    /// .ci/run) parses each table we write: a parser we did not write
    /// agrees with our layout, checksums and AML. (It reads no bare RSDP;
    /// `every_table_checksums_and_points_at_the_next` checks that one.)
    #[test]
    fn acpicas_disassembler_reads_every_table_back() {
        let Some(iasl) = ["/usr/bin/iasl", "/usr/local/bin/iasl"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            assert!(
                std::env::var("CH_REQUIRE_KVM").as_deref() != Ok("1"),
                "iasl (acpica-tools) is missing; .ci/run installs it"
            );
            eprintln!("*** SKIPPED: iasl is not installed (apt-get install acpica-tools) ***");
            return;
        };
        let tables = build(&platform(2)).unwrap();
        let dir = crate::test_util::scratch_path("acpi-tables");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, needles) in [
            (
                "DSDT",
                &[
                    "PNP0A08",
                    "PNP0501",
                    "0x03F8",
                    "0xC0000000",
                    "0xDFFFFFFF",
                    "Memory32Fixed (ReadWrite, 0xE0000000",
                    "0x0000000100000000",
                ][..],
            ),
            ("FACP", &["Hardware Reduced (V5) : 1"][..]),
            (
                "APIC",
                &[
                    "Local Apic Address : FEE00000",
                    "Local Apic ID : 01",
                    "Processor Enabled : 1",
                    "[I/O APIC]",
                    "Address : FEC00000",
                    "Source : 00 [04Ch 0076 4] Interrupt : 00000002",
                    "Interrupt Input LINT : 01",
                ][..],
            ),
            (
                "MCFG",
                &["Base Address : 00000000E0000000", "End Bus Number : 00"][..],
            ),
            ("XSDT", &["ACPI Table Address 2 :"][..]),
        ] {
            let bytes = tables.get(name.as_bytes()).unwrap();
            let file = dir.join(format!("{}.dat", name.to_lowercase()));
            std::fs::write(&file, bytes).unwrap();
            let out = std::process::Command::new(iasl)
                .arg("-d")
                .arg(&file)
                .current_dir(&dir)
                .output()
                .unwrap();
            let log = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{name}: {log}");
            let dsl = std::fs::read_to_string(file.with_extension("dsl")).unwrap();
            assert!(!dsl.contains("Incorrect checksum"), "{name}: {dsl}");
            for needle in needles {
                let flat = dsl.split_whitespace().collect::<Vec<_>>().join(" ");
                let needle_flat = needle.split_whitespace().collect::<Vec<_>>().join(" ");
                assert!(
                    flat.contains(&needle_flat),
                    "{name}: no {needle:?} in\n{dsl}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
