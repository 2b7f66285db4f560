//! The SEV-SNP launch of an OVMF image, against any `SevSnpLauncher`: KVM
//! (beside the simulated processor, `Mirrored`), or the simulated
//! processor alone (`measure`, which predicts the launch digest).
//!
//! The order is QEMU's, which attestation verifiers reproduce: the whole
//! firmware image as normal pages, then every SEV metadata section in the
//! image's order with its page type, then (at the finish) the vCPUs'
//! VMSAs in vCPU order.

use hypervisor::sev_snp::{SEV_FEATURE_SNP_ACTIVE, SNP_POLICY_DEFAULT};
use hypervisor::{CpuidEntry, SevSnpLauncher, SnpLaunchError, SnpPageType, SnpUpdate, Vcpu};

use super::cpuid_page::{self, CpuidPageError};
use super::ovmf::{OvmfImage, SectionKind};
use super::simulated_psp::{PrivateMemory, SimulatedPsp};
use super::vmsa;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnpParams {
    /// The guest policy of `SNP_LAUNCH_START`.
    pub policy: u64,
    /// SEV_FEATURES of every VMSA, SNP-active (bit 0) included.
    pub guest_features: u64,
    pub vcpus: u8,
}

impl Default for SnpParams {
    fn default() -> Self {
        SnpParams {
            policy: SNP_POLICY_DEFAULT,
            guest_features: SEV_FEATURE_SNP_ACTIVE,
            vcpus: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("guest features {0:#x} lack SNP-active (bit 0)")]
    NotSnpActive(u64),
    #[error("the firmware has no SEV metadata: not an SEV-SNP build of OVMF")]
    NoMetadata,
    #[error("the firmware has no SEV-ES reset block: its {0} APs would have nowhere to start")]
    NoResetBlock(u8),
    #[error("the CPUID has no leaf 1, so no vCPU signature")]
    NoSignature,
    #[error("cannot build the CPUID page")]
    CpuidPage(#[source] CpuidPageError),
    #[error("the SEV-SNP launch stopped")]
    Step(#[source] SnpLaunchError),
}

/// What a launch measured and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measurement {
    /// The launch digest, hex (the attestation report's MEASUREMENT).
    pub measurement: String,
    pub vcpu_signature: u32,
    pub guest_features: u64,
    pub policy: u64,
}

impl Measurement {
    /// `vm.info`'s `launch`: `--measure`'s fields and the policy.
    pub fn info(&self) -> serde_json::Value {
        serde_json::json!({
            "platform": "sev-snp",
            "measurement": self.measurement,
            "vcpu_signature": format!("{:#x}", self.vcpu_signature),
            "guest_features": format!("{:#x}", self.guest_features),
            "policy": format!("{:#x}", self.policy),
        })
    }

    /// The object `--measure` prints, on one line, keys in this order.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"platform\": \"sev-snp\", \"measurement\": \"{}\", \"vcpu_signature\": \"{:#x}\", \"guest_features\": \"{:#x}\"}}",
            self.measurement, self.vcpu_signature, self.guest_features
        )
    }
}

/// Runs the launch. `cpuid` is what every vCPU is given; its leaf 1 EAX is
/// the vCPU signature in each VMSA's RDX. Returns the vCPUs the backend
/// created (none for the simulation) and the signature.
pub fn launch(
    backend: &mut dyn SevSnpLauncher,
    firmware: &OvmfImage,
    cpuid: &[CpuidEntry],
    params: SnpParams,
) -> Result<(Vec<Box<dyn Vcpu>>, u32), LaunchError> {
    if params.guest_features & SEV_FEATURE_SNP_ACTIVE == 0 {
        return Err(LaunchError::NotSnpActive(params.guest_features));
    }
    if firmware.metadata_sections().is_empty() {
        return Err(LaunchError::NoMetadata);
    }
    let reset_block = match (firmware.reset_block(), params.vcpus) {
        (Some(block), _) => Some(block),
        (None, 1) => None,
        (None, n) => return Err(LaunchError::NoResetBlock(n - 1)),
    };
    let signature = cpuid_page::signature(cpuid).ok_or(LaunchError::NoSignature)?;
    let cpuid_page = cpuid_page::build(cpuid).map_err(LaunchError::CpuidPage)?;
    let step = LaunchError::Step;

    // KVM adds SNP-active to the VMSA features itself.
    backend
        .init(params.guest_features & !SEV_FEATURE_SNP_ACTIVE)
        .map_err(step)?;
    backend.launch_start(params.policy).map_err(step)?;
    let image = firmware.data();
    let image = SnpUpdate::new(
        firmware.gpa(),
        image.len() as u64,
        Some(image),
        SnpPageType::Normal,
    );
    backend.launch_update(image).map_err(step)?;
    let secrets = [0u8; arch::layout::PAGE_BYTES];
    for section in firmware.metadata_sections() {
        let (page_type, source): (SnpPageType, Option<&[u8]>) = match section.kind {
            // No kernel hashes are given (there is no -kernel with
            // firmware here), so their page is zero, as QEMU launches it.
            SectionKind::PrevalidatedZero
            | SectionKind::KernelHashes
            | SectionKind::SvsmCallingArea => (SnpPageType::Zero, None),
            SectionKind::Secrets => (
                SnpPageType::Secrets,
                Some(&secrets[..page_prefix(section.size)]),
            ),
            SectionKind::Cpuid => (
                SnpPageType::Cpuid,
                Some(&cpuid_page[..page_prefix(section.size)]),
            ),
        };
        backend
            .launch_update(SnpUpdate::new(section.gpa, section.size, source, page_type))
            .map_err(step)?;
    }
    let mut vcpus = Vec::new();
    for index in 0..params.vcpus {
        let state = match (index, reset_block) {
            (0, _) | (_, None) => vmsa::bsp_state(signature),
            (_, Some(block)) => vmsa::ap_state(block, signature),
        };
        if let Some(vcpu) = backend.add_vcpu(index, &state).map_err(step)? {
            vcpus.push(vcpu);
        }
    }
    backend.launch_finish().map_err(step)?;
    Ok((vcpus, signature))
}

/// The private guest_memfd memory an SNP VM of `ram_size` bytes has: its
/// RAM, and the firmware's flash range below 4 GiB.
pub fn private_memory(ram_size: u64, firmware: &OvmfImage) -> PrivateMemory {
    let mut ranges = crate::memory::ram_ranges(ram_size);
    ranges.push((firmware.gpa(), firmware.data().len() as u64));
    PrivateMemory(ranges)
}

/// Predicts the launch digest by running the launch against the simulated
/// processor: what KVM and the security processor would compute for the
/// same firmware, RAM, vCPUs and CPUID.
pub fn measure(
    firmware: &OvmfImage,
    ram_size: u64,
    cpuid: &[CpuidEntry],
    params: SnpParams,
) -> Result<Measurement, LaunchError> {
    let mut psp = SimulatedPsp::new(private_memory(ram_size, firmware));
    let (_, vcpu_signature) = launch(&mut psp, firmware, cpuid, params)?;
    Ok(Measurement {
        measurement: psp.digest().hex(),
        vcpu_signature,
        guest_features: psp.sev_features(),
        policy: psp.policy(),
    })
}

/// How much of a one-page source a metadata section of `size` bytes takes:
/// all of it, or the section's size when it is smaller.
fn page_prefix(size: u64) -> usize {
    usize::try_from(size).map_or(arch::layout::PAGE_BYTES, |size| {
        size.min(arch::layout::PAGE_BYTES)
    })
}

#[cfg(test)]
mod tests;
