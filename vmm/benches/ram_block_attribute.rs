//! RamBlockAttribute costs: state_change with 0/1/4 listeners, mixed ranges,
//! and replay over a fragmented 1 TiB region.
//! Run: `cargo bench -p vmm --bench ram_block_attribute`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use vmm::memory::{ListenerError, RamBlockAttribute, RamDiscardListener, Section};

/// Stands in for a device whose map/unmap is free, so only our work is measured.
struct NullListener;

impl RamDiscardListener for NullListener {
    fn notify_populate(&self, section: Section) -> Result<(), ListenerError> {
        black_box(section);
        Ok(())
    }
    fn notify_discard(&self, section: Section) {
        black_box(section);
    }
}

const REGION: u64 = 4 << 30;

fn region_with_listeners(n: usize) -> RamBlockAttribute {
    let rba = RamBlockAttribute::new(0, REGION);
    for _ in 0..n {
        rba.register_listener(
            Arc::new(NullListener),
            Section {
                gpa: 0,
                size: REGION,
            },
        )
        .unwrap();
    }
    rba
}

fn state_change(c: &mut Criterion) {
    let mut group = c.benchmark_group("state_change_pair");
    for (label, size) in [("4K", 4u64 << 10), ("2M", 2 << 20)] {
        for listeners in [0usize, 1, 4] {
            let rba = region_with_listeners(listeners);
            group.bench_with_input(
                BenchmarkId::new(label, format!("{listeners}_listeners")),
                &size,
                |b, &size| {
                    b.iter(|| {
                        rba.state_change(1 << 30, size, true).unwrap();
                        rba.state_change(1 << 30, size, false).unwrap();
                    })
                },
            );
        }
    }
    group.finish();
}

fn mixed_range(c: &mut Criterion) {
    let mut group = c.benchmark_group("mixed_2M_to_shared");
    for listeners in [0usize, 1] {
        let rba = region_with_listeners(listeners);
        group.bench_function(format!("{listeners}_listeners"), |b| {
            b.iter(|| {
                // Every other page shared: 256 runs to notify.
                for page in (0..512u64).step_by(2) {
                    rba.state_change(page << 12, 4096, true).unwrap();
                }
                rba.state_change(0, 2 << 20, true).unwrap();
                rba.state_change(0, 2 << 20, false).unwrap();
            })
        });
    }
    group.finish();
}

fn replay_1tib(c: &mut Criterion) {
    let size = 1u64 << 40;
    let uniform = RamBlockAttribute::new(0, size);
    uniform.state_change(0, size, true).unwrap();
    let fragmented = RamBlockAttribute::new(0, size);
    for i in 0..size / (2 << 20) {
        // One shared page per 2 MiB: 524288 runs.
        fragmented.state_change(i * (2 << 20), 4096, true).unwrap();
    }
    let mut group = c.benchmark_group("replay_populated_1TiB");
    group.bench_function("uniform_1_run", |b| {
        b.iter(|| {
            uniform.replay_populated::<()>(0, size, |s| {
                black_box(s);
                Ok(())
            })
        })
    });
    group.bench_function("fragmented_524288_runs", |b| {
        b.iter(|| {
            fragmented.replay_populated::<()>(0, size, |s| {
                black_box(s);
                Ok(())
            })
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = state_change, mixed_range, replay_1tib
}
criterion_main!(benches);
