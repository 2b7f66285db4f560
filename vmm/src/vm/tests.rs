use super::serial::serial_file;

#[test]
fn the_serial_file_may_not_be_a_kernel_pseudo_file() {
    for pseudo in [
        "/proc/self/comm",
        "/sys/kernel/mm/transparent_hugepage/enabled",
    ] {
        let before = std::fs::read_to_string(pseudo).ok();
        let Err(err) = serial_file(std::path::Path::new(pseudo)) else {
            panic!("{pseudo} accepted as the serial console");
        };
        assert!(
            crate::error_chain(&err).contains("procfs or sysfs"),
            "{pseudo}: {err}"
        );
        assert_eq!(
            std::fs::read_to_string(pseudo).ok(),
            before,
            "{pseudo} changed"
        );
    }
    // An ordinary file is emptied, as before.
    let path = crate::test_util::scratch_path("serial-file");
    std::fs::write(&path, "old output").unwrap();
    drop(serial_file(&path).unwrap());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
    let _ = std::fs::remove_file(&path);
}

/// A split irqchip (a TD's) gets the userspace IOAPIC on the MMIO bus at
/// the IOAPIC's page, answering the guest's register accesses; a default
/// VM keeps KVM's in-kernel IOAPIC and nothing of ours claims the page.
#[test]
fn only_a_split_irqchip_gets_the_userspace_ioapic_on_the_mmio_bus() {
    use std::sync::Arc;

    use hypervisor::Hypervisor;
    use vm_device::Bus;

    use crate::device_manager::pci_segment::PciSegment;

    let Some(kvm) = crate::test_util::kvm() else {
        return;
    };
    const BASE: u64 = arch::layout::IOAPIC_START;
    for (vm, split) in [
        (kvm.create_split_irqchip_vm().unwrap(), true),
        (kvm.create_vm(hypervisor::VmType::Default).unwrap(), false),
    ] {
        assert_eq!(vm.has_split_irqchip(), split);
        assert!(vm.has_irqchip(), "LAPICs in the kernel either way");
        let io_bus = Bus::new();
        let mmio_bus = Arc::new(Bus::new());
        let pci = PciSegment::new(&io_bus, mmio_bus.clone(), 64 << 20, vm.clone()).unwrap();
        let ioapic = super::build::split_irqchip_ioapic(&vm, &mmio_bus, &pci).unwrap();
        assert_eq!(ioapic.is_some(), split);
        // IOREGSEL = 1 (the version register), then IOWIN.
        let wrote = mmio_bus.write(BASE, &1u32.to_le_bytes());
        let mut version = [0u8; 4];
        let read = mmio_bus.read(BASE + 0x10, &mut version);
        assert_eq!((wrote, read), (split, split), "split irqchip: {split}");
        if split {
            assert_eq!(u32::from_le_bytes(version), 0x0017_0011);
            // The page is the IOAPIC's, and only that page.
            assert!(!mmio_bus.read(BASE + arch::layout::PAGE_SIZE, &mut version));
        }
    }
}

/// What the boot log names a firmware boot by: the platform and the image,
/// started at the reset vector.
#[test]
fn a_firmware_boot_is_named_by_its_platform_and_image() {
    use super::firmware::{Firmware, FirmwarePlatform};
    assert_eq!(FirmwarePlatform::SevSnp.to_string(), "SEV-SNP");
    assert_eq!(FirmwarePlatform::Tdx.to_string(), "TDX");
    let Some(data) = crate::sev_snp::ovmf::tests::debian_ovmf() else {
        return;
    };
    let firmware = Firmware {
        platform: FirmwarePlatform::Tdx,
        image: crate::sev_snp::ovmf::OvmfImage::parse(data).unwrap(),
        path: "/fw/OVMF.fd".into(),
    };
    assert_eq!(
        firmware.to_string(),
        "TDX firmware /fw/OVMF.fd at 0xfffffff0"
    );
}
