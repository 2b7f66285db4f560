//! Helpers shared by the integration tests, in Cloud Hypervisor's style:
//! build a guest, spawn the real VMM binary, wait for console lines, query
//! the API with the real `ch-remote`, and kill the child whatever happens.

#![allow(dead_code)]

pub mod lying_server;
pub mod openapi;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const CLOUD_HYPERVISOR: &str = env!("CARGO_BIN_EXE_cloud-hypervisor");
pub const CH_REMOTE: &str = env!("CARGO_BIN_EXE_ch-remote");
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Debian's firmware image (`ovmf`, installed by .ci/run).
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// Whether `what` (a test input .ci/run installs) is `present`: a loud
/// skip if not, a failure in CI (CH_REQUIRE_KVM=1).
pub fn installed(what: &str, present: bool) -> bool {
    if !present {
        assert_ne!(
            std::env::var("CH_REQUIRE_KVM").as_deref(),
            Ok("1"),
            "{what} is required in CI (.ci/run installs it)"
        );
        eprintln!("*** SKIPPED: {what} is not installed ***");
    }
    present
}

/// True when the KVM tests can run. Where /dev/kvm is missing they are
/// skipped loudly, unless CH_REQUIRE_KVM=1 (CI) makes that a failure.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("CH_REQUIRE_KVM").as_deref() != Ok("1"),
            "{test}: /dev/kvm is required (CH_REQUIRE_KVM=1) but cannot be opened"
        );
        eprintln!("\n*** SKIPPED {test}: /dev/kvm is not available on this machine ***\n");
    }
    ok
}

/// Begins a KVM test: where /dev/kvm cannot be opened, returns from the
/// test (skipped loudly, as `kvm_available` says, naming the test);
/// `kvm_test!("tag")` then gives the test's scratch directory.
#[allow(unused_macros, reason = "sev_snp and tdx check their hosts themselves")]
macro_rules! kvm_test {
    () => {{
        fn here() {}
        let test = std::any::type_name_of_val(&here).trim_end_matches("::here");
        if !$crate::common::kvm_available(test) {
            return;
        }
    }};
    ($tag:expr) => {{
        $crate::common::kvm_test!();
        $crate::common::TempDir::new($tag)
    }};
}
#[allow(unused_imports, reason = "as for the macro")]
pub(crate) use kvm_test;

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ch-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a memconv guest: one op list per vCPU.
pub fn memconv_guest(dir: &TempDir, lists: &[&str], poweroff: bool) -> PathBuf {
    let lists: Vec<_> = lists
        .iter()
        .map(|ops| test_guest::parse_ops(ops).unwrap())
        .collect();
    let path = dir.path("guest.elf");
    std::fs::write(
        &path,
        test_guest::memconv_elf(
            &lists,
            test_guest::MemconvOptions {
                poweroff,
                quiet: false,
            },
        ),
    )
    .unwrap();
    path
}

/// A running `cloud-hypervisor`, killed on drop. Console (stdout) lines are
/// collected by a reader thread.
pub struct GuestVmm {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    line_events: Receiver<()>,
    stderr: Arc<Mutex<String>>,
}

impl GuestVmm {
    pub fn spawn(kernel: &Path, args: &[&str]) -> Self {
        let mut all = vec!["--kernel", kernel.to_str().unwrap()];
        all.extend_from_slice(args);
        Self::spawn_args(&all)
    }

    /// The VMM with exactly `args` (no --kernel: an empty VMM).
    pub fn spawn_args(args: &[&str]) -> Self {
        let mut child = Command::new(CLOUD_HYPERVISOR)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cloud-hypervisor");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, line_events) = channel();
        let stdout = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
                let _ = tx.send(());
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().unwrap();
        let err_sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                err_sink
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        GuestVmm {
            child,
            lines,
            line_events,
            stderr,
        }
    }

    /// The `status=` of every memconv op line, in order.
    pub fn op_statuses(&self) -> Vec<String> {
        self.console()
            .iter()
            .filter(|l| l.contains(" op "))
            .map(|l| l.rsplit("status=").next().unwrap().to_string())
            .collect()
    }

    pub fn console(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until a console line contains `needle`; panics with the whole
    /// console and log on timeout.
    pub fn wait_for_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(line) = self.console().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "no console line with {needle:?} after {TIMEOUT:?}\nconsole:\n{}\nstderr:\n{}",
                    self.console().join("\n"),
                    self.stderr()
                );
            }
            let _ = self
                .line_events
                .recv_timeout(left.min(Duration::from_millis(100)));
        }
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "VMM did not exit\nstderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id().cast_signed()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.pid(), signal) };
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for GuestVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns the VMM for `guest` with 256 MiB of guest_memfd RAM, an API
/// socket in `dir` and `extra` arguments (devices, ...). Returns it and the
/// socket's path; callers wait for the socket where the guest outlives it.
pub fn spawn_with_api(dir: &TempDir, guest: &Path, extra: &[&str]) -> (GuestVmm, PathBuf) {
    spawn_sized_with_api(dir, guest, "size=256M,guest_memfd=on", extra)
}

/// As `spawn_with_api`, with `--memory memory`.
pub fn spawn_sized_with_api(
    dir: &TempDir,
    guest: &Path,
    memory: &str,
    extra: &[&str],
) -> (GuestVmm, PathBuf) {
    let api = dir.path("api.sock");
    let mut args = vec!["--memory", memory, "--api-socket", api.to_str().unwrap()];
    args.extend_from_slice(extra);
    (GuestVmm::spawn(guest, &args), api)
}

/// A `--user-device` value: the server at `socket`, then `options` as
/// given (",id=dev0,timeout_ms=300"; "" for none).
pub fn user_device(socket: &Path, options: &str) -> String {
    format!("socket={}{options}", socket.display())
}

/// As `spawn_with_api`, with a `--user-device` for each of `devices` (as
/// `user_device` or `TestDevice::plug` write them), then `extra`.
pub fn spawn_with_devices(
    dir: &TempDir,
    guest: &Path,
    devices: &[String],
    extra: &[&str],
) -> (GuestVmm, PathBuf) {
    let mut args: Vec<&str> = devices
        .iter()
        .flat_map(|v| ["--user-device", v.as_str()])
        .collect();
    args.extend_from_slice(extra);
    spawn_with_api(dir, guest, &args)
}

/// Runs the VMM binary to completion (for CLI error cases).
pub fn run_vmm(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(CLOUD_HYPERVISOR)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the VMM with `args` to completion and returns the one JSON object
/// it prints (`--measure`); a failure or any other output fails the test.
pub fn measured(args: &[&str]) -> serde_json::Value {
    let (status, stdout, stderr) = run_vmm(args);
    assert!(status.success(), "{args:?}: {stderr}");
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    serde_json::from_str(&stdout).unwrap()
}

/// Runs the VMM with `args` and checks it refuses them before anything
/// starts: a failure, `expected` in its stderr, nothing on stdout.
pub fn assert_refused(args: &[&str], expected: &str) {
    let (status, stdout, stderr) = run_vmm(args);
    assert!(!status.success(), "{args:?}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    assert!(stdout.is_empty(), "{args:?}");
}

/// Boots `OVMF` with `--platform PLATFORM` on a host that lacks it: the
/// VMM goes through the VM build (API socket, event monitor) and must stop
/// before creating a VM with exit status 1, its stderr naming every one of
/// `reasons`, nothing on stdout, and nothing left: no socket, no process.
/// Returns the names of the events it wrote.
pub fn assert_firmware_boot_stops(tag: &str, platform: &str, reasons: &[&str]) -> Vec<String> {
    let dir = TempDir::new(tag);
    let socket = dir.path("api.sock");
    let events = dir.path("events.json");
    let mut child = Command::new(CLOUD_HYPERVISOR)
        .args(["--platform", platform, "--firmware", OVMF])
        .args(["--cpus", "boot=2", "--serial", "off"])
        .args(["--api-socket", socket.to_str().unwrap()])
        .args(["--event-monitor", &format!("path={}", events.display())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < TIMEOUT, "the VMM kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(reasons.iter().all(|r| stderr.contains(r)), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(!socket.exists(), "the API socket was left behind");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the VMM process is still there"
    );
    event_names(&read_events(&events))
}

/// Runs `ch-remote --api-socket SOCKET ARGS...`: (success, stdout, stderr).
pub fn ch_remote(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(CH_REMOTE)
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One raw HTTP/1.1 exchange over the socket: (status, body).
pub fn raw_http(socket: &Path, request: &str) -> (u16, String) {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub fn get(socket: &Path, path: &str) -> (u16, String) {
    raw_http(
        socket,
        &format!("GET /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
}

/// A PUT of a JSON `body` to the API, on its own connection.
pub fn put(socket: &Path, path: &str, body: &str) -> (u16, String) {
    raw_http(
        socket,
        &format!(
            "PUT /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// "source/event" of each event in an event-monitor file, in order.
pub fn event_names(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["source"].as_str().unwrap(),
                e["event"].as_str().unwrap()
            )
        })
        .collect()
}

/// The events of an event-monitor file (one JSON object per line).
pub fn read_events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the API socket accepts connections.
pub fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "API socket {socket:?} never came up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Shared ranges of `vm.memory-attributes` as (gpa, size) pairs over all regions.
pub fn shared_ranges(answer: &serde_json::Value) -> Vec<(u64, u64)> {
    answer["regions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["shared_ranges"].as_array().unwrap().clone())
        .map(|r| (r["gpa"].as_u64().unwrap(), r["size"].as_u64().unwrap()))
        .collect()
}

/// Expected maximal shared runs after applying conversion ops in order.
pub fn model_shared_ranges(ops: &[(u64, u64, bool)]) -> Vec<(u64, u64)> {
    let mut pages = std::collections::BTreeSet::new();
    for (gpa, size, shared) in ops {
        for p in (*gpa..gpa + size).step_by(4096) {
            if *shared {
                pages.insert(p);
            } else {
                pages.remove(&p);
            }
        }
    }
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in pages {
        match runs.last_mut() {
            Some((g, s)) if *g + *s == p => *s += 4096,
            _ => runs.push((p, 4096)),
        }
    }
    runs
}

/// Merges touching ranges, so a device's mappings (which may be split
/// differently) compare with the VMM's maximal shared runs.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (gpa, size) in ranges {
        match merged.last_mut() {
            Some((g, s)) if *g + *s == gpa => *s += size,
            _ => merged.push((gpa, size)),
        }
    }
    merged
}

/// The VMM's shared ranges, from the real ch-remote.
pub fn vmm_shared_ranges(api: &Path) -> Vec<(u64, u64)> {
    let (ok, out, err) = ch_remote(api, &["memory-attributes"]);
    assert!(ok, "memory-attributes failed: {err}");
    shared_ranges(&serde_json::from_str(&out).unwrap())
}

/// Polls until `f` holds or the timeout passes; returns whether it held.
pub fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A `ch-test-device` process (vfio-user server) killed on drop.
pub struct TestDevice {
    child: Child,
    /// What it was spawned as: its socket's name and the id `plug` gives it.
    name: String,
    pub socket: PathBuf,
    control: PathBuf,
}

impl TestDevice {
    /// Built by `cargo build --workspace` next to the VMM binary (nextest
    /// does not build other packages' binaries).
    pub fn binary() -> PathBuf {
        let binary = Path::new(CLOUD_HYPERVISOR).with_file_name("ch-test-device");
        assert!(
            binary.exists(),
            "{} is missing: build the workspace (cargo build --workspace)",
            binary.display()
        );
        binary
    }

    pub fn spawn(dir: &TempDir, name: &str) -> Self {
        Self::spawn_with(dir, name, &[])
    }

    /// As `spawn`, with more command-line arguments (`--no-mmap`).
    pub fn spawn_with(dir: &TempDir, name: &str, args: &[&str]) -> Self {
        let binary = Self::binary();
        let socket = dir.path(&format!("{name}.sock"));
        let control = dir.path(&format!("{name}.ctl"));
        let mut child = Command::new(&binary)
            .args(["--socket", socket.to_str().unwrap()])
            .args(["--control", control.to_str().unwrap()])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ch-test-device: ready");
        TestDevice {
            child,
            name: name.to_string(),
            socket,
            control,
        }
    }

    /// Its `--user-device` value: its socket, `id=` its name, then
    /// `options` (",timeout_ms=300"; "" for none).
    pub fn plug(&self, options: &str) -> String {
        user_device(&self.socket, &format!(",id={}{options}", self.name))
    }

    /// `ch-test-device --control ... --ask COMMAND`, as a user would run it:
    /// (success, stdout, stderr).
    pub fn ask_cli(&self, command: &str) -> (bool, String, String) {
        let output = Command::new(Self::binary())
            .args([
                "--control",
                self.control.to_str().unwrap(),
                "--ask",
                command,
            ])
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    pub fn command(&self, line: &str) -> String {
        test_device::ask(&self.control, line).unwrap()
    }

    /// Current mappings, merged into runs.
    pub fn mapped(&self) -> Vec<(u64, u64)> {
        let raw: Vec<(u64, u64)> = serde_json::from_str(&self.command("maps")).unwrap();
        merge_ranges(raw)
    }

    pub fn mapping_count(&self) -> usize {
        serde_json::from_str::<Vec<(u64, u64)>>(&self.command("maps"))
            .unwrap()
            .len()
    }

    /// Bytes read through the device's DMA mapping, or its error.
    pub fn read(&self, iova: u64, len: u64) -> Result<Vec<u8>, String> {
        let answer = self.command(&format!("read {iova:#x} {len}"));
        if let Some(e) = answer.strip_prefix("error: ") {
            return Err(e.to_string());
        }
        Ok((0..answer.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&answer[i..i + 2], 16).unwrap())
            .collect())
    }

    /// A DMA write of one byte into guest memory.
    pub fn write(&self, iova: u64, byte: u8) {
        assert_eq!(self.command(&format!("write {iova:#x} {byte}")), "ok");
    }

    pub fn pid(&self) -> i32 {
        self.child.id().cast_signed()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: signalling a child process this test started.
        assert_eq!(unsafe { libc::kill(self.pid(), signal) }, 0);
    }

    /// SIGSTOP, returning only once every thread of the device has
    /// stopped: kill() only queues the signal, and on a loaded machine a
    /// device thread not yet scheduled could still answer a request sent
    /// after kill() returned.
    pub fn stop(&self) {
        self.signal(libc::SIGSTOP);
        let tasks = format!("/proc/{}/task", self.pid());
        let all_stopped = || {
            std::fs::read_dir(&tasks).unwrap().all(|task| {
                let stat =
                    std::fs::read_to_string(task.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                let state = stat.rsplit(") ").next().and_then(|s| s.chars().next());
                matches!(state, Some('T' | 't'))
            })
        };
        assert!(wait_until(all_stopped), "the device never stopped");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestDevice {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a process holds that a leak would grow.
#[derive(Debug, Clone, Copy)]
pub struct Holdings {
    pub fds: usize,
    pub kvm_vms: usize,
    pub threads: usize,
    pub rss_kib: u64,
}

pub fn holdings(pid: i32) -> Holdings {
    let fd_dir = format!("/proc/{pid}/fd");
    let links: Vec<String> = std::fs::read_dir(&fd_dir)
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    Holdings {
        fds: links.len(),
        kvm_vms: links.iter().filter(|l| l.contains("kvm-vm")).count(),
        threads: std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count(),
        rss_kib,
    }
}

/// `pid`'s holdings once its fds and threads are back to `want`'s (what a
/// VM or device that just went lets go may take a moment), or after
/// TIMEOUT if they never are.
pub fn settled_holdings(pid: i32, want: &Holdings) -> Holdings {
    let mut now = holdings(pid);
    wait_until(|| {
        now = holdings(pid);
        now.fds <= want.fds && now.threads <= want.threads
    });
    now
}

/// Asserts that `pid` holds no more fds, threads or VMs than at `baseline`
/// and at most `rss_slack_kib` more resident memory.
pub fn assert_back_to(pid: i32, baseline: &Holdings, rss_slack_kib: u64, after: &str) {
    let now = settled_holdings(pid, baseline);
    assert!(
        now.fds <= baseline.fds
            && now.threads <= baseline.threads
            && now.kvm_vms <= baseline.kvm_vms
            && now.rss_kib <= baseline.rss_kib + rss_slack_kib,
        "{after}: the VMM holds more than before: {baseline:?} -> {now:?}"
    );
}
