//! VFIO devices (vfio-ioctls), through the legacy type1 container
//! (`/dev/vfio/vfio` + the device's group) or through iommufd
//! (`/dev/iommu` + the device's cdev `/dev/vfio/devices/vfioN`, one IOAS
//! per device so every device's mappings follow its own listener). The DMA
//! mapping is what follows conversions; the device's regions and interrupts
//! serve the PCI function model (`pci::VfioOps`). Either way the group or
//! cdev joins the VM's KVM-VFIO device.
//!
//! Not exercised on this project's CI machine (no /dev/vfio, no
//! /dev/iommu): the rules the kernel applies to these calls are enforced by
//! `vm_device::fake_iommu` (DMA, with type1's entry limit or iommufd's
//! none) and by the fake function in `pci/src/tests.rs` (regions, irqs) in
//! the tests instead.

use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::path::Path;
use std::sync::Arc;

use iommufd_ioctls::IommuFd;
use log::info;
use pci::VfioOpsError;
use serde::Serialize;
use vfio_ioctls::{
    VfioContainer, VfioDevice, VfioDeviceFd, VfioIommufd, VfioOps, VfioRegionInfoCap,
};
use vm_device::ExternalDmaMapping;
use vmm_sys_util::eventfd::EventFd;

use super::guest_ram::GuestRam;

const DMA_ENTRY_LIMIT: &str = "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit";
const LEGACY_CONTAINER: &str = "/dev/vfio/vfio";
const IOMMUFD: &str = "/dev/iommu";

#[derive(Debug, thiserror::Error)]
pub enum VfioAttachError {
    #[error(
        "this host has no VFIO container ({LEGACY_CONTAINER}); on an iommufd host use iommufd=on"
    )]
    NoVfio,
    #[error("this host has no iommufd ({IOMMUFD}); use iommufd=off for the type1 container")]
    NoIommufd,
    #[error("cannot open the VFIO container")]
    Container(#[source] vfio_ioctls::VfioError),
    #[error("cannot open {IOMMUFD}")]
    Iommufd(#[source] std::io::Error),
    #[error("cannot allocate an IOAS")]
    Ioas(#[source] vfio_ioctls::VfioError),
    #[error("cannot open VFIO device {0}")]
    Device(String, #[source] vfio_ioctls::VfioError),
}

/// The type1 driver's default `dma_entry_limit`.
pub const DEFAULT_DMA_ENTRY_LIMIT: u64 = 65535;

/// The type1 IOMMU's limit on concurrent mappings: what the host says, or
/// the kernel's default where it cannot be read (never "unlimited").
pub fn dma_entry_limit() -> u64 {
    parse_entry_limit(std::fs::read_to_string(DMA_ENTRY_LIMIT).ok().as_deref())
}

fn parse_entry_limit(text: Option<&str>) -> u64 {
    text.and_then(|t| t.trim().parse().ok())
        .filter(|&n: &u64| n > 0)
        .unwrap_or(DEFAULT_DMA_ENTRY_LIMIT)
}

/// Which kernel interface maps a VFIO device's DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VfioBackend {
    /// The legacy type1 container; at most `dma_entry_limit` mappings.
    Type1,
    /// iommufd: no entry limit (pinned pages count against
    /// RLIMIT_MEMLOCK instead).
    Iommufd,
}

impl VfioBackend {
    /// Most mappings a device on this backend may hold at once.
    pub fn entry_limit(self) -> Option<u64> {
        match self {
            VfioBackend::Type1 => Some(dma_entry_limit()),
            VfioBackend::Iommufd => None,
        }
    }
}

pub struct VfioDma {
    /// The container or the iommufd IOAS: whichever maps this device's DMA.
    iommu: Arc<dyn VfioOps>,
    ram: Arc<GuestRam>,
    device: VfioDevice,
    region_maps: super::bar_maps::BarMaps,
}

impl VfioDma {
    /// Opens the device at `sysfs_path` on `backend`; its group or cdev
    /// joins `kvm_vfio`, the VM's KVM-VFIO device.
    pub fn open(
        sysfs_path: &Path,
        ram: Arc<GuestRam>,
        backend: VfioBackend,
        kvm_vfio: Arc<VfioDeviceFd>,
    ) -> Result<Self, VfioAttachError> {
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
                let iommufd = IommuFd::new()
                    .map_err(|e| VfioAttachError::Iommufd(std::io::Error::other(e)))?;
                Arc::new(
                    VfioIommufd::new(Arc::new(iommufd), None, Some(kvm_vfio))
                        .map_err(VfioAttachError::Ioas)?,
                )
            }
        };
        let device = VfioDevice::new(sysfs_path, iommu.clone(), backend == VfioBackend::Iommufd)
            .map_err(|e| VfioAttachError::Device(sysfs_path.display().to_string(), e))?;
        info!(
            "VFIO device {} attached through {backend:?}",
            sysfs_path.display()
        );
        Ok(VfioDma {
            iommu,
            ram,
            device,
            region_maps: Default::default(),
        })
    }

    /// The kernel refuses region accesses outside the region; vfio-ioctls
    /// only logs a failed access, so the bounds are checked here.
    fn check_access(&self, index: u32, offset: u64, len: usize) -> Result<(), VfioOpsError> {
        check_region_access(index, self.device.get_region_size(index), offset, len)
    }
}

/// Whether `offset..offset+len` lies inside region `index` of `size` bytes.
fn check_region_access(index: u32, size: u64, offset: u64, len: usize) -> Result<(), VfioOpsError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(VfioOpsError(format!(
            "region {index}: {offset:#x}+{len:#x} is outside its {size:#x} bytes"
        ))),
    }
}

impl pci::VfioOps for VfioDma {
    fn region_size(&self, index: u32) -> Result<u64, VfioOpsError> {
        Ok(self.device.get_region_size(index))
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError> {
        self.check_access(index, offset, data.len())?;
        self.device.region_read(index, data, offset);
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioOpsError> {
        self.check_access(index, offset, data.len())?;
        self.device.region_write(index, data, offset);
        Ok(())
    }

    fn irq_count(&self, index: u32) -> Result<u32, VfioOpsError> {
        Ok(self.device.get_irq_info(index).map_or(0, |irq| irq.count))
    }

    fn set_irq_eventfds(&self, index: u32, fds: &[RawFd]) -> Result<(), VfioOpsError> {
        if fds.is_empty() {
            return self
                .device
                .disable_irq(index)
                .map_err(|e| VfioOpsError(e.to_string()));
        }
        // SAFETY: the fds are eventfds owned by the caller's MSI vectors,
        // alive for this call; ManuallyDrop keeps these views from closing
        // them.
        let views: Vec<ManuallyDrop<EventFd>> = fds
            .iter()
            .map(|&fd| ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) }))
            .collect();
        let refs: Vec<&EventFd> = views.iter().map(|v| &**v).collect();
        self.device
            .enable_irq(index, refs)
            .map_err(|e| VfioOpsError(e.to_string()))
    }

    fn reset(&self) -> Result<(), VfioOpsError> {
        self.device.reset();
        Ok(())
    }

    /// The region's sparse-mmap areas (or the whole region when it is
    /// mmappable without that capability), from the device fd.
    fn map_region_areas(&self, index: u32) -> Result<Vec<pci::DirectArea>, VfioOpsError> {
        use std::os::fd::AsRawFd;
        let areas = mappable_areas(
            self.device.get_region_flags(index),
            self.device.get_region_size(index),
            &self.device.get_region_caps(index),
        );
        self.region_maps.map(
            self.device.as_raw_fd(),
            self.device.get_region_offset(index),
            &areas,
        )
    }
}

/// The (offset, size) areas of a region the VMM may mmap, from its flags
/// and capabilities: none unless the region is mmappable, its sparse-mmap
/// areas that are page-aligned, non-empty and inside it when it has that
/// capability, the whole region otherwise.
fn mappable_areas(flags: u32, size: u64, caps: &[VfioRegionInfoCap]) -> Vec<(u64, u64)> {
    const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
    if flags & REGION_INFO_FLAG_MMAP == 0 {
        return Vec::new();
    }
    caps.iter()
        .find_map(|cap| match cap {
            VfioRegionInfoCap::SparseMmap(sparse) => Some(
                sparse
                    .areas
                    .iter()
                    .filter(|a| {
                        a.offset.is_multiple_of(4096)
                            && a.size.is_multiple_of(4096)
                            && a.size > 0
                            && a.offset.checked_add(a.size).is_some_and(|e| e <= size)
                    })
                    .map(|a| (a.offset, a.size))
                    .collect(),
            ),
            _ => None,
        })
        .unwrap_or_else(|| vec![(0, size)])
}

impl ExternalDmaMapping for VfioDma {
    fn map(&self, iova: u64, gpa: u64, size: u64) -> std::io::Result<()> {
        let host = self
            .ram
            .host_address(gpa, size)
            .map_err(std::io::Error::other)?;
        // SAFETY: `host..host+size` is guest RAM mapped for the life of the
        // VM, which outlives this mapping; the VMM never holds Rust
        // references into guest RAM (it goes through vm-memory's volatile
        // accessors), and the range is unmapped before the RAM goes away.
        unsafe {
            self.iommu
                .vfio_dma_map(iova, size as usize, host as *mut u8)
        }
        .map_err(std::io::Error::other)
    }

    fn unmap(&self, iova: u64, size: u64) -> std::io::Result<()> {
        self.iommu
            .vfio_dma_unmap(iova, size as usize)
            .map_err(std::io::Error::other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_entry_limit_is_the_kernel_default() {
        assert_eq!(parse_entry_limit(None), 65535);
        assert_eq!(parse_entry_limit(Some("junk")), 65535);
        assert_eq!(parse_entry_limit(Some("0\n")), 65535);
        assert_eq!(parse_entry_limit(Some("1024\n")), 1024);
        // This machine has no VFIO: the default applies.
        assert_eq!(dma_entry_limit(), 65535);
    }

    #[test]
    fn only_aligned_areas_inside_an_mmappable_region_are_mapped() {
        use vfio_ioctls::{VfioRegionInfoCapSparseMmap, VfioRegionSparseMmapArea};
        const MMAP: u32 = 1 << 2;
        let size = 0x10000;
        let sparse = |areas: &[(u64, u64)]| {
            VfioRegionInfoCap::SparseMmap(VfioRegionInfoCapSparseMmap {
                areas: areas
                    .iter()
                    .map(|&(offset, size)| VfioRegionSparseMmapArea { offset, size })
                    .collect(),
            })
        };
        // Not mmappable: nothing, whatever the capabilities say.
        assert_eq!(mappable_areas(0b11, size, &[sparse(&[(0, 0x1000)])]), []);
        // Mmappable without sparse areas: the whole region.
        assert_eq!(mappable_areas(MMAP, size, &[]), [(0, size)]);
        assert_eq!(
            mappable_areas(MMAP | 0b11, size, &[VfioRegionInfoCap::MsixMappable]),
            [(0, size)]
        );
        // Sparse areas: the good ones only, even when other capabilities
        // come first.
        let areas = [
            (0, 0x1000),
            (0x2000, 0x2000),
            (0x4800, 0x1000),
            (0x6000, 0x800),
            (0x7000, 0),
            (0xf000, 0x1000),
            (0xf000, 0x2000),
            (u64::MAX - 0xfff, 0x1000),
        ];
        assert_eq!(
            mappable_areas(
                MMAP,
                size,
                &[VfioRegionInfoCap::MsixMappable, sparse(&areas)]
            ),
            [(0, 0x1000), (0x2000, 0x2000), (0xf000, 0x1000)]
        );
    }

    #[test]
    fn region_accesses_stay_inside_the_region() {
        assert!(check_region_access(0, 0x100, 0, 0x100).is_ok());
        assert!(check_region_access(0, 0x100, 0xfc, 4).is_ok());
        let e = check_region_access(2, 0x100, 0xfd, 4).unwrap_err();
        assert_eq!(e.0, "region 2: 0xfd+0x4 is outside its 0x100 bytes");
        assert!(check_region_access(0, 0x100, u64::MAX - 1, 4).is_err());
        assert!(check_region_access(0, 0, 0, 1).is_err());
    }
}
