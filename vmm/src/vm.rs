//! One VM: hypervisor VM, memory, devices and vCPUs, with a boot and a
//! shutdown that undoes everything.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use serde_json::json;

use crate::boot::{self, BootError};
use crate::config::VmConfig;
use crate::config::{DeviceConfig, UserDeviceConfig};
use crate::device_manager::pci_segment::PciSegmentError;
use crate::device_manager::{DeviceError, DeviceInfo, DeviceManager};
use crate::event_monitor::EventMonitor;
use crate::memory::{MemoryError, MemoryManager};
use crate::vcpu::{PauseGate, VcpuHandle};

mod build;
mod firmware;
mod info;
mod serial;
#[cfg(test)]
mod tests;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the VM")]
    Create(#[source] hypervisor::HypervisorError),
    #[error("this host has no guest_memfd support")]
    NoGuestMemfd,
    #[error("VM type {wanted} is not available on this host (it offers: {offered})")]
    VmTypeUnavailable {
        wanted: &'static str,
        offered: String,
    },
    #[error("cannot set up guest memory")]
    Memory(#[source] MemoryError),
    #[error("cannot read kernel {path}")]
    ReadKernel {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load kernel {path}")]
    LoadKernel {
        path: String,
        #[source]
        source: BootError,
    },
    #[error("cannot open serial output {path}")]
    SerialFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the serial console")]
    SerialOutput(#[source] crate::serial_output::SerialOutputError),
    #[error("cannot add a device to the I/O bus")]
    Bus(#[source] vm_device::BusError),
    #[error("cannot create vCPU")]
    Vcpu(#[source] hypervisor::HypervisorError),
    #[error("cannot set up vCPU")]
    VcpuSetup(#[source] BootError),
    #[error("cannot boot the Linux kernel {path}")]
    LinuxBoot {
        path: String,
        #[source]
        source: boot::linux::LinuxBootError,
    },
    #[error("cannot open the initramfs {path}")]
    Initramfs {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the ACPI tables")]
    Acpi(#[source] boot::acpi::AcpiError),
    #[error("cannot set up vCPU {0}'s CPUID")]
    Cpuid(u8, #[source] hypervisor::HypervisorError),
    #[error("cannot create the timer a Linux guest needs")]
    Pit(#[source] hypervisor::HypervisorError),
    #[error("cannot start vCPU thread")]
    VcpuThread(#[source] crate::seccomp_filters::SeccompError),
    #[error("cannot add device")]
    Device(#[source] DeviceError),
    #[error("cannot set up PCI segment 0")]
    Pci(#[source] PciSegmentError),
    #[error("the VM is {0:?}, not running")]
    NotRunning(VmState),
    #[error("the VM is {0:?}, not paused")]
    NotPaused(VmState),
    #[error("the thread that builds VMs is gone")]
    BuilderGone,
    #[error("building the VM panicked (a bug: see the VMM's log); nothing of it is left")]
    BuildPanicked,
    #[error("the vCPUs did not stop within {0} ms")]
    PauseTimeout(u128),
    #[error("cannot boot the firmware")]
    Firmware(#[source] crate::sev_snp::FirmwareError),
    #[error("cannot boot the firmware")]
    TdxFirmware(#[source] crate::tdx::FirmwareError),
    #[error("firmware boots an SEV-SNP or TDX guest: the platform needs sev_snp=on or tdx=on")]
    FirmwareNeedsPlatform,
}

pub use firmware::FirmwarePlatform;

/// What the launch of a firmware boot measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchMeasurement {
    SevSnp(crate::sev_snp::Measurement),
    Tdx(crate::tdx::Measurement),
}

impl LaunchMeasurement {
    pub fn platform(&self) -> FirmwarePlatform {
        match self {
            LaunchMeasurement::SevSnp(_) => FirmwarePlatform::SevSnp,
            LaunchMeasurement::Tdx(_) => FirmwarePlatform::Tdx,
        }
    }

    /// `vm.info`'s `launch`: what `--measure` prints, and the launch's
    /// other inputs.
    pub fn info(&self) -> serde_json::Value {
        match self {
            LaunchMeasurement::SevSnp(m) => m.info(),
            LaunchMeasurement::Tdx(m) => m.info(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub enum VmState {
    Running,
    Paused,
    Shutdown,
}

pub struct Vm {
    /// Which boot of this VMM this is (see `VmmEvent::Guest`).
    id: u64,
    config: VmConfig,
    /// The pseudo-terminal of `--serial pty`.
    serial_pty: Option<std::path::PathBuf>,
    /// The file of `--serial socket=`, removed with the VM.
    _serial_socket: Option<crate::serial_output::SocketFile>,
    memory: Arc<MemoryManager>,
    devices: Arc<DeviceManager>,
    monitor: Arc<EventMonitor>,
    stop: Arc<AtomicBool>,
    pause: Arc<PauseGate>,
    vcpus: Vec<VcpuHandle>,
    /// Hot-plug operations in flight, each on its own thread.
    hotplug: Vec<JoinHandle<()>>,
    state: VmState,
    /// What the launch of a firmware boot measured.
    launch: Option<LaunchMeasurement>,
}

/// How long `pause` waits for every vCPU to stop (one may be in the middle
/// of a conversion waiting for a device).
pub const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest kernel file accepted: an uncompressed Linux vmlinux with its
/// symbols is about 50 MiB; the file is read whole before loading.
pub const MAX_KERNEL_FILE: u64 = 128 << 20;

impl Vm {
    /// Stops every vCPU between two exits (a conversion or device access
    /// in progress finishes first) and waits until they all wait.
    pub fn pause(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Running {
            return Err(VmError::NotRunning(self.state));
        }
        self.pause.close();
        let deadline = std::time::Instant::now() + PAUSE_TIMEOUT;
        loop {
            let running = self.vcpus.iter().filter(|v| v.is_running()).count();
            if self.pause.parked() >= running {
                break;
            }
            if std::time::Instant::now() > deadline {
                self.pause.open();
                return Err(VmError::PauseTimeout(PAUSE_TIMEOUT.as_millis()));
            }
            // A kick that lands outside KVM_RUN is lost, hence the loop.
            for vcpu in &self.vcpus {
                vcpu.kick();
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.state = VmState::Paused;
        self.monitor.emit("vm", "paused", serde_json::Value::Null);
        Ok(())
    }

    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.state != VmState::Paused {
            return Err(VmError::NotPaused(self.state));
        }
        self.pause.open();
        self.state = VmState::Running;
        self.monitor.emit("vm", "resumed", serde_json::Value::Null);
        Ok(())
    }

    /// Stops every vCPU, then detaches every device so each unmaps what it
    /// had, then waits for hot-plug operations in flight (which can no
    /// longer attach anything). Idempotent.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Paused vCPUs wait at the gate: let them see the stop.
        self.pause.wake();
        for vcpu in &mut self.vcpus {
            vcpu.stop();
        }
        for info in self.devices.remove_all() {
            self.monitor.emit("device", "removed", json!(info));
        }
        for worker in self.hotplug.drain(..) {
            let _ = worker.join();
        }
        self.state = VmState::Shutdown;
    }

    pub fn add_device(&self, config: &DeviceConfig) -> Result<DeviceInfo, DeviceError> {
        device_ops::add(&self.devices, &self.monitor, config)
    }

    pub fn add_user_device(&self, config: &UserDeviceConfig) -> Result<DeviceInfo, DeviceError> {
        device_ops::add(&self.devices, &self.monitor, config)
    }

    pub fn remove_device(&self, id: &str) -> Result<DeviceInfo, DeviceError> {
        device_ops::remove(&self.devices, &self.monitor, id)
    }

    /// Runs `job` (a hot-plug operation, which may wait for a device) on its
    /// own thread so the caller keeps serving; the job answers for itself.
    pub fn spawn_hotplug(
        &mut self,
        job: impl FnOnce(&DeviceManager, &EventMonitor) + Send + 'static,
    ) -> std::io::Result<()> {
        self.hotplug.retain(|worker| !worker.is_finished());
        let devices = self.devices.clone();
        let monitor = self.monitor.clone();
        let worker = std::thread::Builder::new()
            .name("device-hotplug".into())
            .spawn(move || job(&devices, &monitor))?;
        self.hotplug.push(worker);
        Ok(())
    }

    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// What the SEV-SNP launch measured (SEV-SNP firmware boots only).
    pub fn launch_measurement(&self) -> Option<&crate::sev_snp::Measurement> {
        match &self.launch {
            Some(LaunchMeasurement::SevSnp(m)) => Some(m),
            _ => None,
        }
    }

    /// What the launch of a firmware boot measured, on either platform.
    pub fn launch(&self) -> Option<&LaunchMeasurement> {
        self.launch.as_ref()
    }

    pub fn memory(&self) -> &Arc<MemoryManager> {
        &self.memory
    }
}

/// Device hot-plug with its events, callable from any thread.
pub mod device_ops {
    use super::*;

    /// Announces what `done` did to a device as event `event`.
    fn announced(
        monitor: &EventMonitor,
        event: &'static str,
        done: Result<DeviceInfo, DeviceError>,
    ) -> Result<DeviceInfo, DeviceError> {
        let info = done?;
        monitor.emit("device", event, json!(info));
        Ok(info)
    }

    /// A device configuration the device manager plugs in.
    pub trait Pluggable: Clone + Send + 'static {
        /// The list of such devices in a VM's configuration.
        fn configured(config: &mut VmConfig) -> &mut Vec<Self>;
        fn plug_into(&self, devices: &DeviceManager) -> Result<DeviceInfo, DeviceError>;
    }

    impl Pluggable for DeviceConfig {
        fn configured(config: &mut VmConfig) -> &mut Vec<Self> {
            &mut config.devices
        }
        fn plug_into(&self, devices: &DeviceManager) -> Result<DeviceInfo, DeviceError> {
            devices.add_vfio(self)
        }
    }

    impl Pluggable for UserDeviceConfig {
        fn configured(config: &mut VmConfig) -> &mut Vec<Self> {
            &mut config.user_devices
        }
        fn plug_into(&self, devices: &DeviceManager) -> Result<DeviceInfo, DeviceError> {
            devices.add_vfio_user(self)
        }
    }

    pub fn add<C: Pluggable>(
        devices: &DeviceManager,
        monitor: &EventMonitor,
        config: &C,
    ) -> Result<DeviceInfo, DeviceError> {
        announced(monitor, "added", config.plug_into(devices))
    }

    pub fn remove(
        devices: &DeviceManager,
        monitor: &EventMonitor,
        id: &str,
    ) -> Result<DeviceInfo, DeviceError> {
        announced(monitor, "removed", devices.remove(id))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}
