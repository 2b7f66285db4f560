//! What the real-KVM benches share: a quiet memconv guest that powers off
//! when done, booted in this process and timed from boot to power-off.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use hypervisor::KvmHypervisor;
use test_guest::{MemconvOptions, Op, memconv_elf};
use vmm::config::{ConsoleOutput, CpusConfig, MemoryConfig, UserDeviceConfig, VmConfig};
use vmm::event_monitor::EventMonitor;
use vmm::memory::MemoryLayout;
use vmm::vm::Vm;
use vmm::{GuestEvent, GuestEvents, VmmEvent};

/// A 1-vCPU VM with 64 MiB of guest_memfd RAM running `ops` quietly (only
/// the summary line) and powering off; the guest is written into `dir`.
pub fn quiet_guest(
    dir: &Path,
    ops: Vec<Op>,
    serial: ConsoleOutput,
    user_devices: Vec<UserDeviceConfig>,
) -> VmConfig {
    let kernel: PathBuf = dir.join("guest.elf");
    let options = MemconvOptions {
        poweroff: true,
        quiet: true,
    };
    std::fs::write(&kernel, memconv_elf(&[ops], options)).expect("write guest");
    VmConfig {
        kernel,
        firmware: None,
        cmdline: None,
        initramfs: None,
        memory: MemoryConfig {
            size: 64 << 20,
            guest_memfd: true,
            layout: MemoryLayout::Auto,
        },
        platform: Default::default(),
        cpus: CpusConfig::default(),
        serial,
        devices: Vec::new(),
        user_devices,
    }
}

/// Boots `config` and returns the time until the guest powers off (the VM
/// is shut down after, untimed); a guest still running after `patience`
/// fails the bench.
pub fn time_to_poweroff(
    hypervisor: &KvmHypervisor,
    config: VmConfig,
    monitor: Arc<EventMonitor>,
    vcpu_filter: Option<seccompiler::BpfProgram>,
    patience: Duration,
) -> Duration {
    let (events, guest) = channel();
    let started = Instant::now();
    let events = GuestEvents { vm: 1, tx: events };
    let mut vm = Vm::boot(config, hypervisor, events, monitor, vcpu_filter).expect("boot");
    loop {
        match guest.recv_timeout(patience) {
            Ok(VmmEvent::Guest {
                event: GuestEvent::PowerOff(_),
                ..
            }) => break,
            Ok(VmmEvent::Guest { event, .. }) => panic!("guest died: {event:?}"),
            Ok(_) => {}
            Err(e) => panic!("guest did not power off: {e}"),
        }
    }
    let elapsed = started.elapsed();
    vm.shutdown();
    elapsed
}
