//! A guest attacking PCI configuration (docs/testing.md, "PCI attacks"):
//! the memconv guest rewrites the test device's configuration space through
//! ports 0xCF8/0xCFC (`cfg-write`) and probes the address space with single
//! dword accesses (`mmio-*`). Whatever it does, RAM stays RAM, the VMM
//! never panics and keeps answering, the device either works at its new
//! place or decodes nothing, and every device's mappings equal the VMM's
//! shared set.
//!
//! Slot 1 is the first cold-plugged device, its BAR0 (8 KiB: registers,
//! MSI-X table at 0x800, the mmapped scratch page at 0x1000) placed at
//! 0xc000_0000; slot 2's at 0xc000_2000.

mod common;

use common::*;

const MIB: u64 = 1 << 20;
const A: u64 = 16 * MIB;
const BAR0: u64 = 0xc000_0000;
const BAR0_DEV2: u64 = 0xc000_2000;
const SCRATCH: u64 = 0x1000;
const ECAM: u64 = 0xe000_0000;
const LAPIC: u64 = 0xfee0_0000;
/// Memory decoding and bus mastering on.
const DECODE: &str = "cfg-write@1:0x4=6";

fn engine(device: &TestDevice) -> serde_json::Value {
    serde_json::from_str(&device.command("engine")).unwrap()
}

/// The op lines of the guest's console, in order (one vCPU).
fn op_lines(vmm: &GuestVmm) -> Vec<String> {
    vmm.console()
        .into_iter()
        .filter(|l| l.contains(" op "))
        .collect()
}

/// The hex number after `key` in `line` (`value=`, `read=`).
fn field(line: &str, key: &str) -> u64 {
    let hex = line
        .split(' ')
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"));
    u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap()
}

/// Boots `ops` on one vCPU with `devices` cold-plugged (slots 1, 2, ...)
/// and waits for the summary line.
fn attack(
    dir: &TempDir,
    devices: &[&TestDevice],
    ops: &[String],
) -> (GuestVmm, std::path::PathBuf) {
    let guest = memconv_guest(dir, &[&ops.join(",")], false);
    let specs: Vec<String> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| user_device(&d.socket, &format!(",id=dev{i}")))
        .collect();
    let mut args = Vec::new();
    for spec in &specs {
        args.extend(["--user-device", spec.as_str()]);
    }
    let started = std::time::Instant::now();
    let (vmm, api) = spawn_with_api(dir, &guest, &args);
    vmm.wait_for_line("memconv: done");
    eprintln!("{} ops in {:?}", ops.len(), started.elapsed());
    wait_for_socket(&api);
    (vmm, api)
}

/// What must hold after every attack: the VMM runs, answers, did not
/// panic, and every device maps exactly the shared pages.
fn assert_vmm_sound(vmm: &mut GuestVmm, api: &std::path::Path, devices: &[&TestDevice]) {
    assert!(vmm.is_running(), "VMM exited:\n{}", vmm.stderr());
    let (ok, _, err) = ch_remote(api, &["ping"]);
    assert!(ok, "ping: {err}");
    let (ok, info, err) = ch_remote(api, &["info"]);
    assert!(ok, "info: {err}");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["state"], "Running");
    let shared = vmm_shared_ranges(api);
    for (i, device) in devices.iter().enumerate() {
        assert_eq!(info["devices"][i]["state"], "attached", "{info}");
        assert_eq!(device.mapped(), shared, "dev{i}");
    }
    let stderr = vmm.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");
    // KVM refusing a BAR's memory slot means the VMM tried to put one
    // over something (RAM: "File exists"); it must not even try.
    assert!(!stderr.contains("stays trapped"), "{stderr}");
}

fn assert_statuses(vmm: &GuestVmm, expected: &[&str]) {
    assert_eq!(vmm.op_statuses(), expected, "{:#?}", vmm.console());
}

/// BAR0 moved onto RAM: the guest's stores and loads there reach RAM (a
/// store to the DMA engine's COMMAND offset starts nothing, the scratch
/// page's place holds what the guest wrote, not the device's page), the
/// old place decodes nothing, and moved back the device works again.
#[test]
fn bar0_moved_onto_ram_leaves_ram_ram() {
    let dir = kvm_test!("pciatkram");
    let device = TestDevice::spawn(&dir, "dev0");
    let ram = 32 * MIB;
    let ops = [
        format!("shared@{A:#x}+64K"),
        DECODE.to_string(),
        format!("mmio-write@{:#x}=0x11223344", BAR0 + SCRATCH),
        format!("cfg-write@1:0x10={ram:#x}"),
        // 4: the register follows the guest.
        format!("cfg-check@1:0x10={ram:#x}"),
        format!("write@{ram:#x}+8K=0x77"),
        format!("check@{ram:#x}+8K=0x77"),
        // 7: a fill command at the engine's COMMAND offset: RAM keeps it.
        format!("mmio-write@{:#x}=1", ram + 0x10),
        format!("mmio-check@{:#x}=1", ram + 0x10),
        format!("mmio-check@{:#x}=0x77777777", ram + SCRATCH),
        // 10: the old place decodes nothing.
        format!("mmio-check@{:#x}=0xffffffff", BAR0 + SCRATCH),
        format!("mmio-check@{:#x}=0xffffffff", BAR0 + 0x18),
        format!("cfg-write@1:0x10={BAR0:#x}"),
        // 13: back home, the device answers and DMA works.
        format!("mmio-check@{:#x}=0x11223344", BAR0 + SCRATCH),
        format!("dma-write@{A:#x}+4K=0x5a"),
        format!("check@{A:#x}+4K=0x5a"),
        // RAM still holds the guest's bytes (and the 1 at +0x10).
        format!("check@{:#x}+4K=0x77", ram + SCRATCH),
        format!("mmio-check@{:#x}=1", ram + 0x10),
    ];
    let (mut vmm, api) = attack(&dir, &[&device], &ops);
    assert_statuses(&vmm, &["ok"; 18]);
    // The device saw none of the guest's stores to RAM.
    assert_eq!(device.command("scratch 0x0"), "44");
    assert_eq!(engine(&device)["completions"], 1);
    assert_vmm_sound(&mut vmm, &api, &[&device]);
}

/// Slot 2's BAR0 moved onto slot 1's: the BAR that decodes there first
/// keeps it (slot 1 answers, slot 2 decodes nothing); when slot 2 moves
/// away slot 1 is unaffected, and the other way round (slot 2 first, slot
/// 1 turning decoding on meanwhile) slot 1 decodes again as soon as the
/// place is free, without the guest touching slot 1 again.
#[test]
fn bar0_moved_onto_another_devices_bar0_never_decodes_twice() {
    let dir = kvm_test!("pciatkdev");
    let first = TestDevice::spawn(&dir, "dev0");
    let second = TestDevice::spawn(&dir, "dev1");
    let ops = [
        DECODE.to_string(),
        "cfg-write@2:0x4=6".to_string(),
        format!("mmio-write@{:#x}=0xaaaaaaaa", BAR0 + SCRATCH),
        format!("mmio-write@{:#x}=0xbbbbbbbb", BAR0_DEV2 + SCRATCH),
        // 4: slot 2 onto slot 1.
        format!("cfg-write@2:0x10={BAR0:#x}"),
        format!("cfg-check@2:0x10={BAR0:#x}"),
        format!("mmio-check@{:#x}=0xaaaaaaaa", BAR0 + SCRATCH),
        format!("mmio-write@{:#x}=0xcccccccc", BAR0 + SCRATCH + 4),
        format!("mmio-check@{:#x}=0xffffffff", BAR0_DEV2 + SCRATCH),
        // 9: slot 2 back home.
        format!("cfg-write@2:0x10={BAR0_DEV2:#x}"),
        format!("mmio-check@{:#x}=0xbbbbbbbb", BAR0_DEV2 + SCRATCH),
        format!("mmio-check@{:#x}=0xaaaaaaaa", BAR0 + SCRATCH),
        // 12: slot 1 stops decoding, slot 2 takes its place, slot 1 turns
        // decoding on again: slot 2 keeps the place.
        "cfg-write@1:0x4=4".to_string(),
        format!("cfg-write@2:0x10={BAR0:#x}"),
        format!("mmio-check@{:#x}=0xbbbbbbbb", BAR0 + SCRATCH),
        DECODE.to_string(),
        format!("mmio-check@{:#x}=0xbbbbbbbb", BAR0 + SCRATCH),
        // 17: slot 2 leaves: slot 1 decodes its BAR0 again.
        format!("cfg-write@2:0x10={BAR0_DEV2:#x}"),
        format!("mmio-check@{:#x}=0xaaaaaaaa", BAR0 + SCRATCH),
        format!("mmio-check@{:#x}=0xbbbbbbbb", BAR0_DEV2 + SCRATCH),
        // Its trapped registers too: no faults yet.
        format!("mmio-check@{:#x}=0", BAR0 + 0x18),
    ];
    let (mut vmm, api) = attack(&dir, &[&first, &second], &ops);
    assert_statuses(&vmm, &["ok"; 21]);
    assert_eq!(first.command("scratch 0x4"), "cc");
    assert_eq!(second.command("scratch 0x4"), "00");
    assert_vmm_sound(&mut vmm, &api, &[&first, &second]);
}

/// BAR0 moved onto the ECAM window, the LAPIC page and the doorbell's port
/// numbers: ECAM stays configuration space, the LAPIC stays the LAPIC (and
/// the device's scratch page does not appear next to it), a port number is
/// no memory address a BAR can take (masked to the BAR's alignment: 0,
/// unassigned) and the doorbell converts as before. Moved back, the device
/// works and its MSI-X interrupts arrive.
#[test]
fn bar0_moved_onto_ecam_the_lapic_and_the_doorbell_ports_decodes_nothing() {
    let dir = kvm_test!("pciatkwin");
    let device = TestDevice::spawn(&dir, "dev0");
    let ops = [
        format!("shared@{A:#x}+64K"),
        DECODE.to_string(),
        format!("mmio-write@{:#x}=0x5a5a5a5a", BAR0 + SCRATCH),
        // 3: ECAM: the host bridge's and slot 1's ids, as before.
        format!("cfg-write@1:0x10={ECAM:#x}"),
        format!("cfg-check@1:0x10={ECAM:#x}"),
        format!("mmio-check@{ECAM:#x}=0x0d578086"),
        format!("mmio-check@{:#x}=0xd3a0c0de", ECAM + (1 << 15)),
        format!("mmio-check@{:#x}=0xffffffff", ECAM + SCRATCH),
        "cfg-check@1:0x0=0xd3a0c0de".to_string(),
        // 9: the LAPIC page: its version register, not the device.
        format!("cfg-write@1:0x10={LAPIC:#x}"),
        format!("mmio-read@{:#x}", LAPIC + 0x30),
        format!("mmio-check@{:#x}=0xffffffff", LAPIC + SCRATCH),
        // 12: port 0x600 as an address: masked to 0, decoded nowhere.
        "cfg-write@1:0x10=0x600".to_string(),
        "cfg-check@1:0x10=0".to_string(),
        "cfg-write@1:0x10=0x601".to_string(),
        "cfg-check@1:0x10=0".to_string(),
        format!("private@{A:#x}+4K"),
        format!("shared@{A:#x}+4K"),
        // 18: home again.
        format!("cfg-write@1:0x10={BAR0:#x}"),
        format!("mmio-check@{:#x}=0x5a5a5a5a", BAR0 + SCRATCH),
        format!("dma-write@{A:#x}+4K=0x3c"),
        format!("check@{A:#x}+4K=0x3c"),
    ];
    let (mut vmm, api) = attack(&dir, &[&device], &ops);
    assert_statuses(&vmm, &["ok"; 22]);
    let lines = op_lines(&vmm);
    let version = field(&lines[10], "value=");
    // KVM's LAPIC: version 0x14, at least 4 LVT entries.
    assert_eq!(version & 0xff, 0x14, "{}", lines[10]);
    assert_eq!(
        vmm.wait_for_line("memconv: dma ops"),
        "memconv: dma ops 1 msix interrupts 1"
    );
    assert_vmm_sound(&mut vmm, &api, &[&device]);
}

/// The sizing protocol with decoding left on (a guest need not turn it
/// off): all ones in BAR0 reads back its size mask; absent BARs and the
/// expansion ROM read 0; while BAR0 holds the mask (0xffffe000, outside
/// the PCI window) nothing decodes at the top of 4 GiB; restored, the
/// device works with its scratch page intact.
#[test]
fn size_probing_bars_reads_their_size_and_restoring_keeps_the_device_working() {
    let dir = kvm_test!("pciatksize");
    let device = TestDevice::spawn(&dir, "dev0");
    let ops = [
        format!("shared@{A:#x}+64K"),
        DECODE.to_string(),
        format!("mmio-write@{:#x}=0x600dcafe", BAR0 + SCRATCH),
        "cfg-write@1:0x10=0xffffffff".to_string(),
        // 4: 8 KiB, 32-bit, not prefetchable.
        "cfg-read@1:0x10".to_string(),
        "cfg-check@1:0x10=0xffffe000".to_string(),
        "mmio-check@0xfffff000=0xffffffff".to_string(),
        format!("mmio-check@{:#x}=0xffffffff", BAR0 + SCRATCH),
        "cfg-write@1:0x14=0xffffffff".to_string(),
        "cfg-check@1:0x14=0".to_string(),
        "cfg-write@1:0x24=0xffffffff".to_string(),
        "cfg-check@1:0x24=0".to_string(),
        "cfg-write@1:0x30=0xffffffff".to_string(),
        "cfg-check@1:0x30=0".to_string(),
        // 14: restored.
        format!("cfg-write@1:0x10={BAR0:#x}"),
        format!("cfg-check@1:0x10={BAR0:#x}"),
        format!("mmio-check@{:#x}=0x600dcafe", BAR0 + SCRATCH),
        format!("dma-write@{A:#x}+4K=0x42"),
        format!("check@{A:#x}+4K=0x42"),
    ];
    let (mut vmm, api) = attack(&dir, &[&device], &ops);
    assert_statuses(&vmm, &["ok"; 19]);
    let size_mask = field(&op_lines(&vmm)[4], "value=");
    assert_eq!(!(u32::try_from(size_mask).unwrap() & !0xf) + 1, 0x2000);
    assert_eq!(device.command("scratch 0x0"), "fe");
    assert_vmm_sound(&mut vmm, &api, &[&device]);
}

/// MSI-X table entries past the device's two vectors (0x820.. up to the
/// PBA at 0xc00), a write into the PBA and a write of the table-size bits
/// of message control: none of them routes anything or disturbs vectors 0
/// and 1; the device's interrupts still arrive, one per command.
#[test]
fn msix_entries_past_the_vector_count_change_nothing() {
    let dir = kvm_test!("pciatkmsix");
    let device = TestDevice::spawn(&dir, "dev0");
    let table = BAR0 + 0x800;
    let mut ops = vec![
        format!("shared@{A:#x}+64K"),
        // 1: sets MSI-X up (vector 0 -> 0x40 on APIC 0).
        format!("dma-write@{A:#x}+4K=1"),
        "cfg-read@1:0x40".to_string(),
    ];
    // Vector 1 (the device never raises it) unmasked with a message that
    // is no interrupt: a route KVM may refuse, never a panic.
    for (offset, value) in [(0, 0x1234_5678u32), (4, 0xffff_ffff), (8, 0xffff), (12, 0)] {
        ops.push(format!("mmio-write@{:#x}={value:#x}", table + 16 + offset));
    }
    for entry in [2u64, 3, 0x3f] {
        let at = table + entry * 16;
        ops.push(format!("mmio-write@{at:#x}=0xfee00000"));
        ops.push(format!("mmio-write@{:#x}=0", at + 4));
        ops.push(format!("mmio-write@{:#x}=0x41", at + 8));
        ops.push(format!("mmio-write@{:#x}=0", at + 12));
    }
    ops.extend([
        // 19: the device's reserved space reads 0; vector 0 unchanged.
        format!("mmio-check@{:#x}=0", table + 0x20),
        format!("mmio-check@{:#x}=0x40", table + 8),
        format!("mmio-check@{:#x}=0", table + 12),
        // 22: pending bits are read-only.
        format!("mmio-write@{:#x}=0xffffffff", BAR0 + 0xc00),
        format!("mmio-check@{:#x}=0", BAR0 + 0xc00),
        // 24: a table size of 2048 in message control: read-only.
        "cfg-write@1:0x40=0x87ff0011".to_string(),
        "cfg-read@1:0x40".to_string(),
        format!("dma-write@{A:#x}+4K=2"),
        format!("dma-write@{A:#x}+4K=3"),
        format!("check@{A:#x}+4K=3"),
    ]);
    let (mut vmm, api) = attack(&dir, &[&device], &ops);
    assert_statuses(&vmm, &vec!["ok"; ops.len()]);
    let lines = op_lines(&vmm);
    let before = field(&lines[2], "value=");
    assert_eq!(before >> 16, 0x8001, "enabled, 2 vectors: {}", lines[2]);
    assert_eq!(field(&lines[25], "value="), before, "{}", lines[25]);
    assert_eq!(
        vmm.wait_for_line("memconv: dma ops"),
        "memconv: dma ops 3 msix interrupts 3"
    );
    assert_eq!(engine(&device)["completions"], 3);
    assert_vmm_sound(&mut vmm, &api, &[&device]);
}

/// The guest clears the command register's memory bit while the device
/// streams DMA into a shared page: the BAR (registers and the mmapped
/// scratch page) reads all ones at once, writes there reach nothing, the
/// device's DMA goes on (bus mastering is still on) within its mappings;
/// turned on again, the BAR answers with the stream still running and
/// stops it.
#[test]
fn clearing_memory_decoding_mid_dma_stops_the_bar_cleanly() {
    let dir = kvm_test!("pciatkcmd");
    let device = TestDevice::spawn(&dir, "dev0");
    let page = A + 0x1000;
    let ops = [
        format!("shared@{A:#x}+64K"),
        DECODE.to_string(),
        format!("mmio-write@{:#x}=0x0badf00d", BAR0 + SCRATCH),
        format!("mmio-write@{BAR0:#x}={page:#x}"),
        format!("mmio-write@{:#x}=0", BAR0 + 4),
        format!("mmio-write@{:#x}=0x1000", BAR0 + 8),
        format!("mmio-write@{:#x}=0xee", BAR0 + 0xc),
        // 7: start streaming.
        format!("mmio-write@{:#x}=3", BAR0 + 0x10),
        format!("mmio-check@{:#x}=3", BAR0 + 0x14),
        format!("wait@{page:#x}+1=0xee"),
        // 10: memory decoding off, bus mastering on.
        "cfg-write@1:0x4=4".to_string(),
        "cfg-read@1:0x4".to_string(),
        format!("mmio-check@{:#x}=0xffffffff", BAR0 + 0x14),
        format!("mmio-check@{:#x}=0xffffffff", BAR0 + SCRATCH),
        format!("mmio-write@{:#x}=4", BAR0 + 0x10),
        format!("mmio-write@{:#x}=0", BAR0 + SCRATCH),
        // 16: the stream goes on: it fills the page again.
        format!("write@{page:#x}+1=0"),
        format!("wait@{page:#x}+1=0xee"),
        // 18: decoding on: still streaming, the scratch page untouched.
        DECODE.to_string(),
        format!("mmio-check@{:#x}=3", BAR0 + 0x14),
        format!("mmio-check@{:#x}=0x0badf00d", BAR0 + SCRATCH),
        format!("mmio-write@{:#x}=4", BAR0 + 0x10),
        format!("mmio-check@{:#x}=0", BAR0 + 0x14),
    ];
    let (mut vmm, api) = attack(&dir, &[&device], &ops);
    assert_statuses(&vmm, &["ok"; 23]);
    let command = field(&op_lines(&vmm)[11], "value=");
    assert_eq!(command & 0xffff, 4, "bus master only");
    let e = engine(&device);
    assert_eq!(e["faults"], 0, "{e}");
    assert_eq!(e["completions"], 1, "only the stop that was decoded: {e}");
    assert!(e["stream_passes"].as_u64().unwrap() >= 2, "{e}");
    assert_eq!(device.read(page, 4).unwrap(), vec![0xee; 4]);
    assert_vmm_sound(&mut vmm, &api, &[&device]);
}

/// The guest moves slot 1's BAR0 to where the BAR allocator puts the next
/// device; a device hot-added then gets that address and, decoding, waits
/// for it (slot 1 keeps answering there) until slot 1 moves home, when it
/// decodes at once. Removing it afterwards leaves slot 1 working.
#[test]
fn a_hot_added_device_placed_on_a_moved_bar_waits_for_its_place() {
    let dir = kvm_test!("pciatkhot");
    let first = TestDevice::spawn(&dir, "dev0");
    let second = TestDevice::spawn(&dir, "dev1");
    let flag = A + 0x8000;
    let ops = [
        format!("shared@{A:#x}+64K"),
        DECODE.to_string(),
        format!("cfg-write@1:0x10={BAR0_DEV2:#x}"),
        format!("mmio-write@{:#x}=0xaaaaaaaa", BAR0_DEV2 + SCRATCH),
        format!("wait@{flag:#x}+1=1"),
        // 5: hot-added at the address slot 1 holds now.
        format!("cfg-check@2:0x10={BAR0_DEV2:#x}"),
        "cfg-write@2:0x4=6".to_string(),
        format!("mmio-check@{:#x}=0xaaaaaaaa", BAR0_DEV2 + SCRATCH),
        // 8: slot 1 home: slot 2 decodes its (zeroed) scratch page.
        format!("cfg-write@1:0x10={BAR0:#x}"),
        format!("mmio-check@{:#x}=0", BAR0_DEV2 + SCRATCH),
        format!("mmio-check@{:#x}=0xaaaaaaaa", BAR0 + SCRATCH),
        format!("wait@{flag:#x}+1=2"),
        // 12: slot 2 removed: slot 1 still drives DMA.
        format!("mmio-check@{:#x}=0xffffffff", BAR0_DEV2 + SCRATCH),
        format!("dma-write@{A:#x}+4K=0x66"),
        format!("check@{A:#x}+4K=0x66"),
    ];
    let guest = memconv_guest(&dir, &[&ops.join(",")], false);
    let dev0 = first.plug("");
    let (mut vmm, api) = spawn_with_api(&dir, &guest, &["--user-device", &dev0]);
    wait_for_socket(&api);
    vmm.wait_for_line("op 3 mmio-write");
    let dev1 = second.plug("");
    let (ok, out, err) = ch_remote(&api, &["add-user-device", &dev1]);
    assert!(ok, "{err}");
    let added: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(added["bdf"], "0000:00:02.0");
    first.write(flag, 1);
    vmm.wait_for_line("op 10 mmio-check");
    let (ok, _, err) = ch_remote(&api, &["remove-device", "dev1"]);
    assert!(ok, "{err}");
    assert!(second.mapped().is_empty());
    first.write(flag, 2);
    vmm.wait_for_line("memconv: done");
    assert_statuses(&vmm, &["ok"; 15]);
    assert_eq!(first.command("scratch 0x0"), "aa");
    assert_vmm_sound(&mut vmm, &api, &[&first]);
}
