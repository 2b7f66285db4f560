//! The userspace half of a split irqchip (what KVM gives a TD): the
//! IOAPIC model (`ioapic.rs`) on the VM's MMIO bus at `IOAPIC_START`,
//! delivering each interrupt as the MSI its redirection entry makes of it
//! (`KVM_SIGNAL_MSI` to the in-kernel LAPICs), and told of the guest's
//! EOIs of level-triggered vectors by `KVM_EXIT_IOAPIC_EOI`. For KVM to
//! report those EOIs, the unmasked pins' messages are KVM's GSI routes
//! 0..23 (KVM scans them for level-triggered vectors). Only VMs with a
//! split irqchip get one; every other VM keeps KVM's in-kernel IOAPIC.
//!
//! Nothing here blocks: the model's lock is held for a register access or
//! an EOI, and the MSIs go out after it is released.

use std::sync::{Arc, Mutex, MutexGuard};

use hypervisor::MsiRoute;
use log::{debug, warn};
use vm_device::BusDevice;

use super::ioapic::{IOAPIC_PINS, Ioapic};
use crate::device_manager::pci_segment::MsiRouter;

/// Where the interrupts go: `KVM_SIGNAL_MSI` on the VM in a boot.
pub type MsiSink = Box<dyn Fn(&MsiRoute) -> hypervisor::Result<()> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum SplitIrqchipError {
    #[error("IOAPIC pin {0} does not exist (it has {IOAPIC_PINS})")]
    NoSuchPin(usize),
}

pub struct SplitIoapic {
    ioapic: Mutex<Ioapic>,
    sink: MsiSink,
    /// KVM's GSI routes, where the pins' messages go for EOI scanning.
    router: Option<Arc<MsiRouter>>,
}

impl SplitIoapic {
    /// The IOAPIC of `vm`'s split irqchip, delivering through KVM.
    pub fn for_vm(vm: Arc<dyn hypervisor::Vm>, router: Option<Arc<MsiRouter>>) -> Self {
        Self::new(
            Box::new(move |msi| vm.signal_msi(msi.address, msi.data)),
            router,
        )
    }

    pub fn new(sink: MsiSink, router: Option<Arc<MsiRouter>>) -> Self {
        SplitIoapic {
            ioapic: Mutex::new(Ioapic::new()),
            sink,
            router,
        }
    }

    fn model(&self) -> MutexGuard<'_, Ioapic> {
        self.ioapic.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn deliver(&self, deliveries: impl IntoIterator<Item = MsiRoute>) {
        for msi in deliveries {
            debug!(
                "IOAPIC pin {} -> MSI {:#x} data {:#x}",
                msi.gsi, msi.address, msi.data
            );
            if let Err(e) = (self.sink)(&msi) {
                warn!("IOAPIC pin {}: the MSI was not delivered: {e}", msi.gsi);
            }
        }
    }

    /// A device's line into pin `pin` is now `asserted`.
    pub fn set_irq(&self, pin: usize, asserted: bool) -> Result<(), SplitIrqchipError> {
        if pin >= IOAPIC_PINS {
            return Err(SplitIrqchipError::NoSuchPin(pin));
        }
        let delivery = self.model().set_irq(pin, asserted);
        self.deliver(delivery);
        Ok(())
    }

    /// `KVM_EXIT_IOAPIC_EOI`: the guest's EOI of `vector`.
    pub fn end_of_interrupt(&self, vector: u8) {
        let deliveries = self.model().end_of_interrupt(vector);
        self.deliver(deliveries);
    }
}

impl BusDevice for SplitIoapic {
    fn read(&self, offset: u64, data: &mut [u8]) {
        // The registers are 32 bits wide and read as such; anything else
        // reads as zeros.
        data.fill(0);
        if data.len() == 4 {
            data.copy_from_slice(&self.model().read(offset).to_le_bytes());
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            debug!("IOAPIC: {}-byte write at {offset:#x} ignored", data.len());
            return;
        };
        let delivery = {
            let mut model = self.model();
            let before = model.msi_routes();
            let delivery = model.write(offset, u32::from_le_bytes(bytes));
            let after = model.msi_routes();
            // Under the model's lock, so KVM's routes follow the entries
            // in the order the guest wrote them (the ioctl does not block).
            if after != before
                && let Some(router) = &self.router
                && let Err(e) = router.set_ioapic_routes(&after)
            {
                warn!("IOAPIC: KVM did not take the pins' routes: {e}");
            }
            delivery
        };
        self.deliver(delivery);
    }
}

#[cfg(test)]
mod tests;
