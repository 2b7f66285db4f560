//! Intel TDX launch: the TDVF metadata of an OVMF image, MRTD, the TD
//! HOB, the launch sequence against KVM or a simulated TDX module, and the
//! userspace IOAPIC of the split irqchip a TD needs. One job per file.

pub mod hob;
pub mod ioapic;
pub mod launch;
pub mod mrtd;
pub mod simulated_module;
pub mod tdvf;

pub use launch::{LaunchError, Measurement, TdxParams, launch, measure};

use std::path::Path;

use hypervisor::Hypervisor;

use crate::sev_snp::{FirmwareError as ImageError, read_firmware};

#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error(transparent)]
    Image(ImageError),
    #[error("cannot measure the TDX launch of {path}")]
    Measure {
        path: String,
        #[source]
        source: LaunchError,
    },
    #[error("VM type tdx is not available on this host (it offers: {0}): no TDX here")]
    NoTdx(String),
    #[error(
        "this host has TDX, but booting TDVF needs what OVMF's QEMU build expects of the platform (fw_cfg, the q35 host bridge, the PM timer), which this VMM does not have yet (docs/confidential-vms.md)"
    )]
    PlatformMissing,
}

/// `--measure`: MRTD of `firmware` for this VM, computed by the real
/// launch code against the simulated TDX module. Needs no KVM.
pub fn measure_firmware(
    firmware: &Path,
    memory_size: u64,
    vcpus: u8,
) -> Result<Measurement, FirmwareError> {
    let image = read_firmware(firmware).map_err(FirmwareError::Image)?;
    let cpuid = crate::sev_snp::cpuid_page::host_minimal();
    measure(&image, memory_size, &cpuid, TdxParams { vcpus }).map_err(|source| {
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
    vcpus: u8,
) -> Result<(), FirmwareError> {
    // The image and the launch plan are checked first: a bad image fails
    // the same way on every host.
    measure_firmware(firmware, memory_size, vcpus)?;
    let caps = hypervisor.capabilities();
    if !caps.supports_vm_type(hypervisor::VmType::Tdx) {
        return Err(FirmwareError::NoTdx(caps.supported_vm_types().join(", ")));
    }
    Err(FirmwareError::PlatformMissing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firmware_files_are_checked_before_parsing() {
        let err = measure_firmware(Path::new("/nonexistent.fd"), 512 << 20, 1).unwrap_err();
        assert!(crate::error_chain(&err).contains("cannot read firmware /nonexistent.fd"));
        let path = crate::test_util::scratch_path("tdx-not-ovmf.fd");
        std::fs::write(
            &path,
            crate::sev_snp::ovmf::tests::synthetic_image(8192, &[], None),
        )
        .unwrap();
        let err = measure_firmware(&path, 512 << 20, 1).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(
            crate::error_chain(&err).contains("not a TDX build of OVMF"),
            "{err}"
        );
    }

    /// This host has no TDX: a firmware boot stops before creating
    /// anything, naming the VM types the host has.
    #[test]
    fn without_tdx_a_firmware_boot_stops_clearly() {
        let Some(data) = crate::sev_snp::ovmf::tests::debian_ovmf() else {
            return;
        };
        let Some(kvm) = crate::test_util::kvm() else {
            return;
        };
        let path = crate::test_util::scratch_path("tdx-boot-ovmf.fd");
        std::fs::write(&path, data).unwrap();
        let err = boot_firmware(&kvm, &path, 512 << 20, 2).unwrap_err();
        let _ = std::fs::remove_file(&path);
        if kvm.capabilities().supports_vm_type(hypervisor::VmType::Tdx) {
            assert!(matches!(err, FirmwareError::PlatformMissing));
        } else {
            assert!(err.to_string().contains("no TDX here"), "{err}");
        }
    }
}
