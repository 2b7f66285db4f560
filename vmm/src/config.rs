//! VM configuration and the parsers for the CLI's `key=value,...` options.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use vm_device::MappingPolicy;

use crate::memory::MemoryLayout;

mod vm_config_json;

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

/// `key=value,key=value` with a fixed set of keys.
struct OptionParser {
    option: &'static str,
    values: BTreeMap<String, String>,
}

impl OptionParser {
    fn parse(option: &'static str, text: &str, keys: &[&str]) -> Result<Self, ConfigError> {
        let mut values = BTreeMap::new();
        for item in text.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| ConfigError::NotKeyValue {
                    option,
                    item: item.to_string(),
                })?;
            if !keys.contains(&key) {
                return Err(ConfigError::UnknownKey {
                    option,
                    key: key.to_string(),
                    expected: keys.join(", "),
                });
            }
            if values.insert(key.to_string(), value.to_string()).is_some() {
                return Err(ConfigError::DuplicateKey {
                    option,
                    key: key.to_string(),
                });
            }
        }
        Ok(OptionParser { option, values })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    fn invalid(&self, key: &'static str, why: &'static str) -> ConfigError {
        ConfigError::Invalid {
            option: self.option,
            key,
            value: self.get(key).unwrap_or_default().to_string(),
            why,
        }
    }

    fn toggle(&self, key: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some("on" | "true") => Ok(true),
            Some("off" | "false") => Ok(false),
            Some(_) => Err(self.invalid(key, "expected on or off")),
        }
    }
}

/// `512M`, `2G`, `4096`, `0x1000`: bytes with an optional binary suffix.
pub fn parse_size(text: &str) -> Option<u64> {
    const SUFFIXES: [(char, u32); 4] = [('K', 10), ('M', 20), ('G', 30), ('T', 40)];
    let upper = text.trim().to_ascii_uppercase();
    let (number, shift) = SUFFIXES
        .iter()
        .find_map(|(c, s)| upper.strip_suffix(*c).map(|n| (n.to_string(), *s)))
        .unwrap_or((upper, 0));
    let value = match number.strip_prefix("0X") {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => number.parse::<u64>().ok()?,
    };
    value.checked_mul(1 << shift)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    pub size: u64,
    pub guest_memfd: bool,
    pub layout: MemoryLayout,
}

impl MemoryConfig {
    pub const SYNTAX: &'static str = "size=SIZE[,guest_memfd=on|off][,layout=auto|in-place|split][,shared=on|off][,hugepages=off][,mergeable=on|off][,prefault=on|off][,thp=on|off]";

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(
            "--memory",
            text,
            &[
                "size",
                "guest_memfd",
                "layout",
                "shared",
                "hugepages",
                "mergeable",
                "prefault",
                "thp",
            ],
        )?;
        // Cloud Hypervisor's backing hints: RAM here is always a shared
        // mapping of a memfd or guest_memfd (or anonymous), so they change
        // nothing; hugepages cannot be honoured and are refused.
        for hint in ["shared", "mergeable", "prefault", "thp"] {
            p.toggle(hint, false)?;
        }
        if p.toggle("hugepages", false)? {
            return Err(p.invalid("hugepages", "hugepages are not supported"));
        }
        let size = match p.get("size") {
            None => {
                return Err(ConfigError::Missing {
                    option: "--memory",
                    key: "size",
                });
            }
            Some(s) => parse_size(s).ok_or_else(|| p.invalid("size", "not a size"))?,
        };
        Self::new(
            "--memory",
            size,
            p.toggle("guest_memfd", false)?,
            p.get("layout"),
        )
    }

    /// Checks a size, a guest_memfd toggle and a layout name (as the CLI
    /// and the JSON of `vm.create` give them) for `option`.
    pub fn new(
        option: &'static str,
        size: u64,
        guest_memfd: bool,
        layout: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let invalid = |key, value: String, why| ConfigError::Invalid {
            option,
            key,
            value,
            why,
        };
        if size == 0 {
            return Err(invalid("size", size.to_string(), "must not be zero"));
        }
        if !size.is_multiple_of(4096) {
            return Err(invalid(
                "size",
                size.to_string(),
                "must be a multiple of 4 KiB",
            ));
        }
        if size < crate::memory::MIN_RAM {
            return Err(invalid(
                "size",
                size.to_string(),
                "must be at least 16M (the guest boot area)",
            ));
        }
        let layout = match (guest_memfd, layout) {
            (false, None) => MemoryLayout::Anonymous,
            (false, Some(l)) => return Err(invalid("layout", l.into(), "needs guest_memfd=on")),
            (true, None | Some("auto")) => MemoryLayout::Auto,
            (true, Some("in-place")) => MemoryLayout::InPlace,
            (true, Some("split")) => MemoryLayout::Split,
            (true, Some(l)) => {
                return Err(invalid(
                    "layout",
                    l.into(),
                    "expected auto, in-place or split",
                ));
            }
        };
        Ok(MemoryConfig {
            size,
            guest_memfd,
            layout,
        })
    }

    pub fn layout_name(&self) -> &'static str {
        match self.layout {
            MemoryLayout::Anonymous => "anonymous",
            MemoryLayout::Auto => "auto",
            MemoryLayout::InPlace => "in-place",
            MemoryLayout::Split => "split",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpusConfig {
    pub boot: u8,
    /// CPUID features taken away from the guest (ours: `hide=`).
    pub hidden: Vec<crate::boot::cpuid::CpuFeature>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot: 1,
            hidden: Vec::new(),
        }
    }
}

impl CpusConfig {
    pub const SYNTAX: &'static str = "boot=N (1..=32)[,max=M (no hot-plug: M >= N, N run)][,kvm_hyperv=off][,hide=FEATURE:FEATURE...]";

    /// Features for `hide=`, `:`-separated (cx16, xsave, avx, ...).
    pub fn parse_hidden(text: &str) -> Result<Vec<crate::boot::cpuid::CpuFeature>, String> {
        text.split(':')
            .filter(|name| !name.is_empty())
            .map(|name| {
                crate::boot::cpuid::CpuFeature::parse(name).ok_or_else(|| {
                    let known: Vec<&str> = crate::boot::cpuid::CpuFeature::ALL
                        .iter()
                        .map(|f| f.name())
                        .collect();
                    format!("unknown feature {name:?} (known: {})", known.join(", "))
                })
            })
            .collect()
    }

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("--cpus", text, &["boot", "max", "kvm_hyperv", "hide"])?;
        if p.toggle("kvm_hyperv", false)? {
            return Err(p.invalid("kvm_hyperv", "Hyper-V enlightenments are not supported"));
        }
        let boot = match p.get("boot") {
            None => 1,
            Some(v) => v
                .parse::<u8>()
                .ok()
                .filter(|n| (1..=crate::boot::MAX_VCPUS).contains(n))
                .ok_or_else(|| p.invalid("boot", "expected 1..=32"))?,
        };
        if let Some(max) = p.get("max") {
            let max: u8 = max
                .parse()
                .map_err(|_| p.invalid("max", "expected a vCPU count"))?;
            if max < boot {
                return Err(p.invalid("max", "below boot"));
            }
        }
        let hidden = match p.get("hide") {
            None => Vec::new(),
            Some(list) => Self::parse_hidden(list).map_err(|why| ConfigError::Invalid {
                option: "--cpus",
                key: "hide",
                value: list.to_string(),
                why: if why.starts_with("unknown") {
                    "unknown feature (cx16, xsave, avx, avx2, x2apic, pcid, tsc-deadline, rdrand, smep, smap, la57)"
                } else {
                    "expected FEATURE:FEATURE..."
                },
            })?,
        };
        Ok(CpusConfig { boot, hidden })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleOutput {
    Tty,
    File(PathBuf),
    /// A new pseudo-terminal; `vm.info` names it.
    Pty,
    /// A Unix socket served at this path.
    Socket(PathBuf),
    Off,
}

impl ConsoleOutput {
    pub const SYNTAX: &'static str = "tty|off|null|pty|file=PATH|socket=PATH";

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        match text {
            "tty" => Ok(ConsoleOutput::Tty),
            "off" | "null" => Ok(ConsoleOutput::Off),
            "pty" => Ok(ConsoleOutput::Pty),
            _ => {
                let p = OptionParser::parse("--serial", text, &["file", "socket"])?;
                match (p.get("file"), p.get("socket")) {
                    (Some(""), _) => Err(p.invalid("file", "empty path")),
                    (_, Some("")) => Err(p.invalid("socket", "empty path")),
                    (Some(path), None) => Ok(ConsoleOutput::File(PathBuf::from(path))),
                    (None, Some(path)) => Ok(ConsoleOutput::Socket(PathBuf::from(path))),
                    (Some(_), Some(_)) => {
                        Err(p.invalid("socket", "give file= or socket=, not both"))
                    }
                    (None, None) => Err(ConfigError::Missing {
                        option: "--serial",
                        key: "file",
                    }),
                }
            }
        }
    }
}

/// `--api-socket PATH`, `path=PATH` or `fd=N` (Cloud Hypervisor's forms).
pub fn parse_api_socket(text: &str) -> Result<crate::api::http::ApiSocket, ConfigError> {
    use crate::api::http::ApiSocket;
    if !text.contains('=') {
        return match text {
            "" => Err(ConfigError::Missing {
                option: "--api-socket",
                key: "path",
            }),
            path => Ok(ApiSocket::Path(path.into())),
        };
    }
    let p = OptionParser::parse("--api-socket", text, &["path", "fd"])?;
    match (p.get("path"), p.get("fd")) {
        (Some(path), None) if !path.is_empty() => Ok(ApiSocket::Path(path.into())),
        (None, Some(fd)) => fd
            .parse::<i32>()
            .ok()
            .filter(|fd| *fd > 2)
            .map(ApiSocket::Fd)
            .ok_or_else(|| p.invalid("fd", "expected a socket's file descriptor (above 2)")),
        _ => Err(ConfigError::Missing {
            option: "--api-socket",
            key: "path or fd",
        }),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventMonitorConfig {
    Path(PathBuf),
    Fd(i32),
}

impl EventMonitorConfig {
    pub const SYNTAX: &'static str = "path=FILE|fd=N";

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("--event-monitor", text, &["path", "fd"])?;
        match (p.get("path"), p.get("fd")) {
            (Some(path), None) if !path.is_empty() => Ok(EventMonitorConfig::Path(path.into())),
            (None, Some(fd)) => fd
                .parse::<i32>()
                .ok()
                .filter(|fd| *fd >= 0)
                .map(EventMonitorConfig::Fd)
                .ok_or_else(|| p.invalid("fd", "expected a file descriptor number")),
            _ => Err(ConfigError::Missing {
                option: "--event-monitor",
                key: "path or fd",
            }),
        }
    }
}

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

fn check_path(
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
fn parse_device_number(p: &OptionParser) -> Result<Option<u8>, ConfigError> {
    p.get("pci_device_id")
        .map(|n| {
            n.parse::<u8>()
                .map_err(|_| p.invalid("pci_device_id", "expected a device number 1 to 31"))
        })
        .transpose()
}

/// `mapping=runs|pages`.
fn parse_mapping(p: &OptionParser) -> Result<MappingPolicy, ConfigError> {
    match p.get("mapping") {
        None | Some("runs") => Ok(MappingPolicy::Runs),
        Some("pages") => Ok(MappingPolicy::Pages),
        Some(_) => Err(p.invalid("mapping", "expected runs or pages")),
    }
}

fn check_pci_common(
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

fn is_zero(n: &u16) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// `iommu=` and `pci_segment=` as the CLI gives them.
fn parse_pci_common(p: &OptionParser) -> Result<(bool, u16), ConfigError> {
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
        let p = OptionParser::parse(
            "--device",
            text,
            &[
                "path",
                "id",
                "mapping",
                "iommufd",
                "iommu",
                "pci_segment",
                "pci_device_id",
            ],
        )?;
        let (iommu, pci_segment) = parse_pci_common(&p)?;
        let iommufd = match p.get("iommufd") {
            Some(_) => Some(p.toggle("iommufd", false)?),
            None => None,
        };
        let config = DeviceConfig {
            iommufd,
            path: p
                .get("path")
                .map(PathBuf::from)
                .ok_or(ConfigError::Missing {
                    option: "--device",
                    key: "path",
                })?,
            id: p.get("id").map(str::to_string),
            iommu,
            pci_segment,
            pci_device_id: parse_device_number(&p)?,
            mapping: parse_mapping(&p)?,
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
        let p = OptionParser::parse(
            "--user-device",
            text,
            &[
                "socket",
                "id",
                "timeout_ms",
                "mapping",
                "dma",
                "iommu",
                "pci_segment",
                "pci_device_id",
            ],
        )?;
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
        let config = UserDeviceConfig {
            socket: p
                .get("socket")
                .map(PathBuf::from)
                .ok_or(ConfigError::Missing {
                    option: "--user-device",
                    key: "socket",
                })?,
            id: p.get("id").map(str::to_string),
            timeout_ms,
            iommu,
            pci_segment,
            pci_device_id: parse_device_number(&p)?,
            mapping: parse_mapping(&p)?,
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

/// `--platform [tdx=on|sev_snp=on|sw_protected=on][,num_pci_segments=1]`:
/// Cloud Hypervisor's platform option, here choosing the VM type. A
/// confidential type keeps RAM in guest_memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlatformConfig {
    #[serde(skip_serializing_if = "is_false")]
    pub tdx: bool,
    #[serde(skip_serializing_if = "is_false")]
    pub sev_snp: bool,
    /// KVM's software-protected VM type: private memory without hardware
    /// (ours, not Cloud Hypervisor's).
    #[serde(skip_serializing_if = "is_false")]
    pub sw_protected: bool,
    pub num_pci_segments: u16,
    /// VFIO devices map DMA through iommufd rather than the type1
    /// container, unless a device says otherwise.
    #[serde(skip_serializing_if = "is_false")]
    pub iommufd: bool,
    /// SEV-SNP guest policy (`SNP_LAUNCH_START`).
    #[serde(skip)]
    pub snp_policy: u64,
    /// SEV-SNP guest features: every VMSA's SEV_FEATURES, bit 0 (SNP
    /// active) included.
    #[serde(skip)]
    pub snp_guest_features: u64,
}

impl Default for PlatformConfig {
    /// The default VM type on the one PCI segment.
    fn default() -> Self {
        PlatformConfig {
            tdx: false,
            sev_snp: false,
            sw_protected: false,
            num_pci_segments: 1,
            iommufd: false,
            snp_policy: hypervisor::sev_snp::SNP_POLICY_DEFAULT,
            snp_guest_features: hypervisor::sev_snp::SEV_FEATURE_SNP_ACTIVE,
        }
    }
}

impl PlatformConfig {
    pub const SYNTAX: &'static str = "[tdx=on|sev_snp=on|sw_protected=on][,iommufd=on|off][,num_pci_segments=1][,snp_policy=0x30000][,snp_guest_features=0x1]";

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse(
            "--platform",
            text,
            &[
                "tdx",
                "sev_snp",
                "sw_protected",
                "iommufd",
                "num_pci_segments",
                "snp_policy",
                "snp_guest_features",
            ],
        )?;
        let number = |key: &'static str, default: u64| match p.get(key) {
            None => Ok(default),
            Some(text) => match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            }
            .map_err(|_| p.invalid(key, "expected a number (0x for hex)")),
        };
        let defaults = PlatformConfig::default();
        let config = PlatformConfig {
            iommufd: p.toggle("iommufd", false)?,
            tdx: p.toggle("tdx", false)?,
            sev_snp: p.toggle("sev_snp", false)?,
            sw_protected: p.toggle("sw_protected", false)?,
            num_pci_segments: match p.get("num_pci_segments") {
                None => 1,
                Some("1") => 1,
                Some(_) => return Err(p.invalid("num_pci_segments", "only 1 PCI segment exists")),
            },
            snp_policy: number("snp_policy", defaults.snp_policy)?,
            snp_guest_features: number("snp_guest_features", defaults.snp_guest_features)?,
        };
        let snp_keys = p.get("snp_policy").is_some() || p.get("snp_guest_features").is_some();
        if snp_keys && !config.sev_snp {
            return Err(ConfigError::Invalid {
                option: "--platform",
                key: "snp_policy",
                value: text.to_string(),
                why: "snp_policy and snp_guest_features need sev_snp=on",
            });
        }
        if [config.tdx, config.sev_snp, config.sw_protected]
            .iter()
            .filter(|on| **on)
            .count()
            > 1
        {
            return Err(ConfigError::Invalid {
                option: "--platform",
                key: "tdx",
                value: text.to_string(),
                why: "choose one of tdx, sev_snp and sw_protected",
            });
        }
        Ok(config)
    }

    /// The KVM VM type this platform asks for.
    pub fn vm_type(&self) -> hypervisor::VmType {
        if self.tdx {
            hypervisor::VmType::Tdx
        } else if self.sev_snp {
            hypervisor::VmType::SevSnp
        } else if self.sw_protected {
            hypervisor::VmType::SwProtected
        } else {
            hypervisor::VmType::Default
        }
    }

    pub fn is_confidential(&self) -> bool {
        self.vm_type() != hypervisor::VmType::Default
    }
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
mod tests {
    use super::*;

    #[test]
    fn memory_sizes_and_layouts() {
        let m = MemoryConfig::parse("size=512M,guest_memfd=on").unwrap();
        assert_eq!(m.size, 512 << 20);
        assert!(m.guest_memfd);
        assert_eq!(m.layout, MemoryLayout::Auto);
        let m = MemoryConfig::parse("size=1G").unwrap();
        assert_eq!(m.layout, MemoryLayout::Anonymous);
        let m = MemoryConfig::parse("size=0x2000000,guest_memfd=on,layout=split").unwrap();
        assert_eq!((m.size, m.layout), (32 << 20, MemoryLayout::Split));
    }

    #[test]
    fn memory_errors_name_the_problem() {
        let err = |t| MemoryConfig::parse(t).unwrap_err().to_string();
        assert!(err("size=0").contains("must not be zero"));
        assert!(err("size=16777217").contains("multiple of 4 KiB"));
        assert!(err("size=8M").contains("at least 16M"));
        assert!(err("size=12X").contains("not a size"));
        assert!(err("guest_memfd=on").contains("missing size="));
        assert!(err("size=1G,colour=red").contains("unknown key \"colour\""));
        assert!(err("size=1G,size=2G").contains("given twice"));
        assert!(err("size=1G,guest_memfd=maybe").contains("expected on or off"));
        assert!(err("size=1G,layout=split").contains("needs guest_memfd=on"));
        assert!(err("size=1G,guest_memfd=on,layout=diagonal").contains("expected auto"));
        assert!(err("1G").contains("not key=value"));
    }

    #[test]
    fn cpus_serial_and_events() {
        assert_eq!(CpusConfig::parse("boot=4").unwrap().boot, 4);
        assert!(CpusConfig::parse("boot=0").is_err());
        assert!(CpusConfig::parse("boot=33").is_err());
        // Cloud Hypervisor's max=: no hot-plug, so only boot vCPUs run.
        assert_eq!(CpusConfig::parse("boot=2,max=4").unwrap().boot, 2);
        assert!(CpusConfig::parse("boot=4,max=2").is_err());
        assert_eq!(CpusConfig::parse("boot=4,max=4").unwrap().boot, 4);
        assert!(CpusConfig::parse("kvm_hyperv=on").is_err());
        assert!(CpusConfig::parse("kvm_hyperv=off").is_ok());
        assert!(
            CpusConfig::parse("topology=1:1:1:1")
                .unwrap_err()
                .to_string()
                .contains("unknown key")
        );
        assert_eq!(ConsoleOutput::parse("tty").unwrap(), ConsoleOutput::Tty);
        assert_eq!(ConsoleOutput::parse("off").unwrap(), ConsoleOutput::Off);
        assert_eq!(ConsoleOutput::parse("null").unwrap(), ConsoleOutput::Off);
        assert_eq!(
            ConsoleOutput::parse("socket=/tmp/s").unwrap(),
            ConsoleOutput::Socket("/tmp/s".into())
        );
        assert_eq!(ConsoleOutput::parse("pty").unwrap(), ConsoleOutput::Pty);
        assert!(ConsoleOutput::parse("socket=").is_err());
        assert!(ConsoleOutput::parse("file=/a,socket=/b").is_err());
        assert!(ConsoleOutput::parse("vga").is_err());
        use crate::api::http::ApiSocket;
        assert_eq!(
            parse_api_socket("/tmp/a.sock").unwrap(),
            ApiSocket::Path("/tmp/a.sock".into())
        );
        assert_eq!(
            parse_api_socket("path=/tmp/a.sock").unwrap(),
            ApiSocket::Path("/tmp/a.sock".into())
        );
        assert_eq!(parse_api_socket("fd=7").unwrap(), ApiSocket::Fd(7));
        for bad in ["", "fd=2", "fd=x", "path=", "path=/a,fd=7", "size=1"] {
            assert!(parse_api_socket(bad).is_err(), "{bad}");
        }
        let memory = |text: &str| MemoryConfig::parse(text);
        assert!(memory("size=1G,shared=on,mergeable=off,prefault=on,thp=on").is_ok());
        assert!(memory("size=1G,hugepages=off").is_ok());
        assert!(
            memory("size=1G,hugepages=on")
                .unwrap_err()
                .to_string()
                .contains("hugepages are not supported")
        );
        assert_eq!(
            ConsoleOutput::parse("file=/tmp/c").unwrap(),
            ConsoleOutput::File("/tmp/c".into())
        );
        assert!(ConsoleOutput::parse("file=").is_err());
        assert_eq!(
            EventMonitorConfig::parse("fd=3").unwrap(),
            EventMonitorConfig::Fd(3)
        );
        assert!(EventMonitorConfig::parse("fd=-1").is_err());
        assert_eq!(
            EventMonitorConfig::parse("path=/tmp/events").unwrap(),
            EventMonitorConfig::Path("/tmp/events".into())
        );
        assert!(matches!(
            EventMonitorConfig::parse("path="),
            Err(ConfigError::Missing {
                key: "path or fd",
                ..
            })
        ));
        assert!(EventMonitorConfig::parse("path=/a,fd=3").is_err());
    }

    #[test]
    fn device_options() {
        let d = DeviceConfig::parse("path=/sys/bus/pci/devices/0000:01:00.0/,id=nic0").unwrap();
        assert_eq!(d.id.as_deref(), Some("nic0"));
        let u = UserDeviceConfig::parse("socket=/tmp/dev.sock").unwrap();
        assert_eq!(u.socket, PathBuf::from("/tmp/dev.sock"));
        assert_eq!(u.id, None);
        assert_eq!(u.dma, DmaMode::Fd);
        use crate::boot::cpuid::CpuFeature;
        let cpus = CpusConfig::parse("boot=2,hide=cx16:xsave").unwrap();
        assert_eq!(
            (cpus.boot, cpus.hidden),
            (2, vec![CpuFeature::Cx16, CpuFeature::Xsave])
        );
        assert!(CpusConfig::parse("boot=2").unwrap().hidden.is_empty());
        let err = CpusConfig::parse("hide=cx16:sse9").unwrap_err().to_string();
        assert!(err.contains("unknown feature"), "{err}");
        let dma = |text: &str| UserDeviceConfig::parse(&format!("socket=/s,{text}")).map(|u| u.dma);
        assert_eq!(dma("dma=messages").unwrap(), DmaMode::Messages);
        assert_eq!(dma("dma=fd").unwrap(), DmaMode::Fd);
        assert!(
            dma("dma=mmap")
                .unwrap_err()
                .to_string()
                .contains("fd or messages")
        );
        // The API body and CH-style JSON carry it by name.
        let body: UserDeviceConfig =
            serde_json::from_str(r#"{"socket":"/s","dma":"messages"}"#).unwrap();
        assert_eq!(body.dma, DmaMode::Messages);
        assert!(
            serde_json::from_str::<UserDeviceConfig>(r#"{"socket":"/s","dma":"mmap"}"#).is_err()
        );
        assert_eq!(serde_json::to_value(&body).unwrap()["dma"], "messages");
        assert!(matches!(
            UserDeviceConfig::parse("id=x"),
            Err(ConfigError::Missing { key: "socket", .. })
        ));
        assert!(matches!(
            DeviceConfig::parse("path=/x,id=a b"),
            Err(ConfigError::Invalid { key: "id", .. })
        ));
        assert!(matches!(
            UserDeviceConfig::parse("socket="),
            Err(ConfigError::Invalid { key: "socket", .. })
        ));
        assert!(matches!(
            DeviceConfig::parse("path=/x,bdf=1"),
            Err(ConfigError::UnknownKey { .. })
        ));
        // Cloud Hypervisor's keys: accepted where this VMM can honour them.
        let d = DeviceConfig::parse("path=/x,iommu=off,pci_segment=0").unwrap();
        assert_eq!((d.iommu, d.pci_segment), (false, 0));
        assert!(matches!(
            DeviceConfig::parse("path=/x,iommu=on"),
            Err(ConfigError::Invalid { key: "iommu", .. })
        ));
        assert!(matches!(
            UserDeviceConfig::parse("socket=/s,pci_segment=2"),
            Err(ConfigError::Invalid {
                key: "pci_segment",
                ..
            })
        ));
        assert!(matches!(
            UserDeviceConfig::parse("socket=/s,pci_segment=x"),
            Err(ConfigError::Invalid {
                key: "pci_segment",
                ..
            })
        ));
        // The VFIO backend: the platform's default, a device's own choice.
        assert_eq!(
            PlatformConfig::parse("").unwrap(),
            PlatformConfig::default()
        );
        assert_eq!(PlatformConfig::default().num_pci_segments, 1);
        assert!(!PlatformConfig::parse("").unwrap().iommufd);
        assert!(PlatformConfig::parse("iommufd=on").unwrap().iommufd);
        assert_eq!(DeviceConfig::parse("path=/x").unwrap().iommufd, None);
        assert_eq!(
            DeviceConfig::parse("path=/x,iommufd=on").unwrap().iommufd,
            Some(true)
        );
        assert_eq!(
            DeviceConfig::parse("path=/x,iommufd=off").unwrap().iommufd,
            Some(false)
        );
        assert!(matches!(
            DeviceConfig::parse("path=/x,iommufd=maybe"),
            Err(ConfigError::Invalid { key: "iommufd", .. })
        ));
        let excluded = |bars: Vec<u64>| {
            DeviceConfig {
                path: "/x".into(),
                x_exclude_mmap_bars: bars,
                ..Default::default()
            }
            .validate()
        };
        assert!(excluded(vec![0, 5]).is_ok());
        assert!(matches!(
            excluded(vec![6]),
            Err(ConfigError::Invalid {
                key: "x_exclude_mmap_bars",
                ..
            })
        ));
        let p = PlatformConfig::parse("tdx=on,num_pci_segments=1").unwrap();
        assert_eq!(p.vm_type(), hypervisor::VmType::Tdx);
        assert!(p.is_confidential());
        assert_eq!(
            PlatformConfig::parse("sev_snp=on").unwrap().vm_type(),
            hypervisor::VmType::SevSnp
        );
        assert_eq!(
            PlatformConfig::parse("sw_protected=on").unwrap().vm_type(),
            hypervisor::VmType::SwProtected
        );
        assert!(!PlatformConfig::parse("").unwrap().is_confidential());
        let snp =
            PlatformConfig::parse("sev_snp=on,snp_policy=0x70000,snp_guest_features=33").unwrap();
        assert_eq!((snp.snp_policy, snp.snp_guest_features), (0x70000, 33));
        assert_eq!(
            PlatformConfig::parse("sev_snp=on").unwrap().snp_policy,
            0x30000
        );
        assert!(PlatformConfig::parse("snp_policy=0x30000").is_err());
        assert!(PlatformConfig::parse("sev_snp=on,snp_policy=0xzz").is_err());
        assert!(matches!(
            PlatformConfig::parse("tdx=on,sev_snp=on"),
            Err(ConfigError::Invalid { .. })
        ));
        assert!(matches!(
            PlatformConfig::parse("num_pci_segments=2"),
            Err(ConfigError::Invalid {
                key: "num_pci_segments",
                ..
            })
        ));
        let u = UserDeviceConfig::parse("socket=/s,timeout_ms=250").unwrap();
        assert_eq!(u.timeout_ms, Some(250));
        for bad in [
            "socket=/s,timeout_ms=0",
            "socket=/s,timeout_ms=60001",
            "socket=/s,timeout_ms=x",
        ] {
            assert!(
                matches!(
                    UserDeviceConfig::parse(bad),
                    Err(ConfigError::Invalid {
                        key: "timeout_ms",
                        ..
                    })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn devices_take_a_mapping_policy_and_a_device_number() {
        let u = UserDeviceConfig::parse("socket=/s,mapping=pages,pci_device_id=5").unwrap();
        assert_eq!(
            (u.mapping, u.pci_device_id),
            (MappingPolicy::Pages, Some(5))
        );
        let d = DeviceConfig::parse("path=/p,mapping=pages,pci_device_id=31").unwrap();
        assert_eq!(
            (d.mapping, d.pci_device_id),
            (MappingPolicy::Pages, Some(31))
        );
        assert_eq!(
            DeviceConfig::parse("path=/p").unwrap().mapping,
            MappingPolicy::Runs
        );
        // What asks for nothing is left out of the JSON; what asks for
        // something is there.
        let plain = serde_json::to_value(DeviceConfig::parse("path=/p").unwrap()).unwrap();
        assert!(
            plain.get("iommu").is_none() && plain.get("pci_segment").is_none(),
            "{plain}"
        );
        let asking = serde_json::to_value(DeviceConfig {
            path: "/p".into(),
            iommu: true,
            pci_segment: 1,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (&asking["iommu"], &asking["pci_segment"]),
            (&serde_json::json!(true), &serde_json::json!(1))
        );
        assert_eq!(
            UserDeviceConfig::parse("socket=/s").unwrap().mapping,
            MappingPolicy::Runs,
            "runs by default"
        );
        for (bad, key) in [
            ("socket=/s,mapping=page", "mapping"),
            ("socket=/s,pci_device_id=0", "pci_device_id"),
            ("socket=/s,pci_device_id=32", "pci_device_id"),
            ("socket=/s,pci_device_id=x", "pci_device_id"),
            ("socket=/s,id=memory_region0", "id"),
        ] {
            match UserDeviceConfig::parse(bad) {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        let json: UserDeviceConfig =
            serde_json::from_str(r#"{"socket":"/s","mapping":"pages","pci_device_id":3}"#).unwrap();
        assert_eq!(
            (json.mapping, json.pci_device_id),
            (MappingPolicy::Pages, Some(3))
        );
    }
}
