//! The page-state store of a RamBlockAttribute against a flat bitmap, one
//! bit per page, driven by QEMU's algorithm (a uniform range notified once,
//! a mixed one page by page). Both sit behind the same RamBlockAttribute:
//! the same region lock, committed view, validation and listener calls, so
//! what differs is the state structure and the notification algorithm.
//!
//! Workloads (one no-op listener unless named):
//! - `4k_pair`: one page to shared and back;
//! - `4k_pair_4_listeners`: the same with four listeners;
//! - `2m_pair`: 2 MiB to shared and back;
//! - `mixed_2m`: 256 single-page to-shared conversions (every other page of
//!   2 MiB), one to-shared of the whole 2 MiB (256 private pages in it), one
//!   to-private of the whole 2 MiB;
//! - `random_4k_1t`: one page to shared and back at a random place of a
//!   1 TiB region;
//! - `replay_fragmented_1t`: replaying the shared runs of a 1 TiB region with
//!   one shared page per 2 MiB (524288 runs).
//!
//! Ids: `state_tracking/{flat_bitmap,ram_block_attribute}/<workload>`.
//! Run: `cargo bench -p vmm --bench state_tracking`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{
    BenchmarkGroup, Criterion, criterion_group, criterion_main, measurement::WallTime,
};
use vmm::memory::page_states::{FlatBitmap, PageStates};
use vmm::memory::shared_bitmap::SharedBitmap;
use vmm::memory::{ListenerError, RamBlockAttribute, RamDiscardListener, Section};

/// A device whose map and unmap are free, so only our work is measured.
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

const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;
const PAGE: u64 = 4096;

fn region<S: PageStates>(size: u64, listeners: usize) -> RamBlockAttribute<S> {
    let rba = RamBlockAttribute::<S>::with_store(0, size);
    for _ in 0..listeners {
        rba.register_listener(Arc::new(NullListener), Section { gpa: 0, size })
            .unwrap();
    }
    rba
}

fn pair<S: PageStates>(rba: &RamBlockAttribute<S>, offset: u64, size: u64) {
    rba.state_change(offset, size, true).unwrap();
    rba.state_change(offset, size, false).unwrap();
}

/// Pages spread over a region, from a fixed xorshift sequence.
fn random_pages(region: u64, count: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (region / PAGE)) * PAGE
        })
        .collect()
}

fn workloads<S: PageStates>(group: &mut BenchmarkGroup<'_, WallTime>, store: &str) {
    let small = region::<S>(4 * GIB, 1);
    group.bench_function(format!("{store}/4k_pair"), |b| {
        b.iter(|| pair(&small, GIB, PAGE))
    });
    let four = region::<S>(4 * GIB, 4);
    group.bench_function(format!("{store}/4k_pair_4_listeners"), |b| {
        b.iter(|| pair(&four, GIB, PAGE))
    });
    group.bench_function(format!("{store}/2m_pair"), |b| {
        b.iter(|| pair(&small, GIB, 2 << 20))
    });
    group.bench_function(format!("{store}/mixed_2m"), |b| {
        b.iter(|| {
            for page in (0..512u64).step_by(2) {
                small.state_change(GIB + page * PAGE, PAGE, true).unwrap();
            }
            pair(&small, GIB, 2 << 20);
        })
    });
    drop((small, four));

    let huge = region::<S>(TIB, 1);
    let pages = random_pages(TIB, 1 << 16);
    let mut next = 0;
    group.bench_function(format!("{store}/random_4k_1t"), |b| {
        b.iter(|| {
            pair(&huge, pages[next], PAGE);
            next = (next + 1) % pages.len();
        })
    });
    eprintln!(
        "{store}: 1 TiB uniform (after the random pairs): {} bytes of state",
        huge.lock().unwrap().heap_bytes()
    );
    drop(huge);

    let fragmented = region::<S>(TIB, 0);
    for i in 0..TIB / (2 << 20) {
        fragmented.state_change(i * (2 << 20), PAGE, true).unwrap();
    }
    eprintln!(
        "{store}: 1 TiB, one shared page per 2 MiB: {} bytes of state",
        fragmented.lock().unwrap().heap_bytes()
    );
    group.bench_function(format!("{store}/replay_fragmented_1t"), |b| {
        b.iter(|| {
            fragmented.replay_populated::<()>(0, TIB, |s| {
                black_box(s);
                Ok(())
            })
        })
    });
}

fn state_tracking(c: &mut Criterion) {
    let mut group = c.benchmark_group("state_tracking");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    workloads::<FlatBitmap>(&mut group, "flat_bitmap");
    workloads::<SharedBitmap>(&mut group, "ram_block_attribute");
    group.finish();
}

criterion_group!(benches, state_tracking);
criterion_main!(benches);
