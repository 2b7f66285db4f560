//! Cloud Hypervisor's `VmConfig` JSON: the body of `vm.create` and the
//! `config` of `vm.info`.
//!
//! Clients built for Cloud Hypervisor send its whole configuration, most of
//! it about devices this VMM does not have. The rule: a field that asks for
//! nothing (null, false, empty, a console in mode `Off` or `Null`) or only
//! hints (`rng`, `cmdline`, `max_vcpus`, backing hints) is accepted, and
//! logged when it carries a value; a field that asks for something this
//! VMM cannot do (a disk, a NIC, hugepages, a firmware) is refused by name,
//! so nobody boots a VM missing what they asked for.

use std::path::PathBuf;

use log::info;
use serde_json::{Map, Value, json};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::machine::PlatformParts;
use super::{
    ConfigError, ConsoleOutput, CpusConfig, DeviceConfig, MemoryConfig, PlatformConfig,
    UserDeviceConfig, VmConfig,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmConfigJsonError {
    #[error("the VM configuration is not JSON: {0}")]
    Syntax(String),
    #[error("{field}: {why}")]
    Field { field: String, why: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
}

fn field_error(field: &str, why: impl Into<String>) -> VmConfigJsonError {
    VmConfigJsonError::Field {
        field: field.to_string(),
        why: why.into(),
    }
}

/// Whether `value` asks for nothing: null, false, 0, "", [], {}, or a
/// console-like object whose mode is `Off` or `Null`.
fn asks_for_nothing(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_u64() == Some(0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => {
            o.is_empty()
                || o.get("mode")
                    .and_then(Value::as_str)
                    .is_some_and(|m| matches!(m, "Off" | "Null"))
        }
    }
}

/// Top-level fields accepted whatever they hold: hints and devices whose
/// absence a guest survives.
const HINTS: &[&str] = &[
    "rng",
    "watchdog",
    "pvpanic",
    "landlock_enable",
    "landlock_rules",
];

/// The object under `field`, or None when absent or null.
fn object<'a>(
    top: &'a Map<String, Value>,
    field: &str,
) -> Result<Option<&'a Map<String, Value>>, VmConfigJsonError> {
    match top.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(field_error(field, "expected an object")),
    }
}

/// One object of the configuration: the fields this VMM reads, typed
/// (`T`), and every other field by name, for the policy (`Policy::check`).
#[derive(Deserialize)]
struct Section<T> {
    #[serde(flatten)]
    known: T,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// The typed section under `field` of `top` (None when absent or null),
/// with what it holds beyond `T` checked against `policy`.
fn section<T: DeserializeOwned>(
    top: &Map<String, Value>,
    field: &str,
    policy: &Policy,
) -> Result<Option<T>, VmConfigJsonError> {
    let Some(o) = object(top, field)? else {
        return Ok(None);
    };
    let Section { known, rest } = Section::<T>::deserialize(Value::Object(o.clone()))
        .map_err(|e| field_error(field, e.to_string()))?;
    policy.check(&rest, field)?;
    Ok(Some(known))
}

/// What a section does with fields outside its typed part that carry a
/// value: Cloud Hypervisor's `hints` (no effect here) are logged and
/// accepted, the `refused` ones are refused with their reason, and any other
/// name is refused as unknown, as at the top level, so a misspelt field
/// never passes silently.
struct Policy {
    hints: &'static [&'static str],
    refused: &'static [(&'static str, &'static str)],
}

impl Policy {
    fn check(&self, rest: &Map<String, Value>, path: &str) -> Result<(), VmConfigJsonError> {
        for (key, value) in rest {
            if asks_for_nothing(value) {
                continue;
            }
            if let Some((_, why)) = self.refused.iter().find(|(k, _)| k == key) {
                return Err(field_error(&format!("{path}.{key}"), *why));
            }
            if !self.hints.contains(&key.as_str()) {
                return Err(field_error(
                    &format!("{path}.{key}"),
                    "unknown field (not part of the VM configuration)",
                ));
            }
            info!("vm.create: {path}.{key} = {value} has no effect here; ignored");
        }
        Ok(())
    }
}

/// Cloud Hypervisor's `CpusConfig`, as far as it is read here.
#[derive(Deserialize)]
struct CpusJson {
    boot_vcpus: Option<u64>,
    max_vcpus: Option<u64>,
    /// CPUID features to hide (ours).
    hide: Option<Vec<String>>,
}

const CPUS_POLICY: Policy = Policy {
    hints: &[
        "topology",
        "kvm_hyperv",
        "max_phys_bits",
        "affinity",
        "features",
        "nested",
    ],
    refused: &[],
};

fn cpus(top: &Map<String, Value>) -> Result<CpusConfig, VmConfigJsonError> {
    let Some(o) = section::<CpusJson>(top, "cpus", &CPUS_POLICY)? else {
        return Ok(CpusConfig::default());
    };
    let boot = o.boot_vcpus.unwrap_or(1);
    let boot = u8::try_from(boot)
        .ok()
        .filter(|n| (1..=crate::boot::MAX_VCPUS).contains(n))
        .ok_or_else(|| field_error("cpus.boot_vcpus", "expected 1..=32"))?;
    if let Some(max) = o.max_vcpus {
        if max < u64::from(boot) {
            return Err(field_error("cpus.max_vcpus", "below boot_vcpus"));
        }
        if max > u64::from(boot) {
            info!("vm.create: cpus.max_vcpus = {max}: no CPU hot-plug here, {boot} vCPUs run");
        }
    }
    let hidden = match o.hide {
        None => Vec::new(),
        Some(names) => CpusConfig::parse_hidden(&names.join(":"))
            .map_err(|why| field_error("cpus.hide", why))?,
    };
    Ok(CpusConfig { boot, hidden })
}

/// Cloud Hypervisor's `MemoryConfig`, with our `guest_memfd` and `layout`.
#[derive(Deserialize)]
struct MemoryJson {
    size: Option<u64>,
    guest_memfd: Option<bool>,
    layout: Option<String>,
}

const MEMORY_POLICY: Policy = Policy {
    hints: &["shared", "mergeable", "prefault", "thp", "hotplug_method"],
    refused: &[
        ("hugepages", "hugepages are not supported"),
        ("hugepage_size", "hugepages are not supported"),
        ("zones", "memory zones are not supported: give memory.size"),
        ("hotplug_size", "memory hot-plug is not supported"),
        ("hotplugged_size", "memory hot-plug is not supported"),
    ],
};

fn memory(top: &Map<String, Value>) -> Result<MemoryConfig, VmConfigJsonError> {
    let o = section::<MemoryJson>(top, "memory", &MEMORY_POLICY)?
        .ok_or_else(|| field_error("memory", "required"))?;
    let size = o
        .size
        .ok_or_else(|| field_error("memory.size", "required"))?;
    let guest_memfd = o.guest_memfd.unwrap_or(false);
    // What we report ourselves comes back in a vm.info round trip.
    let layout = match o.layout.as_deref() {
        Some("anonymous") if !guest_memfd => None,
        other => other,
    };
    Ok(MemoryConfig::new("memory", size, guest_memfd, layout)?)
}

/// Cloud Hypervisor's `PayloadConfig`: a kernel, or a firmware (an OVMF
/// image for a confidential guest).
#[derive(Deserialize)]
struct PayloadJson {
    kernel: Option<String>,
    firmware: Option<String>,
    cmdline: Option<String>,
    initramfs: Option<String>,
}

const NO_IGVM: &str =
    "a kernel (Linux bzImage or vmlinux, or an ELF test guest) or an OVMF firmware is loaded here";

const PAYLOAD_POLICY: Policy = Policy {
    hints: &[],
    refused: &[("igvm", NO_IGVM), ("host_data", NO_IGVM)],
};

struct Payload {
    /// Empty for a firmware boot.
    kernel: PathBuf,
    firmware: Option<PathBuf>,
    cmdline: Option<String>,
    initramfs: Option<PathBuf>,
}

fn payload(top: &Map<String, Value>) -> Result<Payload, VmConfigJsonError> {
    let o = section::<PayloadJson>(top, "payload", &PAYLOAD_POLICY)?
        .ok_or_else(|| field_error("payload", "required"))?;
    let kernel = o.kernel.filter(|k| !k.is_empty());
    let firmware = o.firmware.filter(|f| !f.is_empty());
    let initramfs = o.initramfs.filter(|i| !i.is_empty()).map(PathBuf::from);
    let Some(firmware) = firmware else {
        let kernel = kernel.ok_or_else(|| {
            field_error(
                "payload.kernel",
                "required (an ELF kernel, or payload.firmware for a confidential guest)",
            )
        })?;
        return Ok(Payload {
            kernel: PathBuf::from(kernel),
            firmware: None,
            cmdline: o.cmdline,
            initramfs,
        });
    };
    if kernel.is_some() {
        return Err(field_error("payload", "give kernel or firmware, not both"));
    }
    for (key, given) in [
        ("payload.cmdline", o.cmdline.is_some()),
        ("payload.initramfs", initramfs.is_some()),
    ] {
        if given {
            return Err(field_error(key, "does not apply to a firmware launch"));
        }
    }
    Ok(Payload {
        kernel: PathBuf::new(),
        firmware: Some(PathBuf::from(firmware)),
        cmdline: None,
        initramfs: None,
    })
}

/// Cloud Hypervisor's `ConsoleConfig`: `{"mode": "Off"|"Null"|"Tty"|"File",
/// "file": PATH}` with `"Pty"` and `"Socket"` (`"socket": PATH`) for the
/// serial port.
#[derive(Deserialize)]
struct ConsoleJson {
    mode: Option<String>,
    file: Option<String>,
    socket: Option<String>,
}

const CONSOLE_POLICY: Policy = Policy {
    hints: &[],
    refused: &[("iommu", "there is no virtual IOMMU")],
};

/// The non-empty path a console `field`'s `mode` needs, under `key`.
fn required_path(
    path: Option<String>,
    key: &str,
    field: &str,
    mode: &str,
) -> Result<PathBuf, VmConfigJsonError> {
    path.filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| {
            field_error(
                &format!("{field}.{key}"),
                format!("required with mode {mode}"),
            )
        })
}

fn console(
    top: &Map<String, Value>,
    field: &str,
) -> Result<Option<ConsoleOutput>, VmConfigJsonError> {
    let Some(o) = section::<ConsoleJson>(top, field, &CONSOLE_POLICY)? else {
        return Ok(None);
    };
    let mode = o.mode.as_deref().unwrap_or("Null");
    let output = match mode {
        "Off" | "Null" => ConsoleOutput::Off,
        "Tty" => ConsoleOutput::Tty,
        "File" => ConsoleOutput::File(required_path(o.file, "file", field, mode)?),
        // A pty's path is the VMM's to choose: what vm.info showed is not
        // asked for again.
        "Pty" => ConsoleOutput::Pty,
        "Socket" => ConsoleOutput::Socket(required_path(o.socket, "socket", field, mode)?),
        other => {
            return Err(field_error(
                &format!("{field}.mode"),
                format!("unknown mode {other:?}"),
            ));
        }
    };
    Ok(Some(output))
}

/// Cloud Hypervisor's `PlatformConfig`, with our VM types and `iommufd`.
#[derive(Deserialize)]
struct PlatformJson {
    tdx: Option<bool>,
    sev_snp: Option<bool>,
    sw_protected: Option<bool>,
    iommufd: Option<bool>,
    num_pci_segments: Option<u64>,
}

const PLATFORM_POLICY: Policy = Policy {
    hints: &[
        "serial_number",
        "uuid",
        "oem_strings",
        "iommu_address_width_bits",
    ],
    refused: &[("iommu_segments", "there is no virtual IOMMU")],
};

fn platform(top: &Map<String, Value>) -> Result<PlatformConfig, VmConfigJsonError> {
    let Some(o) = section::<PlatformJson>(top, "platform", &PLATFORM_POLICY)? else {
        return Ok(PlatformConfig::default());
    };
    let defaults = PlatformConfig::default();
    let shown = top
        .get("platform")
        .map(Value::to_string)
        .unwrap_or_default();
    Ok(PlatformConfig::from_parts(
        PlatformParts {
            tdx: o.tdx.unwrap_or(false),
            sev_snp: o.sev_snp.unwrap_or(false),
            sw_protected: o.sw_protected.unwrap_or(false),
            iommufd: o.iommufd.unwrap_or(false),
            num_pci_segments: o.num_pci_segments,
            snp_policy: defaults.snp_policy,
            snp_guest_features: defaults.snp_guest_features,
            snp_keys: false,
        },
        &shown,
    )?)
}

fn list<T: serde::de::DeserializeOwned>(
    top: &Map<String, Value>,
    field: &str,
) -> Result<Vec<T>, VmConfigJsonError> {
    match top.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                serde_json::from_value(item.clone())
                    .map_err(|e| field_error(&format!("{field}[{i}]"), e.to_string()))
            })
            .collect(),
        Some(_) => Err(field_error(field, "expected an array")),
    }
}

/// Reads the body of `vm.create`.
pub fn from_json(body: &[u8]) -> Result<VmConfig, VmConfigJsonError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| VmConfigJsonError::Syntax(e.to_string()))?;
    let Value::Object(top) = value else {
        return Err(VmConfigJsonError::Syntax("expected an object".into()));
    };
    let Payload {
        kernel,
        firmware,
        cmdline,
        initramfs,
    } = payload(&top)?;
    match console(&top, "console")? {
        None | Some(ConsoleOutput::Off) => {}
        Some(ConsoleOutput::Tty) => info!(
            "vm.create: console: there is no virtio-console here; the serial port is the console"
        ),
        Some(_) => {
            return Err(field_error(
                "console.mode",
                "there is no virtio-console (Off, Null or Tty; the serial port is the console)",
            ));
        }
    }
    let devices: Vec<DeviceConfig> = list(&top, "devices")?;
    for device in &devices {
        device.validate()?;
    }
    let user_devices: Vec<UserDeviceConfig> = list(&top, "user_devices")?;
    for device in &user_devices {
        device.validate()?;
    }
    match top.get("iommu") {
        None | Some(Value::Null | Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            return Err(field_error("iommu", "there is no virtual IOMMU"));
        }
        Some(_) => return Err(field_error(".iommu", "expected true or false")),
    }
    let platform = platform(&top)?;
    // As on the command line: firmware is launched as a confidential guest.
    if firmware.is_some() && !platform.sev_snp && !platform.tdx {
        return Err(field_error(
            "payload.firmware",
            "boots a confidential guest: set platform.sev_snp or platform.tdx",
        ));
    }
    let config = VmConfig {
        kernel,
        firmware,
        cmdline,
        initramfs,
        memory: memory(&top)?,
        platform,
        cpus: cpus(&top)?,
        serial: console(&top, "serial")?.unwrap_or(ConsoleOutput::Off),
        devices,
        user_devices,
    }
    .normalized();
    const OURS: &[&str] = &[
        "cpus",
        "memory",
        "payload",
        "serial",
        "console",
        "devices",
        "user_devices",
        "platform",
        "iommu",
    ];
    for (key, value) in &top {
        if OURS.contains(&key.as_str()) || asks_for_nothing(value) {
            continue;
        }
        if HINTS.contains(&key.as_str()) {
            info!("vm.create: {key} = {value} has no effect here; ignored");
            continue;
        }
        return Err(field_error(key, "not supported by this VMM"));
    }
    Ok(config)
}

fn console_json(output: &ConsoleOutput) -> Value {
    match output {
        ConsoleOutput::Tty => json!({ "mode": "Tty" }),
        ConsoleOutput::Off => json!({ "mode": "Off" }),
        ConsoleOutput::File(path) => json!({ "mode": "File", "file": path }),
        ConsoleOutput::Pty => json!({ "mode": "Pty" }),
        ConsoleOutput::Socket(path) => json!({ "mode": "Socket", "socket": path }),
    }
}

/// The configuration in Cloud Hypervisor's shape, plus our fields
/// (`memory.guest_memfd`, `memory.layout`, the platform's VM types and
/// `iommufd`, the devices' `mapping`).
pub fn to_json(config: &VmConfig) -> Value {
    let mut payload = match &config.firmware {
        Some(firmware) => json!({ "firmware": firmware }),
        None => json!({ "kernel": config.kernel }),
    };
    if let Some(cmdline) = &config.cmdline {
        payload["cmdline"] = json!(cmdline);
    }
    if let Some(initramfs) = &config.initramfs {
        payload["initramfs"] = json!(initramfs);
    }
    let mut cpus = json!({
        "boot_vcpus": config.cpus.boot,
        "max_vcpus": config.cpus.boot,
    });
    if !config.cpus.hidden.is_empty() {
        cpus["hide"] = json!(config.cpus.hidden);
    }
    json!({
        "cpus": cpus,
        "memory": {
            "size": config.memory.size,
            "guest_memfd": config.memory.guest_memfd,
            "layout": config.memory.layout_name(),
            "shared": false,
            "hugepages": false,
        },
        "payload": payload,
        "serial": console_json(&config.serial),
        "console": { "mode": "Off" },
        "devices": config.devices,
        "user_devices": config.user_devices,
        "platform": config.platform,
        "iommu": false,
    })
}

#[cfg(test)]
mod tests;
