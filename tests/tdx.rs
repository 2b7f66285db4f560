//! The TDX launch from the command line: `--measure` on Debian's OVMF.fd
//! against MRTD computed here from the image alone (a parser and hashing
//! of this file's own, sharing nothing with the launch code), and a
//! firmware boot on this host, which has no TDX.

mod common;

use common::*;
use sha2::{Digest, Sha384};

fn have_ovmf() -> bool {
    installed(OVMF, std::path::Path::new(OVMF).exists())
}

fn le32(d: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(d[at..at + 4].try_into().unwrap())
}

fn le64(d: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(d[at..at + 8].try_into().unwrap())
}

/// MRTD as the TDX module computes it when KVM launches `image` the way
/// QEMU drives it: the TDVF sections in descriptor order, each page
/// TDH.MEM.PAGE.ADD'ed in ascending order and, for MR.EXTEND sections,
/// TDH.MR.EXTEND'ed right after in 256-byte chunks.
fn independent_mrtd(image: &[u8]) -> String {
    // OVMF's GUIDed table, read from its footer down, to the entry whose
    // GUID is e47a6535-984a-4798-865e-4685a7bf8ec2 (TDX metadata offset).
    let tdx_guid: [u8; 16] = [
        0x35, 0x65, 0x7a, 0xe4, 0x4a, 0x98, 0x98, 0x47, 0x86, 0x5e, 0x46, 0x85, 0xa7, 0xbf, 0x8e,
        0xc2,
    ];
    let footer = image.len() - 32 - 18;
    let table_start =
        footer + 18 - usize::from(u16::from_le_bytes([image[footer], image[footer + 1]]));
    let mut end = footer;
    let mut offset = None;
    while end > table_start {
        let len = usize::from(u16::from_le_bytes([image[end - 18], image[end - 17]]));
        if image[end - 16..end] == tdx_guid {
            offset = Some(le32(image, end - len) as usize);
        }
        end -= len;
    }
    let descriptor = image.len() - offset.expect("a TDX metadata offset entry");
    assert_eq!(&image[descriptor..descriptor + 4], b"TDVF");
    let count = le32(image, descriptor + 12) as usize;
    let mut hash = Sha384::new();
    for index in 0..count {
        let s = descriptor + 16 + index * 32;
        let (data_offset, raw) = (le32(image, s) as usize, le32(image, s + 4) as usize);
        let (gpa, size) = (le64(image, s + 8), arch::usize_from(le64(image, s + 16)));
        let attributes = le32(image, s + 28);
        if attributes & 2 != 0 {
            continue; // PAGE.AUG: not added at launch.
        }
        let mut contents = image[data_offset..data_offset + raw].to_vec();
        contents.resize(size, 0);
        for (page, bytes) in contents.chunks(4096).enumerate() {
            let page_gpa = gpa + page as u64 * 4096;
            let mut block = [0u8; 128];
            block[..12].copy_from_slice(b"MEM.PAGE.ADD");
            block[16..24].copy_from_slice(&page_gpa.to_le_bytes());
            hash.update(block);
            if attributes & 1 != 0 {
                for (i, chunk) in bytes.chunks(256).enumerate() {
                    let mut block = [0u8; 128];
                    block[..9].copy_from_slice(b"MR.EXTEND");
                    block[16..24].copy_from_slice(&(page_gpa + i as u64 * 256).to_le_bytes());
                    hash.update(block);
                    hash.update(chunk);
                }
            }
        }
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn measure_prints_the_mrtd_computed_from_the_image_alone() {
    if !have_ovmf() {
        return;
    }
    let expected = independent_mrtd(&std::fs::read(OVMF).unwrap());
    for (cpus, memory) in [("boot=1", "size=512M"), ("boot=4", "size=2G")] {
        let json = measured(&[
            "--platform",
            "tdx=on",
            "--firmware",
            OVMF,
            "--cpus",
            cpus,
            "--memory",
            memory,
            "--measure",
        ]);
        assert_eq!(
            json,
            serde_json::json!({"platform": "tdx", "measurement": expected}),
            "{cpus} {memory}"
        );
    }
}

#[test]
fn tdx_firmware_options_are_checked() {
    assert_refused(&["--firmware", "/x.fd"], "sev_snp=on or tdx=on");
    assert_refused(
        &[
            "--firmware",
            "/nonexistent.fd",
            "--platform",
            "tdx=on",
            "--measure",
        ],
        "cannot read firmware /nonexistent.fd",
    );
    let not_tdvf = std::env::temp_dir().join(format!("ch-tdx-not-tdvf-{}.fd", std::process::id()));
    std::fs::write(&not_tdvf, vec![0u8; 8192]).unwrap();
    assert_refused(
        &[
            "--firmware",
            not_tdvf.to_str().unwrap(),
            "--platform",
            "tdx=on",
            "--measure",
        ],
        "no OVMF GUIDed table",
    );
    let _ = std::fs::remove_file(&not_tdvf);
    assert_refused(
        &[
            "--firmware",
            "/x.fd",
            "--platform",
            "tdx=on",
            "--cmdline",
            "x",
        ],
        "--cmdline does not apply to a firmware launch",
    );
    // Devices are taken with firmware (cold-plugged once the TD is
    // launched): here the boot stops at the host, not at the option.
    if have_ovmf() && kvm_available("tdx_firmware_with_a_device") {
        assert_refused(
            &[
                "--firmware",
                OVMF,
                "--platform",
                "tdx=on",
                "--serial",
                "off",
                "--user-device",
                "socket=/nonexistent.sock",
            ],
            "no TDX here",
        );
    }
}

/// This host has no TDX: the firmware boot goes through the VM build (API
/// socket, event monitor) and stops before creating a VM, saying so, with
/// exit status 1 and nothing left: no socket, no process.
#[test]
fn tdx_without_measure_stops_clearly_here() {
    if !have_ovmf() || !kvm_available("tdx_boot") {
        return;
    }
    let names = assert_firmware_boot_stops(
        "tdx-boot",
        "tdx=on",
        &[
            "cannot boot the firmware",
            "VM type tdx is not available on this host",
            "no TDX here",
        ],
    );
    assert!(!names.iter().any(|n| n == "vm/booted"), "{names:?}");
}

/// `vm.create` takes Cloud Hypervisor's `payload.firmware` for a TD (and
/// refuses it without a confidential platform); on this host its boot
/// fails with the reason and the VMM keeps serving, with no VM running.
#[test]
fn vm_create_takes_a_tdx_firmware_and_its_boot_stops_clearly_here() {
    if !have_ovmf() || !kvm_available("tdx_vm_create") {
        return;
    }
    let dir = TempDir::new("tdx-create");
    let api = dir.path("api.sock");
    let mut vmm = GuestVmm::spawn_args(&["--api-socket", &format!("path={}", api.display())]);
    wait_for_socket(&api);
    let config = |platform: serde_json::Value| {
        serde_json::json!({
            "payload": {"firmware": OVMF},
            "memory": {"size": 512u64 << 20},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
            "platform": platform,
        })
        .to_string()
    };
    let (status, body) = put(&api, "vm.create", &config(serde_json::json!({})));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("platform.sev_snp or platform.tdx"), "{body}");
    let (status, body) = put(&api, "vm.create", &config(serde_json::json!({"tdx": true})));
    assert_eq!(status, 204, "{body}");
    let (status, body) = put(&api, "vm.boot", "");
    assert!(status >= 400, "{status} {body}");
    assert!(
        body.contains("VM type tdx is not available on this host") && body.contains("no TDX here"),
        "{body}"
    );
    let (status, info) = get(&api, "vm.info");
    if status == 200 {
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_ne!(info["state"], "Running", "{info}");
        assert!(info.get("launch").is_none(), "{info}");
    }
    let (status, _) = get(&api, "vmm.ping");
    assert_eq!(status, 200, "the VMM keeps serving");
    assert!(vmm.is_running());
}
