//! AMD SEV-SNP launch: the firmware's GUIDed table, the launch digest, the
//! initial vCPU state, and the launch sequence against KVM or a simulated
//! security processor. One job per file.

pub mod cpuid_page;
pub mod digest;
pub mod launch;
pub mod ovmf;
pub mod simulated_psp;
pub mod vmsa;

pub use launch::{LaunchError, Measurement, SnpParams, launch, measure};

use std::path::Path;

use hypervisor::Hypervisor;

use crate::config::PlatformConfig;

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("cannot read firmware {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("firmware {path} is not an OVMF image this VMM can launch")]
    Parse {
        path: String,
        #[source]
        source: ovmf::OvmfError,
    },
    #[error("cannot measure the launch of {path}")]
    Measure {
        path: String,
        #[source]
        source: LaunchError,
    },
    #[error("VM type sev-snp is not available on this host (it offers: {0}): no SEV-SNP here")]
    NoSevSnp(String),
    #[error(
        "this host has SEV-SNP, but booting firmware needs what OVMF's QEMU build expects of the platform (fw_cfg, the q35 host bridge, the PM timer), which this VMM does not have yet (docs/confidential-vms.md)"
    )]
    PlatformMissing,
    #[error("cannot use /dev/kvm")]
    Hypervisor(#[source] hypervisor::HypervisorError),
}

/// Reads and parses an OVMF image (a regular file within the flash window).
pub fn read_firmware(path: &Path) -> Result<ovmf::OvmfImage, FirmwareError> {
    let shown = path.display().to_string();
    let read_error = |source| FirmwareError::Read {
        path: shown.clone(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    if !meta.is_file() {
        return Err(read_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    if meta.len() > ovmf::MAX_FIRMWARE_SIZE as u64 {
        return Err(FirmwareError::Parse {
            path: shown,
            source: ovmf::OvmfError::TooLarge(meta.len() as usize),
        });
    }
    let data = std::fs::read(path).map_err(read_error)?;
    ovmf::OvmfImage::parse(data).map_err(|source| FirmwareError::Parse {
        path: shown,
        source,
    })
}

/// `--measure`: the launch digest of `firmware` for this VM, computed by
/// the real launch code against the simulated security processor, with
/// this host's vCPU signature. Needs no KVM.
pub fn measure_firmware(
    firmware: &Path,
    memory_size: u64,
    platform: &PlatformConfig,
    vcpus: u8,
) -> Result<Measurement, FirmwareError> {
    let image = read_firmware(firmware)?;
    let params = SnpParams {
        policy: platform.snp_policy,
        guest_features: platform.snp_guest_features,
        vcpus,
    };
    measure(&image, memory_size, &cpuid_page::host_minimal(), params).map_err(|source| {
        FirmwareError::Measure {
            path: firmware.display().to_string(),
            source,
        }
    })
}

/// A firmware boot without `--measure`: checked against the host before
/// anything is created.
pub fn boot_firmware(
    hypervisor: &dyn Hypervisor,
    firmware: &Path,
    memory_size: u64,
    platform: &PlatformConfig,
    vcpus: u8,
) -> Result<(), FirmwareError> {
    // The image and the launch plan are checked first: a bad image fails
    // the same way on every host.
    measure_firmware(firmware, memory_size, platform, vcpus)?;
    let caps = hypervisor.capabilities();
    if !caps.supports_vm_type(hypervisor::VmType::SevSnp) {
        return Err(FirmwareError::NoSevSnp(
            caps.supported_vm_types().join(", "),
        ));
    }
    Err(FirmwareError::PlatformMissing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_files_are_checked_before_parsing() {
        let platform = PlatformConfig::parse("sev_snp=on").unwrap();
        let err =
            measure_firmware(Path::new("/nonexistent.fd"), 512 << 20, &platform, 1).unwrap_err();
        assert!(crate::error_chain(&err).contains("cannot read firmware /nonexistent.fd"));
        let err = measure_firmware(Path::new("/proc"), 512 << 20, &platform, 1).unwrap_err();
        assert!(crate::error_chain(&err).contains("not a regular file"));
        let path = crate::test_util::scratch_path("not-ovmf.fd");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let err = measure_firmware(&path, 512 << 20, &platform, 1).unwrap_err();
        assert!(
            crate::error_chain(&err).contains("no OVMF GUIDed table"),
            "{err}"
        );
        let _ = std::fs::remove_file(&path);
    }

    /// This host has no SEV-SNP: a firmware boot stops before creating
    /// anything, naming the VM types the host has.
    #[test]
    fn without_sev_snp_a_firmware_boot_stops_clearly() {
        let Some(data) = ovmf::tests::debian_ovmf() else {
            return;
        };
        let Some(kvm) = crate::test_util::kvm() else {
            return;
        };
        let path = crate::test_util::scratch_path("boot-ovmf.fd");
        std::fs::write(&path, data).unwrap();
        let platform = PlatformConfig::parse("sev_snp=on").unwrap();
        let err = boot_firmware(&kvm, &path, 512 << 20, &platform, 2).unwrap_err();
        let _ = std::fs::remove_file(&path);
        if kvm
            .capabilities()
            .supports_vm_type(hypervisor::VmType::SevSnp)
        {
            assert!(matches!(err, FirmwareError::PlatformMissing));
        } else {
            assert!(err.to_string().contains("no SEV-SNP here"), "{err}");
        }
    }
}
