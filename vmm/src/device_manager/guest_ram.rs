//! Where a guest-physical range lives on the host, as assigned devices need
//! it: a host virtual address for VFIO, a file and offset for vfio-user.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vfio_user_client::DmaMemoryError;
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

impl vfio_user_client::DmaMemory for GuestRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaMemoryError> {
        let host = self.host_address(gpa, buf.len() as u64)?;
        // SAFETY: `host..host+len` lies inside one RAM region, mapped for
        // the life of the VM; the guest may write it concurrently, which
        // a byte copy tolerates (no Rust reference into guest RAM is made).
        unsafe { std::ptr::copy(host as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaMemoryError> {
        let host = self.host_address(gpa, data.len() as u64)?;
        // SAFETY: as in `read`.
        unsafe { std::ptr::copy(data.as_ptr(), host as *mut u8, data.len()) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_user_client::DmaMemory;

    const LOW: u64 = 0x1000_0000;
    const HIGH: u64 = 0x1_0000_0000;

    /// Two regions over `host` (12 KiB): 8 KiB at LOW with a file, 4 KiB
    /// at HIGH with `high_file`.
    fn ram(host: &mut [u8], high_file: bool) -> GuestRam {
        let file = || Arc::new(File::open("/dev/null").unwrap());
        let base = host.as_mut_ptr() as u64;
        GuestRam {
            slices: vec![
                Slice {
                    gpa: LOW,
                    size: 8192,
                    host_addr: base,
                    file: Some(file()),
                },
                Slice {
                    gpa: HIGH,
                    size: 4096,
                    host_addr: base + 8192,
                    file: high_file.then(file),
                },
            ],
        }
    }

    #[test]
    fn a_range_resolves_inside_one_region_or_not_at_all() {
        let mut host = vec![0u8; 12288];
        let base = host.as_mut_ptr() as u64;
        let ram = ram(&mut host, false);
        assert_eq!(ram.host_address(LOW, 8192).unwrap(), base);
        assert_eq!(ram.host_address(LOW + 8176, 16).unwrap(), base + 8176);
        assert_eq!(ram.host_address(HIGH + 16, 16).unwrap(), base + 8192 + 16);
        for (gpa, size) in [
            (LOW + 8176, 17),
            (LOW - 4096, 16),
            (LOW - 1, 2),
            (HIGH - 16, 32),
            (HIGH + 4096, 1),
            (u64::MAX - 1, 4),
        ] {
            assert!(
                matches!(
                    ram.host_address(gpa, size),
                    Err(GuestRamError::NotRam { .. })
                ),
                "{gpa:#x}+{size}"
            );
        }
        let (fd, offset) = ram.file_offset(LOW + 4096, 4096).unwrap();
        assert!(fd >= 0);
        assert_eq!(offset, 4096);
        assert!(matches!(
            ram.file_offset(HIGH + 4096 - 8, 8),
            Err(GuestRamError::NoFile(gpa)) if gpa == HIGH + 4088
        ));
        assert!(!ram.all_file_backed());
        let mut host = vec![0u8; 12288];
        assert!(super::tests::ram(&mut host, true).all_file_backed());
    }

    #[test]
    fn device_reads_and_writes_land_at_the_guest_address() {
        let mut host = vec![0u8; 12288];
        let ram = ram(&mut host, false);
        ram.write(LOW + 100, &[1, 2, 3]).unwrap();
        ram.write(HIGH + 10, &[9]).unwrap();
        let mut read = [0u8; 4];
        ram.read(LOW + 99, &mut read).unwrap();
        assert_eq!(read, [0, 1, 2, 3]);
        assert!(ram.write(HIGH + 4095, &[1, 2]).is_err());
        assert!(ram.read(LOW + 8190, &mut read).is_err());
        drop(ram);
        assert_eq!(&host[100..103], &[1, 2, 3]);
        assert_eq!(host[8192 + 10], 9);
        assert_eq!(host[8192 + 4095], 0, "a refused write wrote nothing");
    }
}
