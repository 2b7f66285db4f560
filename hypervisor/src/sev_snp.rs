//! The AMD SEV-SNP launch as the VMM drives it: KVM's `KVM_SEV_INIT2`,
//! `KVM_SEV_SNP_LAUNCH_START`, `KVM_SEV_SNP_LAUNCH_UPDATE` and
//! `KVM_SEV_SNP_LAUNCH_FINISH`, plus the vCPUs whose initial state KVM
//! turns into VMSA pages at the finish. `SevSnpLauncher` is the sequence;
//! `KvmSevSnpLauncher` sends it to KVM (and so to the security processor),
//! and the VMM's simulated security processor implements it too, so the
//! same launch code runs against either.

use std::sync::Arc;

use crate::{Vcpu, Vm, arch};

/// `SEV_FEATURES` bit 0: the guest runs with SNP active. KVM sets it in
/// every VMSA of an SNP VM itself; userspace may not ask for it.
pub const SEV_FEATURE_SNP_ACTIVE: u64 = 1;

/// Guest policy bits (SEV-SNP firmware ABI, "Guest Policy").
pub const SNP_POLICY_ABI_MINOR: u64 = 0xff;
pub const SNP_POLICY_ABI_MAJOR: u64 = 0xff << 8;
pub const SNP_POLICY_SMT: u64 = 1 << 16;
/// Reserved, must be one.
pub const SNP_POLICY_RESERVED_MBO: u64 = 1 << 17;
pub const SNP_POLICY_MIGRATE_MA: u64 = 1 << 18;
pub const SNP_POLICY_DEBUG: u64 = 1 << 19;
/// KVM refuses it: vCPUs are not pinned to one socket.
pub const SNP_POLICY_SINGLE_SOCKET: u64 = 1 << 20;
/// The bits KVM accepts in `SNP_LAUNCH_START`.
pub const SNP_POLICY_VALID: u64 = SNP_POLICY_ABI_MINOR
    | SNP_POLICY_ABI_MAJOR
    | SNP_POLICY_SMT
    | SNP_POLICY_RESERVED_MBO
    | SNP_POLICY_MIGRATE_MA
    | SNP_POLICY_DEBUG
    | SNP_POLICY_SINGLE_SOCKET;
/// QEMU's default: SMT allowed, the must-be-one bit.
pub const SNP_POLICY_DEFAULT: u64 = SNP_POLICY_SMT | SNP_POLICY_RESERVED_MBO;

/// The guest physical address KVM records VMSA pages at in the launch
/// digest: an all-ones GPA, page aligned, cut to 52 bits.
pub const VMSA_GPA: u64 = 0x0000_ffff_ffff_f000;

pub use ::arch::layout::PAGE_SIZE;

/// Page types of `SNP_LAUNCH_UPDATE`, numbered as KVM and the firmware
/// ABI number them. VMSA pages (2) are launched by KVM itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SnpPageType {
    /// Measured contents, encrypted into the guest.
    Normal = 1,
    /// Pre-validated pages the security processor zeroes (no source).
    Zero = 3,
    /// Contents encrypted but not measured.
    Unmeasured = 4,
    /// The page the security processor fills with the guest's secrets.
    Secrets = 5,
    /// CPUID values the security processor checks against its policy.
    Cpuid = 6,
}

impl SnpPageType {
    pub fn name(self) -> &'static str {
        match self {
            SnpPageType::Normal => "normal",
            SnpPageType::Zero => "zero",
            SnpPageType::Unmeasured => "unmeasured",
            SnpPageType::Secrets => "secrets",
            SnpPageType::Cpuid => "cpuid",
        }
    }
}

/// A vCPU's first state: the registers KVM copies into its VMSA at
/// `SNP_LAUNCH_FINISH`. Everything else in the VMSA is KVM's reset state.
#[derive(Debug, Clone, Copy, Default)]
pub struct SnpVcpuState {
    pub regs: arch::StandardRegisters,
    pub sregs: arch::SpecialRegisters,
}

#[derive(Debug, thiserror::Error)]
pub enum SnpLaunchError {
    /// The step the sequence refused, by a rule of KVM or the firmware ABI.
    #[error("{command} refused: {why}")]
    Refused { command: &'static str, why: String },
    #[error("{command} failed (firmware error {firmware_error:#x})")]
    Kvm {
        command: &'static str,
        firmware_error: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open /dev/sev (no SEV-SNP on this host)")]
    OpenSev(#[source] std::io::Error),
    #[error("cannot read the VMSA features KVM supports (no SEV-SNP on this host)")]
    VmsaFeatures(#[source] std::io::Error),
    #[error("cannot create vCPU {0}")]
    Vcpu(u8, #[source] crate::HypervisorError),
}

impl SnpLaunchError {
    /// `command` refused by a rule of KVM or the firmware ABI, saying `why`.
    pub fn refused(command: &'static str, why: impl Into<String>) -> Self {
        SnpLaunchError::Refused {
            command,
            why: why.into(),
        }
    }
}

pub type SnpResult<T> = std::result::Result<T, SnpLaunchError>;

/// One `SNP_LAUNCH_UPDATE`: `len` bytes at `gpa`, all of one page type.
#[derive(Debug, Clone, Copy)]
pub struct SnpUpdate<'a> {
    pub gpa: u64,
    pub len: u64,
    /// Host memory to copy into the guest; `None` for zero pages.
    pub source: Option<&'a [u8]>,
    pub page_type: SnpPageType,
}

impl<'a> SnpUpdate<'a> {
    pub fn new(gpa: u64, len: u64, source: Option<&'a [u8]>, page_type: SnpPageType) -> Self {
        SnpUpdate {
            gpa,
            len,
            source,
            page_type,
        }
    }
}

/// One KVM SEV command, as `Vm::sev_snp_command` sends it.
#[derive(Debug)]
pub enum SevSnpCommand<'a> {
    Init2 { vmsa_features: u64 },
    LaunchStart { policy: u64 },
    LaunchUpdate(SnpUpdate<'a>),
    LaunchFinish,
}

impl SevSnpCommand<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            SevSnpCommand::Init2 { .. } => "KVM_SEV_INIT2",
            SevSnpCommand::LaunchStart { .. } => "SNP_LAUNCH_START",
            SevSnpCommand::LaunchUpdate(_) => "SNP_LAUNCH_UPDATE",
            SevSnpCommand::LaunchFinish => "SNP_LAUNCH_FINISH",
        }
    }
}

/// The launch sequence, in the order a launch calls it: `init`,
/// `launch_start`, `launch_update` for every initial page, `add_vcpu` for
/// every vCPU, `launch_finish`.
pub trait SevSnpLauncher {
    /// `KVM_SEV_INIT2`; `vmsa_features` go into every VMSA's SEV_FEATURES
    /// (KVM adds SNP-active itself).
    fn init(&mut self, vmsa_features: u64) -> SnpResult<()>;
    /// `SNP_LAUNCH_START` with the guest policy.
    fn launch_start(&mut self, policy: u64) -> SnpResult<()>;
    /// `SNP_LAUNCH_UPDATE` of `update.len` bytes at `update.gpa`.
    fn launch_update(&mut self, update: SnpUpdate<'_>) -> SnpResult<()>;
    /// Creates vCPU `index` with its first state (its VMSA at the finish).
    /// Returns the vCPU to run where there is one.
    fn add_vcpu(&mut self, index: u8, state: &SnpVcpuState) -> SnpResult<Option<Box<dyn Vcpu>>>;
    /// `SNP_LAUNCH_FINISH`: KVM launches every vCPU's VMSA, then the guest
    /// context is final.
    fn launch_finish(&mut self) -> SnpResult<()>;
}

/// The launch on a real KVM VM of type `sev-snp`.
pub struct KvmSevSnpLauncher {
    vm: Arc<dyn Vm>,
}

impl KvmSevSnpLauncher {
    pub fn new(vm: Arc<dyn Vm>) -> Self {
        KvmSevSnpLauncher { vm }
    }
}

impl SevSnpLauncher for KvmSevSnpLauncher {
    fn init(&mut self, vmsa_features: u64) -> SnpResult<()> {
        self.vm
            .sev_snp_command(SevSnpCommand::Init2 { vmsa_features })
    }

    fn launch_start(&mut self, policy: u64) -> SnpResult<()> {
        self.vm
            .sev_snp_command(SevSnpCommand::LaunchStart { policy })
    }

    fn launch_update(&mut self, update: SnpUpdate<'_>) -> SnpResult<()> {
        self.vm.sev_snp_command(SevSnpCommand::LaunchUpdate(update))
    }

    fn add_vcpu(&mut self, index: u8, state: &SnpVcpuState) -> SnpResult<Option<Box<dyn Vcpu>>> {
        let vcpu = self
            .vm
            .create_vcpu(index)
            .map_err(|e| SnpLaunchError::Vcpu(index, e))?;
        vcpu.set_sregs(&state.sregs)
            .and_then(|()| vcpu.set_regs(&state.regs))
            .map_err(|e| SnpLaunchError::Vcpu(index, e))?;
        Ok(Some(vcpu))
    }

    fn launch_finish(&mut self) -> SnpResult<()> {
        self.vm.sev_snp_command(SevSnpCommand::LaunchFinish)
    }
}
