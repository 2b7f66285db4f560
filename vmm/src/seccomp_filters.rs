// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! Per-thread seccomp filters. Every VMM thread installs the filter for its
//! job before it touches guest-controlled input; a syscall outside it raises
//! SIGSYS (or is only logged by the kernel in `log` mode).
//!
//! The lists were taken from what each thread really calls (strace over the
//! integration suite) plus the paths this machine cannot exercise (VFIO), and
//! are kept honest by the integration tests, which all run with filters on.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

mod rules;
mod runtime;
#[cfg(test)]
mod tests;

use rules::rules_for;
pub use runtime::{SECCOMP_VIOLATION_EXIT, apply, install_violation_reporter, spawn_filtered};

/// How filters are enforced (`--seccomp true|false|log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// A forbidden syscall raises SIGSYS; the VMM reports it and exits.
    #[default]
    Enforce,
    /// The kernel logs forbidden syscalls and lets them run (debugging).
    Log,
    /// No filters.
    Off,
}

impl SeccompMode {
    pub const SYNTAX: &'static str = "true|false|log";

    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "true" | "on" => Ok(SeccompMode::Enforce),
            "false" | "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            other => Err(format!("expected {}, got {other:?}", Self::SYNTAX)),
        }
    }
}

/// The jobs a VMM thread can have; each has its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thread {
    /// The control loop, once the VM is built: API requests, device
    /// hot-plug, shutdown.
    Vmm,
    Vcpu,
    /// The API server and the connection threads it starts.
    HttpServer,
    SignalHandler,
    /// Writes queued events to the event monitor's file or fd.
    EventMonitor,
    /// Writes queued log lines.
    LogWriter,
    /// Builds VMs (`vm.boot`, `vm.reboot`, the command line's VM): KVM VM
    /// and vCPU creation, guest memory, the kernel image, cold-plugged
    /// devices.
    VmBuilder,
}

impl Thread {
    pub const ALL: [Thread; 7] = [
        Thread::Vmm,
        Thread::Vcpu,
        Thread::HttpServer,
        Thread::SignalHandler,
        Thread::EventMonitor,
        Thread::LogWriter,
        Thread::VmBuilder,
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0:?} thread's seccomp filter")]
    Build(Thread, #[source] seccompiler::BackendError),
    #[error("cannot compile the {0:?} thread's seccomp filter")]
    Compile(Thread, #[source] seccompiler::BackendError),
    #[error("cannot install a seccomp filter")]
    Apply(#[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot spawn thread {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("thread {0} died before installing its filter")]
    Died(String),
}

/// The BPF program for `thread`, or None when filters are off.
pub fn filter(mode: SeccompMode, thread: Thread) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules = rules_for(thread).map_err(|e| SeccompError::Build(thread, e))?;
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| SeccompError::Build(thread, e))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| SeccompError::Build(thread, e))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e| SeccompError::Compile(thread, e))?;
    Ok(Some(program))
}
