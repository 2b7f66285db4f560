//! A fake TD over a real VM (`AttributeTrackingVm::with_tdx`): KVM's side
//! of the TDX launch in front of a TDX module the test gives (the VMM's
//! simulated one, or one that refuses on purpose). KVM's rules kept here:
//! the TSC frequency is the VM's and set before `KVM_TDX_INIT_VM` and
//! before any vCPU; vCPUs exist only after `KVM_TDX_INIT_VM`; a TD vCPU's
//! registers are never the VMM's, and its CPUID only until
//! `KVM_TDX_INIT_VCPU`; `KVM_TDX_INIT_MEM_REGION` only from an initialized
//! vCPU, into one private guest_memfd slot; a TD runs only once finalized.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::{AttributeTrackingVm, Attributes};
use crate::tdx::{TdxCapabilities, TdxInitVm, TdxLaunchError, TdxLauncher, TdxResult};
use crate::{HypervisorError, Result, Vcpu, Vm};

/// The TDX module behind a fake TD.
pub type TdxModule = Box<dyn TdxLauncher + Send>;

fn errno(e: i32) -> std::io::Error {
    std::io::Error::from_raw_os_error(e)
}

/// KVM's part of one TD, shared with its vCPUs.
pub(super) struct TdModel {
    module: Mutex<TdxModule>,
    attributes: Arc<Mutex<Attributes>>,
    /// guest_memfd-backed slots, as (gpa, size).
    gmem_slots: Mutex<Vec<(u64, u64)>>,
    /// The VM's TSC frequency, once set.
    tsc_khz: Mutex<Option<u32>>,
    /// The frequency `KVM_TDX_INIT_VM` saw.
    tsc_at_init: Mutex<Option<u32>>,
    initialized: AtomicBool,
    finalized: AtomicBool,
    created_vcpus: AtomicUsize,
    live_vcpus: Arc<AtomicUsize>,
}

impl TdModel {
    pub(super) fn live_vcpus(&self) -> usize {
        self.live_vcpus.load(Ordering::SeqCst)
    }

    pub(super) fn finalized(&self) -> bool {
        self.finalized.load(Ordering::SeqCst)
    }

    pub(super) fn bind_slot(&self, gpa: u64, size: u64) {
        let mut slots = self.gmem_slots.lock().unwrap();
        slots.retain(|&(g, _)| g != gpa);
        if size != 0 {
            slots.push((gpa, size));
        }
    }

    pub(super) fn tsc_khz(&self, inner: &dyn Vm) -> Result<u32> {
        match *self.tsc_khz.lock().unwrap() {
            Some(khz) => Ok(khz),
            None => inner.tsc_khz(),
        }
    }

    /// KVM takes the VM's frequency only while no vCPU exists (EINVAL
    /// after, measured on Linux 6.18); a TD reads it at `KVM_TDX_INIT_VM`,
    /// so a later one would not take effect (the model refuses it too
    /// rather than ignore it).
    pub(super) fn set_tsc_khz(&self, khz: u32) -> Result<()> {
        if self.created_vcpus.load(Ordering::SeqCst) > 0 || self.initialized.load(Ordering::SeqCst)
        {
            return Err(HypervisorError::SetTscKhz(khz, errno(libc::EINVAL)));
        }
        if khz == 0 {
            return Err(HypervisorError::SetTscKhz(khz, errno(libc::EINVAL)));
        }
        *self.tsc_khz.lock().unwrap() = Some(khz);
        Ok(())
    }

    pub(super) fn capabilities(&self) -> TdxResult<TdxCapabilities> {
        self.module.lock().unwrap().capabilities()
    }

    pub(super) fn init_vm(&self, params: &TdxInitVm) -> TdxResult<()> {
        if self.created_vcpus.load(Ordering::SeqCst) > 0 {
            return Err(TdxLaunchError::refused(
                "KVM_TDX_INIT_VM",
                "vCPUs exist already",
            ));
        }
        self.module.lock().unwrap().init_vm(params)?;
        *self.tsc_at_init.lock().unwrap() = *self.tsc_khz.lock().unwrap();
        self.initialized.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub(super) fn finalize(&self) -> TdxResult<()> {
        self.module.lock().unwrap().finalize()?;
        self.finalized.store(true, Ordering::SeqCst);
        Ok(())
    }

    pub(super) fn create_vcpu(self: &Arc<Self>, inner: &dyn Vm, id: u8) -> Result<Box<dyn Vcpu>> {
        // KVM creates a TD's vCPUs only after KVM_TDX_INIT_VM.
        if !self.initialized.load(Ordering::SeqCst) {
            return Err(HypervisorError::CreateVcpu(id, errno(libc::EIO)));
        }
        let vcpu = inner.create_vcpu(id)?;
        self.created_vcpus.fetch_add(1, Ordering::SeqCst);
        self.live_vcpus.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(TdVcpu {
            inner: vcpu,
            index: id,
            td: self.clone(),
            initialized: AtomicBool::new(false),
        }))
    }

    /// KVM's checks of `KVM_TDX_INIT_MEM_REGION`: one guest_memfd slot,
    /// private attributes (`kvm_gmem_populate`).
    fn check_region(&self, gpa: u64, len: u64) -> TdxResult<()> {
        const CMD: &str = "KVM_TDX_INIT_MEM_REGION";
        let Some(end) = gpa.checked_add(len) else {
            return Err(TdxLaunchError::refused(
                CMD,
                format!("{gpa:#x}+{len:#x} wraps"),
            ));
        };
        let slots = self.gmem_slots.lock().unwrap();
        if !slots.iter().any(|&(s, size)| gpa >= s && end <= s + size) {
            return Err(TdxLaunchError::refused(
                CMD,
                format!("{gpa:#x}+{len:#x} is not in one guest_memfd slot"),
            ));
        }
        if !self.attributes.lock().unwrap().covers(gpa, len) {
            return Err(TdxLaunchError::refused(
                CMD,
                format!("{gpa:#x}+{len:#x} is not private"),
            ));
        }
        Ok(())
    }
}

/// A TD's vCPU: its state is the TDX module's.
struct TdVcpu {
    inner: Box<dyn Vcpu>,
    index: u8,
    td: Arc<TdModel>,
    /// `KVM_TDX_INIT_VCPU` went through.
    initialized: AtomicBool,
}

impl Drop for TdVcpu {
    fn drop(&mut self) {
        self.td.live_vcpus.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Vcpu for TdVcpu {
    fn get_regs(&self) -> Result<crate::arch::StandardRegisters> {
        Err(HypervisorError::ProtectedState)
    }
    fn set_regs(&self, _: &crate::arch::StandardRegisters) -> Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn get_sregs(&self) -> Result<crate::arch::SpecialRegisters> {
        Err(HypervisorError::ProtectedState)
    }
    fn set_sregs(&self, _: &crate::arch::SpecialRegisters) -> Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    /// KVM's copy of CPUID is set before `KVM_TDX_INIT_VCPU` (KVM checks
    /// x2APIC in it there); the guest's CPUID is what INIT_VM configured.
    fn set_cpuid(&self, entries: &[crate::arch::CpuidEntry]) -> Result<()> {
        if self.initialized.load(Ordering::SeqCst) {
            return Err(HypervisorError::ProtectedState);
        }
        self.inner.set_cpuid(entries)
    }
    fn set_fpu(&self, _: &crate::arch::FpuState) -> Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn set_msrs(&self, _: &[(u32, u64)]) -> Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn set_lapic_lints(&self) -> Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn wait_for_startup_ipi(&self) -> Result<()> {
        Err(HypervisorError::ProtectedState)
    }
    fn run(&mut self) -> Result<crate::VmExit<'_>> {
        if !self.td.finalized() {
            return Err(HypervisorError::Run(errno(libc::EIO)));
        }
        self.inner.run()
    }
    fn tdx_init_vcpu(&self, rcx: u64) -> TdxResult<()> {
        if self.initialized.load(Ordering::SeqCst) {
            return Err(TdxLaunchError::refused(
                "KVM_TDX_INIT_VCPU",
                format!("vCPU {} is initialized already", self.index),
            ));
        }
        // The module's stand-in vCPU is not the one that runs: this is.
        self.td.module.lock().unwrap().init_vcpu(self.index, rcx)?;
        self.initialized.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn tdx_init_mem_region(&self, gpa: u64, source: &[u8], measure: bool) -> TdxResult<()> {
        if !self.initialized.load(Ordering::SeqCst) {
            return Err(TdxLaunchError::refused(
                "KVM_TDX_INIT_MEM_REGION",
                "the vCPU is not initialized",
            ));
        }
        self.td.check_region(gpa, source.len() as u64)?;
        self.td
            .module
            .lock()
            .unwrap()
            .init_mem_region(gpa, source, measure)
    }
}

impl AttributeTrackingVm {
    /// Makes this a TD whose launch commands `module` answers. Its
    /// guest_memfd cannot be mmapped (the split layout), as on TDX hosts.
    pub fn with_tdx(mut self, module: TdxModule) -> Self {
        let mut capabilities = self.inner.capabilities().clone();
        capabilities.guest_memfd_flags = 0;
        capabilities.memory_attributes = u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE);
        let td = TdModel {
            module: Mutex::new(module),
            attributes: self.attributes.clone(),
            gmem_slots: Mutex::default(),
            tsc_khz: Mutex::default(),
            tsc_at_init: Mutex::default(),
            initialized: AtomicBool::new(false),
            finalized: AtomicBool::new(false),
            created_vcpus: AtomicUsize::new(0),
            live_vcpus: Arc::default(),
        };
        self.tdx = Some((Arc::new(td), capabilities));
        self
    }

    /// The TSC frequency `KVM_TDX_INIT_VM` took (a TD's, for its life).
    pub fn tdx_tsc_khz_at_init(&self) -> Option<u32> {
        self.tdx
            .as_ref()
            .and_then(|(td, _)| *td.tsc_at_init.lock().unwrap())
    }
}
