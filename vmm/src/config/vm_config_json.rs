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

/// The object under `field`, or an empty one when absent or null.
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

fn integer(
    o: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Option<u64>, VmConfigJsonError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| field_error(&format!("{path}.{field}"), "expected an unsigned integer")),
    }
}

fn boolean(o: &Map<String, Value>, field: &str, path: &str) -> Result<bool, VmConfigJsonError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(field_error(
            &format!("{path}.{field}"),
            "expected true or false",
        )),
    }
}

fn string<'a>(
    o: &'a Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Option<&'a str>, VmConfigJsonError> {
    match o.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(field_error(&format!("{path}.{field}"), "expected a string")),
    }
}

/// Checks the fields of `o` outside `known` that carry a value: those in
/// `hints` (Cloud Hypervisor's, with no effect here) are logged, those in
/// `refused` are refused with their reason, and any other name is refused
/// as unknown, as at the top level, so a misspelt field never passes
/// silently.
fn check_rest(
    o: &Map<String, Value>,
    path: &str,
    known: &[&str],
    hints: &[&str],
    refused: &[(&str, &str)],
) -> Result<(), VmConfigJsonError> {
    for (key, value) in o {
        if known.contains(&key.as_str()) || asks_for_nothing(value) {
            continue;
        }
        if let Some((_, why)) = refused.iter().find(|(k, _)| k == key) {
            return Err(field_error(&format!("{path}.{key}"), *why));
        }
        if !hints.contains(&key.as_str()) {
            return Err(field_error(
                &format!("{path}.{key}"),
                "unknown field (not part of the VM configuration)",
            ));
        }
        info!("vm.create: {path}.{key} = {value} has no effect here; ignored");
    }
    Ok(())
}

fn cpus(top: &Map<String, Value>) -> Result<CpusConfig, VmConfigJsonError> {
    let Some(o) = object(top, "cpus")? else {
        return Ok(CpusConfig::default());
    };
    let boot = integer(o, "boot_vcpus", "cpus")?.unwrap_or(1);
    let boot = u8::try_from(boot)
        .ok()
        .filter(|n| (1..=crate::boot::MAX_VCPUS).contains(n))
        .ok_or_else(|| field_error("cpus.boot_vcpus", "expected 1..=32"))?;
    if let Some(max) = integer(o, "max_vcpus", "cpus")? {
        if max < u64::from(boot) {
            return Err(field_error("cpus.max_vcpus", "below boot_vcpus"));
        }
        if max > u64::from(boot) {
            info!("vm.create: cpus.max_vcpus = {max}: no CPU hot-plug here, {boot} vCPUs run");
        }
    }
    check_rest(
        o,
        "cpus",
        &["boot_vcpus", "max_vcpus", "hide"],
        &[
            "topology",
            "kvm_hyperv",
            "max_phys_bits",
            "affinity",
            "features",
            "nested",
        ],
        &[],
    )?;
    let hidden = match o.get("hide") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(names)) => {
            let names: Option<Vec<&str>> = names.iter().map(Value::as_str).collect();
            let names = names.ok_or_else(|| field_error("cpus.hide", "expected feature names"))?;
            CpusConfig::parse_hidden(&names.join(":"))
                .map_err(|why| field_error("cpus.hide", why))?
        }
        Some(_) => {
            return Err(field_error(
                "cpus.hide",
                "expected an array of feature names",
            ));
        }
    };
    Ok(CpusConfig { boot, hidden })
}

fn memory(top: &Map<String, Value>) -> Result<MemoryConfig, VmConfigJsonError> {
    let o = object(top, "memory")?.ok_or_else(|| field_error("memory", "required"))?;
    let size =
        integer(o, "size", "memory")?.ok_or_else(|| field_error("memory.size", "required"))?;
    let guest_memfd = boolean(o, "guest_memfd", "memory")?;
    let layout = string(o, "layout", "memory")?;
    // What we report ourselves comes back in a vm.info round trip.
    let layout = match layout {
        Some("anonymous") if !guest_memfd => None,
        other => other,
    };
    check_rest(
        o,
        "memory",
        &["size", "guest_memfd", "layout"],
        &["shared", "mergeable", "prefault", "thp", "hotplug_method"],
        &[
            ("hugepages", "hugepages are not supported"),
            ("hugepage_size", "hugepages are not supported"),
            ("zones", "memory zones are not supported: give memory.size"),
            ("hotplug_size", "memory hot-plug is not supported"),
            ("hotplugged_size", "memory hot-plug is not supported"),
        ],
    )?;
    Ok(MemoryConfig::new("memory", size, guest_memfd, layout)?)
}

struct Payload {
    kernel: PathBuf,
    cmdline: Option<String>,
    initramfs: Option<PathBuf>,
}

fn payload(top: &Map<String, Value>) -> Result<Payload, VmConfigJsonError> {
    let o = object(top, "payload")?.ok_or_else(|| field_error("payload", "required"))?;
    let kernel = string(o, "kernel", "payload")?
        .filter(|k| !k.is_empty())
        .ok_or_else(|| field_error("payload.kernel", "required (an ELF kernel)"))?;
    let cmdline = string(o, "cmdline", "payload")?.map(str::to_string);
    let initramfs = string(o, "initramfs", "payload")?
        .filter(|i| !i.is_empty())
        .map(PathBuf::from);
    let only_kernels =
        "only a kernel is loaded here (Linux bzImage or vmlinux, or an ELF test guest)";
    check_rest(
        o,
        "payload",
        &["kernel", "cmdline", "initramfs"],
        &[],
        &[
            ("firmware", only_kernels),
            ("igvm", only_kernels),
            ("host_data", only_kernels),
        ],
    )?;
    Ok(Payload {
        kernel: PathBuf::from(kernel),
        cmdline,
        initramfs,
    })
}

/// The non-empty path under `key` that console `field`'s `mode` needs.
fn required_path(
    o: &Map<String, Value>,
    key: &str,
    field: &str,
    mode: &str,
) -> Result<PathBuf, VmConfigJsonError> {
    string(o, key, field)?
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| {
            field_error(
                &format!("{field}.{key}"),
                format!("required with mode {mode}"),
            )
        })
}

/// Cloud Hypervisor's `ConsoleConfig`: `{"mode": "Off"|"Null"|"Tty"|"File",
/// "file": PATH}` with `"Pty"` and `"Socket"` (`"socket": PATH`) for the serial port.
fn console(
    top: &Map<String, Value>,
    field: &str,
) -> Result<Option<ConsoleOutput>, VmConfigJsonError> {
    let Some(o) = object(top, field)? else {
        return Ok(None);
    };
    let mode = string(o, "mode", field)?.unwrap_or("Null");
    let output = match mode {
        "Off" | "Null" => ConsoleOutput::Off,
        "Tty" => ConsoleOutput::Tty,
        "File" => ConsoleOutput::File(required_path(o, "file", field, mode)?),
        // A pty's path is the VMM's to choose: what vm.info showed is not
        // asked for again.
        "Pty" => ConsoleOutput::Pty,
        "Socket" => ConsoleOutput::Socket(required_path(o, "socket", field, mode)?),
        other => {
            return Err(field_error(
                &format!("{field}.mode"),
                format!("unknown mode {other:?}"),
            ));
        }
    };
    check_rest(
        o,
        field,
        &["mode", "file", "socket"],
        &[],
        &[("iommu", "there is no virtual IOMMU")],
    )?;
    Ok(Some(output))
}

fn platform(top: &Map<String, Value>) -> Result<PlatformConfig, VmConfigJsonError> {
    let Some(o) = object(top, "platform")? else {
        return Ok(PlatformConfig::parse("")?);
    };
    let mut text = Vec::new();
    for key in ["tdx", "sev_snp", "sw_protected", "iommufd"] {
        if boolean(o, key, "platform")? {
            text.push(format!("{key}=on"));
        }
    }
    if let Some(n) = integer(o, "num_pci_segments", "platform")? {
        text.push(format!("num_pci_segments={n}"));
    }
    check_rest(
        o,
        "platform",
        &[
            "tdx",
            "sev_snp",
            "sw_protected",
            "iommufd",
            "num_pci_segments",
        ],
        &[
            "serial_number",
            "uuid",
            "oem_strings",
            "iommu_address_width_bits",
        ],
        &[("iommu_segments", "there is no virtual IOMMU")],
    )?;
    Ok(PlatformConfig::parse(&text.join(","))?)
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
    if boolean(&top, "iommu", "")? {
        return Err(field_error("iommu", "there is no virtual IOMMU"));
    }
    let config = VmConfig {
        kernel,
        firmware: None,
        cmdline,
        initramfs,
        memory: memory(&top)?,
        platform: platform(&top)?,
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
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig, VmConfigJsonError> {
        from_json(text.as_bytes())
    }

    fn refused_field(text: &str) -> String {
        match parse(text) {
            Err(VmConfigJsonError::Field { field, .. }) => field,
            other => panic!("{text}: expected a refused field, got {other:?}"),
        }
    }

    #[test]
    fn a_minimal_cloud_hypervisor_config() {
        let c = parse(r#"{"payload":{"kernel":"/k.elf"},"memory":{"size":536870912}}"#).unwrap();
        assert_eq!(c.kernel, PathBuf::from("/k.elf"));
        assert_eq!(c.memory.size, 512 << 20);
        assert!(!c.memory.guest_memfd);
        assert_eq!(c.cpus.boot, 1);
        assert_eq!(
            c.serial,
            ConsoleOutput::Off,
            "Cloud Hypervisor's serial default is Null"
        );
        assert!(c.devices.is_empty() && c.user_devices.is_empty());
    }

    #[test]
    fn what_a_full_client_sends_is_accepted_where_it_asks_for_nothing() {
        // The shape generated clients send: every section present, most
        // empty or off.
        let c = parse(
            r#"{
              "cpus": {"boot_vcpus": 2, "max_vcpus": 4, "kvm_hyperv": false, "topology": null},
              "memory": {"size": 1073741824, "guest_memfd": true, "layout": "split",
                         "shared": true, "hugepages": false, "mergeable": false, "thp": true,
                         "hotplug_size": null, "zones": []},
              "payload": {"kernel": "/k.elf", "cmdline": "console=ttyS0"},
              "disks": [], "net": [], "fs": null, "pmem": [], "vsock": null,
              "rng": {"src": "/dev/urandom", "iommu": false},
              "serial": {"mode": "Tty"}, "console": {"mode": "Off"},
              "debug_console": {"mode": "Off"},
              "devices": [{"path": "/sys/bus/pci/devices/0000:01:00.0/", "iommu": false,
                           "pci_segment": 0, "x_exclude_mmap_bars": []}],
              "user_devices": [{"socket": "/tmp/d.sock", "id": "d0", "pci_segment": 0}],
              "iommu": false, "watchdog": false, "pvpanic": false,
              "platform": {"num_pci_segments": 1, "tdx": false, "iommu_segments": [],
                           "serial_number": "x1"},
              "landlock_enable": false
            }"#,
        )
        .unwrap();
        assert_eq!(c.cpus.boot, 2);
        assert_eq!(c.memory.size, 1 << 30);
        assert_eq!(c.memory.layout, crate::memory::MemoryLayout::Split);
        assert_eq!(c.cmdline.as_deref(), Some("console=ttyS0"));
        assert_eq!(c.serial, ConsoleOutput::Tty);
        assert_eq!(c.devices.len(), 1);
        assert_eq!(c.user_devices[0].id.as_deref(), Some("d0"));
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let with = |top: &str| {
            format!(r#"{{"payload":{{"kernel":"/k"}},"memory":{{"size":67108864}},{top}}}"#)
        };
        let memory = |extra: &str| {
            format!(r#"{{"payload":{{"kernel":"/k"}},"memory":{{"size":67108864,{extra}}}}}"#)
        };
        assert_eq!(
            refused_field(&with(r#""disks":[{"path":"/d.img"}]"#)),
            "disks"
        );
        assert_eq!(refused_field(&with(r#""net":[{"tap":"t0"}]"#)), "net");
        // Zero, empty, false and null ask for nothing; any other value does.
        for nothing in [
            r#""numa":0"#,
            r#""tpm":"""#,
            r#""vsock":false"#,
            r#""fs":{}"#,
        ] {
            assert!(parse(&with(nothing)).is_ok(), "{nothing}");
        }
        assert_eq!(refused_field(&with(r#""numa":3"#)), "numa");
        assert_eq!(refused_field(&with(r#""tpm":"/dev/tpm0""#)), "tpm");
        assert_eq!(refused_field(&with(r#""vsock":true"#)), "vsock");
        assert_eq!(refused_field(&with(r#""fs":{"tag":"t"}"#)), "fs");
        assert_eq!(
            refused_field(&with(r#""debug_console":{"mode":"Tty"}"#)),
            "debug_console"
        );
        assert!(parse(&with(r#""debug_console":{"mode":"Null"}"#)).is_ok());
        assert_eq!(refused_field(&with(r#""iommu":true"#)), "iommu");
        assert_eq!(
            refused_field(&memory(r#""hugepages":true"#)),
            "memory.hugepages"
        );
        assert_eq!(
            refused_field(&memory(r#""zones":[{"id":"z"}]"#)),
            "memory.zones"
        );
        assert_eq!(
            refused_field(&with(r#""serial":{"mode":"Socket"}"#)),
            "serial.socket"
        );
        for (serial, expected) in [
            (
                r#""serial":{"mode":"Socket","socket":"/tmp/s"}"#,
                ConsoleOutput::Socket("/tmp/s".into()),
            ),
            (
                r#""serial":{"mode":"Pty","file":"/dev/pts/3"}"#,
                ConsoleOutput::Pty,
            ),
        ] {
            let config = parse(&with(serial)).unwrap();
            assert_eq!(config.serial, expected);
            assert_eq!(
                from_json(to_json(&config).to_string().as_bytes()).unwrap(),
                config
            );
        }
        assert_eq!(
            refused_field(&with(r#""console":{"mode":"Pty"}"#)),
            "console.mode"
        );
        assert_eq!(
            refused_field(&with(r#""serial":{"mode":"Vga"}"#)),
            "serial.mode"
        );
        assert_eq!(
            refused_field(
                r#"{"payload":{"kernel":"/k","firmware":"/fw"},"memory":{"size":67108864}}"#
            ),
            "payload.firmware"
        );
        assert_eq!(refused_field(r#"{"memory":{"size":67108864}}"#), "payload");
        assert_eq!(refused_field(r#"{"payload":{"kernel":"/k"}}"#), "memory");
        // Unknown nested names are refused as unknown top-level ones are;
        // Cloud Hypervisor's own hints are not.
        for (section, field) in [
            ("memory", r#""bogus":1"#),
            ("cpus", r#""boot_vcpu":2"#),
            ("payload", r#""kernal":"/k2""#),
            ("platform", r#""tdx_mode":"on""#),
            ("serial", r#""mode":"Tty","path":"/x""#),
        ] {
            let body = match section {
                "memory" => memory(field),
                "payload" => format!(
                    r#"{{"payload":{{"kernel":"/k",{field}}},"memory":{{"size":67108864}}}}"#
                ),
                other => with(&format!(r#""{other}":{{{field}}}"#)),
            };
            let err = parse(&body).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("{section}.")) && err.contains("unknown field"),
                "{err}"
            );
        }
        assert!(parse(&memory(r#""mergeable":true,"prefault":true"#)).is_ok());
        assert!(parse(&with(r#""cpus":{"boot_vcpus":1,"kvm_hyperv":true}"#)).is_ok());
        assert!(parse(&with(r#""platform":{"serial_number":"s1","uuid":"u"}"#)).is_ok());
        assert!(
            parse(&memory(r#""bogus":null"#)).is_ok(),
            "asks for nothing"
        );
        // A Linux payload's initramfs, and CPUID features to hide (ours).
        let linux = parse(
            r#"{"payload":{"kernel":"/bzImage","cmdline":"console=ttyS0","initramfs":"/initrd"},
                "memory":{"size":67108864},"cpus":{"boot_vcpus":2,"hide":["cx16","xsave"]}}"#,
        )
        .unwrap();
        assert_eq!(linux.initramfs, Some(PathBuf::from("/initrd")));
        assert_eq!(
            linux.cpus.hidden,
            [
                crate::boot::cpuid::CpuFeature::Cx16,
                crate::boot::cpuid::CpuFeature::Xsave
            ]
        );
        let back = to_json(&linux);
        assert_eq!(back["payload"]["initramfs"], "/initrd");
        assert_eq!(back["cpus"]["hide"], json!(["cx16", "xsave"]));
        assert_eq!(from_json(back.to_string().as_bytes()).unwrap(), linux);
        let err = parse(&with(r#""cpus":{"hide":["sse9"]}"#))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cpus.hide") && err.contains("sse9"), "{err}");
        assert_eq!(
            refused_field(
                r#"{"payload":{"kernel":"/k"},"memory":{"size":67108864},"cpus":{"boot_vcpus":0}}"#
            ),
            "cpus.boot_vcpus"
        );
        assert!(matches!(
            parse(r#"{"payload":{"kernel":"/k"},"memory":{"size":12345}}"#),
            Err(VmConfigJsonError::Config(ConfigError::Invalid {
                key: "size",
                ..
            }))
        ));
        // "anonymous" is what vm.info says of RAM without guest_memfd; with
        // guest_memfd it names no layout.
        assert!(matches!(
            parse(&memory(r#""guest_memfd":true,"layout":"anonymous""#)),
            Err(VmConfigJsonError::Config(ConfigError::Invalid {
                key: "layout",
                ..
            }))
        ));
        assert!(matches!(parse("[1]"), Err(VmConfigJsonError::Syntax(_))));
        assert!(matches!(parse("{"), Err(VmConfigJsonError::Syntax(_))));
    }

    #[test]
    fn what_vm_info_reports_is_accepted_back_unchanged() {
        let config = parse(
            r#"{"payload":{"kernel":"/k.elf","cmdline":"x"},"memory":{"size":67108864,"guest_memfd":true},
                "cpus":{"boot_vcpus":3,"max_vcpus":3},"serial":{"mode":"File","file":"/tmp/s"},
                "platform":{"iommufd":true},
                "user_devices":[{"socket":"/tmp/d.sock","id":"d0","mapping":"pages"}]}"#,
        )
        .unwrap();
        let shown = to_json(&config);
        assert_eq!(shown["cpus"]["boot_vcpus"], 3);
        assert_eq!(shown["cpus"]["max_vcpus"], 3);
        assert_eq!(shown["payload"]["kernel"], "/k.elf");
        assert_eq!(shown["serial"]["mode"], "File");
        assert_eq!(shown["memory"]["layout"], "auto");
        let again = from_json(shown.to_string().as_bytes()).unwrap();
        assert_eq!(again, config);
        let anonymous = parse(r#"{"payload":{"kernel":"/k"},"memory":{"size":67108864}}"#).unwrap();
        assert_eq!(
            from_json(to_json(&anonymous).to_string().as_bytes()).unwrap(),
            anonymous
        );
    }

    #[test]
    fn a_confidential_platform_implies_guest_memfd() {
        let c = parse(
            r#"{"payload":{"kernel":"/k"},"memory":{"size":67108864},"platform":{"tdx":true}}"#,
        )
        .unwrap();
        assert!(c.memory.guest_memfd);
        assert_eq!(c.platform.vm_type(), hypervisor::VmType::Tdx);
    }
}
