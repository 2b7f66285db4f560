//! Where a guest-physical range lives on the host, as assigned devices need
//! it: a host virtual address for VFIO, a file and offset for vfio-user.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::memory::MemoryManager;

struct Slice {
    gpa: u64,
    size: u64,
    host_addr: u64,
    file: Option<Arc<File>>,
}

/// A snapshot of the RAM layout (it never changes after boot).
pub struct GuestRam {
    slices: Vec<Slice>,
}

#[derive(Debug, thiserror::Error)]
pub enum GuestRamError {
    #[error("{gpa:#x}+{size:#x} is not inside one RAM region")]
    NotRam { gpa: u64, size: u64 },
    #[error("RAM at {0:#x} has no file backing to share")]
    NoFile(u64),
}

impl GuestRam {
    pub fn new(memory: &MemoryManager) -> Self {
        let slices = memory
            .regions()
            .iter()
            .map(|r| Slice {
                gpa: r.gpa,
                size: r.size,
                host_addr: memory
                    .guest_memory()
                    .get_host_address(GuestAddress(r.gpa))
                    .expect("region is mapped") as u64,
                file: r.backing.shared_file().cloned(),
            })
            .collect();
        GuestRam { slices }
    }

    fn slice(&self, gpa: u64, size: u64) -> Result<&Slice, GuestRamError> {
        self.slices
            .iter()
            .find(|s| gpa >= s.gpa && gpa.checked_add(size).is_some_and(|e| e <= s.gpa + s.size))
            .ok_or(GuestRamError::NotRam { gpa, size })
    }

    pub fn host_address(&self, gpa: u64, size: u64) -> Result<u64, GuestRamError> {
        let s = self.slice(gpa, size)?;
        Ok(s.host_addr + (gpa - s.gpa))
    }

    /// The shared view's fd and the offset of `gpa` in it.
    pub fn file_offset(&self, gpa: u64, size: u64) -> Result<(RawFd, u64), GuestRamError> {
        let s = self.slice(gpa, size)?;
        let file = s.file.as_ref().ok_or(GuestRamError::NoFile(gpa))?;
        Ok((file.as_raw_fd(), gpa - s.gpa))
    }

    /// Whether every region can be shared with another process by fd.
    pub fn all_file_backed(&self) -> bool {
        self.slices.iter().all(|s| s.file.is_some())
    }
}

impl super::vfio_user_client::DmaMemory for GuestRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        let host = self
            .host_address(gpa, buf.len() as u64)
            .map_err(|e| e.to_string())?;
        // SAFETY: `host..host+len` lies inside one RAM region, mapped for
        // the life of the VM; the guest may write it concurrently, which
        // a byte copy tolerates (no Rust reference into guest RAM is made).
        unsafe { std::ptr::copy(host as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let host = self
            .host_address(gpa, data.len() as u64)
            .map_err(|e| e.to_string())?;
        // SAFETY: as in `read`.
        unsafe { std::ptr::copy(data.as_ptr(), host as *mut u8, data.len()) };
        Ok(())
    }
}
