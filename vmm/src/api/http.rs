//! The HTTP side of the API: the socket's lifecycle, routing and error
//! bodies. The wire (framing, limits, one thread per connection) is
//! `http_server.rs`; a client that connects and sends nothing, or hangs up
//! mid-request, holds only its own connection thread, for a bounded time.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::thread::JoinHandle;

use log::{debug, info};
use serde_json::json;

pub use super::http_server::MAX_BODY;
use super::http_server::{self, HttpRequest, HttpResponse};

use super::{ApiMessage, ApiRequest, ApiResponse, AttributeWindow, MAX_RANGES, Method, ROUTES};
use crate::VmmEvent;
use crate::config::{DeviceConfig, UserDeviceConfig};

pub const API_PREFIX: &str = "/api/v1/";

#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    #[error("cannot remove stale API socket {0}")]
    RemoveStale(PathBuf, #[source] std::io::Error),
    #[error("cannot listen on API socket {0}: {1}")]
    Bind(PathBuf, String),
    #[error("fd {0} is not a socket")]
    NotASocketFd(i32),
    #[error("cannot restrict permissions of {0}")]
    Permissions(PathBuf, #[source] std::io::Error),
    #[error("cannot start the HTTP thread")]
    Thread(#[source] crate::seccomp_filters::SeccompError),
    #[error("the HTTP thread died while binding")]
    Died,
}

/// Why a request never reached the VMM.
#[derive(Debug, PartialEq, Eq)]
pub enum HttpError {
    NotFound(String),
    MethodNotAllowed(String),
    BadRequest(String),
    PayloadTooLarge(usize),
}

impl HttpError {
    fn status(&self) -> u16 {
        match self {
            HttpError::NotFound(_) => 404,
            HttpError::MethodNotAllowed(_) => 405,
            HttpError::BadRequest(_) => 400,
            HttpError::PayloadTooLarge(_) => 413,
        }
    }

    fn message(&self) -> String {
        match self {
            HttpError::NotFound(p) => format!("no endpoint {p}"),
            HttpError::MethodNotAllowed(p) => format!("method not allowed on {p}"),
            HttpError::BadRequest(why) => format!("bad request: {why}"),
            HttpError::PayloadTooLarge(n) => {
                format!("body of {n} bytes exceeds the {MAX_BODY}-byte limit")
            }
        }
    }
}

fn parse_number(key: &str, value: &str) -> Result<u64, HttpError> {
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|_| HttpError::BadRequest(format!("{key}={value:?} is not a number")))
}

fn parse_window(query: Option<&str>) -> Result<AttributeWindow, HttpError> {
    let mut window = AttributeWindow::default();
    let (mut gpa, mut size, mut limit) = (None, None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| HttpError::BadRequest(format!("{pair:?} is not key=value")))?;
        let slot = match key {
            "gpa" => &mut gpa,
            "size" => &mut size,
            "limit" => &mut limit,
            _ => return Err(HttpError::BadRequest(format!("unknown parameter {key:?}"))),
        };
        if slot.replace(parse_number(key, value)?).is_some() {
            return Err(HttpError::BadRequest(format!("{key} given twice")));
        }
    }
    if let Some(n) = limit {
        window.limit = usize::try_from(n)
            .ok()
            .filter(|l| (1..=MAX_RANGES).contains(l))
            .ok_or_else(|| HttpError::BadRequest(format!("limit must be 1..={MAX_RANGES}")))?;
    }
    match (gpa, size) {
        (None, None) => {}
        (Some(gpa), Some(size)) if size > 0 => {
            gpa.checked_add(size)
                .ok_or_else(|| HttpError::BadRequest("gpa+size overflows".into()))?;
            window.gpa = gpa;
            window.size = size;
        }
        (Some(_), Some(_)) => return Err(HttpError::BadRequest("size must not be 0".into())),
        _ => return Err(HttpError::BadRequest("gpa and size go together".into())),
    }
    Ok(window)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveDevice {
    id: String,
}

fn body_json<T: serde::de::DeserializeOwned>(endpoint: &str, body: &[u8]) -> Result<T, HttpError> {
    // serde also fills a struct from an array of its fields in order
    // (`["d0"]` for `{"id":"d0"}`): a form no client documents or sends,
    // and one whose meaning changes when a field is added.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(HttpError::BadRequest(format!(
            "{endpoint} body must be a JSON object"
        )));
    }
    serde_json::from_slice(body).map_err(|e| HttpError::BadRequest(format!("{endpoint} body: {e}")))
}

fn config_error(e: crate::config::ConfigError) -> HttpError {
    HttpError::BadRequest(e.to_string())
}

/// The endpoint `url` names, and its query: 404 for a path that is none,
/// 405 when `method` (none: not GET or PUT) is not allowed on it.
fn endpoint(method: Option<Method>, url: &str) -> Result<(&str, Option<&str>), HttpError> {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    let endpoint = path
        .strip_prefix(API_PREFIX)
        .ok_or_else(|| HttpError::NotFound(path.to_string()))?;
    if !ROUTES.iter().any(|(_, p)| *p == endpoint) {
        return Err(HttpError::NotFound(path.to_string()));
    }
    if !method.is_some_and(|m| ROUTES.contains(&(m, endpoint))) {
        return Err(HttpError::MethodNotAllowed(path.to_string()));
    }
    Ok((endpoint, query))
}

/// Maps method + URL + body to a request. Pure, so the parser can be fuzzed.
pub fn route(method: Method, url: &str, body: &[u8]) -> Result<ApiRequest, HttpError> {
    let (endpoint, query) = endpoint(Some(method), url)?;
    if endpoint != "vm.memory-attributes" && query.is_some_and(|q| !q.is_empty()) {
        return Err(HttpError::BadRequest(format!(
            "{endpoint} takes no parameters"
        )));
    }
    Ok(match endpoint {
        "vmm.ping" => ApiRequest::VmmPing,
        "vmm.shutdown" => ApiRequest::VmmShutdown,
        "vm.create" => ApiRequest::VmCreate(Box::new(
            crate::config::VmConfig::from_json(body)
                .map_err(|e| HttpError::BadRequest(e.to_string()))?,
        )),
        "vm.boot" => ApiRequest::VmBoot,
        "vm.reboot" => ApiRequest::VmReboot,
        "vm.delete" => ApiRequest::VmDelete,
        "vm.power-button" => ApiRequest::VmPowerButton,
        "vm.info" => ApiRequest::VmInfo,
        "vm.counters" => ApiRequest::VmCounters,
        "vm.memory-attributes" => ApiRequest::VmMemoryAttributes(parse_window(query)?),
        "vm.shutdown" => ApiRequest::VmShutdown,
        "vm.pause" => ApiRequest::VmPause,
        "vm.resume" => ApiRequest::VmResume,
        "vm.add-device" => {
            let config: DeviceConfig = body_json(endpoint, body)?;
            config.validate().map_err(config_error)?;
            ApiRequest::VmAddDevice(config)
        }
        "vm.add-user-device" => {
            let config: UserDeviceConfig = body_json(endpoint, body)?;
            config.validate().map_err(config_error)?;
            ApiRequest::VmAddUserDevice(config)
        }
        "vm.remove-device" => {
            let id = body_json::<RemoveDevice>(endpoint, body)?.id;
            crate::config::check_id("remove-device", &id).map_err(config_error)?;
            ApiRequest::VmRemoveDevice(id)
        }
        // ROUTES and this match list the same endpoints (a test checks);
        // one missing here is a 404, not a panic on the HTTP thread.
        other => return Err(HttpError::NotFound(format!("{API_PREFIX}{other}"))),
    })
}

pub struct ApiServer {
    /// The socket file to remove at the end (none for an inherited fd).
    path: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Where the API listens: a socket path this VMM binds, or a listening
/// socket it inherits as a file descriptor (Cloud Hypervisor's
/// `--api-socket fd=N`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiSocket {
    Path(PathBuf),
    Fd(i32),
}

/// Takes the inherited listening socket `fd`.
fn adopt(fd: i32) -> Result<UnixListener, ApiServerError> {
    use std::os::fd::FromRawFd;
    // SAFETY: fstat only writes into `stat`; a bad fd is reported as EBADF.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(fd, &mut stat) } != 0 || stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(ApiServerError::NotASocketFd(fd));
    }
    // SAFETY: `fd` is a socket the parent process handed to this one for
    // the API; nothing else in the VMM owns or closes it.
    Ok(unsafe { UnixListener::from_raw_fd(fd) })
}

fn bind(path: &Path) -> Result<UnixListener, ApiServerError> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        // Only a stale socket is ever removed: anything else is the user's.
        if !meta.file_type().is_socket() {
            return Err(ApiServerError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(ApiServerError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path)
            .map_err(|e| ApiServerError::RemoveStale(path.to_path_buf(), e))?;
    }
    // SAFETY: umask only changes this process's file-creation mask; it is
    // restored right after the socket exists, before any other thread of the
    // VMM creates files.
    let old = unsafe { libc::umask(0o177) };
    let server = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let server = server.map_err(|e| ApiServerError::Bind(path.to_path_buf(), e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ApiServerError::Permissions(path.to_path_buf(), e))?;
    Ok(server)
}

impl ApiServer {
    /// Binds `path` and serves it on the "http-server" thread under
    /// `filter`. The socket is bound on that thread, after its filter is in
    /// place, because the connection threads start there and inherit it.
    pub fn start(
        socket: &ApiSocket,
        to_vmm: Sender<VmmEvent>,
        filter: Option<seccompiler::BpfProgram>,
    ) -> Result<ApiServer, ApiServerError> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let (bound_tx, bound_rx) = std::sync::mpsc::sync_channel(1);
        let bind_socket = socket.clone();
        let thread =
            crate::seccomp_filters::spawn_filtered("http-server".into(), filter, move || {
                let listener = match &bind_socket {
                    ApiSocket::Path(path) => bind(path),
                    ApiSocket::Fd(fd) => adopt(*fd),
                };
                let server = match listener {
                    Ok(server) => server,
                    Err(e) => {
                        let _ = bound_tx.send(Err(e));
                        return;
                    }
                };
                let _ = bound_tx.send(Ok(()));
                let handler = Arc::new(move |request: HttpRequest| answer(request, &to_vmm));
                http_server::serve(&server, &thread_stop, handler, http_server::Deadlines::API);
            })
            .map_err(ApiServerError::Thread)?;
        if let Err(e) = bound_rx.recv().unwrap_or(Err(ApiServerError::Died)) {
            let _ = thread.join();
            return Err(e);
        }
        let path = match socket {
            ApiSocket::Path(path) => {
                info!("API listening on {}", path.display());
                Some(path.clone())
            }
            ApiSocket::Fd(fd) => {
                info!("API listening on inherited fd {fd}");
                None
            }
        };
        Ok(ApiServer {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// Finishes the request in flight, stops listening and removes the socket.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An error answer's body as Cloud Hypervisor writes it: a JSON array of
/// the messages of the error chain, outermost first.
pub(super) fn error_body(message: &str) -> String {
    json!([message]).to_string()
}

/// `error_body` for an error with sources: one string per link.
fn error_chain_body(error: &dyn std::error::Error) -> String {
    let messages: Vec<String> = std::iter::successors(Some(error), |e| e.source())
        .map(ToString::to_string)
        .collect();
    json!(messages).to_string()
}

/// Turns a request read off the wire into a typed request, or says why not.
fn parse_request(request: &HttpRequest) -> Result<ApiRequest, HttpError> {
    let method = match request.method.as_str() {
        "GET" => Some(Method::Get),
        "PUT" => Some(Method::Put),
        _ => None,
    };
    // Path and method before the body: a wrong method is 405 whatever it
    // sent, and an unknown path 404 whatever the method.
    endpoint(method, &request.target)?;
    let Some(method) = method else {
        return Err(HttpError::MethodNotAllowed(request.target.clone()));
    };
    if !request.body.iter().all(u8::is_ascii_whitespace) {
        serde_json::from_slice::<serde_json::Value>(&request.body)
            .map_err(|e| HttpError::BadRequest(format!("body is not JSON: {e}")))?;
    }
    route(method, &request.target, &request.body)
}

/// Answers one request: parsed here, answered by the VMM thread.
fn answer(request: HttpRequest, to_vmm: &Sender<VmmEvent>) -> HttpResponse {
    debug!("API {} {}", request.method, request.target);
    let response = |status: u16, body: String| HttpResponse { status, body };
    let api_request = match parse_request(&request) {
        Ok(r) => r,
        Err(e) => return response(e.status(), error_body(&e.message())),
    };
    let (respond, answer) = channel::<ApiResponse>();
    // A refused send hands the message back, and with it the answer's
    // sender: drop it before waiting, or the wait never ends.
    let sent = to_vmm
        .send(VmmEvent::Api(ApiMessage {
            request: api_request,
            respond,
        }))
        .is_ok();
    let answer = if sent { answer.recv().ok() } else { None };
    match answer {
        Some(Ok(Some(value))) => response(200, value.to_string()),
        Some(Ok(None)) => response(204, String::new()),
        Some(Err(e)) => response(e.http_status(), error_chain_body(&e)),
        None => response(503, error_body("the VMM is shutting down")),
    }
}

#[cfg(test)]
#[path = "route_fuzz.rs"]
mod route_fuzz;

#[cfg(test)]
mod tests {
    #[test]
    fn error_bodies_are_arrays_of_the_error_chain_as_cloud_hypervisor_writes_them() {
        let e = crate::api::ApiError::Device(crate::device_manager::DeviceError::NotFound(
            "gpu0".into(),
        ));
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
        let body: serde_json::Value =
            serde_json::from_str(&super::error_chain_body(&missing)).unwrap();
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
        assert!(matches!(
            route(Method::Get, "/api/v1/vm.nope", b""),
            Err(HttpError::NotFound(_))
        ));
        assert!(matches!(
            route(Method::Get, "/v1/vm.info", b""),
            Err(HttpError::NotFound(_))
        ));
        assert!(matches!(
            route(Method::Put, "/api/v1/vm.info", b""),
            Err(HttpError::MethodNotAllowed(_))
        ));
        assert!(matches!(
            route(Method::Get, "/api/v1/vm.shutdown", b""),
            Err(HttpError::MethodNotAllowed(_))
        ));
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
        assert_eq!(
            w("foo=bar"),
            Err(HttpError::BadRequest("unknown parameter \"foo\"".into()))
        );
        assert_eq!(
            w("limit=1&limit=2"),
            Err(HttpError::BadRequest("limit given twice".into()))
        );
        assert!(matches!(
            route(Method::Get, "/api/v1/vm.info?x=1", b""),
            Err(HttpError::BadRequest(_))
        ));
        // Each refusal says what is wrong.
        assert_eq!(
            w("gpa=1&size=0"),
            Err(HttpError::BadRequest("size must not be 0".into()))
        );
        assert_eq!(
            w("size=1"),
            Err(HttpError::BadRequest("gpa and size go together".into()))
        );
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
}

#[cfg(test)]
mod openapi_tests {
    use super::*;

    const SPEC: &str = include_str!("../../openapi/cloud-hypervisor.yaml");

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
}
