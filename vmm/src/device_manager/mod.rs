//! Assigned devices (VFIO and vfio-user) as discard listeners: each device's
//! DMA mapping is registered on every guest_memfd region, so it covers
//! exactly the shared pages and follows every conversion. RAM that is not
//! guest_memfd is mapped whole at attach.
//!
//! Devices are attached for DMA only: this VMM has no PCI bus yet, so their
//! BARs, config space and interrupts are not exposed to the guest.

mod guest_ram;
pub mod vfio;
pub mod vfio_user_client;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use serde::Serialize;
use vm_device::{DmaMappingListener, DmaStats, ExternalDmaMapping, RamDiscardListener, Section};

pub use guest_ram::{GuestRam, GuestRamError};
use vfio_user_client::{VfioUserClient, VfioUserError};

use crate::config::{DeviceConfig, UserDeviceConfig};
use crate::memory::{AttributeError, ListenerId, MemoryManager};

/// How long a vfio-user server may take to answer one request.
pub const VFIO_USER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("a device with id {0:?} already exists")]
    DuplicateId(String),
    #[error("no device with id {0:?}")]
    NotFound(String),
    #[error("cannot attach VFIO device")]
    Vfio(#[source] vfio::VfioAttachError),
    #[error("cannot talk to the vfio-user server")]
    VfioUser(#[source] VfioUserError),
    #[error("vfio-user needs file-backed guest RAM (use a guest_memfd VM)")]
    NoFileBacking,
    #[error("cannot map the device's view of region {gpa:#x}")]
    Register {
        gpa: u64,
        #[source]
        source: AttributeError,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    Vfio,
    VfioUser,
}

impl DeviceKind {
    fn id_prefix(self) -> &'static str {
        match self {
            DeviceKind::Vfio => "_vfio",
            DeviceKind::VfioUser => "_vfio_user",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub id: String,
    pub kind: DeviceKind,
    /// The sysfs path (VFIO) or the server socket (vfio-user).
    pub path: PathBuf,
    pub dma: DmaStats,
}

/// A vfio-user server's DMA mapping: the guest RAM's fd and offset go with
/// every map, so the server mmaps exactly the shared pages.
pub struct VfioUserDma {
    client: Mutex<VfioUserClient>,
    ram: Arc<GuestRam>,
}

impl VfioUserDma {
    pub fn connect(socket: &std::path::Path, ram: Arc<GuestRam>) -> Result<Self, DeviceError> {
        if !ram.all_file_backed() {
            return Err(DeviceError::NoFileBacking);
        }
        let client =
            VfioUserClient::connect(socket, VFIO_USER_TIMEOUT).map_err(DeviceError::VfioUser)?;
        Ok(VfioUserDma {
            client: Mutex::new(client),
            ram,
        })
    }

    fn client(&self) -> std::sync::MutexGuard<'_, VfioUserClient> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn io_error(e: impl std::error::Error) -> std::io::Error {
    std::io::Error::other(crate::error_chain(&e))
}

impl ExternalDmaMapping for VfioUserDma {
    fn map(&self, iova: u64, gpa: u64, size: u64) -> std::io::Result<()> {
        let (fd, offset) = self.ram.file_offset(gpa, size).map_err(io_error)?;
        self.client()
            .dma_map(iova, size, fd, offset)
            .map_err(io_error)
    }

    fn unmap(&self, iova: u64, size: u64) -> std::io::Result<()> {
        self.client().dma_unmap(iova, size).map_err(io_error)
    }
}

struct AttachedDevice {
    id: String,
    kind: DeviceKind,
    path: PathBuf,
    listener: Arc<DmaMappingListener>,
    /// (region index, listener id) for every guest_memfd region.
    registrations: Vec<(usize, ListenerId)>,
}

impl AttachedDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            id: self.id.clone(),
            kind: self.kind,
            path: self.path.clone(),
            dma: self.listener.stats(),
        }
    }
}

pub struct DeviceManager {
    memory: Arc<MemoryManager>,
    ram: Arc<GuestRam>,
    devices: Vec<AttachedDevice>,
    next_index: u64,
}

impl DeviceManager {
    pub fn new(memory: Arc<MemoryManager>) -> Self {
        DeviceManager {
            ram: Arc::new(GuestRam::new(&memory)),
            memory,
            devices: Vec::new(),
            next_index: 0,
        }
    }

    pub fn add_vfio(&mut self, config: &DeviceConfig) -> Result<DeviceInfo, DeviceError> {
        let id = self.claim_id(config.id.as_deref(), DeviceKind::Vfio)?;
        let dma = vfio::VfioDma::open(&config.path, self.ram.clone()).map_err(DeviceError::Vfio)?;
        self.attach(
            id,
            DeviceKind::Vfio,
            config.path.clone(),
            Arc::new(dma),
            vfio::dma_entry_limit(),
        )
    }

    pub fn add_vfio_user(&mut self, config: &UserDeviceConfig) -> Result<DeviceInfo, DeviceError> {
        let id = self.claim_id(config.id.as_deref(), DeviceKind::VfioUser)?;
        let dma = VfioUserDma::connect(&config.socket, self.ram.clone())?;
        self.attach(
            id,
            DeviceKind::VfioUser,
            config.socket.clone(),
            Arc::new(dma),
            None,
        )
    }

    /// The id to use: the requested one if free, else the next generated one.
    fn claim_id(
        &mut self,
        requested: Option<&str>,
        kind: DeviceKind,
    ) -> Result<String, DeviceError> {
        if let Some(id) = requested {
            if self.devices.iter().any(|d| d.id == id) {
                return Err(DeviceError::DuplicateId(id.to_string()));
            }
            return Ok(id.to_string());
        }
        loop {
            let id = format!("{}{}", kind.id_prefix(), self.next_index);
            self.next_index += 1;
            if !self.devices.iter().any(|d| d.id == id) {
                return Ok(id);
            }
        }
    }

    /// Makes `dma` follow the shared pages of every guest_memfd region (the
    /// current shared runs are replayed) and map all other RAM. On failure
    /// nothing stays registered or mapped.
    pub fn attach(
        &mut self,
        id: String,
        kind: DeviceKind,
        path: PathBuf,
        dma: Arc<dyn ExternalDmaMapping>,
        entry_limit: Option<u64>,
    ) -> Result<DeviceInfo, DeviceError> {
        let listener = Arc::new(DmaMappingListener::new(dma, entry_limit));
        let mut registrations = Vec::new();
        for (index, region) in self.memory.regions().iter().enumerate() {
            let whole = Section {
                gpa: region.gpa,
                size: region.size,
            };
            let registered = match &region.attributes {
                Some(attrs) => attrs
                    .register_listener(listener.clone(), whole)
                    .map(|lid| registrations.push((index, lid))),
                None => listener.notify_populate(whole).map_err(|source| {
                    AttributeError::ListenerFailed {
                        gpa: whole.gpa,
                        size: whole.size,
                        source,
                    }
                }),
            };
            if let Err(source) = registered {
                self.unregister(&registrations, &listener);
                return Err(DeviceError::Register {
                    gpa: region.gpa,
                    source,
                });
            }
        }
        let device = AttachedDevice {
            id,
            kind,
            path,
            listener,
            registrations,
        };
        let info = device.info();
        info!(
            "device {} ({:?}) attached: {} mappings of {} bytes",
            info.id, kind, info.dma.entries, info.dma.mapped_bytes
        );
        self.devices.push(device);
        Ok(info)
    }

    fn unregister(&self, registrations: &[(usize, ListenerId)], listener: &DmaMappingListener) {
        for &(index, lid) in registrations {
            let attrs = self.memory.regions()[index]
                .attributes
                .as_ref()
                .expect("registered on a guest_memfd region");
            if let Err(e) = attrs.unregister_listener(lid) {
                warn!("cannot unregister listener {lid:?}: {e}");
            }
        }
        // Whatever is left was mapped outside the conversion state
        // (non-guest_memfd RAM).
        listener.unmap_all();
    }

    /// Detaches a device: its listener is unregistered everywhere and every
    /// mapping it held is unmapped. Returns its final state.
    pub fn remove(&mut self, id: &str) -> Result<DeviceInfo, DeviceError> {
        let index = self
            .devices
            .iter()
            .position(|d| d.id == id)
            .ok_or_else(|| DeviceError::NotFound(id.to_string()))?;
        let device = self.devices.remove(index);
        self.unregister(&device.registrations, &device.listener);
        let info = device.info();
        info!("device {id} removed: {} mappings left", info.dma.entries);
        Ok(info)
    }

    /// Detaches every device (VMM shutdown): devices stop seeing guest RAM
    /// before it goes away. Returns what each had when it went.
    pub fn remove_all(&mut self) -> Vec<DeviceInfo> {
        let ids: Vec<String> = self.devices.iter().map(|d| d.id.clone()).collect();
        ids.iter().filter_map(|id| self.remove(id).ok()).collect()
    }

    pub fn info(&self) -> Vec<DeviceInfo> {
        self.devices.iter().map(AttachedDevice::info).collect()
    }

    /// The IOVA ranges a device currently has mapped.
    pub fn mappings(&self, id: &str) -> Option<Vec<Section>> {
        self.devices
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.listener.mappings())
    }
}

#[cfg(test)]
mod exact_unmap_proptest;
#[cfg(test)]
mod tests;
