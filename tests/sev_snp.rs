//! The SEV-SNP launch from the command line: `--measure` on Debian's
//! OVMF.fd against `sev-snp-measure` (the verifiers' tool), and a firmware
//! boot on this host, which has no SEV-SNP.

mod common;

use std::process::Command;

use common::*;

#[test]
fn measure_prints_what_sev_snp_measure_computes() {
    if !installed(OVMF, std::path::Path::new(OVMF).exists()) {
        return;
    }
    let tool = Command::new("sev-snp-measure").arg("--version").output();
    if !installed("sev-snp-measure", tool.is_ok()) {
        return;
    }
    for vcpus in ["1", "2", "4"] {
        let cpus = format!("boot={vcpus}");
        let json = measured(&[
            "--platform",
            "sev_snp=on",
            "--firmware",
            OVMF,
            "--cpus",
            &cpus,
            "--memory",
            "size=1G",
            "--measure",
        ]);
        assert_eq!(json["platform"], "sev-snp");
        assert_eq!(json["guest_features"], "0x1");
        let signature = json["vcpu_signature"].as_str().unwrap();
        let theirs = Command::new("sev-snp-measure")
            .args(["--mode", "snp", "--vmm-type", "QEMU", "--ovmf", OVMF])
            .args(["--vcpus", vcpus, "--vcpu-sig", signature])
            .output()
            .unwrap();
        assert!(theirs.status.success());
        let theirs = String::from_utf8(theirs.stdout).unwrap();
        assert_eq!(json["measurement"], theirs.trim(), "{vcpus} vCPUs");
    }
}

#[test]
fn firmware_options_are_checked() {
    assert_refused(&["--measure"], "give --firmware");
    assert_refused(&["--firmware", "/x.fd"], "give --platform sev_snp=on");
    assert_refused(
        &[
            "--firmware",
            "/x.fd",
            "--platform",
            "sev_snp=on",
            "--kernel",
            "/k",
        ],
        "not both",
    );
    assert_refused(
        &[
            "--firmware",
            "/nonexistent.fd",
            "--platform",
            "sev_snp=on",
            "--measure",
        ],
        "cannot read firmware /nonexistent.fd",
    );
    assert_refused(
        &[
            "--firmware",
            OVMF,
            "--platform",
            "sev_snp=on,snp_guest_features=0",
            "--measure",
        ],
        "lack SNP-active",
    );
}

/// This host has no SEV-SNP: the firmware boot goes through the VM build
/// (API socket, event monitor) and stops before creating a VM, saying so,
/// with exit status 1 and nothing left: no socket, no process.
#[test]
fn sev_snp_without_measure_stops_clearly_here() {
    if !installed(OVMF, std::path::Path::new(OVMF).exists()) || !kvm_available("sev_snp_boot") {
        return;
    }
    let names = assert_firmware_boot_stops(
        "sev-snp-boot",
        "sev_snp=on",
        &[
            "cannot boot the firmware",
            "VM type sev-snp is not available on this host",
            "no SEV-SNP here",
        ],
    );
    assert!(!names.iter().any(|n| n == "vm/booted"), "{names:?}");
}
