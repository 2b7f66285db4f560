//! A VM that keeps KVM's per-page memory attributes itself, for tests on
//! hosts whose VM types have none (this project's CI machine): it wraps a
//! real VM (memory slots, guest_memfd and vCPUs stay real) and answers
//! `supports_memory_attributes` with true. Its `set_memory_attributes`
//! applies KVM's rules: page-aligned, non-empty, non-overflowing ranges;
//! every page starts shared (attribute 0); a refused call changes nothing.
//! Failures can be injected.
//!
//! `with_sev_snp` makes it an SEV-SNP VM as KVM would have one: its type
//! is `sev-snp`, its launch commands go to a security processor given by
//! the test (the VMM's simulated one), with KVM's own part of the launch
//! in front (updates only into private guest_memfd memory, the vCPUs'
//! registers turned into VMSAs at the finish, no register writes after
//! it). `with_tdx` makes it a TD the same way (`tdx.rs`).
//! `ConfidentialTestHypervisor` creates either over a real KVM (a TD over
//! a real VM with a split irqchip).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::sev_snp::{SevSnpCommand, SnpResult};
use crate::{
    Capabilities, HypervisorError, Result, SevSnpLauncher, SnpLaunchError, SnpVcpuState,
    UserMemoryRegion, Vcpu, Vm, VmType,
};

use ::arch::layout::PAGE_SIZE as PAGE;

#[derive(Default)]
struct Attributes {
    /// Private ranges, start -> end, disjoint and not touching.
    private: BTreeMap<u64, u64>,
    fail_next: u32,
    /// Calls that reached the attribute table (refused ones included).
    calls: u64,
}

impl Attributes {
    /// Whether every page of `gpa..gpa+size` is private.
    fn covers(&self, gpa: u64, size: u64) -> bool {
        self.private
            .range(..=gpa)
            .next_back()
            .is_some_and(|(_, &e)| e >= gpa.saturating_add(size))
    }

    fn set(&mut self, start: u64, end: u64, private: bool) {
        // Take out every range touching start..end, then put back what
        // lies outside it, plus the range itself when private.
        let touching: Vec<(u64, u64)> = self
            .private
            .range(..=end)
            .filter(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let (mut new_start, mut new_end) = (start, end);
        for (s, e) in touching {
            self.private.remove(&s);
            if private {
                new_start = new_start.min(s);
                new_end = new_end.max(e);
            } else {
                if s < start {
                    self.private.insert(s, start);
                }
                if e > end {
                    self.private.insert(end, e);
                }
            }
        }
        if private {
            self.private.insert(new_start, new_end);
        }
    }
}

/// A security processor behind a fake SEV-SNP VM.
pub type SnpFirmware = Box<dyn SevSnpLauncher + Send>;

/// KVM's side of an SEV-SNP launch, in front of the test's processor.
struct SnpModel {
    firmware: Mutex<SnpFirmware>,
    /// Every vCPU's registers as last set, by index: what KVM copies into
    /// its VMSA at the finish.
    states: Arc<Mutex<BTreeMap<u8, SnpVcpuState>>>,
    finished: Arc<AtomicBool>,
    /// vCPUs created and not yet dropped.
    live_vcpus: Arc<AtomicUsize>,
    /// guest_memfd-backed slots, as (gpa, size).
    gmem_slots: Mutex<Vec<(u64, u64)>>,
    capabilities: Capabilities,
}

pub struct AttributeTrackingVm {
    inner: Arc<dyn Vm>,
    attributes: Arc<Mutex<Attributes>>,
    snp: Option<SnpModel>,
    /// KVM's side of a TD (`with_tdx`), and the capabilities it reports.
    tdx: Option<(Arc<tdx::TdModel>, Capabilities)>,
}

impl AttributeTrackingVm {
    pub fn new(inner: Arc<dyn Vm>) -> Self {
        AttributeTrackingVm {
            inner,
            attributes: Arc::default(),
            snp: None,
            tdx: None,
        }
    }

    /// Makes this an SEV-SNP VM whose launch commands `firmware` answers.
    /// Its guest_memfd cannot be mmapped (the split layout), as on SNP
    /// hosts whose kernel keeps confidential guest_memfd unmappable.
    pub fn with_sev_snp(mut self, firmware: SnpFirmware) -> Self {
        let mut capabilities = self.inner.capabilities().clone();
        capabilities.guest_memfd_flags = 0;
        capabilities.memory_attributes = u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE);
        self.snp = Some(SnpModel {
            firmware: Mutex::new(firmware),
            states: Arc::default(),
            finished: Arc::default(),
            live_vcpus: Arc::default(),
            gmem_slots: Mutex::default(),
            capabilities,
        });
        self
    }

    /// vCPUs of this SEV-SNP VM or TD that exist (created, not dropped).
    pub fn live_vcpus(&self) -> usize {
        if let Some((td, _)) = &self.tdx {
            return td.live_vcpus();
        }
        self.snp
            .as_ref()
            .map_or(0, |s| s.live_vcpus.load(Ordering::SeqCst))
    }

    /// Whether `SNP_LAUNCH_FINISH` (or `KVM_TDX_FINALIZE_VM`) went through.
    pub fn launch_finished(&self) -> bool {
        if let Some((td, _)) = &self.tdx {
            return td.finalized();
        }
        self.snp
            .as_ref()
            .is_some_and(|s| s.finished.load(Ordering::SeqCst))
    }

    /// KVM's checks of an `SNP_LAUNCH_UPDATE` range: guest_memfd memory
    /// whose attributes say private (`kvm_gmem_populate`).
    fn check_update(&self, snp: &SnpModel, gpa: u64, len: u64) -> SnpResult<()> {
        let refuse = |why: &str| {
            Err(SnpLaunchError::refused(
                "SNP_LAUNCH_UPDATE",
                format!("{gpa:#x}+{len:#x} {why}"),
            ))
        };
        let Some(end) = gpa.checked_add(len) else {
            return refuse("wraps");
        };
        let slots = snp.gmem_slots.lock().unwrap();
        if !slots.iter().any(|&(s, size)| gpa >= s && end <= s + size) {
            return refuse("is not in one guest_memfd slot");
        }
        if !self.is_private(gpa, len) {
            return refuse("is not private");
        }
        Ok(())
    }

    /// Private ranges as (gpa, size), ascending and maximal.
    pub fn private_ranges(&self) -> Vec<(u64, u64)> {
        let a = self.attributes.lock().unwrap();
        a.private.iter().map(|(&s, &e)| (s, e - s)).collect()
    }

    /// Whether every page of `gpa..gpa+size` is private.
    pub fn is_private(&self, gpa: u64, size: u64) -> bool {
        self.attributes.lock().unwrap().covers(gpa, size)
    }

    /// The next `count` calls fail as KVM would on an allocation failure.
    pub fn fail_next_calls(&self, count: u32) {
        self.attributes.lock().unwrap().fail_next = count;
    }

    pub fn calls(&self) -> u64 {
        self.attributes.lock().unwrap().calls
    }
}

/// A vCPU of a fake SEV-SNP VM: records its registers for the VMSA and,
/// as KVM for a launched SNP guest, refuses register writes after the
/// finish (the state is the guest's now).
struct SnpVcpu {
    inner: Box<dyn Vcpu>,
    index: u8,
    states: Arc<Mutex<BTreeMap<u8, SnpVcpuState>>>,
    finished: Arc<AtomicBool>,
    live: Arc<AtomicUsize>,
}

impl SnpVcpu {
    fn record(&self, f: impl FnOnce(&mut SnpVcpuState)) -> Result<()> {
        if self.finished.load(Ordering::SeqCst) {
            return Err(HypervisorError::Registers(
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        f(self.states.lock().unwrap().entry(self.index).or_default());
        Ok(())
    }
}

impl Drop for SnpVcpu {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Vcpu for SnpVcpu {
    fn get_regs(&self) -> Result<crate::arch::StandardRegisters> {
        self.inner.get_regs()
    }
    fn set_regs(&self, regs: &crate::arch::StandardRegisters) -> Result<()> {
        self.record(|s| s.regs = *regs)?;
        self.inner.set_regs(regs)
    }
    fn get_sregs(&self) -> Result<crate::arch::SpecialRegisters> {
        self.inner.get_sregs()
    }
    fn set_sregs(&self, sregs: &crate::arch::SpecialRegisters) -> Result<()> {
        self.record(|s| s.sregs = *sregs)?;
        self.inner.set_sregs(sregs)
    }
    fn set_cpuid(&self, entries: &[crate::arch::CpuidEntry]) -> Result<()> {
        self.inner.set_cpuid(entries)
    }
    fn set_fpu(&self, fpu: &crate::arch::FpuState) -> Result<()> {
        self.inner.set_fpu(fpu)
    }
    fn set_msrs(&self, msrs: &[(u32, u64)]) -> Result<()> {
        self.inner.set_msrs(msrs)
    }
    fn set_lapic_lints(&self) -> Result<()> {
        self.inner.set_lapic_lints()
    }
    fn wait_for_startup_ipi(&self) -> Result<()> {
        self.inner.wait_for_startup_ipi()
    }
    fn run(&mut self) -> Result<crate::VmExit<'_>> {
        self.inner.run()
    }
}

impl Vm for AttributeTrackingVm {
    fn vm_type(&self) -> VmType {
        match (&self.snp, &self.tdx) {
            (Some(_), _) => VmType::SevSnp,
            (None, Some(_)) => VmType::Tdx,
            (None, None) => self.inner.vm_type(),
        }
    }

    fn capabilities(&self) -> &Capabilities {
        match (&self.snp, &self.tdx) {
            (Some(snp), _) => &snp.capabilities,
            (None, Some((_, capabilities))) => capabilities,
            (None, None) => self.inner.capabilities(),
        }
    }

    fn create_guest_memfd(&self, size: u64, flags: u64) -> Result<OwnedFd> {
        self.inner.create_guest_memfd(size, flags)
    }

    unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> Result<()> {
        // SAFETY: the caller's promise is passed on unchanged.
        unsafe { self.inner.set_user_memory_region(region) }?;
        if let (Some(snp), Some(_)) = (&self.snp, region.guest_memfd) {
            let mut slots = snp.gmem_slots.lock().unwrap();
            slots.retain(|&(gpa, _)| gpa != region.guest_phys_addr);
            if region.size != 0 {
                slots.push((region.guest_phys_addr, region.size));
            }
        }
        if let (Some((td, _)), Some(_)) = (&self.tdx, region.guest_memfd) {
            td.bind_slot(region.guest_phys_addr, region.size);
        }
        Ok(())
    }

    fn set_memory_attributes(&self, gpa: u64, size: u64, private: bool) -> Result<()> {
        let mut a = self.attributes.lock().unwrap();
        a.calls += 1;
        let refuse = |errno| {
            Err(HypervisorError::SetMemoryAttributes {
                gpa,
                size,
                source: std::io::Error::from_raw_os_error(errno),
            })
        };
        let Some(end) = gpa.checked_add(size) else {
            return refuse(libc::EINVAL);
        };
        if size == 0 || !gpa.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
            return refuse(libc::EINVAL);
        }
        if a.fail_next > 0 {
            a.fail_next -= 1;
            return refuse(libc::ENOMEM);
        }
        a.set(gpa, end, private);
        Ok(())
    }

    fn supports_memory_attributes(&self) -> bool {
        true
    }

    fn has_irqchip(&self) -> bool {
        self.inner.has_irqchip()
    }

    fn has_split_irqchip(&self) -> bool {
        self.inner.has_split_irqchip()
    }

    fn set_msi_routes(&self, routes: &[crate::MsiRoute]) -> Result<()> {
        self.inner.set_msi_routes(routes)
    }

    fn register_irqfd(&self, fd: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()> {
        self.inner.register_irqfd(fd, gsi)
    }

    fn unregister_irqfd(&self, fd: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()> {
        self.inner.unregister_irqfd(fd, gsi)
    }

    fn tsc_khz(&self) -> Result<u32> {
        match &self.tdx {
            Some((td, _)) => td.tsc_khz(self.inner.as_ref()),
            None => self.inner.tsc_khz(),
        }
    }

    fn set_tsc_khz(&self, khz: u32) -> Result<()> {
        match &self.tdx {
            Some((td, _)) => td.set_tsc_khz(khz),
            None => self.inner.set_tsc_khz(khz),
        }
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<()> {
        self.inner.signal_msi(address, data)
    }

    fn tdx_capabilities(&self) -> crate::TdxResult<crate::TdxCapabilities> {
        match &self.tdx {
            Some((td, _)) => td.capabilities(),
            None => self.inner.tdx_capabilities(),
        }
    }

    fn tdx_init_vm(&self, params: &crate::TdxInitVm) -> crate::TdxResult<()> {
        match &self.tdx {
            Some((td, _)) => td.init_vm(params),
            None => self.inner.tdx_init_vm(params),
        }
    }

    fn tdx_finalize_vm(&self) -> crate::TdxResult<()> {
        match &self.tdx {
            Some((td, _)) => td.finalize(),
            None => self.inner.tdx_finalize_vm(),
        }
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>> {
        if let Some((td, _)) = &self.tdx {
            return td.create_vcpu(self.inner.as_ref(), id);
        }
        let vcpu = self.inner.create_vcpu(id)?;
        let Some(snp) = &self.snp else {
            return Ok(vcpu);
        };
        snp.states
            .lock()
            .unwrap()
            .insert(id, SnpVcpuState::default());
        snp.live_vcpus.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(SnpVcpu {
            inner: vcpu,
            index: id,
            states: snp.states.clone(),
            finished: snp.finished.clone(),
            live: snp.live_vcpus.clone(),
        }))
    }

    fn supported_cpuid(&self) -> Vec<crate::arch::CpuidEntry> {
        self.inner.supported_cpuid()
    }

    fn create_pit(&self) -> Result<()> {
        self.inner.create_pit()
    }

    fn create_vfio_device(&self) -> Result<crate::KvmVfioDevice> {
        self.inner.create_vfio_device()
    }

    fn sev_snp_command(&self, command: SevSnpCommand<'_>) -> SnpResult<()> {
        let Some(snp) = &self.snp else {
            return self.inner.sev_snp_command(command);
        };
        let mut firmware = snp.firmware.lock().unwrap();
        match command {
            SevSnpCommand::Init2 { vmsa_features } => firmware.init(vmsa_features),
            SevSnpCommand::LaunchStart { policy } => firmware.launch_start(policy),
            SevSnpCommand::LaunchUpdate(update) => {
                self.check_update(snp, update.gpa, update.len)?;
                firmware.launch_update(update)
            }
            SevSnpCommand::LaunchFinish => {
                // KVM makes each vCPU's VMSA from its registers, in vCPU
                // order, then has the processor finish.
                for (index, state) in snp.states.lock().unwrap().iter() {
                    firmware.add_vcpu(*index, state)?;
                }
                firmware.launch_finish()?;
                snp.finished.store(true, Ordering::SeqCst);
                Ok(())
            }
        }
    }
}

mod tdx;
pub use tdx::TdxModule;
mod test_hypervisor;
pub use test_hypervisor::ConfidentialTestHypervisor;

#[cfg(test)]
mod tests;
