// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! The hypervisor boundary: everything the VMM needs from KVM, behind the
//! `Hypervisor` / `Vm` / `Vcpu` traits. Policy (what to do with an exit) lives
//! in `vmm`; this crate only translates between KVM and typed Rust values.

#[cfg(any(test, feature = "test-utils"))]
pub mod attribute_tracking;
pub mod caps;
mod conversion;
pub mod kvm;
#[cfg(any(test, feature = "test-utils"))]
pub mod scripted_vcpu;
pub mod sev_snp;
pub mod tdvmcall;
pub mod tdx;
mod vcpu_exit;
mod vfio_device;

use std::os::fd::OwnedFd;
use std::sync::Arc;

/// One CPUID leaf, as KVM reports and takes it; also what an SNP CPUID
/// page and `KVM_TDX_INIT_VM` are built from.
pub use arch::CpuidEntry;
pub use caps::{Capabilities, VmType};
pub use conversion::{
    ConversionDirection, ConversionError, MAP_GPA_RANGE_ENCRYPTED, MemoryConversion,
    decode_map_gpa_range,
};
pub use kvm::KvmHypervisor;
pub use sev_snp::{
    KvmSevSnpLauncher, SevSnpCommand, SevSnpLauncher, SnpLaunchError, SnpPageType, SnpUpdate,
    SnpVcpuState,
};
pub use tdvmcall::{TdVmCall, TdVmCallAnswer, TdVmCallReply, TdVmCallStatus};
pub use tdx::{KvmTdxLauncher, TdxCapabilities, TdxInitVm, TdxLaunchError, TdxLauncher, TdxResult};
pub use vcpu_exit::{HYPERCALL_EINVAL, HypercallReply, VmExit};
pub use vfio_device::KvmVfioDevice;
pub use vmm_sys_util::eventfd::EventFd;

/// x86_64 register files, re-exported so the VMM's boot code needs no KVM crate.
pub mod arch {
    pub use kvm_bindings::kvm_sregs as SpecialRegisters;
    pub use kvm_bindings::{
        kvm_cpuid_entry2 as CpuidEntry, kvm_fpu as FpuState, kvm_regs as StandardRegisters,
        kvm_segment as SegmentRegister,
    };
    /// The index is significant for this leaf (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
    pub const CPUID_FLAG_INDEXED: u32 = kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] std::io::Error),
    #[error("cannot create a VM of type {0:?}")]
    CreateVm(VmType, #[source] std::io::Error),
    #[error("VM type {0:?} is not supported by this host")]
    VmTypeUnsupported(VmType),
    #[error("cannot create guest_memfd of {size} bytes with flags {flags:#x}")]
    CreateGuestMemfd {
        size: u64,
        flags: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest_memfd is not supported by this host")]
    GuestMemfdUnsupported,
    #[error("cannot bind memory slot {slot} at {gpa:#x}+{size:#x}")]
    SetUserMemoryRegion {
        slot: u32,
        gpa: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM_SET_MEMORY_ATTRIBUTES is not supported for this VM type")]
    MemoryAttributesUnsupported,
    #[error("cannot set memory attributes of {gpa:#x}+{size:#x}")]
    SetMemoryAttributes {
        gpa: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot enable capability {0}")]
    EnableCap(u32, #[source] std::io::Error),
    #[error("cannot create vCPU {0}")]
    CreateVcpu(u8, #[source] std::io::Error),
    #[error("vCPU register access failed")]
    Registers(#[source] std::io::Error),
    #[error("KVM_RUN failed")]
    Run(#[source] std::io::Error),
    #[error("this VM has no in-kernel interrupt controller")]
    NoIrqchip,
    #[error("cannot set the GSI routing table ({0} routes)")]
    GsiRouting(usize, #[source] std::io::Error),
    #[error("cannot create the KVM-VFIO device")]
    CreateVfioDevice(#[source] std::io::Error),
    #[error("cannot create the in-kernel PIT")]
    CreatePit(#[source] std::io::Error),
    #[error("cannot set CPUID ({0} entries)")]
    SetCpuid(usize, #[source] std::io::Error),
    #[error("cannot set {0} MSRs")]
    SetMsrs(usize, #[source] std::io::Error),
    #[error("cannot set the FPU state")]
    SetFpu(#[source] std::io::Error),
    #[error("cannot set the local APIC's LINT pins")]
    SetLapic(#[source] std::io::Error),
    #[error("cannot set the vCPU's run state")]
    SetMpState(#[source] std::io::Error),
    #[error("a TD vCPU's state belongs to the TDX module: it cannot be set")]
    ProtectedState,
    #[error("cannot read the VM's TSC frequency")]
    GetTscKhz(#[source] std::io::Error),
    #[error("cannot set the VM's TSC frequency to {0} kHz")]
    SetTscKhz(u32, #[source] std::io::Error),
    #[error("cannot signal the MSI {data:#x} to {address:#x}")]
    SignalMsi {
        address: u64,
        data: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {action} irqfd for GSI {gsi}")]
    Irqfd {
        action: &'static str,
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
}

/// An MSI message routed to a GSI: what a device's MSI / MSI-X table entry
/// says, so the in-kernel irqchip can deliver the interrupt on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiRoute {
    pub gsi: u32,
    pub address: u64,
    pub data: u32,
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// One guest physical memory slot handed to the hypervisor.
#[derive(Debug, Clone, Copy)]
pub struct UserMemoryRegion {
    pub slot: u32,
    pub guest_phys_addr: u64,
    pub size: u64,
    /// Host virtual address of the shared (host-accessible) view.
    pub userspace_addr: u64,
    /// guest_memfd holding the private view, and the offset inside it.
    pub guest_memfd: Option<(i32, u64)>,
}

pub trait Hypervisor: Send + Sync {
    fn capabilities(&self) -> &Capabilities;
    fn create_vm(&self, vm_type: VmType) -> Result<Arc<dyn Vm>>;
    /// The SEV_FEATURES bits an SEV-SNP VM may have; an error where the
    /// host has no SEV.
    fn sev_snp_vmsa_features(&self) -> sev_snp::SnpResult<u64> {
        Err(SnpLaunchError::VmsaFeatures(std::io::Error::from(
            std::io::ErrorKind::Unsupported,
        )))
    }
}

pub trait Vm: Send + Sync {
    fn vm_type(&self) -> VmType;
    /// Capabilities as reported by the VM file descriptor (some depend on the VM type).
    fn capabilities(&self) -> &Capabilities;
    fn create_guest_memfd(&self, size: u64, flags: u64) -> Result<OwnedFd>;
    /// # Safety
    /// `region.userspace_addr .. +size` must stay mapped for as long as the slot exists.
    unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> Result<()>;
    /// Marks `gpa..gpa+size` private (`true`) or shared. Returns
    /// `MemoryAttributesUnsupported` where the VM type cannot track private memory.
    fn set_memory_attributes(&self, gpa: u64, size: u64, private: bool) -> Result<()>;
    fn supports_memory_attributes(&self) -> bool;
    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>>;
    /// What this host's KVM can offer a guest (KVM_GET_SUPPORTED_CPUID),
    /// before the VMM's adjustments.
    fn supported_cpuid(&self) -> Vec<arch::CpuidEntry>;
    /// Whether KVM's in-kernel LAPIC / IOAPIC exists, so MSIs can be routed.
    fn has_irqchip(&self) -> bool;
    /// Whether the irqchip is split (TDX): LAPICs in the kernel, the
    /// IOAPIC, PIC and PIT the VMM's. Every other VM has the full one.
    fn has_split_irqchip(&self) -> bool {
        false
    }
    /// The TSC frequency vCPUs created from now on get, in kHz (the VM's
    /// `KVM_GET_TSC_KHZ`).
    fn tsc_khz(&self) -> Result<u32> {
        Err(HypervisorError::GetTscKhz(std::io::Error::from(
            std::io::ErrorKind::Unsupported,
        )))
    }
    /// Sets the TSC frequency of every vCPU created from now on (the VM's
    /// `KVM_SET_TSC_KHZ`, `KVM_CAP_VM_TSC_CONTROL`): TDX takes it at
    /// `KVM_TDX_INIT_VM`, for the whole TD. KVM refuses it once a vCPU
    /// exists.
    fn set_tsc_khz(&self, khz: u32) -> Result<()> {
        Err(HypervisorError::SetTscKhz(
            khz,
            std::io::Error::from(std::io::ErrorKind::Unsupported),
        ))
    }
    /// Injects one MSI (`KVM_SIGNAL_MSI`): how the userspace IOAPIC of a
    /// split irqchip delivers an interrupt to the in-kernel LAPICs.
    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        let _ = (address, data);
        Err(HypervisorError::NoIrqchip)
    }
    /// Adds KVM's in-kernel 8254 timer (what Linux calibrates its clocks
    /// against and takes its first timer interrupts from).
    fn create_pit(&self) -> Result<()>;
    /// Replaces the whole MSI routing table (KVM takes it in one piece).
    fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()>;
    /// Makes a write to `fd` inject GSI `gsi` without leaving the kernel.
    fn register_irqfd(&self, fd: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()>;
    fn unregister_irqfd(&self, fd: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()>;
    /// Creates the VM's KVM-VFIO pseudo device: VFIO groups and device
    /// cdevs added to it let KVM see that a device can do non-coherent DMA
    /// (no-snoop) and must then honour the guest's cache flushes.
    fn create_vfio_device(&self) -> Result<KvmVfioDevice>;
    /// One SEV-SNP launch command (`KVM_MEMORY_ENCRYPT_OP`); refused by
    /// VMs that are not of type `sev-snp`.
    fn sev_snp_command(&self, command: SevSnpCommand<'_>) -> sev_snp::SnpResult<()> {
        Err(SnpLaunchError::refused(
            command.name(),
            format!("a {} VM has no SEV-SNP launch", self.vm_type().name()),
        ))
    }
    /// `KVM_TDX_CAPABILITIES`; refused by VMs that are not of type `tdx`.
    fn tdx_capabilities(&self) -> TdxResult<TdxCapabilities> {
        Err(tdx::not_a_td("KVM_TDX_CAPABILITIES", self.vm_type()))
    }
    /// `KVM_TDX_INIT_VM`, before any vCPU exists.
    fn tdx_init_vm(&self, params: &TdxInitVm) -> TdxResult<()> {
        let _ = params;
        Err(tdx::not_a_td("KVM_TDX_INIT_VM", self.vm_type()))
    }
    /// `KVM_TDX_FINALIZE_VM`.
    fn tdx_finalize_vm(&self) -> TdxResult<()> {
        Err(tdx::not_a_td("KVM_TDX_FINALIZE_VM", self.vm_type()))
    }
}

pub trait Vcpu: Send {
    fn get_regs(&self) -> Result<arch::StandardRegisters>;
    fn set_regs(&self, regs: &arch::StandardRegisters) -> Result<()>;
    fn get_sregs(&self) -> Result<arch::SpecialRegisters>;
    fn set_sregs(&self, sregs: &arch::SpecialRegisters) -> Result<()>;
    /// Replaces the CPUID the guest sees.
    fn set_cpuid(&self, entries: &[arch::CpuidEntry]) -> Result<()>;
    fn set_fpu(&self, fpu: &arch::FpuState) -> Result<()>;
    /// Writes model-specific registers: (index, value).
    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<()>;
    /// Programs the local APIC's LINT0 as ExtINT and LINT1 as NMI, what
    /// firmware leaves a processor with and Linux expects.
    fn set_lapic_lints(&self) -> Result<()>;
    /// Leaves an application processor waiting for INIT / SIPI, which the
    /// in-kernel LAPIC delivers when the guest starts it (Linux's SMP
    /// bring-up); without this every vCPU runs from its registers at once.
    fn wait_for_startup_ipi(&self) -> Result<()>;
    /// Enters the guest until the next exit that needs the VMM.
    fn run(&mut self) -> Result<VmExit<'_>>;
    /// `KVM_TDX_INIT_VCPU` with the vCPU's first RCX; refused by vCPUs of
    /// VMs that are not TDs.
    fn tdx_init_vcpu(&self, rcx: u64) -> TdxResult<()> {
        let _ = rcx;
        Err(tdx::TdxLaunchError::refused(
            "KVM_TDX_INIT_VCPU",
            "not a TD vCPU",
        ))
    }
    /// `KVM_TDX_INIT_MEM_REGION` of `source` (whole pages) at `gpa`.
    fn tdx_init_mem_region(&self, gpa: u64, source: &[u8], measure: bool) -> TdxResult<()> {
        let _ = (gpa, source, measure);
        Err(tdx::TdxLaunchError::refused(
            "KVM_TDX_INIT_MEM_REGION",
            "not a TD vCPU",
        ))
    }
}
