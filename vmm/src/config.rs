//! VM configuration and the parsers for the CLI's `key=value,...` options.

use std::path::PathBuf;

use serde::Serialize;

use crate::memory::MemoryLayout;

mod devices;
mod machine;
mod parser;
mod vm_config_json;

pub(crate) use devices::check_id;
pub use devices::{
    DeviceConfig, DmaMode, MAX_DEVICE_TIMEOUT_MS, RESERVED_ID_PREFIX, UserDeviceConfig,
};
pub use machine::{
    API_SOCKET_SYNTAX, ConsoleOutput, CpusConfig, EventMonitorConfig, MemoryConfig, PlatformConfig,
    parse_api_socket,
};
pub use parser::parse_size;
pub use vm_config_json::VmConfigJsonError;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{option}: unknown key {key:?} (expected one of: {expected})")]
    UnknownKey {
        option: &'static str,
        key: String,
        expected: String,
    },
    #[error("{option}: {key} given twice")]
    DuplicateKey { option: &'static str, key: String },
    #[error("{option}: {item:?} is not key=value")]
    NotKeyValue { option: &'static str, item: String },
    #[error("{option}: missing {key}=")]
    Missing {
        option: &'static str,
        key: &'static str,
    },
    #[error("{option}: invalid {key} {value:?}: {why}")]
    Invalid {
        option: &'static str,
        key: &'static str,
        value: String,
        why: &'static str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Empty for a firmware boot.
    pub kernel: PathBuf,
    /// An OVMF image for an SEV-SNP launch, instead of a kernel.
    pub firmware: Option<PathBuf>,
    /// A Linux kernel's command line (our test guests take none).
    pub cmdline: Option<String>,
    /// A Linux kernel's initramfs.
    pub initramfs: Option<PathBuf>,
    pub memory: MemoryConfig,
    pub platform: PlatformConfig,
    pub cpus: CpusConfig,
    pub serial: ConsoleOutput,
    pub devices: Vec<DeviceConfig>,
    pub user_devices: Vec<UserDeviceConfig>,
}

impl VmConfig {
    /// What a configuration implies: a confidential VM's RAM is guest_memfd
    /// RAM.
    pub fn normalized(mut self) -> Self {
        if self.platform.is_confidential() && !self.memory.guest_memfd {
            self.memory.guest_memfd = true;
            self.memory.layout = MemoryLayout::Auto;
        }
        self
    }

    /// Reads Cloud Hypervisor's `VmConfig` JSON (the body of `vm.create`).
    pub fn from_json(body: &[u8]) -> Result<Self, VmConfigJsonError> {
        vm_config_json::from_json(body)
    }
}

/// Serialized as Cloud Hypervisor's `VmConfig`, with our fields beside.
impl Serialize for VmConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        vm_config_json::to_json(self).serialize(s)
    }
}

#[cfg(test)]
mod tests;
