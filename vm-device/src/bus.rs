//! An address-range bus: each device owns `[base, base + len)` and sees
//! accesses as (offset, data). Lookups take a read lock only and devices
//! lock what they need themselves, so vCPUs do not serialize on the bus.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

pub trait BusDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("empty or overflowing range {base:#x}+{len:#x}")]
    BadRange { base: u64, len: u64 },
}

type SharedDevice = Arc<dyn BusDevice>;

#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, (u64, SharedDevice)>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let mut devices = self.devices.write().unwrap();
        let overlaps_previous = devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        devices.insert(base, (len, device));
        Ok(())
    }

    /// Removes the device at exactly `base`; false when there is none.
    pub fn remove(&self, base: u64) -> bool {
        self.devices.write().unwrap().remove(&base).is_some()
    }

    fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let devices = self.devices.read().unwrap();
        let (base, (len, device)) = devices.range(..=addr).next_back()?;
        (addr - base < *len).then(|| (addr - base, device.clone()))
    }

    /// Returns false when no device claims `addr` (reads then see all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                device.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, device)) => {
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Scratch {
        last_write: Mutex<Option<(u64, Vec<u8>)>>,
    }

    impl BusDevice for Scratch {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill((offset & 0xff) as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            *self.last_write.lock().unwrap() = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_reports_offsets() {
        let bus = Bus::new();
        let dev = Arc::new(Scratch::default());
        bus.insert(dev.clone(), 0x600, 0x20).unwrap();
        let mut buf = [0u8; 1];
        assert!(bus.read(0x605, &mut buf));
        assert_eq!(buf, [5]);
        assert!(bus.write(0x61f, &[1, 2]));
        assert_eq!(*dev.last_write.lock().unwrap(), Some((0x1f, vec![1, 2])));
        assert!(!bus.read(0x620, &mut buf));
        assert_eq!(buf, [0xff]);
        assert!(!bus.write(0x5ff, &[0]));
    }

    #[test]
    fn a_removed_device_no_longer_claims_its_range() {
        let bus = Bus::new();
        let dev = Arc::new(Scratch::default());
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(!bus.remove(0x101), "only the exact base removes");
        assert!(bus.remove(0x100));
        assert!(!bus.remove(0x100));
        let mut buf = [0u8; 1];
        assert!(!bus.read(0x100, &mut buf));
        bus.insert(dev, 0x100, 0x10).unwrap();
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let bus = Bus::new();
        let dev = Arc::new(Scratch::default());
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0xf8, 0x10),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0x0, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(dev, 0x110, 1).unwrap();
    }
}
