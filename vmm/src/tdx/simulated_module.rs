//! A strict simulated TDX module (with KVM's part of the launch in front
//! of it), for hosts without TDX: it enforces the documented rules of the
//! launch commands and computes MRTD as the module does. As the simulated
//! security processor is for SEV-SNP, it is a backend the real launch code
//! runs against; `--measure` uses it to predict MRTD, and a real launch
//! runs it beside KVM (`Mirrored`).
//!
//! Rules (KVM's `intel-tdx.rst` and the TDX module ABI):
//! - `KVM_TDX_INIT_VM` first (capabilities aside) and once, with
//!   attributes and XFAM the host offers (XFAM with x87 and SSE), and
//!   only configurable CPUID leaves, each once, within their masks;
//! - `KVM_TDX_INIT_VCPU` after it, once per vCPU, before any memory is
//!   added; the vCPU's registers then belong to the module and cannot be
//!   set;
//! - `KVM_TDX_INIT_MEM_REGION` after at least one vCPU, of whole 4 KiB
//!   pages at a 4 KiB-aligned GPA, all in private guest_memfd memory, each
//!   page added once;
//! - `KVM_TDX_FINALIZE_VM` after at least one vCPU;
//! - nothing after the finalize.
//!
//! A refused command changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use hypervisor::tdx::{
    MR_EXTEND_CHUNK, PAGE_SIZE, TD_ATTR_DEBUG, TD_ATTR_PERFMON, TD_ATTR_PKS,
    TD_ATTR_SEPT_VE_DISABLE, XFAM_FIXED1,
};
use hypervisor::{
    CpuidEntry, HypervisorError, TdxCapabilities, TdxInitVm, TdxLaunchError, TdxLauncher,
    TdxResult, Vcpu, VmExit, arch,
};

use super::mrtd::Mrtd;
pub use crate::sev_snp::simulated_psp::PrivateMemory;
use crate::sev_snp::simulated_psp::{LaunchedPages, expect_state, within_supported};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchState {
    /// The VM exists; nothing was sent.
    Created,
    /// `KVM_TDX_INIT_VM` done: vCPUs may be initialized.
    VmInitialized,
    /// Memory is being added: no more vCPUs.
    AddingMemory,
    Finalized,
}

/// What a typical TDX host offers: the attributes KVM lets userspace ask
/// for, XFAM up to AVX-512 and PKRU, and the leaves QEMU configures.
pub fn default_capabilities() -> TdxCapabilities {
    let leaf = |function: u32, index: u32, flags: u32| CpuidEntry {
        function,
        index,
        flags,
        eax: u32::MAX,
        ebx: u32::MAX,
        ecx: u32::MAX,
        edx: u32::MAX,
        ..Default::default()
    };
    TdxCapabilities {
        supported_attributes: TD_ATTR_DEBUG
            | TD_ATTR_SEPT_VE_DISABLE
            | TD_ATTR_PKS
            | TD_ATTR_PERFMON,
        // x87, SSE, AVX, the three AVX-512 components, PKRU.
        supported_xfam: 0x2e7,
        configurable_cpuid: vec![
            leaf(0x1, 0, 0),
            leaf(0x7, 0, arch::CPUID_FLAG_INDEXED),
            leaf(0xd, 0, arch::CPUID_FLAG_INDEXED),
            leaf(0xd, 1, arch::CPUID_FLAG_INDEXED),
            leaf(0x8000_0001, 0, 0),
            leaf(0x8000_0008, 0, 0),
        ],
    }
}

pub struct SimulatedTdxModule {
    state: LaunchState,
    capabilities: TdxCapabilities,
    init: Option<TdxInitVm>,
    /// vCPU index to its first RCX.
    vcpus: BTreeMap<u8, u64>,
    mrtd: Mrtd,
    added: LaunchedPages,
    /// Every accepted command, for tests.
    log: Vec<String>,
}

impl SimulatedTdxModule {
    pub fn new(memory: PrivateMemory) -> Self {
        SimulatedTdxModule {
            state: LaunchState::Created,
            capabilities: default_capabilities(),
            init: None,
            vcpus: BTreeMap::new(),
            mrtd: Mrtd::default(),
            added: LaunchedPages::new(memory),
            log: Vec::new(),
        }
    }

    pub fn with_capabilities(mut self, capabilities: TdxCapabilities) -> Self {
        self.capabilities = capabilities;
        self
    }

    pub fn state(&self) -> LaunchState {
        self.state
    }

    /// MRTD so far; the TD's MRTD once finalized.
    pub fn mrtd(&self) -> &Mrtd {
        &self.mrtd
    }

    /// What `KVM_TDX_INIT_VM` was given.
    pub fn init_params(&self) -> Option<&TdxInitVm> {
        self.init.as_ref()
    }

    /// The first RCX of each vCPU, by index.
    pub fn vcpu_rcx(&self) -> &BTreeMap<u8, u64> {
        &self.vcpus
    }

    pub fn log(&self) -> &[String] {
        &self.log
    }

    fn expect_state(&self, command: &'static str, allowed: &[LaunchState]) -> TdxResult<()> {
        let end = (LaunchState::Finalized, "the TD is finalized");
        expect_state(command, self.state, allowed, end, TdxLaunchError::refused)
    }

    /// What the commands after the vCPUs need: the VM initialized (memory
    /// may have been added since) and a vCPU, which KVM issues them on.
    fn expect_vcpus_initialized(&self, command: &'static str) -> TdxResult<()> {
        self.expect_state(
            command,
            &[LaunchState::VmInitialized, LaunchState::AddingMemory],
        )?;
        if self.vcpus.is_empty() {
            return Err(TdxLaunchError::refused(
                command,
                "no initialized vCPU to issue it on",
            ));
        }
        Ok(())
    }

    fn check_cpuid(&self, entries: &[CpuidEntry]) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        for e in entries {
            let name = format!("CPUID {:#x}.{:#x}", e.function, e.index);
            if !seen.insert((e.function, e.index)) {
                return Err(format!("{name} is given twice"));
            }
            let Some(mask) = self
                .capabilities
                .configurable_cpuid
                .iter()
                .find(|c| c.function == e.function && c.index == e.index)
            else {
                return Err(format!("{name} is not configurable"));
            };
            for (reg, value, allowed) in [
                ("eax", e.eax, mask.eax),
                ("ebx", e.ebx, mask.ebx),
                ("ecx", e.ecx, mask.ecx),
                ("edx", e.edx, mask.edx),
            ] {
                if value & !allowed != 0 {
                    return Err(format!(
                        "{name} {reg} bits {:#x} are not configurable",
                        value & !allowed
                    ));
                }
            }
        }
        Ok(())
    }
}

impl TdxLauncher for SimulatedTdxModule {
    fn capabilities(&mut self) -> TdxResult<TdxCapabilities> {
        Ok(self.capabilities.clone())
    }

    fn init_vm(&mut self, params: &TdxInitVm) -> TdxResult<()> {
        const CMD: &str = "KVM_TDX_INIT_VM";
        self.expect_state(CMD, &[LaunchState::Created])?;
        let caps = &self.capabilities;
        within_supported("attributes", params.attributes, caps.supported_attributes)
            .map_err(|why| TdxLaunchError::refused(CMD, why))?;
        if params.xfam & XFAM_FIXED1 != XFAM_FIXED1 {
            return Err(TdxLaunchError::refused(
                CMD,
                format!("XFAM {:#x} lacks x87 and SSE (bits 0, 1)", params.xfam),
            ));
        }
        within_supported("XFAM bits", params.xfam, caps.supported_xfam)
            .map_err(|why| TdxLaunchError::refused(CMD, why))?;
        self.check_cpuid(&params.cpuid)
            .map_err(|why| TdxLaunchError::refused(CMD, why))?;
        self.init = Some(params.clone());
        self.state = LaunchState::VmInitialized;
        self.log.push(format!(
            "init_vm attributes={:#x} xfam={:#x} cpuid={}",
            params.attributes,
            params.xfam,
            params.cpuid.len()
        ));
        Ok(())
    }

    fn init_vcpu(&mut self, index: u8, rcx: u64) -> TdxResult<Option<Box<dyn Vcpu>>> {
        const CMD: &str = "KVM_TDX_INIT_VCPU";
        self.expect_state(CMD, &[LaunchState::VmInitialized])?;
        if self.vcpus.contains_key(&index) {
            return Err(TdxLaunchError::refused(
                CMD,
                format!("vCPU {index} is initialized already"),
            ));
        }
        self.vcpus.insert(index, rcx);
        self.log.push(format!("init_vcpu {index} rcx={rcx:#x}"));
        Ok(Some(Box::new(ProtectedVcpu)))
    }

    fn init_mem_region(&mut self, gpa: u64, source: &[u8], measure: bool) -> TdxResult<()> {
        const CMD: &str = "KVM_TDX_INIT_MEM_REGION";
        self.expect_vcpus_initialized(CMD)?;
        let len = source.len() as u64;
        let range = format!("{gpa:#x}+{len:#x}");
        let pages = match self.added.check(gpa, len, "added") {
            Ok(pages) => pages,
            Err(why) => return Err(TdxLaunchError::refused(CMD, why)),
        };
        // KVM adds the pages in ascending order, each measured as soon as
        // it is added.
        for (index, page) in source
            .chunks_exact(::arch::usize_from(PAGE_SIZE))
            .enumerate()
        {
            let page_gpa = gpa + index as u64 * PAGE_SIZE;
            self.mrtd.page_add(page_gpa);
            if measure {
                for (i, chunk) in page.chunks_exact(MR_EXTEND_CHUNK).enumerate() {
                    let chunk: &[u8; MR_EXTEND_CHUNK] = chunk.try_into().expect("256 bytes");
                    self.mrtd
                        .mr_extend(page_gpa + (i * MR_EXTEND_CHUNK) as u64, chunk);
                }
            }
        }
        self.added.place(pages);
        self.state = LaunchState::AddingMemory;
        self.log.push(format!(
            "init_mem_region {range}{}",
            if measure { " measured" } else { "" }
        ));
        Ok(())
    }

    fn finalize(&mut self) -> TdxResult<()> {
        self.expect_vcpus_initialized("KVM_TDX_FINALIZE_VM")?;
        self.state = LaunchState::Finalized;
        self.log.push("finalize".into());
        Ok(())
    }
}

/// A simulated TD's vCPU: as KVM does for a TD, it refuses every access to
/// the registers, which the TDX module holds.
pub struct ProtectedVcpu;

impl Vcpu for ProtectedVcpu {
    fn get_regs(&self) -> hypervisor::Result<arch::StandardRegisters> {
        Err(HypervisorError::ProtectedState)
    }
    fn set_regs(&self, _: &arch::StandardRegisters) -> hypervisor::Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn get_sregs(&self) -> hypervisor::Result<arch::SpecialRegisters> {
        Err(HypervisorError::ProtectedState)
    }
    fn set_sregs(&self, _: &arch::SpecialRegisters) -> hypervisor::Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn set_cpuid(&self, _: &[arch::CpuidEntry]) -> hypervisor::Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn set_fpu(&self, _: &arch::FpuState) -> hypervisor::Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn set_msrs(&self, _: &[(u32, u64)]) -> hypervisor::Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn set_lapic_lints(&self) -> hypervisor::Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn wait_for_startup_ipi(&self) -> hypervisor::Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn run(&mut self) -> hypervisor::Result<VmExit<'_>> {
        Err(HypervisorError::Run(std::io::Error::other(
            "a simulated TD cannot run",
        )))
    }
}

/// A real launch with the simulated module in front: every command is
/// checked (and measured) by the simulation first, so a step the rules
/// refuse never reaches KVM, and the MRTD of what KVM launched is known.
/// The simulation is given the host's capabilities.
pub struct Mirrored<L> {
    pub simulated: SimulatedTdxModule,
    pub real: L,
}

impl<L: TdxLauncher> TdxLauncher for Mirrored<L> {
    fn capabilities(&mut self) -> TdxResult<TdxCapabilities> {
        let caps = self.real.capabilities()?;
        self.simulated.capabilities = caps.clone();
        Ok(caps)
    }

    fn init_vm(&mut self, params: &TdxInitVm) -> TdxResult<()> {
        self.simulated.init_vm(params)?;
        self.real.init_vm(params)
    }

    fn init_vcpu(&mut self, index: u8, rcx: u64) -> TdxResult<Option<Box<dyn Vcpu>>> {
        self.simulated.init_vcpu(index, rcx)?;
        self.real.init_vcpu(index, rcx)
    }

    fn init_mem_region(&mut self, gpa: u64, source: &[u8], measure: bool) -> TdxResult<()> {
        self.simulated.init_mem_region(gpa, source, measure)?;
        self.real.init_mem_region(gpa, source, measure)
    }

    fn finalize(&mut self) -> TdxResult<()> {
        self.simulated.finalize()?;
        self.real.finalize()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module() -> SimulatedTdxModule {
        SimulatedTdxModule::new(PrivateMemory(vec![(0, 64 << 20), (0xffe0_0000, 2 << 20)]))
    }

    fn init() -> TdxInitVm {
        TdxInitVm {
            attributes: TD_ATTR_SEPT_VE_DISABLE,
            xfam: 0x7,
            cpuid: vec![CpuidEntry {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            }],
        }
    }

    fn why<T>(result: TdxResult<T>) -> String {
        match result {
            Err(TdxLaunchError::Refused { why, .. }) => why,
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[test]
    fn the_order_is_enforced_and_nothing_follows_the_finalize() {
        let mut m = module();
        let page = [0u8; 4096];
        assert!(why(m.init_vcpu(0, 0)).contains("out of order (the launch is Created)"));
        assert!(why(m.init_mem_region(0x1000, &page, false)).contains("out of order"));
        assert!(why(m.finalize()).contains("out of order"));
        m.init_vm(&init()).unwrap();
        assert!(why(m.init_vm(&init())).contains("out of order"));
        assert!(why(m.init_mem_region(0x1000, &page, false)).contains("no initialized vCPU"));
        assert!(why(m.finalize()).contains("no initialized vCPU"));
        let mut vcpu = m.init_vcpu(0, 0x80_9000).unwrap().unwrap();
        assert!(why(m.init_vcpu(0, 0)).contains("initialized already"));
        m.init_vcpu(1, 0x80_9000).unwrap();
        m.init_mem_region(0x1000, &page, true).unwrap();
        // No vCPU joins once memory is being added.
        assert!(why(m.init_vcpu(2, 0)).contains("AddingMemory"));
        m.finalize().unwrap();
        assert_eq!(m.state(), LaunchState::Finalized);
        let before = m.mrtd().hex();
        assert!(why(m.init_mem_region(0x2000, &page, false)).contains("finalized"));
        assert!(why(m.finalize()).contains("finalized"));
        assert!(why(m.init_vm(&init())).contains("finalized"));
        assert_eq!(m.mrtd().hex(), before);
        assert_eq!(
            m.log(),
            [
                "init_vm attributes=0x10000000 xfam=0x7 cpuid=1",
                "init_vcpu 0 rcx=0x809000",
                "init_vcpu 1 rcx=0x809000",
                "init_mem_region 0x1000+0x1000 measured",
                "finalize"
            ]
        );
        // The vCPU's state belongs to the module.
        let regs = arch::StandardRegisters::default();
        assert!(matches!(
            vcpu.set_regs(&regs),
            Err(HypervisorError::ProtectedState)
        ));
        let protected = |result: hypervisor::Result<()>| {
            assert!(matches!(result, Err(HypervisorError::ProtectedState)));
        };
        protected(vcpu.set_sregs(&Default::default()));
        protected(vcpu.get_regs().map(drop));
        protected(vcpu.get_sregs().map(drop));
        protected(vcpu.set_cpuid(&[]));
        protected(vcpu.set_fpu(&Default::default()));
        protected(vcpu.set_msrs(&[]));
        protected(vcpu.set_lapic_lints());
        protected(vcpu.wait_for_startup_ipi());
        assert!(matches!(vcpu.run(), Err(HypervisorError::Run(_))));
    }

    #[test]
    fn init_vm_takes_only_what_the_host_offers() {
        let refused = |params: TdxInitVm| {
            let mut m = module();
            let why = why(m.init_vm(&params));
            assert_eq!(m.state(), LaunchState::Created);
            why
        };
        let with = |f: &dyn Fn(&mut TdxInitVm)| {
            let mut p = init();
            f(&mut p);
            p
        };
        assert!(refused(with(&|p| p.attributes |= 1 << 29)).contains("attributes 0x20000000"));
        // Key Locker is not offered; the four attributes a TDX module
        // offers KVM's TDs are, alone and together.
        assert!(refused(with(&|p| p.attributes |= 1 << 31)).contains("attributes 0x80000000"));
        for attributes in [1, 1 << 28, 1 << 30, 1 << 63, 0x8000_0000_5000_0001] {
            let mut m = module();
            m.init_vm(&with(&|p| p.attributes = attributes)).unwrap();
            assert_eq!(m.state(), LaunchState::VmInitialized, "{attributes:#x}");
        }
        assert!(refused(with(&|p| p.xfam = 0x5)).contains("lacks x87 and SSE"));
        assert!(refused(with(&|p| p.xfam |= 1 << 17)).contains("XFAM bits 0x20000"));
        assert!(
            refused(with(&|p| p.cpuid.push(p.cpuid[0]))).contains("CPUID 0x1.0x0 is given twice")
        );
        assert!(refused(with(&|p| p.cpuid[0].function = 0x4000_0000)).contains("not configurable"));
        let mut caps = default_capabilities();
        caps.configurable_cpuid[0].ecx = 0xff;
        let mut m = module().with_capabilities(caps);
        let mut p = init();
        p.cpuid[0].ecx = 0x100;
        assert!(why(m.init_vm(&p)).contains("ecx bits 0x100 are not configurable"));
        assert!(m.init_params().is_none());
    }

    #[test]
    fn memory_must_be_private_whole_pages_added_once() {
        let mut m = module();
        m.init_vm(&init()).unwrap();
        m.init_vcpu(0, 0).unwrap();
        let page = [0u8; 4096];
        assert!(why(m.init_mem_region(0x1800, &page, false)).contains("not whole 4 KiB pages"));
        assert!(why(m.init_mem_region(0x1000, &page[..2048], false)).contains("not whole"));
        assert!(why(m.init_mem_region(0x1000, &[], false)).contains("not whole"));
        assert!(why(m.init_mem_region(u64::MAX - 0xfff, &page, false)).contains("wraps"));
        assert!(
            why(m.init_mem_region(0xc000_0000, &page, false))
                .contains("not private guest_memfd memory")
        );
        assert!(why(m.init_mem_region((64 << 20) - 0x1000, &[0; 8192], false)).contains("private"));
        let empty = m.mrtd().hex();
        assert_eq!(
            m.state(),
            LaunchState::VmInitialized,
            "refusals change nothing"
        );
        m.init_mem_region(0x4000, &[0; 8192], false).unwrap();
        assert!(why(m.init_mem_region(0x5000, &page, false)).contains("page 0x5000 was added"));
        assert_ne!(m.mrtd().hex(), empty);
    }

    /// MRTD is the page-by-page chain: ADD then (if measured) the page's
    /// 16 EXTENDs, pages ascending.
    #[test]
    fn mrtd_follows_the_pages_in_the_order_they_are_added() {
        let mut m = module();
        m.init_vm(&init()).unwrap();
        m.init_vcpu(0, 0).unwrap();
        let mut source = vec![0u8; 8192];
        source[..4096].fill(1);
        source[4096..].fill(2);
        m.init_mem_region(0xffe0_0000, &source, true).unwrap();
        m.init_mem_region(0x10_0000, &[0; 4096], false).unwrap();

        let mut expected = Mrtd::default();
        for (page, byte) in [(0xffe0_0000u64, 1u8), (0xffe0_1000, 2)] {
            expected.page_add(page);
            for i in 0..16 {
                expected.mr_extend(page + i * 256, &[byte; 256]);
            }
        }
        expected.page_add(0x10_0000);
        assert_eq!(m.mrtd().hex(), expected.hex());
    }
}
