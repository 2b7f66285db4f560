use hypervisor::tdx::{TD_ATTR_DEBUG, TD_ATTR_SEPT_VE_DISABLE};
use hypervisor::{HypervisorError, arch};

use super::*;
use crate::sev_snp::ovmf::tests::debian_ovmf;
use crate::tdx::simulated_module::{LaunchState, default_capabilities};
use crate::tdx::tdvf::ATTR_PAGE_AUG;
use crate::tdx::tdvf::tests::{SYNTHETIC_GPA, synthetic_sections, synthetic_tdvf};

fn params(vcpus: u8) -> TdxParams {
    TdxParams { vcpus }
}

fn failed(result: Result<(Vec<Box<dyn Vcpu>>, TdxInitVm), LaunchError>) -> LaunchError {
    match result {
        Ok(_) => panic!("the launch succeeded"),
        Err(e) => e,
    }
}

fn cpuid() -> Vec<CpuidEntry> {
    vec![
        CpuidEntry {
            function: 1,
            eax: 0x806f8,
            ecx: 0xfeda_3203,
            ..Default::default()
        },
        CpuidEntry {
            function: 0xd,
            index: 0,
            flags: arch::CPUID_FLAG_INDEXED,
            // x87, SSE, AVX, AVX-512 (3), PKRU.
            eax: 0x2e7,
            ..Default::default()
        },
        CpuidEntry {
            function: 0x4000_0000,
            eax: 0x4000_0001,
            ..Default::default()
        },
    ]
}

#[test]
fn the_launch_follows_kvms_order_section_by_section() {
    let image = synthetic_tdvf(&synthetic_sections());
    let mut module = SimulatedTdxModule::new(private_memory(64 << 20, &image));
    let (vcpus, init) = launch(&mut module, &image, 64 << 20, &cpuid(), params(2)).unwrap();
    assert_eq!(module.state(), LaunchState::Finalized);
    assert_eq!(
        module.log(),
        [
            "init_vm attributes=0x10000000 xfam=0x2e7 cpuid=2".to_string(),
            "init_vcpu 0 rcx=0x802000".into(),
            "init_vcpu 1 rcx=0x802000".into(),
            format!(
                "init_mem_region {:#x}+0xc000 measured",
                SYNTHETIC_GPA + 0x4000
            ),
            format!("init_mem_region {SYNTHETIC_GPA:#x}+0x4000"),
            "init_mem_region 0x800000+0x2000".into(),
            "init_mem_region 0x802000+0x1000".into(),
            "finalize".into(),
        ]
    );
    assert_eq!(init.attributes, TD_ATTR_SEPT_VE_DISABLE);
    // Only configurable leaves, within their masks; the hypervisor leaf
    // is the TDX module's business.
    assert_eq!(
        init.cpuid.iter().map(|e| e.function).collect::<Vec<_>>(),
        [1, 0xd]
    );
    // The vCPUs' state belongs to the module.
    assert_eq!(vcpus.len(), 2);
    assert!(matches!(
        vcpus[0].set_regs(&arch::StandardRegisters::default()),
        Err(HypervisorError::ProtectedState)
    ));

    // MRTD: the BFV page by page with its extends, then the rest's pages.
    let mut expected = crate::tdx::mrtd::Mrtd::default();
    for page in 0..12u64 {
        let gpa = SYNTHETIC_GPA + 0x4000 + page * 4096;
        expected.page_add(gpa);
        for i in 0..16u64 {
            let at = ::arch::usize_from(0x4000 + page * 4096 + i * 256);
            let chunk: &[u8; 256] = image.data()[at..at + 256].try_into().unwrap();
            expected.mr_extend(gpa + i * 256, chunk);
        }
    }
    for gpa in (SYNTHETIC_GPA..SYNTHETIC_GPA + 0x4000).step_by(4096) {
        expected.page_add(gpa);
    }
    for gpa in [0x80_0000, 0x80_1000, 0x80_2000] {
        expected.page_add(gpa);
    }
    assert_eq!(module.mrtd().hex(), expected.hex());
}

/// MRTD covers the image and the sections' addresses only: not the vCPU
/// count, the RAM size or the TD HOB (added unmeasured).
#[test]
fn mrtd_depends_on_the_image_only() {
    let image = synthetic_tdvf(&synthetic_sections());
    let one = measure(&image, 64 << 20, &cpuid(), params(1)).unwrap();
    assert_eq!(
        measure(&image, 1 << 30, &cpuid(), params(8)).unwrap().mrtd,
        one.mrtd
    );
    assert_eq!(
        measure(&image, 64 << 20, &[], params(1)).unwrap().mrtd,
        one.mrtd
    );
    let mut data = image.data().to_vec();
    data[0x5000] ^= 1;
    let changed = OvmfImage::parse(data).unwrap();
    assert_ne!(
        measure(&changed, 64 << 20, &cpuid(), params(1))
            .unwrap()
            .mrtd,
        one.mrtd
    );
    // The CFV is added but not measured: its contents do not count.
    let mut data = image.data().to_vec();
    data[0x100] ^= 1;
    let cfv = OvmfImage::parse(data).unwrap();
    assert_eq!(
        measure(&cfv, 64 << 20, &cpuid(), params(1)).unwrap().mrtd,
        one.mrtd
    );
    assert_eq!(
        one.to_json(),
        format!(
            "{{\"platform\": \"tdx\", \"measurement\": \"{}\"}}",
            one.mrtd
        )
    );
}

#[test]
fn page_aug_sections_are_not_added() {
    let mut sections = synthetic_sections();
    sections.push((0, 0, 0x100_0000, 0x10_0000, 3, ATTR_PAGE_AUG));
    let image = synthetic_tdvf(&sections);
    let mut module = SimulatedTdxModule::new(private_memory(64 << 20, &image));
    launch(&mut module, &image, 64 << 20, &cpuid(), params(1)).unwrap();
    assert!(
        !module
            .log()
            .iter()
            .any(|l| l.contains("init_mem_region 0x1000000"))
    );
    let regions = module
        .log()
        .iter()
        .filter(|l| l.starts_with("init_mem_region"))
        .count();
    assert_eq!(regions, 4, "the four other sections only");
}

#[test]
fn what_cannot_be_launched_is_refused_before_anything_is_sent() {
    let image = synthetic_tdvf(&synthetic_sections());
    let module = || SimulatedTdxModule::new(private_memory(64 << 20, &image));
    // RAM too small for the TEMP_MEM section at 8 MiB.
    let mut m = module();
    let err = failed(launch(&mut m, &image, 4 << 20, &cpuid(), params(1)));
    assert!(
        matches!(
            err,
            LaunchError::SectionOutsideMemory {
                index: 2,
                gpa: 0x80_0000,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(m.state(), LaunchState::Created);
    let mut m = module();
    assert!(matches!(
        failed(launch(&mut m, &image, 64 << 20, &cpuid(), params(0))),
        LaunchError::NoVcpus
    ));
    let not_tdvf = OvmfImage::parse(crate::sev_snp::ovmf::tests::synthetic_image(
        8192,
        &[],
        None,
    ))
    .unwrap();
    assert!(matches!(
        failed(launch(
            &mut module(),
            &not_tdvf,
            64 << 20,
            &cpuid(),
            params(1)
        )),
        LaunchError::Metadata(_)
    ));
    let mut caps = default_capabilities();
    caps.supported_xfam = 0x4;
    let mut m = module().with_capabilities(caps);
    assert!(matches!(
        failed(launch(&mut m, &image, 64 << 20, &cpuid(), params(1))),
        LaunchError::Xfam(0x4)
    ));
    assert_eq!(m.state(), LaunchState::Created);
}

/// A refused step stops the launch with the command and the reason.
#[test]
fn a_refused_step_stops_the_launch_with_its_reason() {
    let image = synthetic_tdvf(&synthetic_sections());
    // Memory the module does not know as private: the CFV's range.
    let memory = PrivateMemory(vec![(0, 64 << 20), (SYNTHETIC_GPA + 0x4000, 0xc000)]);
    let mut m = SimulatedTdxModule::new(memory);
    let err = failed(launch(&mut m, &image, 64 << 20, &cpuid(), params(1)));
    let chain = crate::error_chain(&err);
    assert!(
        chain.contains("KVM_TDX_INIT_MEM_REGION refused")
            && chain.contains("is not private guest_memfd memory"),
        "{chain}"
    );
    assert_eq!(m.state(), LaunchState::AddingMemory);
}

#[test]
fn init_vm_asks_for_what_the_host_offers_and_never_debug() {
    let mut caps = default_capabilities();
    let init = init_vm_params(&caps, &cpuid()).unwrap();
    assert_eq!(init.attributes & TD_ATTR_DEBUG, 0);
    assert_eq!(init.attributes, TD_ATTR_SEPT_VE_DISABLE);
    // XFAM: what both the module and the CPUID have.
    caps.supported_xfam = 0x7;
    assert_eq!(init_vm_params(&caps, &cpuid()).unwrap().xfam, 0x7);
    assert_eq!(init_vm_params(&caps, &[]).unwrap().xfam, 0x3);
    caps.supported_attributes = TD_ATTR_DEBUG;
    assert_eq!(init_vm_params(&caps, &cpuid()).unwrap().attributes, 0);
    caps.configurable_cpuid[0].ecx = 0xff;
    let init = init_vm_params(&caps, &cpuid()).unwrap();
    assert_eq!(init.cpuid[0].ecx, 0x03);
    assert_eq!(init.cpuid[0].eax, 0x806f8);
    // Every register is masked, EBX and EDX too.
    let mut leaves = cpuid();
    (leaves[0].ebx, leaves[0].edx) = (0x1234_5678, 0xffff_0000);
    caps.configurable_cpuid[0].ebx = 0x0000_ff00;
    caps.configurable_cpuid[0].edx = 0x00ff_ff00;
    let init = init_vm_params(&caps, &leaves).unwrap();
    assert_eq!(
        (init.cpuid[0].ebx, init.cpuid[0].edx),
        (0x5600, 0x00ff_0000)
    );
}

/// The TD_HOB section is loaded with the HOB the launch built, not with
/// the image's (empty) contents for it.
#[test]
fn the_td_hob_section_gets_the_hob() {
    struct Recording(SimulatedTdxModule, Vec<(u64, Vec<u8>)>);
    impl TdxLauncher for Recording {
        fn capabilities(&mut self) -> hypervisor::TdxResult<TdxCapabilities> {
            self.0.capabilities()
        }
        fn init_vm(&mut self, params: &TdxInitVm) -> hypervisor::TdxResult<()> {
            self.0.init_vm(params)
        }
        fn init_vcpu(
            &mut self,
            index: u8,
            rcx: u64,
        ) -> hypervisor::TdxResult<Option<Box<dyn Vcpu>>> {
            self.0.init_vcpu(index, rcx)
        }
        fn init_mem_region(
            &mut self,
            gpa: u64,
            source: &[u8],
            measure: bool,
        ) -> hypervisor::TdxResult<()> {
            self.1.push((gpa, source.to_vec()));
            self.0.init_mem_region(gpa, source, measure)
        }
        fn finalize(&mut self) -> hypervisor::TdxResult<()> {
            self.0.finalize()
        }
    }
    let image = synthetic_tdvf(&synthetic_sections());
    let ram = 64 << 20;
    let mut recording = Recording(SimulatedTdxModule::new(private_memory(ram, &image)), vec![]);
    launch(&mut recording, &image, ram, &cpuid(), params(1)).unwrap();
    let metadata = TdvfMetadata::parse(&image).unwrap();
    let hob_gpa = metadata.td_hob().unwrap().memory_address;
    let expected = crate::tdx::hob::for_launch(&metadata, ram, &image)
        .unwrap()
        .unwrap();
    let loaded = recording.1.iter().find(|(gpa, _)| *gpa == hob_gpa).unwrap();
    assert_eq!(loaded.1, expected);
    assert!(loaded.1.iter().any(|&b| b != 0), "a HOB, not zeros");
}

/// The MRTD of Debian's OVMF.fd (edk2 2022.11), which
/// `tests/tdx.rs` also computes without the launch code.
pub const DEBIAN_OVMF_MRTD: &str = "4c7206f0f483c524f12c366c711e9049030a8d47c471ee5aa9c4999a08de4057fb887fed0744d5631a212967fb231c47";

#[test]
fn debian_ovmf_fd_mrtd() {
    let Some(data) = debian_ovmf() else { return };
    let image = OvmfImage::parse(data).unwrap();
    let measured = measure(&image, 1 << 30, &cpuid(), params(2)).unwrap();
    assert_eq!(measured.mrtd, DEBIAN_OVMF_MRTD);
}

/// The KVM backend on this host: a TDX VM cannot be created (PVM offers
/// only the default type), and on a default VM the launch stops at its
/// first command, by name, with the simulation in front untouched.
#[test]
fn the_kvm_backend_fails_cleanly_without_tdx() {
    use hypervisor::{Hypervisor, KvmTdxLauncher, VmType};

    use crate::tdx::simulated_module::Mirrored;

    let Some(kvm) = crate::test_util::kvm() else {
        return;
    };
    if !kvm.capabilities().supports_vm_type(VmType::Tdx) {
        let Err(err) = kvm.create_vm(VmType::Tdx) else {
            panic!("a TDX VM on a host that does not list the type");
        };
        assert!(
            err.to_string().contains("not supported by this host"),
            "{err}"
        );
    }
    let vm = kvm.create_vm(VmType::Default).unwrap();
    let image = synthetic_tdvf(&synthetic_sections());
    let mut backend = Mirrored {
        simulated: SimulatedTdxModule::new(private_memory(64 << 20, &image)),
        real: KvmTdxLauncher::new(vm),
    };
    let err = failed(launch(&mut backend, &image, 64 << 20, &cpuid(), params(1)));
    let chain = crate::error_chain(&err);
    assert!(
        chain.contains("KVM_TDX_CAPABILITIES refused: a default VM has no TDX launch"),
        "{chain}"
    );
    assert_eq!(backend.simulated.state(), LaunchState::Created);
    assert!(backend.real.into_vcpus().is_empty());
}

/// XFAM is what leaf 0xd enumerates: the user states of sub-leaf 0
/// (EDX:EAX) and the supervisor states of sub-leaf 1 (EDX:ECX), both
/// halves, plus x87 and SSE, which a TD always has.
#[test]
fn xfam_takes_both_halves_of_both_sub_leaves() {
    let leaf = |index, eax, ecx, edx| CpuidEntry {
        function: 0xd,
        index,
        flags: 0,
        eax,
        ebx: 0,
        ecx,
        edx,
        ..Default::default()
    };
    // User: x87 | SSE | AVX and bits 32-33; supervisor: PT (bit 8) and
    // bits 32 and 34. Bit 32 is in both.
    let cpuid = [leaf(0, 0b111, 0, 0b011), leaf(1, 0, 1 << 8, 0b101)];
    assert_eq!(cpuid_xfam(&cpuid), 0b111 << 32 | 1 << 8 | 0b111);
    // x87 and SSE even where CPUID leaves them out (or names one of them
    // in the wrong sub-leaf); nothing else.
    let odd = [leaf(0, 0b100, 0, 0), leaf(1, 0, 0b01, 0)];
    assert_eq!(cpuid_xfam(&odd), 0b111);
    let bare = [leaf(0, 0, 0, 0)];
    assert_eq!(cpuid_xfam(&bare), 0b11);
    assert_eq!(cpuid_xfam(&[]), 0b11);
}
