//! What the device manager keeps of each attached device, and what it
//! shows of it (`vm.info`'s `devices`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use vm_device::{DmaMappingListener, DmaStats, MappingPolicy};

use super::pci_segment::PluggedFunction;
use crate::config::DmaMode;
use crate::memory::ListenerId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    Vfio,
    VfioUser,
}

impl DeviceKind {
    pub(super) fn id_prefix(self) -> &'static str {
        match self {
            DeviceKind::Vfio => "_vfio",
            DeviceKind::VfioUser => "_vfio_user",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    /// Following every conversion.
    Attached,
    /// Cut off from guest memory after a fault; `remove-device` clears it.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub id: String,
    pub kind: DeviceKind,
    /// The sysfs path (VFIO) or the server socket (vfio-user).
    pub path: PathBuf,
    pub state: DeviceState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Where the guest finds it: segment:bus:device.function.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bdf: Option<String>,
    /// Most mappings the device accepts at once.
    pub max_dma_maps: Option<u64>,
    pub mapping: MappingPolicy,
    /// How a vfio-user server reaches guest memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dma_mode: Option<DmaMode>,
    pub dma: DmaStats,
}

pub(super) struct AttachedDevice {
    pub(super) id: String,
    pub(super) kind: DeviceKind,
    pub(super) path: PathBuf,
    pub(super) listener: Arc<DmaMappingListener>,
    pub(super) max_dma_maps: Option<u64>,
    pub(super) dma_mode: Option<DmaMode>,
    /// (region index, listener id) for every guest_memfd region.
    pub(super) registrations: Vec<(usize, ListenerId)>,
    /// Its PCI function, when the guest can see it.
    pub(super) pci: Option<PluggedFunction>,
}

impl AttachedDevice {
    pub(super) fn info(&self) -> DeviceInfo {
        let failure = self.listener.failure();
        DeviceInfo {
            id: self.id.clone(),
            kind: self.kind,
            path: self.path.clone(),
            state: if failure.is_some() {
                DeviceState::Failed
            } else {
                DeviceState::Attached
            },
            failure,
            bdf: self.pci.as_ref().map(|p| pci::bdf(p.slot)),
            max_dma_maps: self.max_dma_maps,
            mapping: self.listener.policy(),
            dma_mode: self.dma_mode,
            dma: self.listener.stats(),
        }
    }
}

#[derive(Default)]
pub(super) struct DeviceList {
    pub(super) devices: Vec<AttachedDevice>,
    /// Ids of devices being attached: taken, but not listed yet.
    pub(super) attaching: BTreeSet<String>,
    pub(super) next_index: u64,
    /// Set at shutdown: nothing attaches any more.
    pub(super) closed: bool,
}

impl DeviceList {
    pub(super) fn taken(&self, id: &str) -> bool {
        self.attaching.contains(id) || self.devices.iter().any(|d| d.id == id)
    }
}
