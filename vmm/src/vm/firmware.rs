//! A firmware boot in the VM build: which confidential platform launches
//! the OVMF image (SEV-SNP or TDX), the image read and its launch plan
//! checked before anything is created, and the launch itself once the
//! memory exists.

use std::sync::Arc;

use hypervisor::Hypervisor;
use log::info;

use super::{LaunchMeasurement, VmError};
use crate::boot;
use crate::config::VmConfig;
use crate::memory::MemoryManager;
use crate::sev_snp::ovmf::OvmfImage;

/// The confidential platform a firmware boot launches on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirmwarePlatform {
    SevSnp,
    Tdx,
}

impl FirmwarePlatform {
    /// As users know it.
    pub fn name(self) -> &'static str {
        match self {
            FirmwarePlatform::SevSnp => "SEV-SNP",
            FirmwarePlatform::Tdx => "TDX",
        }
    }
}

impl std::fmt::Display for FirmwarePlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An OVMF image to launch, the platform that launches it, and the file
/// it came from.
pub(super) struct Firmware {
    pub platform: FirmwarePlatform,
    pub image: OvmfImage,
    pub path: String,
}

impl std::fmt::Display for Firmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} firmware {} at 0xfffffff0", self.platform, self.path)
    }
}

/// Reads the image of `config.firmware` and checks its launch plan (the
/// real launch code against the simulation): a bad image fails the same
/// way on every host, before any VM exists.
pub(super) fn read(config: &VmConfig, path: &std::path::Path) -> Result<Firmware, VmError> {
    let shown = path.display().to_string();
    let platform = &config.platform;
    if platform.tdx {
        let image = crate::sev_snp::read_firmware(path)
            .map_err(|e| VmError::TdxFirmware(crate::tdx::FirmwareError::Image(e)))?;
        crate::tdx::measure(
            &image,
            config.memory.size,
            &crate::sev_snp::cpuid_page::host_minimal(),
            crate::tdx::TdxParams {
                vcpus: config.cpus.boot,
            },
        )
        .map_err(|source| {
            VmError::TdxFirmware(crate::tdx::FirmwareError::Measure {
                path: shown.clone(),
                source,
            })
        })?;
        return Ok(Firmware {
            platform: FirmwarePlatform::Tdx,
            image,
            path: shown,
        });
    }
    let image = crate::sev_snp::read_firmware(path).map_err(VmError::Firmware)?;
    if !platform.sev_snp {
        return Err(VmError::FirmwareNeedsPlatform);
    }
    crate::sev_snp::measure(
        &image,
        config.memory.size,
        &crate::sev_snp::cpuid_page::host_minimal(),
        crate::sev_snp::params(platform, config.cpus.boot),
    )
    .map_err(|source| {
        VmError::Firmware(crate::sev_snp::FirmwareError::Measure {
            path: shown.clone(),
            source,
        })
    })?;
    Ok(Firmware {
        platform: FirmwarePlatform::SevSnp,
        image,
        path: shown,
    })
}

/// The error of a firmware boot on a host without its VM type.
pub(super) fn unavailable(
    platform: FirmwarePlatform,
    vm_type: hypervisor::VmType,
    offered: String,
) -> VmError {
    let why = crate::sev_snp::LaunchTargetError::Unavailable {
        vm_type,
        offered,
        platform: platform.name(),
    };
    match platform {
        FirmwarePlatform::SevSnp => VmError::Firmware(why.into()),
        FirmwarePlatform::Tdx => VmError::TdxFirmware(why.into()),
    }
}

/// Launches the firmware into `hv_vm` (whose memory is set up): the vCPUs,
/// ready to run, and what the launch measured.
pub(super) fn launch(
    config: &VmConfig,
    hypervisor: &dyn Hypervisor,
    hv_vm: &Arc<dyn hypervisor::Vm>,
    memory: &MemoryManager,
    firmware: &Firmware,
) -> Result<(Vec<Box<dyn hypervisor::Vcpu>>, LaunchMeasurement), VmError> {
    let count = config.cpus.boot;
    let supported_cpuid = hv_vm.supported_cpuid();
    match firmware.platform {
        FirmwarePlatform::SevSnp => {
            let launched = crate::sev_snp::boot::launch_vm(
                hypervisor,
                hv_vm.clone(),
                memory,
                &firmware.image,
                &firmware.path,
                crate::sev_snp::params(&config.platform, count),
                &config.cpus.hidden,
            )
            .map_err(VmError::Firmware)?;
            // CPUID is not launch state: KVM takes it until a vCPU first
            // runs.
            for (index, vcpu) in (0..).zip(&launched.vcpus) {
                let cpuid =
                    boot::cpuid::for_vcpu(&supported_cpuid, index, count, &config.cpus.hidden);
                vcpu.set_cpuid(&cpuid)
                    .map_err(|e| VmError::Cpuid(index, e))?;
            }
            info!(
                "SEV-SNP launch finished: measurement {}",
                launched.measurement.measurement
            );
            Ok((
                launched.vcpus,
                LaunchMeasurement::SevSnp(launched.measurement),
            ))
        }
        FirmwarePlatform::Tdx => {
            // A TD's CPUID is fixed at KVM_TDX_INIT_VM, for every vCPU
            // (the module virtualizes the topology leaves itself); a TD
            // vCPU's CPUID cannot be set afterwards.
            let cpuid = boot::cpuid::for_vcpu(&supported_cpuid, 0, count, &config.cpus.hidden);
            let launched = crate::tdx::boot::launch_vm(
                hv_vm.clone(),
                memory,
                &firmware.image,
                &firmware.path,
                &cpuid,
                crate::tdx::TdxParams { vcpus: count },
            )
            .map_err(VmError::TdxFirmware)?;
            info!(
                "TDX launch finalized: MRTD {}, TSC {} kHz",
                launched.measurement.mrtd, launched.tsc_khz
            );
            Ok((launched.vcpus, LaunchMeasurement::Tdx(launched.measurement)))
        }
    }
}
