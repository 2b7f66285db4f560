#[test]
fn error_bodies_are_arrays_of_the_error_chain_as_cloud_hypervisor_writes_them() {
    let e =
        crate::api::ApiError::Device(crate::device_manager::DeviceError::NotFound("gpu0".into()));
    let body: serde_json::Value = serde_json::from_str(&super::error_chain_body(&e)).unwrap();
    assert_eq!(
        body,
        serde_json::json!(["device request failed", "no device with id \"gpu0\""])
    );
    let body: serde_json::Value =
        serde_json::from_str(&super::error_body("no endpoint x")).unwrap();
    assert_eq!(body, serde_json::json!(["no endpoint x"]));
    // A lifecycle refusal is one message, not repeated by its wrapper,
    // and 404 only for a missing VM (as Cloud Hypervisor answers).
    use crate::control::LifecycleError;
    let missing = crate::api::ApiError::Lifecycle(LifecycleError::NotCreated);
    let body: serde_json::Value = serde_json::from_str(&super::error_chain_body(&missing)).unwrap();
    assert_eq!(body, serde_json::json!(["no VM has been created"]));
    assert_eq!(missing.http_status(), 404);
    let booted = crate::api::ApiError::Lifecycle(LifecycleError::AlreadyBooted);
    assert_eq!(booted.http_status(), 500);
}

use super::*;

#[test]
fn routes_every_endpoint() {
    for (method, path) in ROUTES {
        let body: &[u8] = match *path {
            "vm.add-device" => br#"{"path":"/sys/bus/pci/devices/0000:01:00.0/"}"#,
            "vm.add-user-device" => br#"{"socket":"/tmp/dev.sock","id":"d0"}"#,
            "vm.remove-device" => br#"{"id":"d0"}"#,
            "vm.create" => br#"{"payload":{"kernel":"/k"},"memory":{"size":67108864}}"#,
            _ => b"",
        };
        assert!(
            route(*method, &format!("{API_PREFIX}{path}"), body).is_ok(),
            "{path}"
        );
    }
}

#[test]
fn unknown_paths_and_wrong_methods() {
    for (method, path, want) in [
        (Method::Get, "/api/v1/vm.nope", "not found"),
        (Method::Get, "/v1/vm.info", "not found"),
        (Method::Put, "/api/v1/vm.info", "method not allowed"),
        (Method::Get, "/api/v1/vm.shutdown", "method not allowed"),
    ] {
        let answer = route(method, path, b"");
        let got = match &answer {
            Err(HttpError::NotFound(_)) => "not found",
            Err(HttpError::MethodNotAllowed(_)) => "method not allowed",
            _ => "something else",
        };
        assert_eq!(got, want, "{method:?} {path}: {answer:?}");
    }
}

#[test]
fn window_queries() {
    let w = |q: &str| {
        route(
            Method::Get,
            &format!("/api/v1/vm.memory-attributes?{q}"),
            b"",
        )
    };
    assert_eq!(
        w("gpa=0x1000000&size=4096").unwrap(),
        ApiRequest::VmMemoryAttributes(AttributeWindow {
            gpa: 0x100_0000,
            size: 4096,
            limit: MAX_RANGES
        })
    );
    assert_eq!(
        w("limit=2").unwrap(),
        ApiRequest::VmMemoryAttributes(AttributeWindow {
            limit: 2,
            ..Default::default()
        })
    );
    for bad in [
        "gpa=1",
        "size=1",
        "gpa=x&size=1",
        "gpa=1&size=0",
        "gpa=1&gpa=2&size=1",
        "gpa=18446744073709551615&size=2",
        "colour=red",
        "limit=0",
        "limit=99999999",
        "limit=1&limit=2",
        "gpa",
    ] {
        assert!(matches!(w(bad), Err(HttpError::BadRequest(_))), "{bad}");
    }
    assert!(matches!(
        route(Method::Get, "/api/v1/vm.info?x=1", b""),
        Err(HttpError::BadRequest(_))
    ));
    // Each refusal says what is wrong.
    for (query, why) in [
        ("foo=bar", "unknown parameter \"foo\""),
        ("limit=1&limit=2", "limit given twice"),
        ("gpa=1&size=0", "size must not be 0"),
        ("size=1", "gpa and size go together"),
    ] {
        assert_eq!(w(query), Err(HttpError::BadRequest(why.into())), "{query}");
    }
}

fn request(method: &str, target: &str, body: &[u8]) -> HttpRequest {
    HttpRequest {
        method: method.into(),
        target: target.into(),
        body: body.to_vec(),
        close: false,
    }
}

#[test]
fn requests_off_the_wire_become_typed_requests_or_say_why_not() {
    assert_eq!(
        parse_request(&request("GET", "/api/v1/vm.info", b"")),
        Ok(ApiRequest::VmInfo)
    );
    assert_eq!(
        parse_request(&request(
            "PUT",
            "/api/v1/vm.remove-device",
            br#"{"id":"d0"}"#
        )),
        Ok(ApiRequest::VmRemoveDevice("d0".into()))
    );
    // An empty body may be whitespace (curl -d ' ').
    assert_eq!(
        parse_request(&request("PUT", "/api/v1/vm.pause", b" \r\n")),
        Ok(ApiRequest::VmPause)
    );
    let not_json = parse_request(&request("PUT", "/api/v1/vm.pause", b"pause!"));
    assert!(
        matches!(&not_json, Err(HttpError::BadRequest(m)) if m.starts_with("body is not JSON")),
        "{not_json:?}"
    );
    assert_eq!(
        parse_request(&request("POST", "/api/v1/vm.info", b"")),
        Err(HttpError::MethodNotAllowed("/api/v1/vm.info".into()))
    );
    assert!(matches!(
        parse_request(&request("DELETE", "/api/v1/vm.nope", b"")),
        Err(HttpError::NotFound(_))
    ));
}

#[test]
fn the_method_is_checked_before_the_body() {
    for (method, target, body) in [
        ("PUT", "/api/v1/vm.info", &b"not json"[..]),
        ("PUT", "/api/v1/vmm.ping", b"{"),
        ("GET", "/api/v1/vm.add-device", b"[1"),
        ("POST", "/api/v1/vm.pause", b"pause!"),
        ("POST", "/api/v1/vm.memory-attributes?gpa=x", b""),
    ] {
        let path = target.split_once('?').map_or(target, |(p, _)| p);
        assert_eq!(
            parse_request(&request(method, target, body)),
            Err(HttpError::MethodNotAllowed(path.into())),
            "{method} {target}"
        );
    }
    assert!(matches!(
        parse_request(&request("PUT", "/api/v1/vm.nope", b"not json")),
        Err(HttpError::NotFound(_))
    ));
}

#[test]
fn device_bodies_must_be_json_objects() {
    for (endpoint, body) in [
        ("vm.remove-device", r#"["d0"]"#),
        ("vm.add-user-device", r#"["/tmp/dev.sock"]"#),
        ("vm.add-user-device", r#" ["/tmp/dev.sock","d0"]"#),
        ("vm.add-device", r#"["/sys/bus/pci/devices/0000:01:00.0/"]"#),
        ("vm.add-device", r#""/p""#),
        ("vm.remove-device", "null"),
    ] {
        let got = parse_request(&request(
            "PUT",
            &format!("{API_PREFIX}{endpoint}"),
            body.as_bytes(),
        ));
        assert_eq!(
            got,
            Err(HttpError::BadRequest(format!(
                "{endpoint} body must be a JSON object"
            ))),
            "{endpoint} {body}"
        );
    }
    // Whitespace before the object is still an object.
    assert_eq!(
        parse_request(&request(
            "PUT",
            "/api/v1/vm.remove-device",
            b" \n{\"id\":\"d0\"}"
        )),
        Ok(ApiRequest::VmRemoveDevice("d0".into()))
    );
}

#[test]
fn refusals_on_the_socket_are_405_before_400_and_arrays_of_strings() {
    let (to_vmm, events) = std::sync::mpsc::channel();
    let path = crate::test_util::scratch_path("http-refusals");
    let _server = ApiServer::start(&ApiSocket::Path(path.clone()), to_vmm, None).unwrap();
    let exchange = |method: &str, endpoint: &str, body: &str| {
        use std::io::{Read, Write};
        let mut stream = UnixStream::connect(&path).unwrap();
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let head = format!(
            "{method} {API_PREFIX}{endpoint} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream
            .write_all(format!("{head}{body}").as_bytes())
            .unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).unwrap();
        let status: u16 = raw[9..12].parse().unwrap();
        let (_, body) = raw.split_once("\r\n\r\n").unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        (status, body)
    };
    assert_eq!(
        exchange("PUT", "vm.info", "not json"),
        (
            405,
            serde_json::json!(["method not allowed on /api/v1/vm.info"])
        )
    );
    assert_eq!(
        exchange("PUT", "vm.remove-device", r#"["d0"]"#),
        (
            400,
            serde_json::json!(["bad request: vm.remove-device body must be a JSON object"])
        )
    );
    assert_eq!(
        exchange("PUT", "vm.add-user-device", r#"["/tmp/dev.sock"]"#).0,
        400
    );
    // None of them reached the VMM.
    assert!(events.try_recv().is_err());
}

#[test]
fn only_a_stale_socket_is_replaced_when_binding() {
    // A file of the user's: refused and left alone.
    let path = crate::test_util::scratch_path("http-file");
    std::fs::write(&path, b"keep").unwrap();
    assert!(matches!(bind(&path), Err(ApiServerError::NotASocket(_))));
    assert_eq!(std::fs::read(&path).unwrap(), b"keep");
    std::fs::remove_file(&path).unwrap();
    // A socket someone listens on: in use.
    let path = crate::test_util::scratch_path("http-live");
    let live = bind(&path).unwrap();
    assert!(matches!(bind(&path), Err(ApiServerError::InUse(_))));
    // Once nobody listens, it is stale: replaced, owner-only.
    drop(live);
    let _again = bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn only_a_socket_fd_is_adopted() {
    use std::os::fd::{AsRawFd, IntoRawFd};
    let file = std::fs::File::open("/dev/null").unwrap();
    let fd = file.as_raw_fd();
    assert!(matches!(adopt(fd), Err(ApiServerError::NotASocketFd(n)) if n == fd));
    assert!(matches!(adopt(987), Err(ApiServerError::NotASocketFd(987))));
    let path = crate::test_util::scratch_path("http-fd");
    let fd = UnixListener::bind(&path).unwrap().into_raw_fd();
    let adopted = adopt(fd).unwrap();
    assert_eq!(adopted.as_raw_fd(), fd);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_stopped_or_dropped_server_stops_listening_and_removes_its_socket() {
    let (to_vmm, _events) = std::sync::mpsc::channel();
    for stop_explicitly in [true, false] {
        let path = crate::test_util::scratch_path(if stop_explicitly {
            "http-stop"
        } else {
            "http-drop"
        });
        let mut server =
            ApiServer::start(&ApiSocket::Path(path.clone()), to_vmm.clone(), None).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        if stop_explicitly {
            server.stop();
            assert!(server.thread.is_none());
        }
        drop(server);
        assert!(!path.exists(), "socket left behind");
        assert!(UnixStream::connect(&path).is_err());
    }
}
