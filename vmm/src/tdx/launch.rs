//! The TDX launch of a TDVF image, against any `TdxLauncher`: KVM (beside
//! the simulated module, `Mirrored`), or the simulated module alone
//! (`measure`, which predicts MRTD).
//!
//! The order is upstream KVM's with QEMU driving it, which attestation
//! verifiers reproduce: `KVM_TDX_INIT_VM`, every vCPU's
//! `KVM_TDX_INIT_VCPU` (RCX = the TD HOB's address), then one
//! `KVM_TDX_INIT_MEM_REGION` per TDVF section in the descriptor's order
//! (measured where the section has MR.EXTEND; PAGE.AUG sections are not
//! added), then `KVM_TDX_FINALIZE_VM`. Within a region KVM adds the pages
//! in ascending GPA order, each page's 16 TDH.MR.EXTENDs right after its
//! TDH.MEM.PAGE.ADD.

use hypervisor::tdx::{TD_ATTR_SEPT_VE_DISABLE, XFAM_FIXED1};
use hypervisor::{CpuidEntry, TdxCapabilities, TdxInitVm, TdxLaunchError, TdxLauncher, Vcpu};

use super::hob::{self, HobError};
use super::simulated_module::{PrivateMemory, SimulatedTdxModule};
use super::tdvf::{SectionType, TdvfError, TdvfMetadata};
use crate::sev_snp::ovmf::OvmfImage;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TdxParams {
    pub vcpus: u8,
}

impl Default for TdxParams {
    fn default() -> Self {
        TdxParams { vcpus: 1 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("the firmware is not a TDX build of OVMF (TDVF)")]
    Metadata(#[source] TdvfError),
    #[error("a TD needs at least one vCPU")]
    NoVcpus,
    #[error(
        "TDVF section {index} ({kind:?}, {gpa:#x}+{size:#x}) lies outside the guest's RAM and the firmware's range: give more memory"
    )]
    SectionOutsideMemory {
        index: usize,
        kind: SectionType,
        gpa: u64,
        size: u64,
    },
    #[error("the host's TDX XFAM {0:#x} lacks x87 and SSE")]
    Xfam(u64),
    #[error("cannot build the TD HOB")]
    Hob(#[source] HobError),
    #[error("the TDX launch stopped")]
    Step(#[source] TdxLaunchError),
}

/// What a launch measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    /// MRTD, hex (the TD report's and quote's MRTD).
    pub mrtd: String,
    pub attributes: u64,
    pub xfam: u64,
}

impl Measurement {
    /// `vm.info`'s `launch` of a TD: what `--measure` prints, and the TD
    /// attributes and XFAM `KVM_TDX_INIT_VM` fixed (both in the TD report).
    pub fn info(&self) -> serde_json::Value {
        serde_json::json!({
            "platform": "tdx",
            "measurement": self.mrtd,
            "attributes": format!("{:#x}", self.attributes),
            "xfam": format!("{:#x}", self.xfam),
        })
    }

    /// The object `--measure` prints, on one line, keys in this order.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"platform\": \"tdx\", \"measurement\": \"{}\"}}",
            self.mrtd
        )
    }
}

/// The XSAVE components the vCPUs' CPUID enumerates (leaf 0xd, user
/// states in sub-leaf 0, supervisor states in sub-leaf 1).
fn cpuid_xfam(cpuid: &[CpuidEntry]) -> u64 {
    let leaf = |index: u32| cpuid.iter().find(|e| e.function == 0xd && e.index == index);
    let user = leaf(0).map_or(0, |e| u64::from(e.eax) | u64::from(e.edx) << 32);
    let supervisor = leaf(1).map_or(0, |e| u64::from(e.ecx) | u64::from(e.edx) << 32);
    user | supervisor | XFAM_FIXED1
}

/// `KVM_TDX_INIT_VM`'s parameters from what the host offers: SEPT_VE_DISABLE
/// where offered (Linux guests need it), never DEBUG; the XSAVE states both
/// the module and the vCPUs' CPUID have; the configurable CPUID bits of
/// `cpuid`.
pub fn init_vm_params(
    caps: &TdxCapabilities,
    cpuid: &[CpuidEntry],
) -> Result<TdxInitVm, LaunchError> {
    if caps.supported_xfam & XFAM_FIXED1 != XFAM_FIXED1 {
        return Err(LaunchError::Xfam(caps.supported_xfam));
    }
    let configured = caps
        .configurable_cpuid
        .iter()
        .filter_map(|mask| {
            let e = cpuid
                .iter()
                .find(|e| e.function == mask.function && e.index == mask.index)?;
            Some(CpuidEntry {
                function: e.function,
                index: e.index,
                flags: mask.flags,
                eax: e.eax & mask.eax,
                ebx: e.ebx & mask.ebx,
                ecx: e.ecx & mask.ecx,
                edx: e.edx & mask.edx,
                ..Default::default()
            })
        })
        .collect();
    Ok(TdxInitVm {
        attributes: caps.supported_attributes & TD_ATTR_SEPT_VE_DISABLE,
        xfam: caps.supported_xfam & cpuid_xfam(cpuid),
        cpuid: configured,
    })
}

/// The private guest_memfd memory a TD of `ram_size` bytes has: its RAM,
/// and the firmware's range below 4 GiB.
pub fn private_memory(ram_size: u64, firmware: &OvmfImage) -> PrivateMemory {
    let mut ranges = crate::memory::ram_ranges(ram_size);
    ranges.push((firmware.gpa(), firmware.data().len() as u64));
    PrivateMemory(ranges)
}

/// Runs the launch. Returns the vCPUs the backend handed over and what
/// `KVM_TDX_INIT_VM` was given.
pub fn launch(
    backend: &mut dyn TdxLauncher,
    firmware: &OvmfImage,
    ram_size: u64,
    cpuid: &[CpuidEntry],
    params: TdxParams,
) -> Result<(Vec<Box<dyn Vcpu>>, TdxInitVm), LaunchError> {
    let metadata = TdvfMetadata::parse(firmware).map_err(LaunchError::Metadata)?;
    if params.vcpus == 0 {
        return Err(LaunchError::NoVcpus);
    }
    // Every section must land in memory the TD has: checked here so a
    // small --memory is named as the reason, not a refused step.
    let memory = private_memory(ram_size, firmware);
    for (index, s) in metadata.sections.iter().enumerate() {
        if !memory.contains(s.memory_address, s.memory_size) {
            return Err(LaunchError::SectionOutsideMemory {
                index,
                kind: s.kind,
                gpa: s.memory_address,
                size: s.memory_size,
            });
        }
    }
    let td_hob = hob::for_launch(&metadata, ram_size, firmware).map_err(LaunchError::Hob)?;
    let step = LaunchError::Step;

    let caps = backend.capabilities().map_err(step)?;
    let init = init_vm_params(&caps, cpuid)?;
    backend.init_vm(&init).map_err(step)?;
    let hob_gpa = metadata.td_hob().map_or(0, |s| s.memory_address);
    let mut vcpus = Vec::new();
    for index in 0..params.vcpus {
        if let Some(vcpu) = backend.init_vcpu(index, hob_gpa).map_err(step)? {
            vcpus.push(vcpu);
        }
    }
    for section in &metadata.sections {
        // PAGE.AUG memory is added later, when the guest accepts it.
        if section.page_aug() {
            continue;
        }
        let contents = match (section.kind, &td_hob) {
            (SectionType::TdHob, Some(hob)) => hob.clone(),
            _ => TdvfMetadata::initial_contents(section, firmware.data()),
        };
        backend
            .init_mem_region(section.memory_address, &contents, section.mr_extend())
            .map_err(step)?;
    }
    backend.finalize().map_err(step)?;
    Ok((vcpus, init))
}

/// Predicts MRTD by running the launch against the simulated module: what
/// the TDX module would compute for the same firmware and RAM.
pub fn measure(
    firmware: &OvmfImage,
    ram_size: u64,
    cpuid: &[CpuidEntry],
    params: TdxParams,
) -> Result<Measurement, LaunchError> {
    let mut module = SimulatedTdxModule::new(private_memory(ram_size, firmware));
    let (_, init) = launch(&mut module, firmware, ram_size, cpuid, params)?;
    Ok(Measurement {
        mrtd: module.mrtd().hex(),
        attributes: init.attributes,
        xfam: init.xfam,
    })
}

#[cfg(test)]
mod tests;
