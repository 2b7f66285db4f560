//! What the real-KVM benches share: a quiet memconv guest that powers off
//! when done, booted in this process and timed from boot to power-off.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};
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

/// Boots `config` with no event monitor and no vCPU filter and returns the
/// time until the guest powers off (patience: 300 s), with what it wrote
/// to `console`.
#[allow(dead_code, reason = "doorbell times with its own monitor and filter")]
pub fn time_with_console(
    hypervisor: &KvmHypervisor,
    config: VmConfig,
    console: &Path,
) -> (Duration, String) {
    let elapsed = time_to_poweroff(
        hypervisor,
        config,
        Arc::new(EventMonitor::disabled()),
        None,
        Duration::from_secs(300),
    );
    let output = std::fs::read_to_string(console).expect("read the console");
    (elapsed, output)
}

/// Panics with `what` and the console `output` unless the guest's summary
/// line says all its `ops` went ok.
pub fn assert_all_ok(output: &str, ops: impl std::fmt::Display, what: &str) {
    assert!(
        output.contains(&format!("memconv: done {ops} ok 0 failed")),
        "{what}: {output}"
    );
}

/// A criterion group for whole guest runs: linear sampling (iteration
/// counts that grow by steps), `samples` samples after a warm-up of
/// `warm_up_secs`, measured over `measurement_secs`.
#[allow(dead_code, reason = "fan_out reports without criterion")]
pub fn linear_group<'a>(
    c: &'a mut Criterion,
    name: &str,
    samples: usize,
    warm_up_secs: u64,
    measurement_secs: u64,
) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sampling_mode(SamplingMode::Linear)
        .sample_size(samples)
        .warm_up_time(Duration::from_secs(warm_up_secs))
        .measurement_time(Duration::from_secs(measurement_secs));
    group
}
