//! The guest driving an assigned PCI device on real KVM, against the test
//! device (in this process, on its own thread, a real `vfio_user::Server`):
//!
//! - `pci_bar`: one byte read of BAR0's scratch page by the guest, mapped
//!   into the guest as a memory slot (no exit) against trapped (an MMIO exit
//!   and a REGION_READ to the device per byte);
//! - `pci_dma`: the device filling 4 MiB of shared guest memory by DMA, as
//!   the guest drives it (register writes, the fill, the status read, the
//!   MSI-X interrupt), against a memcpy of 4 MiB in this process.
//!
//! Every guest sample boots a fresh `memconv` guest; criterion samples
//! linearly and reports the slope, so boot and teardown drop out.
//!
//! Run: `cargo bench -p vmm --bench pci_device` (needs /dev/kvm; without it
//! the bench says so and measures nothing).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use hypervisor::KvmHypervisor;
use test_guest::{Op, OpKind};
use vmm::config::{ConsoleOutput, UserDeviceConfig};

const SCRATCH: u64 = 0x1000;
const SCRATCH_SIZE: u64 = 0x1000;
const DMA_GPA: u64 = 16 << 20;
const DMA_SIZE: u64 = 4 << 20;

struct Bench {
    hypervisor: KvmHypervisor,
    dir: PathBuf,
    mapped: PathBuf,
    trapped: PathBuf,
}

fn op(kind: OpKind, gpa: u64, size: u64, value: u8) -> Op {
    Op {
        kind,
        gpa,
        size,
        value: value.into(),
    }
}

impl Bench {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("ch-pci-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let device = |name: &str, mmap: bool| {
            let socket = dir.join(format!("{name}.sock"));
            let state = test_device::SharedState::default();
            test_device::serve(&socket, state, mmap).expect("start the test device");
            socket
        };
        Bench {
            hypervisor: KvmHypervisor::new().expect("open /dev/kvm"),
            mapped: device("mapped", true),
            trapped: device("trapped", false),
            dir,
        }
    }

    /// Boots a guest running `ops` with the device at `socket`; returns the
    /// time until it powers off and its console.
    fn run(&self, ops: Vec<Op>, socket: &Path) -> (Duration, String) {
        let console = self.dir.join("console.log");
        let device = UserDeviceConfig {
            socket: socket.to_path_buf(),
            ..Default::default()
        };
        let config = common::quiet_guest(
            &self.dir,
            ops,
            ConsoleOutput::File(console.clone()),
            vec![device],
        );
        common::time_with_console(&self.hypervisor, config, &console)
    }

    /// `bytes` one-byte reads of the scratch page, in ops of one page.
    fn bar_reads(&self, bytes: u64, socket: &Path) -> Duration {
        let mut ops = Vec::new();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(SCRATCH_SIZE);
            ops.push(op(OpKind::BarCheck, SCRATCH, n, 0));
            left -= n;
        }
        let count = ops.len();
        let (elapsed, output) = self.run(ops, socket);
        common::assert_all_ok(&output, count, "bar reads");
        elapsed
    }

    fn dma_fills(&self, fills: u64) -> Duration {
        let mut ops = vec![op(OpKind::Shared, DMA_GPA, DMA_SIZE, 0)];
        ops.extend((0..fills).map(|i| {
            op(
                OpKind::DmaWrite,
                DMA_GPA,
                DMA_SIZE,
                u8::try_from(i & 0xff).unwrap(),
            )
        }));
        let (elapsed, output) = self.run(ops, &self.mapped);
        common::assert_all_ok(&output, fills + 1, "DMA fills");
        elapsed
    }
}

fn pci_device(c: &mut Criterion) {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("pci_device bench SKIPPED: /dev/kvm is missing, nothing measured");
        return;
    }
    let bench = Bench::start();
    // Both ways must read what is there before anything is timed.
    bench.bar_reads(64, &bench.mapped);
    bench.bar_reads(64, &bench.trapped);
    bench.dma_fills(2);

    let mut group = common::linear_group(c, "pci_bar", 10, 1, 10);
    group.bench_function("trapped_read", |b| {
        b.iter_custom(|iters| bench.bar_reads(iters, &bench.trapped))
    });
    group.bench_function("mapped_read", |b| {
        b.iter_custom(|iters| bench.bar_reads(iters, &bench.mapped))
    });
    group.finish();

    let mut group = common::linear_group(c, "pci_dma", 10, 1, 10);
    let source = vec![0x5au8; ::arch::usize_from(DMA_SIZE)];
    let mut target = vec![0u8; ::arch::usize_from(DMA_SIZE)];
    group.bench_function("memcpy_4m", |b| {
        b.iter(|| {
            target.copy_from_slice(std::hint::black_box(&source));
            std::hint::black_box(&target);
        })
    });
    group.bench_function("device_fill_4m", |b| {
        b.iter_custom(|iters| bench.dma_fills(iters))
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&bench.dir);
}

criterion_group!(benches, pci_device);
criterion_main!(benches);
