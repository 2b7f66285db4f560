//! The Intel TDX launch as the VMM drives it: KVM's `KVM_TDX_CAPABILITIES`,
//! `KVM_TDX_INIT_VM`, `KVM_TDX_INIT_VCPU`, `KVM_TDX_INIT_MEM_REGION` and
//! `KVM_TDX_FINALIZE_VM` (all `KVM_MEMORY_ENCRYPT_OP` sub-commands, the
//! first, second and last on the VM, the others on a vCPU).
//! `TdxLauncher` is the sequence; `KvmTdxLauncher` sends it to KVM (and so
//! to the TDX module), and the VMM's simulated TDX module implements it
//! too, so the same launch code runs against either.

use std::sync::Arc;

use crate::{CpuidEntry, Vcpu, Vm};

pub use ::arch::layout::PAGE_SIZE;
/// TDH.MR.EXTEND measures 256 bytes at a time.
pub const MR_EXTEND_CHUNK: usize = 256;

/// TD attributes (TDX module ABI, `ATTRIBUTES`).
pub const TD_ATTR_DEBUG: u64 = 1 << 0;
/// EPT violations on pending private pages are not turned into #VE: what
/// Linux guests require (they cannot handle a #VE there).
pub const TD_ATTR_SEPT_VE_DISABLE: u64 = 1 << 28;
pub const TD_ATTR_PKS: u64 = 1 << 30;
pub const TD_ATTR_KL: u64 = 1 << 31;
pub const TD_ATTR_PERFMON: u64 = 1 << 63;

/// XFAM bits every TD has: x87 and SSE state.
pub const XFAM_FIXED1: u64 = 0b11;

/// What the host's TDX module and KVM let a TD have.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TdxCapabilities {
    /// TD attributes KVM accepts in `KVM_TDX_INIT_VM`.
    pub supported_attributes: u64,
    /// Extended features (XSAVE state components) a TD may use.
    pub supported_xfam: u64,
    /// The CPUID bits userspace may configure: each entry names a leaf
    /// and holds a mask of its configurable bits.
    pub configurable_cpuid: Vec<CpuidEntry>,
}

/// The parameters of `KVM_TDX_INIT_VM`. MRCONFIGID, MROWNER and
/// MROWNERCONFIG are left zero: there is no attestation service here to
/// give them a meaning.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TdxInitVm {
    pub attributes: u64,
    pub xfam: u64,
    /// The configurable CPUID bits' values; the TDX module virtualizes the
    /// rest itself.
    pub cpuid: Vec<CpuidEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum TdxLaunchError {
    /// The step the sequence refused, by a rule of KVM or the TDX module.
    #[error("{command} refused: {why}")]
    Refused { command: &'static str, why: String },
    #[error("{command} failed (TDX module status {hw_error:#x})")]
    Kvm {
        command: &'static str,
        hw_error: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create vCPU {0}")]
    Vcpu(u8, #[source] crate::HypervisorError),
}

impl TdxLaunchError {
    /// `command` refused by a rule of KVM or the TDX module, saying `why`.
    pub fn refused(command: &'static str, why: impl Into<String>) -> Self {
        TdxLaunchError::Refused {
            command,
            why: why.into(),
        }
    }
}

pub type TdxResult<T> = std::result::Result<T, TdxLaunchError>;

/// Refusal by a VM or vCPU that is not a TD.
pub(crate) fn not_a_td(command: &'static str, vm_type: crate::VmType) -> TdxLaunchError {
    TdxLaunchError::refused(
        command,
        format!("a {} VM has no TDX launch", vm_type.name()),
    )
}

/// The launch sequence, in the order a launch calls it: `capabilities`
/// (any time), `init_vm`, `init_vcpu` for every vCPU, `init_mem_region`
/// for every initial range, `finalize`.
pub trait TdxLauncher {
    /// `KVM_TDX_CAPABILITIES`.
    fn capabilities(&mut self) -> TdxResult<TdxCapabilities>;
    /// `KVM_TDX_INIT_VM` (TDH.MNG.INIT): attributes, XFAM and CPUID are
    /// fixed for the TD's life.
    fn init_vm(&mut self, params: &TdxInitVm) -> TdxResult<()>;
    /// Creates vCPU `index` and sends `KVM_TDX_INIT_VCPU` (TDH.VP.INIT):
    /// the vCPU starts at the reset vector with `rcx` in RCX (TDVF takes
    /// the TD HOB's address there). Its state cannot be set afterwards.
    /// Returns the vCPU where the backend hands it over at once
    /// (`KvmTdxLauncher` keeps its vCPUs until `into_vcpus`).
    fn init_vcpu(&mut self, index: u8, rcx: u64) -> TdxResult<Option<Box<dyn Vcpu>>>;
    /// `KVM_TDX_INIT_MEM_REGION`: `source` (whole pages) is copied into
    /// private memory at `gpa`, page by page (TDH.MEM.PAGE.ADD), each page
    /// measured into MRTD (TDH.MR.EXTEND per 256 bytes) if `measure`.
    fn init_mem_region(&mut self, gpa: u64, source: &[u8], measure: bool) -> TdxResult<()>;
    /// `KVM_TDX_FINALIZE_VM` (TDH.MR.FINALIZE): MRTD is final, the TD can run.
    fn finalize(&mut self) -> TdxResult<()>;
}

/// The launch on a real KVM VM of type `tdx`. Guest memory (guest_memfd,
/// private) must be in place before `init_mem_region`.
pub struct KvmTdxLauncher {
    vm: Arc<dyn Vm>,
    /// `KVM_TDX_INIT_MEM_REGION` goes through an initialized vCPU's fd;
    /// the first one's.
    vcpus: Vec<Box<dyn Vcpu>>,
}

impl KvmTdxLauncher {
    pub fn new(vm: Arc<dyn Vm>) -> Self {
        KvmTdxLauncher {
            vm,
            vcpus: Vec::new(),
        }
    }

    /// The vCPUs, to run once the launch is finalized.
    pub fn into_vcpus(self) -> Vec<Box<dyn Vcpu>> {
        self.vcpus
    }
}

impl TdxLauncher for KvmTdxLauncher {
    fn capabilities(&mut self) -> TdxResult<TdxCapabilities> {
        self.vm.tdx_capabilities()
    }

    fn init_vm(&mut self, params: &TdxInitVm) -> TdxResult<()> {
        self.vm.tdx_init_vm(params)
    }

    fn init_vcpu(&mut self, index: u8, rcx: u64) -> TdxResult<Option<Box<dyn Vcpu>>> {
        let vcpu = self
            .vm
            .create_vcpu(index)
            .map_err(|e| TdxLaunchError::Vcpu(index, e))?;
        vcpu.tdx_init_vcpu(rcx)?;
        // The launcher keeps the vCPUs: it needs one for the memory
        // regions, and the caller takes them all back at the end.
        self.vcpus.push(vcpu);
        Ok(None)
    }

    fn init_mem_region(&mut self, gpa: u64, source: &[u8], measure: bool) -> TdxResult<()> {
        let Some(vcpu) = self.vcpus.first() else {
            return Err(TdxLaunchError::refused(
                "KVM_TDX_INIT_MEM_REGION",
                "no initialized vCPU to issue it on",
            ));
        };
        vcpu.tdx_init_mem_region(gpa, source, measure)
    }

    fn finalize(&mut self) -> TdxResult<()> {
        self.vm.tdx_finalize_vm()
    }
}
