// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! The VMM: configuration, memory manager (with RamBlockAttribute), vCPU
//! threads, the conversion path, and the control loop that owns the VM.

pub mod api;
pub mod boot;
pub mod config;
pub mod conversion_path;
pub mod device_manager;
mod elf;
pub mod event_monitor;
#[cfg(test)]
mod fuzz_config;
pub mod memory;
pub mod seccomp_filters;
#[cfg(test)]
mod test_util;
mod vcpu;
pub mod vm;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

use hypervisor::KvmHypervisor;
use log::{error, info, warn};
use serde_json::json;

use crate::config::{EventMonitorConfig, VmConfig};
use crate::event_monitor::EventMonitor;
use crate::seccomp_filters::{SeccompError, SeccompMode, Thread};
use crate::vm::{Vm, VmError};

/// "outer: inner: innermost" for any error with sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Everything that can wake the VMM control loop.
pub enum VmmEvent {
    GuestPowerOff(u8),
    /// Triple fault or a system event: the guest is gone.
    GuestShutdown(u8),
    VcpuError(u8, String),
    Signal(i32),
    Api(api::ApiMessage),
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot use /dev/kvm")]
    Hypervisor(#[source] hypervisor::HypervisorError),
    #[error("cannot open the event monitor")]
    EventMonitor(#[source] event_monitor::EventMonitorError),
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    #[error("cannot start the signal handler thread")]
    SignalThread(#[source] SeccompError),
    #[error("cannot set up seccomp")]
    Seccomp(#[source] SeccompError),
    #[error("cannot boot the VM")]
    Vm(#[source] VmError),
    #[error("cannot start the API server")]
    Api(#[source] api::http::ApiServerError),
}

pub struct VmmOptions {
    pub vm: VmConfig,
    pub api_socket: Option<PathBuf>,
    pub event_monitor: Option<EventMonitorConfig>,
    pub seccomp: SeccompMode,
}

/// Signals that shut the VMM down cleanly (devices unmapped, socket
/// removed, exit code 0).
pub const SHUTDOWN_SIGNALS: &[i32] = &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];
/// Signals whose default action would kill the VMM without that cleanup;
/// they are logged and ignored.
pub const IGNORED_SIGNALS: &[i32] = &[libc::SIGUSR1, libc::SIGUSR2];

fn spawn_signal_thread(
    events: Sender<VmmEvent>,
    filter: Option<seccompiler::BpfProgram>,
) -> Result<(), VmmError> {
    let mut signals =
        signal_hook::iterator::Signals::new(SHUTDOWN_SIGNALS.iter().chain(IGNORED_SIGNALS))
            .map_err(VmmError::Signals)?;
    seccomp_filters::spawn_filtered("vmm_signal_handler".into(), filter, move || {
        for signal in signals.forever() {
            if IGNORED_SIGNALS.contains(&signal) {
                warn!("signal {signal} ignored");
                continue;
            }
            if events.send(VmmEvent::Signal(signal)).is_err() {
                break;
            }
        }
    })
    .map_err(VmmError::SignalThread)?;
    Ok(())
}

/// Every thread's filter, built before anything starts so a bad filter
/// fails the launch rather than a thread.
struct ThreadFilters {
    vmm: Option<seccompiler::BpfProgram>,
    vcpu: Option<seccompiler::BpfProgram>,
    http: Option<seccompiler::BpfProgram>,
    signal: Option<seccompiler::BpfProgram>,
    events: Option<seccompiler::BpfProgram>,
}

impl ThreadFilters {
    fn build(mode: SeccompMode) -> Result<Self, SeccompError> {
        if mode != SeccompMode::Off {
            seccomp_filters::install_violation_reporter()?;
        }
        Ok(ThreadFilters {
            vmm: seccomp_filters::filter(mode, Thread::Vmm)?,
            vcpu: seccomp_filters::filter(mode, Thread::Vcpu)?,
            http: seccomp_filters::filter(mode, Thread::HttpServer)?,
            signal: seccomp_filters::filter(mode, Thread::SignalHandler)?,
            events: seccomp_filters::filter(mode, Thread::EventMonitor)?,
        })
    }
}

/// Boots the VM and runs the control loop until the guest powers off, a
/// signal or an API request stops it. Returns the process exit code.
pub fn run(options: VmmOptions) -> Result<i32, VmmError> {
    let filters = ThreadFilters::build(options.seccomp).map_err(VmmError::Seccomp)?;
    let monitor = Arc::new(match &options.event_monitor {
        Some(config) => {
            EventMonitor::open(config, filters.events.clone()).map_err(VmmError::EventMonitor)?
        }
        None => EventMonitor::disabled(),
    });
    monitor.emit("vmm", "starting", serde_json::Value::Null);
    let hypervisor = KvmHypervisor::new().map_err(VmmError::Hypervisor)?;
    let (events_tx, events_rx) = channel();
    spawn_signal_thread(events_tx.clone(), filters.signal)?;
    // The socket comes first so a busy path fails before anything boots.
    let mut api_server = options
        .api_socket
        .as_deref()
        .map(|path| api::http::ApiServer::start(path, events_tx.clone(), filters.http))
        .transpose()
        .map_err(VmmError::Api)?;
    monitor.emit("vm", "booting", serde_json::Value::Null);
    let mut vm = Vm::boot(
        options.vm,
        &hypervisor,
        events_tx.clone(),
        monitor.clone(),
        filters.vcpu,
    )
    .map_err(VmmError::Vm)?;
    // The control loop locks itself down once the VM is built: its filter
    // need not allow creating one.
    if let Some(program) = &filters.vmm
        && let Err(e) = seccomp_filters::apply(program)
    {
        vm.shutdown();
        return Err(VmmError::Seccomp(e));
    }
    let code = control_loop(&events_rx, &mut vm);
    // Requests still queued, or sent from now on, get "shutting down"
    // instead of waiting for a loop that no longer runs.
    drop(events_rx);
    vm.shutdown();
    // Joining the HTTP thread lets a pending shutdown answer reach its client.
    if let Some(server) = api_server.as_mut() {
        server.stop();
    }
    monitor.emit("vm", "shutdown", json!({ "exit_code": code }));
    monitor.emit("vmm", "shutdown", serde_json::Value::Null);
    monitor.flush(std::time::Duration::from_secs(1));
    info!("VMM exiting with code {code}");
    Ok(code)
}

/// Runs until something ends the VMM; returns the exit code.
fn control_loop(events: &Receiver<VmmEvent>, vm: &mut Vm) -> i32 {
    loop {
        let Ok(event) = events.recv() else {
            return 1;
        };
        match event {
            VmmEvent::GuestPowerOff(code) => {
                info!("guest powered off with code {code}");
                return i32::from(code);
            }
            VmmEvent::GuestShutdown(vcpu) => {
                error!("vCPU {vcpu}: guest shut down (triple fault or reset)");
                return 1;
            }
            VmmEvent::VcpuError(vcpu, what) => {
                error!("vCPU {vcpu}: {what}");
                return 1;
            }
            VmmEvent::Signal(signal) => {
                info!("signal {signal}: shutting down");
                return 0;
            }
            VmmEvent::Api(message) => {
                let ends_vmm = matches!(
                    message.request,
                    api::ApiRequest::VmShutdown | api::ApiRequest::VmmShutdown
                );
                handle_api(vm, message);
                if ends_vmm {
                    info!("shutdown requested over the API");
                    return 0;
                }
            }
        }
    }
}

/// Answers `message`, at once or, for hot-plug (which may wait for a
/// device), from a worker thread so the loop keeps serving meanwhile.
fn handle_api(vm: &mut Vm, message: api::ApiMessage) {
    use api::ApiRequest::*;
    let api::ApiMessage { request, respond } = message;
    let answer = match request {
        VmmPing => Some(json!({
            "build_version": env!("CARGO_PKG_VERSION"),
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
            "features": ["guest_memfd", "ram_block_attribute"],
        })),
        VmInfo => Some(vm.info()),
        VmCounters => Some(vm.counters()),
        VmMemoryAttributes(window) => Some(api::memory_attributes(vm.memory(), window)),
        // This VMM hosts exactly the VM of its command line (there is no
        // vm.create), so shutting the VM down ends the VMM as well.
        VmShutdown | VmmShutdown => {
            vm.shutdown();
            None
        }
        VmPause => {
            let _ = respond.send(vm.pause().map(|()| None).map_err(api::ApiError::Vm));
            return;
        }
        VmResume => {
            let _ = respond.send(vm.resume().map(|()| None).map_err(api::ApiError::Vm));
            return;
        }
        VmAddDevice(config) => {
            return hotplug(vm, respond, move |devices, monitor| {
                vm::device_ops::add_device(devices, monitor, &config)
            });
        }
        VmAddUserDevice(config) => {
            return hotplug(vm, respond, move |devices, monitor| {
                vm::device_ops::add_user_device(devices, monitor, &config)
            });
        }
        VmRemoveDevice(id) => {
            return hotplug(vm, respond, move |devices, monitor| {
                vm::device_ops::remove_device(devices, monitor, &id)
            });
        }
    };
    let _ = respond.send(Ok(answer));
}

/// Runs a hot-plug operation on its own thread; it answers `respond`.
fn hotplug(
    vm: &mut Vm,
    respond: std::sync::mpsc::Sender<api::ApiResponse>,
    job: impl FnOnce(
        &device_manager::DeviceManager,
        &EventMonitor,
    ) -> Result<device_manager::DeviceInfo, device_manager::DeviceError>
    + Send
    + 'static,
) {
    let answer = respond.clone();
    let spawned = vm.spawn_hotplug(move |devices, monitor| {
        let result = job(devices, monitor)
            .map(|info| Some(json!(info)))
            .map_err(api::ApiError::Device);
        let _ = answer.send(result);
    });
    if let Err(e) = spawned {
        let _ = respond.send(Err(api::ApiError::Worker(e)));
    }
}
