//! Assigned devices the guest drives: the memconv guest finds the test
//! device on PCI bus 0, programs its BAR0 DMA engine and takes its MSI-X
//! interrupt; the device (a real vfio-user server process) reaches guest
//! memory only through the mappings the VMM gave it. Every test ends with
//! the invariant: the VMM's shared set equals every live device's mappings.

mod common;

use common::*;

const MIB: u64 = 1 << 20;
const A: u64 = 16 * MIB;

fn engine(device: &TestDevice) -> serde_json::Value {
    serde_json::from_str(&device.command("engine")).unwrap()
}

fn info(api: &std::path::Path) -> serde_json::Value {
    let (ok, out, err) = ch_remote(api, &["info"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn the_guest_drives_dma_into_shared_pages_and_faults_on_private_ones() {
    let dir = kvm_test!("pcidma");
    let device = TestDevice::spawn(&dir, "dev0");
    let ops = [
        format!("shared@{A:#x}+16K"),
        // 1. The device fills a shared buffer; the guest sees the pattern.
        format!("dma-write@{A:#x}+8K=0x5a"),
        format!("check@{A:#x}+8K=0x5a"),
        // The device reads what the guest wrote, and notices a difference.
        format!("write@{:#x}+4K=0x33", A + 0x2000),
        format!("dma-read@{:#x}+4K=0x33", A + 0x2000),
        format!("dma-read@{:#x}+4K=0x34", A + 0x2000),
        // 2. A page made private: a write across it faults and changes
        // nothing, on the private page or on its shared neighbour.
        format!("private@{:#x}+4K", A + 0x1000),
        format!("dma-write@{A:#x}+8K=0x77"),
        format!("check@{A:#x}+4K=0x5a"),
        format!("dma-read@{:#x}+4K=0", A + 0x1000),
        // Beyond RAM: nothing there is mapped.
        format!("dma-write@{:#x}+4K=1", 1u64 << 40),
    ];
    let guest = memconv_guest(&dir, &[&ops.join(",")], true);
    let (mut vmm, _api) = spawn_with_devices(&dir, &guest, &[device.plug("")], &[]);
    let done = vmm.wait_for_line("memconv: done");
    assert_eq!(
        vmm.op_statuses(),
        [
            "ok",
            "ok",
            "ok",
            "ok",
            "ok",
            "mismatch",
            "ok",
            "dma-fault",
            "ok",
            "dma-fault",
            "dma-fault"
        ],
        "{:#?}",
        vmm.console()
    );
    assert_eq!(done, "memconv: done 7 ok 4 failed");
    // Every command completed with an MSI-X interrupt that reached vCPU 0
    // through KVM's irqchip.
    let irqs = vmm.wait_for_line("memconv: dma ops");
    assert_eq!(irqs, "memconv: dma ops 6 msix interrupts 6");
    let e = engine(&device);
    assert_eq!(e["completions"], 6);
    assert_eq!(e["faults"], 3);
    assert!(vmm.wait_exit(std::time::Duration::from_secs(10)).success());
}

#[test]
fn the_device_has_a_bdf_and_follows_conversions_while_the_guest_drives_it() {
    let dir = kvm_test!("pcibdf");
    let device = TestDevice::spawn(&dir, "dev0");
    let flag = A + 0x8000;
    let ops = [
        format!("shared@{A:#x}+64K"),
        format!("dma-write@{A:#x}+16K=0x11"),
        format!("wait@{flag:#x}+1=1"),
        format!("private@{:#x}+4K", A + 0x1000),
    ];
    let guest = memconv_guest(&dir, &[&ops.join(",")], false);
    let (vmm, api) = spawn_with_devices(&dir, &guest, &[device.plug("")], &[]);
    wait_for_socket(&api);
    let info = info(&api);
    assert_eq!(info["devices"][0]["bdf"], "0000:00:01.0");
    // Cloud Hypervisor's VmInfo fields.
    assert_eq!(info["memory_actual_size"], 256 << 20);
    assert_eq!(info["device_tree"]["dev0"]["pci_bdf"], "0000:00:01.0");
    assert_eq!(info["device_tree"]["dev0"]["id"], "dev0");
    vmm.wait_for_line("op 1 dma-write");
    assert_eq!(device.read(A, 4).unwrap(), vec![0x11; 4]);
    device.write(flag, 1);
    vmm.wait_for_line("memconv: done");
    assert_eq!(vmm.op_statuses(), ["ok", "ok", "ok", "ok"]);
    let shared = vmm_shared_ranges(&api);
    assert_eq!(shared, [(A, 0x1000), (A + 0x2000, 0xe000)]);
    assert_eq!(device.mapped(), shared);
    // Counters as Cloud Hypervisor groups them: every value an integer.
    let (ok, counters, err) = ch_remote(&api, &["counters"]);
    assert!(ok, "{err}");
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap();
    for (group, values) in counters.as_object().unwrap() {
        for (name, value) in values.as_object().unwrap() {
            assert!(value.is_u64(), "{group}.{name} = {value}");
        }
    }
    assert_eq!(counters["memory"]["to_shared"], 1);
    assert_eq!(counters["memory"]["to_private"], 1);
    assert_eq!(counters["memory_region0"]["pages_to_private"], 1);
    assert_eq!(counters["dev0"]["entries"], 2);
    assert_eq!(counters["dev0"]["splits"], 1);
}

#[test]
fn a_hot_added_device_is_found_by_the_guest_and_a_removed_one_is_gone() {
    let dir = kvm_test!("pcihot");
    let first = TestDevice::spawn(&dir, "dev0");
    let second = TestDevice::spawn(&dir, "dev1");
    let (flag1, flag2) = (A + 0x8000, A + 0x9000);
    let ops = [
        format!("shared@{A:#x}+64K"),
        format!("dma-write@{A:#x}+4K=1"),
        // 3. Hot-added after the conversions: found, DMA works on the pages
        // shared before the add and faults elsewhere.
        format!("wait@{flag1:#x}+1=1"),
        format!("dma-write@{A:#x}+8K=0x5a"),
        format!("check@{A:#x}+8K=0x5a"),
        format!("dma-write@{:#x}+4K=1", A + 0x10000),
        // Removed: its BAR reads all ones, so the guest sees no device; the
        // next op scans the bus again and finds only the other device.
        format!("wait@{flag2:#x}+1=2"),
        format!("dma-write@{A:#x}+4K=7"),
        format!("dma-write@{A:#x}+4K=8"),
        format!("check@{A:#x}+4K=8"),
    ];
    let guest = memconv_guest(&dir, &[&ops.join(",")], false);
    let (vmm, api) = spawn_with_api(&dir, &guest, &[]);
    wait_for_socket(&api);
    vmm.wait_for_line("op 1 dma-write");
    assert_eq!(vmm.op_statuses(), ["ok", "no-device"]);

    let socket = first.plug("");
    let (ok, out, err) = ch_remote(&api, &["add-user-device", &socket]);
    assert!(ok, "{err}");
    let added: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(added["id"], "dev0");
    assert_eq!(added["bdf"], "0000:00:01.0");
    assert_eq!(first.mapped(), [(A, 0x10000)]);
    first.write(flag1, 1);
    vmm.wait_for_line("op 5 dma-write");

    let socket = second.plug("");
    let (ok, out, err) = ch_remote(&api, &["add-user-device", &socket]);
    assert!(ok, "{err}");
    let added: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(added["bdf"], "0000:00:02.0");
    let (ok, _, err) = ch_remote(&api, &["remove-device", "dev0"]);
    assert!(ok, "{err}");
    assert!(first.mapped().is_empty());
    second.write(flag2, 2);
    vmm.wait_for_line("memconv: done");
    assert_eq!(
        vmm.op_statuses(),
        [
            "ok",
            "no-device",
            "ok",
            "ok",
            "ok",
            "dma-fault",
            "ok",
            "no-device",
            "ok",
            "ok"
        ],
        "{:#?}",
        vmm.console()
    );
    assert_eq!(engine(&first)["completions"], 2);
    assert_eq!(engine(&second)["completions"], 1);
    let info = info(&api);
    assert_eq!(info["devices"].as_array().unwrap().len(), 1);
    assert_eq!(info["devices"][0]["bdf"], "0000:00:02.0");
    assert_eq!(second.mapped(), vmm_shared_ranges(&api));
}

#[test]
fn a_stopped_device_does_not_stop_the_guest_driving_another() {
    let dir = kvm_test!("pcistop");
    let working = TestDevice::spawn(&dir, "dev0");
    let stopped = TestDevice::spawn(&dir, "dev1");
    let flag = A + 0x8000;
    let ops = [
        format!("shared@{A:#x}+64K"),
        format!("wait@{flag:#x}+1=1"),
        // 5. The stopped device fails this conversion's mapping and is cut
        // off; the guest's device and conversions go on.
        format!("shared@{:#x}+64K", A + 0x10000),
        format!("dma-write@{:#x}+64K=0x3c", A + 0x10000),
        format!("check@{:#x}+64K=0x3c", A + 0x10000),
    ];
    let guest = memconv_guest(&dir, &[&ops.join(",")], false);
    let devices = [working.plug(""), stopped.plug(",timeout_ms=300")];
    let (vmm, api) = spawn_with_devices(&dir, &guest, &devices, &[]);
    wait_for_socket(&api);
    vmm.wait_for_line("op 0 shared");
    stopped.stop();
    working.write(flag, 1);
    vmm.wait_for_line("memconv: done");
    stopped.signal(libc::SIGCONT);
    assert_eq!(vmm.op_statuses(), ["ok", "ok", "ok", "ok", "ok"]);
    let info = info(&api);
    assert_eq!(info["devices"][0]["state"], "attached");
    assert_eq!(info["devices"][1]["state"], "failed");
    assert_eq!(working.mapped(), vmm_shared_ranges(&api));
    assert!(stopped.mapped().is_empty(), "{:x?}", stopped.mapped());
}

/// Streams DMA into page S of a shared 64 KiB run while the guest converts
/// each other page of the run to private and back: (stream faults, splits,
/// stream passes).
fn stream_while_neighbours_convert(policy: &str) -> (u64, u64, u64) {
    let dir = TempDir::new(&format!("pcistream{policy}"));
    let device = TestDevice::spawn(&dir, "dev0");
    let stream_page = A + 0x8000;
    let flag = A + MIB;
    let mut ops = vec![
        format!("shared@{A:#x}+64K"),
        format!("shared@{flag:#x}+4K"),
        format!("wait@{flag:#x}+1=1"),
    ];
    for page in (1..16u64).filter(|&p| p != 8) {
        let gpa = A + page * 0x1000;
        ops.push(format!("private@{gpa:#x}+4K"));
        ops.push(format!("shared@{gpa:#x}+4K"));
    }
    let guest = memconv_guest(&dir, &[&ops.join(",")], false);
    let device_config = device.plug(&format!(",mapping={policy}"));
    let (vmm, api) = spawn_with_devices(&dir, &guest, &[device_config], &[]);
    wait_for_socket(&api);
    vmm.wait_for_line("op 1 shared");
    assert_eq!(
        device.command(&format!("stream {stream_page:#x} 4096 0xee")),
        "ok"
    );
    assert!(wait_until(
        || engine(&device)["stream_passes"].as_u64() > Some(10)
    ));
    device.write(flag, 1);
    let done = vmm.wait_for_line("memconv: done");
    assert_eq!(done, "memconv: done 31 ok 0 failed");
    assert_eq!(device.command("stop"), "ok");
    let e = engine(&device);
    let info = info(&api);
    let dev = &info["devices"][0];
    assert_eq!(dev["mapping"], policy);
    assert_eq!(device.mapped(), vmm_shared_ranges(&api));
    assert_eq!(device.read(stream_page, 4).unwrap(), vec![0xee; 4]);
    (
        e["faults"].as_u64().unwrap(),
        dev["dma"]["splits"].as_u64().unwrap(),
        e["stream_passes"].as_u64().unwrap(),
    )
}

#[test]
fn per_page_mapping_never_disturbs_dma_to_a_page_that_stays_shared() {
    kvm_test!();
    let (faults, splits, passes) = stream_while_neighbours_convert("pages");
    eprintln!("pages: {faults} stream faults, {splits} splits, {passes} passes");
    assert_eq!((faults, splits), (0, 0));
    let (faults, splits, passes) = stream_while_neighbours_convert("runs");
    eprintln!("runs: {faults} stream faults, {splits} splits, {passes} passes");
    // Every to-private inside a run split it (8 of them the run holding
    // the stream page); the stream may fault in each such window, which
    // is what the per-page policy is for (figures in docs/design.md).
    assert_eq!(splits, 13);
}

/// BAR access both ways: the scratch page of BAR0 mapped into the guest (no
/// message reaches the device) or trapped (every byte is a message); the
/// guest and the device see the same bytes either way.
#[test]
fn bar_memory_works_mapped_into_the_guest_and_trapped() {
    kvm_test!();
    for (args, messages) in [(&[][..], 0), (&["--no-mmap"][..], 16 + 16 + 17 + 4)] {
        let dir = TempDir::new("pcibar");
        let device = TestDevice::spawn_with(&dir, "dev0", args);
        let ops = [
            "bar-write@0x1000+16=0xab",
            "bar-check@0x1000+16=0xab",
            "bar-check@0x1000+17=0xab",
            "bar-write@0x1ffc+4=0x5c",
            "bar-write@0x1ff0+0x20=1",
        ];
        let guest = memconv_guest(&dir, &[&ops.join(",")], true);
        let user_device = device.plug("");
        let mut vmm = GuestVmm::spawn(
            &guest,
            &[
                "--memory",
                "size=256M,guest_memfd=on",
                "--user-device",
                &user_device,
            ],
        );
        vmm.wait_for_line("memconv: done");
        assert_eq!(
            vmm.op_statuses(),
            ["ok", "ok", "mismatch", "ok", "out-of-range"],
            "{args:?}"
        );
        assert!(vmm.wait_exit(std::time::Duration::from_secs(10)).success());
        assert_eq!(device.command("scratch 0x0"), "ab", "{args:?}");
        assert_eq!(device.command("scratch 0xf"), "ab", "{args:?}");
        assert_eq!(device.command("scratch 0x10"), "00", "{args:?}");
        assert_eq!(device.command("scratch 0xfff"), "5c", "{args:?}");
        assert_eq!(engine(&device)["scratch_messages"], messages, "{args:?}");
    }
}

/// `vm.pause` stops every vCPU (the guest sees nothing a device writes
/// meanwhile) with conversion state and device mappings unchanged, refuses
/// a second pause, and `vm.resume` lets the guest go on where it was.
#[test]
fn pause_freezes_the_guest_and_resume_lets_it_go_on() {
    let dir = kvm_test!("pcipause");
    let device = TestDevice::spawn(&dir, "dev0");
    let flag = A + 0x8000;
    let ops = [
        format!("shared@{A:#x}+64K"),
        format!("wait@{flag:#x}+1=1"),
        format!("private@{A:#x}+4K"),
    ];
    let guest = memconv_guest(&dir, &[&ops.join(",")], false);
    let (vmm, api) = spawn_with_devices(&dir, &guest, &[device.plug("")], &[]);
    wait_for_socket(&api);
    vmm.wait_for_line("op 0 shared");
    let (ok, _, err) = ch_remote(&api, &["pause"]);
    assert!(ok, "{err}");
    assert_eq!(info(&api)["state"], "Paused");
    let before = (vmm_shared_ranges(&api), device.mapped());
    assert_eq!(before.0, [(A, 0x10000)]);
    device.write(flag, 1);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(
        vmm.op_statuses(),
        ["ok"],
        "a paused guest ran: {:#?}",
        vmm.console()
    );
    assert_eq!((vmm_shared_ranges(&api), device.mapped()), before);
    // A second pause is refused with Cloud Hypervisor's error body.
    let (status, body) = raw_http(
        &api,
        "PUT /api/v1/vm.pause HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status, 500, "{body}");
    let messages: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(messages[1].as_str().unwrap().contains("Paused"), "{body}");

    let (ok, _, err) = ch_remote(&api, &["resume"]);
    assert!(ok, "{err}");
    assert_eq!(info(&api)["state"], "Running");
    vmm.wait_for_line("memconv: done");
    assert_eq!(vmm.op_statuses(), ["ok", "ok", "ok"]);
    assert_eq!(vmm_shared_ranges(&api), [(A + 0x1000, 0xf000)]);
    assert_eq!(device.mapped(), vmm_shared_ranges(&api));
    let (ok, _, _) = ch_remote(&api, &["resume"]);
    assert!(!ok, "resuming a running VM is refused");
}

#[test]
fn page_contents_after_conversions_follow_the_memory_layout() {
    kvm_test!();
    // docs/design.md, "Backing layouts": in-place keeps a page's contents
    // across a round trip; split punches the shared side on to-private, so
    // a page that comes back to shared reads zeros, for the device (through
    // its mapping) and for the guest alike.
    for (layout, after_round_trip) in [("split", 0x00), ("in-place", 0x5a)] {
        let dir = TempDir::new("pcilayout");
        let device = TestDevice::spawn(&dir, "dev0");
        let ops = [
            format!("shared@{A:#x}+8K"),
            format!("write@{A:#x}+8K=0x5a"),
            format!("dma-read@{A:#x}+8K=0x5a"),
            format!("private@{A:#x}+4K"),
            // Private: out of the device's reach.
            format!("dma-read@{A:#x}+4K=0x5a"),
            format!("shared@{A:#x}+4K"),
            format!("dma-read@{A:#x}+4K={after_round_trip:#x}"),
            format!("check@{A:#x}+4K={after_round_trip:#x}"),
            // The neighbour never left the shared state: untouched.
            format!("dma-read@{:#x}+4K=0x5a", A + 0x1000),
            format!("check@{:#x}+4K=0x5a", A + 0x1000),
        ];
        let guest = memconv_guest(&dir, &[&ops.join(",")], true);
        let memory = format!("size=256M,guest_memfd=on,layout={layout}");
        let user_device = device.plug("");
        let mut vmm = GuestVmm::spawn(
            &guest,
            &["--memory", &memory, "--user-device", &user_device, "-v"],
        );
        vmm.wait_for_line("memconv: done");
        assert_eq!(
            vmm.op_statuses(),
            [
                "ok",
                "ok",
                "ok",
                "ok",
                "dma-fault",
                "ok",
                "ok",
                "ok",
                "ok",
                "ok"
            ],
            "{layout}: {:#?}",
            vmm.console()
        );
        assert!(vmm.wait_exit(std::time::Duration::from_secs(10)).success());
        let backing = if layout == "split" {
            "guest_memfd+memfd"
        } else {
            "guest_memfd"
        };
        assert!(
            vmm.stderr().contains(&format!("backed by {backing}\n")),
            "{layout}: {}",
            vmm.stderr()
        );
    }
}
