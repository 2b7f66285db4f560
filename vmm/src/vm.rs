//! One VM: hypervisor VM, memory, devices and vCPUs, with a boot and a
//! shutdown that undoes everything.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use devices::layout::*;
use devices::{ConversionDoorbell, PowerOffPort, SerialConsole};
use hypervisor::Hypervisor;
use log::info;
use serde_json::json;
use vm_device::Bus;

use crate::boot::{self, BootError};
use crate::config::{ConsoleOutput, VmConfig};
use crate::config::{DeviceConfig, UserDeviceConfig};
use crate::conversion_path::{ConversionPath, DoorbellHandler};
use crate::device_manager::pci_segment::{PciSegment, PciSegmentError};
use crate::device_manager::{DeviceError, DeviceInfo, DeviceManager};
use crate::event_monitor::EventMonitor;
use crate::memory::{MemoryError, MemoryManager};
use crate::vcpu::{self, PauseGate, VcpuContext, VcpuHandle};
use crate::{GuestEvent, GuestEvents};

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
    /// What an SEV-SNP launch measured.
    launch: Option<crate::sev_snp::Measurement>,
}

fn conversion_counters(
    c: &crate::memory::ConversionCounters,
) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(c).expect("plain counters") {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("counters serialize as an object"),
    }
}

/// Where the serial console writes.
struct SerialSetup {
    writer: Box<dyn Write + Send>,
    /// The pseudo-terminal it made (`vm.info` names it).
    pty: Option<std::path::PathBuf>,
    /// The socket file to remove when the VM goes.
    socket: Option<crate::serial_output::SocketFile>,
}

/// The serial console's file, emptied as `File::create` would, unless it
/// is a procfs or sysfs file: guest output written there would be kernel
/// settings, not a log (checked before anything is truncated).
fn serial_file(path: &std::path::Path) -> Result<File, VmError> {
    let refuse = |source| VmError::SerialFile {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(refuse)?;
    if crate::event_monitor::is_pseudo_file(&file) {
        return Err(refuse(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a procfs or sysfs file takes no console output",
        )));
    }
    file.set_len(0).map_err(refuse)?;
    Ok(file)
}

fn serial_output(config: &ConsoleOutput) -> Result<SerialSetup, VmError> {
    use crate::serial_output::{PtyOutput, SocketFile, SocketOutput};
    // Lossy outputs write whole lines, not a system call per byte.
    let lines = |out: Box<dyn Write + Send>| Box::new(std::io::BufWriter::with_capacity(256, out));
    let plain = |writer| SerialSetup {
        writer,
        pty: None,
        socket: None,
    };
    Ok(match config {
        ConsoleOutput::Tty => plain(Box::new(std::io::stdout())),
        ConsoleOutput::Off => plain(Box::new(std::io::sink())),
        ConsoleOutput::File(path) => plain(Box::new(serial_file(path)?)),
        ConsoleOutput::Pty => {
            let (pty, path) = PtyOutput::open().map_err(VmError::SerialOutput)?;
            info!("serial console on {}", path.display());
            SerialSetup {
                writer: lines(Box::new(pty)),
                pty: Some(path),
                socket: None,
            }
        }
        ConsoleOutput::Socket(path) => {
            let socket = SocketOutput::bind(path).map_err(VmError::SerialOutput)?;
            info!("serial console on socket {}", path.display());
            SerialSetup {
                writer: lines(Box::new(socket)),
                pty: None,
                socket: Some(SocketFile(path.clone())),
            }
        }
    })
}

/// How long `pause` waits for every vCPU to stop (one may be in the middle
/// of a conversion waiting for a device).
pub const PAUSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest kernel file accepted: an uncompressed Linux vmlinux with its
/// symbols is about 50 MiB; the file is read whole before loading.
pub const MAX_KERNEL_FILE: u64 = 128 << 20;

/// Reads the kernel image: a regular file no larger than `MAX_KERNEL_FILE`.
/// Opened without blocking, so a FIFO is refused rather than waited on.
fn read_kernel(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    if meta.len() > MAX_KERNEL_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} bytes, more than the {MAX_KERNEL_FILE}-byte limit",
                meta.len()
            ),
        ));
    }
    let mut image = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_KERNEL_FILE + 1).read_to_end(&mut image)?;
    if image.len() as u64 > MAX_KERNEL_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the file grew past the size limit while being read",
        ));
    }
    Ok(image)
}

/// What the vCPUs start: one of our test guests at its ELF entry, or a
/// Linux kernel through its boot protocol.
#[derive(Clone, Copy)]
enum Guest {
    Test(u64),
    Linux(boot::linux::LinuxEntry),
}

/// What the configuration boots, read before anything is created.
enum Payload {
    Kernel(Vec<u8>),
    /// OVMF launched as an SEV-SNP guest (from the reset vector), and the
    /// file it came from.
    Firmware(crate::sev_snp::ovmf::OvmfImage, String),
}

/// What the vCPUs will start, once loaded.
enum Booting {
    Kernel(Guest),
    Firmware(crate::sev_snp::ovmf::OvmfImage, String),
}

impl std::fmt::Display for Booting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Booting::Kernel(guest) => write!(f, "{guest}"),
            Booting::Firmware(_, path) => write!(f, "SEV-SNP firmware {path} at 0xfffffff0"),
        }
    }
}

impl std::fmt::Display for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, entry) = match self {
            Guest::Test(entry) => ("test guest", *entry),
            Guest::Linux(boot::linux::LinuxEntry::Long64 { entry }) => ("Linux 64-bit", *entry),
            Guest::Linux(boot::linux::LinuxEntry::Pvh { entry }) => ("Linux PVH", *entry),
        };
        write!(f, "{kind} at {entry:#x}")
    }
}

enum LinuxLoad {
    Boot(boot::linux::LinuxBootError),
    Other(VmError),
}

/// Writes the ACPI tables and loads a Linux kernel (and its initramfs)
/// into guest RAM.
fn load_linux(
    config: &VmConfig,
    memory: &MemoryManager,
    kernel: &[u8],
) -> Result<boot::linux::LinuxEntry, LinuxLoad> {
    use crate::device_manager::pci_segment::{ECAM_BASE, bar_windows};
    let (mmio32, mmio64) = bar_windows(memory.ram_end());
    let tables = boot::acpi::build(&boot::acpi::Platform {
        vcpus: config.cpus.boot,
        ecam_base: ECAM_BASE,
        ecam_size: pci::ECAM_SIZE,
        mmio32,
        mmio64,
    })
    .map_err(|e| LinuxLoad::Other(VmError::Acpi(e)))?;
    tables
        .write(memory.guest_memory())
        .map_err(|e| LinuxLoad::Other(VmError::Acpi(e)))?;
    let mut initramfs = match &config.initramfs {
        Some(path) => Some(File::open(path).map_err(|source| {
            LinuxLoad::Other(VmError::Initramfs {
                path: path.display().to_string(),
                source,
            })
        })?),
        None => None,
    };
    let ram: Vec<(u64, u64)> = memory.regions().iter().map(|r| (r.gpa, r.size)).collect();
    boot::linux::load(
        memory.guest_memory(),
        kernel,
        boot::linux::LinuxBootSpec {
            cmdline: config.cmdline.as_deref().unwrap_or(""),
            initramfs: initramfs.as_mut(),
            ram: &ram,
            reserved: &[(ECAM_BASE, pci::ECAM_SIZE)],
            rsdp: tables.rsdp,
        },
    )
    .map_err(LinuxLoad::Boot)
}

/// The boot vCPU starts at the kernel's entry; the others wait for the
/// INIT / SIPI the kernel sends them through the in-kernel LAPIC.
fn setup_linux_vcpu(
    vcpu: &dyn hypervisor::Vcpu,
    index: u8,
    entry: boot::linux::LinuxEntry,
    irqchip: bool,
) -> Result<(), boot::linux::LinuxBootError> {
    boot::linux::setup_common_vcpu_state(vcpu, index)?;
    if irqchip {
        vcpu.set_lapic_lints()
            .map_err(|e| boot::linux::LinuxBootError::Vcpu(index, e))?;
    }
    if index == 0 {
        boot::linux::setup_boot_vcpu(vcpu, entry)
    } else {
        vcpu.wait_for_startup_ipi()
            .map_err(|e| boot::linux::LinuxBootError::Vcpu(index, e))
    }
}

impl Vm {
    /// Builds the VM and starts its vCPUs.
    pub fn boot(
        config: VmConfig,
        hypervisor: &dyn Hypervisor,
        events: GuestEvents,
        monitor: Arc<EventMonitor>,
        vcpu_filter: Option<seccompiler::BpfProgram>,
    ) -> Result<Vm, VmError> {
        let vm_id = events.vm;
        let kernel_path = config.kernel.display().to_string();
        let payload = match &config.firmware {
            Some(path) => {
                // The image and the launch plan are checked first: a bad
                // image fails the same way on every host.
                let image = crate::sev_snp::read_firmware(path).map_err(VmError::Firmware)?;
                if !config.platform.sev_snp {
                    return Err(VmError::Firmware(crate::sev_snp::FirmwareError::NotSevSnp));
                }
                crate::sev_snp::measure(
                    &image,
                    config.memory.size,
                    &crate::sev_snp::cpuid_page::host_minimal(),
                    crate::sev_snp::params(&config.platform, config.cpus.boot),
                )
                .map_err(|source| {
                    VmError::Firmware(crate::sev_snp::FirmwareError::Measure {
                        path: path.display().to_string(),
                        source,
                    })
                })?;
                Payload::Firmware(image, path.display().to_string())
            }
            None => Payload::Kernel(read_kernel(&config.kernel).map_err(|source| {
                VmError::ReadKernel {
                    path: kernel_path.clone(),
                    source,
                }
            })?),
        };
        if config.memory.guest_memfd && !hypervisor.capabilities().guest_memfd {
            return Err(VmError::NoGuestMemfd);
        }
        let vm_type = config.platform.vm_type();
        if !hypervisor.capabilities().supports_vm_type(vm_type) {
            let offered = hypervisor.capabilities().supported_vm_types().join(", ");
            if matches!(payload, Payload::Firmware(..)) {
                return Err(VmError::Firmware(crate::sev_snp::FirmwareError::NoSevSnp(
                    offered,
                )));
            }
            return Err(VmError::VmTypeUnavailable {
                wanted: vm_type.name(),
                offered,
            });
        }
        let hv_vm = hypervisor.create_vm(vm_type).map_err(VmError::Create)?;
        let mut memory =
            MemoryManager::new(hv_vm.clone(), config.memory.size, config.memory.layout)
                .map_err(VmError::Memory)?;
        if let Payload::Firmware(image, _) = &payload {
            memory = memory
                .with_firmware(image.gpa(), image.data().len() as u64, config.memory.layout)
                .map_err(VmError::Memory)?;
        }
        let memory = Arc::new(memory);
        let boot = match payload {
            Payload::Kernel(kernel) => Booting::Kernel(Self::load_kernel(
                &config,
                kernel_path,
                &memory,
                hv_vm.as_ref(),
                &kernel,
            )?),
            Payload::Firmware(image, path) => Booting::Firmware(image, path),
        };

        let conversions = Arc::new(ConversionPath::new(memory.clone(), monitor.clone()));
        let serial = serial_output(&config.serial)?;
        let io_bus = Arc::new(Bus::new());
        io_bus
            .insert(
                Arc::new(SerialConsole::new(serial.writer)),
                SERIAL_PORT,
                SERIAL_LEN,
            )
            .map_err(VmError::Bus)?;
        let power_events = events.clone();
        io_bus
            .insert(
                Arc::new(PowerOffPort::new(Box::new(move |code| {
                    power_events.send(GuestEvent::PowerOff(code));
                }))),
                POWER_OFF_PORT,
                1,
            )
            .map_err(VmError::Bus)?;
        io_bus
            .insert(
                Arc::new(ConversionDoorbell::new(
                    DOORBELL_BANKS as usize,
                    Arc::new(DoorbellHandler(conversions.clone())),
                )),
                DOORBELL_BASE,
                DOORBELL_BANKS * DOORBELL_BANK_SIZE,
            )
            .map_err(VmError::Bus)?;

        let mmio_bus = Arc::new(Bus::new());
        let pci = Arc::new(
            PciSegment::new(&io_bus, mmio_bus.clone(), memory.ram_end(), hv_vm.clone())
                .map_err(VmError::Pci)?,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(PauseGate::default());
        let ctx = Arc::new(VcpuContext {
            io_bus,
            mmio_bus,
            conversions: conversions.clone(),
            events,
            stop: stop.clone(),
            pause: pause.clone(),
        });
        let count = config.cpus.boot;
        let supported_cpuid = hv_vm.supported_cpuid();
        let mut launch = None;
        let created = match &boot {
            Booting::Firmware(image, path) => {
                let launched = crate::sev_snp::boot::launch_vm(
                    hypervisor,
                    hv_vm.clone(),
                    &memory,
                    image,
                    path,
                    crate::sev_snp::params(&config.platform, count),
                )
                .map_err(VmError::Firmware)?;
                // CPUID is not launch state: KVM takes it until a vCPU
                // first runs.
                for (index, vcpu) in (0..).zip(&launched.vcpus) {
                    let cpuid =
                        boot::cpuid::for_vcpu(&supported_cpuid, index, count, &config.cpus.hidden);
                    vcpu.set_cpuid(&cpuid)
                        .map_err(|e| VmError::Cpuid(index, e))?;
                }
                info!(
                    "SEV-SNP launch finished: measurement {}",
                    launched.measurement.measurement
                );
                launch = Some(launched.measurement);
                launched.vcpus
            }
            Booting::Kernel(entry) => {
                let mut created = Vec::with_capacity(count.into());
                for index in 0..count {
                    created.push(Self::kernel_vcpu(
                        &config,
                        hv_vm.as_ref(),
                        &memory,
                        &supported_cpuid,
                        index,
                        *entry,
                    )?);
                }
                created
            }
        };
        let devices = Arc::new(
            DeviceManager::new(memory.clone(), monitor.clone(), Some(pci))
                .with_vfio_platform(hv_vm.clone(), config.platform.iommufd),
        );
        let mut vm = Vm {
            id: vm_id,
            config,
            serial_pty: serial.pty,
            _serial_socket: serial.socket,
            memory,
            devices,
            monitor: monitor.clone(),
            stop,
            pause,
            vcpus: Vec::new(),
            hotplug: Vec::new(),
            state: VmState::Running,
            launch,
        };
        // Cold-plugged devices see the boot state (all private) before any
        // vCPU can convert.
        for device in vm.config.devices.clone() {
            vm.add_device(&device).map_err(VmError::Device)?;
        }
        for device in vm.config.user_devices.clone() {
            vm.add_user_device(&device).map_err(VmError::Device)?;
        }
        // Announced before any vCPU runs, so no conversion event precedes it.
        monitor.emit("vm", "booted", vm.info());
        for (index, vcpu) in created.into_iter().enumerate() {
            match vcpu::start(index as u8, vcpu, ctx.clone(), vcpu_filter.clone()) {
                Ok(handle) => vm.vcpus.push(handle),
                Err(e) => {
                    vm.shutdown();
                    return Err(VmError::VcpuThread(e));
                }
            }
        }
        info!(
            "VM running: {} vCPUs, {} bytes of {} RAM, {boot}",
            count,
            vm.config.memory.size,
            vm.memory.regions()[0].backing.name()
        );
        Ok(vm)
    }

    /// Loads a kernel: Linux (a bzImage or an ELF with a PVH note) or one
    /// of our test guests (any other ELF).
    fn load_kernel(
        config: &VmConfig,
        kernel_path: String,
        memory: &MemoryManager,
        hv_vm: &dyn hypervisor::Vm,
        kernel: &[u8],
    ) -> Result<Guest, VmError> {
        let linux = match boot::linux::format_of(kernel) {
            Some(boot::linux::KernelFormat::BzImage) => true,
            Some(boot::linux::KernelFormat::Elf) => boot::linux::has_pvh_note(kernel),
            None => false,
        };
        if !linux && config.initramfs.is_some() {
            return Err(VmError::LoadKernel {
                path: kernel_path,
                source: BootError::Elf(crate::elf::ElfError::NotLinux),
            });
        }
        if linux {
            let entry = load_linux(config, memory, kernel).map_err(|e| match e {
                LinuxLoad::Boot(source) => VmError::LinuxBoot {
                    path: kernel_path.clone(),
                    source,
                },
                LinuxLoad::Other(e) => e,
            })?;
            // KVM's PIT needs its in-kernel IOAPIC, which a split irqchip
            // (TDX) leaves to userspace.
            if hv_vm.has_irqchip() && !hv_vm.has_split_irqchip() {
                hv_vm.create_pit().map_err(VmError::Pit)?;
            }
            Ok(Guest::Linux(entry))
        } else {
            Ok(Guest::Test(
                boot::load(memory.guest_memory(), memory.ram_end(), kernel).map_err(|source| {
                    VmError::LoadKernel {
                        path: kernel_path,
                        source,
                    }
                })?,
            ))
        }
    }

    /// Creates vCPU `index` of a kernel boot, at its entry.
    fn kernel_vcpu(
        config: &VmConfig,
        hv_vm: &dyn hypervisor::Vm,
        memory: &MemoryManager,
        supported_cpuid: &[hypervisor::arch::CpuidEntry],
        index: u8,
        entry: Guest,
    ) -> Result<Box<dyn hypervisor::Vcpu>, VmError> {
        let count = config.cpus.boot;
        let vcpu = hv_vm.create_vcpu(index).map_err(VmError::Vcpu)?;
        let cpuid = boot::cpuid::for_vcpu(supported_cpuid, index, count, &config.cpus.hidden);
        vcpu.set_cpuid(&cpuid)
            .map_err(|e| VmError::Cpuid(index, e))?;
        match entry {
            Guest::Test(entry) => {
                boot::setup_vcpu(vcpu.as_ref(), index, count, entry, memory.low_ram_size())
                    .map_err(VmError::VcpuSetup)?;
            }
            Guest::Linux(entry) => {
                setup_linux_vcpu(vcpu.as_ref(), index, entry, hv_vm.has_irqchip()).map_err(
                    |source| VmError::LinuxBoot {
                        path: config.kernel.display().to_string(),
                        source,
                    },
                )?;
            }
        }
        Ok(vcpu)
    }

    /// Stops every vCPU, then detaches every device so each unmaps what it
    /// had, then waits for hot-plug operations in flight (which can no
    /// longer attach anything). Idempotent.
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
        device_ops::add_device(&self.devices, &self.monitor, config)
    }

    pub fn add_user_device(&self, config: &UserDeviceConfig) -> Result<DeviceInfo, DeviceError> {
        device_ops::add_user_device(&self.devices, &self.monitor, config)
    }

    pub fn remove_device(&self, id: &str) -> Result<DeviceInfo, DeviceError> {
        device_ops::remove_device(&self.devices, &self.monitor, id)
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

    /// What the SEV-SNP launch measured (firmware boots only).
    pub fn launch_measurement(&self) -> Option<&crate::sev_snp::Measurement> {
        self.launch.as_ref()
    }

    pub fn memory(&self) -> &Arc<MemoryManager> {
        &self.memory
    }

    /// Cloud Hypervisor's shape: a map of counter groups, each a map of
    /// integers. `memory` holds the totals, `memory_region<N>` each
    /// guest_memfd region's, and every device its DMA mapping counters
    /// under its id.
    pub fn counters(&self) -> serde_json::Value {
        let mut groups = serde_json::Map::new();
        let totals = self.memory.conversion_totals();
        let mut memory = conversion_counters(&totals);
        memory.insert("events_dropped".into(), self.monitor.dropped().into());
        memory.insert(
            "unbacked_to_shared".into(),
            self.memory.unbacked_to_shared().into(),
        );
        groups.insert("memory".into(), memory.into());
        for (index, region) in self.memory.regions().iter().enumerate() {
            if let Some(attrs) = &region.attributes {
                let mut group = conversion_counters(&attrs.counters());
                group.insert("gpa".into(), region.gpa.into());
                group.insert("size".into(), region.size.into());
                groups.insert(format!("memory_region{index}"), group.into());
            }
        }
        for device in self.devices.info() {
            let dma = serde_json::to_value(device.dma).expect("plain counters");
            groups.insert(device.id, dma);
        }
        groups.into()
    }

    /// Cloud Hypervisor's `VmInfo` fields (`config`, `state`,
    /// `memory_actual_size`, `device_tree`) and ours.
    pub fn info(&self) -> serde_json::Value {
        let devices = self.devices.info();
        // Cloud Hypervisor's device tree: one node per device, keyed by id;
        // here every device is a PCI function (or a DMA target) on its own.
        let device_tree: serde_json::Map<String, serde_json::Value> = devices
            .iter()
            .map(|d| {
                (
                    d.id.clone(),
                    json!({
                        "id": d.id,
                        "resources": [],
                        "parent": null,
                        "children": [],
                        "pci_bdf": d.bdf,
                    }),
                )
            })
            .collect();
        let mut config = json!(self.config);
        if let Some(pty) = &self.serial_pty {
            // As Cloud Hypervisor reports a pty: its path as the file.
            config["serial"]["file"] = json!(pty);
        }
        let mut info = json!({
            "config": config,
            "state": self.state,
            "memory_actual_size": self.config.memory.size,
            "device_tree": device_tree,
            "vm_type": self.config.platform.vm_type().name(),
            "memory_attributes": self.memory.tracks_attributes(),
            "memory": {
                "regions": self.memory.region_info(),
                "layout": self.memory.regions()[0].backing.name(),
            },
            "devices": devices,
        });
        if let Some(launch) = &self.launch {
            info["launch"] = launch.info();
        }
        if let Some(firmware) = self.memory.firmware() {
            info["memory"]["firmware"] = json!({
                "gpa": firmware.gpa,
                "size": firmware.size,
                "backing": firmware.backing.name(),
            });
        }
        info
    }
}

/// Device hot-plug with its events, callable from any thread.
pub mod device_ops {
    use super::*;

    pub fn add_device(
        devices: &DeviceManager,
        monitor: &EventMonitor,
        config: &DeviceConfig,
    ) -> Result<DeviceInfo, DeviceError> {
        let info = devices.add_vfio(config)?;
        monitor.emit("device", "added", json!(info));
        Ok(info)
    }

    pub fn add_user_device(
        devices: &DeviceManager,
        monitor: &EventMonitor,
        config: &UserDeviceConfig,
    ) -> Result<DeviceInfo, DeviceError> {
        let info = devices.add_vfio_user(config)?;
        monitor.emit("device", "added", json!(info));
        Ok(info)
    }

    pub fn remove_device(
        devices: &DeviceManager,
        monitor: &EventMonitor,
        id: &str,
    ) -> Result<DeviceInfo, DeviceError> {
        let info = devices.remove(id)?;
        monitor.emit("device", "removed", json!(info));
        Ok(info)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serial_file_may_not_be_a_kernel_pseudo_file() {
        for pseudo in [
            "/proc/self/comm",
            "/sys/kernel/mm/transparent_hugepage/enabled",
        ] {
            let before = std::fs::read_to_string(pseudo).ok();
            let Err(err) = serial_file(std::path::Path::new(pseudo)) else {
                panic!("{pseudo} accepted as the serial console");
            };
            assert!(
                crate::error_chain(&err).contains("procfs or sysfs"),
                "{pseudo}: {err}"
            );
            assert_eq!(
                std::fs::read_to_string(pseudo).ok(),
                before,
                "{pseudo} changed"
            );
        }
        // An ordinary file is emptied, as before.
        let path = crate::test_util::scratch_path("serial-file");
        std::fs::write(&path, "old output").unwrap();
        drop(serial_file(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        let _ = std::fs::remove_file(&path);
    }
}
