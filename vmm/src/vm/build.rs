//! Building a VM: read the payload, check the host, create memory, load
//! the guest, build the buses and the vCPUs.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use devices::layout::*;
use devices::{ConversionDoorbell, PowerOffPort, SerialConsole};
use hypervisor::Hypervisor;
use log::info;
use vm_device::Bus;

use super::firmware::{self, Firmware};
use super::serial::serial_output;
use super::{LaunchMeasurement, MAX_KERNEL_FILE, Vm, VmError, VmState};
use crate::boot::{self, BootError};
use crate::config::VmConfig;
use crate::conversion_path::{ConversionPath, DoorbellHandler};
use crate::device_manager::DeviceManager;
use crate::device_manager::pci_segment::PciSegment;
use crate::event_monitor::EventMonitor;
use crate::memory::MemoryManager;
use crate::tdx::split_irqchip::SplitIoapic;
use crate::vcpu::{self, PauseGate, VcpuContext};
use crate::{GuestEvent, GuestEvents};

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
    let mut image = Vec::with_capacity(::arch::usize_from(meta.len()));
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
    /// OVMF launched as a confidential guest (from the reset vector).
    Firmware(Firmware),
}

/// What the vCPUs will start, once loaded.
enum Booting {
    Kernel(Guest),
    Firmware(Firmware),
}

impl std::fmt::Display for Booting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Booting::Kernel(guest) => write!(f, "{guest}"),
            Booting::Firmware(firmware) => write!(f, "{firmware}"),
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

/// Reads what the configuration boots. A firmware image and its launch plan
/// are checked first: a bad image fails the same way on every host.
fn read_payload(config: &VmConfig) -> Result<Payload, VmError> {
    match &config.firmware {
        Some(path) => Ok(Payload::Firmware(firmware::read(config, path)?)),
        None => Ok(Payload::Kernel(read_kernel(&config.kernel).map_err(
            |source| VmError::ReadKernel {
                path: config.kernel.display().to_string(),
                source,
            },
        )?)),
    }
}

/// The VM type the configuration asks for, if this host offers it (and
/// guest_memfd where the memory needs it).
fn check_host(
    config: &VmConfig,
    hypervisor: &dyn Hypervisor,
    payload: &Payload,
) -> Result<hypervisor::VmType, VmError> {
    if config.memory.guest_memfd && !hypervisor.capabilities().guest_memfd {
        return Err(VmError::NoGuestMemfd);
    }
    let vm_type = config.platform.vm_type();
    if !hypervisor.capabilities().supports_vm_type(vm_type) {
        let offered = hypervisor.capabilities().supported_vm_types().join(", ");
        if let Payload::Firmware(firmware) = payload {
            return Err(firmware::unavailable(firmware.platform, vm_type, offered));
        }
        return Err(VmError::VmTypeUnavailable {
            wanted: vm_type.name(),
            offered,
        });
    }
    Ok(vm_type)
}

/// Guest RAM, and the firmware's flash window for a firmware boot.
fn create_memory(
    config: &VmConfig,
    hv_vm: &Arc<dyn hypervisor::Vm>,
    payload: &Payload,
) -> Result<Arc<MemoryManager>, VmError> {
    let mut memory = MemoryManager::new(hv_vm.clone(), config.memory.size, config.memory.layout)
        .map_err(VmError::Memory)?;
    if let Payload::Firmware(Firmware { image, .. }) = payload {
        memory = memory
            .with_firmware(image.gpa(), image.data().len() as u64, config.memory.layout)
            .map_err(VmError::Memory)?;
    }
    Ok(Arc::new(memory))
}

/// The port I/O bus: serial console, power-off port and conversion
/// doorbell.
fn io_bus(
    serial: Box<dyn std::io::Write + Send>,
    events: &GuestEvents,
    conversions: &Arc<ConversionPath>,
) -> Result<Arc<Bus>, VmError> {
    let io_bus = Arc::new(Bus::new());
    io_bus
        .insert(
            Arc::new(SerialConsole::new(serial)),
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
                ::arch::usize_from(DOORBELL_BANKS),
                Arc::new(DoorbellHandler(conversions.clone())),
            )),
            DOORBELL_BASE,
            DOORBELL_BANKS * DOORBELL_BANK_SIZE,
        )
        .map_err(VmError::Bus)?;
    Ok(io_bus)
}

/// The userspace IOAPIC of a split irqchip (a TD's), on the MMIO bus at
/// the IOAPIC's address; none for VMs with KVM's whole irqchip.
pub(super) fn split_irqchip_ioapic(
    hv_vm: &Arc<dyn hypervisor::Vm>,
    mmio_bus: &Bus,
    pci: &PciSegment,
) -> Result<Option<Arc<SplitIoapic>>, VmError> {
    if !hv_vm.has_split_irqchip() {
        return Ok(None);
    }
    let ioapic = Arc::new(SplitIoapic::for_vm(
        hv_vm.clone(),
        pci.msi_router().cloned(),
    ));
    mmio_bus
        .insert(
            ioapic.clone(),
            ::arch::layout::IOAPIC_START,
            ::arch::layout::PAGE_SIZE,
        )
        .map_err(VmError::Bus)?;
    Ok(Some(ioapic))
}

/// The vCPUs of a boot, and the launch measurement of a firmware boot.
type CreatedVcpus = (Vec<Box<dyn hypervisor::Vcpu>>, Option<LaunchMeasurement>);

/// The vCPUs, set up to start the guest: launched with the firmware
/// (SEV-SNP or TDX, which also yields the launch measurement) or each at
/// the kernel's entry.
fn create_vcpus(
    config: &VmConfig,
    hypervisor: &dyn Hypervisor,
    hv_vm: &Arc<dyn hypervisor::Vm>,
    memory: &MemoryManager,
    boot: &Booting,
) -> Result<CreatedVcpus, VmError> {
    let count = config.cpus.boot;
    match boot {
        Booting::Firmware(fw) => {
            let (vcpus, measurement) = firmware::launch(config, hypervisor, hv_vm, memory, fw)?;
            Ok((vcpus, Some(measurement)))
        }
        Booting::Kernel(entry) => {
            let supported_cpuid = hv_vm.supported_cpuid();
            let mut created = Vec::with_capacity(count.into());
            for index in 0..count {
                created.push(Vm::kernel_vcpu(
                    config,
                    hv_vm.as_ref(),
                    memory,
                    &supported_cpuid,
                    index,
                    *entry,
                )?);
            }
            Ok((created, None))
        }
    }
}

impl Vm {
    /// Builds the VM and starts its vCPUs, in named steps: read the payload,
    /// check the host, create the memory and load the guest, build the buses
    /// and the vCPUs, cold-plug the devices, announce the VM, start the
    /// vCPUs.
    pub fn boot(
        config: VmConfig,
        hypervisor: &dyn Hypervisor,
        events: GuestEvents,
        monitor: Arc<EventMonitor>,
        vcpu_filter: Option<seccompiler::BpfProgram>,
    ) -> Result<Vm, VmError> {
        let vm_id = events.vm;
        let payload = read_payload(&config)?;
        let vm_type = check_host(&config, hypervisor, &payload)?;
        let hv_vm = hypervisor.create_vm(vm_type).map_err(VmError::Create)?;
        let memory = create_memory(&config, &hv_vm, &payload)?;
        let boot = match payload {
            Payload::Kernel(kernel) => Booting::Kernel(Self::load_kernel(
                &config,
                config.kernel.display().to_string(),
                &memory,
                hv_vm.as_ref(),
                &kernel,
            )?),
            Payload::Firmware(firmware) => Booting::Firmware(firmware),
        };

        let conversions = Arc::new(ConversionPath::new(memory.clone(), monitor.clone()));
        let serial = serial_output(&config.serial)?;
        let io_bus = io_bus(serial.writer, &events, &conversions)?;
        let mmio_bus = Arc::new(Bus::new());
        let pci = Arc::new(
            PciSegment::new(&io_bus, mmio_bus.clone(), memory.ram_end(), hv_vm.clone())
                .map_err(VmError::Pci)?,
        );
        let ioapic = split_irqchip_ioapic(&hv_vm, &mmio_bus, &pci)?;
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(PauseGate::default());
        let ctx = Arc::new(VcpuContext {
            io_bus,
            mmio_bus,
            conversions,
            events,
            stop: stop.clone(),
            pause: pause.clone(),
            ioapic,
        });
        let (created, launch) = create_vcpus(&config, hypervisor, &hv_vm, &memory, &boot)?;
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
        vm.cold_plug()?;
        // Announced before any vCPU runs, so no conversion event precedes it.
        monitor.emit("vm", "booted", vm.info());
        vm.start_vcpus(created, &ctx, &vcpu_filter)?;
        info!(
            "VM running: {} vCPUs, {} bytes of {} RAM, {boot}",
            vm.config.cpus.boot,
            vm.config.memory.size,
            vm.memory.regions()[0].backing.name()
        );
        Ok(vm)
    }

    /// Cold-plugged devices see the boot state (all private) before any
    /// vCPU can convert.
    fn cold_plug(&mut self) -> Result<(), VmError> {
        for device in self.config.devices.clone() {
            self.add_device(&device).map_err(VmError::Device)?;
        }
        for device in self.config.user_devices.clone() {
            self.add_user_device(&device).map_err(VmError::Device)?;
        }
        Ok(())
    }

    /// Starts one thread per vCPU; if one cannot start, the VM is shut down.
    fn start_vcpus(
        &mut self,
        created: Vec<Box<dyn hypervisor::Vcpu>>,
        ctx: &Arc<VcpuContext>,
        vcpu_filter: &Option<seccompiler::BpfProgram>,
    ) -> Result<(), VmError> {
        for (index, vcpu) in (0u8..).zip(created) {
            match vcpu::start(index, vcpu, ctx.clone(), vcpu_filter.clone()) {
                Ok(handle) => self.vcpus.push(handle),
                Err(e) => {
                    self.shutdown();
                    return Err(VmError::VcpuThread(e));
                }
            }
        }
        Ok(())
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
}
