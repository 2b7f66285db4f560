//! KVM implementation of the hypervisor traits (kvm-ioctls / kvm-bindings).

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_GUEST_MEMFD, KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MP_STATE_RUNNABLE, kvm_create_guest_memfd, kvm_enable_cap, kvm_memory_attributes,
    kvm_mp_state, kvm_userspace_memory_region, kvm_userspace_memory_region2,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::conversion::{KVM_HC_MAP_GPA_RANGE, decode_map_gpa_range, decode_memory_fault};
use crate::tdvmcall::{self, KVM_EXIT_TDX};
use crate::vcpu_exit::{HYPERCALL_EINVAL, HypercallReply};
use crate::{
    Capabilities, Hypervisor, HypervisorError, MsiRoute, Result, UserMemoryRegion, Vcpu, Vm,
    VmExit, VmType, arch,
};

fn io_err(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}

/// IOAPIC pins a split irqchip routes (KVM reserves GSIs below this).
const IOAPIC_PINS: u32 = 24;

pub struct KvmHypervisor {
    kvm: Kvm,
    caps: Capabilities,
    supported_cpuid: CpuId,
}

impl KvmHypervisor {
    /// Opens `/dev/kvm` and probes what it can do.
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| HypervisorError::OpenKvm(io_err(e)))?;
        let caps = Capabilities::probe(|cap| kvm.check_extension_raw(cap.into()));
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| HypervisorError::OpenKvm(io_err(e)))?;
        Ok(KvmHypervisor {
            kvm,
            caps,
            supported_cpuid,
        })
    }

    /// `/dev/kvm` for a test: `None` where it cannot be opened, and the
    /// test skips loudly, except under `CH_REQUIRE_KVM=1` (CI), where that
    /// fails the test instead.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn for_tests() -> Option<Self> {
        match Self::new() {
            Ok(hv) => Some(hv),
            Err(e) => {
                assert_ne!(
                    std::env::var("CH_REQUIRE_KVM").as_deref(),
                    Ok("1"),
                    "/dev/kvm is required: {e}"
                );
                eprintln!("*** SKIPPED: /dev/kvm unavailable: {e} ***");
                None
            }
        }
    }
}

impl Hypervisor for KvmHypervisor {
    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn sev_snp_vmsa_features(&self) -> crate::sev_snp::SnpResult<u64> {
        sev_snp::supported_vmsa_features(&self.kvm)
    }

    fn create_vm(&self, vm_type: VmType) -> Result<Arc<dyn Vm>> {
        self.create(vm_type, vm_type == VmType::Tdx)
    }
}

impl KvmHypervisor {
    /// A default VM with the split irqchip TDs have (LAPICs in the kernel,
    /// the IOAPIC the VMM's): what tests of the userspace IOAPIC and of a
    /// fake TD run on, on hosts without TDX.
    #[cfg(any(test, feature = "test-utils"))]
    pub fn create_split_irqchip_vm(&self) -> Result<Arc<dyn Vm>> {
        self.create(VmType::Default, true)
    }

    fn create(&self, vm_type: VmType, split: bool) -> Result<Arc<dyn Vm>> {
        if !self.caps.supports_vm_type(vm_type) {
            return Err(HypervisorError::VmTypeUnsupported(vm_type));
        }
        let fd = match vm_type {
            VmType::Default => self.kvm.create_vm(),
            other => self.kvm.create_vm_with_type(other.kvm_value().into()),
        }
        .map_err(|e| HypervisorError::CreateVm(vm_type, io_err(e)))?;
        // The VM fd answers per VM type (guest_memfd flags, memory attributes).
        let caps = Capabilities::probe(|cap| fd.check_extension_raw(cap.into()));
        let tss = usize::try_from(::arch::layout::KVM_TSS_START)
            .map_err(|e| e.to_string())
            .and_then(|tss| fd.set_tss_address(tss).map_err(|e| e.to_string()));
        if let Err(e) = tss {
            debug!("KVM_SET_TSS_ADDR not accepted: {e}");
        }
        if caps.map_gpa_range_exit() {
            let cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_EXIT_HYPERCALL,
                args: [1 << KVM_HC_MAP_GPA_RANGE, 0, 0, 0],
                ..Default::default()
            };
            fd.enable_cap(&cap).map_err(|e| {
                HypervisorError::EnableCap(kvm_bindings::KVM_CAP_EXIT_HYPERCALL, io_err(e))
            })?;
        }
        // KVM runs a TD only with a split irqchip: LAPICs in the kernel,
        // the IOAPIC (and PIC) in userspace. Only TDs get one; every other
        // VM keeps the full in-kernel irqchip.
        if split {
            let cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_SPLIT_IRQCHIP,
                args: [u64::from(IOAPIC_PINS), 0, 0, 0],
                ..Default::default()
            };
            fd.enable_cap(&cap).map_err(|e| {
                HypervisorError::EnableCap(kvm_bindings::KVM_CAP_SPLIT_IRQCHIP, io_err(e))
            })?;
            return Ok(Arc::new(KvmVm {
                fd,
                vm_type,
                caps,
                // MSIs are routed by the in-kernel LAPICs, as before.
                irqchip: true,
                split_irqchip: true,
                supported_cpuid: self.supported_cpuid.clone(),
                sev: std::sync::Mutex::new(None),
            }));
        }
        // MSIs from assigned devices go through the in-kernel irqchip; a VM
        // without one still runs, it just cannot take device interrupts.
        let irqchip = match fd.create_irq_chip() {
            Ok(()) => true,
            Err(e) => {
                warn!("no in-kernel irqchip ({e}): device interrupts are unavailable");
                false
            }
        };
        Ok(Arc::new(KvmVm {
            fd,
            vm_type,
            caps,
            irqchip,
            split_irqchip: false,
            supported_cpuid: self.supported_cpuid.clone(),
            sev: std::sync::Mutex::new(None),
        }))
    }
}

pub struct KvmVm {
    fd: VmFd,
    vm_type: VmType,
    caps: Capabilities,
    irqchip: bool,
    /// The IOAPIC is the VMM's (TDX): the kernel has only the LAPICs.
    split_irqchip: bool,
    supported_cpuid: CpuId,
    /// `/dev/sev`, opened by the first SEV command.
    sev: std::sync::Mutex<Option<std::fs::File>>,
}

impl Vm for KvmVm {
    fn vm_type(&self) -> VmType {
        self.vm_type
    }

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    fn create_guest_memfd(&self, size: u64, flags: u64) -> Result<OwnedFd> {
        if !self.caps.guest_memfd {
            return Err(HypervisorError::GuestMemfdUnsupported);
        }
        let gmem = kvm_create_guest_memfd {
            size,
            flags,
            ..Default::default()
        };
        let fd =
            self.fd
                .create_guest_memfd(gmem)
                .map_err(|e| HypervisorError::CreateGuestMemfd {
                    size,
                    flags,
                    source: io_err(e),
                })?;
        // SAFETY: KVM just returned this fd to us and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> Result<()> {
        let err = |e: kvm_ioctls::Error| HypervisorError::SetUserMemoryRegion {
            slot: region.slot,
            gpa: region.guest_phys_addr,
            size: region.size,
            source: io_err(e),
        };
        match region.guest_memfd {
            Some((fd, offset)) => {
                let r = kvm_userspace_memory_region2 {
                    slot: region.slot,
                    flags: KVM_MEM_GUEST_MEMFD,
                    guest_phys_addr: region.guest_phys_addr,
                    memory_size: region.size,
                    userspace_addr: region.userspace_addr,
                    guest_memfd_offset: offset,
                    guest_memfd: fd.cast_unsigned(),
                    ..Default::default()
                };
                // SAFETY: the caller guarantees the host mapping outlives the slot.
                unsafe { self.fd.set_user_memory_region2(r) }.map_err(err)
            }
            None => {
                let r = kvm_userspace_memory_region {
                    slot: region.slot,
                    flags: 0,
                    guest_phys_addr: region.guest_phys_addr,
                    memory_size: region.size,
                    userspace_addr: region.userspace_addr,
                };
                // SAFETY: the caller guarantees the host mapping outlives the slot.
                unsafe { self.fd.set_user_memory_region(r) }.map_err(err)
            }
        }
    }

    fn supports_memory_attributes(&self) -> bool {
        self.caps.private_memory_attribute()
    }

    fn set_memory_attributes(&self, gpa: u64, size: u64, private: bool) -> Result<()> {
        if !self.supports_memory_attributes() {
            return Err(HypervisorError::MemoryAttributesUnsupported);
        }
        let attr = kvm_memory_attributes {
            address: gpa,
            size,
            attributes: if private {
                u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE)
            } else {
                0
            },
            flags: 0,
        };
        self.fd
            .set_memory_attributes(attr)
            .map_err(|e| HypervisorError::SetMemoryAttributes {
                gpa,
                size,
                source: io_err(e),
            })
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(id.into())
            .map_err(|e| HypervisorError::CreateVcpu(id, io_err(e)))?;
        // Long mode is only accepted in EFER when CPUID advertises it.
        fd.set_cpuid2(&self.supported_cpuid)
            .map_err(|e| HypervisorError::CreateVcpu(id, io_err(e)))?;
        // A TD's vCPUs start as the TDX module starts them (BSP and APs
        // alike at the reset vector); their run state is not the VMM's.
        if self.irqchip && !self.split_irqchip {
            // With an in-kernel LAPIC every vCPU but the first would wait for
            // an INIT/SIPI; the boot protocol starts all of them at the entry.
            let runnable = kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            };
            fd.set_mp_state(runnable)
                .map_err(|e| HypervisorError::CreateVcpu(id, io_err(e)))?;
        }
        Ok(Box::new(KvmVcpu {
            fd,
            td: self.vm_type == VmType::Tdx,
        }))
    }

    fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    fn has_split_irqchip(&self) -> bool {
        self.split_irqchip
    }

    fn create_pit(&self) -> Result<()> {
        if !self.irqchip {
            return Err(HypervisorError::NoIrqchip);
        }
        self.fd
            .create_pit2(kvm_bindings::kvm_pit_config::default())
            .map_err(|e| HypervisorError::CreatePit(io_err(e)))
    }

    fn supported_cpuid(&self) -> Vec<arch::CpuidEntry> {
        self.supported_cpuid.as_slice().to_vec()
    }

    fn sev_snp_command(&self, command: crate::SevSnpCommand<'_>) -> crate::sev_snp::SnpResult<()> {
        if self.vm_type != VmType::SevSnp {
            return Err(crate::SnpLaunchError::refused(
                command.name(),
                format!("a {} VM has no SEV-SNP launch", self.vm_type.name()),
            ));
        }
        let mut sev = self.sev.lock().unwrap_or_else(|p| p.into_inner());
        if sev.is_none() {
            *sev = Some(sev_snp::open_sev()?);
        }
        sev_snp::command(&self.fd, sev.as_ref().expect("opened above"), command)
    }

    fn tdx_capabilities(&self) -> crate::TdxResult<crate::TdxCapabilities> {
        self.expect_td("KVM_TDX_CAPABILITIES")?;
        tdx::capabilities(&self.fd)
    }

    fn tdx_init_vm(&self, params: &crate::TdxInitVm) -> crate::TdxResult<()> {
        self.expect_td("KVM_TDX_INIT_VM")?;
        tdx::init_vm(&self.fd, params)
    }

    fn tdx_finalize_vm(&self) -> crate::TdxResult<()> {
        self.expect_td("KVM_TDX_FINALIZE_VM")?;
        tdx::finalize_vm(&self.fd)
    }

    fn create_vfio_device(&self) -> Result<crate::KvmVfioDevice> {
        self.vfio_device()
    }

    fn set_msi_routes(&self, routes: &[MsiRoute]) -> Result<()> {
        self.msi_routes(routes)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.irqfd(fd, gsi, true)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.irqfd(fd, gsi, false)
    }

    fn tsc_khz(&self) -> Result<u32> {
        interrupts::tsc_khz(&self.fd)
    }

    fn set_tsc_khz(&self, khz: u32) -> Result<()> {
        interrupts::set_tsc_khz(&self.fd, khz)
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        self.msi(address, data)
    }
}

impl KvmVm {
    fn expect_td(&self, command: &'static str) -> crate::TdxResult<()> {
        if self.vm_type == VmType::Tdx {
            Ok(())
        } else {
            Err(crate::tdx::not_a_td(command, self.vm_type))
        }
    }
}

fn registers_error(e: kvm_ioctls::Error) -> HypervisorError {
    HypervisorError::Registers(io_err(e))
}

pub struct KvmVcpu {
    fd: VcpuFd,
    /// A TD's vCPU: TDX sub-commands go through it.
    td: bool,
}

impl Vcpu for KvmVcpu {
    fn get_regs(&self) -> Result<arch::StandardRegisters> {
        self.fd.get_regs().map_err(registers_error)
    }

    fn set_regs(&self, regs: &arch::StandardRegisters) -> Result<()> {
        self.fd.set_regs(regs).map_err(registers_error)
    }

    fn get_sregs(&self) -> Result<arch::SpecialRegisters> {
        self.fd.get_sregs().map_err(registers_error)
    }

    fn set_sregs(&self, sregs: &arch::SpecialRegisters) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(registers_error)
    }

    fn set_cpuid(&self, entries: &[arch::CpuidEntry]) -> Result<()> {
        let cpuid = CpuId::from_entries(entries).map_err(|_| {
            HypervisorError::SetCpuid(entries.len(), std::io::Error::other("too many entries"))
        })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| HypervisorError::SetCpuid(entries.len(), io_err(e)))
    }

    fn set_fpu(&self, fpu: &arch::FpuState) -> Result<()> {
        self.fd
            .set_fpu(fpu)
            .map_err(|e| HypervisorError::SetFpu(io_err(e)))
    }

    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let list = kvm_bindings::Msrs::from_entries(&entries).map_err(|_| {
            HypervisorError::SetMsrs(msrs.len(), std::io::Error::other("too many MSRs"))
        })?;
        let written = self
            .fd
            .set_msrs(&list)
            .map_err(|e| HypervisorError::SetMsrs(msrs.len(), io_err(e)))?;
        // KVM stops at the first MSR it refuses and says how many it took.
        if written != msrs.len() {
            return Err(HypervisorError::SetMsrs(
                msrs.len(),
                std::io::Error::other(format!("KVM refused MSR {:#x}", msrs[written].0)),
            ));
        }
        Ok(())
    }

    fn set_lapic_lints(&self) -> Result<()> {
        // LVT LINT0 (0x350) and LINT1 (0x360); delivery mode in bits 8..11.
        const LVT_LINT0: usize = 0x350;
        const LVT_LINT1: usize = 0x360;
        const DELIVERY_MODE: u32 = 0x700;
        const EXTINT: u32 = 0x700;
        const NMI: u32 = 0x400;
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| HypervisorError::SetLapic(io_err(e)))?;
        for (offset, mode) in [(LVT_LINT0, EXTINT), (LVT_LINT1, NMI)] {
            let mut bytes = [0u8; 4];
            for (b, r) in bytes.iter_mut().zip(&lapic.regs[offset..offset + 4]) {
                *b = (*r).cast_unsigned();
            }
            let value = (u32::from_le_bytes(bytes) & !DELIVERY_MODE) | mode;
            for (r, b) in lapic.regs[offset..offset + 4]
                .iter_mut()
                .zip(value.to_le_bytes())
            {
                *r = b.cast_signed();
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| HypervisorError::SetLapic(io_err(e)))
    }

    fn wait_for_startup_ipi(&self) -> Result<()> {
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
            })
            .map_err(|e| HypervisorError::SetMpState(io_err(e)))
    }

    fn tdx_init_vcpu(&self, rcx: u64) -> crate::TdxResult<()> {
        if !self.td {
            return Err(crate::TdxLaunchError::refused(
                "KVM_TDX_INIT_VCPU",
                "not a TD vCPU",
            ));
        }
        tdx::init_vcpu(&self.fd, rcx)
    }

    fn tdx_init_mem_region(&self, gpa: u64, source: &[u8], measure: bool) -> crate::TdxResult<()> {
        if !self.td {
            return Err(crate::TdxLaunchError::refused(
                "KVM_TDX_INIT_MEM_REGION",
                "not a TD vCPU",
            ));
        }
        tdx::init_mem_region(&self.fd, gpa, source, measure)
    }

    fn run(&mut self) -> Result<VmExit<'_>> {
        // The run structure, for the exits kvm-ioctls does not decode.
        let run_page: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(VmExit::Interrupted);
            }
            Err(e) => return Err(HypervisorError::Run(io_err(e))),
        };
        Ok(match exit {
            VcpuExit::IoOut(port, data) => VmExit::IoOut { port, data },
            VcpuExit::IoIn(port, data) => VmExit::IoIn { port, data },
            VcpuExit::MmioRead(addr, data) => VmExit::MmioRead { addr, data },
            VcpuExit::MmioWrite(addr, data) => VmExit::MmioWrite { addr, data },
            VcpuExit::Hlt => VmExit::Hlt,
            VcpuExit::Shutdown => VmExit::Shutdown,
            VcpuExit::Intr => VmExit::Interrupted,
            VcpuExit::Hypercall(call) if call.nr == KVM_HC_MAP_GPA_RANGE => {
                match decode_map_gpa_range(&call.args) {
                    Ok(conversion) => VmExit::MapGpaRange {
                        conversion,
                        reply: HypercallReply::new(call.ret),
                    },
                    Err(e) => {
                        warn!("rejecting MAP_GPA_RANGE: {e}");
                        *call.ret = HYPERCALL_EINVAL;
                        VmExit::BadHypercall { nr: call.nr }
                    }
                }
            }
            VcpuExit::Hypercall(call) => {
                *call.ret = HYPERCALL_EINVAL;
                VmExit::BadHypercall { nr: call.nr }
            }
            VcpuExit::MemoryFault { flags, gpa, size } => {
                match decode_memory_fault(flags, gpa, size) {
                    Ok(conversion) => VmExit::MemoryFault(conversion),
                    // Re-entering would fault again: the vCPU loop stops.
                    Err(e) => VmExit::Unhandled(e.to_string()),
                }
            }
            VcpuExit::SystemEvent(kind, _) => VmExit::SystemEvent(kind),
            // SAFETY: `run_page` is this vCPU's mapped run structure, alive
            // as long as `self.fd` (borrowed by the returned exit); this
            // exit holds no other reference into it.
            VcpuExit::Unsupported(KVM_EXIT_TDX) => tdvmcall::exit_in(unsafe { &mut *run_page }),
            VcpuExit::IoapicEoi(vector) => VmExit::IoapicEoi(vector),
            other => VmExit::Unhandled(format!("{other:?}")),
        })
    }
}

mod interrupts;
mod sev_snp;
mod tdx;

#[cfg(test)]
mod tests;
