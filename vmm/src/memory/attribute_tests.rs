//! The conversion path where the VM type tracks memory attributes, run on
//! real guest_memfd RAM through `AttributeTrackingVm` (KVM's rules, kept in
//! memory, since no VM type here has attributes): every guest_memfd region
//! is private at creation, every conversion sets the attributes, and every
//! refusal restores them, with devices and state unchanged.

use std::sync::Arc;

use hypervisor::attribute_tracking::AttributeTrackingVm;
use hypervisor::{Hypervisor, VmType};
use vm_device::fake_iommu::FakeIommu;
use vm_device::{DmaMappingListener, Section};

use super::*;
use crate::test_util::{convert, kvm};

const MIB: u64 = 1 << 20;

fn tracked(size: u64) -> Option<(Arc<AttributeTrackingVm>, MemoryManager)> {
    let vm = Arc::new(AttributeTrackingVm::new(
        kvm()?.create_vm(VmType::Default).unwrap(),
    ));
    let memory = MemoryManager::new(vm.clone(), size, MemoryLayout::Auto).unwrap();
    Some((vm, memory))
}

fn attach(
    memory: &MemoryManager,
    iommu: &Arc<FakeIommu>,
    limit: Option<u64>,
) -> Arc<DmaMappingListener> {
    let listener = Arc::new(DmaMappingListener::new(iommu.clone(), limit));
    for region in memory.regions() {
        let attrs = region.attributes.as_ref().unwrap();
        attrs
            .register_listener(
                listener.clone(),
                Section {
                    gpa: region.gpa,
                    size: region.size,
                },
            )
            .unwrap();
    }
    listener
}

#[test]
fn every_guest_memfd_region_is_private_before_the_guest_runs() {
    let Some((vm, memory)) = tracked((3 << 30) + 64 * MIB) else {
        return;
    };
    let expected: Vec<(u64, u64)> = memory.regions().iter().map(|r| (r.gpa, r.size)).collect();
    assert_eq!(expected.len(), 2);
    assert_eq!(vm.private_ranges(), expected);
}

#[test]
fn conversions_set_the_attributes_both_ways() {
    let Some((vm, memory)) = tracked(64 * MIB) else {
        return;
    };
    convert(&memory, 16 * MIB, 8 * 4096, true).unwrap();
    assert_eq!(
        vm.private_ranges(),
        [(0, 16 * MIB), (16 * MIB + 8 * 4096, 48 * MIB - 8 * 4096)]
    );
    convert(&memory, 16 * MIB + 4096, 4096, false).unwrap();
    assert!(vm.is_private(16 * MIB + 4096, 4096));
    assert!(!vm.is_private(16 * MIB, 4096));
    assert!(!vm.is_private(16 * MIB + 2 * 4096, 4096));
}

#[test]
fn a_refused_attribute_change_changes_nothing_anywhere() {
    let Some((vm, memory)) = tracked(64 * MIB) else {
        return;
    };
    let iommu = Arc::new(FakeIommu::new(None));
    // Room for one split: the to-private below reserves it.
    let listener = attach(&memory, &iommu, Some(2));
    convert(&memory, 16 * MIB, 4 * 4096, true).unwrap();
    let private_before = vm.private_ranges();
    let maps_before = iommu.mappings();

    // To-shared refused by KVM: no device mapped anything.
    vm.fail_next_calls(1);
    let err = convert(&memory, 20 * MIB, 4096, true).unwrap_err();
    assert!(matches!(err, ConversionFailure::Hypervisor(_)), "{err}");
    // To-private refused by KVM: the split it would need was reserved and
    // is released again (a later populate at the limit still fits).
    vm.fail_next_calls(1);
    let err = convert(&memory, 16 * MIB + 4096, 4096, false).unwrap_err();
    assert!(matches!(err, ConversionFailure::Hypervisor(_)), "{err}");
    assert_eq!(vm.private_ranges(), private_before);
    assert_eq!(iommu.mappings(), maps_before);
    assert_eq!(listener.stats().maps, 1);
    let attrs = memory.regions()[0].attributes.as_ref().unwrap();
    assert_eq!(attrs.shared_bytes(), 4 * 4096);
    assert_eq!(attrs.counters().failed, 2);

    // The refused to-private gave its reserved entry back: the same split
    // now fits in the limit.
    convert(&memory, 16 * MIB + 4096, 4096, false).unwrap();
    assert_eq!(iommu.mappings().len(), 2);
    assert!(vm.is_private(16 * MIB + 4096, 4096));
}

#[test]
fn a_device_refusal_restores_private_only_where_it_was_private() {
    let Some((vm, memory)) = tracked(64 * MIB) else {
        return;
    };
    let iommu = Arc::new(FakeIommu::new(None));
    let _listener = attach(&memory, &iommu, None);
    // Page 1 of the range is already shared; pages 0, 2 and 3 are private.
    convert(&memory, 16 * MIB + 4096, 4096, true).unwrap();
    iommu.fail_next_maps(2);
    let err = convert(&memory, 16 * MIB, 4 * 4096, true).unwrap_err();
    assert!(matches!(err, ConversionFailure::ListenerFailed(_)), "{err}");
    assert!(vm.is_private(16 * MIB, 4096));
    assert!(
        !vm.is_private(16 * MIB + 4096, 4096),
        "was shared, stays shared"
    );
    assert!(vm.is_private(16 * MIB + 2 * 4096, 2 * 4096));
    assert_eq!(
        iommu.mappings(),
        [Section {
            gpa: 16 * MIB + 4096,
            size: 4096
        }]
    );
}

#[test]
fn what_the_manager_reports_of_its_vm_and_regions() {
    let Some((_vm, memory)) = tracked(64 * MIB) else {
        return;
    };
    assert!(memory.tracks_attributes());
    assert!(memory.is_guest_memfd());
    let plain = kvm().unwrap().create_vm(VmType::Default).unwrap();
    let anonymous = MemoryManager::new(plain.clone(), 64 * MIB, MemoryLayout::Anonymous).unwrap();
    assert!(!anonymous.tracks_attributes());
    assert!(!anonymous.is_guest_memfd());
}

#[test]
fn the_page_below_4_gib_is_mmio_even_with_ram_above() {
    let Some((_vm, memory)) = tracked((3 << 30) + 64 * MIB) else {
        return;
    };
    // The last page of the hole ends exactly where the upper RAM begins.
    assert_eq!(
        convert(&memory, MMIO_HOLE_END - 4096, 4096, true).unwrap(),
        0
    );
    assert_eq!(memory.unbacked_to_shared(), 1);
    // One more page reaches RAM: half RAM, half hole, refused.
    assert!(convert(&memory, MMIO_HOLE_END - 4096, 2 * 4096, true).is_err());
    assert_eq!(convert(&memory, MMIO_HOLE_END, 4096, true).unwrap(), 1);
    let totals = memory.conversion_totals();
    assert_eq!(
        (totals.to_shared, totals.pages_to_shared, totals.failed),
        (1, 1, 1)
    );
    assert_eq!(convert(&memory, MMIO_HOLE_END, 4096, false).unwrap(), 1);
    assert_eq!(memory.conversion_totals().pages_to_private, 1);
}

#[test]
fn a_vm_type_without_attributes_converts_without_asking_for_them() {
    let Some(kvm) = kvm() else {
        return;
    };
    let vm = kvm.create_vm(VmType::Default).unwrap();
    // KVM refuses attribute changes on this VM type: a conversion that
    // asked for one would fail.
    assert!(!vm.supports_memory_attributes());
    let memory = MemoryManager::new(vm, 64 * MIB, MemoryLayout::Auto).unwrap();
    convert(&memory, 16 * MIB, 4096, true).unwrap();
    convert(&memory, 16 * MIB, 4096, false).unwrap();
    assert_eq!(memory.conversion_totals().failed, 0);
}
