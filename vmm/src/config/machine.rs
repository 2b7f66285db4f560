//! The machine's options: memory, vCPUs, serial console, API socket, event
//! monitor and platform.

use std::path::PathBuf;

use serde::Serialize;

use super::ConfigError;
use super::parser::{OptionParser, is_false, parse_size};
use crate::memory::MemoryLayout;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    pub size: u64,
    pub guest_memfd: bool,
    pub layout: MemoryLayout,
}

impl MemoryConfig {
    pub const SYNTAX: &'static str = "size=SIZE[,guest_memfd=on|off][,layout=auto|in-place|split][,shared=on|off][,hugepages=off][,mergeable=on|off][,prefault=on|off][,thp=on|off]";

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("--memory", text, Self::SYNTAX)?;
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
        if !size.is_multiple_of(arch::layout::PAGE_SIZE) {
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
        let p = OptionParser::parse("--cpus", text, Self::SYNTAX)?;
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
                let p = OptionParser::parse("--serial", text, Self::SYNTAX)?;
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

/// `--api-socket`'s forms (Cloud Hypervisor's).
pub const API_SOCKET_SYNTAX: &str = "PATH|path=PATH|fd=N";

/// `--api-socket PATH`, `path=PATH` or `fd=N`.
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
    let p = OptionParser::parse("--api-socket", text, API_SOCKET_SYNTAX)?;
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
        let p = OptionParser::parse("--event-monitor", text, Self::SYNTAX)?;
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

/// What a platform is made of, before it is checked.
pub(super) struct PlatformParts {
    pub(super) tdx: bool,
    pub(super) sev_snp: bool,
    pub(super) sw_protected: bool,
    pub(super) iommufd: bool,
    pub(super) num_pci_segments: Option<u64>,
    pub(super) snp_policy: u64,
    pub(super) snp_guest_features: u64,
    /// `snp_policy` or `snp_guest_features` was given.
    pub(super) snp_keys: bool,
}

impl PlatformConfig {
    pub const SYNTAX: &'static str = "[tdx=on|sev_snp=on|sw_protected=on][,iommufd=on|off][,num_pci_segments=1][,snp_policy=0x30000][,snp_guest_features=0x1]";

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let p = OptionParser::parse("--platform", text, Self::SYNTAX)?;
        let number = |key: &'static str, default: u64| match p.get(key) {
            None => Ok(default),
            Some(text) => match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            }
            .map_err(|_| p.invalid(key, "expected a number (0x for hex)")),
        };
        let defaults = PlatformConfig::default();
        // Read in this order, so the first bad key is the one named.
        let iommufd = p.toggle("iommufd", false)?;
        let tdx = p.toggle("tdx", false)?;
        let sev_snp = p.toggle("sev_snp", false)?;
        let sw_protected = p.toggle("sw_protected", false)?;
        let num_pci_segments = match p.get("num_pci_segments") {
            None => None,
            Some("1") => Some(1),
            Some(_) => return Err(p.invalid("num_pci_segments", "only 1 PCI segment exists")),
        };
        Self::from_parts(
            PlatformParts {
                tdx,
                sev_snp,
                sw_protected,
                iommufd,
                num_pci_segments,
                snp_policy: number("snp_policy", defaults.snp_policy)?,
                snp_guest_features: number("snp_guest_features", defaults.snp_guest_features)?,
                snp_keys: p.get("snp_policy").is_some() || p.get("snp_guest_features").is_some(),
            },
            text,
        )
    }

    /// The platform from its typed parts (the CLI's option or the JSON's
    /// object), checked; `shown` is what an error quotes as the value.
    pub(super) fn from_parts(parts: PlatformParts, shown: &str) -> Result<Self, ConfigError> {
        let invalid = |key: &'static str, why: &'static str| ConfigError::Invalid {
            option: "--platform",
            key,
            value: shown.to_string(),
            why,
        };
        if let Some(n) = parts.num_pci_segments.filter(|n| *n != 1) {
            return Err(ConfigError::Invalid {
                option: "--platform",
                key: "num_pci_segments",
                value: n.to_string(),
                why: "only 1 PCI segment exists",
            });
        }
        let config = PlatformConfig {
            iommufd: parts.iommufd,
            tdx: parts.tdx,
            sev_snp: parts.sev_snp,
            sw_protected: parts.sw_protected,
            num_pci_segments: 1,
            snp_policy: parts.snp_policy,
            snp_guest_features: parts.snp_guest_features,
        };
        if parts.snp_keys && !config.sev_snp {
            return Err(invalid(
                "snp_policy",
                "snp_policy and snp_guest_features need sev_snp=on",
            ));
        }
        if [config.tdx, config.sev_snp, config.sw_protected]
            .iter()
            .filter(|on| **on)
            .count()
            > 1
        {
            return Err(invalid(
                "tdx",
                "choose one of tdx, sev_snp and sw_protected",
            ));
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
