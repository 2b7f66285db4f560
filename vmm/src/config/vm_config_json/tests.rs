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
    let refusals = [
        (with(r#""disks":[{"path":"/d.img"}]"#), "disks"),
        (with(r#""net":[{"tap":"t0"}]"#), "net"),
        (with(r#""numa":3"#), "numa"),
        (with(r#""tpm":"/dev/tpm0""#), "tpm"),
        (with(r#""vsock":true"#), "vsock"),
        (with(r#""fs":{"tag":"t"}"#), "fs"),
        (with(r#""debug_console":{"mode":"Tty"}"#), "debug_console"),
        (with(r#""iommu":true"#), "iommu"),
        (memory(r#""hugepages":true"#), "memory.hugepages"),
        (memory(r#""zones":[{"id":"z"}]"#), "memory.zones"),
        (with(r#""serial":{"mode":"Socket"}"#), "serial.socket"),
        (with(r#""console":{"mode":"Pty"}"#), "console.mode"),
        (with(r#""serial":{"mode":"Vga"}"#), "serial.mode"),
        (
            r#"{"payload":{"kernel":"/k","firmware":"/fw"},"memory":{"size":67108864}}"#.into(),
            "payload",
        ),
        (
            r#"{"payload":{"igvm":"/x.igvm"},"memory":{"size":67108864}}"#.into(),
            "payload.igvm",
        ),
        (r#"{"memory":{"size":67108864}}"#.into(), "payload"),
        (r#"{"payload":{"kernel":"/k"}}"#.into(), "memory"),
    ];
    for (text, field) in refusals {
        assert_eq!(refused_field(&text), field, "{text}");
    }
    // Zero, empty, false and null ask for nothing; any other value does.
    for nothing in [
        r#""numa":0"#,
        r#""tpm":"""#,
        r#""vsock":false"#,
        r#""fs":{}"#,
        r#""debug_console":{"mode":"Null"}"#,
    ] {
        assert!(parse(&with(nothing)).is_ok(), "{nothing}");
    }
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
            "payload" => {
                format!(r#"{{"payload":{{"kernel":"/k",{field}}},"memory":{{"size":67108864}}}}"#)
            }
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
    let c =
        parse(r#"{"payload":{"kernel":"/k"},"memory":{"size":67108864},"platform":{"tdx":true}}"#)
            .unwrap();
    assert!(c.memory.guest_memfd);
    assert_eq!(c.platform.vm_type(), hypervisor::VmType::Tdx);
}

/// Cloud Hypervisor's `PayloadConfig { firmware }`: an OVMF image for an
/// SEV-SNP guest or a TD, as `--firmware` takes it, with devices as a
/// kernel has them, and what vm.info shows of it comes back unchanged;
/// without a confidential platform, beside a kernel, or with what only a
/// kernel takes, it is refused by name.
#[test]
fn a_firmware_payload_boots_either_confidential_platform() {
    let body = |platform: &str, extra: &str| {
        format!(
            r#"{{"payload":{{"firmware":"/usr/share/ovmf/OVMF.fd"{extra}}},"memory":{{"size":536870912}},"cpus":{{"boot_vcpus":2}}{platform}}}"#
        )
    };
    for (platform, tdx) in [
        (r#","platform":{"tdx":true}"#, true),
        (r#","platform":{"sev_snp":true}"#, false),
    ] {
        let config = parse(&body(platform, "")).unwrap();
        assert_eq!(
            config.firmware,
            Some(PathBuf::from("/usr/share/ovmf/OVMF.fd"))
        );
        assert_eq!(config.kernel, PathBuf::new());
        assert_eq!((config.platform.tdx, config.platform.sev_snp), (tdx, !tdx));
        assert!(config.memory.guest_memfd, "confidential RAM is guest_memfd");
        let shown = to_json(&config);
        assert_eq!(
            shown["payload"],
            serde_json::json!({"firmware": "/usr/share/ovmf/OVMF.fd"})
        );
        assert_eq!(from_json(shown.to_string().as_bytes()).unwrap(), config);
    }
    let err = parse(&body("", "")).unwrap_err().to_string();
    assert!(
        err.starts_with("payload.firmware") && err.contains("platform.sev_snp or platform.tdx"),
        "{err}"
    );
    let tdx = r#","platform":{"tdx":true}"#;
    for (extra, field) in [
        (r#","kernel":"/k""#, "payload"),
        (r#","cmdline":"console=ttyS0""#, "payload.cmdline"),
        (r#","initramfs":"/initrd""#, "payload.initramfs"),
    ] {
        assert_eq!(refused_field(&body(tdx, extra)), field, "{extra}");
    }
    // Devices are cold-plugged as for a kernel.
    let with_device = r#"{"payload":{"firmware":"/fw"},"memory":{"size":536870912},
        "platform":{"tdx":true},"devices":[{"path":"/sys/bus/pci/devices/0000:00:01.0"}]}"#;
    let config = parse(with_device).unwrap();
    assert_eq!(config.devices.len(), 1);
    assert_eq!(config.firmware, Some(PathBuf::from("/fw")));
    // An empty firmware is no firmware: the kernel is then required.
    let err = parse(r#"{"payload":{"firmware":""},"memory":{"size":67108864}}"#)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("payload.kernel"), "{err}");
}
