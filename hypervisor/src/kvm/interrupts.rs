//! A KVM VM's interrupt plumbing and clock: MSI routes, irqfds,
//! `KVM_SIGNAL_MSI` (how a split irqchip's userspace IOAPIC delivers), the
//! KVM-VFIO device, and the VM-scope TSC frequency a TD needs.

use std::os::fd::{AsRawFd, BorrowedFd};

use kvm_bindings::{
    KVM_IRQ_ROUTING_MSI, KvmIrqRouting, kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO,
    kvm_irq_routing_entry, kvm_irq_routing_msi, kvm_msi,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_val};

use super::{KvmVm, io_err};
use crate::{HypervisorError, MsiRoute, Result};

// `_IO(KVMIO, 0xa2)` and `_IO(KVMIO, 0xa3)`: on the VM fd they set and
// read the frequency vCPUs get (`KVM_CAP_VM_TSC_CONTROL`).
vmm_sys_util::ioctl_io_nr!(KVM_SET_TSC_KHZ, kvm_bindings::KVMIO, 0xa2);
vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);

impl KvmVm {
    pub(super) fn vfio_device(&self) -> Result<crate::KvmVfioDevice> {
        let mut request = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let device = self
            .fd
            .create_device(&mut request)
            .map_err(|e| HypervisorError::CreateVfioDevice(io_err(e)))?;
        // SAFETY: the fd belongs to `device`, which is alive for this call;
        // the clone is a new descriptor of our own.
        unsafe { BorrowedFd::borrow_raw(device.as_raw_fd()) }
            .try_clone_to_owned()
            .map(crate::KvmVfioDevice::new)
            .map_err(HypervisorError::CreateVfioDevice)
    }

    pub(super) fn msi_routes(&self, routes: &[MsiRoute]) -> Result<()> {
        if !self.irqchip {
            return Err(HypervisorError::NoIrqchip);
        }
        let mut table = KvmIrqRouting::new(0).map_err(|_| {
            HypervisorError::GsiRouting(routes.len(), std::io::Error::other("too many"))
        })?;
        for route in routes {
            let mut entry = kvm_irq_routing_entry {
                gsi: route.gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            entry.u.msi = kvm_irq_routing_msi {
                address_lo: ::arch::low32(route.address),
                address_hi: ::arch::high32(route.address),
                data: route.data,
                ..Default::default()
            };
            table.push(entry).map_err(|_| {
                HypervisorError::GsiRouting(routes.len(), std::io::Error::other("too many routes"))
            })?;
        }
        self.fd
            .set_gsi_routing(&table)
            .map_err(|e| HypervisorError::GsiRouting(routes.len(), io_err(e)))
    }

    /// Registers (or unregisters) `fd` as the irqfd of `gsi`.
    pub(super) fn irqfd(&self, fd: &EventFd, gsi: u32, register: bool) -> Result<()> {
        if register && !self.irqchip {
            return Err(HypervisorError::NoIrqchip);
        }
        let done = if register {
            self.fd.register_irqfd(fd, gsi)
        } else {
            self.fd.unregister_irqfd(fd, gsi)
        };
        done.map_err(|e| HypervisorError::Irqfd {
            action: if register { "register" } else { "unregister" },
            gsi,
            source: io_err(e),
        })
    }

    /// `KVM_SIGNAL_MSI`: one interrupt to the in-kernel LAPICs.
    pub(super) fn msi(&self, address: u64, data: u32) -> Result<()> {
        if !self.irqchip {
            return Err(HypervisorError::NoIrqchip);
        }
        let msi = kvm_msi {
            address_lo: ::arch::low32(address),
            address_hi: ::arch::high32(address),
            data,
            ..Default::default()
        };
        self.fd
            .signal_msi(msi)
            .map(|_| ())
            .map_err(|e| HypervisorError::SignalMsi {
                address,
                data,
                source: io_err(e),
            })
    }
}

/// The VM's `KVM_GET_TSC_KHZ`: the frequency vCPUs created now get.
pub(super) fn tsc_khz(vm: &VmFd) -> Result<u32> {
    // SAFETY: KVM_GET_TSC_KHZ takes no argument and touches no memory of
    // ours; the VM fd is alive for the call.
    let ret = unsafe { ioctl(vm, KVM_GET_TSC_KHZ()) };
    u32::try_from(ret).map_err(|_| HypervisorError::GetTscKhz(std::io::Error::last_os_error()))
}

/// The VM's `KVM_SET_TSC_KHZ` (`KVM_CAP_VM_TSC_CONTROL`): the frequency of
/// every vCPU created from now on; KVM refuses it once a vCPU exists.
pub(super) fn set_tsc_khz(vm: &VmFd, khz: u32) -> Result<()> {
    // SAFETY: KVM_SET_TSC_KHZ takes its argument by value and touches no
    // memory of ours; the VM fd is alive for the call.
    let ret = unsafe { ioctl_with_val(vm, KVM_SET_TSC_KHZ(), u64::from(khz)) };
    if ret < 0 {
        return Err(HypervisorError::SetTscKhz(
            khz,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
