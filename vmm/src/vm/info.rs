//! What `vm.info` and `vm.counters` render: the VM as JSON.

use serde_json::json;

use super::Vm;

fn conversion_counters(
    c: &crate::memory::ConversionCounters,
) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(c).expect("plain counters") {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("counters serialize as an object"),
    }
}

impl Vm {
    /// Cloud Hypervisor's shape: a map of counter groups, each a map of
    /// integers. `memory` holds the totals, `memory_region<N>` each
    /// guest_memfd region's, and every device its DMA mapping counters
    /// under its id.
    pub fn counters(&self) -> serde_json::Value {
        let mut groups = serde_json::Map::new();
        let totals = self.memory.conversion_totals();
        let mut memory = conversion_counters(&totals);
        memory.insert("events_dropped".into(), self.monitor.dropped().into());
        memory.insert(
            "unbacked_to_shared".into(),
            self.memory.unbacked_to_shared().into(),
        );
        groups.insert("memory".into(), memory.into());
        for (index, region) in self.memory.regions().iter().enumerate() {
            if let Some(attrs) = &region.attributes {
                let mut group = conversion_counters(&attrs.counters());
                group.insert("gpa".into(), region.gpa.into());
                group.insert("size".into(), region.size.into());
                groups.insert(format!("memory_region{index}"), group.into());
            }
        }
        for device in self.devices.info() {
            let dma = serde_json::to_value(device.dma).expect("plain counters");
            groups.insert(device.id, dma);
        }
        groups.into()
    }

    /// Cloud Hypervisor's `VmInfo` fields (`config`, `state`,
    /// `memory_actual_size`, `device_tree`) and ours.
    pub fn info(&self) -> serde_json::Value {
        let devices = self.devices.info();
        // Cloud Hypervisor's device tree: one node per device, keyed by id;
        // here every device is a PCI function (or a DMA target) on its own.
        let device_tree: serde_json::Map<String, serde_json::Value> = devices
            .iter()
            .map(|d| {
                (
                    d.id.clone(),
                    json!({
                        "id": d.id,
                        "resources": [],
                        "parent": null,
                        "children": [],
                        "pci_bdf": d.bdf,
                    }),
                )
            })
            .collect();
        let mut config = json!(self.config);
        if let Some(pty) = &self.serial_pty {
            // As Cloud Hypervisor reports a pty: its path as the file.
            config["serial"]["file"] = json!(pty);
        }
        let mut info = json!({
            "config": config,
            "state": self.state,
            "memory_actual_size": self.config.memory.size,
            "device_tree": device_tree,
            "vm_type": self.config.platform.vm_type().name(),
            "memory_attributes": self.memory.tracks_attributes(),
            "memory": {
                "regions": self.memory.region_info(),
                "layout": self.memory.regions()[0].backing.name(),
            },
            "devices": devices,
        });
        if let Some(launch) = &self.launch {
            info["launch"] = launch.info();
        }
        if let Some(firmware) = self.memory.firmware() {
            info["memory"]["firmware"] = json!({
                "gpa": firmware.gpa,
                "size": firmware.size,
                "backing": firmware.backing.name(),
            });
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use crate::vm::LaunchMeasurement;

    /// The spec declares `vm.info`'s `launch` with every field the VMM
    /// writes there, for both platforms: the fields every launch has are
    /// required, the others belong to one platform each.
    #[test]
    fn the_openapi_spec_declares_the_launch_measurement_of_both_platforms() {
        use yaml_rust2::YamlLoader;
        let spec = &YamlLoader::load_from_str(include_str!("../../openapi/cloud-hypervisor.yaml"))
            .unwrap()[0];
        let schemas = &spec["components"]["schemas"];
        assert_eq!(
            schemas["VmInfo"]["properties"]["launch"]["$ref"].as_str(),
            Some("#/components/schemas/LaunchMeasurement")
        );
        let schema = &schemas["LaunchMeasurement"];
        let declared = &schema["properties"];
        let required: Vec<&str> = schema["required"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        assert_eq!(required, ["platform", "measurement"]);
        let platforms: Vec<&str> = declared["platform"]["enum"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        let snp = LaunchMeasurement::SevSnp(crate::sev_snp::Measurement {
            measurement: "00".repeat(48),
            vcpu_signature: 0xa00f11,
            guest_features: 1,
            policy: 0x30000,
        });
        let tdx = LaunchMeasurement::Tdx(crate::tdx::Measurement {
            mrtd: "11".repeat(48),
            attributes: 1 << 28,
            xfam: 0xe7,
        });
        let mut every_key = std::collections::BTreeSet::new();
        for (launch, platform, own) in [
            (
                &snp,
                "sev-snp",
                &["vcpu_signature", "guest_features", "policy"][..],
            ),
            (&tdx, "tdx", &["attributes", "xfam"][..]),
        ] {
            let info = launch.info();
            let keys: Vec<&str> = info
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            for key in &keys {
                let property = &declared[*key];
                assert!(!property.is_badvalue(), "{platform}: {key} not in the spec");
                assert_eq!(property["type"].as_str(), Some("string"), "{key}");
                every_key.insert(key.to_string());
            }
            for key in required.iter().chain(own) {
                assert!(keys.contains(key), "{platform}: {key} missing");
            }
            assert_eq!(
                keys.len(),
                required.len() + own.len(),
                "{platform}: {keys:?}"
            );
            assert_eq!(info["platform"], platform);
            assert!(platforms.contains(&platform), "{platform} not in the enum");
        }
        // Nothing declared that no platform writes.
        assert_eq!(every_key.len(), declared.as_hash().unwrap().len());
        let info = snp.info();
        assert_eq!(info["vcpu_signature"], "0xa00f11");
        assert_eq!(info["guest_features"], "0x1");
        assert_eq!(info["policy"], "0x30000");
        let info = tdx.info();
        assert_eq!(info["measurement"], "11".repeat(48));
        assert_eq!(info["attributes"], "0x10000000");
        assert_eq!(info["xfam"], "0xe7");
    }
}
