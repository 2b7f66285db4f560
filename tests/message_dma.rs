//! `dma=messages`: a vfio-user server that is never given the guest RAM's
//! fd reaches guest memory only by DMA_READ / DMA_WRITE, and the VMM serves
//! those inside the device's current mappings only, so a page the guest
//! made private is out of its reach even on a host whose KVM does not
//! protect private memory. Against the real test device process and the
//! real VMM.

mod common;

use common::*;

const A: u64 = 16 << 20;

fn device_info(api: &std::path::Path) -> serde_json::Value {
    let (status, body) = get(api, "vm.info");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["devices"][0].clone()
}

#[test]
fn a_device_in_messages_mode_gets_no_fd_and_reaches_only_its_mappings() {
    if !kvm_available("a_device_in_messages_mode_gets_no_fd_and_reaches_only_its_mappings") {
        return;
    }
    let dir = TempDir::new("msgdma");
    let device = TestDevice::spawn(&dir, "dev0");
    let (page1, page2) = (A + 0x1000, A + 0x2000);
    let ops = [
        format!("shared@{A:#x}+16K"),
        // The device reads what the guest wrote and writes what it checks.
        format!("write@{page1:#x}+4K=0x5a"),
        format!("dma-read@{page1:#x}+4K=0x5a"),
        format!("dma-write@{A:#x}+4K=0x77"),
        format!("check@{A:#x}+4K=0x77"),
        // A secret in a page the guest took back: out of the device's reach.
        format!("private@{page2:#x}+4K"),
        format!("write@{page2:#x}+4K=0x99"),
        format!("dma-read@{page2:#x}+4K=0x99"),
    ]
    .join(",");
    let guest = memconv_guest(&dir, &[&ops], false);
    let (vmm, api) = spawn_with_api(
        &dir,
        &guest,
        &[
            "--user-device",
            &format!("socket={},id=dev0,dma=messages", device.socket.display()),
        ],
    );
    vmm.wait_for_line("memconv: done 7 ok 1 failed");
    assert_eq!(
        vmm.op_statuses(),
        ["ok", "ok", "ok", "ok", "ok", "ok", "ok", "dma-fault"]
    );
    wait_for_socket(&api);
    let info = device_info(&api);
    assert_eq!(info["dma_mode"], "messages", "{info}");
    assert_eq!(info["state"], "attached", "{info}");
    // No mapping came with an fd, and the mappings are the shared pages.
    assert_eq!(device.command("fd-maps"), "0");
    let shared = vmm_shared_ranges(&api);
    assert_eq!(shared, [(A, 0x2000), (A + 0x3000, 0x1000)]);
    assert_eq!(device.mapped(), shared);
    // Between the guest's requests the VMM still answers the device's DMA
    // (its own thread does): a shared page reads back what the device wrote.
    assert_eq!(device.read(A, 4).unwrap(), [0x77; 4]);
    // A device lying about its mappings asks for the private page: refused,
    // nothing read, and the connection stays.
    let attack = device.command(&format!("raw-read {page2:#x} 16"));
    assert!(attack.contains("refused the DMA (errno 14)"), "{attack}");
    assert!(!attack.contains("99"), "{attack}");
    let attack = device.command(&format!("raw-read {:#x} 0x2000", A + 0x1000));
    assert!(
        attack.contains("errno 14"),
        "a read running on into the private page: {attack}"
    );
    assert_eq!(device.command(&format!("raw-read {A:#x} 2")), "7777");
    assert_eq!(device_info(&api)["state"], "attached");
    assert_eq!(device.mapped(), vmm_shared_ranges(&api));
}

#[test]
fn fd_mode_says_what_it_exposes_on_a_host_without_private_memory() {
    if !kvm_available("fd_mode_says_what_it_exposes_on_a_host_without_private_memory") {
        return;
    }
    let dir = TempDir::new("fdwarn");
    let fd_device = TestDevice::spawn(&dir, "fd0");
    let message_device = TestDevice::spawn(&dir, "msg0");
    let guest = memconv_guest(&dir, &[&format!("shared@{A:#x}+8K")], false);
    let (vmm, api) = spawn_with_api(
        &dir,
        &guest,
        &[
            "--user-device",
            &format!("socket={},id=fd0", fd_device.socket.display()),
            "--user-device",
            &format!(
                "socket={},id=msg0,dma=messages",
                message_device.socket.display()
            ),
        ],
    );
    vmm.wait_for_line("memconv: done 1 ok 0 failed");
    wait_for_socket(&api);
    let (_, body) = get(&api, "vm.info");
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["devices"][0]["dma_mode"], "fd");
    assert_eq!(info["devices"][1]["dma_mode"], "messages");
    let warnings: Vec<String> = vmm
        .stderr()
        .lines()
        .filter(|l| l.contains("does not enforce private memory"))
        .map(str::to_string)
        .collect();
    // Where KVM enforces private memory (TDX, SEV-SNP) there is nothing to
    // warn of; this machine's KVM does not (docs/confidential-vms.md).
    if info["memory_attributes"] == false {
        assert_eq!(
            warnings.len(),
            1,
            "one warning, for the fd device: {warnings:?}"
        );
        assert!(warnings[0].contains("fd0.sock"), "{warnings:?}");
    } else {
        assert!(warnings.is_empty(), "{warnings:?}");
    }
    // Both follow the conversions; only the fd device could mmap them.
    assert!(wait_until(|| fd_device.mapped() == [(A, 0x2000)]));
    assert_eq!(message_device.mapped(), [(A, 0x2000)]);
    assert_eq!(fd_device.command("fd-maps"), "1");
    assert_eq!(message_device.command("fd-maps"), "0");
}
