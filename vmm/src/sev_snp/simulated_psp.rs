//! A strict simulated AMD security processor (with KVM's part of the
//! launch in front of it), for hosts without SEV-SNP: it enforces the
//! documented rules of the launch commands and computes the launch digest
//! as the processor does, including the VMSA pages KVM builds from each
//! vCPU's state at `SNP_LAUNCH_FINISH`. As the fake IOMMU is for VFIO, it
//! is a backend the real launch code runs against; `--measure` uses it to
//! predict a launch, and a real launch runs it beside KVM (`Mirrored`).
//!
//! Rules (KVM's `amd-memory-encryption.rst` and the firmware ABI):
//! - `KVM_SEV_INIT2` first and once, with only supported VMSA features
//!   (never SNP-active: KVM sets that itself);
//! - `SNP_LAUNCH_START` once after it, with the must-be-one policy bit,
//!   no bit outside those KVM accepts, and not single-socket;
//! - `SNP_LAUNCH_UPDATE` between start and finish, of whole pages at a
//!   page-aligned GPA, all in private guest_memfd memory, each page once;
//!   zero pages without a source, every other type with exactly `len`
//!   bytes, a CPUID page in the ABI's format;
//! - vCPUs after `KVM_SEV_INIT2` and before the finish, one VMSA each;
//! - `SNP_LAUNCH_FINISH` after start, with at least one vCPU;
//! - nothing after the finish.
//!
//! A refused command changes nothing.

use std::collections::BTreeSet;
use std::ops::Range;

use hypervisor::sev_snp::{
    PAGE_SIZE, SEV_FEATURE_SNP_ACTIVE, SNP_POLICY_RESERVED_MBO, SNP_POLICY_SINGLE_SOCKET,
    SNP_POLICY_VALID, SnpResult, VMSA_GPA,
};
use hypervisor::{SevSnpLauncher, SnpLaunchError, SnpPageType, SnpUpdate, SnpVcpuState, Vcpu};

use super::digest::{LaunchDigest, MeasuredPageType};
use super::{cpuid_page, vmsa};

/// VMSA features a current SNP host's KVM reports (DebugSwap, the one KVM
/// enables by default); tests may allow others.
pub const DEFAULT_SUPPORTED_VMSA_FEATURES: u64 = 1 << 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchState {
    /// The VM exists; nothing was sent.
    Created,
    Initialized,
    Started,
    Finished,
}

/// Guest memory the simulated launch may place pages in: private
/// guest_memfd ranges, as (gpa, size).
#[derive(Debug, Clone, Default)]
pub struct PrivateMemory(pub Vec<(u64, u64)>);

impl PrivateMemory {
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.0
            .iter()
            .any(|(start, size)| gpa >= *start && gpa + len <= start + size)
    }
}

/// The pages a simulated launch has placed, inside the private memory it
/// may place them in: the page rules the SEV-SNP and TDX launches share
/// (whole 4 KiB pages at an aligned GPA, not wrapping, all in private
/// guest_memfd memory, each page once).
#[derive(Debug, Clone, Default)]
pub struct LaunchedPages {
    memory: PrivateMemory,
    /// Page frame numbers placed.
    pages: BTreeSet<u64>,
}

impl LaunchedPages {
    pub fn new(memory: PrivateMemory) -> Self {
        LaunchedPages {
            memory,
            pages: BTreeSet::new(),
        }
    }

    /// The page frames of `gpa..gpa+len` if the rules let it be placed;
    /// else why not, with `verb` naming the placing ("launched", "added").
    pub fn check(&self, gpa: u64, len: u64, verb: &str) -> Result<Range<u64>, String> {
        let range = format!("{gpa:#x}+{len:#x}");
        if !gpa.is_multiple_of(PAGE_SIZE) || len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(format!("{range} is not whole 4 KiB pages"));
        }
        if gpa.checked_add(len).is_none() {
            return Err(format!("{range} wraps"));
        }
        if !self.memory.contains(gpa, len) {
            return Err(format!("{range} is not private guest_memfd memory"));
        }
        let first = gpa / PAGE_SIZE;
        let pages = first..first + len / PAGE_SIZE;
        if let Some(pfn) = self.pages.range(pages.clone()).next() {
            return Err(format!("page {:#x} was {verb} already", pfn * PAGE_SIZE));
        }
        Ok(pages)
    }

    /// Records `pages` (from `check`) as placed.
    pub fn place(&mut self, pages: Range<u64>) {
        self.pages.extend(pages);
    }
}

pub struct SimulatedPsp {
    state: LaunchState,
    supported_vmsa_features: u64,
    sev_features: u64,
    policy: u64,
    digest: LaunchDigest,
    launched: LaunchedPages,
    vcpus: Vec<(u8, SnpVcpuState)>,
    /// The CPUID table of the accepted CPUID page.
    cpuid: Option<Vec<cpuid_page::CpuidFunction>>,
    /// Every accepted command, for tests: (command, detail).
    log: Vec<String>,
}

impl SimulatedPsp {
    pub fn new(memory: PrivateMemory) -> Self {
        SimulatedPsp {
            state: LaunchState::Created,
            supported_vmsa_features: DEFAULT_SUPPORTED_VMSA_FEATURES,
            sev_features: 0,
            policy: 0,
            digest: LaunchDigest::default(),
            launched: LaunchedPages::new(memory),
            vcpus: Vec::new(),
            cpuid: None,
            log: Vec::new(),
        }
    }

    pub fn with_supported_vmsa_features(mut self, features: u64) -> Self {
        self.supported_vmsa_features = features;
        self
    }

    pub fn state(&self) -> LaunchState {
        self.state
    }

    /// The launch digest so far; the guest's MEASUREMENT once finished.
    pub fn digest(&self) -> &LaunchDigest {
        &self.digest
    }

    /// SEV_FEATURES of every VMSA (what KVM_SEV_INIT2 made of the request).
    pub fn sev_features(&self) -> u64 {
        self.sev_features
    }

    pub fn policy(&self) -> u64 {
        self.policy
    }

    /// The CPUID the guest was launched with (its CPUID page's table).
    pub fn cpuid(&self) -> Option<&[cpuid_page::CpuidFunction]> {
        self.cpuid.as_deref()
    }

    pub fn log(&self) -> &[String] {
        &self.log
    }

    fn expect_state(&self, command: &'static str, allowed: &[LaunchState]) -> SnpResult<()> {
        let end = (LaunchState::Finished, "the launch is finished");
        expect_state(command, self.state, allowed, end, SnpLaunchError::refused)
    }
}

/// Refuses `command` (as `refused` builds the error) unless `state` is
/// one of `allowed`: the launch is over in `end`'s state, said as `end`'s
/// text, and out of order in any other.
pub fn expect_state<S: PartialEq + Copy + std::fmt::Debug, E>(
    command: &'static str,
    state: S,
    allowed: &[S],
    end: (S, &str),
    refused: fn(&'static str, String) -> E,
) -> Result<(), E> {
    if allowed.contains(&state) {
        Ok(())
    } else if state == end.0 {
        Err(refused(command, end.1.to_string()))
    } else {
        Err(refused(
            command,
            format!("out of order (the launch is {state:?})"),
        ))
    }
}

/// Refuses the bits of `asked` outside `supported`, naming them as
/// `what` ("VMSA features") and what is supported.
pub fn within_supported(what: &str, asked: u64, supported: u64) -> Result<(), String> {
    match asked & !supported {
        0 => Ok(()),
        bits => Err(format!(
            "{what} {bits:#x} are not supported (supported: {supported:#x})"
        )),
    }
}

impl SevSnpLauncher for SimulatedPsp {
    fn init(&mut self, vmsa_features: u64) -> SnpResult<()> {
        const CMD: &str = "KVM_SEV_INIT2";
        self.expect_state(CMD, &[LaunchState::Created])?;
        if vmsa_features & SEV_FEATURE_SNP_ACTIVE != 0 {
            return Err(SnpLaunchError::refused(
                CMD,
                "VMSA feature SNP-active (0x1) is not supported: KVM sets it itself",
            ));
        }
        within_supported("VMSA features", vmsa_features, self.supported_vmsa_features)
            .map_err(|why| SnpLaunchError::refused(CMD, why))?;
        self.sev_features = vmsa_features | SEV_FEATURE_SNP_ACTIVE;
        self.state = LaunchState::Initialized;
        self.log
            .push(format!("init vmsa_features={vmsa_features:#x}"));
        Ok(())
    }

    fn launch_start(&mut self, policy: u64) -> SnpResult<()> {
        const CMD: &str = "SNP_LAUNCH_START";
        self.expect_state(CMD, &[LaunchState::Initialized])?;
        if policy & SNP_POLICY_RESERVED_MBO == 0 {
            return Err(SnpLaunchError::refused(
                CMD,
                format!("policy {policy:#x} lacks the must-be-one bit 17"),
            ));
        }
        if policy & !SNP_POLICY_VALID != 0 {
            return Err(SnpLaunchError::refused(
                CMD,
                format!(
                    "policy {policy:#x} has reserved bits {:#x}",
                    policy & !SNP_POLICY_VALID
                ),
            ));
        }
        if policy & SNP_POLICY_SINGLE_SOCKET != 0 {
            return Err(SnpLaunchError::refused(
                CMD,
                "KVM cannot honour a single-socket policy",
            ));
        }
        self.policy = policy;
        self.state = LaunchState::Started;
        self.log.push(format!("start policy={policy:#x}"));
        Ok(())
    }

    fn launch_update(&mut self, update: SnpUpdate<'_>) -> SnpResult<()> {
        const CMD: &str = "SNP_LAUNCH_UPDATE";
        let SnpUpdate {
            gpa,
            len,
            source,
            page_type,
        } = update;
        self.expect_state(CMD, &[LaunchState::Started])?;
        let range = format!("{gpa:#x}+{len:#x}");
        let pages = match self.launched.check(gpa, len, "launched") {
            Ok(pages) => pages,
            Err(why) => return Err(SnpLaunchError::refused(CMD, why)),
        };
        let mut cpuid = None;
        match (page_type, source) {
            (SnpPageType::Zero, Some(_)) => {
                return Err(SnpLaunchError::refused(CMD, "zero pages take no source"));
            }
            (SnpPageType::Zero, None) => {}
            (_, None) => {
                return Err(SnpLaunchError::refused(
                    CMD,
                    format!("{} pages need a source", page_type.name()),
                ));
            }
            (_, Some(data)) if data.len() as u64 != len => {
                return Err(SnpLaunchError::refused(
                    CMD,
                    format!("{} source bytes for {range}", data.len()),
                ));
            }
            (SnpPageType::Cpuid, Some(data)) => {
                if len != PAGE_SIZE {
                    return Err(SnpLaunchError::refused(CMD, "a CPUID update is one page"));
                }
                match cpuid_page::validate(data) {
                    Ok(table) => cpuid = Some(table),
                    Err(why) => return Err(SnpLaunchError::refused(CMD, why.to_string())),
                }
            }
            (SnpPageType::Secrets, _) if len != PAGE_SIZE => {
                return Err(SnpLaunchError::refused(CMD, "a secrets update is one page"));
            }
            _ => {}
        }
        self.digest.extend_range(gpa, len, page_type.into(), source);
        self.launched.place(pages);
        if cpuid.is_some() {
            self.cpuid = cpuid;
        }
        self.log
            .push(format!("update {} {range}", page_type.name()));
        Ok(())
    }

    fn add_vcpu(&mut self, index: u8, state: &SnpVcpuState) -> SnpResult<Option<Box<dyn Vcpu>>> {
        const CMD: &str = "KVM_CREATE_VCPU";
        self.expect_state(CMD, &[LaunchState::Initialized, LaunchState::Started])?;
        if self.vcpus.iter().any(|(i, _)| *i == index) {
            return Err(SnpLaunchError::refused(
                CMD,
                format!("vCPU {index} already has a VMSA"),
            ));
        }
        self.vcpus.push((index, *state));
        self.log.push(format!("vcpu {index}"));
        Ok(None)
    }

    fn launch_finish(&mut self) -> SnpResult<()> {
        const CMD: &str = "SNP_LAUNCH_FINISH";
        self.expect_state(CMD, &[LaunchState::Started])?;
        if self.vcpus.is_empty() {
            return Err(SnpLaunchError::refused(CMD, "no vCPU to launch"));
        }
        // KVM launches the VMSAs in vCPU order, each at the same GPA.
        let mut vcpus = self.vcpus.clone();
        vcpus.sort_by_key(|(index, _)| *index);
        for (_, state) in &vcpus {
            let page = vmsa::build_vmsa(state, self.sev_features);
            self.digest
                .extend_page(VMSA_GPA, MeasuredPageType::Vmsa, Some(&page[..]));
        }
        self.state = LaunchState::Finished;
        self.log.push("finish".into());
        Ok(())
    }
}

/// A real launch with the simulated processor in front: every command is
/// checked (and measured) by the simulation first, so a step the rules
/// refuse never reaches KVM, and the digest of what KVM launched is known.
pub struct Mirrored<L> {
    pub simulated: SimulatedPsp,
    pub real: L,
}

impl<L: SevSnpLauncher> SevSnpLauncher for Mirrored<L> {
    fn init(&mut self, vmsa_features: u64) -> SnpResult<()> {
        self.simulated.init(vmsa_features)?;
        self.real.init(vmsa_features)
    }

    fn launch_start(&mut self, policy: u64) -> SnpResult<()> {
        self.simulated.launch_start(policy)?;
        self.real.launch_start(policy)
    }

    fn launch_update(&mut self, update: SnpUpdate<'_>) -> SnpResult<()> {
        self.simulated.launch_update(update)?;
        self.real.launch_update(update)
    }

    fn add_vcpu(&mut self, index: u8, state: &SnpVcpuState) -> SnpResult<Option<Box<dyn Vcpu>>> {
        self.simulated.add_vcpu(index, state)?;
        self.real.add_vcpu(index, state)
    }

    fn launch_finish(&mut self) -> SnpResult<()> {
        self.simulated.launch_finish()?;
        self.real.launch_finish()
    }
}
