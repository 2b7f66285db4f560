//! Assigned devices (VFIO and vfio-user) as discard listeners: each device's
//! DMA mapping is registered on every guest_memfd region, so it covers
//! exactly the shared pages and follows every conversion. RAM that is not
//! guest_memfd is mapped whole at attach.
//!
//! A device that is a PCI function is also plugged into segment 0, where
//! the guest finds and drives it; a vfio-user server that is not one is a
//! DMA target only.
//!
//! Every method takes `&self` and holds the device list's lock only for
//! list updates, never across device I/O: hot-plug runs on its own thread
//! while the API keeps answering, and a device that fails (see
//! `DmaMappingListener`) is shown as failed until `remove` clears it.

mod bar_maps;
mod device_list;
#[cfg(test)]
mod fake_vfio;
mod guest_ram;
pub mod pci_segment;
pub mod vfio;
mod vfio_host;
mod vfio_user;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{info, warn};
use vm_device::{DmaMappingListener, ExternalDmaMapping, MappingPolicy, Section};

use device_list::{AttachedDevice, DeviceList};
pub use device_list::{DeviceInfo, DeviceKind, DeviceState};
pub use guest_ram::{GuestRam, GuestRamError};
use pci::VfioPciDevice;
use pci_segment::PciSegment;
pub use vfio_user::VfioUserDma;
use vfio_user_client::VfioUserError;

use crate::config::{DeviceConfig, DmaMode, UserDeviceConfig};
use crate::event_monitor::EventMonitor;
use crate::memory::{AttributeError, ListenerId, MemoryManager};

/// How long a vfio-user server may take to answer one request, unless its
/// `timeout_ms=` says otherwise.
pub const VFIO_USER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("a device with id {0:?} already exists")]
    DuplicateId(String),
    #[error("no device with id {0:?}")]
    NotFound(String),
    #[error("cannot attach VFIO device")]
    Vfio(#[source] vfio::VfioAttachError),
    #[error("cannot create the VM's KVM-VFIO device")]
    NoKvmVfio(#[source] Option<hypervisor::HypervisorError>),
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
    #[error("the VMM is shutting down")]
    ShuttingDown,
    #[error("the device is not a usable PCI function")]
    PciFunction(#[source] pci::VfioPciError),
    #[error("cannot put the device on the PCI bus")]
    Pci(#[source] pci_segment::PciSegmentError),
    #[error("the device failed while it was being given the shared pages: {0}")]
    FailedDuringAttach(String),
}

/// What attaching a device needs besides its DMA mapping.
pub struct Attachment {
    pub id: String,
    pub kind: DeviceKind,
    pub path: PathBuf,
    pub entry_limit: Option<u64>,
    /// The PCI function the guest drives, plugged once DMA follows the
    /// shared pages.
    pub function: Option<Arc<VfioPciDevice>>,
    /// Its device number on bus 0, if the user chose one.
    pub device_number: Option<u8>,
    pub policy: MappingPolicy,
    /// How a vfio-user server reaches guest memory (none for VFIO).
    pub dma_mode: Option<DmaMode>,
}

pub struct DeviceManager {
    memory: Arc<MemoryManager>,
    ram: Arc<GuestRam>,
    monitor: Arc<EventMonitor>,
    list: Mutex<DeviceList>,
    /// Segment 0; without one (unit tests) devices are DMA targets only.
    pci: Option<Arc<PciSegment>>,
    vfio: VfioPlatform,
}

/// Opens a VFIO device on the host (`vfio_host::open`), or a fake one in
/// the tests.
type VfioOpener = dyn Fn(
        &std::path::Path,
        vfio::VfioBackend,
        Arc<vfio_ioctls::VfioDeviceFd>,
    ) -> Result<vfio::OpenedVfio, vfio::VfioAttachError>
    + Send
    + Sync;

/// What VFIO devices share: the VM's KVM-VFIO device (created with the
/// first VFIO device), the backend a device gets unless it names one, and
/// how devices are opened.
struct VfioPlatform {
    vm: Option<Arc<dyn hypervisor::Vm>>,
    iommufd_by_default: bool,
    kvm_vfio: Mutex<Option<Arc<vfio_ioctls::VfioDeviceFd>>>,
    open: Box<VfioOpener>,
}

impl Default for VfioPlatform {
    fn default() -> Self {
        VfioPlatform {
            vm: None,
            iommufd_by_default: false,
            kvm_vfio: Mutex::default(),
            open: Box::new(vfio_host::open),
        }
    }
}

impl VfioPlatform {
    /// The VM's KVM-VFIO device, created on first use.
    fn kvm_vfio(&self) -> Result<Arc<vfio_ioctls::VfioDeviceFd>, DeviceError> {
        let mut handle = self.kvm_vfio.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(device) = handle.as_ref() {
            return Ok(device.clone());
        }
        let vm = self.vm.as_ref().ok_or(DeviceError::NoKvmVfio(None))?;
        let device = vm
            .create_vfio_device()
            .map_err(|e| DeviceError::NoKvmVfio(Some(e)))?;
        let device = Arc::new(device.into_vfio_device_fd());
        *handle = Some(device.clone());
        Ok(device)
    }
}

impl DeviceManager {
    pub fn new(
        memory: Arc<MemoryManager>,
        monitor: Arc<EventMonitor>,
        pci: Option<Arc<PciSegment>>,
    ) -> Self {
        DeviceManager {
            ram: Arc::new(GuestRam::new(&memory)),
            memory,
            monitor,
            list: Mutex::new(DeviceList::default()),
            pci,
            vfio: VfioPlatform::default(),
        }
    }

    /// VFIO devices join `vm`'s KVM-VFIO device, and use iommufd unless
    /// they say otherwise when `iommufd_by_default` (`--platform iommufd=on`).
    pub fn with_vfio_platform(
        mut self,
        vm: Arc<dyn hypervisor::Vm>,
        iommufd_by_default: bool,
    ) -> Self {
        self.vfio.vm = Some(vm);
        self.vfio.iommufd_by_default = iommufd_by_default;
        self
    }

    /// VFIO devices are opened by `open` instead of on the host.
    #[cfg(test)]
    fn with_vfio_opener(mut self, open: Box<VfioOpener>) -> Self {
        self.vfio.open = open;
        self
    }

    /// The backend `config` asks for, or the platform's default.
    pub fn vfio_backend(&self, config: &DeviceConfig) -> vfio::VfioBackend {
        if config.iommufd.unwrap_or(self.vfio.iommufd_by_default) {
            vfio::VfioBackend::Iommufd
        } else {
            vfio::VfioBackend::Type1
        }
    }

    fn list(&self) -> MutexGuard<'_, DeviceList> {
        // Updates of the list cannot panic half-way.
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add_vfio(&self, config: &DeviceConfig) -> Result<DeviceInfo, DeviceError> {
        let id = self.claim_id(config.id.as_deref(), DeviceKind::Vfio)?;
        let backend = self.vfio_backend(config);
        let result = self
            .vfio
            .kvm_vfio()
            .and_then(|kvm_vfio| {
                (self.vfio.open)(&config.path, backend, kvm_vfio).map_err(DeviceError::Vfio)
            })
            .map(|opened| vfio::VfioDma::new(opened, self.ram.clone()))
            .and_then(|dma| {
                let dma = Arc::new(dma);
                let trapped: Vec<usize> = config
                    .x_exclude_mmap_bars
                    .iter()
                    .map(|&bar| arch::usize_from(bar))
                    .collect();
                let function = match &self.pci {
                    Some(segment) => Some(Arc::new(
                        VfioPciDevice::with_trapped_bars(
                            dma.clone(),
                            |n| segment.msi_vectors(n),
                            &trapped,
                        )
                        .map_err(DeviceError::PciFunction)?,
                    )),
                    None => None,
                };
                self.attach_claimed(
                    Attachment {
                        id: id.clone(),
                        kind: DeviceKind::Vfio,
                        path: config.path.clone(),
                        entry_limit: backend.entry_limit(),
                        function,
                        device_number: config.pci_device_id,
                        policy: config.mapping,
                        dma_mode: None,
                    },
                    dma,
                )
            });
        self.release_claim(&id);
        result
    }

    pub fn add_vfio_user(&self, config: &UserDeviceConfig) -> Result<DeviceInfo, DeviceError> {
        let id = self.claim_id(config.id.as_deref(), DeviceKind::VfioUser)?;
        let timeout = config
            .timeout_ms
            .map_or(VFIO_USER_TIMEOUT, Duration::from_millis);
        // Connecting may wait for the server: no lock is held meanwhile.
        if config.dma == DmaMode::Fd && !self.memory.tracks_attributes() {
            warn!(
                "{}: dma=fd hands the server the guest RAM's fd, and this host's KVM does \
                 not enforce private memory: the server can read every page, private ones \
                 too (dma=messages limits it to the pages it is given)",
                config.socket.display()
            );
        }
        let result = VfioUserDma::connect(&config.socket, self.ram.clone(), timeout, config.dma)
            .and_then(|dma| {
                let limit = dma.max_dma_maps();
                let dma = Arc::new(dma);
                let function = match &self.pci {
                    Some(segment) if dma.offers_pci_function()? => Some(Arc::new(
                        VfioPciDevice::new(dma.clone(), |n| segment.msi_vectors(n))
                            .map_err(DeviceError::PciFunction)?,
                    )),
                    Some(_) => {
                        warn!(
                            "{}: no PCI configuration space; attached for DMA only",
                            config.socket.display()
                        );
                        None
                    }
                    None => None,
                };
                self.attach_claimed(
                    Attachment {
                        id: id.clone(),
                        kind: DeviceKind::VfioUser,
                        path: config.socket.clone(),
                        entry_limit: Some(limit),
                        function,
                        device_number: config.pci_device_id,
                        policy: config.mapping,
                        dma_mode: Some(config.dma),
                    },
                    dma,
                )
            });
        self.release_claim(&id);
        result
    }

    /// The id to use: the requested one if free, else the next generated
    /// one. It stays taken until `release_claim`.
    fn claim_id(&self, requested: Option<&str>, kind: DeviceKind) -> Result<String, DeviceError> {
        let mut list = self.list();
        if list.closed {
            return Err(DeviceError::ShuttingDown);
        }
        let id = match requested {
            Some(id) if list.taken(id) => return Err(DeviceError::DuplicateId(id.to_string())),
            Some(id) => id.to_string(),
            None => loop {
                let id = format!("{}{}", kind.id_prefix(), list.next_index);
                list.next_index += 1;
                if !list.taken(&id) {
                    break id;
                }
            },
        };
        list.attaching.insert(id.clone());
        Ok(id)
    }

    fn release_claim(&self, id: &str) {
        self.list().attaching.remove(id);
    }

    /// Attaches `dma` under an id nobody else can take (tests, and devices
    /// built outside this manager).
    pub fn attach(
        &self,
        attachment: Attachment,
        dma: Arc<dyn ExternalDmaMapping>,
    ) -> Result<DeviceInfo, DeviceError> {
        let id = self.claim_id(Some(&attachment.id), attachment.kind)?;
        let result = self.attach_claimed(attachment, dma);
        self.release_claim(&id);
        result
    }

    /// Makes `dma` follow the shared pages of every guest_memfd region (the
    /// current shared runs are replayed) and map all other RAM. On failure
    /// nothing stays registered or mapped.
    fn attach_claimed(
        &self,
        attachment: Attachment,
        dma: Arc<dyn ExternalDmaMapping>,
    ) -> Result<DeviceInfo, DeviceError> {
        let Attachment {
            id,
            kind,
            path,
            entry_limit,
            function,
            device_number,
            policy,
            dma_mode,
        } = attachment;
        let listener = Arc::new(DmaMappingListener::with_policy(dma, entry_limit, policy));
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
                None => listener.populate_unconverted(whole).map_err(|source| {
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
        // A device that broke during the replay (timed out, hung up) is
        // cut off and follows nothing: refuse it rather than keep a failed
        // device the caller never had working.
        if let Some(why) = listener.failure() {
            self.unregister(&registrations, &listener);
            return Err(DeviceError::FailedDuringAttach(why));
        }
        // The guest finds the function only once its DMA follows the
        // shared pages.
        let pci = match (function, &self.pci) {
            (Some(function), Some(segment)) => match segment.plug(function, device_number) {
                Ok(plugged) => Some(plugged),
                Err(e) => {
                    self.unregister(&registrations, &listener);
                    return Err(DeviceError::Pci(e));
                }
            },
            _ => None,
        };
        // Only a device that attached can fail as far as anyone watching
        // is concerned; a failure before this point is the attach's error.
        let monitor = self.monitor.clone();
        let failed_id = id.clone();
        listener.set_failure_hook(Box::new(move |why| {
            monitor.emit(
                "device",
                "failed",
                serde_json::json!({ "id": failed_id, "reason": why }),
            );
        }));
        let device = AttachedDevice {
            id,
            kind,
            path,
            listener,
            max_dma_maps: entry_limit,
            dma_mode,
            registrations,
            pci,
        };
        let info = device.info();
        let mut list = self.list();
        if list.closed {
            drop(list);
            self.detach(&device);
            return Err(DeviceError::ShuttingDown);
        }
        // A failure between the replay and now (plugging asked the device
        // for its configuration) still makes this attach fail.
        if let Some(why) = info.failure {
            drop(list);
            self.detach(&device);
            return Err(DeviceError::FailedDuringAttach(why));
        }
        info!(
            "device {} ({:?}) attached: {} mappings of {} bytes",
            info.id, kind, info.dma.entries, info.dma.mapped_bytes
        );
        list.devices.push(device);
        Ok(info)
    }

    /// The guest loses the function first (so it stops driving it), then
    /// the device loses guest memory.
    fn detach(&self, device: &AttachedDevice) {
        if let (Some(plugged), Some(segment)) = (&device.pci, &self.pci) {
            segment.unplug(plugged);
        }
        self.unregister(&device.registrations, &device.listener);
    }

    fn unregister(&self, registrations: &[(usize, ListenerId)], listener: &DmaMappingListener) {
        for &(index, lid) in registrations {
            let attrs = self.memory.regions()[index]
                .attributes
                .as_ref()
                .expect("registered on a guest_memfd region");
            if let Err(e) = attrs.detach_listener(lid) {
                warn!("cannot detach listener {lid:?}: {e}");
            }
        }
        // No conversion reaches the listener any more: it unmaps what it
        // holds without any region lock held, so a slow device delays
        // neither conversions nor the removal of other devices.
        listener.unmap_all();
    }

    /// Detaches a device: its listener is unregistered everywhere and every
    /// mapping it held is unmapped. Returns its final state.
    pub fn remove(&self, id: &str) -> Result<DeviceInfo, DeviceError> {
        let device = {
            let mut list = self.list();
            let index = list
                .devices
                .iter()
                .position(|d| d.id == id)
                .ok_or_else(|| DeviceError::NotFound(id.to_string()))?;
            list.devices.remove(index)
        };
        self.detach(&device);
        let info = device.info();
        info!("device {id} removed: {} mappings left", info.dma.entries);
        Ok(info)
    }

    /// Detaches every device (VMM shutdown), all at once so stalled
    /// devices cost one timeout in all, and refuses later attaches. Devices
    /// stop seeing guest RAM before it goes away. Returns what each had
    /// when it went.
    pub fn remove_all(&self) -> Vec<DeviceInfo> {
        let devices = {
            let mut list = self.list();
            list.closed = true;
            std::mem::take(&mut list.devices)
        };
        let remove = |device: &AttachedDevice| {
            self.detach(device);
            device.info()
        };
        std::thread::scope(|scope| {
            let removals: Vec<_> = devices
                .iter()
                .map(|device| {
                    std::thread::Builder::new()
                        .name("device-removal".into())
                        .spawn_scoped(scope, move || remove(device))
                        .map_err(|e| {
                            warn!(
                                "no thread to remove device {}, removing it here: {e}",
                                device.id
                            );
                            device
                        })
                })
                .collect();
            removals
                .into_iter()
                .filter_map(|removal| match removal {
                    Ok(thread) => thread.join().ok(),
                    Err(device) => Some(remove(device)),
                })
                .collect()
        })
    }

    pub fn info(&self) -> Vec<DeviceInfo> {
        self.list()
            .devices
            .iter()
            .map(AttachedDevice::info)
            .collect()
    }
}

#[cfg(test)]
mod exact_unmap_proptest;
#[cfg(test)]
mod tests;
