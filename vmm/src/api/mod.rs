//! The REST API: an HTTP thread (`http.rs`) turns requests into typed
//! `ApiRequest`s and sends them over a channel to the VMM thread, which
//! answers on a per-request channel. Routes live in one table (`ROUTES`)
//! that the OpenAPI test checks against `vmm/openapi/cloud-hypervisor.yaml`.

pub mod http;
mod http_server;
mod memory_attributes;

use std::sync::mpsc::Sender;

use serde_json::Value;

use crate::config::{DeviceConfig, UserDeviceConfig, VmConfig};
use crate::control::LifecycleError;
use crate::device_manager::DeviceError;

pub use memory_attributes::{AttributeWindow, MAX_RANGES, memory_attributes};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    VmmPing,
    VmCreate(Box<VmConfig>),
    VmBoot,
    VmReboot,
    VmDelete,
    VmPowerButton,
    VmInfo,
    VmCounters,
    VmMemoryAttributes(AttributeWindow),
    VmShutdown,
    VmmShutdown,
    VmPause,
    VmResume,
    VmAddDevice(DeviceConfig),
    VmAddUserDevice(UserDeviceConfig),
    VmRemoveDevice(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Lifecycle(LifecycleError),
    #[error("the VMM is shutting down")]
    VmmGone,
    #[error("device request failed")]
    Device(#[source] DeviceError),
    #[error("cannot start a hot-plug thread")]
    Worker(#[source] std::io::Error),
    #[error("the VM cannot do that now")]
    Vm(#[source] crate::vm::VmError),
}

impl ApiError {
    pub fn http_status(&self) -> u16 {
        match self {
            ApiError::Device(DeviceError::NotFound(_)) => 404,
            ApiError::Device(DeviceError::DuplicateId(_)) => 409,
            ApiError::Device(DeviceError::ShuttingDown) => 503,
            // As Cloud Hypervisor answers: a missing VM is "not found",
            // every other refusal an internal error.
            ApiError::Lifecycle(LifecycleError::NotCreated) => 404,
            _ => 500,
        }
    }
}

/// `Ok(None)` means 204 No Content.
pub type ApiResponse = Result<Option<Value>, ApiError>;

/// A request and where its answer goes.
pub struct ApiMessage {
    pub request: ApiRequest,
    pub respond: Sender<ApiResponse>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

/// Every endpoint: method, path under /api/v1/.
pub const ROUTES: &[(Method, &str)] = &[
    (Method::Get, "vmm.ping"),
    (Method::Put, "vmm.shutdown"),
    (Method::Put, "vm.create"),
    (Method::Put, "vm.boot"),
    (Method::Put, "vm.reboot"),
    (Method::Put, "vm.delete"),
    (Method::Put, "vm.power-button"),
    (Method::Get, "vm.info"),
    (Method::Get, "vm.counters"),
    (Method::Get, "vm.memory-attributes"),
    (Method::Put, "vm.shutdown"),
    (Method::Put, "vm.pause"),
    (Method::Put, "vm.resume"),
    (Method::Put, "vm.add-device"),
    (Method::Put, "vm.add-user-device"),
    (Method::Put, "vm.remove-device"),
];
