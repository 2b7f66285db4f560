//! Host mappings of a device's mmappable BAR areas (a vfio-user server's
//! region fd, or a VFIO device fd), kept until the device goes: the guest
//! memory slots over them are removed before that (see `pci::PciBus`).

use std::os::fd::RawFd;
use std::sync::Mutex;

use pci::{DirectArea, VfioOpsError};

#[derive(Debug, thiserror::Error)]
enum BarMapError {
    #[error("area {offset:#x} has no file offset")]
    NoFileOffset { offset: u64 },
    #[error("cannot map area {offset:#x}+{size:#x}")]
    Mmap {
        offset: u64,
        size: u64,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Default)]
pub struct BarMaps {
    /// (host address, length) of every mapping made.
    maps: Mutex<Vec<(usize, usize)>>,
}

impl BarMaps {
    /// Maps each (offset, size) area of a region that starts at
    /// `region_offset` in `fd`; all or nothing.
    pub fn map(
        &self,
        fd: RawFd,
        region_offset: u64,
        areas: &[(u64, u64)],
    ) -> Result<Vec<DirectArea>, VfioOpsError> {
        let mut mapped = Vec::with_capacity(areas.len());
        for &(offset, size) in areas {
            let Some(file_offset) = region_offset
                .checked_add(offset)
                .and_then(|o| libc::off_t::try_from(o).ok())
            else {
                for area in &mapped {
                    self.unmap_one(area);
                }
                return Err(VfioOpsError::new(BarMapError::NoFileOffset { offset }));
            };
            // SAFETY: a fresh shared mapping of the device's fd at a place
            // the kernel chooses; nothing else lives there.
            let host = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    ::arch::usize_from(size),
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    file_offset,
                )
            };
            if host == libc::MAP_FAILED {
                let source = std::io::Error::last_os_error();
                for area in &mapped {
                    self.unmap_one(area);
                }
                return Err(VfioOpsError::new(BarMapError::Mmap {
                    offset,
                    size,
                    source,
                }));
            }
            let area = DirectArea {
                offset,
                size,
                host: host as u64,
            };
            self.maps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((host as usize, ::arch::usize_from(size)));
            mapped.push(area);
        }
        Ok(mapped)
    }

    fn unmap_one(&self, area: &DirectArea) {
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        maps.retain(|&(host, _)| host as u64 != area.host);
        // SAFETY: our own mapping of exactly `size` bytes, never handed to
        // the guest (the caller failed before returning it).
        unsafe {
            libc::munmap(
                area.host as *mut libc::c_void,
                ::arch::usize_from(area.size),
            )
        };
    }
}

impl Drop for BarMaps {
    fn drop(&mut self) {
        let maps = self.maps.get_mut().unwrap_or_else(|e| e.into_inner());
        for &(host, len) in maps.iter() {
            // SAFETY: our own mapping of exactly `len` bytes; the guest
            // memory slots over it were removed when the function was
            // unplugged, before the last reference to the device went.
            unsafe { libc::munmap(host as *mut libc::c_void, len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn areas_map_the_file_at_their_offsets_and_a_bad_one_maps_nothing() {
        let file = crate::test_util::scratch_file("bar-maps", &[0xab; 8192]);
        let maps = BarMaps::default();
        let areas = maps.map(file.as_raw_fd(), 4096, &[(0, 4096)]).unwrap();
        assert_eq!(areas.len(), 1);
        // SAFETY: inside the mapping just made.
        let byte = unsafe { std::ptr::read_volatile(areas[0].host as *const u8) };
        assert_eq!(byte, 0xab);
        // The second area's offset overflows: nothing of this call stays.
        assert!(
            maps.map(file.as_raw_fd(), 0, &[(0, 4096), (u64::MAX, 4096)])
                .is_err()
        );
        assert_eq!(
            *maps.maps.lock().unwrap(),
            [(::arch::usize_from(areas[0].host), 4096)]
        );
        assert_eq!(mappings_of_the_file(), 1);
        // Dropped with its device: every mapping goes.
        drop(maps);
        assert_eq!(mappings_of_the_file(), 0);
    }

    /// Lines of this process's memory map that map the test's file.
    fn mappings_of_the_file() -> usize {
        let name = format!("ch-bar-maps-{}", std::process::id());
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&name))
            .count()
    }
}
