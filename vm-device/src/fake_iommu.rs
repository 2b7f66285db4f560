//! An IOMMU domain in memory that enforces the rules of VFIO type1 and
//! iommufd, for tests on hosts without VFIO: no overlapping maps, an unmap
//! must cover whole mappings (it may not cut one), and at most `limit`
//! mappings exist at a time (type1's `dma_entry_limit`). A broken rule is
//! refused with the kernel's errno and counted as a violation.

use std::collections::BTreeMap;
use std::io::{Error, ErrorKind};
use std::sync::Mutex;

use crate::discard_listener::Section;
use crate::dma_mapping::ExternalDmaMapping;

#[derive(Default)]
struct Domain {
    by_iova: BTreeMap<u64, u64>,
    violations: u64,
    fail_next_maps: u64,
}

pub struct FakeIommu {
    limit: Option<u64>,
    domain: Mutex<Domain>,
}

fn refuse(domain: &mut Domain, errno: i32) -> std::io::Result<()> {
    domain.violations += 1;
    Err(Error::from_raw_os_error(errno))
}

impl FakeIommu {
    pub fn new(limit: Option<u64>) -> Self {
        FakeIommu {
            limit,
            domain: Mutex::new(Domain::default()),
        }
    }

    pub fn mappings(&self) -> Vec<Section> {
        let d = self.domain.lock().unwrap();
        d.by_iova
            .iter()
            .map(|(&gpa, &size)| Section { gpa, size })
            .collect()
    }

    /// Requests that broke a rule (partial unmap, overlap, limit).
    pub fn violations(&self) -> u64 {
        self.domain.lock().unwrap().violations
    }

    /// The next `count` maps fail like a device that ran out of resources;
    /// these are not violations.
    pub fn fail_next_maps(&self, count: u64) {
        self.domain.lock().unwrap().fail_next_maps = count;
    }
}

impl ExternalDmaMapping for FakeIommu {
    fn map(&self, iova: u64, _gpa: u64, size: u64) -> std::io::Result<()> {
        let mut d = self.domain.lock().unwrap();
        if d.fail_next_maps > 0 {
            d.fail_next_maps -= 1;
            return Err(Error::new(ErrorKind::OutOfMemory, "injected map failure"));
        }
        let Some(end) = iova.checked_add(size).filter(|_| size > 0) else {
            return refuse(&mut d, libc_errno::EINVAL);
        };
        let overlaps = d
            .by_iova
            .range(..end)
            .next_back()
            .is_some_and(|(&a, &s)| a + s > iova);
        if overlaps {
            return refuse(&mut d, libc_errno::EEXIST);
        }
        if self.limit.is_some_and(|l| d.by_iova.len() as u64 >= l) {
            return refuse(&mut d, libc_errno::ENOSPC);
        }
        d.by_iova.insert(iova, size);
        Ok(())
    }

    fn unmap(&self, iova: u64, size: u64) -> std::io::Result<()> {
        let mut d = self.domain.lock().unwrap();
        let Some(end) = iova.checked_add(size).filter(|_| size > 0) else {
            return refuse(&mut d, libc_errno::EINVAL);
        };
        let inside: Vec<(u64, u64)> = d
            .by_iova
            .range(..end)
            .rev()
            .take_while(|&(&a, &s)| a + s > iova)
            .map(|(&a, &s)| (a, s))
            .collect();
        if inside.iter().any(|&(a, s)| a < iova || a + s > end) {
            return refuse(&mut d, libc_errno::EINVAL);
        }
        for (a, _) in inside {
            d.by_iova.remove(&a);
        }
        Ok(())
    }
}

/// The errnos the kernel answers with, without a libc dependency.
mod libc_errno {
    pub const EEXIST: i32 = 17;
    pub const EINVAL: i32 = 22;
    pub const ENOSPC: i32 = 28;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforces_the_kernel_rules() {
        let iommu = FakeIommu::new(Some(2));
        iommu.map(0x1000, 0x1000, 0x2000).unwrap();
        assert_eq!(
            iommu
                .map(0x2000, 0x2000, 0x1000)
                .unwrap_err()
                .raw_os_error(),
            Some(17)
        );
        assert_eq!(
            iommu.unmap(0x1000, 0x1000).unwrap_err().raw_os_error(),
            Some(22)
        );
        iommu.map(0x8000, 0x8000, 0x1000).unwrap();
        assert_eq!(
            iommu
                .map(0xa000, 0xa000, 0x1000)
                .unwrap_err()
                .raw_os_error(),
            Some(28)
        );
        assert_eq!(iommu.violations(), 3);
        // One unmap may cover several whole mappings.
        iommu.unmap(0, 0x10000).unwrap();
        assert!(iommu.mappings().is_empty());
    }
}
