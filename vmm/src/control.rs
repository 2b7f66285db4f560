//! The VMM thread's state machine, as Cloud Hypervisor's lifecycle has it:
//!
//! ```text
//!            vm.create            vm.boot
//!   (empty) ----------> created ----------> booted (running <-> paused)
//!      ^                  |  ^                 |
//!      |    vm.delete     |  |   vm.shutdown   |
//!      +------------------+  +-----------------+
//! ```
//!
//! `vm.reboot` shuts a booted VM down and boots its configuration again;
//! `vm.delete` from booted shuts down first; `vmm.shutdown` deletes and
//! ends the VMM. A guest powering off ends the VMM with its exit code.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use hypervisor::KvmHypervisor;
use log::{error, info, warn};
use serde_json::json;

use crate::api::{self, ApiError, ApiRequest, ApiResponse};
use crate::config::VmConfig;
use crate::device_manager::{self, DeviceError};
use crate::event_monitor::EventMonitor;
use crate::seccomp_filters::{SeccompError, spawn_filtered};
use crate::vm::device_ops::{self, Pluggable};
use crate::vm::{Vm, VmError};
use crate::{GuestEvent, GuestEvents, VmmEvent};

type BootRequest = (VmConfig, Sender<Result<Vm, VmError>>);

/// Builds VMs on a thread started before the VMM thread locks itself down:
/// creating a VM takes system calls (KVM_CREATE_VM, guest_memfd, memfd,
/// vCPU set-up) that the VMM thread's filter does not allow.
pub struct VmBuilder {
    requests: Option<Sender<BootRequest>>,
    thread: Option<JoinHandle<()>>,
}

impl VmBuilder {
    pub fn start(
        hypervisor: KvmHypervisor,
        events: Sender<VmmEvent>,
        monitor: Arc<EventMonitor>,
        vcpu_filter: Option<seccompiler::BpfProgram>,
        own_filter: Option<seccompiler::BpfProgram>,
    ) -> Result<Self, SeccompError> {
        let (requests, jobs) = channel::<BootRequest>();
        let thread = spawn_filtered("vm_builder".into(), own_filter, move || {
            // VM numbers start at 1.
            for (id, (config, reply)) in (1..).zip(jobs) {
                let guest_events = GuestEvents {
                    vm: id,
                    tx: events.clone(),
                };
                // A bug hit while building one VM must not take the builder
                // (and every later boot) with it; unwinding drops what the
                // half-built VM held.
                let vm = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    Vm::boot(
                        config,
                        &hypervisor,
                        guest_events,
                        monitor.clone(),
                        vcpu_filter.clone(),
                    )
                }))
                .unwrap_or(Err(VmError::BuildPanicked));
                // The requester gone means the VMM is exiting: the VM goes
                // down with this thread.
                if let Err(Ok(mut vm)) = reply.send(vm).map_err(|e| e.0) {
                    vm.shutdown();
                }
            }
        })?;
        Ok(VmBuilder {
            requests: Some(requests),
            thread: Some(thread),
        })
    }

    /// Builds and starts a VM from `config`.
    pub fn boot(&self, config: VmConfig) -> Result<Vm, VmError> {
        let (reply, answer) = channel();
        self.requests
            .as_ref()
            .and_then(|r| r.send((config, reply)).ok())
            .ok_or(VmError::BuilderGone)?;
        answer.recv().map_err(|_| VmError::BuilderGone)?
    }
}

impl Drop for VmBuilder {
    fn drop(&mut self) {
        self.requests.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("no VM has been created")]
    NotCreated,
    #[error("a VM has already been created")]
    AlreadyCreated,
    #[error("the VM is already booted")]
    AlreadyBooted,
    #[error("the VM is not booted")]
    NotBooted,
    #[error("this VM has no power button (no ACPI): shut it down with vm.shutdown")]
    NoPowerButton,
    #[error("cannot boot the VM")]
    Boot(#[source] VmError),
}

pub struct Vmm {
    builder: VmBuilder,
    monitor: Arc<EventMonitor>,
    config: Option<VmConfig>,
    vm: Option<Vm>,
}

/// What ends the control loop.
pub enum Exit {
    Code(i32),
}

impl Vmm {
    pub fn new(builder: VmBuilder, monitor: Arc<EventMonitor>) -> Self {
        Vmm {
            builder,
            monitor,
            config: None,
            vm: None,
        }
    }

    pub fn create(&mut self, config: VmConfig) -> Result<(), LifecycleError> {
        if self.config.is_some() {
            return Err(LifecycleError::AlreadyCreated);
        }
        info!("VM created");
        self.config = Some(config);
        Ok(())
    }

    pub fn boot(&mut self) -> Result<(), LifecycleError> {
        if self.vm.is_some() {
            return Err(LifecycleError::AlreadyBooted);
        }
        let config = self.config.clone().ok_or(LifecycleError::NotCreated)?;
        self.monitor.emit("vm", "booting", serde_json::Value::Null);
        let vm = self.builder.boot(config).map_err(LifecycleError::Boot)?;
        self.vm = Some(vm);
        Ok(())
    }

    /// Stops the VM; its configuration stays, so it can boot again.
    pub fn shutdown_vm(&mut self) -> Result<(), LifecycleError> {
        let mut vm = self.vm.take().ok_or(LifecycleError::NotBooted)?;
        vm.shutdown();
        self.monitor.emit("vm", "shutdown", serde_json::Value::Null);
        Ok(())
    }

    pub fn reboot(&mut self) -> Result<(), LifecycleError> {
        if self.vm.is_none() {
            return Err(LifecycleError::NotBooted);
        }
        self.monitor
            .emit("vm", "rebooting", serde_json::Value::Null);
        self.shutdown_vm()?;
        self.boot()?;
        self.monitor.emit("vm", "rebooted", serde_json::Value::Null);
        Ok(())
    }

    /// Forgets the VM (shutting it down first if it runs); nothing to
    /// delete is not an error.
    pub fn delete(&mut self) {
        if self.vm.is_some() {
            let _ = self.shutdown_vm();
        }
        if self.config.take().is_some() {
            self.monitor.emit("vm", "deleted", serde_json::Value::Null);
        }
    }

    fn booted(&mut self) -> Result<&mut Vm, ApiError> {
        self.vm
            .as_mut()
            .ok_or(ApiError::Lifecycle(LifecycleError::NotBooted))
    }

    /// Runs until something ends the VMM; returns the exit code.
    pub fn control_loop(&mut self, events: &Receiver<VmmEvent>) -> i32 {
        loop {
            let Ok(event) = events.recv() else {
                return 1;
            };
            let exit = match event {
                VmmEvent::Guest { vm, event } => self.guest_event(vm, event),
                VmmEvent::Signal(signal) => {
                    info!("signal {signal}: shutting down");
                    Some(Exit::Code(0))
                }
                VmmEvent::Api(message) => self.handle_api(message),
            };
            if let Some(Exit::Code(code)) = exit {
                return code;
            }
        }
    }

    fn guest_event(&mut self, vm: u64, event: GuestEvent) -> Option<Exit> {
        if self.vm.as_ref().map(Vm::id) != Some(vm) {
            info!("event {event:?} of VM {vm}, which no longer runs: dropped");
            return None;
        }
        Some(Exit::Code(match event {
            GuestEvent::PowerOff(code) => {
                info!("guest powered off with code {code}");
                i32::from(code)
            }
            GuestEvent::Shutdown(vcpu) => {
                error!("vCPU {vcpu}: guest shut down (triple fault or reset)");
                1
            }
            GuestEvent::VcpuError(vcpu, what) => {
                error!("vCPU {vcpu}: {what}");
                1
            }
        }))
    }

    /// Answers `message`, at once or, for hot-plug (which may wait for a
    /// device), from a worker thread so the loop keeps serving meanwhile.
    fn handle_api(&mut self, message: api::ApiMessage) -> Option<Exit> {
        use ApiRequest::*;
        let api::ApiMessage { request, respond } = message;
        let answer: ApiResponse = match request {
            VmmPing => Ok(Some(json!({
                "build_version": env!("CARGO_PKG_VERSION"),
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "features": ["guest_memfd", "ram_block_attribute"],
            }))),
            VmCreate(config) => self
                .create(*config)
                .map(|()| None)
                .map_err(ApiError::Lifecycle),
            VmBoot => self.boot().map(|()| None).map_err(ApiError::Lifecycle),
            VmShutdown => self
                .shutdown_vm()
                .map(|()| None)
                .map_err(ApiError::Lifecycle),
            VmReboot => self.reboot().map(|()| None).map_err(ApiError::Lifecycle),
            VmDelete => {
                self.delete();
                Ok(None)
            }
            VmPowerButton => match self.vm {
                Some(_) => Err(ApiError::Lifecycle(LifecycleError::NoPowerButton)),
                None => Err(ApiError::Lifecycle(LifecycleError::NotBooted)),
            },
            VmmShutdown => {
                self.delete();
                let _ = respond.send(Ok(None));
                info!("shutdown requested over the API");
                return Some(Exit::Code(0));
            }
            VmInfo => self.info(),
            VmCounters => self.booted().map(|vm| Some(vm.counters())),
            VmMemoryAttributes(window) => self
                .booted()
                .map(|vm| Some(api::memory_attributes(vm.memory(), window))),
            VmPause => self
                .booted()
                .and_then(|vm| vm.pause().map_err(ApiError::Vm))
                .map(|()| None),
            VmResume => self
                .booted()
                .and_then(|vm| vm.resume().map_err(ApiError::Vm))
                .map(|()| None),
            VmAddDevice(config) => return self.plug(respond, config),
            VmAddUserDevice(config) => return self.plug(respond, config),
            VmRemoveDevice(id) => {
                let unplugged = id.clone();
                return self.device_request(
                    respond,
                    |c| {
                        let before = c.devices.len() + c.user_devices.len();
                        c.devices.retain(|d| d.id.as_deref() != Some(id.as_str()));
                        c.user_devices
                            .retain(|d| d.id.as_deref() != Some(id.as_str()));
                        if c.devices.len() + c.user_devices.len() == before {
                            return Err(DeviceError::NotFound(id));
                        }
                        Ok(())
                    },
                    move |devices, monitor| device_ops::remove(devices, monitor, &unplugged),
                );
            }
        };
        let _ = respond.send(answer);
        None
    }

    /// `vm.info`: the booted VM's, or the created configuration's.
    fn info(&self) -> ApiResponse {
        if let Some(vm) = &self.vm {
            return Ok(Some(vm.info()));
        }
        let config = self
            .config
            .as_ref()
            .ok_or(ApiError::Lifecycle(LifecycleError::NotCreated))?;
        Ok(Some(json!({
            "config": config,
            "state": "Created",
            "memory_actual_size": config.memory.size,
            "vm_type": config.platform.vm_type().name(),
            "devices": [],
        })))
    }

    /// Adds a device: to the configuration before boot, to the VM after.
    fn plug<C: Pluggable>(&mut self, respond: Sender<ApiResponse>, config: C) -> Option<Exit> {
        let plugged = config.clone();
        self.device_request(
            respond,
            move |c| {
                C::configured(c).push(config);
                Ok(())
            },
            move |devices, monitor| device_ops::add(devices, monitor, &plugged),
        )
    }

    /// A device request: before boot it changes the configuration, on a
    /// booted VM it hot-plugs.
    fn device_request(
        &mut self,
        respond: Sender<ApiResponse>,
        cold: impl FnOnce(&mut VmConfig) -> Result<(), DeviceError>,
        hot: impl DeviceJob,
    ) -> Option<Exit> {
        if self.vm.is_none() {
            self.cold_plug(respond, cold)
        } else {
            self.hotplug(respond, hot)
        }
    }

    /// A device added or removed before boot changes the configuration
    /// the VM will boot with (204, as in Cloud Hypervisor).
    fn cold_plug(
        &mut self,
        respond: Sender<ApiResponse>,
        change: impl FnOnce(&mut VmConfig) -> Result<(), DeviceError>,
    ) -> Option<Exit> {
        let answer = match self.config.as_mut() {
            None => Err(ApiError::Lifecycle(LifecycleError::NotCreated)),
            Some(config) => {
                let mut changed = config.clone();
                change(&mut changed)
                    .and_then(|()| unique_ids(&changed))
                    .map(|()| {
                        *config = changed;
                        None
                    })
                    .map_err(ApiError::Device)
            }
        };
        let _ = respond.send(answer);
        None
    }

    /// Runs a hot-plug operation on its own thread; it answers `respond`.
    fn hotplug(&mut self, respond: Sender<ApiResponse>, job: impl DeviceJob) -> Option<Exit> {
        let Some(vm) = self.vm.as_mut() else {
            let _ = respond.send(Err(ApiError::Lifecycle(LifecycleError::NotBooted)));
            return None;
        };
        let answer = respond.clone();
        let spawned = vm.spawn_hotplug(move |devices, monitor| {
            let result = job(devices, monitor)
                .map(|info| Some(json!(info)))
                .map_err(ApiError::Device);
            let _ = answer.send(result);
        });
        if let Err(e) = spawned {
            let _ = respond.send(Err(ApiError::Worker(e)));
        }
        None
    }

    /// Shuts the VM down at the end of the VMM, reporting why.
    pub fn finish(&mut self, exit_code: i32) {
        if let Some(mut vm) = self.vm.take() {
            vm.shutdown();
            self.monitor
                .emit("vm", "shutdown", json!({ "exit_code": exit_code }));
        }
    }
}

/// Device ids in a configuration are unique (ids given by the user; the
/// VMM names the others at boot).
fn unique_ids(config: &VmConfig) -> Result<(), DeviceError> {
    let mut seen = std::collections::BTreeSet::new();
    let ids = config
        .devices
        .iter()
        .filter_map(|d| d.id.clone())
        .chain(config.user_devices.iter().filter_map(|d| d.id.clone()));
    for id in ids {
        if !seen.insert(id.clone()) {
            warn!("a device with id {id:?} is already configured");
            return Err(DeviceError::DuplicateId(id));
        }
    }
    Ok(())
}

/// What a device operation answers: the device, or why not.
type DeviceAnswer = Result<device_manager::DeviceInfo, DeviceError>;

/// A device operation on the booted VM (`vm::device_ops`), run on its own
/// thread.
trait DeviceJob:
    FnOnce(&device_manager::DeviceManager, &EventMonitor) -> DeviceAnswer + Send + 'static
{
}

impl<F> DeviceJob for F where
    F: FnOnce(&device_manager::DeviceManager, &EventMonitor) -> DeviceAnswer + Send + 'static
{
}

#[cfg(test)]
mod tests;
