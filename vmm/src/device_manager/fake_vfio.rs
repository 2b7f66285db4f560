//! A VFIO device and a VFIO container in memory, keeping the rules the
//! kernel applies to the calls `VfioDma` makes, for tests on hosts without
//! VFIO (this project's CI machine has neither /dev/vfio nor /dev/iommu).
//!
//! The device's regions live in a memfd at their region offsets, as a
//! vfio-pci device's do in its device fd, so reads, writes and mmaps of
//! the fd meet the same bytes. A region access outside the region, or
//! without the region's read / write flag, is refused and counted (the
//! kernel answers EINVAL; vfio-ioctls only logs it, so the caller never
//! learns). SET_IRQS takes references to the eventfds, as the kernel does,
//! and refuses more vectors than the index has. The container maps through
//! `vm_device::fake_iommu` (no overlap, no partial unmap, the entry limit)
//! and refuses unaligned requests as type1 does.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use pci::VfioOpsError;
use vfio_ioctls::{VfioError, VfioOps};
use vm_device::ExternalDmaMapping;
use vm_device::fake_iommu::FakeIommu;
use vmm_sys_util::errno::Error as SysError;
use vmm_sys_util::eventfd::EventFd;

use super::vfio::{OpenedVfio, RegionInfo, VfioDeviceAccess};

pub const REGION_READ: u32 = 1;
pub const REGION_WRITE: u32 = 1 << 1;
pub const REGION_MMAP: u32 = 1 << 2;
/// Region `n` starts at `n * REGION_STRIDE` in the device fd.
pub const REGION_STRIDE: u64 = 1 << 24;
use arch::layout::PAGE_SIZE as PAGE;

#[derive(Default)]
struct DeviceState {
    violations: Vec<String>,
    /// The eventfds each irq index signals, as SET_IRQS left them.
    triggers: BTreeMap<u32, Vec<EventFd>>,
    resets: u32,
}

pub struct FakeVfioDevice {
    fd: File,
    regions: Vec<RegionInfo>,
    irq_counts: BTreeMap<u32, u32>,
    state: Mutex<DeviceState>,
}

impl FakeVfioDevice {
    /// `regions[n]` is region `n` (its offset is set here); `irq_counts`
    /// gives each irq index's vector count.
    pub fn new(regions: Vec<RegionInfo>, irq_counts: &[(u32, u32)]) -> Arc<Self> {
        // SAFETY: memfd_create with a static name; the fd it returns is new
        // and owned by the File.
        let fd = unsafe { libc::memfd_create(c"fake-vfio-device".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and nothing else owns it.
        let fd = unsafe { File::from_raw_fd(fd) };
        fd.set_len(REGION_STRIDE * regions.len() as u64).unwrap();
        let regions = regions
            .into_iter()
            .enumerate()
            .map(|(n, r)| RegionInfo {
                offset: n as u64 * REGION_STRIDE,
                ..r
            })
            .collect();
        Arc::new(FakeVfioDevice {
            fd,
            regions,
            irq_counts: irq_counts.iter().copied().collect(),
            state: Mutex::default(),
        })
    }

    /// A PCI function: vendor 0x1234, device 0x5678, 32-bit memory BARs
    /// of 16 KiB (BAR0, mmappable at 0x1000..0x3000 only) and 4 KiB (BAR2,
    /// not mmappable), configuration space in region 7, no interrupts.
    pub fn pci_function() -> Arc<Self> {
        use vfio_ioctls::{VfioRegionInfoCapSparseMmap, VfioRegionSparseMmapArea};
        let rw = REGION_READ | REGION_WRITE;
        let mut regions = vec![RegionInfo::default(); 8];
        regions[0] = RegionInfo {
            flags: rw | REGION_MMAP,
            size: 0x4000,
            caps: vec![vfio_ioctls::VfioRegionInfoCap::SparseMmap(
                VfioRegionInfoCapSparseMmap {
                    areas: vec![VfioRegionSparseMmapArea {
                        offset: 0x1000,
                        size: 0x2000,
                    }],
                },
            )],
            ..Default::default()
        };
        regions[2] = RegionInfo {
            flags: rw,
            size: 0x1000,
            ..Default::default()
        };
        regions[7] = RegionInfo {
            flags: rw,
            size: 256,
            ..Default::default()
        };
        let device = Self::new(regions, &[]);
        let mut config = [0u8; 256];
        config[0..4].copy_from_slice(&0x5678_1234u32.to_le_bytes());
        device.poke(7, 0, &config);
        device
    }

    /// Writes region bytes from the device's side.
    pub fn poke(&self, index: u32, offset: u64, data: &[u8]) {
        let at = self.regions[index as usize].offset + offset;
        self.fd.write_all_at(data, at).unwrap();
    }

    /// Reads region bytes from the device's side.
    pub fn peek(&self, index: u32, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0; len];
        let at = self.regions[index as usize].offset + offset;
        self.fd.read_exact_at(&mut data, at).unwrap();
        data
    }

    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    pub fn resets(&self) -> u32 {
        self.state.lock().unwrap().resets
    }

    /// Signals vector `vector` of irq index `index` as the device would;
    /// false when SET_IRQS gave it no eventfd.
    pub fn fire(&self, index: u32, vector: usize) -> bool {
        let state = self.state.lock().unwrap();
        match state.triggers.get(&index).and_then(|fds| fds.get(vector)) {
            Some(fd) => fd.write(1).is_ok(),
            None => false,
        }
    }

    /// The region an access of `len` bytes at `offset` may touch, if the
    /// kernel would allow it.
    fn access(&self, index: u32, offset: u64, len: usize, flag: u32) -> Option<u64> {
        let region = self.regions.get(index as usize);
        let allowed = region.filter(|r| {
            r.flags & flag != 0 && offset.checked_add(len as u64).is_some_and(|e| e <= r.size)
        });
        if allowed.is_none() {
            self.state.lock().unwrap().violations.push(format!(
                "{} of region {index} at {offset:#x}+{len:#x}",
                if flag == REGION_READ { "read" } else { "write" }
            ));
        }
        allowed.map(|r| r.offset + offset)
    }

    fn refuse(&self, what: String) -> Result<(), VfioOpsError> {
        self.state.lock().unwrap().violations.push(what.clone());
        Err(VfioOpsError::new(what))
    }
}

impl VfioDeviceAccess for Arc<FakeVfioDevice> {
    fn region(&self, index: u32) -> RegionInfo {
        self.regions
            .get(index as usize)
            .cloned()
            .unwrap_or_default()
    }

    fn read(&self, index: u32, offset: u64, data: &mut [u8]) {
        if let Some(at) = self.access(index, offset, data.len(), REGION_READ) {
            self.fd.read_exact_at(data, at).unwrap();
        }
    }

    fn write(&self, index: u32, offset: u64, data: &[u8]) {
        if let Some(at) = self.access(index, offset, data.len(), REGION_WRITE) {
            self.fd.write_all_at(data, at).unwrap();
        }
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.irq_counts.get(&index).copied().unwrap_or(0)
    }

    fn enable_irq(&self, index: u32, fds: Vec<&EventFd>) -> Result<(), VfioOpsError> {
        let count = self.irq_count(index) as usize;
        if fds.is_empty() || fds.len() > count {
            return self.refuse(format!(
                "SET_IRQS of {} vectors on irq index {index} ({count})",
                fds.len()
            ));
        }
        let mut kept = Vec::with_capacity(fds.len());
        for fd in fds {
            // The kernel holds its own reference to each eventfd.
            kept.push(fd.try_clone().map_err(VfioOpsError::new)?);
        }
        self.state.lock().unwrap().triggers.insert(index, kept);
        Ok(())
    }

    fn disable_irq(&self, index: u32) -> Result<(), VfioOpsError> {
        if self.irq_count(index) == 0 {
            return self.refuse(format!("SET_IRQS disable on irq index {index} (none)"));
        }
        self.state.lock().unwrap().triggers.remove(&index);
        Ok(())
    }

    fn reset(&self) {
        self.state.lock().unwrap().resets += 1;
    }

    fn mmap_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A type1 container (or an iommufd IOAS) over the fake IOMMU, keeping the
/// host address each mapping was given.
pub struct FakeContainer {
    pub iommu: FakeIommu,
    host_by_iova: Mutex<BTreeMap<u64, u64>>,
    /// Unmap ioctls made.
    pub unmap_calls: std::sync::atomic::AtomicU64,
}

impl FakeContainer {
    pub fn new(limit: Option<u64>) -> Arc<Self> {
        Arc::new(FakeContainer {
            iommu: FakeIommu::keeping_mappings_on_cut_off(limit),
            host_by_iova: Mutex::default(),
            unmap_calls: Default::default(),
        })
    }

    /// (iova, size, host address) of every mapping.
    pub fn mappings(&self) -> Vec<(u64, u64, u64)> {
        let hosts = self.host_by_iova.lock().unwrap();
        self.iommu
            .mappings()
            .into_iter()
            .map(|s| (s.gpa, s.size, hosts[&s.gpa]))
            .collect()
    }
}

fn refused(e: vm_device::DmaError) -> SysError {
    SysError::new(e.raw_os_error().unwrap_or(libc::EIO))
}

impl VfioOps for FakeContainer {
    unsafe fn vfio_dma_map(
        &self,
        iova: u64,
        size: usize,
        user_addr: *mut u8,
    ) -> vfio_ioctls::Result<()> {
        let host = user_addr as u64;
        if !(iova | size as u64 | host).is_multiple_of(PAGE) {
            return Err(VfioError::IommuDmaMap(SysError::new(libc::EINVAL)));
        }
        self.iommu
            .map(iova, iova, size as u64)
            .map_err(|e| VfioError::IommuDmaMap(refused(e)))?;
        self.host_by_iova.lock().unwrap().insert(iova, host);
        Ok(())
    }

    fn vfio_dma_unmap(&self, iova: u64, size: usize) -> vfio_ioctls::Result<()> {
        self.unmap_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.iommu
            .unmap(iova, size as u64)
            .map_err(|e| VfioError::IommuDmaUnmap(refused(e)))?;
        let mut hosts = self.host_by_iova.lock().unwrap();
        hosts.retain(|&a, _| a < iova || a >= iova + size as u64);
        Ok(())
    }
}

/// `device` on `container`, as `vfio_host::open` returns a host's.
pub fn opened(device: &Arc<FakeVfioDevice>, container: &Arc<FakeContainer>) -> OpenedVfio {
    OpenedVfio {
        iommu: container.clone(),
        device: Box::new(device.clone()),
    }
}
