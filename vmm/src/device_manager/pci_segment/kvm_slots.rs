//! Mmapped BAR areas as KVM memory slots.

use std::sync::{Arc, Mutex};

use hypervisor::{UserMemoryRegion, Vm};
use log::warn;
use pci::GuestMemoryWindows;

/// KVM memory slots for mmapped BAR areas, above the slots RAM uses.
pub(super) const FIRST_BAR_SLOT: u32 = 256;
/// x86 KVM's user memory slot count.
pub(super) const SLOT_LIMIT: u32 = 509;

/// Mmapped BAR areas as KVM memory slots: guest accesses there do not exit.
pub(super) struct BarMemorySlots {
    vm: Arc<dyn Vm>,
    taken: Mutex<std::collections::BTreeSet<u32>>,
}

impl BarMemorySlots {
    pub(super) fn new(vm: Arc<dyn Vm>) -> Self {
        BarMemorySlots {
            vm,
            taken: Mutex::new(std::collections::BTreeSet::new()),
        }
    }
}

impl GuestMemoryWindows for BarMemorySlots {
    fn map(&self, gpa: u64, size: u64, host: u64) -> Result<u32, pci::WindowError> {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (FIRST_BAR_SLOT..SLOT_LIMIT)
            .find(|s| !taken.contains(s))
            .ok_or(pci::WindowError::NoFreeSlot)?;
        let region = UserMemoryRegion {
            slot,
            guest_phys_addr: gpa,
            size,
            userspace_addr: host,
            guest_memfd: None,
        };
        // SAFETY: `host..host+size` is a device's mmapped BAR area, which
        // its PCI function keeps mapped until after the bus has removed
        // this slot (unmap below), as `PciBus` does on every window change
        // and on unplug.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| pci::WindowError::Refused(e.into()))?;
        taken.insert(slot);
        Ok(slot)
    }

    fn unmap(&self, slot: u32) {
        let region = UserMemoryRegion {
            slot,
            guest_phys_addr: 0,
            size: 0,
            userspace_addr: 0,
            guest_memfd: None,
        };
        // SAFETY: a zero-size region deletes the slot; no host memory is
        // handed to KVM.
        match unsafe { self.vm.set_user_memory_region(region) } {
            Ok(()) => {
                self.taken
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&slot);
            }
            Err(e) => warn!("cannot delete BAR memory slot {slot}: {e}"),
        }
    }
}
