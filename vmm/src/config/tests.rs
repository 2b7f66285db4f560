use vm_device::MappingPolicy;

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
    assert!(serde_json::from_str::<UserDeviceConfig>(r#"{"socket":"/s","dma":"mmap"}"#).is_err());
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
    let snp = PlatformConfig::parse("sev_snp=on,snp_policy=0x70000,snp_guest_features=33").unwrap();
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
