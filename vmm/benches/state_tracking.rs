//! The page-state store of a RamBlockAttribute against a flat bitmap, one
//! bit per page, driven by QEMU's algorithm (a uniform range notified once,
//! a mixed one page by page). Both run the production conversion path
//! (`ConvertibleRam::convert`, with a hypervisor that keeps no attributes):
//! the same routing, transaction, region lock, committed view and listener
//! calls, so what differs is the state structure and the notification
//! algorithm.
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
//! Then each workload again with both stores in alternating 2 ms batches,
//! printed as `state_tracking_paired/<workload>: ... ratio R (quartiles)`:
//! the ratio of ours to the flat bitmap, steadier than two criterion runs
//! (`PAIRED_CONTROL=1`: the flat bitmap against itself, to see the
//! harness's own reading).
//! Run: `cargo bench -p vmm --bench state_tracking`

mod paired;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Criterion, criterion_group, measurement::WallTime};
use hypervisor::{ConversionDirection, MemoryConversion};
use vmm::memory::page_states::{FlatBitmap, PageStates};
use vmm::memory::shared_bitmap::SharedBitmap;
use vmm::memory::{ConvertibleRam, ListenerError, RamDiscardListener, Section};

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
use arch::layout::PAGE_SIZE as PAGE;

/// One region run through the production conversion path with a
/// hypervisor that keeps no attributes, so the bookkeeping is measured.
fn region<S: PageStates>(size: u64, listeners: usize) -> ConvertibleRam<S> {
    let ram = ConvertibleRam::<S>::new(
        Box::new(vmm::memory::NoPrivateAttributes),
        vec![vmm::memory::RamRegion::without_backing(0, size)],
    );
    for _ in 0..listeners {
        attributes(&ram)
            .register_listener(Arc::new(NullListener), Section { gpa: 0, size })
            .unwrap();
    }
    ram
}

fn attributes<S: PageStates>(ram: &ConvertibleRam<S>) -> &vmm::memory::RamBlockAttribute<S> {
    ram.regions()[0].attributes.as_ref().unwrap()
}

fn convert<S: PageStates>(ram: &ConvertibleRam<S>, gpa: u64, size: u64, to_shared: bool) {
    let direction = if to_shared {
        ConversionDirection::ToShared
    } else {
        ConversionDirection::ToPrivate
    };
    ram.convert(MemoryConversion {
        gpa,
        size,
        direction,
    })
    .unwrap();
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

/// A workload on one store: `setup(flat)` builds the region and returns
/// one iteration.
type Setup = fn(bool) -> Box<dyn FnMut()>;

/// Workload `name` run on both stores one right after the other, so a
/// machine that slows down or speeds up meanwhile shifts both alike.
fn both(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, setup: Setup) {
    let mut flat = setup(true);
    group.bench_function(format!("flat_bitmap/{name}"), |b| b.iter(&mut flat));
    drop(flat);
    let mut ours = setup(false);
    group.bench_function(format!("ram_block_attribute/{name}"), |b| b.iter(&mut ours));
}

/// Runs `iteration` `n` times and returns the time taken.
fn timed(iteration: &mut dyn FnMut(), n: u64) -> Duration {
    let started = Instant::now();
    counted_iterations(iteration, n);
    started.elapsed()
}

/// A store-independent handle on a region, for the workloads.
enum Region {
    Flat(ConvertibleRam<FlatBitmap>),
    Ours(ConvertibleRam<SharedBitmap>),
}

impl Region {
    fn new(flat: bool, size: u64, listeners: usize) -> Self {
        if flat {
            Region::Flat(region(size, listeners))
        } else {
            Region::Ours(region(size, listeners))
        }
    }

    fn change(&self, offset: u64, size: u64, to_shared: bool) {
        match self {
            Region::Flat(r) => convert(r, offset, size, to_shared),
            Region::Ours(r) => convert(r, offset, size, to_shared),
        }
    }

    fn pair(&self, offset: u64, size: u64) {
        self.change(offset, size, true);
        self.change(offset, size, false);
    }

    fn replay(&self, size: u64) {
        let f = |s: Section| -> Result<(), ()> {
            black_box(s);
            Ok(())
        };
        let _ = match self {
            Region::Flat(r) => attributes(r).replay_populated(0, size, f),
            Region::Ours(r) => attributes(r).replay_populated(0, size, f),
        };
    }

    fn heap_bytes(&self) -> usize {
        match self {
            Region::Flat(r) => attributes(r).lock().unwrap().heap_bytes(),
            Region::Ours(r) => attributes(r).lock().unwrap().heap_bytes(),
        }
    }
}

fn workloads() -> Vec<(&'static str, Setup)> {
    vec![
        ("4k_pair", |flat| {
            let r = Region::new(flat, 4 * GIB, 1);
            Box::new(move || r.pair(GIB, PAGE))
        }),
        ("4k_pair_4_listeners", |flat| {
            let r = Region::new(flat, 4 * GIB, 4);
            Box::new(move || r.pair(GIB, PAGE))
        }),
        ("2m_pair", |flat| {
            let r = Region::new(flat, 4 * GIB, 1);
            Box::new(move || r.pair(GIB, 2 << 20))
        }),
        ("mixed_2m", |flat| {
            let r = Region::new(flat, 4 * GIB, 1);
            Box::new(move || {
                for page in (0..512u64).step_by(2) {
                    r.change(GIB + page * PAGE, PAGE, true);
                }
                r.pair(GIB, 2 << 20);
            })
        }),
        ("random_4k_1t", |flat| {
            let r = Region::new(flat, TIB, 1);
            let pages = random_pages(TIB, 1 << 16);
            let mut next = 0;
            Box::new(move || {
                r.pair(pages[next], PAGE);
                next = (next + 1) % pages.len();
                if next == 0 {
                    eprintln!(
                        "{}: 1 TiB uniform after random pairs: {} bytes of state",
                        store_name(flat),
                        r.heap_bytes()
                    );
                }
            })
        }),
        ("replay_fragmented_1t", |flat| {
            let r = Region::new(flat, TIB, 0);
            for i in 0..TIB / (2 << 20) {
                r.change(i * (2 << 20), PAGE, true);
            }
            eprintln!(
                "{}: 1 TiB, one shared page per 2 MiB: {} bytes of state",
                store_name(flat),
                r.heap_bytes()
            );
            Box::new(move || r.replay(TIB))
        }),
    ]
}

fn store_name(flat: bool) -> &'static str {
    if flat {
        "flat_bitmap"
    } else {
        "ram_block_attribute"
    }
}

fn state_tracking(c: &mut Criterion) {
    let mut group = c.benchmark_group("state_tracking");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    // Setting a workload up can take a second (the 1 TiB replay): skip
    // what the filter leaves out.
    let filter = paired::filter_argument();
    for (name, setup) in workloads() {
        if ["flat_bitmap", "ram_block_attribute"]
            .iter()
            .any(|store| format!("state_tracking/{store}/{name}").contains(&filter))
        {
            both(&mut group, name, setup);
        }
    }
    group.finish();
}

/// The same workloads timed in alternating 2 ms batches of both stores
/// (`paired/mod.rs`): the ratio a single criterion run cannot resolve on a
/// shared machine. Printed, one line per workload.
fn paired_ratios(_: &mut Criterion) {
    let filter = paired::filter_argument();
    // PAIRED_CONTROL=1 pits the flat bitmap against itself: the ratios
    // then show what the harness alone reads (1.0 within its quartiles).
    let control = std::env::var_os("PAIRED_CONTROL").is_some_and(|v| v == "1");
    for (name, setup) in workloads() {
        let id = format!("state_tracking_paired/{name}");
        if !id.contains(&filter) {
            continue;
        }
        let mut flat = setup(true);
        let mut ours = setup(control);
        let result = paired::compare(
            &mut |n| timed(&mut flat, n),
            &mut |n| timed(&mut ours, n),
            Duration::from_millis(2),
            301,
        );
        println!("{id}: {result}");
    }
}

/// Runs `iteration` `n` times, for `timed` and for the count mode: the
/// only code `scripts/instructions.sh` counts (callgrind's
/// `--toggle-collect`), so setup is left out.
#[inline(never)]
fn counted_iterations(iteration: &mut dyn FnMut(), n: u64) {
    for _ in 0..n {
        iteration();
    }
}

/// `STATE_TRACKING_COUNT=<workload>:<flat|ours>:<iterations>`: run that
/// much of one workload on one store and nothing else, for counting
/// instructions under callgrind (`scripts/instructions.sh`).
fn count_mode(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let [workload, store, iterations] = parts[..] else {
        panic!("STATE_TRACKING_COUNT={spec}: expected <workload>:<flat|ours>:<iterations>");
    };
    let flat = match store {
        "flat" => true,
        "ours" => false,
        other => panic!("store {other}: expected flat or ours"),
    };
    let iterations: u64 = iterations.parse().expect("iterations");
    let (_, setup) = workloads()
        .into_iter()
        .find(|(name, _)| *name == workload)
        .unwrap_or_else(|| panic!("no workload {workload}"));
    let mut iteration = setup(flat);
    // Once outside the count: first-touch page faults and the chunk's
    // first block are setup, not steady state.
    iteration();
    counted_iterations(&mut iteration, iterations);
}

criterion_group!(benches, state_tracking, paired_ratios);

fn main() {
    if let Ok(spec) = std::env::var("STATE_TRACKING_COUNT") {
        count_mode(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
