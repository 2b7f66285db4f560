use super::*;

const SPEC: &str = include_str!("../../../openapi/cloud-hypervisor.yaml");

/// (method, endpoint) pairs declared under `paths:` of the spec.
fn spec_routes() -> Vec<(Method, String)> {
    let mut routes = Vec::new();
    let mut path = None;
    for line in SPEC.lines() {
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = Some(p.to_string());
        } else if !line.starts_with("    ") && !line.starts_with("  /") {
            path = None;
        }
        let method = match line.trim_end() {
            "    get:" => Method::Get,
            "    put:" => Method::Put,
            _ => continue,
        };
        routes.push((method, path.clone().expect("method under a path")));
    }
    routes
}

/// Keywords a schema object may use in this spec.
const SCHEMA_KEYWORDS: &[&str] = &[
    "type",
    "format",
    "description",
    "enum",
    "items",
    "properties",
    "required",
    "$ref",
    "minimum",
    "maximum",
    "default",
    "pattern",
    "additionalProperties",
    "nullable",
];

/// Walks every schema under `components.schemas` and every property,
/// refusing keys that are not schema keywords: that is what a YAML slip
/// (an unquoted comma in a flow mapping) turns into.
fn check_schema(name: &str, schema: &yaml_rust2::Yaml) {
    let map = schema
        .as_hash()
        .unwrap_or_else(|| panic!("{name}: not a mapping"));
    for (key, value) in map {
        let key = key
            .as_str()
            .unwrap_or_else(|| panic!("{name}: non-string key"));
        assert!(
            SCHEMA_KEYWORDS.contains(&key),
            "{name}: {key:?} is not a schema keyword"
        );
        match key {
            "properties" => {
                for (prop, sub) in value.as_hash().expect("properties mapping") {
                    check_schema(&format!("{name}.{}", prop.as_str().unwrap()), sub);
                }
            }
            "items" | "additionalProperties" if value.as_hash().is_some() => {
                check_schema(&format!("{name}[]"), value)
            }
            "description" | "pattern" | "type" | "format" | "$ref" => {
                assert!(value.as_str().is_some(), "{name}: {key} must be a string")
            }
            _ => {}
        }
    }
}

#[test]
fn the_spec_is_yaml_and_every_schema_uses_only_schema_keywords() {
    let docs = yaml_rust2::YamlLoader::load_from_str(SPEC).expect("the spec is YAML");
    let spec = &docs[0];
    assert!(
        spec["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3."))
    );
    let schemas = spec["components"]["schemas"].as_hash().expect("schemas");
    assert!(schemas.len() > 5);
    for (name, schema) in schemas {
        check_schema(name.as_str().unwrap(), schema);
    }
    let paths = spec["paths"].as_hash().expect("paths");
    assert_eq!(paths.len(), ROUTES.len());
}

#[test]
fn every_route_is_in_the_spec_and_back() {
    let spec = spec_routes();
    assert!(!spec.is_empty());
    for (method, path) in ROUTES {
        assert!(
            spec.contains(&(*method, path.to_string())),
            "{method:?} {path} missing from the OpenAPI spec"
        );
    }
    for (method, path) in &spec {
        assert!(
            ROUTES.contains(&(*method, path.as_str())),
            "{method:?} {path} not routed"
        );
    }
    assert_eq!(spec.len(), ROUTES.len());
}

#[test]
fn device_bodies_are_checked_before_the_vmm_sees_them() {
    let put = |path: &str, body: &str| {
        route(Method::Put, &format!("{API_PREFIX}{path}"), body.as_bytes())
    };
    assert_eq!(
        put("vm.add-user-device", r#"{"socket":"/s","id":"nic0"}"#),
        Ok(ApiRequest::VmAddUserDevice(UserDeviceConfig {
            socket: "/s".into(),
            id: Some("nic0".into()),
            ..Default::default()
        }))
    );
    assert_eq!(
        put("vm.remove-device", r#"{"id":"nic0"}"#),
        Ok(ApiRequest::VmRemoveDevice("nic0".into()))
    );
    // What Cloud Hypervisor's ch-remote sends (its PciDeviceCommonConfig
    // and DeviceConfig serialized).
    assert_eq!(
        put("vm.add-user-device", r#"{"pci_segment":0,"socket":"/s"}"#),
        Ok(ApiRequest::VmAddUserDevice(UserDeviceConfig {
            socket: "/s".into(),
            ..Default::default()
        }))
    );
    assert_eq!(
        put(
            "vm.add-device",
            r#"{"id":"gpu0","pci_segment":0,"path":"/sys/bus/pci/devices/0000:01:00.0/","x_exclude_mmap_bars":[]}"#
        ),
        Ok(ApiRequest::VmAddDevice(DeviceConfig {
            path: "/sys/bus/pci/devices/0000:01:00.0/".into(),
            id: Some("gpu0".into()),
            ..Default::default()
        }))
    );
    for (body, why) in [
        (
            r#"{"socket":"/s","pci_segment":1}"#,
            "only PCI segment 0 exists",
        ),
        (
            r#"{"socket":"/s","iommu":true}"#,
            "there is no virtual IOMMU",
        ),
        (
            r#"{"socket":"/s","pci_device_id":0}"#,
            "0 is the host bridge",
        ),
        (
            r#"{"socket":"/s","pci_device_id":32}"#,
            "expected a device number 1 to 31",
        ),
        (r#"{"socket":"/s","mapping":"bytes"}"#, "unknown variant"),
    ] {
        let err = put("vm.add-user-device", body).unwrap_err();
        assert!(err.message().contains(why), "{body}: {}", err.message());
    }
    let err = put(
        "vm.add-device",
        r#"{"path":"/p","x_nv_gpudirect_clique":1}"#,
    )
    .unwrap_err();
    assert!(err.message().contains("GPUDirect"), "{}", err.message());
    for (path, body) in [
        ("vm.add-user-device", ""),
        ("vm.add-user-device", r#"{"id":"x"}"#),
        ("vm.add-user-device", r#"{"socket":"/s","bogus":1}"#),
        ("vm.add-user-device", r#"{"socket":"/s","id":"has space"}"#),
        ("vm.add-device", r#"{"path":""}"#),
        ("vm.add-device", "[1,2]"),
        ("vm.remove-device", "{}"),
        ("vm.remove-device", r#"{"id":7}"#),
        ("vm.remove-device", r#"{"id":"../etc"}"#),
        ("vm.remove-device", r#"{"id":""}"#),
    ] {
        assert!(
            matches!(put(path, body), Err(HttpError::BadRequest(_))),
            "{path} {body}"
        );
    }
}
