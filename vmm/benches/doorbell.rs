//! Doorbell round trip on real KVM: a guest rings its conversion doorbell
//! with a 4 KiB conversion (alternately to shared and to private) against
//! the same round trip with the no-op command, the conversion with the
//! vCPU seccomp filter installed against the same without, and with the
//! event monitor writing every conversion to a file.
//!
//! Every sample boots a fresh `memconv` guest running `iters` ops. Criterion
//! samples linearly (iters = d, 2d, 3d, ...) and reports the slope, so VM
//! boot, the summary line and teardown, which every sample pays once, drop
//! out of the per-round-trip figure.
//!
//! Then the conversion against the no-op in alternating batches
//! (`doorbell_paired/convert_4k`, see `paired/mod.rs`): the ratio one
//! criterion run cannot resolve on a shared host. Each batch's time is a
//! guest of 2n ops less a guest of n, so boot and teardown drop out as
//! they do from criterion's slope. `PAIRED_CONTROL=1` pits the no-op
//! against itself.
//!
//! Run: `cargo bench -p vmm --bench doorbell` (needs /dev/kvm; without it the
//! bench says so and measures nothing).

mod common;
mod paired;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use hypervisor::KvmHypervisor;
use test_guest::{Op, OpKind};
use vmm::config::{ConsoleOutput, EventMonitorConfig};
use vmm::event_monitor::EventMonitor;
use vmm::seccomp_filters::{SeccompMode, Thread, filter};

/// The PT_LOAD window (1..4 MiB) bounds one guest's op table.
const MAX_OPS_PER_GUEST: u64 = 60_000;
const CONVERTED_GPA: u64 = 16 << 20;

fn ops(kind_of: impl Fn(u64) -> OpKind, count: u64) -> Vec<Op> {
    (0..count)
        .map(|i| Op {
            kind: kind_of(i),
            gpa: CONVERTED_GPA,
            size: 4096,
            value: 0,
        })
        .collect()
}

fn conversion(i: u64) -> OpKind {
    if i.is_multiple_of(2) {
        OpKind::Shared
    } else {
        OpKind::Private
    }
}

fn nop(_: u64) -> OpKind {
    OpKind::Nop
}

struct Bench {
    hypervisor: KvmHypervisor,
    dir: PathBuf,
}

/// What a run writes events to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Events {
    Off,
    File,
}

impl Bench {
    /// Boots a guest running `ops` (its vCPU under the seccomp filter when
    /// `seccomp`) and returns the time until it powers off.
    fn run(&self, ops: Vec<Op>, serial: ConsoleOutput, seccomp: bool) -> Duration {
        self.run_with(ops, serial, seccomp, Events::Off)
    }

    fn run_with(
        &self,
        ops: Vec<Op>,
        serial: ConsoleOutput,
        seccomp: bool,
        events: Events,
    ) -> Duration {
        let config = common::quiet_guest(&self.dir, ops, serial, Vec::new());
        let monitor = Arc::new(match events {
            Events::Off => EventMonitor::disabled(),
            Events::File => EventMonitor::open(
                &EventMonitorConfig::Path(self.dir.join("events.jsonl")),
                None,
            )
            .expect("open the event file"),
        });
        common::time_to_poweroff(
            &self.hypervisor,
            config,
            monitor,
            seccomp.then(vcpu_filter),
            Duration::from_secs(120),
        )
    }

    fn run_ops(&self, kind_of: fn(u64) -> OpKind, iters: u64, seccomp: bool) -> Duration {
        self.run_ops_with(kind_of, iters, seccomp, Events::Off)
    }

    fn run_ops_with(
        &self,
        kind_of: fn(u64) -> OpKind,
        iters: u64,
        seccomp: bool,
        events: Events,
    ) -> Duration {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let count = left.min(MAX_OPS_PER_GUEST);
            total += self.run_with(ops(kind_of, count), ConsoleOutput::Off, seccomp, events);
            left -= count;
        }
        total
    }

    /// One guest of each kind must report every op ok, or the numbers
    /// would compare failures.
    fn check(&self, kind_of: fn(u64) -> OpKind, name: &str, seccomp: bool) {
        let log = self.dir.join(format!("{name}.log"));
        self.run(ops(kind_of, 100), ConsoleOutput::File(log.clone()), seccomp);
        let output = std::fs::read_to_string(&log).expect("read serial log");
        common::assert_all_ok(&output, 100, &format!("{name} guest failed"));
    }
}

fn vcpu_filter() -> seccompiler::BpfProgram {
    filter(SeccompMode::Enforce, Thread::Vcpu)
        .expect("build the vCPU filter")
        .expect("enforce mode has a filter")
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ch-doorbell-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn remove(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

fn doorbell_round_trip(c: &mut Criterion) {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("doorbell bench SKIPPED: /dev/kvm is missing, nothing measured");
        return;
    }
    let bench = Bench {
        hypervisor: KvmHypervisor::new().expect("open /dev/kvm"),
        dir: temp_dir(),
    };
    bench.check(nop, "nop", false);
    bench.check(conversion, "conversion", false);
    bench.check(conversion, "conversion-seccomp", true);

    let mut group = common::linear_group(c, "doorbell_round_trip", 20, 2, 10);
    group.bench_function("nop", |b| {
        b.iter_custom(|iters| bench.run_ops(nop, iters, false))
    });
    group.bench_function("convert_4k", |b| {
        b.iter_custom(|iters| bench.run_ops(conversion, iters, false))
    });
    group.bench_function("convert_4k_seccomp", |b| {
        b.iter_custom(|iters| bench.run_ops(conversion, iters, true))
    });
    group.bench_function("convert_4k_events_to_file", |b| {
        b.iter_custom(|iters| bench.run_ops_with(conversion, iters, false, Events::File))
    });
    group.finish();
    remove(&bench.dir);
}

fn doorbell_paired(_: &mut Criterion) {
    const ID: &str = "doorbell_paired/convert_4k";
    if !ID.contains(&paired::filter_argument()) {
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        eprintln!("{ID} SKIPPED: /dev/kvm is missing, nothing measured");
        return;
    }
    let control = std::env::var_os("PAIRED_CONTROL").is_some_and(|v| v == "1");
    let bench = Bench {
        hypervisor: KvmHypervisor::new().expect("open /dev/kvm"),
        dir: temp_dir(),
    };
    let marginal = |kind_of: fn(u64) -> OpKind, n: u64| {
        let long = bench.run_ops(kind_of, 2 * n, false);
        long.saturating_sub(bench.run_ops(kind_of, n, false))
    };
    let candidate = if control { nop } else { conversion };
    let result = paired::compare(
        &mut |n| marginal(nop, n),
        &mut |n| marginal(candidate, n),
        Duration::from_millis(400),
        41,
    );
    println!("{ID}: {result}");
    remove(&bench.dir);
}

criterion_group!(benches, doorbell_round_trip, doorbell_paired);
criterion_main!(benches);
