//! The SEV-SNP launch from the command line: `--measure` on Debian's
//! OVMF.fd against `sev-snp-measure` (the verifiers' tool), and a firmware
//! boot on this host, which has no SEV-SNP.

mod common;

use std::process::Command;

use common::*;

const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// Whether `what` is installed; a loud skip if not, a failure in CI
/// (`.ci/run` installs both the firmware and the tool).
fn installed(what: &str, present: bool) -> bool {
    if !present {
        assert_ne!(
            std::env::var("CH_REQUIRE_KVM").as_deref(),
            Ok("1"),
            "{what} is required in CI (.ci/run installs it)"
        );
        eprintln!("*** SKIPPED: {what} is not installed ***");
    }
    present
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(CLOUD_HYPERVISOR).args(args).output().unwrap()
}

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
        let out = run(&[
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
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.lines().count(), 1, "one JSON object: {text}");
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
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
    let refused = |args: &[&str], expected: &str| {
        let out = run(args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    };
    refused(&["--measure"], "give --firmware");
    refused(&["--firmware", "/x.fd"], "give --platform sev_snp=on");
    refused(
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
    refused(
        &[
            "--firmware",
            "/nonexistent.fd",
            "--platform",
            "sev_snp=on",
            "--measure",
        ],
        "cannot read firmware /nonexistent.fd",
    );
    refused(
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

/// This host has no SEV-SNP: the firmware boot stops before creating a
/// VM, saying so, and leaves nothing running.
#[test]
fn sev_snp_without_measure_stops_clearly_here() {
    if !installed(OVMF, std::path::Path::new(OVMF).exists()) || !kvm_available("sev_snp_boot") {
        return;
    }
    let out = run(&[
        "--platform",
        "sev_snp=on",
        "--firmware",
        OVMF,
        "--cpus",
        "boot=2",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("VM type sev-snp is not available on this host")
            && stderr.contains("no SEV-SNP here"),
        "{stderr}"
    );
}
