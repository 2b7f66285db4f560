//! The assigned devices' options (`--device`, `--user-device`) and the
//! checks they share.

use std::path::PathBuf;

use serde::Serialize;
use vm_device::MappingPolicy;

use super::ConfigError;
use super::parser::{OptionParser, is_false, is_zero};

/// Device ids name devices in the API and in events.
/// `vm.counters` names its own groups `memory` and `memory_region<N>`;
/// device ids there would collide.
pub const RESERVED_ID_PREFIX: &str = "memory";

pub(crate) fn check_id(option: &'static str, id: &str) -> Result<(), ConfigError> {
    if id.starts_with(RESERVED_ID_PREFIX) {
        return Err(ConfigError::Invalid {
            option,
            key: "id",
            value: id.to_string(),
            why: "ids starting with \"memory\" are reserved for vm.counters",
        });
    }
    let valid = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
    if valid {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            option,
            key: "id",
            value: id.to_string(),
            why: "expected 1 to 64 of A-Z a-z 0-9 _ - .",
        })
    }
}

pub(super) fn check_path(
    option: &'static str,
    key: &'static str,
    path: &std::path::Path,
) -> Result<(), ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::Invalid {
            option,
            key,
            value: String::new(),
            why: "empty path",
        });
    }
    Ok(())
}

/// What Cloud Hypervisor's clients send with every device (its
/// `PciDeviceCommonConfig`), checked against what this VMM can do: one PCI
/// segment, no virtual IOMMU, no PCI bus to place a device on yet.
/// `pci_device_id=N`: the device number on bus 0 (checked by
/// `check_pci_common`).
pub(super) fn parse_device_number(p: &OptionParser) -> Result<Option<u8>, ConfigError> {
    p.get("pci_device_id")
        .map(|n| {
            n.parse::<u8>()
                .map_err(|_| p.invalid("pci_device_id", "expected a device number 1 to 31"))
        })
        .transpose()
}

/// `mapping=runs|pages`.
pub(super) fn parse_mapping(p: &OptionParser) -> Result<MappingPolicy, ConfigError> {
    match p.get("mapping") {
        None | Some("runs") => Ok(MappingPolicy::Runs),
        Some("pages") => Ok(MappingPolicy::Pages),
        Some(_) => Err(p.invalid("mapping", "expected runs or pages")),
    }
}

pub(super) fn check_pci_common(
    option: &'static str,
    iommu: bool,
    pci_segment: u16,
    pci_device_id: Option<u8>,
) -> Result<(), ConfigError> {
    let invalid = |key: &'static str, value: String, why: &'static str| {
        Err(ConfigError::Invalid {
            option,
            key,
            value,
            why,
        })
    };
    if pci_segment != 0 {
        return invalid(
            "pci_segment",
            pci_segment.to_string(),
            "only PCI segment 0 exists",
        );
    }
    if iommu {
        return invalid("iommu", "on".into(), "there is no virtual IOMMU");
    }
    if let Some(id) = pci_device_id
        && !(1..32).contains(&id)
    {
        return invalid(
            "pci_device_id",
            id.to_string(),
            "expected a device number 1 to 31 (0 is the host bridge)",
        );
    }
    Ok(())
}

/// `iommu=` and `pci_segment=` as the CLI gives them.
pub(super) fn parse_pci_common(p: &OptionParser) -> Result<(bool, u16), ConfigError> {
    let iommu = p.toggle("iommu", false)?;
    let pci_segment = p
        .get("pci_segment")
        .map(|v| {
            v.parse::<u16>()
                .map_err(|_| p.invalid("pci_segment", "expected 0 to 65535"))
        })
        .transpose()?
        .unwrap_or(0);
    Ok((iommu, pci_segment))
}

/// What both device options give the same way: the path (`path_key`),
/// the id, the device number and the mapping policy.
struct Placement {
    path: PathBuf,
    id: Option<String>,
    pci_device_id: Option<u8>,
    mapping: MappingPolicy,
}

fn parse_placement(
    p: &OptionParser,
    option: &'static str,
    path_key: &'static str,
) -> Result<Placement, ConfigError> {
    Ok(Placement {
        path: p
            .get(path_key)
            .map(PathBuf::from)
            .ok_or(ConfigError::Missing {
                option,
                key: path_key,
            })?,
        id: p.get("id").map(str::to_string),
        pci_device_id: parse_device_number(p)?,
        mapping: parse_mapping(p)?,
    })
}

/// `--device path=/sys/bus/pci/devices/BDF/[,id=ID][,iommu=off][,pci_segment=0]`:
/// a VFIO device. The body of `vm.add-device` takes the same fields and
/// the rest of what Cloud Hypervisor's clients send.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// BARs that stay trapped (never mmapped into the guest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub x_exclude_mmap_bars: Vec<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_nv_gpudirect_clique: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// How DMA mappings cover the shared pages (ours; default `runs`).
    #[serde(default)]
    pub mapping: MappingPolicy,
    /// iommufd (on) or the type1 container (off) for this device (ours;
    /// default: `--platform iommufd=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iommufd: Option<bool>,
}

impl DeviceConfig {
    pub const SYNTAX: &'static str = "path=/sys/bus/pci/devices/BDF/[,id=ID][,mapping=runs|pages][,iommufd=on|off][,iommu=off][,pci_segment=0][,pci_device_id=N]";

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("--device", text, Self::SYNTAX)?;
        let (iommu, pci_segment) = parse_pci_common(&p)?;
        let iommufd = match p.get("iommufd") {
            Some(_) => Some(p.toggle("iommufd", false)?),
            None => None,
        };
        let placed = parse_placement(&p, "--device", "path")?;
        let config = DeviceConfig {
            iommufd,
            path: placed.path,
            id: placed.id,
            iommu,
            pci_segment,
            pci_device_id: placed.pci_device_id,
            mapping: placed.mapping,
            ..Default::default()
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_path("--device", "path", &self.path)?;
        check_pci_common("--device", self.iommu, self.pci_segment, self.pci_device_id)?;
        if let Some(bar) = self.x_exclude_mmap_bars.iter().find(|&&bar| bar > 5) {
            return Err(ConfigError::Invalid {
                option: "--device",
                key: "x_exclude_mmap_bars",
                value: bar.to_string(),
                why: "a PCI function has BARs 0 to 5",
            });
        }
        if let Some(clique) = self.x_nv_gpudirect_clique {
            return Err(ConfigError::Invalid {
                option: "--device",
                key: "x_nv_gpudirect_clique",
                value: clique.to_string(),
                why: "GPUDirect cliques are not supported",
            });
        }
        if let Some(fd) = self.fd {
            return Err(ConfigError::Invalid {
                option: "--device",
                key: "fd",
                value: fd.to_string(),
                why: "VFIO devices are opened by path only",
            });
        }
        self.id
            .as_deref()
            .map_or(Ok(()), |id| check_id("--device", id))
    }
}

/// Longest per-request device timeout accepted: shutdown waits this long
/// for a stalled device.
pub const MAX_DEVICE_TIMEOUT_MS: u64 = 60_000;

/// How a vfio-user server reaches guest memory (`dma=`, ours).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DmaMode {
    /// DMA_MAP carries the guest RAM's fd: the server mmaps it and reaches
    /// memory at memory speed, but can map any offset of that fd, not
    /// only the pages it was given.
    #[default]
    Fd,
    /// DMA_MAP carries no fd: the server reaches memory only through
    /// DMA_READ / DMA_WRITE messages, which the VMM serves inside that
    /// device's current mappings and nowhere else.
    Messages,
}

impl DmaMode {
    pub fn name(self) -> &'static str {
        match self {
            DmaMode::Fd => "fd",
            DmaMode::Messages => "messages",
        }
    }
}

/// `--user-device socket=PATH[,id=ID][,timeout_ms=MS]`: a vfio-user device server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDeviceConfig {
    pub socket: PathBuf,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pci_segment: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// How long the server may take to answer one request (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// How DMA mappings cover the shared pages (ours; default `runs`).
    #[serde(default)]
    pub mapping: MappingPolicy,
    /// How the server reaches guest memory (ours; default `fd`).
    #[serde(default)]
    pub dma: DmaMode,
}

impl UserDeviceConfig {
    pub const SYNTAX: &'static str = "socket=PATH[,id=ID][,timeout_ms=MS][,mapping=runs|pages][,dma=fd|messages][,iommu=off][,pci_segment=0][,pci_device_id=N]";

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("--user-device", text, Self::SYNTAX)?;
        let (iommu, pci_segment) = parse_pci_common(&p)?;
        let dma = match p.get("dma") {
            None | Some("fd") => DmaMode::Fd,
            Some("messages") => DmaMode::Messages,
            Some(_) => return Err(p.invalid("dma", "expected fd or messages")),
        };
        let timeout_ms = p
            .get("timeout_ms")
            .map(|t| {
                t.parse::<u64>()
                    .map_err(|_| p.invalid("timeout_ms", "expected milliseconds"))
            })
            .transpose()?;
        let placed = parse_placement(&p, "--user-device", "socket")?;
        let config = UserDeviceConfig {
            socket: placed.path,
            id: placed.id,
            timeout_ms,
            iommu,
            pci_segment,
            pci_device_id: placed.pci_device_id,
            mapping: placed.mapping,
            dma,
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_path("--user-device", "socket", &self.socket)?;
        check_pci_common(
            "--user-device",
            self.iommu,
            self.pci_segment,
            self.pci_device_id,
        )?;
        if self
            .timeout_ms
            .is_some_and(|ms| !(1..=MAX_DEVICE_TIMEOUT_MS).contains(&ms))
        {
            return Err(ConfigError::Invalid {
                option: "--user-device",
                key: "timeout_ms",
                value: format!("{:?}", self.timeout_ms),
                why: "expected 1 to 60000",
            });
        }
        self.id
            .as_deref()
            .map_or(Ok(()), |id| check_id("--user-device", id))
    }
}
