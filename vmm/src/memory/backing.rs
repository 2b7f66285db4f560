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
            offset.cast_signed(),
            size.cast_signed(),
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

/// The layout `requested` resolves to on a host that can (or cannot)
/// mmap guest_memfd.
fn resolve_layout(
    requested: MemoryLayout,
    in_place_supported: bool,
) -> Result<MemoryLayout, BackingError> {
    match requested {
        MemoryLayout::Auto if in_place_supported => Ok(MemoryLayout::InPlace),
        MemoryLayout::Auto => Ok(MemoryLayout::Split),
        MemoryLayout::InPlace if !in_place_supported => Err(BackingError::InPlaceUnsupported),
        other => Ok(other),
    }
}

impl Backing {
    pub fn create(vm: &dyn Vm, size: u64, layout: MemoryLayout) -> Result<Self, BackingError> {
        let layout = resolve_layout(layout, vm.capabilities().guest_memfd_in_place())?;
        let gmem = |flags| -> Result<Arc<File>, BackingError> {
            let fd: OwnedFd = vm
                .create_guest_memfd(size, flags)
                .map_err(BackingError::GuestMemfd)?;
            Ok(Arc::new(File::from(fd)))
        };
        Ok(match layout {
            MemoryLayout::Anonymous => Backing::Anonymous,
            MemoryLayout::InPlace | MemoryLayout::Auto => Backing::GuestMemfdInPlace {
                gmem: gmem(in_place_flags(vm.vm_type()))?,
            },
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
                arch::usize_from(size),
                prot,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            ),
            None => MmapRegion::build(
                None,
                arch::usize_from(size),
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
    use std::os::unix::fs::FileExt;

    use hypervisor::Hypervisor;

    use super::*;

    use arch::layout::PAGE_SIZE as PAGE;

    #[test]
    fn auto_is_in_place_where_the_host_can_mmap_guest_memfd() {
        use MemoryLayout::*;
        let resolved = |requested, supported| resolve_layout(requested, supported).ok();
        assert_eq!(resolved(Auto, true), Some(InPlace));
        assert_eq!(resolved(Auto, false), Some(Split));
        assert_eq!(resolved(InPlace, true), Some(InPlace));
        assert!(matches!(
            resolve_layout(InPlace, false),
            Err(BackingError::InPlaceUnsupported)
        ));
        for supported in [true, false] {
            assert_eq!(resolved(Split, supported), Some(Split));
            assert_eq!(resolved(Anonymous, supported), Some(Anonymous));
        }
    }

    fn backings() -> Option<[Backing; 3]> {
        let vm = crate::test_util::kvm()?.create_vm(VmType::Default).unwrap();
        let create = |layout| Backing::create(vm.as_ref(), 16 * PAGE, layout).unwrap();
        Some([
            create(MemoryLayout::Anonymous),
            create(MemoryLayout::InPlace),
            create(MemoryLayout::Split),
        ])
    }

    #[test]
    fn each_layout_names_its_files() {
        let Some([anonymous, in_place, split]) = backings() else {
            return;
        };
        assert_eq!(
            [&anonymous, &in_place, &split].map(Backing::name),
            ["anonymous", "guest_memfd", "guest_memfd+memfd"]
        );
        assert!(anonymous.guest_memfd().is_none() && anonymous.shared_file().is_none());
        // In place, the guest_memfd is the shared view; split, they differ.
        let fd = |f: Option<&Arc<File>>| f.map(|f| f.as_raw_fd());
        assert!(in_place.guest_memfd().is_some());
        assert_eq!(fd(in_place.shared_file()), in_place.guest_memfd());
        assert!(split.guest_memfd().is_some() && split.shared_file().is_some());
        assert_ne!(fd(split.shared_file()), split.guest_memfd());
        assert_eq!(
            split.shared_file().unwrap().metadata().unwrap().len(),
            16 * PAGE
        );
    }

    /// The first byte of each of the first four pages of `backing`'s
    /// host view, after writing `fill` (if any) there.
    fn first_bytes(view: &MmapRegion, fill: Option<[u8; 4]>) -> [u8; 4] {
        let base = view.as_ptr();
        let mut seen = [0u8; 4];
        for page in 0..4 {
            // SAFETY: `view` maps 16 pages; page * PAGE is inside it. Raw
            // volatile accesses, no reference into the mapping.
            unsafe {
                let byte = base.add(page * arch::usize_from(PAGE));
                if let Some(fill) = fill {
                    byte.write_volatile(fill[page]);
                }
                seen[page] = byte.read_volatile();
            }
        }
        seen
    }

    #[test]
    fn split_conversions_free_the_side_the_pages_left() {
        let Some([anonymous, in_place, split]) = backings() else {
            return;
        };
        let view = split.map_shared_view(16 * PAGE).unwrap();
        first_bytes(&view, Some([1, 2, 3, 4]));
        // To private: pages 1 and 2 leave the shared view and read as zeros.
        assert!(split.discard_after_conversion(PAGE, 2 * PAGE, false));
        assert_eq!(first_bytes(&view, None), [1, 0, 0, 4]);
        // The view is the shared memfd itself.
        let mut b = [0u8; 1];
        split
            .shared_file()
            .unwrap()
            .read_exact_at(&mut b, 3 * PAGE)
            .unwrap();
        assert_eq!(b, [4]);
        // To shared: what is freed is the private copy; the shared view
        // keeps its bytes.
        assert!(split.discard_after_conversion(0, 4 * PAGE, true));
        assert_eq!(first_bytes(&view, None), [1, 0, 0, 4]);
        // A range the kernel refuses is reported, not undone.
        assert!(!split.discard_after_conversion(u64::MAX - PAGE + 1, PAGE, false));
        // Nothing to free in the other layouts: contents survive.
        for backing in [&in_place, &anonymous] {
            let view = backing.map_shared_view(16 * PAGE).unwrap();
            first_bytes(&view, Some([5, 6, 7, 8]));
            assert!(backing.discard_after_conversion(0, 4 * PAGE, false));
            assert!(backing.discard_after_conversion(0, 4 * PAGE, true));
            assert_eq!(first_bytes(&view, None), [5, 6, 7, 8]);
        }
    }

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
