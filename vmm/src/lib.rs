// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! The VMM: configuration, memory manager (with RamBlockAttribute), vCPU
//! threads, the conversion path, and the control loop that owns the VM.

pub mod api;
pub mod boot;
pub mod config;
mod control;
pub mod conversion_path;
pub mod device_manager;
mod elf;
pub mod event_monitor;
#[cfg(test)]
mod fuzz_config;
mod le_bytes;
pub mod lossy_writer;
pub mod memory;
pub mod seccomp_filters;
pub mod serial_output;
pub mod sev_snp;
pub mod tdx;
#[cfg(test)]
mod test_util;
mod vcpu;
pub mod vm;

use std::sync::Arc;
use std::sync::mpsc::{Sender, channel};

use hypervisor::KvmHypervisor;
use log::{info, warn};

use crate::config::{EventMonitorConfig, VmConfig};
use crate::event_monitor::EventMonitor;
use crate::seccomp_filters::{SeccompError, SeccompMode, Thread};

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
    /// From VM number `vm` (each boot gets a new number, so the events of
    /// a VM already shut down are recognised and dropped).
    Guest {
        vm: u64,
        event: GuestEvent,
    },
    Signal(i32),
    Api(api::ApiMessage),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    PowerOff(u8),
    /// Triple fault or a system event on this vCPU: the guest is gone.
    Shutdown(u8),
    VcpuError(u8, String),
}

/// Where one VM's vCPUs and devices report to the control loop.
#[derive(Clone)]
pub struct GuestEvents {
    pub vm: u64,
    pub tx: Sender<VmmEvent>,
}

impl GuestEvents {
    pub fn send(&self, event: GuestEvent) {
        // The control loop gone means the VMM is exiting anyway.
        let _ = self.tx.send(VmmEvent::Guest { vm: self.vm, event });
    }
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
    #[error(transparent)]
    Boot(control::LifecycleError),
    #[error("cannot start the API server")]
    Api(#[source] api::http::ApiServerError),
}

pub struct VmmOptions {
    /// The VM of the command line; without one the VMM waits for
    /// `vm.create`.
    pub vm: Option<VmConfig>,
    pub api_socket: Option<api::http::ApiSocket>,
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
    builder: Option<seccompiler::BpfProgram>,
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
            builder: seccomp_filters::filter(mode, Thread::VmBuilder)?,
        })
    }
}

/// Starts the VMM: boots the VM of the command line, if there is one, or
/// waits for `vm.create` over the API; runs the control loop until the
/// guest powers off, a signal or `vmm.shutdown` ends it. Returns the
/// process exit code.
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
        .as_ref()
        .map(|socket| api::http::ApiServer::start(socket, events_tx.clone(), filters.http))
        .transpose()
        .map_err(VmmError::Api)?;
    // Started before the VMM thread locks itself down, so it may create VMs.
    let builder = control::VmBuilder::start(
        hypervisor,
        events_tx.clone(),
        monitor.clone(),
        filters.vcpu,
        filters.builder,
    )
    .map_err(VmmError::Seccomp)?;
    let mut vmm = control::Vmm::new(builder, monitor.clone());
    if let Some(config) = options.vm {
        vmm.create(config).expect("nothing created yet");
        if let Err(e) = vmm.boot() {
            vmm.finish(1);
            return Err(VmmError::Boot(e));
        }
    } else {
        info!("no VM configured: waiting for vm.create");
    }
    if let Some(program) = &filters.vmm
        && let Err(e) = seccomp_filters::apply(program)
    {
        vmm.finish(1);
        return Err(VmmError::Seccomp(e));
    }
    let code = vmm.control_loop(&events_rx);
    // Requests still queued, or sent from now on, get "shutting down"
    // instead of waiting for a loop that no longer runs.
    drop(events_rx);
    vmm.finish(code);
    // Joining the HTTP thread lets a pending shutdown answer reach its client.
    if let Some(server) = api_server.as_mut() {
        server.stop();
    }
    drop(vmm);
    monitor.emit("vmm", "shutdown", serde_json::Value::Null);
    monitor.flush(std::time::Duration::from_secs(1));
    info!("VMM exiting with code {code}");
    Ok(code)
}
