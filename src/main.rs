// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! `cloud-hypervisor`: boots a VM from the command line.

mod logger;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgAction, Parser};
use vmm::config::{
    ConsoleOutput, CpusConfig, DeviceConfig, EventMonitorConfig, MemoryConfig, PlatformConfig,
    UserDeviceConfig, VmConfig,
};
use vmm::seccomp_filters::SeccompMode;
use vmm::{VmmOptions, error_chain};

#[derive(Parser, Debug)]
#[command(
    name = "cloud-hypervisor",
    version,
    about = "A VMM for guest_memfd (confidential) VMs with shared device assignment"
)]
struct Cli {
    /// Guest kernel: an ELF64 image linked between 1 MiB and 4 MiB.
    #[arg(long, value_name = "FILE", required_unless_present = "capabilities")]
    kernel: Option<PathBuf>,
    /// Guest memory.
    #[arg(long, value_name = MemoryConfig::SYNTAX, default_value = "size=512M",
          value_parser = MemoryConfig::parse)]
    memory: MemoryConfig,
    /// The VM type: `tdx=on`, `sev_snp=on` or `sw_protected=on` ask for a
    /// confidential VM (RAM in guest_memfd); the default VM otherwise.
    #[arg(long, value_name = PlatformConfig::SYNTAX, default_value = "",
          value_parser = PlatformConfig::parse)]
    platform: PlatformConfig,
    /// vCPUs.
    #[arg(long, value_name = CpusConfig::SYNTAX, default_value = "boot=1",
          value_parser = CpusConfig::parse)]
    cpus: CpusConfig,
    /// Where the serial console goes.
    #[arg(long, value_name = ConsoleOutput::SYNTAX, default_value = "tty",
          value_parser = ConsoleOutput::parse)]
    serial: ConsoleOutput,
    /// A VFIO device to assign (repeatable). Its IOMMU maps only shared pages.
    #[arg(long, value_name = DeviceConfig::SYNTAX, value_parser = DeviceConfig::parse)]
    device: Vec<DeviceConfig>,
    /// A vfio-user device server to connect (repeatable). It is given only
    /// shared pages to map.
    #[arg(long, value_name = UserDeviceConfig::SYNTAX, value_parser = UserDeviceConfig::parse)]
    user_device: Vec<UserDeviceConfig>,
    /// Serve the REST API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Write one JSON event per line here.
    #[arg(long, value_name = EventMonitorConfig::SYNTAX, value_parser = EventMonitorConfig::parse)]
    event_monitor: Option<EventMonitorConfig>,
    /// Log to this file instead of stderr.
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace).
    #[arg(short = 'v', action = ArgAction::Count)]
    verbosity: u8,
    /// Seccomp filters on every VMM thread: `false` disables them for
    /// debugging, `log` lets the kernel log violations instead of stopping
    /// the VMM.
    #[arg(long, value_name = SeccompMode::SYNTAX, default_value = "true",
          value_parser = SeccompMode::parse)]
    seccomp: SeccompMode,
    /// Print what this host's KVM supports as JSON and exit.
    #[arg(long)]
    capabilities: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let mut memory = cli.memory;
    if cli.platform.is_confidential() && !memory.guest_memfd {
        // A confidential VM's RAM is guest_memfd RAM.
        memory.guest_memfd = true;
        memory.layout = vmm::memory::MemoryLayout::Auto;
    }
    let options = VmmOptions {
        vm: VmConfig {
            kernel: cli.kernel.expect("clap requires --kernel"),
            memory,
            platform: cli.platform,
            cpus: cli.cpus,
            serial: cli.serial,
            devices: cli.device,
            user_devices: cli.user_device,
        },
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
