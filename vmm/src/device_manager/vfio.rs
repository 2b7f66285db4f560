//! VFIO devices: what the VMM decides for them, over a narrow seam to the
//! kernel. `VfioDma` maps a device's DMA as conversions say (through
//! vfio-ioctls' `VfioOps`: the type1 container or an iommufd IOAS) and
//! serves the PCI function model (`pci::VfioOps`) from the device's regions
//! and interrupts (`VfioDeviceAccess`). Opening those on a host, and
//! vfio-ioctls' `VfioDevice` behind the seam, are in `vfio_host.rs`.
//!
//! This project's CI machine has no /dev/vfio and no /dev/iommu: the tests
//! here drive `VfioDma` through a fake device and a fake IOMMU that keep
//! the kernel's rules (`fake_vfio.rs`, `vm_device::fake_iommu`).

use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::sync::Arc;

use pci::VfioOpsError;
use serde::Serialize;
use vfio_ioctls::{VfioOps, VfioRegionInfoCap};
use vm_device::{DmaBatch, DmaError, DmaOp, ExternalDmaMapping};
use vmm_sys_util::eventfd::EventFd;

use super::guest_ram::GuestRam;
use super::vfio_host::{IOMMUFD, LEGACY_CONTAINER};

const DMA_ENTRY_LIMIT: &str = "/sys/module/vfio_iommu_type1/parameters/dma_entry_limit";

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
    Iommufd(#[source] iommufd_ioctls::IommufdError),
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

/// One region of a VFIO device, as VFIO_DEVICE_GET_REGION_INFO tells it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub flags: u32,
    /// 0 when the device has no such region.
    pub size: u64,
    /// Where the region starts in the device fd (for pread, pwrite, mmap).
    pub offset: u64,
    pub caps: Vec<VfioRegionInfoCap>,
}

/// What `VfioDma` asks of an open VFIO device: vfio-ioctls' `VfioDevice`
/// on a VFIO host (`vfio_host.rs`), a fake that keeps the kernel's rules in
/// the tests.
pub trait VfioDeviceAccess: Send + Sync {
    fn region(&self, index: u32) -> RegionInfo;
    /// Reads region `index` at `offset`. Like vfio-ioctls, an access the
    /// kernel refuses is only logged: callers check the bounds first.
    fn read(&self, index: u32, offset: u64, data: &mut [u8]);
    fn write(&self, index: u32, offset: u64, data: &[u8]);
    /// How many interrupts irq index `index` has (0 when it has none).
    fn irq_count(&self, index: u32) -> u32;
    /// Vectors 0.. of irq index `index` signal `fds` (VFIO_DEVICE_SET_IRQS);
    /// the kernel takes its own references to them.
    fn enable_irq(&self, index: u32, fds: Vec<&EventFd>) -> Result<(), VfioOpsError>;
    fn disable_irq(&self, index: u32) -> Result<(), VfioOpsError>;
    fn reset(&self);
    /// The fd whose region offsets mmap the device's regions.
    fn mmap_fd(&self) -> RawFd;
}

/// A device as opened on the host: what maps its DMA, and the device.
pub struct OpenedVfio {
    /// The container or the iommufd IOAS: whichever maps this device's DMA.
    pub iommu: Arc<dyn VfioOps>,
    pub device: Box<dyn VfioDeviceAccess>,
}

pub struct VfioDma {
    iommu: Arc<dyn VfioOps>,
    ram: Arc<GuestRam>,
    device: Box<dyn VfioDeviceAccess>,
    region_maps: super::bar_maps::BarMaps,
}

impl VfioDma {
    pub fn new(opened: OpenedVfio, ram: Arc<GuestRam>) -> Self {
        VfioDma {
            iommu: opened.iommu,
            ram,
            device: opened.device,
            region_maps: Default::default(),
        }
    }

    /// The kernel refuses region accesses outside the region; vfio-ioctls
    /// only logs a failed access, so the bounds are checked here.
    fn check_access(&self, index: u32, offset: u64, len: usize) -> Result<(), VfioOpsError> {
        check_region_access(index, self.device.region(index).size, offset, len)
    }
}

/// Whether `offset..offset+len` lies inside region `index` of `size` bytes.
fn check_region_access(index: u32, size: u64, offset: u64, len: usize) -> Result<(), VfioOpsError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(VfioOpsError::new(OutsideRegion {
            index,
            offset,
            len,
            size,
        })),
    }
}

/// A region access the kernel would refuse.
#[derive(Debug, thiserror::Error)]
#[error("region {index}: {offset:#x}+{len:#x} is outside its {size:#x} bytes")]
struct OutsideRegion {
    index: u32,
    offset: u64,
    len: usize,
    size: u64,
}

impl pci::VfioOps for VfioDma {
    fn region_size(&self, index: u32) -> Result<u64, VfioOpsError> {
        Ok(self.device.region(index).size)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError> {
        self.check_access(index, offset, data.len())?;
        self.device.read(index, offset, data);
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioOpsError> {
        self.check_access(index, offset, data.len())?;
        self.device.write(index, offset, data);
        Ok(())
    }

    fn irq_count(&self, index: u32) -> Result<u32, VfioOpsError> {
        Ok(self.device.irq_count(index))
    }

    fn set_irq_eventfds(&self, index: u32, fds: &[RawFd]) -> Result<(), VfioOpsError> {
        if fds.is_empty() {
            return self.device.disable_irq(index);
        }
        // SAFETY: the fds are eventfds owned by the caller's MSI vectors,
        // alive for this call; ManuallyDrop keeps these views from closing
        // them.
        let views: Vec<ManuallyDrop<EventFd>> = fds
            .iter()
            .map(|&fd| ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) }))
            .collect();
        let refs: Vec<&EventFd> = views.iter().map(|v| &**v).collect();
        self.device.enable_irq(index, refs)
    }

    fn reset(&self) -> Result<(), VfioOpsError> {
        self.device.reset();
        Ok(())
    }

    /// The region's sparse-mmap areas (or the whole region when it is
    /// mmappable without that capability), mapped from the device fd.
    fn map_region_areas(&self, index: u32) -> Result<Vec<pci::DirectArea>, VfioOpsError> {
        let region = self.device.region(index);
        let areas = mappable_areas(region.flags, region.size, &region.caps);
        self.region_maps
            .map(self.device.mmap_fd(), region.offset, &areas)
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

/// The kernel's refusals: a type1 container or an IOAS has no connection
/// that could break, so every failure is a refusal.
impl ExternalDmaMapping for VfioDma {
    fn map(&self, iova: u64, gpa: u64, size: u64) -> Result<(), DmaError> {
        let host = self
            .ram
            .host_address(gpa, size)
            .map_err(DmaError::refused)?;
        // SAFETY: `host..host+size` is guest RAM mapped for the life of the
        // VM, which outlives this mapping; the VMM never holds Rust
        // references into guest RAM (it goes through vm-memory's volatile
        // accessors), and the range is unmapped before the RAM goes away.
        unsafe {
            self.iommu
                .vfio_dma_map(iova, arch::usize_from(size), host as *mut u8)
        }
        .map_err(DmaError::refused)
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaError> {
        self.iommu
            .vfio_dma_unmap(iova, arch::usize_from(size))
            .map_err(DmaError::refused)
    }

    /// Maps one by one (a map ioctl takes one range, type1's and iommufd's
    /// alike), but unmaps of back-to-back mappings go as one ioctl: both
    /// kernel interfaces unmap every mapping wholly inside the range given.
    /// Should that call fail, its unmaps are retried one by one, so each
    /// gets its own result.
    fn start_batch(&self, ops: &[DmaOp]) -> DmaBatch<'_> {
        let mut results = Vec::with_capacity(ops.len());
        let mut at = 0;
        while at < ops.len() {
            let DmaOp::Unmap { iova, size } = ops[at] else {
                results.push(self.apply(ops[at]));
                at += 1;
                continue;
            };
            let mut end = iova + size;
            let mut run = 1;
            while let Some(&DmaOp::Unmap { iova: next, size }) = ops.get(at + run)
                && next == end
            {
                end += size;
                run += 1;
            }
            if run > 1 && self.unmap(iova, end - iova).is_ok() {
                results.extend((0..run).map(|_| Ok(())));
            } else {
                results.extend(ops[at..at + run].iter().map(|&op| self.apply(op)));
            }
            at += run;
        }
        DmaBatch::Done(results)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use hypervisor::{Hypervisor, VmType};

    use super::*;
    use crate::device_manager::fake_vfio::{self, FakeContainer, FakeVfioDevice};
    use crate::memory::{MemoryLayout, MemoryManager};
    use pci::VfioOps as _;

    /// A `VfioDma` over `device` and a fake container, the RAM it maps
    /// (64 MiB of guest_memfd RAM in a KVM VM) and the memory manager that
    /// keeps that RAM mapped while the test runs.
    struct Setup {
        dma: VfioDma,
        container: Arc<FakeContainer>,
        ram: Arc<GuestRam>,
        _memory: MemoryManager,
    }

    fn vfio_dma(device: &Arc<FakeVfioDevice>, limit: Option<u64>) -> Option<Setup> {
        let vm = crate::test_util::kvm()?.create_vm(VmType::Default).unwrap();
        let memory = MemoryManager::new(vm, 64 << 20, MemoryLayout::Auto).unwrap();
        let ram = Arc::new(GuestRam::new(&memory));
        let container = FakeContainer::new(limit);
        let dma = VfioDma::new(fake_vfio::opened(device, &container), ram.clone());
        Some(Setup {
            dma,
            container,
            ram,
            _memory: memory,
        })
    }

    #[test]
    fn unmaps_of_back_to_back_mappings_go_as_one_ioctl() {
        use std::sync::atomic::Ordering;
        let device = FakeVfioDevice::pci_function();
        let Some(Setup { dma, container, .. }) = vfio_dma(&device, None) else {
            return;
        };
        let page = |i: u64| 0x20_0000 + i * 0x1000;
        // Pages 0-7 and 10-11, each its own mapping (`mapping=pages`),
        // and page 20, which the batch leaves alone.
        for i in (0..8).chain(10..12).chain([20]) {
            dma.map(page(i), page(i), 0x1000).unwrap();
        }
        let unmaps: Vec<DmaOp> = (0..8)
            .chain(10..12)
            .map(|i| DmaOp::Unmap {
                iova: page(i),
                size: 0x1000,
            })
            .collect();
        let results = dma.start_batch(&unmaps).finish();
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(results.len(), 10);
        assert_eq!(
            container.mappings().len(),
            1,
            "only what the batch named is unmapped"
        );
        assert_eq!(
            container.unmap_calls.load(Ordering::Relaxed),
            2,
            "one ioctl per back-to-back run"
        );
        // A lone unmap is one ioctl, even refused: never tried twice.
        let lone = [DmaOp::Unmap {
            iova: page(20),
            size: 0x800,
        }];
        let results = dma.start_batch(&lone).finish();
        assert!(results[0].is_err(), "an unaligned unmap is refused");
        assert_eq!(container.unmap_calls.load(Ordering::Relaxed), 3);
        // Maps in a batch stay one ioctl each, with a result each.
        let ops = [
            DmaOp::Map {
                iova: page(0),
                gpa: page(0),
                size: 0x1000,
            },
            DmaOp::Map {
                iova: 64 << 20,
                gpa: 64 << 20,
                size: 0x1000,
            },
        ];
        let results = dma.start_batch(&ops).finish();
        assert!(results[0].is_ok() && results[1].is_err(), "{results:?}");
    }

    #[test]
    fn dma_maps_the_ram_behind_the_guest_address_and_unmaps_by_iova() {
        let device = FakeVfioDevice::pci_function();
        let Some(Setup {
            dma,
            container,
            ram,
            _memory,
        }) = vfio_dma(&device, Some(2))
        else {
            return;
        };
        dma.map(0x20_0000, 0x20_0000, 0x3000).unwrap();
        dma.map(0x40_0000, 0x40_0000, 0x1000).unwrap();
        assert_eq!(
            container.mappings(),
            [
                (
                    0x20_0000,
                    0x3000,
                    ram.host_address(0x20_0000, 0x3000).unwrap()
                ),
                (
                    0x40_0000,
                    0x1000,
                    ram.host_address(0x40_0000, 0x1000).unwrap()
                ),
            ]
        );
        // Not RAM: refused before the IOMMU sees it.
        assert!(dma.map(64 << 20, 64 << 20, 0x1000).is_err());
        // The IOMMU's refusals reach the caller: the entry limit, a cut.
        let full = dma.map(0x80_0000, 0x80_0000, 0x1000).unwrap_err();
        assert!(full.to_string().contains("No space left"), "{full}");
        assert!(dma.unmap(0x20_0000, 0x1000).is_err());
        assert_eq!(container.mappings().len(), 2);
        dma.unmap(0x20_0000, 0x3000).unwrap();
        assert_eq!(
            container.mappings(),
            [(
                0x40_0000,
                0x1000,
                ram.host_address(0x40_0000, 0x1000).unwrap()
            )]
        );
        container.iommu.fail_next_unmaps(1);
        assert!(dma.unmap(0x40_0000, 0x1000).is_err());
        dma.unmap(0x40_0000, 0x1000).unwrap();
        assert!(container.mappings().is_empty());
        assert_eq!(container.iommu.violations(), 2);
    }

    #[test]
    fn region_accesses_reach_the_device_inside_the_region_only() {
        let device = FakeVfioDevice::pci_function();
        let Some(Setup { dma, _memory, .. }) = vfio_dma(&device, None) else {
            return;
        };
        assert_eq!(dma.region_size(0).unwrap(), 0x4000);
        assert_eq!(dma.region_size(7).unwrap(), 256);
        assert_eq!(dma.region_size(5).unwrap(), 0);
        assert_eq!(dma.region_size(9).unwrap(), 0);
        let mut id = [0u8; 4];
        dma.region_read(7, 0, &mut id).unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x5678_1234);
        dma.region_write(0, 0x3ffc, &[1, 2, 3, 4]).unwrap();
        assert_eq!(device.peek(0, 0x3ffc, 4), [1, 2, 3, 4]);
        device.poke(2, 0x10, &[9, 8]);
        let mut two = [0u8; 2];
        dma.region_read(2, 0x10, &mut two).unwrap();
        assert_eq!(two, [9, 8]);
        // Outside a region, or a region the device lacks: refused here,
        // never sent to the kernel (which would fail it without telling).
        assert!(dma.region_read(7, 0xfe, &mut id).is_err());
        assert!(dma.region_write(0, 0x4000, &[0]).is_err());
        assert!(dma.region_read(5, 0, &mut id).is_err());
        assert_eq!(device.violations(), Vec::<String>::new());
        assert_eq!(device.peek(0, 0x3ffc, 4), [1, 2, 3, 4]);
    }

    #[test]
    fn interrupts_are_handed_over_as_eventfds_the_caller_keeps() {
        let device = FakeVfioDevice::new(vec![RegionInfo::default(); 3], &[(2, 2)]);
        let Some(Setup { dma, _memory, .. }) = vfio_dma(&device, None) else {
            return;
        };
        assert_eq!(dma.irq_count(2).unwrap(), 2);
        assert_eq!(dma.irq_count(0).unwrap(), 0);
        let vectors = [EventFd::new(0).unwrap(), EventFd::new(0).unwrap()];
        let fds: Vec<RawFd> = vectors.iter().map(|v| v.as_raw_fd()).collect();
        dma.set_irq_eventfds(2, &fds).unwrap();
        assert!(device.fire(2, 1));
        assert_eq!(vectors[1].read().unwrap(), 1);
        // The caller's eventfds are still its own after the hand-over.
        vectors[0].write(5).unwrap();
        assert_eq!(vectors[0].read().unwrap(), 5);
        assert!(device.fire(2, 0));
        assert_eq!(vectors[0].read().unwrap(), 1);
        // More vectors than the device has: the kernel's refusal reaches
        // the caller.
        let three = [fds[0], fds[1], fds[0]];
        let e = dma.set_irq_eventfds(2, &three).unwrap_err();
        assert!(e.to_string().contains("3 vectors"), "{e}");
        // None: disabled.
        dma.set_irq_eventfds(2, &[]).unwrap();
        assert!(!device.fire(2, 0));
        assert!(dma.set_irq_eventfds(0, &[]).is_err());
        assert_eq!(device.violations().len(), 2);
    }

    #[test]
    fn reset_reaches_the_device() {
        let device = FakeVfioDevice::pci_function();
        let Some(Setup { dma, _memory, .. }) = vfio_dma(&device, None) else {
            return;
        };
        dma.reset().unwrap();
        dma.reset().unwrap();
        assert_eq!(device.resets(), 2);
    }

    #[test]
    fn mmappable_areas_are_mapped_from_the_device_fd_at_the_region_offset() {
        let device = FakeVfioDevice::pci_function();
        let Some(Setup { dma, _memory, .. }) = vfio_dma(&device, None) else {
            return;
        };
        let areas = dma.map_region_areas(0).unwrap();
        assert_eq!(
            areas.iter().map(|a| (a.offset, a.size)).collect::<Vec<_>>(),
            [(0x1000, 0x2000)]
        );
        device.poke(0, 0x1ff8, &[7; 8]);
        let host = areas[0].host as *mut u64;
        // SAFETY: the area is a live 8 KiB shared mapping of the device fd
        // made by `map_region_areas`; 0xff8 is inside it and aligned.
        let seen = unsafe { host.byte_add(0xff8).read_volatile() };
        assert_eq!(seen, u64::from_ne_bytes([7; 8]));
        // SAFETY: as above.
        unsafe { host.write_volatile(0x1122_3344) };
        assert_eq!(device.peek(0, 0x1000, 4), 0x1122_3344u32.to_le_bytes());
        // Not mmappable: nothing mapped; the guest's accesses trap.
        assert!(dma.map_region_areas(2).unwrap().is_empty());
        assert!(dma.map_region_areas(7).unwrap().is_empty());
    }

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
        assert_eq!(
            e.to_string(),
            "region 2: 0xfd+0x4 is outside its 0x100 bytes"
        );
        assert!(check_region_access(0, 0x100, u64::MAX - 1, 4).is_err());
        assert!(check_region_access(0, 0, 0, 1).is_err());
    }
}
