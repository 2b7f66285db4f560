//! What a conversion costs per assigned device, on real KVM with real
//! vfio-user servers (the test device, each on its own thread and socket):
//!
//! - `4k/<n>_devices`: a guest converting one 4 KiB page to shared and back,
//!   with 0, 1 and 4 devices attached (`mapping=runs`: one DMA_MAP or
//!   DMA_UNMAP per device per conversion);
//! - `8m_pages/<n>_devices`: the guest converting 8 MiB to shared and back
//!   with 0 and 1 device attached with `mapping=pages` (2048 DMA_MAP, then
//!   2048 DMA_UNMAP messages per pair).
//!
//! Each figure is a time per guest operation: a guest with `LOW` operations
//! and one with `HIGH` are booted and timed to power-off, and the difference
//! divided by `HIGH - LOW`, so boot and teardown drop out. The configurations
//! take turns round after round (the order rotating), and every figure is
//! the median over rounds of per-round values, so drift hits all alike.
//! Printed:
//! - `device cost 4 / 1`: (4 devices - none) / (1 device - none), the
//!   issue's "four devices cost at most 1.5x one";
//! - `per message / lone round trip`: ((8 MiB pages, 1 device - none) / 2048)
//!   / (4 KiB, 1 device - none), at most 0.35 wanted.
//!
//! Then the vCPU side (`vcpus/<n>_vcpus_2_devices`): 1, 2 and 4 vCPUs, each
//! converting its own 4 KiB page to shared and back, with two devices
//! attached; printed as the time per conversion and the throughput against
//! one vCPU.
//!
//! Run: `cargo bench -p vmm --bench fan_out` (needs /dev/kvm; without it the
//! bench says so and measures nothing). `FAN_OUT_ROUNDS=N` sets the rounds
//! (default 7); `FAN_OUT_VCPUS=0` leaves the vCPU side out.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hypervisor::KvmHypervisor;
use test_guest::{MemconvOptions, Op, OpKind, memconv_elf};
use vm_device::MappingPolicy;
use vmm::config::{ConsoleOutput, UserDeviceConfig, VmConfig};

const CONVERTED_GPA: u64 = 16 << 20;
const PAGE: u64 = 4096;
const LARGE: u64 = 8 << 20;

/// One configuration: what the guest converts, and the devices attached.
#[derive(Clone, Copy)]
struct Setup {
    name: &'static str,
    size: u64,
    devices: usize,
    mapping: MappingPolicy,
    /// Operations of the short and the long guest.
    low: u64,
    high: u64,
}

const SETUPS: [Setup; 5] = [
    Setup {
        name: "4k/0_devices",
        size: PAGE,
        devices: 0,
        mapping: MappingPolicy::Runs,
        low: 200,
        high: 2200,
    },
    Setup {
        name: "4k/1_devices",
        size: PAGE,
        devices: 1,
        mapping: MappingPolicy::Runs,
        low: 200,
        high: 2200,
    },
    Setup {
        name: "4k/4_devices",
        size: PAGE,
        devices: 4,
        mapping: MappingPolicy::Runs,
        low: 200,
        high: 2200,
    },
    Setup {
        name: "8m_pages/0_devices",
        size: LARGE,
        devices: 0,
        mapping: MappingPolicy::Pages,
        low: 200,
        high: 2200,
    },
    Setup {
        name: "8m_pages/1_devices",
        size: LARGE,
        devices: 1,
        mapping: MappingPolicy::Pages,
        low: 2,
        high: 22,
    },
];

struct Bench {
    hypervisor: KvmHypervisor,
    dir: PathBuf,
    sockets: Vec<PathBuf>,
}

impl Bench {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("ch-fan-out-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let sockets = (0..4)
            .map(|i| {
                let socket = dir.join(format!("device{i}.sock"));
                test_device::serve(&socket, test_device::SharedState::default(), true)
                    .expect("start the test device");
                socket
            })
            .collect();
        Bench {
            hypervisor: KvmHypervisor::new().expect("open /dev/kvm"),
            dir,
            sockets,
        }
    }

    /// Boots a guest converting `setup.size` to shared and back `ops`
    /// times in all; returns the time until it powers off.
    fn run(&self, setup: &Setup, ops: u64) -> Duration {
        let console = self.dir.join("console.log");
        let guest_ops = (0..ops)
            .map(|i| Op {
                kind: if i.is_multiple_of(2) {
                    OpKind::Shared
                } else {
                    OpKind::Private
                },
                gpa: CONVERTED_GPA,
                size: setup.size,
                value: 0,
            })
            .collect();
        let devices = self.sockets[..setup.devices]
            .iter()
            .map(|socket| UserDeviceConfig {
                socket: socket.clone(),
                mapping: setup.mapping,
                ..Default::default()
            })
            .collect();
        let config = common::quiet_guest(
            &self.dir,
            guest_ops,
            ConsoleOutput::File(console.clone()),
            devices,
        );
        self.time_guest(config, &console, ops, setup.name)
    }

    /// Boots `config` and times it to power-off, checking that all `ops`
    /// of the guest went `ok`.
    fn time_guest(&self, config: VmConfig, console: &Path, ops: u64, what: &str) -> Duration {
        let (elapsed, output) = common::time_with_console(&self.hypervisor, config, console);
        common::assert_all_ok(&output, ops, what);
        elapsed
    }

    /// Boots a guest on `vcpus` vCPUs, each converting its own page to
    /// shared and back `ops` times, with two devices; returns the time until
    /// it powers off.
    fn run_on_vcpus(&self, vcpus: u64, ops: u64) -> Duration {
        let console = self.dir.join("console.log");
        let lists = (0..vcpus)
            .map(|cpu| {
                (0..ops)
                    .map(|i| Op {
                        kind: if i.is_multiple_of(2) {
                            OpKind::Shared
                        } else {
                            OpKind::Private
                        },
                        gpa: CONVERTED_GPA + cpu * (2 << 20),
                        size: PAGE,
                        value: 0,
                    })
                    .collect()
            })
            .collect();
        let devices = self.sockets[..2]
            .iter()
            .map(|socket| UserDeviceConfig {
                socket: socket.clone(),
                ..Default::default()
            })
            .collect();
        let config = quiet_guest_on_vcpus(
            &self.dir,
            lists,
            ConsoleOutput::File(console.clone()),
            devices,
        );
        self.time_guest(config, &console, vcpus * ops, &format!("{vcpus} vCPUs"))
    }

    /// Time per conversion on `vcpus` vCPUs, boot and teardown taken out.
    fn per_conversion_on_vcpus(&self, vcpus: u64) -> f64 {
        let (low, high) = (200, 1200);
        let t_low = self.run_on_vcpus(vcpus, low);
        let t_high = self.run_on_vcpus(vcpus, high);
        (t_high.as_secs_f64() - t_low.as_secs_f64()) / (vcpus * (high - low)) as f64
    }

    /// Time per operation of `setup`, boot and teardown taken out.
    fn per_op(&self, setup: &Setup) -> f64 {
        let low = self.run(setup, setup.low);
        let high = self.run(setup, setup.high);
        (high.as_secs_f64() - low.as_secs_f64()) / (setup.high - setup.low) as f64
    }
}

/// As `quiet_guest`, on `lists.len()` vCPUs, vCPU `i` running `lists[i]`.
fn quiet_guest_on_vcpus(
    dir: &Path,
    lists: Vec<Vec<Op>>,
    serial: ConsoleOutput,
    user_devices: Vec<UserDeviceConfig>,
) -> VmConfig {
    let vcpus = u8::try_from(lists.len()).expect("at most 255 vCPUs");
    let mut config = common::quiet_guest(dir, Vec::new(), serial, user_devices);
    let options = MemconvOptions {
        poweroff: true,
        quiet: true,
    };
    std::fs::write(&config.kernel, memconv_elf(&lists, options)).expect("write guest");
    config.cpus.boot = vcpus;
    config
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn quartiles(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let at = |q: usize| values[(values.len() - 1) * q / 4];
    (at(1), at(2), at(3))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("fan_out: bench");
        return;
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("fan_out: /dev/kvm is missing, nothing measured");
        return;
    }
    let rounds: usize = std::env::var("FAN_OUT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let bench = Bench::start();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
    let mut device_cost = Vec::new();
    let mut per_message = Vec::new();
    for round in 0..rounds {
        let mut this_round = [0.0; SETUPS.len()];
        for k in 0..SETUPS.len() {
            let index = (k + round) % SETUPS.len();
            this_round[index] = bench.per_op(&SETUPS[index]);
        }
        for (all, value) in times.iter_mut().zip(this_round) {
            all.push(value);
        }
        let [none, one, four, pages_none, pages_one] = this_round;
        let lone_round_trip = one - none;
        device_cost.push((four - none) / lone_round_trip);
        per_message.push((pages_one - pages_none) / (LARGE / PAGE) as f64 / lone_round_trip);
    }
    for (setup, values) in SETUPS.iter().zip(&mut times) {
        println!(
            "fan_out/{}: {:.1} µs per conversion (median of {rounds} rounds)",
            setup.name,
            median(values) * 1e6
        );
    }
    let (q1, m, q3) = quartiles(&mut device_cost);
    println!("fan_out/device cost 4 / 1: ratio {m:.3} (quartiles {q1:.3}-{q3:.3})");
    let (q1, m, q3) = quartiles(&mut per_message);
    println!("fan_out/per message / lone round trip: ratio {m:.3} (quartiles {q1:.3}-{q3:.3})");
    if std::env::var_os("FAN_OUT_VCPUS").is_some_and(|v| v == "0") {
        let _ = std::fs::remove_dir_all(&bench.dir);
        return;
    }
    const VCPUS: [u64; 3] = [1, 2, 4];
    let mut per_vcpus: Vec<Vec<f64>> = vec![Vec::new(); VCPUS.len()];
    let mut speedups: Vec<Vec<f64>> = vec![Vec::new(); VCPUS.len()];
    for round in 0..rounds {
        let mut this_round = [0.0; VCPUS.len()];
        for k in 0..VCPUS.len() {
            let index = (k + round) % VCPUS.len();
            this_round[index] = bench.per_conversion_on_vcpus(VCPUS[index]);
        }
        for index in 0..VCPUS.len() {
            per_vcpus[index].push(this_round[index]);
            speedups[index].push(this_round[0] / this_round[index]);
        }
    }
    for (index, vcpus) in VCPUS.iter().enumerate() {
        let (q1, m, q3) = quartiles(&mut speedups[index]);
        println!(
            "fan_out/vcpus/{vcpus}_vcpus_2_devices: {:.1} µs per conversion, throughput {m:.2}x one vCPU (quartiles {q1:.2}-{q3:.2})",
            median(&mut per_vcpus[index]) * 1e6
        );
    }
    let _ = std::fs::remove_dir_all(&bench.dir);
}
