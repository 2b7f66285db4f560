//! An IOMMU domain in memory that enforces the rules of VFIO type1 and
//! iommufd, for tests on hosts without VFIO: no overlapping maps, an unmap
//! must cover whole mappings (it may not cut one), and at most `limit`
//! mappings exist at a time (type1's `dma_entry_limit`; `None` for an
//! iommufd IOAS, which counts pinned pages against RLIMIT_MEMLOCK instead
//! of counting entries). A broken rule is refused with type1's errno
//! (iommufd answers a cut with ENOENT; callers only see a refusal) and
//! counted as a violation.

use std::collections::BTreeMap;
use std::io::{Error, ErrorKind};
use std::sync::{Mutex, MutexGuard};

use crate::discard_listener::Section;
use crate::dma_mapping::{CutOff, DmaError, ExternalDmaMapping};

/// What a broken fake reports: the connection is gone.
#[derive(Debug, thiserror::Error)]
#[error("connection lost")]
struct ConnectionLost(#[source] Error);

#[derive(Default)]
struct Domain {
    by_iova: BTreeMap<u64, u64>,
    violations: u64,
    fail_next_maps: u64,
    fail_next_unmaps: u64,
    /// The next device call breaks the connection (a vfio-user server that
    /// stopped answering): it and every later call fail.
    break_on_next_call: bool,
    broken: bool,
    cut_off: bool,
}

pub struct FakeIommu {
    limit: Option<u64>,
    /// Whether cutting off drops every mapping (vfio-user: the server must on
    /// disconnect) or leaves them to be unmapped (VFIO).
    cut_off_drops_mappings: bool,
    domain: Mutex<Domain>,
}

fn refuse(domain: &mut Domain, errno: i32) -> Result<(), DmaError> {
    Err(violation(domain, errno))
}

/// A broken rule: counted, and answered with `errno`.
fn violation(domain: &mut Domain, errno: i32) -> DmaError {
    domain.violations += 1;
    DmaError::refused(Error::from_raw_os_error(errno))
}

impl FakeIommu {
    pub fn new(limit: Option<u64>) -> Self {
        FakeIommu {
            limit,
            cut_off_drops_mappings: true,
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

    /// Like `new`, for a backend whose `cut_off` leaves the mappings in place
    /// (VFIO): the caller must unmap them.
    pub fn keeping_mappings_on_cut_off(limit: Option<u64>) -> Self {
        FakeIommu {
            cut_off_drops_mappings: false,
            ..FakeIommu::new(limit)
        }
    }

    /// The next map or unmap loses the connection, as a server that stopped
    /// answering does: that call and every later one fail.
    pub fn break_on_next_call(&self) {
        self.domain.lock().unwrap().break_on_next_call = true;
    }

    pub fn is_cut_off(&self) -> bool {
        self.domain.lock().unwrap().cut_off
    }

    /// The next `count` unmaps fail (an IOMMU that refuses); the mappings
    /// stay in place.
    pub fn fail_next_unmaps(&self, count: u64) {
        self.domain.lock().unwrap().fail_next_unmaps = count;
    }

    /// The next `count` maps fail like a device that ran out of resources;
    /// these are not violations.
    pub fn fail_next_maps(&self, count: u64) {
        self.domain.lock().unwrap().fail_next_maps = count;
    }
}

impl FakeIommu {
    /// What map and unmap check first, in this order: the connection, an
    /// injected failure (`pending` says how many are left; answered as
    /// `injected` says), and a range that is empty or overflows. Returns
    /// the locked domain and the range's end.
    fn admit(
        &self,
        iova: u64,
        size: u64,
        pending: fn(&mut Domain) -> &mut u64,
        injected: (ErrorKind, &'static str),
    ) -> Result<(MutexGuard<'_, Domain>, u64), DmaError> {
        let mut d = self.domain.lock().unwrap();
        check_connection(&mut d)?;
        let left = pending(&mut d);
        if *left > 0 {
            *left -= 1;
            return Err(DmaError::refused(Error::new(injected.0, injected.1)));
        }
        let Some(end) = iova.checked_add(size).filter(|_| size > 0) else {
            return Err(violation(&mut d, libc_errno::EINVAL));
        };
        Ok((d, end))
    }
}

impl ExternalDmaMapping for FakeIommu {
    fn map(&self, iova: u64, _gpa: u64, size: u64) -> Result<(), DmaError> {
        let injected = (ErrorKind::OutOfMemory, "injected map failure");
        let (mut d, end) = self.admit(iova, size, |d| &mut d.fail_next_maps, injected)?;
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

    fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaError> {
        let injected = (ErrorKind::PermissionDenied, "injected unmap failure");
        let (mut d, end) = self.admit(iova, size, |d| &mut d.fail_next_unmaps, injected)?;
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

    fn cut_off(&self, _reason: &str) -> CutOff {
        let mut d = self.domain.lock().unwrap();
        d.cut_off = true;
        if self.cut_off_drops_mappings {
            d.by_iova.clear();
            CutOff::MappingsDropped
        } else {
            CutOff::MappingsLeft
        }
    }
}

fn check_connection(d: &mut Domain) -> Result<(), DmaError> {
    if d.break_on_next_call {
        d.break_on_next_call = false;
        d.broken = true;
    }
    if d.broken {
        return Err(DmaError::broken(ConnectionLost(Error::new(
            ErrorKind::TimedOut,
            "no reply",
        ))));
    }
    Ok(())
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
        let errno = |r: Result<(), DmaError>| r.unwrap_err().raw_os_error();
        let iommu = FakeIommu::new(Some(2));
        iommu.map(0x1000, 0x1000, 0x2000).unwrap();
        assert_eq!(errno(iommu.map(0x2000, 0x2000, 0x1000)), Some(17));
        assert_eq!(errno(iommu.unmap(0x1000, 0x1000)), Some(22));
        iommu.map(0x8000, 0x8000, 0x1000).unwrap();
        assert_eq!(errno(iommu.map(0xa000, 0xa000, 0x1000)), Some(28));
        assert_eq!(iommu.violations(), 3);
        // One unmap may cover several whole mappings.
        iommu.unmap(0, 0x10000).unwrap();
        assert!(iommu.mappings().is_empty());
    }
}
