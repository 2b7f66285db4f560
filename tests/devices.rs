//! vfio-user devices on real KVM guests: a real `vfio_user::Server` process
//! (ch-test-device) mmaps what the VMM maps for it, so these tests check
//! that the device sees exactly the shared pages, reads what the guest
//! wrote, and writes what the guest then reads.

mod common;

use std::process::Command;

use common::*;

const MIB: u64 = 1 << 20;
const A: u64 = 16 * MIB;
const B: u64 = 17 * MIB;
/// The last page of A+64K: the guest waits on a byte there.
const FLAG: u64 = A + 0xf000;

fn wait_for_shared(api: &std::path::Path, expected: &[(u64, u64)]) {
    assert!(
        wait_until(|| vmm_shared_ranges(api) == expected),
        "shared ranges never became {expected:x?}: {:x?}",
        vmm_shared_ranges(api)
    );
}

#[test]
fn vfio_user_device_follows_every_conversion() {
    let dir = kvm_test!("devfollow");
    let device = TestDevice::spawn(&dir, "dev0");
    let ops = [
        format!("shared@{A:#x}+64K"),
        format!("write@{A:#x}+60K=0xa5"),
        format!("shared@{B:#x}+8K"),
        format!("wait@{FLAG:#x}+1=1"),
        format!("private@{:#x}+16K", A + 0x4000),
        format!("wait@{FLAG:#x}+1=2"),
        format!("private@{A:#x}+64K"),
        format!("private@{B:#x}+8K"),
    ];
    let guest = memconv_guest(&dir, &[&ops.join(",")], false);
    let (vmm, api) = spawn_with_devices(&dir, &guest, &[device.plug("")], &[]);
    wait_for_socket(&api);

    // Step 1: two shared runs, the first filled by the guest.
    let step1 = [(A, 0x10000), (B, 0x2000)];
    wait_for_shared(&api, &step1);
    assert_eq!(device.mapped(), step1);
    // The README's way of looking: the device's own command line.
    let (ok, maps, err) = device.ask_cli("maps");
    assert!(ok, "{err}");
    assert_eq!(maps, format!("[[{A},65536],[{B},8192]]\n"));
    assert_eq!(device.read(A, 16).unwrap(), vec![0xa5; 16]);
    assert_eq!(device.read(A + 0xf000 - 16, 16).unwrap(), vec![0xa5; 16]);
    device.write(FLAG, 1);

    // Step 2: a hole converted back to private, in the middle of a mapping.
    let step2 = [(A, 0x4000), (A + 0x8000, 0x8000), (B, 0x2000)];
    wait_for_shared(&api, &step2);
    assert_eq!(device.mapped(), step2);
    let hole = device.read(A + 0x4000, 16).unwrap_err();
    assert!(hole.contains("not mapped"), "{hole}");
    assert_eq!(device.read(A + 0x8000, 16).unwrap(), vec![0xa5; 16]);
    let (_, info, _) = ch_remote(&api, &["info"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let dev = &info["devices"][0];
    assert_eq!(dev["id"], "dev0");
    assert_eq!(dev["kind"], "vfio-user");
    assert_eq!(dev["dma"]["splits"], 1, "{dev}");
    assert_eq!(dev["dma"]["entries"], 3, "{dev}");
    device.write(FLAG, 2);

    // Step 3: everything private again, nothing mapped.
    assert_eq!(
        vmm.wait_for_line("memconv: done"),
        "memconv: done 8 ok 0 failed"
    );
    wait_for_shared(&api, &[]);
    assert!(device.mapped().is_empty());
}

#[test]
fn hot_added_device_gets_the_shared_runs_and_removal_unmaps_them() {
    let dir = kvm_test!("devhotplug");
    let ops = format!(
        "shared@{A:#x}+64K,private@{:#x}+4K,shared@{:#x}+2M,write@{:#x}+4K=0x3c",
        A + 0x2000,
        32 * MIB,
        32 * MIB
    );
    let guest = memconv_guest(&dir, &[&ops], false);
    let events = dir.path("events.json");
    let (vmm, api) = spawn_with_api(
        &dir,
        &guest,
        &["--event-monitor", &format!("path={}", events.display())],
    );
    assert_eq!(
        vmm.wait_for_line("memconv: done"),
        "memconv: done 4 ok 0 failed"
    );
    let shared = vmm_shared_ranges(&api);
    assert_eq!(
        shared,
        [(A, 0x2000), (A + 0x3000, 0xd000), (32 * MIB, 2 * MIB)]
    );

    let device = TestDevice::spawn(&dir, "late");
    let config = device.plug("");
    let (ok, out, err) = ch_remote(&api, &["add-user-device", &config]);
    assert!(ok, "add-user-device failed: {err}");
    let added: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(added["dma"]["entries"], 3, "one mapping per run: {added}");
    assert_eq!(device.mapped(), shared, "replayed exactly the shared runs");
    assert_eq!(device.read(32 * MIB, 8).unwrap(), vec![0x3c; 8]);

    let (ok, _, err) = ch_remote(&api, &["add-user-device", &config]);
    assert!(!ok && err.contains("409"), "duplicate id refused: {err}");
    assert_eq!(device.mapping_count(), 3, "the refused add changed nothing");

    let (ok, out, err) = ch_remote(&api, &["remove-device", "late"]);
    assert!(ok, "remove-device failed: {err}");
    let removed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(removed["dma"]["entries"], 0);
    assert!(
        wait_until(|| device.mapped().is_empty()),
        "device still has mappings"
    );
    let (ok, _, err) = ch_remote(&api, &["remove-device", "late"]);
    assert!(!ok && err.contains("404"), "{err}");
    let (_, info, _) = ch_remote(&api, &["info"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["devices"].as_array().unwrap().len(), 0);
    assert_eq!(vmm_shared_ranges(&api), shared, "guest state untouched");

    let log = std::fs::read_to_string(&events).unwrap();
    let device_events: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["source"] == "device")
        .collect();
    assert_eq!(device_events.len(), 2, "{log}");
    assert_eq!(device_events[0]["event"], "added");
    assert_eq!(device_events[1]["event"], "removed");
    assert_eq!(device_events[1]["properties"]["id"], "late");
}

#[test]
fn a_device_that_refuses_a_map_fails_the_conversion_and_the_vm_runs_on() {
    let dir = kvm_test!("devrefuse");
    let device = TestDevice::spawn(&dir, "picky");
    assert_eq!(device.command("refuse 1"), "ok");
    let ops = format!("shared@{A:#x}+8K,shared@{A:#x}+8K,shared@{B:#x}+4K");
    let guest = memconv_guest(&dir, &[&ops], false);
    let (vmm, api) = spawn_with_devices(&dir, &guest, &[user_device(&device.socket, "")], &[]);
    assert_eq!(
        vmm.wait_for_line("memconv: done"),
        "memconv: done 2 ok 1 failed"
    );
    let statuses = vmm.op_statuses();
    assert_eq!(statuses, ["listener-failed", "ok", "ok"]);
    let expected = [(A, 0x2000), (B, 0x1000)];
    assert_eq!(vmm_shared_ranges(&api), expected);
    assert_eq!(device.mapped(), expected);
    let (ok, counters, _) = ch_remote(&api, &["counters"]);
    assert!(ok);
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap();
    assert_eq!(counters["memory"]["failed"], 1);
}

#[test]
fn a_killed_device_is_failed_and_detached_and_conversions_go_on() {
    let dir = kvm_test!("devkilled");
    let mut victim = TestDevice::spawn(&dir, "victim");
    let releaser = TestDevice::spawn(&dir, "releaser");
    // The releaser's DMA write lets the guest go on after the victim died.
    let ops = format!("shared@{A:#x}+64K,wait@{FLAG:#x}+1=1,shared@{B:#x}+4K,private@{A:#x}+4K");
    let guest = memconv_guest(&dir, &[&ops], false);
    let events = dir.path("events.jsonl");
    let (vmm, api) = spawn_with_devices(
        &dir,
        &guest,
        &[victim.plug(""), releaser.plug("")],
        &["--event-monitor", &format!("path={}", events.display())],
    );
    wait_for_socket(&api);
    wait_for_shared(&api, &[(A, 0x10000)]);
    victim.kill();
    releaser.write(FLAG, 1);
    // The dead device fails itself, not the guest's conversions.
    assert_eq!(
        vmm.wait_for_line("memconv: done"),
        "memconv: done 4 ok 0 failed"
    );
    let expected = [(A + 0x1000, 0xf000), (B, 0x1000)];
    assert_eq!(vmm_shared_ranges(&api), expected);
    assert_eq!(releaser.mapped(), expected, "the live device follows");
    let (_, info, _) = ch_remote(&api, &["info"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let victim_info = &info["devices"][0];
    assert_eq!(victim_info["id"], "victim");
    assert_eq!(victim_info["state"], "failed", "{victim_info}");
    assert_eq!(victim_info["dma"]["entries"], 0, "{victim_info}");
    assert!(
        victim_info["failure"].as_str().unwrap().contains("DMA_MAP"),
        "{victim_info}"
    );
    assert_eq!(info["devices"][1]["state"], "attached");
    assert!(
        wait_until(|| std::fs::read_to_string(&events)
            .unwrap()
            .lines()
            .any(|l| l.contains(r#""event":"failed""#) && l.contains("victim"))),
        "no device failed event"
    );
    let (ok, _, err) = ch_remote(&api, &["remove-device", "victim"]);
    assert!(ok, "removing the dead device failed: {err}");
    let (_, info, _) = ch_remote(&api, &["info"]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["devices"].as_array().unwrap().len(), 1);
    assert_eq!(vmm_shared_ranges(&api), releaser.mapped());
}

#[test]
fn the_test_device_command_line_reports_errors() {
    let dir = TempDir::new("devask");
    let device = TestDevice::spawn(&dir, "dev");
    let (ok, maps, err) = device.ask_cli("maps");
    assert!(ok, "{err}");
    assert_eq!(maps, "[]\n");
    let (ok, _, err) = device.ask_cli("read 0x1000 4");
    assert!(!ok, "reading unmapped memory must fail");
    assert!(err.contains("not mapped"), "{err}");
    let (ok, _, err) = device.ask_cli("frobnicate");
    assert!(!ok && err.contains("unknown command"), "{err}");
    let missing = Command::new(TestDevice::binary())
        .args([
            "--control",
            dir.path("nothing.ctl").to_str().unwrap(),
            "--ask",
            "maps",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && stderr.contains("cannot connect"),
        "{stderr}"
    );
    let both = Command::new(TestDevice::binary())
        .args([
            "--socket",
            "/tmp/x.sock",
            "--control",
            "/tmp/x.ctl",
            "--ask",
            "maps",
        ])
        .output()
        .unwrap();
    assert!(!both.status.success(), "--ask runs no device");
}
