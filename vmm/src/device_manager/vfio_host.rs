//! What only a VFIO host runs: opening the type1 container
//! (`/dev/vfio/vfio` and the device's group) or an iommufd IOAS
//! (`/dev/iommu` and the device's cdev `/dev/vfio/devices/vfioN`, one IOAS
//! per device so every device's mappings follow its own listener), opening
//! the device on it, and vfio-ioctls' `VfioDevice` as the
//! `VfioDeviceAccess` that `VfioDma` drives. Either way the group or cdev
//! joins the VM's KVM-VFIO device.
//!
//! Every method here is one call into vfio-ioctls and holds no decision of
//! its own: the decisions (bounds, mmappable areas, interrupt hand-over,
//! DMA addresses) are in `vfio.rs`, tested against a fake device and a fake
//! IOMMU that keep the kernel's rules. This project's CI machine has
//! neither /dev/vfio nor /dev/iommu, so only the missing-node checks here
//! run in its tests (see docs/testing.md).

use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use iommufd_ioctls::IommuFd;
use log::info;
use pci::VfioOpsError;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioIommufd, VfioOps};
use vmm_sys_util::eventfd::EventFd;

use super::vfio::{OpenedVfio, RegionInfo, VfioAttachError, VfioBackend, VfioDeviceAccess};

pub const LEGACY_CONTAINER: &str = "/dev/vfio/vfio";
pub const IOMMUFD: &str = "/dev/iommu";

/// Opens the device at `sysfs_path` on `backend`; its group or cdev joins
/// `kvm_vfio`, the VM's KVM-VFIO device.
pub fn open(
    sysfs_path: &Path,
    backend: VfioBackend,
    kvm_vfio: Arc<VfioDeviceFd>,
) -> Result<OpenedVfio, VfioAttachError> {
    let iommu: Arc<dyn VfioOps> = match backend {
        VfioBackend::Type1 => {
            if !Path::new(LEGACY_CONTAINER).exists() {
                return Err(VfioAttachError::NoVfio);
            }
            Arc::new(VfioContainer::new(Some(kvm_vfio)).map_err(VfioAttachError::Container)?)
        }
        VfioBackend::Iommufd => {
            if !Path::new(IOMMUFD).exists() {
                return Err(VfioAttachError::NoIommufd);
            }
            let iommufd = IommuFd::new().map_err(VfioAttachError::Iommufd)?;
            Arc::new(
                VfioIommufd::new(Arc::new(iommufd), None, Some(kvm_vfio))
                    .map_err(VfioAttachError::Ioas)?,
            )
        }
    };
    let use_cdev = matches!(backend, VfioBackend::Iommufd);
    let device = VfioDevice::new(sysfs_path, iommu.clone(), use_cdev)
        .map_err(|e| VfioAttachError::Device(sysfs_path.display().to_string(), e))?;
    info!(
        "VFIO device {} attached through {backend:?}",
        sysfs_path.display()
    );
    Ok(OpenedVfio {
        iommu,
        device: Box::new(device),
    })
}

impl VfioDeviceAccess for VfioDevice {
    fn region(&self, index: u32) -> RegionInfo {
        RegionInfo {
            flags: self.get_region_flags(index),
            size: self.get_region_size(index),
            offset: self.get_region_offset(index),
            caps: self.get_region_caps(index),
        }
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        self.region_read(index, data, offset);
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        self.region_write(index, data, offset);
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.get_irq_info(index).map_or(0, |irq| irq.count)
    }

    fn enable_irq(&self, index: u32, fds: Vec<&EventFd>) -> Result<(), VfioOpsError> {
        VfioDevice::enable_irq(self, index, fds).map_err(VfioOpsError::new)
    }

    fn disable_irq(&self, index: u32) -> Result<(), VfioOpsError> {
        VfioDevice::disable_irq(self, index).map_err(VfioOpsError::new)
    }

    fn reset(&self) {
        VfioDevice::reset(self);
    }

    fn mmap_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
}
