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
