use std::process::Command;

use hypervisor::sev_snp::SNP_POLICY_DEFAULT;

use super::*;
use crate::sev_snp::ovmf::SEV_METADATA_GUID;
use crate::sev_snp::ovmf::tests::{debian_ovmf, entry, metadata, sev_image, synthetic_image};
use crate::sev_snp::simulated_psp::LaunchState;

/// An EPYC Milan signature (family 0x19, model 1, stepping 1).
const MILAN: u32 = 0x00a0_0f11;

fn cpuid(signature: u32) -> Vec<CpuidEntry> {
    vec![
        CpuidEntry {
            function: 0,
            eax: 0x10,
            ..Default::default()
        },
        CpuidEntry {
            function: 1,
            eax: signature,
            ..Default::default()
        },
    ]
}

/// The launch's error, for launches expected to fail.
fn failed(result: Result<(Vec<Box<dyn Vcpu>>, u32), LaunchError>) -> LaunchError {
    match result {
        Ok(_) => panic!("the launch succeeded"),
        Err(e) => e,
    }
}

fn params(vcpus: u8) -> SnpParams {
    SnpParams {
        vcpus,
        ..Default::default()
    }
}

/// `sev-snp-measure` (PyPI), the tool attestation verifiers use, run as a
/// subprocess; `None` with a loud skip where it is not installed (CI
/// installs it and fails instead).
fn sev_snp_measure(args: &[&str]) -> Option<String> {
    match Command::new("sev-snp-measure").args(args).output() {
        Ok(out) => {
            assert!(
                out.status.success(),
                "sev-snp-measure {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8(out.stdout).unwrap().trim().to_string())
        }
        Err(e) => {
            assert_ne!(
                std::env::var("CH_REQUIRE_KVM").as_deref(),
                Ok("1"),
                "sev-snp-measure is required in CI (pip install sev-snp-measure): {e}"
            );
            eprintln!("*** SKIPPED: sev-snp-measure: {e} (pip install sev-snp-measure) ***");
            None
        }
    }
}

fn oracle(vcpus: u8, signature: u32, guest_features: u64) -> Option<String> {
    sev_snp_measure(&[
        "--mode",
        "snp",
        "--vmm-type",
        "QEMU",
        "--ovmf",
        crate::sev_snp::ovmf::tests::DEBIAN_OVMF,
        "--vcpus",
        &vcpus.to_string(),
        "--vcpu-sig",
        &format!("{signature:#x}"),
        "--guest-features",
        &format!("{guest_features:#x}"),
    ])
}

/// The digest of the real launch code against the simulated processor
/// equals what verifiers compute, for 1, 2 and 4 vCPUs, with this host's
/// signature and a Milan one, and with DebugSwap among the features.
#[test]
fn debian_ovmf_digest_equals_sev_snp_measure() {
    let Some(data) = debian_ovmf() else { return };
    let firmware = OvmfImage::parse(data).unwrap();
    let host = cpuid_page::signature(&cpuid_page::host_minimal()).unwrap();
    for (signature, features) in [(MILAN, 1), (host, 1), (MILAN, 0x21)] {
        for vcpus in [1, 2, 4] {
            let ours = measure(
                &firmware,
                512 << 20,
                &cpuid(signature),
                SnpParams {
                    vcpus,
                    guest_features: features,
                    policy: SNP_POLICY_DEFAULT,
                },
            )
            .unwrap();
            let Some(theirs) = oracle(vcpus, signature, features) else {
                return;
            };
            eprintln!(
                "{vcpus} vCPUs, signature {signature:#x}, features {features:#x}: {}",
                ours.measurement
            );
            assert_eq!(
                ours.measurement, theirs,
                "{vcpus} vCPUs, signature {signature:#x}"
            );
            assert_eq!(
                (ours.vcpu_signature, ours.guest_features),
                (signature, features)
            );
        }
    }
}

/// Byte for byte, the VMSAs KVM would build from our vCPU state are the
/// ones the verifiers' tool measures.
#[test]
fn vmsa_pages_equal_the_ones_sev_snp_measure_dumps() {
    let Some(data) = debian_ovmf() else { return };
    let firmware = OvmfImage::parse(data).unwrap();
    let dir = crate::test_util::scratch_path("vmsa-dump");
    std::fs::create_dir_all(&dir).unwrap();
    let ovmf = std::path::Path::new(crate::sev_snp::ovmf::tests::DEBIAN_OVMF);
    let run = Command::new("sev-snp-measure")
        .current_dir(&dir)
        .args([
            "--mode",
            "snp",
            "--vmm-type",
            "QEMU",
            "--vcpus",
            "2",
            "--dump-vmsa",
        ])
        .args(["--vcpu-sig", &format!("{MILAN:#x}"), "--ovmf"])
        .arg(ovmf)
        .output();
    if run.is_err() {
        assert!(sev_snp_measure(&["--version"]).is_none());
        return;
    }
    assert!(run.unwrap().status.success());
    let reset = firmware.reset_block().unwrap();
    for (index, state) in [
        (0, vmsa::bsp_state(MILAN)),
        (1, vmsa::ap_state(reset, MILAN)),
    ] {
        let dumped = std::fs::read(dir.join(format!("vmsa{index}.bin"))).unwrap();
        let ours = vmsa::build_vmsa(&state, 1);
        let differing: Vec<usize> = (0..4096).filter(|i| dumped[*i] != ours[*i]).collect();
        assert!(
            differing.is_empty(),
            "vCPU {index}: bytes {differing:x?} differ"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small firmware: one reset block, a zero section, secrets and CPUID.
fn small_firmware() -> OvmfImage {
    let sections = [
        (0x80_0000, 0x2000, 1),
        (0x80_2000, 0x1000, 2),
        (0x80_3000, 0x1000, 3),
    ];
    OvmfImage::parse(sev_image(16 << 10, &[], &sections)).unwrap()
}

fn psp() -> SimulatedPsp {
    SimulatedPsp::new(private_memory(64 << 20, &small_firmware()))
}

fn refused(result: hypervisor::sev_snp::SnpResult<impl Sized>, command: &str, why: &str) {
    match result {
        Err(SnpLaunchError::Refused { command: c, why: w }) => {
            assert_eq!(c, command);
            assert!(w.contains(why), "{command}: {w:?} does not say {why:?}");
        }
        Err(e) => panic!("{command}: {e}"),
        Ok(_) => panic!("{command} accepted, {why:?} expected"),
    }
}

/// Runs a launch up to (not including) `step` and returns the processor.
fn launched_until(step: &str) -> SimulatedPsp {
    let mut psp = psp();
    let fw = small_firmware();
    if step == "init" {
        return psp;
    }
    psp.init(0).unwrap();
    if step == "start" {
        return psp;
    }
    psp.launch_start(SNP_POLICY_DEFAULT).unwrap();
    if step == "update" {
        return psp;
    }
    psp.launch_update(SnpUpdate::new(
        fw.gpa(),
        fw.data().len() as u64,
        Some(fw.data()),
        SnpPageType::Normal,
    ))
    .unwrap();
    psp.add_vcpu(0, &vmsa::bsp_state(MILAN)).unwrap();
    if step == "finish" {
        return psp;
    }
    psp.launch_finish().unwrap();
    psp
}

/// One launch command, for tables of refused ones.
#[derive(Clone, Copy)]
enum Step {
    Init,
    Start,
    Update,
    Vcpu(u8),
    Finish,
}

/// Sends `step` to `p`: its result and the command's name.
fn attempt(p: &mut SimulatedPsp, step: Step) -> (hypervisor::sev_snp::SnpResult<()>, &'static str) {
    let page = [0u8; 4096];
    match step {
        Step::Init => (p.init(0), "KVM_SEV_INIT2"),
        Step::Start => (p.launch_start(SNP_POLICY_DEFAULT), "SNP_LAUNCH_START"),
        Step::Update => (
            p.launch_update(SnpUpdate::new(0, 4096, Some(&page), SnpPageType::Normal)),
            "SNP_LAUNCH_UPDATE",
        ),
        Step::Vcpu(index) => (
            p.add_vcpu(index, &vmsa::bsp_state(MILAN)).map(drop),
            "KVM_CREATE_VCPU",
        ),
        Step::Finish => (p.launch_finish(), "SNP_LAUNCH_FINISH"),
    }
}

#[test]
fn every_out_of_order_step_is_refused() {
    use Step::*;
    for (stage, steps, why) in [
        // Before KVM_SEV_INIT2: nothing else.
        (
            "init",
            &[Start, Update, Vcpu(0), Finish][..],
            "out of order",
        ),
        // Initialized: no second init, no update or finish before the start.
        ("start", &[Init, Update, Finish], "out of order"),
        // Started: no second start; no finish without a vCPU.
        ("update", &[Start], "out of order"),
        ("update", &[Finish], "no vCPU"),
        // One VMSA per vCPU.
        ("finish", &[Vcpu(0)], "already has a VMSA"),
        // Nothing after the finish.
        ("done", &[Init, Start, Update, Vcpu(1), Finish], "finished"),
    ] {
        let mut p = launched_until(stage);
        let (state, digest) = (p.state(), p.digest().clone());
        for &step in steps {
            let (result, command) = attempt(&mut p, step);
            refused(result, command, why);
        }
        assert_eq!(p.state(), state, "{stage}: refusals change nothing");
        assert_eq!(p.digest(), &digest, "{stage}: refusals change nothing");
    }
    assert_eq!(launched_until("done").state(), LaunchState::Finished);
}

#[test]
fn malformed_steps_are_refused_and_change_nothing() {
    let mut p = launched_until("start");
    refused(p.init(0), "KVM_SEV_INIT2", "out of order");
    let mut p = launched_until("init");
    refused(p.init(1), "KVM_SEV_INIT2", "not supported");
    refused(p.init(1 << 7), "KVM_SEV_INIT2", "not supported");
    let mut p = launched_until("start");
    refused(p.launch_start(1 << 16), "SNP_LAUNCH_START", "must-be-one");
    refused(
        p.launch_start(SNP_POLICY_DEFAULT | 1 << 30),
        "SNP_LAUNCH_START",
        "reserved bits",
    );
    refused(
        p.launch_start(SNP_POLICY_DEFAULT | 1 << 20),
        "SNP_LAUNCH_START",
        "single-socket",
    );

    let mut p = launched_until("update");
    let before = p.digest().clone();
    let page = [0u8; 4096];
    let two = [0u8; 8192];
    let cpuid = cpuid_page::build(&cpuid(MILAN)).unwrap();
    let up = "SNP_LAUNCH_UPDATE";
    refused(
        p.launch_update(SnpUpdate::new(
            0x80_0800,
            4096,
            Some(&page),
            SnpPageType::Normal,
        )),
        up,
        "not whole 4 KiB pages",
    );
    refused(
        p.launch_update(SnpUpdate::new(
            0x80_0000,
            100,
            Some(&page[..100]),
            SnpPageType::Normal,
        )),
        up,
        "not whole 4 KiB pages",
    );
    refused(
        p.launch_update(SnpUpdate::new(0x80_0000, 0, None, SnpPageType::Zero)),
        up,
        "not whole 4 KiB pages",
    );
    refused(
        p.launch_update(SnpUpdate::new(!0xfff, 8192, None, SnpPageType::Zero)),
        up,
        "wraps",
    );
    // The MMIO hole below the firmware is not private memory.
    refused(
        p.launch_update(SnpUpdate::new(0xc000_0000, 4096, None, SnpPageType::Zero)),
        up,
        "not private guest_memfd",
    );
    refused(
        p.launch_update(SnpUpdate::new(64 << 20, 4096, None, SnpPageType::Zero)),
        up,
        "not private guest_memfd",
    );
    refused(
        p.launch_update(SnpUpdate::new(
            0x80_0000,
            4096,
            Some(&page),
            SnpPageType::Zero,
        )),
        up,
        "no source",
    );
    refused(
        p.launch_update(SnpUpdate::new(0x80_0000, 4096, None, SnpPageType::Normal)),
        up,
        "need a source",
    );
    refused(
        p.launch_update(SnpUpdate::new(
            0x80_0000,
            8192,
            Some(&page),
            SnpPageType::Normal,
        )),
        up,
        "4096 source bytes",
    );
    refused(
        p.launch_update(SnpUpdate::new(
            0x80_0000,
            8192,
            Some(&two),
            SnpPageType::Cpuid,
        )),
        up,
        "one page",
    );
    refused(
        p.launch_update(SnpUpdate::new(
            0x80_0000,
            8192,
            Some(&two),
            SnpPageType::Secrets,
        )),
        up,
        "one page",
    );
    let mut bad_cpuid = *cpuid;
    bad_cpuid[0] = 100;
    refused(
        p.launch_update(SnpUpdate::new(
            0x80_0000,
            4096,
            Some(&bad_cpuid[..]),
            SnpPageType::Cpuid,
        )),
        up,
        "claims 100 functions",
    );
    assert_eq!(p.digest(), &before, "refusals change nothing");
    assert_eq!(p.cpuid(), None, "a refused CPUID page is not the guest's");
    // Each page once.
    p.launch_update(SnpUpdate::new(0x80_0000, 8192, None, SnpPageType::Zero))
        .unwrap();
    refused(
        p.launch_update(SnpUpdate::new(0x80_1000, 4096, None, SnpPageType::Zero)),
        up,
        "launched already",
    );
    p.launch_update(SnpUpdate::new(
        0x80_2000,
        4096,
        Some(&cpuid[..]),
        SnpPageType::Cpuid,
    ))
    .unwrap();
    // The accepted table is kept through the updates after it.
    p.launch_update(SnpUpdate::new(0x80_3000, 4096, None, SnpPageType::Zero))
        .unwrap();
    let table = p.cpuid().expect("the accepted CPUID page");
    assert_eq!(
        table.iter().map(|f| (f.eax_in, f.eax)).collect::<Vec<_>>(),
        [(0, 0x10), (1, MILAN)]
    );
}

/// A backend that refuses one step, so the launch's own handling shows.
#[test]
fn the_launch_stops_at_the_first_refusal_with_its_reason() {
    let firmware = small_firmware();
    // Too small a RAM: the metadata's pages at 8 MiB are not RAM.
    let mut small = SimulatedPsp::new(private_memory(4 << 20, &firmware));
    let err = failed(launch(&mut small, &firmware, &cpuid(MILAN), params(2)));
    let text = crate::error_chain(&err);
    assert!(
        text.contains(
            "SNP_LAUNCH_UPDATE refused: 0x800000+0x2000 is not private guest_memfd memory"
        ),
        "{text}"
    );
    assert_eq!(
        small.state(),
        LaunchState::Started,
        "stopped there, never finished"
    );

    let mut p = psp();
    let err = failed(launch(
        &mut p,
        &firmware,
        &cpuid(MILAN),
        SnpParams {
            policy: 0,
            ..params(1)
        },
    ));
    assert!(crate::error_chain(&err).contains("must-be-one"), "{err}");

    for (bad, expected) in [
        (
            SnpParams {
                guest_features: 0,
                ..params(1)
            },
            "lack SNP-active",
        ),
        (
            SnpParams {
                guest_features: 1 << 9 | 1,
                ..params(1)
            },
            "VMSA features 0x200 are not supported",
        ),
    ] {
        let err = failed(launch(&mut psp(), &firmware, &cpuid(MILAN), bad));
        assert!(crate::error_chain(&err).contains(expected), "{err}");
    }
    // SNP-active is KVM's to set, even from a host that listed it.
    let mut listing = psp().with_supported_vmsa_features(u64::MAX);
    refused(listing.init(1), "KVM_SEV_INIT2", "SNP-active");
    listing.init(1 << 5).unwrap();

    let err = failed(launch(&mut psp(), &firmware, &[], params(1)));
    assert!(matches!(err, LaunchError::NoSignature));
    let no_reset = OvmfImage::parse(synthetic_image(
        16 << 10,
        &[entry(SEV_METADATA_GUID, &0x800u32.to_le_bytes())],
        Some((0x800, metadata(1, &[(0x80_0000, 0x1000, 1)]))),
    ))
    .unwrap();
    assert!(matches!(
        launch(&mut psp(), &no_reset, &cpuid(MILAN), params(3)),
        Err(LaunchError::NoResetBlock(2))
    ));
    let plain = OvmfImage::parse(synthetic_image(16 << 10, &[], None)).unwrap();
    assert!(matches!(
        launch(&mut psp(), &plain, &cpuid(MILAN), params(1)),
        Err(LaunchError::NoMetadata)
    ));
}

#[test]
fn a_full_launch_logs_every_step_in_order() {
    let firmware = small_firmware();
    let mut p = psp();
    let (vcpus, signature) = launch(&mut p, &firmware, &cpuid(MILAN), params(2)).unwrap();
    assert!(vcpus.is_empty(), "the simulation has no vCPUs to run");
    assert_eq!(signature, MILAN);
    assert_eq!(
        p.log(),
        [
            "init vmsa_features=0x0",
            "start policy=0x30000",
            "update normal 0xffffc000+0x4000",
            "update zero 0x800000+0x2000",
            "update secrets 0x802000+0x1000",
            "update cpuid 0x803000+0x1000",
            "vcpu 0",
            "vcpu 1",
            "finish",
        ]
    );
    // vCPU count, features and signature all enter the digest.
    let base = measure(&firmware, 64 << 20, &cpuid(MILAN), params(2)).unwrap();
    for other in [
        measure(&firmware, 64 << 20, &cpuid(MILAN), params(1)).unwrap(),
        measure(&firmware, 64 << 20, &cpuid(MILAN + 1), params(2)).unwrap(),
        measure(
            &firmware,
            64 << 20,
            &cpuid(MILAN),
            SnpParams {
                guest_features: 0x21,
                ..params(2)
            },
        )
        .unwrap(),
    ] {
        assert_ne!(other.measurement, base.measurement);
    }
    // The policy does not: it is reported beside the measurement.
    let policy = measure(
        &firmware,
        64 << 20,
        &cpuid(MILAN),
        SnpParams {
            policy: SNP_POLICY_DEFAULT | 1 << 19,
            ..params(2)
        },
    )
    .unwrap();
    assert_eq!(policy.measurement, base.measurement);
}

#[test]
fn the_measurement_prints_as_one_json_object_in_the_documented_order() {
    let m = Measurement {
        measurement: "ab".repeat(48),
        vcpu_signature: MILAN,
        guest_features: 0x21,
        policy: SNP_POLICY_DEFAULT,
    };
    let text = m.to_json();
    assert!(
        text.starts_with("{\"platform\": \"sev-snp\", \"measurement\": \"abab"),
        "{text}"
    );
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["vcpu_signature"], "0xa00f11");
    assert_eq!(value["guest_features"], "0x21");
}
