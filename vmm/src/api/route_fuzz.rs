//! Fuzz target for the API request parser `route(method, url, body)`:
//! arbitrary and near-valid URLs, queries and bodies. The parser never
//! panics, sorts every input into exactly one of "request", 400, 404 or 405
//! by the rules in docs/api.md, and parses valid input to exactly what was
//! sent.

use proptest::prelude::*;

use super::*;
use crate::fuzz_config::fuzz_config;

fn endpoint() -> impl Strategy<Value = String> {
    let known: Vec<String> = ROUTES.iter().map(|(_, e)| e.to_string()).collect();
    prop_oneof![
        4 => proptest::sample::select(known),
        1 => proptest::sample::select(vec![
            "", "vm", "vm.info/", "VM.INFO", "vm.info/../vmm.ping", "vm.%69nfo", "vmm.ping ",
        ])
        .prop_map(str::to_string),
        1 => "\\PC{0,16}",
    ]
}

fn number_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| format!("{n:#x}")),
        (0..(MAX_RANGES as u64 + 2)).prop_map(|n| n.to_string()),
        "[ -~]{0,12}",
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
    ]
}

fn query() -> impl Strategy<Value = String> {
    let pair = (
        proptest::sample::select(vec!["gpa", "size", "limit", "GPA", "x", ""]),
        proptest::option::of(number_text()),
    )
        .prop_map(|(key, value)| match value {
            Some(value) => format!("{key}={value}"),
            None => key.to_string(),
        });
    prop_oneof![
        3 => proptest::collection::vec(pair, 0..5).prop_map(|pairs| pairs.join("&")),
        1 => "\\PC{0,40}",
    ]
}

fn url() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (
            proptest::sample::select(vec![API_PREFIX, API_PREFIX, "/api/v2/", "/api/v1", "", "//api/v1/"]),
            endpoint(),
            proptest::option::of(query()),
        )
            .prop_map(|(prefix, endpoint, query)| match query {
                Some(q) => format!("{prefix}{endpoint}?{q}"),
                None => format!("{prefix}{endpoint}"),
            }),
        1 => "\\PC{0,80}",
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        "[ -~]{0,70}".prop_map(serde_json::Value::from),
        "[A-Za-z0-9_.-]{1,64}".prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        Just(serde_json::Value::Null),
        Just(serde_json::json!(["a"])),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    let object = proptest::collection::btree_map(
        proptest::sample::select(vec!["path", "socket", "id", "extra", ""]),
        json_value(),
        0..4,
    )
    .prop_map(|fields| serde_json::to_vec(&fields).expect("plain JSON"));
    prop_oneof![
        3 => object,
        1 => proptest::collection::vec(any::<u8>(), 0..96),
        1 => Just(Vec::new()),
        // The same fields as an array: what serde alone would take.
        1 => proptest::sample::select(vec![
            &br#"["d0"]"#[..],
            br#"["/tmp/dev.sock","d0"]"#,
            br#"["/sys/bus/pci/devices/0000:01:00.0/"]"#,
        ])
        .prop_map(<[u8]>::to_vec),
    ]
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![Just(Method::Get), Just(Method::Put)]
}

fn request_endpoint(request: &ApiRequest) -> &'static str {
    match request {
        ApiRequest::VmmPing => "vmm.ping",
        ApiRequest::VmmShutdown => "vmm.shutdown",
        ApiRequest::VmCreate(_) => "vm.create",
        ApiRequest::VmBoot => "vm.boot",
        ApiRequest::VmReboot => "vm.reboot",
        ApiRequest::VmDelete => "vm.delete",
        ApiRequest::VmPowerButton => "vm.power-button",
        ApiRequest::VmInfo => "vm.info",
        ApiRequest::VmCounters => "vm.counters",
        ApiRequest::VmMemoryAttributes(_) => "vm.memory-attributes",
        ApiRequest::VmShutdown => "vm.shutdown",
        ApiRequest::VmPause => "vm.pause",
        ApiRequest::VmResume => "vm.resume",
        ApiRequest::VmAddDevice(_) => "vm.add-device",
        ApiRequest::VmAddUserDevice(_) => "vm.add-user-device",
        ApiRequest::VmRemoveDevice(_) => "vm.remove-device",
    }
}

/// A valid window, and its query text in random order and radix.
fn window_query() -> impl Strategy<Value = (AttributeWindow, String)> {
    (
        any::<u64>(),
        1..u64::MAX,
        1..=MAX_RANGES,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_filter("gpa+size must not overflow", |(gpa, size, ..)| {
            gpa.checked_add(*size).is_some()
        })
        .prop_map(|(gpa, size, limit, hex, reversed)| {
            let number = |n: u64| {
                if hex {
                    format!("{n:#x}")
                } else {
                    n.to_string()
                }
            };
            let mut pairs = [
                format!("gpa={}", number(gpa)),
                format!("size={}", number(size)),
                format!("limit={limit}"),
            ];
            if reversed {
                pairs.reverse();
            }
            (AttributeWindow { gpa, size, limit }, pairs.join("&"))
        })
}

proptest! {
    #![proptest_config(fuzz_config())]

    #[test]
    fn every_input_is_a_request_or_the_right_error(
        method in method(),
        url in url(),
        body in body(),
    ) {
        let result = route(method, &url, &body);
        let path = url.split_once('?').map_or(url.as_str(), |(p, _)| p);
        let endpoint = path.strip_prefix(API_PREFIX);
        let known = endpoint.filter(|e| ROUTES.iter().any(|(_, r)| r == e));
        let allowed = known.filter(|e| ROUTES.contains(&(method, e)));
        match &result {
            Ok(request) => {
                prop_assert_eq!(Some(request_endpoint(request)), allowed);
                if matches!(
                    request,
                    ApiRequest::VmAddDevice(_) | ApiRequest::VmAddUserDevice(_) | ApiRequest::VmRemoveDevice(_)
                ) {
                    let value = serde_json::from_slice::<serde_json::Value>(&body);
                    prop_assert!(value.is_ok_and(|v| v.is_object()), "{:?}", String::from_utf8_lossy(&body));
                }
                match request {
                    ApiRequest::VmMemoryAttributes(w) => {
                        prop_assert!((1..=MAX_RANGES).contains(&w.limit));
                        prop_assert!(w.size > 0 && w.gpa.checked_add(w.size).is_some());
                    }
                    ApiRequest::VmAddDevice(config) => prop_assert!(config.validate().is_ok()),
                    ApiRequest::VmAddUserDevice(config) => prop_assert!(config.validate().is_ok()),
                    ApiRequest::VmRemoveDevice(id) => {
                        prop_assert!(crate::config::check_id("remove-device", id).is_ok())
                    }
                    _ => {}
                }
            }
            Err(e) => {
                let expected = match (known, allowed) {
                    (None, _) => 404,
                    (Some(_), None) => 405,
                    (Some(_), Some(_)) => 400,
                };
                prop_assert_eq!(e.status(), expected, "{:?}", e);
                prop_assert!(!e.message().is_empty());
            }
        }
    }

    #[test]
    fn valid_windows_parse_to_what_was_sent((window, query) in window_query()) {
        let url = format!("{API_PREFIX}vm.memory-attributes?{query}");
        prop_assert_eq!(
            route(Method::Get, &url, b""),
            Ok(ApiRequest::VmMemoryAttributes(window))
        );
    }

    #[test]
    fn valid_device_bodies_parse_to_what_was_sent(
        path in "/[a-z0-9/._-]{1,40}",
        id in proptest::option::of("[A-Za-z0-9_.-]{1,64}"),
    ) {
        let body = serde_json::json!({ "socket": path, "id": id }).to_string();
        let url = format!("{API_PREFIX}vm.add-user-device");
        let expected = UserDeviceConfig { socket: path.clone().into(), id: id.clone(), ..Default::default() };
        prop_assert_eq!(
            route(Method::Put, &url, body.as_bytes()),
            Ok(ApiRequest::VmAddUserDevice(expected))
        );
        let body = serde_json::json!({ "path": path, "id": id }).to_string();
        let url = format!("{API_PREFIX}vm.add-device");
        let expected = DeviceConfig { path: path.into(), id, ..Default::default() };
        prop_assert_eq!(
            route(Method::Put, &url, body.as_bytes()),
            Ok(ApiRequest::VmAddDevice(expected))
        );
    }
}
