//! The SEV-SNP launch inside the VM build: once RAM and the firmware
//! region exist (private guest_memfd), the launch runs against KVM with
//! the simulated processor in front (`Mirrored`), so a step the rules
//! refuse never reaches KVM and the digest of what KVM launched is known.
//! It returns the vCPUs KVM created, ready to run.

use std::sync::Arc;

use hypervisor::{Hypervisor, KvmSevSnpLauncher, Vcpu, Vm, VmType};

use super::launch::{Measurement, launch};
use super::ovmf::OvmfImage;
use super::simulated_psp::{Mirrored, PrivateMemory, SimulatedPsp};
use super::{FirmwareError, SnpParams, cpuid_page};
use crate::boot::cpuid::CpuFeature;
use crate::memory::MemoryManager;

/// A launched SEV-SNP guest: its vCPUs (in index order) and what the
/// launch measured.
pub struct Launched {
    pub vcpus: Vec<Box<dyn Vcpu>>,
    pub measurement: Measurement,
}

/// Launches `firmware` into `vm`, whose memory `memory` has set up
/// (RAM and the firmware region). `path` names the image in errors. The
/// CPUID page holds the CPUID the vCPUs get: KVM's, without `hidden`.
pub fn launch_vm(
    hypervisor: &dyn Hypervisor,
    vm: Arc<dyn Vm>,
    memory: &MemoryManager,
    firmware: &OvmfImage,
    path: &str,
    params: SnpParams,
    hidden: &[CpuFeature],
) -> Result<Launched, FirmwareError> {
    super::check_launch_target(&*vm, VmType::SevSnp, memory, firmware)?;
    let features = hypervisor
        .sev_snp_vmsa_features()
        .map_err(FirmwareError::VmsaFeatures)?;
    // The simulation checks against the memory this VM really has, not
    // against what `--measure` assumes it has.
    let cpuid = cpuid_page::for_launch(&vm.supported_cpuid(), params.vcpus, hidden);
    let simulated = SimulatedPsp::new(PrivateMemory(memory.guest_memfd_ranges()))
        .with_supported_vmsa_features(features);
    let mut backend = Mirrored {
        simulated,
        real: KvmSevSnpLauncher::new(vm),
    };
    // The CPUID page's contents are not measured and leaf 1 (the vCPU
    // signature) is the host's, so the digest is the one `--measure`
    // predicts from the host's leaves alone.
    let (vcpus, vcpu_signature) =
        launch(&mut backend, firmware, &cpuid, params).map_err(|source| FirmwareError::Launch {
            path: path.to_string(),
            source,
        })?;
    let simulated = &backend.simulated;
    Ok(Launched {
        vcpus,
        measurement: Measurement {
            measurement: simulated.digest().hex(),
            vcpu_signature,
            guest_features: simulated.sev_features(),
            policy: simulated.policy(),
        },
    })
}

#[cfg(test)]
mod tests;
