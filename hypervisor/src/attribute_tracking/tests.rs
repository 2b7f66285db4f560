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
    fn create_vfio_device(&self) -> Result<crate::KvmVfioDevice> {
        self.answer("vfio".into())?;
        Ok(crate::KvmVfioDevice::new(null_fd()))
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
