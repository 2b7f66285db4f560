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
    let dir = kvm_test!("msgdma");
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
    let (vmm, api) = spawn_with_devices(&dir, &guest, &[device.plug(",dma=messages")], &[]);
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
    let dir = kvm_test!("fdwarn");
    let fd_device = TestDevice::spawn(&dir, "fd0");
    let message_device = TestDevice::spawn(&dir, "msg0");
    let guest = memconv_guest(&dir, &[&format!("shared@{A:#x}+8K")], false);
    let (vmm, api) = spawn_with_devices(
        &dir,
        &guest,
        &[fd_device.plug(""), message_device.plug(",dma=messages")],
        &[],
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

/// A `dma=messages` server that, once given a mapping, floods the VMM
/// with DMA_READs of it from a thread of its own while answering every
/// request the VMM sends it. One writer thread takes both in turn, so the
/// flood never holds back the server's own replies.
fn flooding_server(socket: &std::path::Path, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use common::lying_server::{Command, error_reply, message, read_message};
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let (out, queue) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
        let mut writer = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            for bytes in queue {
                if writer.write_all(&bytes).is_err() {
                    return;
                }
            }
        });
        let mut reader = stream;
        let mut flooding = false;
        while let Some((id, command, flags, _, body)) = read_message(&mut reader) {
            if flags & 0xf == 1 {
                continue; // a reply to one of our reads
            }
            let command_kind = Command::n(command);
            let reply = match command_kind {
                Some(Command::Version) => {
                    let mut v = vec![0, 0, 1, 0];
                    v.extend_from_slice(b"{}\0");
                    message(id, command, 1, &v)
                }
                Some(Command::DmaMap | Command::DmaUnmap) => message(id, command, 1, &[]),
                // Not a PCI function: a DMA target only (ENOSYS).
                _ => error_reply(id, command, 38),
            };
            if out.send(reply).is_err() {
                return;
            }
            if matches!(command_kind, Some(Command::DmaMap)) && !flooding {
                flooding = true;
                let iova = u64::from_le_bytes(body[16..24].try_into().unwrap());
                let (out, stop) = (out.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut n = 0x4000u16;
                    let mut read = iova.to_le_bytes().to_vec();
                    read.extend_from_slice(&4096u64.to_le_bytes());
                    while !stop.load(Ordering::Acquire) {
                        n = n.wrapping_add(1);
                        if out
                            .send(message(n, Command::DmaRead as u16, 0, &read))
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        }
    });
}

#[test]
fn a_server_flooding_dma_requests_cannot_stall_the_guests_conversions() {
    let dir = kvm_test!("msgflood");
    let socket = dir.path("flood.sock");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    flooding_server(&socket, stop.clone());
    // The first conversion starts the flood; 40 more follow it.
    let mut ops = vec![format!("shared@{A:#x}+4K")];
    for i in 0..20u64 {
        let page = A + 0x10_0000 + i * 0x1000;
        ops.push(format!("shared@{page:#x}+4K"));
        ops.push(format!("private@{page:#x}+4K"));
    }
    let guest = memconv_guest(&dir, &[&ops.join(",")], false);
    let started = std::time::Instant::now();
    let (vmm, api) = spawn_with_devices(
        &dir,
        &guest,
        &[user_device(&socket, ",id=flood,dma=messages")],
        &[],
    );
    vmm.wait_for_line("memconv: done");
    let took = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Release);
    assert!(
        vmm.console()
            .iter()
            .any(|l| l.contains("memconv: done 41 ok 0 failed")),
        "{:?}",
        vmm.console()
    );
    // Each conversion waits for the client at most behind one DMA read.
    assert!(
        took < std::time::Duration::from_secs(20),
        "41 conversions took {took:?}"
    );
    wait_for_socket(&api);
    // Reads inside its mapping are the protocol, but a flood the VMM cannot
    // keep up with makes the device miss its own replies' deadline: then it
    // is cut off (holding nothing), as any device that stops answering is.
    // On an idle machine it stays attached; on a loaded one either may be.
    let info = device_info(&api);
    match info["state"].as_str() {
        Some("attached") => assert_eq!(info["dma"]["entries"], 1, "{info}"),
        Some("failed") => {
            let why = info["failure"].as_str().unwrap_or_default();
            assert!(
                why.contains("within 5000 ms") || why.contains("socket I/O"),
                "{info}"
            );
            assert_eq!(info["dma"]["entries"], 0, "{info}");
        }
        _ => panic!("{info}"),
    }
}
