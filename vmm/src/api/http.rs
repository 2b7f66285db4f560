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
mod openapi_tests;
#[cfg(test)]
mod tests;
