//! A VM that keeps KVM's per-page memory attributes itself, for tests on
//! hosts whose VM types have none (this project's CI machine): it wraps a
//! real VM (memory slots, guest_memfd and vCPUs stay real) and answers
//! `supports_memory_attributes` with true. Its `set_memory_attributes`
//! applies KVM's rules: page-aligned, non-empty, non-overflowing ranges;
//! every page starts shared (attribute 0); a refused call changes nothing.
//! Failures can be injected.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use crate::{Capabilities, HypervisorError, Result, UserMemoryRegion, Vcpu, Vm, VmType};

const PAGE: u64 = 4096;

#[derive(Default)]
struct Attributes {
    /// Private ranges, start -> end, disjoint and not touching.
    private: BTreeMap<u64, u64>,
    fail_next: u32,
    /// Calls that reached the attribute table (refused ones included).
    calls: u64,
}

impl Attributes {
    fn set(&mut self, start: u64, end: u64, private: bool) {
        // Take out every range touching start..end, then put back what
        // lies outside it, plus the range itself when private.
        let touching: Vec<(u64, u64)> = self
            .private
            .range(..=end)
            .filter(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let (mut new_start, mut new_end) = (start, end);
        for (s, e) in touching {
            self.private.remove(&s);
            if private {
                new_start = new_start.min(s);
                new_end = new_end.max(e);
            } else {
                if s < start {
                    self.private.insert(s, start);
                }
                if e > end {
                    self.private.insert(end, e);
                }
            }
        }
        if private {
            self.private.insert(new_start, new_end);
        }
    }
}

pub struct AttributeTrackingVm {
    inner: Arc<dyn Vm>,
    attributes: Mutex<Attributes>,
}

impl AttributeTrackingVm {
    pub fn new(inner: Arc<dyn Vm>) -> Self {
        AttributeTrackingVm {
            inner,
            attributes: Mutex::new(Attributes::default()),
        }
    }

    /// Private ranges as (gpa, size), ascending and maximal.
    pub fn private_ranges(&self) -> Vec<(u64, u64)> {
        let a = self.attributes.lock().unwrap();
        a.private.iter().map(|(&s, &e)| (s, e - s)).collect()
    }

    /// Whether every page of `gpa..gpa+size` is private.
    pub fn is_private(&self, gpa: u64, size: u64) -> bool {
        let a = self.attributes.lock().unwrap();
        a.private
            .range(..=gpa)
            .next_back()
            .is_some_and(|(_, &e)| e >= gpa + size)
    }

    /// The next `count` calls fail as KVM would on an allocation failure.
    pub fn fail_next_calls(&self, count: u32) {
        self.attributes.lock().unwrap().fail_next = count;
    }

    pub fn calls(&self) -> u64 {
        self.attributes.lock().unwrap().calls
    }
}

impl Vm for AttributeTrackingVm {
    fn vm_type(&self) -> VmType {
        self.inner.vm_type()
    }

    fn capabilities(&self) -> &Capabilities {
        self.inner.capabilities()
    }

    fn create_guest_memfd(&self, size: u64, flags: u64) -> Result<OwnedFd> {
        self.inner.create_guest_memfd(size, flags)
    }

    unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> Result<()> {
        // SAFETY: the caller's promise is passed on unchanged.
        unsafe { self.inner.set_user_memory_region(region) }
    }

    fn set_memory_attributes(&self, gpa: u64, size: u64, private: bool) -> Result<()> {
        let mut a = self.attributes.lock().unwrap();
        a.calls += 1;
        let refuse = |errno| {
            Err(HypervisorError::SetMemoryAttributes {
                gpa,
                size,
                source: std::io::Error::from_raw_os_error(errno),
            })
        };
        let Some(end) = gpa.checked_add(size) else {
            return refuse(libc::EINVAL);
        };
        if size == 0 || !gpa.is_multiple_of(PAGE) || !size.is_multiple_of(PAGE) {
            return refuse(libc::EINVAL);
        }
        if a.fail_next > 0 {
            a.fail_next -= 1;
            return refuse(libc::ENOMEM);
        }
        a.set(gpa, end, private);
        Ok(())
    }

    fn supports_memory_attributes(&self) -> bool {
        true
    }

    fn has_irqchip(&self) -> bool {
        self.inner.has_irqchip()
    }

    fn set_msi_routes(&self, routes: &[crate::MsiRoute]) -> Result<()> {
        self.inner.set_msi_routes(routes)
    }

    fn register_irqfd(&self, fd: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()> {
        self.inner.register_irqfd(fd, gsi)
    }

    fn unregister_irqfd(&self, fd: &vmm_sys_util::eventfd::EventFd, gsi: u32) -> Result<()> {
        self.inner.unregister_irqfd(fd, gsi)
    }

    fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>> {
        self.inner.create_vcpu(id)
    }

    fn create_vfio_device(&self) -> Result<OwnedFd> {
        self.inner.create_vfio_device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_split_like_per_page_attributes() {
        let mut a = Attributes::default();
        a.set(0x1000, 0x5000, true);
        a.set(0x5000, 0x6000, true);
        assert_eq!(a.private.iter().collect::<Vec<_>>(), [(&0x1000, &0x6000)]);
        a.set(0x2000, 0x3000, false);
        assert_eq!(
            a.private.iter().collect::<Vec<_>>(),
            [(&0x1000, &0x2000), (&0x3000, &0x6000)]
        );
        a.set(0, 0x10000, false);
        assert!(a.private.is_empty());
    }
}
