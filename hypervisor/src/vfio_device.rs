//! The VM's KVM-VFIO pseudo device, handed out in the form vfio-ioctls
//! takes it: VFIO groups and device cdevs join it so KVM learns which
//! devices may do non-coherent DMA. Callers pass it to vfio-ioctls without
//! naming a KVM type.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

/// A KVM device of type `KVM_DEV_TYPE_VFIO` (`Vm::create_vfio_device`).
#[derive(Debug)]
pub struct KvmVfioDevice {
    fd: OwnedFd,
}

impl KvmVfioDevice {
    /// `fd` must be a KVM device fd (or, in test doubles, a descriptor that
    /// is never used as one).
    pub(crate) fn new(fd: OwnedFd) -> Self {
        KvmVfioDevice { fd }
    }

    /// The handle vfio-ioctls' `VfioContainer` and `VfioIommufd` take.
    pub fn into_vfio_device_fd(self) -> vfio_ioctls::VfioDeviceFd {
        // SAFETY: `self.fd` is a KVM device fd that we own; its ownership
        // moves into the DeviceFd, which closes it when dropped.
        let device = unsafe { kvm_ioctls::DeviceFd::from_raw_fd(self.fd.into_raw_fd()) };
        vfio_ioctls::VfioDeviceFd::new_from_kvm(device)
    }
}

impl AsFd for KvmVfioDevice {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for KvmVfioDevice {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
