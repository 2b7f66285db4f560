//! The TDX firmware boot through the real VM build (`Vm::boot`), on a fake
//! TD over this host's KVM (`ConfidentialTestHypervisor::tdx`: a real
//! default VM with a split irqchip, KVM's part of the launch modelled in
//! front of a second simulated TDX module, independent of the VMM's own). Everything up to
//! `KVM_TDX_FINALIZE_VM` runs as on a real host; then the vCPUs start.

use std::sync::Arc;
use std::sync::mpsc::channel;

use hypervisor::attribute_tracking::{ConfidentialTestHypervisor, TdxModule};
use hypervisor::{
    Hypervisor, TdxCapabilities, TdxInitVm, TdxLaunchError, TdxLauncher, TdxResult, Vcpu, Vm as _,
};

use super::{TSC_KHZ_MAX, TSC_KHZ_MIN, launch_vm, td_tsc_khz};
use crate::config::{MemoryConfig, PlatformConfig, VmConfig};
use crate::sev_snp::ovmf;
use crate::tdx::simulated_module::{
    LaunchState, PrivateMemory, SimulatedTdxModule, default_capabilities,
};
use crate::tdx::{FirmwareError, TdxParams, measure_firmware};
use crate::test_util::firmware_rig::{
    Counted, FirmwareRig, RAM, assert_every_refused_step_stops,
    assert_launch_needs_its_vm_and_the_firmware_region, assert_this_host_boots_or_says_why,
    memory_with_firmware,
};
use crate::vm::{LaunchMeasurement, VmState};

const MIB: u64 = 1 << 20;

/// The fake's TDX module, shared with the test so it can look inside; the
/// test may refuse one command as the module might.
type Module = Counted<SimulatedTdxModule>;

fn new_module(refuse_at: Option<usize>) -> Module {
    module_with(refuse_at, default_capabilities())
}

fn module_with(refuse_at: Option<usize>, capabilities: TdxCapabilities) -> Module {
    // The fake checks KVM's memory rules itself; the module accepts any
    // private page.
    let module =
        SimulatedTdxModule::new(PrivateMemory(vec![(0, 1 << 52)])).with_capabilities(capabilities);
    Counted::new(module, refuse_at)
}

impl TdxLauncher for Module {
    fn capabilities(&mut self) -> TdxResult<TdxCapabilities> {
        self.next("KVM_TDX_CAPABILITIES", TdxLaunchError::refused)?
            .capabilities()
    }
    fn init_vm(&mut self, params: &TdxInitVm) -> TdxResult<()> {
        self.next("KVM_TDX_INIT_VM", TdxLaunchError::refused)?
            .init_vm(params)
    }
    fn init_vcpu(&mut self, index: u8, rcx: u64) -> TdxResult<Option<Box<dyn Vcpu>>> {
        self.next("KVM_TDX_INIT_VCPU", TdxLaunchError::refused)?
            .init_vcpu(index, rcx)
    }
    fn init_mem_region(&mut self, gpa: u64, source: &[u8], measure: bool) -> TdxResult<()> {
        self.next("KVM_TDX_INIT_MEM_REGION", TdxLaunchError::refused)?
            .init_mem_region(gpa, source, measure)
    }
    fn finalize(&mut self) -> TdxResult<()> {
        self.next("KVM_TDX_FINALIZE_VM", TdxLaunchError::refused)?
            .finalize()
    }
}

type Rig = FirmwareRig<Module>;

/// A fake TDX host whose module refuses command `refuse_at`; None without
/// KVM or Debian's OVMF.fd.
fn new_rig(tag: &str, refuse_at: Option<usize>) -> Option<Rig> {
    rig_with(tag, new_module(refuse_at))
}

fn rig_with(tag: &str, module: Module) -> Option<Rig> {
    FirmwareRig::new(tag, module, |kvm, module| {
        ConfidentialTestHypervisor::tdx(kvm, move || Box::new(module.clone()) as TdxModule)
    })
}

/// A TD of `vcpus` booting the rig's firmware.
fn td(rig: &Rig, vcpus: u8) -> VmConfig {
    rig.config(vcpus, "tdx=on")
}

/// What `--measure` prints for the rig's firmware and `vcpus`.
fn predicted(rig: &Rig, vcpus: u8) -> crate::tdx::Measurement {
    let memory = MemoryConfig::parse(RAM).unwrap().size;
    measure_firmware(&rig.firmware, memory, vcpus).unwrap()
}

/// The whole path: the VM build creates a `tdx` VM (split irqchip), its
/// RAM and the firmware region in private guest_memfd, sets the TD's TSC
/// frequency, runs the launch through KVM's commands to the module up to
/// FINALIZE, and starts the vCPUs. The MRTD the module computed from what
/// it was sent is `--measure`'s.
#[test]
fn a_tdx_firmware_boot_launches_through_the_vm_build_as_measure_predicts() {
    for vcpus in [1, 3] {
        let Some(rig) = new_rig("tdx-boot.fd", None) else {
            return;
        };
        let vm = rig.boot(td(&rig, vcpus)).unwrap();
        let fake = rig.fake_vm();
        assert_eq!(vm.state(), VmState::Running);
        assert!(fake.launch_finished(), "finalized");
        assert!(fake.has_split_irqchip(), "a TD has a split irqchip");
        assert_eq!(fake.live_vcpus(), usize::from(vcpus));
        assert_eq!(rig.launcher.backend().state(), LaunchState::Finalized);

        let predicted = predicted(&rig, vcpus);
        let Some(LaunchMeasurement::Tdx(launched)) = vm.launch().cloned() else {
            panic!("no TDX launch measurement");
        };
        assert_eq!(launched.mrtd, predicted.mrtd, "{vcpus} vCPUs");
        assert_eq!(
            rig.launcher.backend().mrtd().hex(),
            predicted.mrtd,
            "the module's own MRTD"
        );
        assert!(vm.launch_measurement().is_none(), "not an SEV-SNP launch");

        // vm.info shows it as --measure prints it, plus what INIT_VM fixed.
        let info = vm.info();
        let ours: serde_json::Value = serde_json::from_str(&predicted.to_json()).unwrap();
        for key in ["platform", "measurement"] {
            assert_eq!(info["launch"][key], ours[key], "{key}");
        }
        let init = rig.launcher.backend().init_params().cloned().unwrap();
        assert_eq!(
            info["launch"]["attributes"],
            format!("{:#x}", init.attributes)
        );
        assert_eq!(info["launch"]["xfam"], format!("{:#x}", init.xfam));
        assert_eq!(info["vm_type"], "tdx");
        assert_eq!(
            info["config"]["payload"]["firmware"],
            serde_json::json!(rig.firmware)
        );
        assert_eq!(info["memory"]["firmware"]["gpa"], 0xffe0_0000u64);

        // The TSC frequency INIT_VM took is the one set on the VM.
        let host = crate::test_util::kvm()
            .unwrap()
            .create_vm(hypervisor::VmType::Default)
            .unwrap()
            .tsc_khz();
        if let Ok(host) = host {
            assert_eq!(fake.tdx_tsc_khz_at_init(), td_tsc_khz(host).ok());
        }
        assert!(
            fake.tdx_tsc_khz_at_init().is_some(),
            "TSC set before INIT_VM"
        );

        // The order a verifier reproduces: INIT_VM, every vCPU (RCX = the
        // TD HOB), the sections, FINALIZE.
        let log = rig.launcher.backend().log().to_vec();
        assert!(log[0].starts_with("init_vm "), "{log:?}");
        for index in 0..vcpus {
            let line = &log[1 + usize::from(index)];
            assert!(
                line.starts_with(&format!("init_vcpu {index} rcx=0x")),
                "{line}"
            );
        }
        assert!(log[1 + usize::from(vcpus)].starts_with("init_mem_region 0x"));
        assert_eq!(log.last().unwrap(), "finalize");
        let image = crate::sev_snp::read_firmware(&rig.firmware).unwrap();
        let metadata = crate::tdx::tdvf::TdvfMetadata::parse(&image).unwrap();
        let hob = metadata.td_hob().unwrap().memory_address;
        let rcx: Vec<(u8, u64)> = rig
            .launcher
            .backend()
            .vcpu_rcx()
            .clone()
            .into_iter()
            .collect();
        assert_eq!(rcx, (0..vcpus).map(|i| (i, hob)).collect::<Vec<_>>());

        // RAM and the image are private guest_memfd memory.
        rig.assert_ram_and_image_private(&vm);

        // Nothing after the finalize, and a TD vCPU's state is not ours.
        assert!(fake.tdx_init_vm(&TdxInitVm::default()).is_err());
        assert!(fake.tdx_finalize_vm().is_err());
        assert!(fake.set_tsc_khz(1_000_000).is_err(), "TSC after the launch");
        let vcpu = fake.create_vcpu(vcpus).unwrap();
        assert!(vcpu.set_regs(&Default::default()).is_err());
        drop(vcpu);
        assert_eq!(rig.launcher.backend().mrtd().hex(), predicted.mrtd);

        rig.shut_down(vm, fake);
    }
}

/// Every step the module can refuse, in turn: the build stops with the
/// command and the reason, never finalized, and nothing of the VM is left.
#[test]
fn every_refused_tdx_launch_step_stops_the_build_and_leaves_nothing() {
    let Some(steps) = assert_every_refused_step_stops(
        |refuse_at| new_rig("tdx-refuse.fd", refuse_at),
        |rig| td(rig, 2),
        "the TDX launch of",
        |module| module.state() == LaunchState::Finalized,
    ) else {
        return;
    };
    // CAPABILITIES, INIT_VM, two vCPUs, at least two sections, FINALIZE.
    assert!(steps >= 7, "{steps}");
}

/// A step the VMM's simulation refuses (here: a host whose capabilities
/// list a CPUID leaf twice, so INIT_VM would configure it twice) stops the
/// build before KVM sees the command: KVM got only CAPABILITIES.
#[test]
fn a_step_the_rules_refuse_never_reaches_kvm() {
    let mut capabilities = default_capabilities();
    let leaf = capabilities.configurable_cpuid[0];
    capabilities.configurable_cpuid.push(leaf);
    let Some(rig) = rig_with("tdx-rules.fd", module_with(None, capabilities)) else {
        return;
    };
    rig.assert_the_rules_refuse(
        td(&rig, 1),
        "KVM_TDX_INIT_VM refused: CPUID 0x1.0x0 is given twice",
        1,
    );
    assert_eq!(rig.launcher.backend().state(), LaunchState::Created);
}

/// This host has no TDX: the real hypervisor's boot stops before creating
/// a VM, saying so.
#[test]
fn without_tdx_a_firmware_boot_stops_before_creating_anything() {
    let Some(rig) = new_rig("tdx-nohost.fd", None) else {
        return;
    };
    assert_this_host_boots_or_says_why(td(&rig, 2), hypervisor::VmType::Tdx, "no TDX here");
}

/// The image and its launch plan are checked before the host: an image
/// without TDX metadata fails alike everywhere, before any VM exists; so
/// does a firmware without a confidential platform.
#[test]
fn a_bad_tdx_image_fails_before_any_vm_exists() {
    let Some(rig) = new_rig("tdx-plan.fd", None) else {
        return;
    };
    let not_tdvf = crate::test_util::scratch_path("tdx-plan-not-tdvf.fd");
    std::fs::write(&not_tdvf, ovmf::tests::synthetic_image(8192, &[], None)).unwrap();
    let mut config = td(&rig, 1);
    config.firmware = Some(not_tdvf.clone());
    let result = rig.boot(config);
    let _ = std::fs::remove_file(&not_tdvf);
    let Err(err) = result else {
        panic!("booted an image without TDX metadata");
    };
    assert!(
        crate::error_chain(&err).contains("not a TDX build of OVMF"),
        "{}",
        crate::error_chain(&err)
    );
    let mut config = td(&rig, 1);
    config.platform = PlatformConfig::default();
    let Err(err) = rig.boot(config) else {
        panic!("booted firmware on a default VM");
    };
    assert!(crate::error_chain(&err).contains("needs sev_snp=on or tdx=on"));
    assert!(rig.hypervisor.created().is_empty());
}

/// `launch_vm` launches only into a `tdx` VM whose firmware region is where
/// the image goes, and sets the TSC before the first vCPU.
#[test]
fn the_launch_needs_a_td_with_the_firmware_region() {
    let Some(rig) = new_rig("tdx-direct.fd", None) else {
        return;
    };
    let image = crate::sev_snp::read_firmware(&rig.firmware).unwrap();
    let cpuid = crate::sev_snp::cpuid_page::host_minimal();
    let launch = |vm: Arc<dyn hypervisor::Vm>, firmware| {
        let memory = memory_with_firmware(vm.clone(), firmware);
        launch_vm(vm, &memory, &image, "x", &cpuid, TdxParams::default())
    };
    let launched = assert_launch_needs_its_vm_and_the_firmware_region(
        || rig.hypervisor.create_vm(hypervisor::VmType::Tdx).unwrap(),
        launch,
    );
    assert_eq!(launched.vcpus.len(), 1);
    assert_eq!(launched.tsc_khz % 25_000, 0);
    let created = rig.hypervisor.created();
    assert_eq!(
        created.last().unwrap().tdx_tsc_khz_at_init(),
        Some(launched.tsc_khz)
    );
}

/// The TD's TSC frequency: the host's, rounded to the module's 25 MHz
/// steps; a host outside the module's range is refused by name.
#[test]
fn the_td_tsc_frequency_is_the_hosts_in_the_modules_steps() {
    assert_eq!(td_tsc_khz(2_095_078).unwrap(), 2_100_000);
    assert_eq!(td_tsc_khz(2_087_499).unwrap(), 2_075_000);
    assert_eq!(td_tsc_khz(2_087_500).unwrap(), 2_100_000);
    assert_eq!(td_tsc_khz(TSC_KHZ_MIN).unwrap(), TSC_KHZ_MIN);
    assert_eq!(td_tsc_khz(TSC_KHZ_MAX).unwrap(), TSC_KHZ_MAX);
    for bad in [0, 87_499, TSC_KHZ_MAX + 12_500, u32::MAX - 20_000, u32::MAX] {
        let err = td_tsc_khz(bad).unwrap_err();
        assert!(
            matches!(err, FirmwareError::TscOutOfRange(k) if k == bad),
            "{bad}"
        );
        assert!(err.to_string().contains("outside what a TD can have"));
    }
}

/// KVM's order for the TSC, as the fake keeps it: only before INIT_VM and
/// before any vCPU; the VM's frequency on this host's KVM reads back.
#[test]
fn the_tsc_is_the_vms_and_set_before_the_first_vcpu() {
    let Some(rig) = new_rig("tdx-tsc.fd", None) else {
        return;
    };
    let vm = rig.hypervisor.create_vm(hypervisor::VmType::Tdx).unwrap();
    assert!(vm.create_vcpu(0).is_err(), "a TD vCPU before INIT_VM");
    vm.set_tsc_khz(2_000_000).unwrap();
    assert_eq!(vm.tsc_khz().unwrap(), 2_000_000);
    assert!(vm.set_tsc_khz(0).is_err());
    let caps = vm.tdx_capabilities().unwrap();
    let init =
        crate::tdx::launch::init_vm_params(&caps, &crate::sev_snp::cpuid_page::host_minimal())
            .unwrap();
    vm.tdx_init_vm(&init).unwrap();
    let err = vm.set_tsc_khz(1_000_000).unwrap_err();
    assert!(err.to_string().contains("1000000 kHz"), "{err}");
    let vcpu = vm.create_vcpu(0).unwrap();
    assert!(
        vcpu.tdx_init_mem_region(0, &[0; 4096], false).is_err(),
        "not initialized"
    );
    drop(vcpu);
    drop(vm);
    // The real KVM VM: KVM_GET_TSC_KHZ / KVM_SET_TSC_KHZ on the VM fd
    // (KVM_CAP_VM_TSC_CONTROL); a vCPU created after keeps the frequency.
    let kvm = crate::test_util::kvm().unwrap();
    let real = kvm.create_vm(hypervisor::VmType::Default).unwrap();
    match real.tsc_khz() {
        Ok(khz) => {
            assert!(khz > 0);
            real.set_tsc_khz(khz).unwrap();
            assert_eq!(real.tsc_khz().unwrap(), khz);
            // KVM takes the VM's frequency only while no vCPU exists.
            let _vcpu = real.create_vcpu(0).unwrap();
            // This host's KVM (6.18) answers EINVAL then, as the fake does.
            let err = real.set_tsc_khz(khz).unwrap_err();
            let hypervisor::HypervisorError::SetTscKhz(k, source) = err else {
                panic!("{err}");
            };
            assert_eq!((k, source.raw_os_error()), (khz, Some(libc::EINVAL)));
        }
        Err(e) => assert!(e.to_string().contains("TSC frequency"), "{e}"),
    }
}

/// A firmware boot cold-plugs devices as a kernel boot does: a vfio-user
/// server (in this process) becomes a PCI function of the TD, told of no
/// page at boot (every page of a TD starts private); the TD's MapGPA
/// (KVM's `KVM_HC_MAP_GPA_RANGE` exit, from `ScriptedVcpu` through the real
/// vCPU loop) maps exactly the pages made shared, into the device and in
/// KVM's attributes, and unmaps them when made private again; the device
/// is detached with the VM.
#[test]
fn a_td_cold_plugs_a_vfio_user_device_that_follows_its_conversions() {
    use crate::config::UserDeviceConfig;
    let Some(rig) = new_rig("tdx-device.fd", None) else {
        return;
    };
    let (socket, ctl) = crate::test_util::in_process_test_device("tdx", false);
    let dir = socket.parent().unwrap().to_path_buf();
    let mut config = td(&rig, 1);
    config.user_devices = vec![UserDeviceConfig {
        socket,
        id: Some("dev0".into()),
        ..Default::default()
    }];
    let mut vm = rig.boot(config).unwrap();
    assert!(rig.fake_vm().launch_finished());
    let info = vm.info();
    let devices = info["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{info}");
    assert_eq!(devices[0]["id"], "dev0");
    assert_eq!(devices[0]["state"], "attached", "{info}");
    assert!(devices[0]["bdf"].is_string(), "a PCI function: {info}");
    let maps = test_device::ask(&ctl, "maps").unwrap();
    assert_eq!(maps, "[]", "a TD's pages start private");

    use arch::layout::PAGE_SIZE as PAGE;
    use hypervisor::scripted_vcpu::{ScriptedExit, ScriptedVcpu};

    use crate::test_util::conversion;
    let base = 16 * MIB;
    let (script, results) = ScriptedVcpu::new([
        ScriptedExit::MapGpaRange(conversion(base, 4 * PAGE, true)),
        ScriptedExit::MapGpaRange(conversion(base, PAGE, false)),
    ]);
    let (tx, events) = channel();
    let ctx = Arc::new(crate::test_util::vcpu_context(vm.memory().clone(), tx));
    let mut handle = crate::vcpu::start(0, Box::new(script), ctx, None).unwrap();
    // The script ends with a shutdown exit.
    events
        .recv_timeout(std::time::Duration::from_secs(10))
        .unwrap();
    handle.stop();
    assert_eq!(*results.lock().unwrap(), [0, 0], "the guest's RAX");
    let shared = (base + PAGE, 3 * PAGE);
    let maps: Vec<[u64; 2]> =
        serde_json::from_str(&test_device::ask(&ctl, "maps").unwrap()).unwrap();
    assert_eq!(
        maps,
        [[shared.0, shared.1]],
        "the device maps the shared pages"
    );
    assert_eq!(
        rig.fake_vm().private_ranges(),
        [
            (0, shared.0),
            (shared.0 + shared.1, 64 * MIB - shared.0 - shared.1),
            (0xffe0_0000, 0x20_0000),
        ],
        "KVM's attributes"
    );
    vm.shutdown();
    assert!(vm.devices().info().is_empty(), "detached with the VM");
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
    rig.assert_nothing_left();
}
