// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! `cloud-hypervisor`: boots a VM from the command line.

mod logger;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser};
use vmm::api::http::ApiSocket;
use vmm::config::{
    API_SOCKET_SYNTAX, ConsoleOutput, CpusConfig, DeviceConfig, EventMonitorConfig, MemoryConfig,
    PlatformConfig, UserDeviceConfig, VmConfig, parse_api_socket,
};
use vmm::seccomp_filters::SeccompMode;
use vmm::{VmmOptions, error_chain};

/// Options sorted by name, as Cloud Hypervisor keeps them (a test checks).
#[derive(Parser, Debug)]
#[command(
    name = "cloud-hypervisor",
    version,
    // The value syntaxes are wider than any terminal: descriptions go
    // under their option, or clap squeezes them into a one-word column.
    next_line_help = true,
    about = "A VMM for guest_memfd (confidential) VMs with shared device assignment"
)]
struct Cli {
    /// Serve the REST API: a socket path (`PATH` or `path=PATH`) or an
    /// inherited listening socket (`fd=N`). Without --kernel the VMM starts
    /// empty and waits for vm.create.
    #[arg(long, value_name = API_SOCKET_SYNTAX, value_parser = parse_api_socket)]
    api_socket: Option<ApiSocket>,
    /// Print what this host's KVM supports as JSON and exit.
    #[arg(long)]
    capabilities: bool,
    /// Kernel command line for a Linux kernel (our ELF test guests take
    /// none; shown in vm.info either way).
    #[arg(long, value_name = "TEXT")]
    cmdline: Option<String>,
    /// Accepted for Cloud Hypervisor's command lines: there is no
    /// virtio-console, the serial port is the console.
    #[arg(long, value_name = "off|null|tty", value_parser = ["off", "null", "tty"])]
    console: Option<String>,
    /// vCPUs [default: boot=1].
    #[arg(long, value_name = CpusConfig::SYNTAX, value_parser = CpusConfig::parse)]
    cpus: Option<CpusConfig>,
    /// A VFIO device to assign (repeatable). Its IOMMU maps only shared pages.
    #[arg(long, value_name = DeviceConfig::SYNTAX, value_parser = DeviceConfig::parse)]
    device: Vec<DeviceConfig>,
    /// Write one JSON event per line here.
    #[arg(long, value_name = EventMonitorConfig::SYNTAX, value_parser = EventMonitorConfig::parse)]
    event_monitor: Option<EventMonitorConfig>,
    /// Firmware: an OVMF image, loaded so that it ends at 4 GiB, for an
    /// SEV-SNP guest (`--platform sev_snp=on`) or a TDX guest (`--platform
    /// tdx=on`, a TDVF build); see --measure.
    #[arg(long, value_name = "FILE")]
    firmware: Option<PathBuf>,
    /// Initramfs for a Linux kernel.
    #[arg(long, value_name = "FILE")]
    initramfs: Option<PathBuf>,
    /// Guest kernel: a Linux bzImage, a Linux ELF vmlinux with a PVH note,
    /// or one of our ELF64 test guests (linked between 1 MiB and 4 MiB).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Log to this file instead of stderr.
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Print the launch measurement of --firmware (SEV-SNP: the launch
    /// digest; TDX: MRTD) with --cpus, --memory and --platform as one JSON
    /// object, and exit without creating a VM (on any host).
    #[arg(long)]
    measure: bool,
    /// Guest memory [default: size=512M].
    #[arg(long, value_name = MemoryConfig::SYNTAX, value_parser = MemoryConfig::parse)]
    memory: Option<MemoryConfig>,
    /// The VM type: `tdx=on`, `sev_snp=on` or `sw_protected=on` ask for a
    /// confidential VM (RAM in guest_memfd); the default VM otherwise.
    /// `iommufd=on` maps VFIO devices' DMA through iommufd.
    #[arg(long, value_name = PlatformConfig::SYNTAX, value_parser = PlatformConfig::parse)]
    platform: Option<PlatformConfig>,
    /// Seccomp filters on every VMM thread: `false` disables them for
    /// debugging, `log` lets the kernel log violations instead of stopping
    /// the VMM.
    #[arg(long, value_name = SeccompMode::SYNTAX, default_value = "true",
          value_parser = SeccompMode::parse)]
    seccomp: SeccompMode,
    /// Where the serial console goes [default: tty: it is the only console].
    #[arg(long, value_name = ConsoleOutput::SYNTAX, value_parser = ConsoleOutput::parse)]
    serial: Option<ConsoleOutput>,
    /// A vfio-user device server to connect (repeatable). It is given only
    /// shared pages to map.
    #[arg(long, value_name = UserDeviceConfig::SYNTAX, value_parser = UserDeviceConfig::parse)]
    user_device: Vec<UserDeviceConfig>,
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short = 'v', action = ArgAction::Count)]
    verbosity: u8,
}

/// Cloud Hypervisor options that change nothing here: accepted (with their
/// value, if they take one) and logged.
const WITHOUT_EFFECT: &[(&str, bool)] = &[("rng", true), ("watchdog", false), ("pvpanic", false)];

/// Cloud Hypervisor options for what this VMM does not have: refused by
/// name rather than as an unknown argument, so a command line written for
/// Cloud Hypervisor fails with the reason.
const NOT_SUPPORTED: &[&str] = &[
    "balloon",
    "dbus-object-path",
    "dbus-service-name",
    "dbus-system-bus",
    "debug-console",
    "disk",
    "fs",
    "fw-cfg-config",
    "gdb",
    "generic-vhost-user",
    "host-data",
    "igvm",
    "ivshmem",
    "landlock",
    "landlock-rules",
    "memory-zone",
    "net",
    "numa",
    "pci-segment",
    "pmem",
    "pvmemcontrol",
    "rate-limit-group",
    "restore",
    "tpm",
    "vdpa",
    "vsock",
];

/// Takes Cloud Hypervisor's options this VMM has no use for out of `args`
/// (returning their names) or names the first one it cannot honour.
fn screen_cloud_hypervisor_options(
    args: Vec<String>,
) -> Result<(Vec<String>, Vec<String>), CliError> {
    let mut kept = Vec::with_capacity(args.len());
    let mut ignored = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(name) = arg.strip_prefix("--") else {
            kept.push(arg);
            continue;
        };
        let (name, inline_value) = match name.split_once('=') {
            Some((name, _)) => (name, true),
            None => (name, false),
        };
        if let Some(&(_, takes_value)) = WITHOUT_EFFECT.iter().find(|(n, _)| *n == name) {
            ignored.push(format!("--{name}"));
            if takes_value && !inline_value {
                args.next();
            }
        } else if NOT_SUPPORTED.contains(&name) {
            return Err(CliError::NotSupported(name.to_string()));
        } else {
            kept.push(arg);
        }
    }
    Ok((kept, ignored))
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("--{0} is not supported by this VMM (docs/cloud-hypervisor-differences.md)")]
    NotSupported(String),
    #[error("nothing to run: give --kernel, or --api-socket to wait for vm.create")]
    NothingToRun,
    #[error("{0} configures a VM, which needs --kernel (or use vm.create over the API)")]
    NeedsKernel(&'static str),
    #[error("--measure measures a firmware launch: give --firmware")]
    MeasureNeedsFirmware,
    #[error("--firmware boots a confidential guest: give --platform sev_snp=on or tdx=on")]
    FirmwareNeedsConfidential,
    #[error("give --kernel or --firmware, not both")]
    KernelAndFirmware,
    #[error("{0} does not apply to a firmware launch")]
    NotWithFirmware(&'static str),
}

/// The firmware launch of the command line: `--measure` prints its
/// measurement and returns `None`; otherwise the VM to boot.
fn firmware_launch(cli: &Cli) -> Result<Option<VmConfig>, String> {
    let firmware = cli
        .firmware
        .as_ref()
        .ok_or_else(|| CliError::MeasureNeedsFirmware.to_string())?;
    let platform = cli.platform.unwrap_or_default();
    if !platform.sev_snp && !platform.tdx {
        return Err(CliError::FirmwareNeedsConfidential.to_string());
    }
    if cli.kernel.is_some() {
        return Err(CliError::KernelAndFirmware.to_string());
    }
    // Devices are cold-plugged as for a kernel boot: the PCI segment, its
    // BAR windows (which the TD HOB describes as MMIO) and the devices'
    // DMA listeners do not depend on what the vCPUs start.
    for (option, given) in [
        ("--initramfs", cli.initramfs.is_some()),
        ("--cmdline", cli.cmdline.is_some()),
    ] {
        if given {
            return Err(CliError::NotWithFirmware(option).to_string());
        }
    }
    let memory = cli
        .memory
        .clone()
        .unwrap_or_else(|| MemoryConfig::parse("size=512M").expect("valid default"));
    let cpus = cli.cpus.clone().unwrap_or_default();
    if cli.measure {
        if cli.api_socket.is_some() {
            return Err(CliError::NotWithFirmware("--api-socket").to_string());
        }
        let json = if platform.tdx {
            vmm::tdx::measure_firmware(firmware, memory.size, cpus.boot)
                .map_err(|e| error_chain(&e))?
                .to_json()
        } else {
            vmm::sev_snp::measure_firmware(firmware, memory.size, &platform, cpus.boot)
                .map_err(|e| error_chain(&e))?
                .to_json()
        };
        println!("{json}");
        return Ok(None);
    }
    // Either platform boots through the VM build, which launches the
    // firmware (or says why this host cannot).
    Ok(Some(
        VmConfig {
            kernel: PathBuf::new(),
            firmware: Some(firmware.clone()),
            cmdline: None,
            initramfs: None,
            memory,
            platform,
            cpus,
            serial: cli.serial.clone().unwrap_or(ConsoleOutput::Tty),
            devices: cli.device.clone(),
            user_devices: cli.user_device.clone(),
        }
        .normalized(),
    ))
}

/// The VM the command line describes, if any.
fn vm_config(cli: &Cli) -> Result<Option<VmConfig>, CliError> {
    let Some(kernel) = cli.kernel.clone() else {
        let given = [
            ("--cmdline", cli.cmdline.is_some()),
            ("--cpus", cli.cpus.is_some()),
            ("--device", !cli.device.is_empty()),
            ("--initramfs", cli.initramfs.is_some()),
            ("--memory", cli.memory.is_some()),
            ("--platform", cli.platform.is_some()),
            ("--serial", cli.serial.is_some()),
            ("--user-device", !cli.user_device.is_empty()),
        ];
        if let Some((option, _)) = given.iter().find(|(_, given)| *given) {
            return Err(CliError::NeedsKernel(option));
        }
        if cli.api_socket.is_none() {
            return Err(CliError::NothingToRun);
        }
        return Ok(None);
    };
    let config = VmConfig {
        kernel,
        firmware: None,
        cmdline: cli.cmdline.clone(),
        initramfs: cli.initramfs.clone(),
        memory: cli
            .memory
            .clone()
            .unwrap_or_else(|| MemoryConfig::parse("size=512M").expect("valid default")),
        platform: cli.platform.unwrap_or_default(),
        cpus: cli.cpus.clone().unwrap_or_default(),
        serial: cli.serial.clone().unwrap_or(ConsoleOutput::Tty),
        devices: cli.device.clone(),
        user_devices: cli.user_device.clone(),
    };
    Ok(Some(config.normalized()))
}

fn main() -> ExitCode {
    let (args, ignored) = match screen_cloud_hypervisor_options(std::env::args().collect()) {
        Ok(screened) => screened,
        Err(e) => {
            eprintln!("cloud-hypervisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = Cli::parse_from(args);
    if let Err(e) = logger::init(cli.verbosity, cli.log_file.as_deref(), cli.seccomp) {
        eprintln!("cloud-hypervisor: {}", error_chain(&e));
        return ExitCode::FAILURE;
    }
    if cli.capabilities {
        return match hypervisor::KvmHypervisor::new() {
            Ok(hv) => {
                use hypervisor::Hypervisor;
                println!("{}", hv.capabilities().to_json_like());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cloud-hypervisor: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    let vm = if cli.measure || cli.firmware.is_some() {
        match firmware_launch(&cli) {
            Ok(Some(vm)) => Ok(Some(vm)),
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cloud-hypervisor: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        vm_config(&cli)
    };
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("cloud-hypervisor: {e}");
            return ExitCode::FAILURE;
        }
    };
    for option in ignored {
        log::info!("{option}: has no effect here (no such device); ignored");
    }
    if cli.console.as_deref() == Some("tty") {
        log::info!("--console tty: there is no virtio-console; the serial port is the console");
    }
    let options = VmmOptions {
        vm,
        api_socket: cli.api_socket,
        event_monitor: cli.event_monitor,
        seccomp: cli.seccomp,
    };
    let result = vmm::run(options);
    // Queued log lines reach the sink before the process goes.
    log::logger().flush();
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("cloud-hypervisor: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cloud_hypervisor_options_without_use_here_are_screened() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (kept, ignored) = screen_cloud_hypervisor_options(args(&[
            "cloud-hypervisor",
            "--rng",
            "src=/dev/urandom",
            "--kernel",
            "/k",
            "--watchdog",
            "--rng=src=/dev/hwrng",
            "--pvpanic",
            "-v",
        ]))
        .unwrap();
        assert_eq!(kept, args(&["cloud-hypervisor", "--kernel", "/k", "-v"]));
        assert_eq!(ignored, ["--rng", "--watchdog", "--rng", "--pvpanic"]);
        for refused in ["--disk", "--net=tap=t0", "--igvm", "--landlock"] {
            match screen_cloud_hypervisor_options(args(&["cloud-hypervisor", refused, "x"])) {
                Err(CliError::NotSupported(name)) => {
                    assert!(refused.starts_with(&format!("--{name}")))
                }
                other => panic!("{refused}: {other:?}"),
            }
        }
        // The lists do not shadow options of ours.
        let ours: Vec<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_string))
            .collect();
        for name in NOT_SUPPORTED
            .iter()
            .chain(WITHOUT_EFFECT.iter().map(|(n, _)| n))
        {
            assert!(!ours.iter().any(|o| o == name), "{name}");
        }
    }

    #[test]
    fn options_are_sorted_by_name() {
        let names: Vec<String> = Cli::command()
            .get_arguments()
            .map(|a| {
                a.get_long()
                    .map(str::to_string)
                    .or_else(|| a.get_short().map(|c| c.to_string()))
                    .unwrap_or_default()
            })
            .filter(|n| n != "help" && n != "version")
            .collect();
        let mut sorted = names.clone();
        sorted.sort_by_key(|n| n.to_ascii_lowercase());
        assert_eq!(names, sorted);
    }

    #[test]
    fn cloud_hypervisor_command_lines_parse() {
        let cli = Cli::try_parse_from([
            "cloud-hypervisor",
            "--api-socket",
            "path=/tmp/ch.sock",
            "--kernel",
            "/k.elf",
            "--cmdline",
            "console=ttyS0 root=/dev/vda1",
            "--console",
            "off",
            "--cpus",
            "boot=2,max=4",
            "--memory",
            "size=1G,shared=on,hugepages=off",
            "--serial",
            "null",
        ])
        .unwrap();
        assert_eq!(cli.api_socket, Some(ApiSocket::Path("/tmp/ch.sock".into())));
        let vm = vm_config(&cli).unwrap().unwrap();
        assert_eq!(vm.cpus.boot, 2);
        assert_eq!(vm.memory.size, 1 << 30);
        assert_eq!(vm.serial, ConsoleOutput::Off);
        assert_eq!(vm.cmdline.as_deref(), Some("console=ttyS0 root=/dev/vda1"));

        let empty = Cli::try_parse_from(["cloud-hypervisor", "--api-socket", "fd=5"]).unwrap();
        assert_eq!(empty.api_socket, Some(ApiSocket::Fd(5)));
        assert!(vm_config(&empty).unwrap().is_none(), "an empty VMM");

        let nothing = Cli::try_parse_from(["cloud-hypervisor"]).unwrap();
        assert!(matches!(vm_config(&nothing), Err(CliError::NothingToRun)));
        let half = Cli::try_parse_from(["cloud-hypervisor", "--memory", "size=1G"]).unwrap();
        assert!(matches!(
            vm_config(&half),
            Err(CliError::NeedsKernel("--memory"))
        ));
        for refused in [
            ["--memory", "size=1G,hugepages=on"],
            ["--serial", "vga"],
            ["--serial", "socket="],
            ["--cpus", "boot=4,max=2"],
            ["--api-socket", "fd=1"],
        ] {
            let mut args = vec!["cloud-hypervisor", "--kernel", "/k"];
            args.extend(refused);
            assert!(Cli::try_parse_from(&args).is_err(), "{refused:?}");
        }
    }
}
