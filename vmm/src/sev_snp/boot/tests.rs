//! The firmware boot through the real VM build (`Vm::boot`), on a fake
//! SEV-SNP VM over this host's KVM (`ConfidentialTestHypervisor`): KVM's part
//! of the launch is modelled by the fake, the security processor is a
//! second simulated one, independent of the VMM's own. Everything up to
//! `SNP_LAUNCH_FINISH` runs as on a real host; then the vCPUs start.

use std::sync::Arc;
use std::sync::mpsc::channel;

use hypervisor::attribute_tracking::{
    AttributeTrackingVm, ConfidentialTestHypervisor, SnpFirmware,
};
use hypervisor::sev_snp::SnpResult;
use hypervisor::{
    Hypervisor, SevSnpCommand, SevSnpLauncher, SnpLaunchError, SnpPageType, SnpUpdate,
    SnpVcpuState, Vcpu, Vm as _,
};

use crate::config::{CpusConfig, MemoryConfig, PlatformConfig};
use crate::sev_snp::simulated_psp::{
    DEFAULT_SUPPORTED_VMSA_FEATURES, LaunchState, PrivateMemory, SimulatedPsp,
};
use crate::sev_snp::{measure_firmware, ovmf};
use crate::test_util::firmware_rig::{
    Counted, FirmwareRig, RAM, assert_every_refused_step_stops,
    assert_launch_needs_its_vm_and_the_firmware_region, assert_this_host_boots_or_says_why,
    memory_with_firmware,
};
use crate::vm::VmState;

/// The fake's processor, shared with the test so it can look inside; the
/// test may refuse one command as the hardware might.
type Psp = Counted<SimulatedPsp>;

fn new_psp(refuse_at: Option<usize>) -> Psp {
    // The fake checks KVM's memory rules itself; the processor accepts
    // any private page.
    Counted::new(
        SimulatedPsp::new(PrivateMemory(vec![(0, 1 << 52)])),
        refuse_at,
    )
}

impl SevSnpLauncher for Psp {
    fn init(&mut self, vmsa_features: u64) -> SnpResult<()> {
        self.next("KVM_SEV_INIT2", SnpLaunchError::refused)?
            .init(vmsa_features)
    }
    fn launch_start(&mut self, policy: u64) -> SnpResult<()> {
        self.next("SNP_LAUNCH_START", SnpLaunchError::refused)?
            .launch_start(policy)
    }
    fn launch_update(&mut self, update: SnpUpdate<'_>) -> SnpResult<()> {
        self.next("SNP_LAUNCH_UPDATE", SnpLaunchError::refused)?
            .launch_update(update)
    }
    fn add_vcpu(&mut self, index: u8, state: &SnpVcpuState) -> SnpResult<Option<Box<dyn Vcpu>>> {
        self.next("SNP_LAUNCH_UPDATE (VMSA)", SnpLaunchError::refused)?
            .add_vcpu(index, state)
    }
    fn launch_finish(&mut self) -> SnpResult<()> {
        self.next("SNP_LAUNCH_FINISH", SnpLaunchError::refused)?
            .launch_finish()
    }
}

type Rig = FirmwareRig<Psp>;

/// A fake SEV-SNP host reporting `vmsa_features`, its processor refusing
/// command `refuse_at`; None without KVM or Debian's OVMF.fd.
fn new_rig(tag: &str, refuse_at: Option<usize>, vmsa_features: u64) -> Option<Rig> {
    FirmwareRig::new(tag, new_psp(refuse_at), |kvm, psp| {
        ConfidentialTestHypervisor::sev_snp(kvm, vmsa_features, move || {
            Box::new(psp.clone()) as SnpFirmware
        })
    })
}

fn json_path(path: &std::path::Path) -> serde_json::Value {
    serde_json::json!(path)
}

fn measured_json(rig: &Rig, vcpus: u8, platform: &str) -> String {
    let platform = PlatformConfig::parse(platform).unwrap();
    let memory = MemoryConfig::parse(RAM).unwrap().size;
    measure_firmware(&rig.firmware, memory, &platform, vcpus)
        .unwrap()
        .to_json()
}

fn measured(rig: &Rig, vcpus: u8, platform: &str) -> String {
    let platform = PlatformConfig::parse(platform).unwrap();
    let memory = MemoryConfig::parse(RAM).unwrap().size;
    measure_firmware(&rig.firmware, memory, &platform, vcpus)
        .unwrap()
        .measurement
}

/// The whole path: the VM build creates an `sev-snp` VM, its RAM and the
/// firmware region in private guest_memfd, runs the launch through KVM's
/// commands to the processor, and starts the vCPUs. The digest the
/// processor computed from what it was sent is `--measure`'s.
#[test]
fn a_firmware_boot_launches_through_the_vm_build_as_measure_predicts() {
    for (vcpus, platform) in [(1, "sev_snp=on"), (3, "sev_snp=on,snp_guest_features=0x21")] {
        let Some(rig) = new_rig("snp-boot.fd", None, DEFAULT_SUPPORTED_VMSA_FEATURES) else {
            return;
        };
        let vm = rig.boot(rig.config(vcpus, platform)).unwrap();
        let fake = rig.fake_vm();
        assert_eq!(vm.state(), VmState::Running);
        assert!(fake.launch_finished());
        assert_eq!(fake.live_vcpus(), usize::from(vcpus));
        assert_eq!(rig.launcher.backend().state(), LaunchState::Finished);

        let predicted = measured(&rig, vcpus, platform);
        let launched = vm.launch_measurement().expect("a launch").clone();
        assert_eq!(launched.measurement, predicted, "{vcpus} vCPUs");
        let hardware = rig.launcher.backend().digest().hex();
        assert_eq!(hardware, predicted, "the processor's own digest");
        let features = PlatformConfig::parse(platform).unwrap().snp_guest_features;
        assert_eq!(launched.guest_features, features);

        // vm.info shows it, as --measure prints it, plus the policy.
        let info = vm.info();
        let ours: serde_json::Value =
            serde_json::from_str(&measured_json(&rig, vcpus, platform)).unwrap();
        for key in [
            "platform",
            "measurement",
            "vcpu_signature",
            "guest_features",
        ] {
            assert_eq!(info["launch"][key], ours[key], "{key}");
        }
        assert_eq!(info["launch"]["policy"], "0x30000");
        assert_eq!(info["vm_type"], "sev-snp");
        assert_eq!(
            info["config"]["payload"]["firmware"],
            json_path(&rig.firmware)
        );
        assert!(info["config"]["payload"].get("kernel").is_none());
        assert_eq!(info["memory"]["firmware"]["gpa"], 0xffe0_0000u64);
        assert_eq!(info["memory"]["firmware"]["size"], 0x20_0000u64);

        // The order a verifier reproduces: the image, its sections, then
        // one VMSA per vCPU.
        let log = rig.launcher.backend().log().to_vec();
        assert_eq!(log[0], format!("init vmsa_features={:#x}", features & !1));
        assert_eq!(log[1], "start policy=0x30000");
        assert_eq!(log[2], "update normal 0xffe00000+0x200000");
        let vmsas: Vec<&String> = log.iter().filter(|l| l.starts_with("vcpu")).collect();
        assert_eq!(vmsas.len(), usize::from(vcpus));
        assert_eq!(log.last().unwrap(), "finish");

        // RAM and the image are private guest_memfd memory.
        let firmware = vm.memory().firmware().expect("a firmware region");
        assert_eq!((firmware.gpa, firmware.size), (0xffe0_0000, 0x20_0000));
        rig.assert_ram_and_image_private(&vm);

        // Nothing after the finish: no launch command, no register write.
        for command in [
            SevSnpCommand::Init2 { vmsa_features: 0 },
            SevSnpCommand::LaunchStart { policy: 0x30000 },
            SevSnpCommand::LaunchUpdate(SnpUpdate::new(0, 4096, None, SnpPageType::Zero)),
            SevSnpCommand::LaunchFinish,
        ] {
            let name = command.name();
            let err = fake.sev_snp_command(command).unwrap_err();
            assert!(err.to_string().contains("refused"), "{name}: {err}");
        }
        let vcpu = fake.create_vcpu(vcpus).unwrap();
        assert!(vcpu.set_regs(&Default::default()).is_err());
        drop(vcpu);
        assert_eq!(rig.launcher.backend().digest().hex(), predicted);

        rig.shut_down(vm, fake);
    }
}

/// Every step the processor can refuse, in turn: the build stops with
/// the command and the reason, and nothing of the VM is left.
#[test]
fn every_refused_launch_step_stops_the_build_and_leaves_nothing() {
    let Some(steps) = assert_every_refused_step_stops(
        |refuse_at| new_rig("snp-refuse.fd", refuse_at, DEFAULT_SUPPORTED_VMSA_FEATURES),
        |rig| rig.config(2, "sev_snp=on"),
        "the SEV-SNP launch of",
        |psp| psp.state() == LaunchState::Finished,
    ) else {
        return;
    };
    // INIT2, START, the image, at least one section, two VMSAs, FINISH.
    assert!(steps >= 7, "{steps}");
}

/// A step the VMM's simulation refuses (features this host's KVM does not
/// report) stops the build before KVM sees anything.
#[test]
fn a_step_the_rules_refuse_never_reaches_kvm() {
    let Some(rig) = new_rig("snp-features.fd", None, 0) else {
        return;
    };
    rig.assert_the_rules_refuse(
        rig.config(1, "sev_snp=on,snp_guest_features=0x21"),
        "KVM_SEV_INIT2 refused: VMSA features 0x20 are not supported",
        0,
    );
    assert_eq!(rig.launcher.backend().state(), LaunchState::Created);
}

/// This host has no SEV-SNP: the real hypervisor's boot stops before
/// creating a VM, saying so.
#[test]
fn without_sev_snp_a_firmware_boot_stops_before_creating_anything() {
    let Some(rig) = new_rig("snp-nohost.fd", None, DEFAULT_SUPPORTED_VMSA_FEATURES) else {
        return;
    };
    assert_this_host_boots_or_says_why(
        rig.config(2, "sev_snp=on"),
        hypervisor::VmType::SevSnp,
        "no SEV-SNP here",
    );
}

/// The image and the launch plan are checked before the host: a firmware
/// without SNP-active fails alike everywhere, before any VM exists.
#[test]
fn a_bad_launch_plan_fails_before_any_vm_exists() {
    let Some(rig) = new_rig("snp-plan.fd", None, DEFAULT_SUPPORTED_VMSA_FEATURES) else {
        return;
    };
    let Err(err) = rig.boot(rig.config(1, "sev_snp=on,snp_guest_features=0")) else {
        panic!("booted without SNP-active");
    };
    assert!(crate::error_chain(&err).contains("lack SNP-active"));
    let mut config = rig.config(1, "sev_snp=on");
    config.platform = PlatformConfig::default();
    let Err(err) = rig.boot(config) else {
        panic!("booted firmware on a default VM");
    };
    assert!(crate::error_chain(&err).contains("needs sev_snp=on"));
    assert!(rig.hypervisor.created().is_empty());
}

/// The firmware sits in the top of the MMIO hole: no window the platform
/// decodes there (the 32-bit BARs, ECAM, the IOAPIC, the LAPIC, the 64-bit
/// BARs) reaches into the flash window.
#[test]
fn the_flash_window_overlaps_no_platform_window() {
    use crate::boot::acpi::{IOAPIC_ADDRESS, LAPIC_ADDRESS};
    use crate::device_manager::pci_segment::{ECAM_BASE, MMIO32_END, MMIO32_START, bar_windows};
    use crate::memory::{FIRMWARE_WINDOW_START, MMIO_HOLE_END};
    let flash = FIRMWARE_WINDOW_START..MMIO_HOLE_END;
    assert_eq!(flash.end - flash.start, ovmf::MAX_FIRMWARE_SIZE as u64);
    let (mmio32, _) = bar_windows(64 << 20);
    assert_eq!(mmio32, MMIO32_START..MMIO32_END);
    let mut windows = vec![
        ("32-bit BARs", mmio32),
        ("ECAM", ECAM_BASE..ECAM_BASE + pci::ECAM_SIZE),
        (
            "IOAPIC",
            u64::from(IOAPIC_ADDRESS)..u64::from(IOAPIC_ADDRESS) + 0x1000,
        ),
        (
            "LAPIC",
            u64::from(LAPIC_ADDRESS)..u64::from(LAPIC_ADDRESS) + 0x1000,
        ),
    ];
    for ram in [64 << 20, 3 << 30, 8 << 30] {
        windows.push(("64-bit BARs", bar_windows(ram).1));
    }
    for (name, window) in windows {
        assert!(
            window.end <= flash.start || window.start >= flash.end,
            "{name} {window:x?} overlaps the flash window {flash:x?}"
        );
    }
}

/// The firmware region goes only where firmware goes: whole pages of the
/// flash window, ending at 4 GiB.
#[test]
fn the_firmware_region_is_placed_only_in_the_flash_window() {
    use crate::memory::{MemoryError, MemoryLayout, MemoryManager};
    let Some(kvm) = crate::test_util::kvm() else {
        return;
    };
    // A VM each: slots outlive a dropped manager.
    let new_vm = || {
        Arc::new(AttributeTrackingVm::new(
            kvm.create_vm(hypervisor::VmType::Default).unwrap(),
        ))
    };
    let memory = |vm: &Arc<AttributeTrackingVm>| {
        MemoryManager::new(vm.clone(), 16 << 20, MemoryLayout::Auto).unwrap()
    };
    for (gpa, size) in [
        (0xfe00_0000, 0x200_0000),
        (0xffe0_0000, 0x10_0000),
        (0x1_0000_0000, 0),
        (0xffff_f800, 0x800),
        (0xffe0_0000, 0x20_1000),
    ] {
        let Err(err) = memory(&new_vm()).with_firmware(gpa, size, MemoryLayout::Auto) else {
            panic!("{gpa:#x}+{size:#x} accepted");
        };
        assert!(
            matches!(err, MemoryError::FirmwarePlacement { .. }),
            "{gpa:#x}+{size:#x}: {err}"
        );
    }
    // The lowest and the highest placement.
    for (gpa, size) in [(0xff00_0000, 0x100_0000), (0xffff_f000, 0x1000)] {
        let vm = new_vm();
        let memory = memory(&vm)
            .with_firmware(gpa, size, MemoryLayout::Anonymous)
            .unwrap();
        let region = memory.firmware().unwrap();
        assert_eq!((region.gpa, region.size), (gpa, size));
        assert!(region.backing.is_guest_memfd(), "firmware is guest_memfd");
        assert!(vm.is_private(gpa, size));
        assert_eq!(memory.guest_memfd_ranges().last(), Some(&(gpa, size)));
    }
}

/// After the launch, the guest's page-state changes (KVM turns the GHCB's
/// page-state-change requests into `KVM_HC_MAP_GPA_RANGE` exits, and
/// accesses of the other kind into memory faults) reach this SNP VM's
/// memory manager, KVM's attributes and a device's mappings through the
/// real vCPU loop. The firmware region is not RAM: a to-shared request
/// there changes nothing (it stays private), as for any GPA without RAM.
#[test]
fn an_snp_guests_conversions_reach_the_memory_manager_and_a_device() {
    use hypervisor::scripted_vcpu::{ScriptedExit, ScriptedVcpu};

    use crate::test_util::{conversion, fake_device_on_ram, vcpu_context};
    use crate::vcpu;

    use arch::layout::PAGE_SIZE as PAGE;
    const MIB: u64 = 1 << 20;
    let Some(rig) = new_rig("snp-convert.fd", None, DEFAULT_SUPPORTED_VMSA_FEATURES) else {
        return;
    };
    let mut vm = rig.boot(rig.config(1, "sev_snp=on")).unwrap();
    let fake = rig.fake_vm();
    let memory = vm.memory().clone();
    assert!(memory.tracks_attributes());
    let iommu = fake_device_on_ram(&memory, 64 * MIB, None);
    let base = 16 * MIB;
    let (script, results) = ScriptedVcpu::new([
        ScriptedExit::MapGpaRange(conversion(base, 4 * PAGE, true)),
        ScriptedExit::MemoryFault(conversion(base + PAGE, PAGE, false)),
        ScriptedExit::MapGpaRange(conversion(0xffe0_0000, PAGE, true)),
        ScriptedExit::MapGpaRange(conversion(base, PAGE, false)),
    ]);
    let (tx, events) = channel();
    let ctx = Arc::new(vcpu_context(memory.clone(), tx));
    let mut handle = vcpu::start(0, Box::new(script), ctx, None).unwrap();
    // The script ends with a shutdown exit.
    events
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    handle.stop();
    assert_eq!(*results.lock().unwrap(), [0, 0, 0], "the guest's RAX");
    let shared = (base + 2 * PAGE, 2 * PAGE);
    assert_eq!(
        fake.private_ranges(),
        [
            (0, shared.0),
            (shared.0 + shared.1, 64 * MIB - shared.0 - shared.1),
            (0xffe0_0000, 0x20_0000),
        ],
        "KVM's attributes"
    );
    let mapped: Vec<(u64, u64)> = iommu.mappings().iter().map(|s| (s.gpa, s.size)).collect();
    assert_eq!(mapped, [shared], "the device maps the shared pages");
    let totals = memory.conversion_totals();
    assert_eq!((totals.to_shared, totals.to_private), (1, 2));
    assert_eq!(memory.unbacked_to_shared(), 1);
    vm.shutdown();
}

/// The CPUID page the processor checked is what the vCPUs are given:
/// every leaf of KVM's supported CPUID as vCPU 0 sees it (the package's
/// size, the hypervisor bit), the hidden features gone.
#[test]
fn the_cpuid_page_holds_what_the_vcpus_are_given() {
    let Some(rig) = new_rig("snp-cpuid.fd", None, DEFAULT_SUPPORTED_VMSA_FEATURES) else {
        return;
    };
    let mut config = rig.config(2, "sev_snp=on");
    config.cpus = CpusConfig::parse("boot=2,hide=cx16").unwrap();
    let vm = rig.boot(config.normalized()).unwrap();
    let table = rig
        .launcher
        .backend()
        .cpuid()
        .expect("a CPUID page")
        .to_vec();
    let supported = rig.fake_vm().supported_cpuid();
    assert_eq!(table.len(), supported.len());
    for e in &supported {
        let ecx_in = if e.flags & 1 != 0 { e.index } else { 0 };
        assert!(
            table
                .iter()
                .any(|f| (f.eax_in, f.ecx_in) == (e.function, ecx_in)),
            "leaf {:#x}.{ecx_in} missing",
            e.function
        );
    }
    let leaf1 = table.iter().find(|f| f.eax_in == 1).unwrap();
    let kvm1 = supported.iter().find(|e| e.function == 1).unwrap();
    let (cx16, hypervisor) = (1 << 13, 1 << 31);
    assert_eq!(leaf1.ecx & cx16, 0, "cx16 hidden");
    assert_eq!(leaf1.ecx & !hypervisor, kvm1.ecx & !(cx16 | hypervisor));
    assert_ne!(leaf1.ecx & hypervisor, 0);
    assert_eq!((leaf1.ebx >> 16) & 0xff, 2, "two logical processors");
    assert_eq!(leaf1.eax, kvm1.eax, "the signature");
    drop(vm);
}

/// `launch_vm` launches only into an `sev-snp` VM whose firmware region is
/// where the image goes.
#[test]
fn the_launch_needs_an_snp_vm_with_the_firmware_region() {
    use crate::sev_snp::SnpParams;
    use crate::sev_snp::boot::launch_vm;
    let Some(rig) = new_rig("snp-direct.fd", None, DEFAULT_SUPPORTED_VMSA_FEATURES) else {
        return;
    };
    let image = crate::sev_snp::read_firmware(&rig.firmware).unwrap();
    let launch = |vm: Arc<dyn hypervisor::Vm>, firmware| {
        let memory = memory_with_firmware(vm.clone(), firmware);
        launch_vm(
            &rig.hypervisor,
            vm,
            &memory,
            &image,
            "x",
            SnpParams::default(),
            &[],
        )
    };
    let launched = assert_launch_needs_its_vm_and_the_firmware_region(
        || {
            rig.hypervisor
                .create_vm(hypervisor::VmType::SevSnp)
                .unwrap()
        },
        launch,
    );
    assert_eq!(launched.vcpus.len(), 1);
    assert_eq!(launched.measurement.policy, 0x30000);
    assert_eq!(launched.measurement.guest_features, 1);
}
