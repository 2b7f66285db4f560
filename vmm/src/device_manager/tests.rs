//! The device manager over real guest_memfd RAM (a KVM VM without vCPUs)
//! with the fake IOMMU standing in for VFIO: attach replays, conversions
//! follow, the entry limit refuses cleanly, removal unmaps everything.

use std::sync::Arc;

use hypervisor::{Hypervisor, VmType};
use vm_device::fake_iommu::FakeIommu;
use vm_device::{CutOff, DmaError, Section};

use super::vfio_user::VfioUserDmaError;
use super::*;
use crate::memory::{ConversionFailure, MemoryLayout};
use crate::test_util::{convert, in_process_test_device, kvm};

const MIB: u64 = 1 << 20;

/// A VM (no vCPUs) and a manager of 64 MiB of its RAM; None without KVM.
fn vm_and_memory() -> Option<(Arc<dyn hypervisor::Vm>, Arc<MemoryManager>)> {
    let vm = kvm()?.create_vm(VmType::Default).unwrap();
    let memory = Arc::new(MemoryManager::new(vm.clone(), 64 * MIB, MemoryLayout::Auto).unwrap());
    Some((vm, memory))
}

fn memory() -> Option<Arc<MemoryManager>> {
    vm_and_memory().map(|(_, memory)| memory)
}

fn section(gpa: u64, size: u64) -> Section {
    Section { gpa, size }
}

/// `memory()` and a manager over it without PCI.
fn memory_and_manager() -> Option<(Arc<MemoryManager>, DeviceManager)> {
    let memory = memory()?;
    let dm = manager(&memory);
    Some((memory, dm))
}

fn listener_count(memory: &MemoryManager) -> usize {
    memory.regions()[0]
        .attributes
        .as_ref()
        .unwrap()
        .lock()
        .unwrap()
        .listener_count()
}

fn shared_runs(memory: &MemoryManager) -> Vec<Section> {
    let attrs = memory.regions()[0].attributes.as_ref().unwrap();
    let mut runs = Vec::new();
    attrs
        .replay_populated(0, attrs.size(), |s| {
            runs.push(s);
            Ok::<(), ()>(())
        })
        .unwrap();
    runs
}

fn attach_fake(
    dm: &DeviceManager,
    id: &str,
    iommu: &Arc<FakeIommu>,
    limit: Option<u64>,
) -> Result<DeviceInfo, DeviceError> {
    dm.attach(
        Attachment {
            id: id.to_string(),
            kind: DeviceKind::Vfio,
            path: PathBuf::from("/fake"),
            entry_limit: limit,
            function: None,
            device_number: None,
            policy: MappingPolicy::Runs,
            dma_mode: None,
        },
        iommu.clone(),
    )
}

fn manager(memory: &Arc<MemoryManager>) -> DeviceManager {
    DeviceManager::new(memory.clone(), Arc::new(EventMonitor::disabled()), None)
}

#[test]
fn attach_replays_and_conversions_follow() {
    let Some(memory) = memory() else { return };
    convert(&memory, 16 * MIB, 64 << 10, true).unwrap();
    let dm = manager(&memory);
    let iommu = Arc::new(FakeIommu::new(None));
    let info = attach_fake(&dm, "dev0", &iommu, None).unwrap();
    assert_eq!(info.dma.entries, 1, "replayed one run");
    assert_eq!(listener_count(&memory), 1);
    assert_eq!(iommu.mappings(), shared_runs(&memory));

    convert(&memory, 20 * MIB, 8 << 10, true).unwrap();
    convert(&memory, 16 * MIB + (16 << 10), 4 << 10, false).unwrap();
    assert_eq!(iommu.mappings(), shared_runs(&memory));
    assert_eq!(iommu.violations(), 0);

    let removed = dm.remove("dev0").unwrap();
    assert_eq!(removed.dma.entries, 0);
    assert!(iommu.mappings().is_empty());
    assert_eq!(listener_count(&memory), 0);
    // The guest's state is untouched by the removal.
    assert_eq!(shared_runs(&memory).len(), 3);
}

#[test]
fn a_refusing_device_fails_the_conversion_and_changes_nothing() {
    let Some((memory, dm)) = memory_and_manager() else {
        return;
    };
    let healthy = Arc::new(FakeIommu::new(None));
    let full = Arc::new(FakeIommu::new(None));
    attach_fake(&dm, "healthy", &healthy, None).unwrap();
    attach_fake(&dm, "full", &full, Some(1)).unwrap();
    convert(&memory, 16 * MIB, 4096, true).unwrap();
    let before = shared_runs(&memory);

    let err = convert(&memory, 18 * MIB, 4096, true).unwrap_err();
    let chain = crate::error_chain(&err);
    assert!(chain.contains("DMA entry limit of 1"), "{chain}");
    assert_eq!(shared_runs(&memory), before);
    assert_eq!(
        healthy.mappings(),
        before,
        "rolled back on the healthy device"
    );
    assert_eq!(full.mappings(), before);
    assert_eq!(dm.info()[1].dma.refused, 1);
}

#[test]
fn a_failed_attach_leaves_no_listener_and_no_mapping() {
    let Some(memory) = memory() else { return };
    convert(&memory, 16 * MIB, 4096, true).unwrap();
    convert(&memory, 18 * MIB, 4096, true).unwrap();
    let dm = manager(&memory);
    let iommu = Arc::new(FakeIommu::new(None));
    let err = attach_fake(&dm, "small", &iommu, Some(1)).unwrap_err();
    assert!(matches!(err, DeviceError::Register { .. }), "{err}");
    assert!(iommu.mappings().is_empty());
    assert!(dm.info().is_empty());
    assert_eq!(listener_count(&memory), 0);
    // A later conversion reaches no leftover listener.
    convert(&memory, 20 * MIB, 4096, true).unwrap();
    assert!(iommu.mappings().is_empty());
}

#[test]
fn ids_are_unique_and_generated_when_absent() {
    let Some((_memory, dm)) = memory_and_manager() else {
        return;
    };
    let iommu = Arc::new(FakeIommu::new(None));
    let first = dm.claim_id(None, DeviceKind::VfioUser).unwrap();
    // The next generated id while the first is still being attached.
    let second = dm.claim_id(None, DeviceKind::VfioUser).unwrap();
    assert_eq!(second, "_vfio_user1");
    dm.release_claim(&second);
    // A claimed id is taken while its device attaches.
    assert!(matches!(
        attach_fake(&dm, &first, &iommu, None),
        Err(DeviceError::DuplicateId(_))
    ));
    dm.release_claim(&first);
    attach_fake(&dm, &first, &iommu, None).unwrap();
    assert_eq!(first, "_vfio_user0");
    assert!(matches!(
        dm.claim_id(Some("_vfio_user0"), DeviceKind::Vfio),
        Err(DeviceError::DuplicateId(_))
    ));
    assert!(matches!(dm.remove("nope"), Err(DeviceError::NotFound(_))));
}

#[test]
fn vfio_user_refuses_anonymous_ram() {
    let Some(hv) = kvm() else { return };
    let vm = hv.create_vm(VmType::Default).unwrap();
    let memory = Arc::new(MemoryManager::new(vm, 32 * MIB, MemoryLayout::Anonymous).unwrap());
    let ram = Arc::new(GuestRam::new(&memory));
    let err = VfioUserDma::connect(
        std::path::Path::new("/nonexistent"),
        ram,
        VFIO_USER_TIMEOUT,
        DmaMode::Fd,
    )
    .err()
    .unwrap();
    assert!(matches!(err, DeviceError::NoFileBacking), "{err}");
}

/// RAM above the 32-bit MMIO hole: two guest_memfd regions.
fn two_region_memory() -> Option<Arc<MemoryManager>> {
    let vm = kvm()?.create_vm(VmType::Default).unwrap();
    Some(Arc::new(
        MemoryManager::new(vm, (3 << 30) + 64 * MIB, MemoryLayout::Auto).unwrap(),
    ))
}

#[test]
fn conversions_above_the_mmio_hole_reach_devices_at_the_right_address() {
    let Some(memory) = two_region_memory() else {
        return;
    };
    assert_eq!(memory.regions().len(), 2);
    let high = memory.regions()[1].gpa;
    assert_eq!(high, 1 << 32);
    // What boot places the kernel and the PCI windows by.
    assert_eq!(memory.low_ram_size(), 3 << 30);
    assert_eq!(memory.ram_end(), (1 << 32) + 64 * MIB);
    let info: Vec<(u64, u64, bool)> = memory
        .region_info()
        .iter()
        .map(|r| (r.gpa, r.size, r.guest_memfd))
        .collect();
    assert_eq!(info, [(0, 3 << 30, true), (1 << 32, 64 * MIB, true)]);
    assert!(memory.region_info().iter().all(|r| !r.backing.is_empty()));
    let dm = manager(&memory);
    let iommu = Arc::new(FakeIommu::new(None));
    convert(&memory, 16 * MIB, 4096, true).unwrap();
    attach_fake(&dm, "dev0", &iommu, None).unwrap();
    convert(&memory, high + 16 * MIB, 8192, true).unwrap();
    assert_eq!(
        iommu.mappings(),
        vec![section(16 * MIB, 4096), section(high + 16 * MIB, 8192)]
    );
    let upper = memory.regions()[1].attributes.as_ref().unwrap();
    assert!(upper.is_populated(16 * MIB, 8192).unwrap());
    assert_eq!(upper.counters().pages_to_shared, 2);
    assert_eq!(
        memory.regions()[0]
            .attributes
            .as_ref()
            .unwrap()
            .counters()
            .pages_to_shared,
        1
    );

    // A range across the hole belongs to no single RAM region: refused,
    // nothing changed on either side or on the device.
    let before = iommu.mappings();
    let across = convert(&memory, (3 << 30) - 4096, (1 << 30) + 8192, true).unwrap_err();
    assert!(
        matches!(across, ConversionFailure::OutOfRange { .. }),
        "{across}"
    );
    let low_end = memory.regions()[0].attributes.as_ref().unwrap();
    assert!(!low_end.is_populated((3 << 30) - 4096, 4096).unwrap());
    assert!(!upper.is_populated(0, 8192).unwrap());
    assert_eq!(iommu.mappings(), before);
    assert_eq!(memory.conversion_totals().failed, 1);

    // Back to private in the upper region: unmapped there only.
    convert(&memory, high + 16 * MIB, 8192, false).unwrap();
    assert_eq!(iommu.mappings(), vec![section(16 * MIB, 4096)]);
    assert_eq!(iommu.violations(), 0);
    dm.remove("dev0").unwrap();
    assert!(iommu.mappings().is_empty());
}

#[test]
fn a_device_lost_mid_conversion_is_detached_and_the_conversion_goes_on() {
    let Some((memory, dm)) = memory_and_manager() else {
        return;
    };
    let healthy = Arc::new(FakeIommu::new(None));
    let flaky = Arc::new(FakeIommu::new(None));
    attach_fake(&dm, "healthy", &healthy, None).unwrap();
    attach_fake(&dm, "flaky", &flaky, None).unwrap();
    convert(&memory, 16 * MIB, 16384, true).unwrap();
    flaky.break_on_next_call();
    // To-private: the flaky device's unmap fails, so it is cut off; the
    // conversion is done and the healthy device follows it.
    convert(&memory, 16 * MIB, 4096, false).unwrap();
    let expected = vec![section(16 * MIB + 4096, 12288)];
    assert_eq!(shared_runs(&memory), expected);
    assert_eq!(healthy.mappings(), expected);
    assert!(flaky.is_cut_off());
    assert!(flaky.mappings().is_empty());
    let info = dm.info();
    assert_eq!(info[1].state, DeviceState::Failed);
    assert_eq!(info[1].failure.as_deref(), Some("connection lost"));
    assert_eq!(info[1].dma.entries, 0);
    assert_eq!(info[0].state, DeviceState::Attached);
    // Later conversions do not involve it and do not fail.
    convert(&memory, 20 * MIB, 4096, true).unwrap();
    assert!(flaky.mappings().is_empty());
    let removed = dm.remove("flaky").unwrap();
    assert_eq!(removed.state, DeviceState::Failed);
    assert_eq!(dm.info().len(), 1);
}

#[test]
fn attaching_after_shutdown_is_refused_and_leaves_nothing() {
    let Some(memory) = memory() else { return };
    convert(&memory, 16 * MIB, 4096, true).unwrap();
    let dm = manager(&memory);
    let iommu = Arc::new(FakeIommu::new(None));
    attach_fake(&dm, "early", &iommu, None).unwrap();
    let removed = dm.remove_all();
    assert_eq!(removed.len(), 1);
    assert!(iommu.mappings().is_empty());
    let late = Arc::new(FakeIommu::new(None));
    assert!(matches!(
        attach_fake(&dm, "late", &late, None),
        Err(DeviceError::ShuttingDown)
    ));
    assert!(late.mappings().is_empty());
    assert_eq!(listener_count(&memory), 0);
}

#[test]
fn a_to_private_split_past_the_entry_limit_is_refused_before_anything_changes() {
    let Some((memory, dm)) = memory_and_manager() else {
        return;
    };
    let iommu = Arc::new(FakeIommu::new(None));
    attach_fake(&dm, "one-entry", &iommu, Some(1)).unwrap();
    convert(&memory, 16 * MIB, 4 * 4096, true).unwrap();
    let before = shared_runs(&memory);
    // Cutting the middle page out would need a second entry.
    let err = convert(&memory, 16 * MIB + 4096, 4096, false).unwrap_err();
    assert!(matches!(err, ConversionFailure::ListenerFailed(_)), "{err}");
    assert_eq!(shared_runs(&memory), before);
    assert_eq!(iommu.mappings(), before);
    let info = &dm.info()[0];
    assert_eq!(info.state, DeviceState::Attached);
    assert_eq!((info.dma.refused, info.dma.lost_remaps), (1, 0));
    // An edge cut needs no extra entry and goes through; the page cannot
    // come back as a second mapping, and nothing was left reserved.
    convert(&memory, 16 * MIB, 4096, false).unwrap();
    convert(&memory, 16 * MIB, 4096, true).unwrap_err();
    let info = &dm.info()[0];
    assert_eq!((info.dma.entries, info.dma.refused), (1, 2));
    convert(&memory, 16 * MIB + 4096, 3 * 4096, false).unwrap();
    convert(&memory, 20 * MIB, 4096, true).unwrap();
}

#[test]
fn conversions_at_the_first_page_of_each_region() {
    let Some(memory) = two_region_memory() else {
        return;
    };
    let high = memory.regions()[1].gpa;
    let dm = manager(&memory);
    let iommu = Arc::new(FakeIommu::new(None));
    attach_fake(&dm, "dev0", &iommu, None).unwrap();
    assert_eq!(convert(&memory, 0, 4096, true).unwrap(), 1);
    assert_eq!(convert(&memory, high, 2 * 4096, true).unwrap(), 2);
    // Pages already shared do not count as changed.
    assert_eq!(convert(&memory, high, 3 * 4096, true).unwrap(), 1);
    convert(&memory, high + 4096, 2 * 4096, false).unwrap();
    assert_eq!(
        iommu.mappings(),
        vec![section(0, 4096), section(high, 4096)]
    );
    convert(&memory, high, 4096, false).unwrap();
    convert(&memory, 0, 4096, false).unwrap();
    assert!(iommu.mappings().is_empty());
}

#[test]
fn vfio_devices_get_the_backend_they_ask_for_and_one_shared_kvm_vfio_device() {
    let Some((vm, memory)) = vm_and_memory() else {
        return;
    };
    let device = |iommufd: Option<bool>| DeviceConfig {
        path: PathBuf::from("/sys/bus/pci/devices/0000:01:00.0/"),
        iommufd,
        ..Default::default()
    };
    for platform_default in [false, true] {
        let dm = manager(&memory).with_vfio_platform(vm.clone(), platform_default);
        let default = if platform_default {
            vfio::VfioBackend::Iommufd
        } else {
            vfio::VfioBackend::Type1
        };
        assert_eq!(dm.vfio_backend(&device(None)), default);
        assert_eq!(
            dm.vfio_backend(&device(Some(true))),
            vfio::VfioBackend::Iommufd
        );
        assert_eq!(
            dm.vfio_backend(&device(Some(false))),
            vfio::VfioBackend::Type1
        );

        // This host has neither /dev/vfio/vfio nor /dev/iommu: a clear
        // error naming what is missing and what to try, nothing attached.
        for (iommufd, missing, hint) in [
            (false, "/dev/vfio/vfio", "iommufd=on"),
            (true, "/dev/iommu", "iommufd=off"),
        ] {
            let chain = crate::error_chain(&dm.add_vfio(&device(Some(iommufd))).unwrap_err());
            assert!(chain.contains(missing) && chain.contains(hint), "{chain}");
        }
        assert!(dm.list().devices.is_empty());
        assert_eq!(listener_count(&memory), 0);
        // The KVM-VFIO device was created by the first attempt and is the
        // one every later VFIO device joins.
        let first = dm.vfio.kvm_vfio().unwrap();
        assert!(Arc::ptr_eq(&first, &dm.vfio.kvm_vfio().unwrap()));
    }
    // type1 caps the entries (the kernel's dma_entry_limit); iommufd has no
    // such cap.
    assert_eq!(vfio::VfioBackend::Type1.entry_limit(), Some(65535));
    assert_eq!(vfio::VfioBackend::Iommufd.entry_limit(), None);
    // Without a VM (unit tests' managers) there is no KVM-VFIO device to
    // join: refused before anything is opened.
    let chain = crate::error_chain(&manager(&memory).add_vfio(&device(None)).unwrap_err());
    assert!(chain.contains("KVM-VFIO"), "{chain}");
}

#[test]
fn per_page_mapping_past_type1s_entry_limit_needs_iommufd() {
    let Some(hv) = kvm() else { return };
    let vm = hv.create_vm(VmType::Default).unwrap();
    let memory = Arc::new(MemoryManager::new(vm, 512 * MIB, MemoryLayout::Auto).unwrap());
    let dm = manager(&memory);
    let attach = |id: &str, backend: vfio::VfioBackend, iommu: &Arc<FakeIommu>| {
        dm.attach(
            Attachment {
                id: id.to_string(),
                kind: DeviceKind::Vfio,
                path: PathBuf::from("/fake"),
                entry_limit: backend.entry_limit(),
                function: None,
                device_number: None,
                policy: MappingPolicy::Pages,
                dma_mode: None,
            },
            iommu.clone(),
        )
    };
    // 256 MiB shared, one entry per page: 65536 entries.
    let on_iommufd = Arc::new(FakeIommu::new(vfio::VfioBackend::Iommufd.entry_limit()));
    attach("iommufd", vfio::VfioBackend::Iommufd, &on_iommufd).unwrap();
    convert(&memory, 32 * MIB, 256 * MIB, true).unwrap();
    assert_eq!(on_iommufd.mappings().len(), 65536);
    assert_eq!(on_iommufd.violations(), 0);

    // The same on type1 would need one entry more than the kernel allows:
    // the replay is refused and nothing of it stays mapped.
    let on_type1 = Arc::new(FakeIommu::new(vfio::VfioBackend::Type1.entry_limit()));
    let chain =
        crate::error_chain(&attach("type1", vfio::VfioBackend::Type1, &on_type1).unwrap_err());
    assert!(chain.contains("DMA entry limit of 65535"), "{chain}");
    assert!(on_type1.mappings().is_empty());
    assert_eq!(on_iommufd.mappings().len(), 65536);
}

/// A manager with PCI segment 0 on `vm`.
fn pci_manager(
    memory: &Arc<MemoryManager>,
    vm: Arc<dyn hypervisor::Vm>,
) -> (DeviceManager, Arc<PciSegment>) {
    let segment = Arc::new(
        PciSegment::new(
            &vm_device::Bus::new(),
            Arc::new(vm_device::Bus::new()),
            memory.ram_end(),
            vm,
        )
        .unwrap(),
    );
    let dm = DeviceManager::new(
        memory.clone(),
        Arc::new(EventMonitor::disabled()),
        Some(segment.clone()),
    );
    (dm, segment)
}

/// As `pci_manager`, with VFIO devices opened by the fakes (the backend
/// each was opened on is recorded).
fn vfio_manager(
    memory: &Arc<MemoryManager>,
    vm: Arc<dyn hypervisor::Vm>,
    device: &Arc<super::fake_vfio::FakeVfioDevice>,
    container: &Arc<super::fake_vfio::FakeContainer>,
    backends: &Arc<Mutex<Vec<vfio::VfioBackend>>>,
) -> (DeviceManager, Arc<PciSegment>) {
    let (dm, segment) = pci_manager(memory, vm.clone());
    let (device, container, backends) = (device.clone(), container.clone(), backends.clone());
    let dm = dm.with_vfio_platform(vm, false).with_vfio_opener(Box::new(
        move |_path, backend, _kvm_vfio| {
            backends.lock().unwrap().push(backend);
            Ok(super::fake_vfio::opened(&device, &container))
        },
    ));
    (dm, segment)
}

#[test]
fn a_vfio_device_is_a_pci_function_whose_dma_follows_the_shared_pages() {
    use super::fake_vfio::{FakeContainer, FakeVfioDevice};
    let Some((vm, memory)) = vm_and_memory() else {
        return;
    };
    let ram = GuestRam::new(&memory);
    convert(&memory, 16 * MIB, 64 << 10, true).unwrap();
    let device = FakeVfioDevice::pci_function();
    let container = FakeContainer::new(Some(65535));
    let backends = Arc::new(Mutex::new(Vec::new()));
    let (dm, segment) = vfio_manager(&memory, vm, &device, &container, &backends);

    let config = DeviceConfig {
        path: PathBuf::from("/sys/bus/pci/devices/0000:01:00.0/"),
        id: Some("gpu0".into()),
        pci_device_id: Some(3),
        iommufd: Some(true),
        ..Default::default()
    };
    let info = dm.add_vfio(&config).unwrap();
    assert_eq!(*backends.lock().unwrap(), [vfio::VfioBackend::Iommufd]);
    assert_eq!(info.bdf.as_deref(), Some("0000:00:03.0"));
    assert_eq!(info.max_dma_maps, None, "iommufd has no entry limit");
    assert_eq!(segment.function(3), 0x5678_1234);
    // The function model reset the device while learning it, and read its
    // configuration space within bounds only.
    assert_eq!(device.resets(), 1);
    assert_eq!(device.violations(), Vec::<String>::new());

    // DMA: the shared pages at their host addresses, before and after
    // conversions.
    let expected = |memory: &MemoryManager| -> Vec<(u64, u64, u64)> {
        shared_runs(memory)
            .iter()
            .map(|s| (s.gpa, s.size, ram.host_address(s.gpa, s.size).unwrap()))
            .collect()
    };
    assert_eq!(container.mappings(), expected(&memory));
    convert(&memory, 20 * MIB, 8 << 10, true).unwrap();
    convert(&memory, 16 * MIB + (16 << 10), 4 << 10, false).unwrap();
    assert_eq!(container.mappings(), expected(&memory));
    assert_eq!(container.mappings().len(), 3);
    assert_eq!(container.iommu.violations(), 0);

    // Removed: off the bus, nothing mapped.
    dm.remove("gpu0").unwrap();
    assert_eq!(segment.function(3), 0xffff_ffff);
    assert!(container.mappings().is_empty());
    assert_eq!(listener_count(&memory), 0);

    // On type1 the kernel's entry limit applies.
    let info = dm
        .add_vfio(&DeviceConfig {
            iommufd: Some(false),
            ..config
        })
        .unwrap();
    assert_eq!(backends.lock().unwrap()[1], vfio::VfioBackend::Type1);
    assert_eq!(info.max_dma_maps, Some(65535));
    assert_eq!(container.mappings(), expected(&memory));
}

#[test]
fn a_vfio_device_without_a_pci_function_is_refused_with_nothing_mapped() {
    use super::fake_vfio::{FakeContainer, FakeVfioDevice};
    let Some((vm, memory)) = vm_and_memory() else {
        return;
    };
    convert(&memory, 16 * MIB, 4096, true).unwrap();
    let device = FakeVfioDevice::pci_function();
    device.poke(7, 0, &[0xff; 4]);
    let container = FakeContainer::new(None);
    let backends = Arc::new(Mutex::new(Vec::new()));
    let (dm, segment) = vfio_manager(&memory, vm, &device, &container, &backends);
    let err = dm
        .add_vfio(&DeviceConfig {
            path: PathBuf::from("/sys/bus/pci/devices/0000:01:00.0/"),
            ..Default::default()
        })
        .unwrap_err();
    let chain = crate::error_chain(&err);
    assert!(chain.contains("no PCI function answers"), "{chain}");
    assert!(container.mappings().is_empty());
    assert!(dm.info().is_empty());
    assert_eq!(listener_count(&memory), 0);
    assert_eq!(
        segment.function(1),
        0xffff_ffff,
        "nothing plugged after the host bridge"
    );
    // The platform default (type1 here) was asked for.
    assert_eq!(*backends.lock().unwrap(), [vfio::VfioBackend::Type1]);
}

/// A `ch-test-device` server on its own threads in this process, with its
/// control socket: a PCI function, or a DMA target only.
/// The guest memory a client reaches, the client (memory passed as fds)
/// of an in-process test device whose files `tag` names, and the device's
/// control socket; None without KVM. Bind the memory first, so that it
/// outlives the client (`GuestRam` holds its host addresses).
fn connected_test_device(tag: &str) -> Option<(Arc<MemoryManager>, VfioUserDma, PathBuf)> {
    let memory = memory()?;
    let (socket, ctl) = in_process_test_device(tag, false);
    let ram = Arc::new(GuestRam::new(&memory));
    let dma = VfioUserDma::connect(&socket, ram, Duration::from_secs(5), DmaMode::Fd).unwrap();
    Some((memory, dma, ctl))
}

/// The device's mappings, as it reports them.
fn device_maps(ctl: &std::path::Path) -> Vec<Section> {
    let answer = test_device::ask(ctl, "maps").unwrap();
    let maps: Vec<[u64; 2]> = serde_json::from_str(&answer).unwrap();
    maps.iter()
        .map(|&[gpa, size]| Section { gpa, size })
        .collect()
}

/// What `with_vfio_user_server` sets up.
struct UserDeviceFixture {
    memory: Arc<MemoryManager>,
    dm: DeviceManager,
    segment: Arc<PciSegment>,
    /// The added device.
    info: DeviceInfo,
    /// The server's control socket.
    ctl: PathBuf,
}

/// A manager with PCI segment 0, `shared` bytes at 16 MiB made shared, and
/// an in-process server (`in_process_test_device(tag, dma_only)`) added as
/// `config` says (its socket filled in); None without KVM.
fn with_vfio_user_server(
    tag: &str,
    dma_only: bool,
    shared: u64,
    config: UserDeviceConfig,
) -> Option<UserDeviceFixture> {
    let (vm, memory) = vm_and_memory()?;
    convert(&memory, 16 * MIB, shared, true).unwrap();
    let (socket, ctl) = in_process_test_device(tag, dma_only);
    let (dm, segment) = pci_manager(&memory, vm);
    let info = dm
        .add_vfio_user(&UserDeviceConfig { socket, ..config })
        .unwrap();
    Some(UserDeviceFixture {
        memory,
        dm,
        segment,
        info,
        ctl,
    })
}

#[test]
fn a_vfio_user_server_is_a_pci_function_whose_dma_follows_the_shared_pages() {
    let config = UserDeviceConfig {
        id: Some("nic0".into()),
        pci_device_id: Some(4),
        ..Default::default()
    };
    let Some(f) = with_vfio_user_server("pci", false, 64 << 10, config) else {
        return;
    };
    assert_eq!(f.info.bdf.as_deref(), Some("0000:00:04.0"));
    // The configuration space read over the connection.
    assert_eq!(
        f.segment.function(4),
        u32::from(test_device::pci::DEVICE_ID) << 16 | u32::from(test_device::pci::VENDOR_ID)
    );
    // BAR0 sized from the server's region and placed in the 32-bit hole.
    let bar0 = f.segment.bus().config_read(0, 4, 0, 4) & !0xf;
    assert!(
        (pci_segment::MMIO32_START..pci_segment::MMIO32_END).contains(&u64::from(bar0)),
        "{bar0:#x}"
    );
    // The guest enables MSI-X: the server gets an eventfd per vector.
    f.segment.bus().config_write(0, 4, 0, 0x40 / 4, 3, &[0x80]);
    let engine: serde_json::Value =
        serde_json::from_str(&test_device::ask(&f.ctl, "engine").unwrap()).unwrap();
    assert_eq!(engine["msix_fds"], test_device::pci::MSIX_VECTORS);

    assert_eq!(device_maps(&f.ctl), shared_runs(&f.memory));
    convert(&f.memory, 20 * MIB, 8 << 10, true).unwrap();
    convert(&f.memory, 16 * MIB + (16 << 10), 4 << 10, false).unwrap();
    assert_eq!(device_maps(&f.ctl), shared_runs(&f.memory));
    assert_eq!(device_maps(&f.ctl).len(), 3);

    f.dm.remove("nic0").unwrap();
    assert_eq!(f.segment.function(4), 0xffff_ffff);
    assert!(device_maps(&f.ctl).is_empty());
}

#[test]
fn a_cut_off_vfio_user_connection_reports_why_and_maps_nothing_more() {
    let Some((_memory, dma, ctl)) = connected_test_device("sever") else {
        return;
    };
    assert!(dma.offers_pci_function().unwrap());
    assert_eq!(dma.client().closed_reason(), None);
    dma.map(0x20_0000, 0x20_0000, 0x2000).unwrap();
    assert_eq!(device_maps(&ctl), [section(0x20_0000, 0x2000)]);
    dma.unmap(0x20_0000, 0x2000).unwrap();
    assert!(device_maps(&ctl).is_empty());
    // Cut off: the reason is kept, and nothing reaches the server any more
    // (a server whose client goes drops every mapping itself).
    assert_eq!(dma.cut_off("stopped answering"), CutOff::MappingsDropped);
    assert_eq!(dma.client().closed_reason(), Some("stopped answering"));
    let err = dma.map(0x20_0000, 0x20_0000, 0x1000).unwrap_err();
    assert!(err.is_broken(), "{err:?}");
    assert_eq!(err.to_string(), "stopped answering");
    assert!(device_maps(&ctl).is_empty());
}

/// The PCI model's calls reach the server through the adapter: a trapped
/// region write reads back, the mmappable scratch page is mapped, and a
/// reset takes back the interrupts the server was given.
#[test]
fn the_adapter_passes_region_writes_mmap_areas_and_reset_to_the_server() {
    use pci::VfioOps;
    use std::os::fd::AsRawFd;
    let Some((_memory, dma, ctl)) = connected_test_device("ops") else {
        return;
    };
    let (bar0, msix) = (0, 2);
    let at = test_device::pci::SCRATCH_OFFSET + 8;
    dma.region_write(bar0, at, &[1, 2, 3, 4]).unwrap();
    let mut back = [0u8; 4];
    dma.region_read(bar0, at, &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 4]);

    let areas = dma.map_region_areas(bar0).unwrap();
    let offered: Vec<(u64, u64)> = areas.iter().map(|a| (a.offset, a.size)).collect();
    assert_eq!(
        offered,
        [(
            test_device::pci::SCRATCH_OFFSET,
            test_device::pci::SCRATCH_SIZE
        )]
    );
    // SAFETY: the area is the server's scratch page, mapped read-write for
    // as long as `dma` lives; a 4-byte read at an offset inside it.
    let mapped = unsafe { std::ptr::read_volatile((areas[0].host + 8) as *const [u8; 4]) };
    assert_eq!(mapped, [1, 2, 3, 4], "the mapping is the server's page");

    let vectors: Vec<vmm_sys_util::eventfd::EventFd> = (0..test_device::pci::MSIX_VECTORS)
        .map(|_| vmm_sys_util::eventfd::EventFd::new(0).unwrap())
        .collect();
    let fds: Vec<_> = vectors.iter().map(|e| e.as_raw_fd()).collect();
    dma.set_irq_eventfds(msix, &fds).unwrap();
    let msix_fds = || -> serde_json::Value {
        let engine: serde_json::Value =
            serde_json::from_str(&test_device::ask(&ctl, "engine").unwrap()).unwrap();
        engine["msix_fds"].clone()
    };
    assert_eq!(msix_fds(), test_device::pci::MSIX_VECTORS);
    dma.reset().unwrap();
    assert_eq!(msix_fds(), 0, "a reset takes the interrupts back");
}

#[test]
fn a_vfio_user_server_that_is_no_pci_function_is_a_dma_target_only() {
    let Some(f) = with_vfio_user_server("dma", true, 8 << 10, UserDeviceConfig::default()) else {
        return;
    };
    assert_eq!(f.info.bdf, None, "nothing for the guest to find");
    assert_eq!(f.segment.function(1), 0xffff_ffff);
    assert_eq!(device_maps(&f.ctl), shared_runs(&f.memory));
    convert(&f.memory, 20 * MIB, 4 << 10, true).unwrap();
    assert_eq!(device_maps(&f.ctl), shared_runs(&f.memory));
    f.dm.remove(&f.info.id).unwrap();
    assert!(device_maps(&f.ctl).is_empty());
}

/// This process's server-request threads (their task ids).
fn dma_threads() -> Vec<u32> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == "vfio-user-dma")
        })
        .filter_map(|task| task.file_name().to_str()?.parse().ok())
        .collect()
}

/// How often task `tid` of this process went to sleep and woke.
fn wakeups(tid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

#[test]
fn a_message_dma_server_is_answered_between_requests_and_let_go_on_drop() {
    use std::os::unix::thread::JoinHandleExt;

    use vfio_user_client::DmaMemory;
    let Some(memory) = memory() else { return };
    let (socket, ctl) = in_process_test_device("messages", false);
    let ram = Arc::new(GuestRam::new(&memory));
    let before = dma_threads();
    // Dropped only at the end: a failed assertion must fail the test, not
    // hang it in the drop's join of a thread that never ends.
    let dma = std::mem::ManuallyDrop::new(
        VfioUserDma::connect(
            &socket,
            ram.clone(),
            Duration::from_secs(5),
            DmaMode::Messages,
        )
        .unwrap(),
    );
    // The thread names itself once it runs.
    let new_threads = || -> Vec<u32> {
        dma_threads()
            .into_iter()
            .filter(|t| !before.contains(t))
            .collect()
    };
    let started = std::time::Instant::now();
    let mut ours = new_threads();
    while ours.is_empty() && started.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
        ours = new_threads();
    }
    let [ours] = ours[..] else {
        panic!("{ours:?}: not one new server-request thread")
    };
    // With nothing arriving it sleeps in one wait, not in a polling loop.
    let woken = wakeups(ours);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        wakeups(ours) - woken < 10,
        "the server-request thread polls"
    );
    // The client serves the server's DMA as IOVA = GPA only.
    let err = dma.map(0x30_0000, 0x20_0000, 0x1000).unwrap_err();
    assert!(
        matches!(
            &err,
            DmaError::Refused(e) if matches!(
                e.downcast_ref::<VfioUserDmaError>(),
                Some(VfioUserDmaError::IovaNotGpa { .. })
            )
        ),
        "{err}"
    );
    assert!(device_maps(&ctl).is_empty());
    dma.map(0x20_0000, 0x20_0000, 0x2000).unwrap();
    assert_eq!(device_maps(&ctl), [section(0x20_0000, 0x2000)]);
    // A signal (a vCPU kick has no SA_RESTART) does not end the thread
    // that answers the server.
    let kick = vmm_sys_util::signal::SIGRTMIN() + 1;
    vmm_sys_util::signal::register_signal_handler(kick, ignore_signal).unwrap();
    let thread = dma.server_requests.as_ref().unwrap();
    assert_eq!(
        // SAFETY: signals a live thread of this process; the handler is
        // installed above.
        unsafe { libc::pthread_kill(thread.as_pthread_t(), kick) },
        0
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(!thread.is_finished(), "a signal ended the DMA thread");
    // The device's DMA arrives while no request of ours is in flight.
    assert_eq!(test_device::ask(&ctl, "write 0x201ffe 0x5a").unwrap(), "ok");
    let mut byte = [0u8; 1];
    ram.read(0x20_1ffe, &mut byte).unwrap();
    assert_eq!(byte, [0x5a]);
    ram.write(0x20_0010, &[0xa5]).unwrap();
    assert_eq!(test_device::ask(&ctl, "read 0x200010 1").unwrap(), "a5");
    assert!(!dma.server_requests.as_ref().unwrap().is_finished());
    // Let go: the connection closes, so the server drops its mappings.
    drop(std::mem::ManuallyDrop::into_inner(dma));
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !device_maps(&ctl).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the connection outlived its VfioUserDma"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn only_dma_fd_on_a_vm_that_does_not_enforce_private_memory_warns_of_it() {
    let Some(hv) = kvm() else { return };
    let vm = hv.create_vm(VmType::Default).unwrap();
    let memory = Arc::new(MemoryManager::new(vm, 32 * MIB, MemoryLayout::Anonymous).unwrap());
    assert!(!memory.tracks_attributes());
    let dm = manager(&memory);
    for (dma, warned) in [(DmaMode::Fd, true), (DmaMode::Messages, false)] {
        let (result, warnings) = crate::test_util::capture_warnings(|| {
            dm.add_vfio_user(&UserDeviceConfig {
                socket: PathBuf::from("/nonexistent"),
                dma,
                ..Default::default()
            })
        });
        // Refused afterwards all the same: this RAM has no fd to give.
        assert!(
            matches!(result, Err(DeviceError::NoFileBacking)),
            "{result:?}"
        );
        assert_eq!(
            warnings
                .iter()
                .any(|w| w.contains("dma=fd hands the server the guest RAM's fd")),
            warned,
            "{dma:?}: {warnings:?}"
        );
    }
}
