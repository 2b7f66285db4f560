//! AMD SEV-SNP launch: the firmware's GUIDed table, the launch digest, the
//! initial vCPU state, and the launch sequence against KVM or a simulated
//! security processor. One job per file.

pub mod boot;
pub mod cpuid_page;
pub mod digest;
pub mod launch;
pub mod ovmf;
pub mod simulated_psp;
pub mod vmsa;

pub use launch::{LaunchError, Measurement, SnpParams, launch, measure};

use std::path::Path;

use hypervisor::{Vm, VmType};

use crate::config::PlatformConfig;
use crate::memory::MemoryManager;

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
    #[error(transparent)]
    Target(#[from] LaunchTargetError),
    #[error("cannot read the VMSA features this host supports")]
    VmsaFeatures(#[source] hypervisor::SnpLaunchError),
    #[error("the SEV-SNP launch of {path} failed")]
    Launch {
        path: String,
        #[source]
        source: LaunchError,
    },
}

/// Why a VM cannot take a firmware launch (SEV-SNP's or TDX's).
#[derive(Debug, thiserror::Error)]
pub enum LaunchTargetError {
    /// This host's KVM cannot create VMs of the launch's type.
    #[error("VM type {} is not available on this host (it offers: {offered}): no {platform} here", .vm_type.name())]
    Unavailable {
        vm_type: VmType,
        offered: String,
        /// The launch's platform, as users know it ("SEV-SNP").
        platform: &'static str,
    },
    #[error("the VM is of type {actual}, not {expected}")]
    WrongVmType {
        actual: &'static str,
        expected: &'static str,
    },
    #[error("the firmware region is not where the image goes ({gpa:#x}+{size:#x})")]
    NoFirmwareRegion { gpa: u64, size: u64 },
}

/// Checks that `vm` is of type `vm_type` and that `memory` has its
/// firmware region (guest_memfd, made by `MemoryManager::with_firmware`)
/// exactly where `firmware` goes.
pub fn check_launch_target(
    vm: &dyn Vm,
    vm_type: VmType,
    memory: &MemoryManager,
    firmware: &ovmf::OvmfImage,
) -> Result<(), LaunchTargetError> {
    if vm.vm_type() != vm_type {
        return Err(LaunchTargetError::WrongVmType {
            actual: vm.vm_type().name(),
            expected: vm_type.name(),
        });
    }
    let (gpa, size) = (firmware.gpa(), firmware.data().len() as u64);
    if memory.firmware().map(|f| (f.gpa, f.size)) != Some((gpa, size)) {
        return Err(LaunchTargetError::NoFirmwareRegion { gpa, size });
    }
    Ok(())
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
            source: ovmf::OvmfError::TooLarge(::arch::usize_from(meta.len())),
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
    measure(
        &image,
        memory_size,
        &cpuid_page::host_minimal(),
        params(platform, vcpus),
    )
    .map_err(|source| FirmwareError::Measure {
        path: firmware.display().to_string(),
        source,
    })
}

/// The launch parameters of `platform` for `vcpus` vCPUs.
pub fn params(platform: &PlatformConfig, vcpus: u8) -> SnpParams {
    SnpParams {
        policy: platform.snp_policy,
        guest_features: platform.snp_guest_features,
        vcpus,
    }
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

    /// The flash window is the limit: one byte more is refused before the
    /// file is read, exactly the window's size is parsed.
    #[test]
    fn a_firmware_file_may_fill_the_flash_window_and_no_more() {
        let path = crate::test_util::scratch_path("big-ovmf.fd");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(ovmf::MAX_FIRMWARE_SIZE as u64 + 1).unwrap();
        let err = read_firmware(&path).unwrap_err();
        assert!(
            matches!(err, FirmwareError::Parse { source: ovmf::OvmfError::TooLarge(n), .. } if n == ovmf::MAX_FIRMWARE_SIZE + 1),
            "{err:?}"
        );
        file.set_len(ovmf::MAX_FIRMWARE_SIZE as u64).unwrap();
        let err = read_firmware(&path).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(
            crate::error_chain(&err).contains("no OVMF GUIDed table"),
            "{err}"
        );
    }
}
