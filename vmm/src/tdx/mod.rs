//! Intel TDX launch: the TDVF metadata of an OVMF image, MRTD, the TD
//! HOB, the launch sequence against KVM or a simulated TDX module, and the
//! userspace IOAPIC of the split irqchip a TD needs. One job per file.

pub mod boot;
pub mod hob;
pub mod ioapic;
pub mod launch;
pub mod mrtd;
pub mod simulated_module;
pub mod split_irqchip;
pub mod tdvf;

pub use launch::{LaunchError, Measurement, TdxParams, launch, measure};

use std::path::Path;

use crate::sev_snp::{FirmwareError as ImageError, LaunchTargetError, read_firmware};

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
    #[error(transparent)]
    Target(#[from] LaunchTargetError),
    #[error("cannot set the TD's TSC frequency")]
    Tsc(#[source] hypervisor::HypervisorError),
    #[error("the host's TSC runs at {0} kHz, outside what a TD can have (100 MHz to 10 GHz)")]
    TscOutOfRange(u32),
    #[error("the TDX launch of {path} failed")]
    Launch {
        path: String,
        #[source]
        source: LaunchError,
    },
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
}
