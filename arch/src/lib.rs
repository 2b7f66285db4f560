//! The guest's x86_64 physical address layout (`layout`), shared by the
//! hypervisor boundary, the PCI model and the VMM.

pub mod layout;
