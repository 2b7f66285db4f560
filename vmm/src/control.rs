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
use crate::vm::{self, Vm, VmError};
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
            VmAddDevice(config) => {
                let plugged = config.clone();
                return self.device_request(
                    respond,
                    |c| {
                        c.devices.push(config);
                        Ok(())
                    },
                    move |devices, monitor| vm::device_ops::add_device(devices, monitor, &plugged),
                );
            }
            VmAddUserDevice(config) => {
                let plugged = config.clone();
                return self.device_request(
                    respond,
                    |c| {
                        c.user_devices.push(config);
                        Ok(())
                    },
                    move |devices, monitor| {
                        vm::device_ops::add_user_device(devices, monitor, &plugged)
                    },
                );
            }
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
                    move |devices, monitor| {
                        vm::device_ops::remove_device(devices, monitor, &unplugged)
                    },
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

    /// A device request: before boot it changes the configuration, on a
    /// booted VM it hot-plugs.
    fn device_request(
        &mut self,
        respond: Sender<ApiResponse>,
        cold: impl FnOnce(&mut VmConfig) -> Result<(), DeviceError>,
        hot: impl FnOnce(
            &device_manager::DeviceManager,
            &EventMonitor,
        ) -> Result<device_manager::DeviceInfo, DeviceError>
        + Send
        + 'static,
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
    fn hotplug(
        &mut self,
        respond: Sender<ApiResponse>,
        job: impl FnOnce(
            &device_manager::DeviceManager,
            &EventMonitor,
        ) -> Result<device_manager::DeviceInfo, DeviceError>
        + Send
        + 'static,
    ) -> Option<Exit> {
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{ConsoleOutput, CpusConfig, MemoryConfig, PlatformConfig};
    use crate::test_util::kvm;

    /// A VMM over real KVM and a guest that converts a page and halts.
    fn vmm(dir: &std::path::Path) -> Option<(Vmm, VmConfig, Receiver<VmmEvent>)> {
        let hv = kvm()?;
        let (tx, rx) = channel();
        let monitor = Arc::new(EventMonitor::disabled());
        let builder = VmBuilder::start(hv, tx, monitor.clone(), None, None).unwrap();
        let kernel = dir.join("guest.elf");
        let ops = test_guest::parse_ops("shared@0x1000000+4K").unwrap();
        let options = test_guest::MemconvOptions {
            poweroff: false,
            quiet: true,
        };
        std::fs::write(&kernel, test_guest::memconv_elf(&[ops], options)).unwrap();
        let config = VmConfig {
            kernel,
            firmware: None,
            cmdline: None,
            initramfs: None,
            memory: MemoryConfig::new("memory", 32 << 20, true, None).unwrap(),
            platform: PlatformConfig::default(),
            cpus: CpusConfig::default(),
            serial: ConsoleOutput::Off,
            devices: Vec::new(),
            user_devices: Vec::new(),
        };
        Some((Vmm::new(builder, monitor), config, rx))
    }

    /// A scratch directory, removed when the test ends (passed or not).
    struct Scratch(std::path::PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("ch-control-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn code(exit: Option<Exit>) -> Option<i32> {
        exit.map(|Exit::Code(code)| code)
    }

    #[test]
    fn each_state_refuses_what_it_cannot_do_and_keeps_its_state() {
        let dir = dir("states");
        let Some((mut vmm, config, _events)) = vmm(&dir) else {
            return;
        };
        assert!(matches!(vmm.boot(), Err(LifecycleError::NotCreated)));
        assert!(matches!(vmm.shutdown_vm(), Err(LifecycleError::NotBooted)));
        assert!(matches!(vmm.reboot(), Err(LifecycleError::NotBooted)));
        vmm.delete();
        vmm.create(config.clone()).unwrap();
        assert!(matches!(
            vmm.create(config.clone()),
            Err(LifecycleError::AlreadyCreated)
        ));
        assert!(matches!(vmm.shutdown_vm(), Err(LifecycleError::NotBooted)));
        vmm.boot().unwrap();
        assert!(matches!(vmm.boot(), Err(LifecycleError::AlreadyBooted)));
        assert_eq!(vmm.vm.as_ref().unwrap().id(), 1);
        vmm.reboot().unwrap();
        assert_eq!(vmm.vm.as_ref().unwrap().id(), 2, "a reboot is a new VM");
        vmm.shutdown_vm().unwrap();
        assert!(vmm.vm.is_none() && vmm.config.is_some());
        vmm.boot().unwrap();
        vmm.delete();
        assert!(vmm.vm.is_none() && vmm.config.is_none());
        // A configuration that cannot boot leaves the VM created, not booted.
        let mut broken = config;
        broken.kernel = dir.join("missing.elf");
        vmm.create(broken).unwrap();
        assert!(matches!(vmm.boot(), Err(LifecycleError::Boot(_))));
        assert!(vmm.vm.is_none() && vmm.config.is_some());
    }

    #[test]
    fn only_the_running_vms_guest_events_end_the_vmm() {
        let dir = dir("events");
        let Some((mut vmm, config, events)) = vmm(&dir) else {
            return;
        };
        // No VM: nothing a guest says counts.
        assert_eq!(code(vmm.guest_event(1, GuestEvent::PowerOff(0))), None);
        vmm.create(config).unwrap();
        vmm.boot().unwrap();
        let running = vmm.vm.as_ref().unwrap().id();
        // An event of an earlier VM is dropped; the running one's counts.
        assert_eq!(
            code(vmm.guest_event(running + 1, GuestEvent::PowerOff(3))),
            None
        );
        assert_eq!(
            code(vmm.guest_event(running, GuestEvent::PowerOff(3))),
            Some(3)
        );
        assert_eq!(
            code(vmm.guest_event(running, GuestEvent::Shutdown(0))),
            Some(1)
        );
        assert_eq!(
            code(vmm.guest_event(running, GuestEvent::VcpuError(0, "x".into()))),
            Some(1)
        );
        // The halted guest sends nothing on its own.
        assert!(events.recv_timeout(Duration::from_millis(100)).is_err());
        vmm.finish(0);
        assert!(vmm.vm.is_none());
    }

    #[test]
    fn the_control_loop_ends_on_a_signal_a_guest_power_off_or_a_lost_channel() {
        let dir = dir("loop");
        let Some((mut vmm, config, _events)) = vmm(&dir) else {
            return;
        };
        let (tx, rx) = channel();
        tx.send(VmmEvent::Signal(libc::SIGTERM)).unwrap();
        assert_eq!(vmm.control_loop(&rx), 0);
        vmm.create(config).unwrap();
        vmm.boot().unwrap();
        let running = vmm.vm.as_ref().unwrap().id();
        // A stale VM's power-off is skipped; the running one's code ends it.
        for (vm, code) in [(running + 5, 9), (running, 7)] {
            tx.send(VmmEvent::Guest {
                vm,
                event: GuestEvent::PowerOff(code),
            })
            .unwrap();
        }
        assert_eq!(vmm.control_loop(&rx), 7);
        // Requests are answered while it runs; hot-plug answers from its
        // worker thread.
        let (answer_tx, answers) = channel();
        tx.send(VmmEvent::Api(api::ApiMessage {
            request: ApiRequest::VmRemoveDevice("nothing".into()),
            respond: answer_tx,
        }))
        .unwrap();
        drop(tx);
        assert_eq!(vmm.control_loop(&rx), 1, "a lost channel ends it with 1");
        let answer = answers.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(answer.err().map(|e| e.http_status()), Some(404));
        vmm.finish(0);
    }

    #[test]
    fn cold_plug_keeps_ids_unique_and_removes_only_what_exists() {
        let dir = dir("coldplug");
        let Some((mut vmm, config, _events)) = vmm(&dir) else {
            return;
        };
        let device = |id: &str| crate::config::UserDeviceConfig {
            socket: "/tmp/d.sock".into(),
            id: Some(id.to_string()),
            ..Default::default()
        };
        let (tx, rx) = channel();
        vmm.cold_plug(tx.clone(), |c| {
            c.user_devices.push(device("a"));
            Ok(())
        });
        assert!(matches!(
            rx.recv().unwrap(),
            Err(ApiError::Lifecycle(LifecycleError::NotCreated))
        ));
        vmm.create(config).unwrap();
        for (id, ok) in [("a", true), ("b", true), ("a", false)] {
            vmm.cold_plug(tx.clone(), |c| {
                c.user_devices.push(device(id));
                Ok(())
            });
            assert_eq!(rx.recv().unwrap().is_ok(), ok, "{id}");
        }
        let ids: Vec<_> = vmm
            .config
            .as_ref()
            .unwrap()
            .user_devices
            .iter()
            .map(|d| d.id.clone().unwrap())
            .collect();
        assert_eq!(ids, ["a", "b"], "the refused duplicate changed nothing");
        // Removal before boot: an unknown id is 404, a known one goes.
        for (id, status) in [("zzz", Some(404)), ("a", None)] {
            vmm.handle_api(api::ApiMessage {
                request: ApiRequest::VmRemoveDevice(id.into()),
                respond: tx.clone(),
            });
            assert_eq!(rx.recv().unwrap().err().map(|e| e.http_status()), status);
        }
        let ids: Vec<_> = vmm
            .config
            .as_ref()
            .unwrap()
            .user_devices
            .iter()
            .map(|d| d.id.clone().unwrap())
            .collect();
        assert_eq!(ids, ["b"]);
        // VFIO devices too, by the same ids.
        vmm.cold_plug(tx.clone(), |c| {
            c.devices.push(crate::config::DeviceConfig {
                path: "/sys/bus/pci/devices/0000:01:00.0/".into(),
                id: Some("gpu".into()),
                ..Default::default()
            });
            Ok(())
        });
        assert!(rx.recv().unwrap().is_ok());
        vmm.handle_api(api::ApiMessage {
            request: ApiRequest::VmRemoveDevice("gpu".into()),
            respond: tx.clone(),
        });
        assert!(rx.recv().unwrap().is_ok());
        assert!(vmm.config.as_ref().unwrap().devices.is_empty());
    }
}
