//! How a region's memory is provided, and how conversions discard the half
//! that is no longer used.
//!
//! - `Anonymous`: plain process memory, no private state (not convertible).
//! - `GuestMemfdInPlace`: one guest_memfd created with `MMAP | INIT_SHARED`
//!   whose mmap is the host view. Shared and private are the same pages, so a
//!   conversion frees nothing and page contents survive it.
//! - `GuestMemfdSplit`: the layout of TDX / SEV-SNP hosts: a shared memfd is
//!   the host view and a separate guest_memfd holds private pages. To-private
//!   punches the shared pages out of the memfd; to-shared punches the private
//!   pages out of the guest_memfd. The side a page comes to reads as zeros.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use hypervisor::caps::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};
use hypervisor::{Vm, VmType};
use log::warn;
use vm_memory::FileOffset;
use vm_memory::mmap::{MmapRegion, MmapRegionError};

/// Requested layout; `Auto` picks in-place where the host supports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemoryLayout {
    Anonymous,
    #[default]
    Auto,
    InPlace,
    Split,
}

#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("guest_memfd")]
    GuestMemfd(#[source] hypervisor::HypervisorError),
    #[error("this host cannot mmap guest_memfd (in-place layout unavailable)")]
    InPlaceUnsupported,
    #[error("memfd_create")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size the shared memfd")]
    Truncate(#[source] std::io::Error),
}

pub enum Backing {
    Anonymous,
    GuestMemfdInPlace { gmem: Arc<File> },
    GuestMemfdSplit { shared: Arc<File>, gmem: Arc<File> },
}

fn punch_hole(file: &File, offset: u64, size: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on an fd we own, with no pointers involved.
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            size as libc::off_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// guest_memfd flags of the in-place layout. A default VM has no private
/// memory: its pages must start shared or the guest cannot touch them. A
/// confidential VM's pages start private, as the RamBlockAttribute and the
/// KVM attributes say they are.
fn in_place_flags(vm_type: VmType) -> u64 {
    match vm_type {
        VmType::Default => GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
        _ => GUEST_MEMFD_FLAG_MMAP,
    }
}

impl Backing {
    pub fn create(vm: &dyn Vm, size: u64, layout: MemoryLayout) -> Result<Self, BackingError> {
        let caps = vm.capabilities();
        let layout = match layout {
            MemoryLayout::Auto if caps.guest_memfd_in_place() => MemoryLayout::InPlace,
            MemoryLayout::Auto => MemoryLayout::Split,
            other => other,
        };
        let gmem = |flags| -> Result<Arc<File>, BackingError> {
            let fd: OwnedFd = vm
                .create_guest_memfd(size, flags)
                .map_err(BackingError::GuestMemfd)?;
            Ok(Arc::new(File::from(fd)))
        };
        Ok(match layout {
            MemoryLayout::Anonymous => Backing::Anonymous,
            MemoryLayout::InPlace | MemoryLayout::Auto => {
                if !caps.guest_memfd_in_place() {
                    return Err(BackingError::InPlaceUnsupported);
                }
                Backing::GuestMemfdInPlace {
                    gmem: gmem(in_place_flags(vm.vm_type()))?,
                }
            }
            MemoryLayout::Split => {
                let shared = memfd(size)?;
                Backing::GuestMemfdSplit {
                    shared: Arc::new(shared),
                    gmem: gmem(0)?,
                }
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backing::Anonymous => "anonymous",
            Backing::GuestMemfdInPlace { .. } => "guest_memfd",
            Backing::GuestMemfdSplit { .. } => "guest_memfd+memfd",
        }
    }

    pub fn is_guest_memfd(&self) -> bool {
        !matches!(self, Backing::Anonymous)
    }

    pub fn guest_memfd(&self) -> Option<i32> {
        match self {
            Backing::Anonymous => None,
            Backing::GuestMemfdInPlace { gmem } | Backing::GuestMemfdSplit { gmem, .. } => {
                Some(gmem.as_raw_fd())
            }
        }
    }

    /// The file that holds the host-visible (shared) view, if any: what a
    /// vfio-user server is given to mmap.
    pub fn shared_file(&self) -> Option<&Arc<File>> {
        match self {
            Backing::Anonymous => None,
            Backing::GuestMemfdInPlace { gmem } => Some(gmem),
            Backing::GuestMemfdSplit { shared, .. } => Some(shared),
        }
    }

    /// Maps the host view of the region.
    pub fn map_shared_view(&self, size: u64) -> Result<MmapRegion, MmapRegionError> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        match self.shared_file() {
            Some(file) => MmapRegion::build(
                Some(FileOffset::from_arc(file.clone(), 0)),
                size as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            ),
            None => MmapRegion::build(
                None,
                size as usize,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            ),
        }
    }

    /// Frees the backing that `offset..offset+size` no longer uses after a
    /// conversion. Failing to free memory is not a correctness problem, so it
    /// is logged and reported, never undone.
    pub fn discard_after_conversion(&self, offset: u64, size: u64, to_shared: bool) -> bool {
        let target = match self {
            Backing::Anonymous | Backing::GuestMemfdInPlace { .. } => return true,
            Backing::GuestMemfdSplit { shared, gmem } => {
                if to_shared {
                    gmem
                } else {
                    shared
                }
            }
        };
        match punch_hole(target, offset, size) {
            Ok(()) => true,
            Err(e) => {
                warn!("cannot discard {offset:#x}+{size:#x} after conversion: {e}");
                false
            }
        }
    }
}

fn memfd(size: u64) -> Result<File, BackingError> {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is checked.
    let fd = unsafe { libc::memfd_create(c"guest-shared".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(BackingError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: memfd_create just returned this fd and nothing else owns it.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size).map_err(BackingError::Truncate)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_default_vms_start_their_in_place_pages_shared() {
        assert_eq!(
            in_place_flags(VmType::Default),
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
        );
        for confidential in [VmType::SwProtected, VmType::SevSnp, VmType::Tdx] {
            assert_eq!(in_place_flags(confidential), GUEST_MEMFD_FLAG_MMAP);
        }
    }
}
