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

    fn has_split_irqchip(&self) -> bool {
        self.inner.has_split_irqchip()
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

    fn supported_cpuid(&self) -> Vec<crate::arch::CpuidEntry> {
        self.inner.supported_cpuid()
    }

    fn create_pit(&self) -> Result<()> {
        self.inner.create_pit()
    }

    fn create_vfio_device(&self) -> Result<OwnedFd> {
        self.inner.create_vfio_device()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HypervisorError;
    use crate::scripted_vcpu::ScriptedVcpu;
    use vmm_sys_util::eventfd::EventFd;

    /// The wrapped VM: answers what a test sets and records every call,
    /// so a test sees exactly what the wrapper passed on.
    struct InnerVm {
        capabilities: Capabilities,
        irqchip: bool,
        fail: bool,
        calls: Mutex<Vec<String>>,
    }

    impl InnerVm {
        fn new(irqchip: bool, fail: bool) -> Arc<Self> {
            Arc::new(InnerVm {
                capabilities: Capabilities {
                    guest_memfd: true,
                    vm_types: 0b10,
                    ..Capabilities::default()
                },
                irqchip,
                fail,
                calls: Mutex::default(),
            })
        }

        fn answer(&self, call: String) -> Result<()> {
            self.calls.lock().unwrap().push(call);
            if self.fail {
                Err(HypervisorError::NoIrqchip)
            } else {
                Ok(())
            }
        }

        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    fn null_fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    impl Vm for InnerVm {
        fn vm_type(&self) -> VmType {
            VmType::SwProtected
        }
        fn capabilities(&self) -> &Capabilities {
            &self.capabilities
        }
        fn create_guest_memfd(&self, size: u64, flags: u64) -> Result<OwnedFd> {
            self.answer(format!("guest_memfd {size:#x} {flags:#x}"))?;
            Ok(null_fd())
        }
        unsafe fn set_user_memory_region(&self, region: UserMemoryRegion) -> Result<()> {
            self.answer(format!(
                "slot {} {:#x}+{:#x}",
                region.slot, region.guest_phys_addr, region.size
            ))
        }
        fn set_memory_attributes(&self, gpa: u64, size: u64, private: bool) -> Result<()> {
            self.answer(format!("attributes {gpa:#x}+{size:#x} {private}"))
        }
        fn supports_memory_attributes(&self) -> bool {
            false
        }
        fn create_vcpu(&self, id: u8) -> Result<Box<dyn Vcpu>> {
            self.answer(format!("vcpu {id}"))?;
            Ok(Box::new(ScriptedVcpu::new([]).0))
        }
        fn supported_cpuid(&self) -> Vec<crate::arch::CpuidEntry> {
            Vec::new()
        }
        fn create_pit(&self) -> Result<()> {
            self.answer("pit".to_string())
        }
        fn has_irqchip(&self) -> bool {
            self.irqchip
        }
        fn set_msi_routes(&self, routes: &[crate::MsiRoute]) -> Result<()> {
            self.answer(format!("routes {}", routes.len()))
        }
        fn register_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<()> {
            self.answer(format!("irqfd {gsi}"))
        }
        fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> Result<()> {
            self.answer(format!("unirqfd {gsi}"))
        }
        fn create_vfio_device(&self) -> Result<OwnedFd> {
            self.answer("vfio".into())?;
            Ok(null_fd())
        }
    }

    fn errno(result: Result<()>) -> Option<i32> {
        match result {
            Err(HypervisorError::SetMemoryAttributes { source, .. }) => source.raw_os_error(),
            other => panic!("expected a refused attribute call, got {other:?}"),
        }
    }

    #[test]
    fn attribute_calls_follow_kvms_rules_and_a_refused_one_changes_nothing() {
        let inner = InnerVm::new(false, false);
        let vm = AttributeTrackingVm::new(inner.clone());
        assert!(vm.supports_memory_attributes());
        vm.set_memory_attributes(0x1000, 0x4000, true).unwrap();
        for (gpa, size) in [
            (0x8000, 0),
            (0x8001, 0x1000),
            (0x8000, 0x1001),
            (!0xfff, 0x2000),
        ] {
            assert_eq!(
                errno(vm.set_memory_attributes(gpa, size, true)),
                Some(libc::EINVAL)
            );
            assert_eq!(
                errno(vm.set_memory_attributes(gpa, size, false)),
                Some(libc::EINVAL)
            );
        }
        assert_eq!(vm.private_ranges(), [(0x1000, 0x4000)]);
        // Injected failures: refused as KVM refuses on ENOMEM, then gone.
        vm.fail_next_calls(2);
        for _ in 0..2 {
            assert_eq!(
                errno(vm.set_memory_attributes(0, 0x1000, true)),
                Some(libc::ENOMEM)
            );
        }
        assert_eq!(vm.private_ranges(), [(0x1000, 0x4000)]);
        vm.set_memory_attributes(0, 0x1000, true).unwrap();
        assert_eq!(vm.private_ranges(), [(0, 0x5000)]);
        // Every call reached the table, refused or not; none reached the
        // wrapped VM, which has no attributes.
        assert_eq!(vm.calls(), 1 + 8 + 2 + 1);
        assert!(inner.calls().is_empty());
    }

    #[test]
    fn is_private_needs_every_page_of_the_range() {
        let vm = AttributeTrackingVm::new(InnerVm::new(false, false));
        vm.set_memory_attributes(0x1000, 0x4000, true).unwrap();
        assert!(vm.is_private(0x1000, 0x4000));
        assert!(vm.is_private(0x2000, 0x1000));
        assert!(vm.is_private(0x4000, 0x1000));
        assert!(!vm.is_private(0x4000, 0x2000));
        assert!(!vm.is_private(0, 0x2000));
        assert!(!vm.is_private(0x6000, 0x1000));
        vm.set_memory_attributes(0x2000, 0x1000, false).unwrap();
        assert!(!vm.is_private(0x1000, 0x4000));
        assert_eq!(vm.private_ranges(), [(0x1000, 0x1000), (0x3000, 0x2000)]);
    }

    #[test]
    fn a_shared_range_sharing_an_edge_with_a_private_one_leaves_no_empty_range() {
        let vm = AttributeTrackingVm::new(InnerVm::new(false, false));
        vm.set_memory_attributes(0x1000, 0x4000, true).unwrap();
        vm.set_memory_attributes(0x1000, 0x1000, false).unwrap();
        assert_eq!(vm.private_ranges(), [(0x2000, 0x3000)]);
        vm.set_memory_attributes(0x4000, 0x1000, false).unwrap();
        assert_eq!(vm.private_ranges(), [(0x2000, 0x2000)]);
    }

    #[test]
    fn everything_but_attributes_is_the_wrapped_vms() {
        for (irqchip, fail) in [(true, false), (false, true)] {
            let inner = InnerVm::new(irqchip, fail);
            let vm = AttributeTrackingVm::new(inner.clone());
            assert_eq!(vm.vm_type(), VmType::SwProtected);
            assert_eq!(vm.capabilities(), &inner.capabilities);
            assert_eq!(vm.has_irqchip(), irqchip);
            let fd = EventFd::new(0).unwrap();
            let region = UserMemoryRegion {
                slot: 3,
                guest_phys_addr: 0x10_0000,
                size: 0x2000,
                userspace_addr: 0,
                guest_memfd: None,
            };
            let results = [
                vm.create_guest_memfd(0x4000, 1).map(drop),
                // SAFETY: the wrapped VM only records the region.
                unsafe { vm.set_user_memory_region(region) },
                vm.create_vcpu(2).map(drop),
                vm.set_msi_routes(&[]),
                vm.register_irqfd(&fd, 24),
                vm.unregister_irqfd(&fd, 24),
                vm.create_vfio_device().map(drop),
            ];
            assert!(results.iter().all(|r| r.is_ok() != fail), "{results:?}");
            assert_eq!(
                inner.calls(),
                [
                    "guest_memfd 0x4000 0x1",
                    "slot 3 0x100000+0x2000",
                    "vcpu 2",
                    "routes 0",
                    "irqfd 24",
                    "unirqfd 24",
                    "vfio",
                ]
            );
        }
    }

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
