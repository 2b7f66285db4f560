//! Helpers shared by this crate's KVM-backed unit tests.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::Sender;

use hypervisor::{ConversionDirection, KvmHypervisor, MemoryConversion};
use vm_device::fake_iommu::FakeIommu;
use vm_device::{Bus, DmaMappingListener, Section};

use crate::conversion_path::ConversionPath;
use crate::event_monitor::EventMonitor;
use crate::memory::{ConversionFailure, MemoryManager};
use crate::vcpu::VcpuContext;
use crate::{GuestEvents, VmmEvent};

pub mod firmware_rig;

/// `/dev/kvm`, or `None` with a loud note where it is missing, unless CI
/// requires it (`CH_REQUIRE_KVM=1`), where that fails the test.
pub fn kvm() -> Option<KvmHypervisor> {
    KvmHypervisor::for_tests()
}

pub fn conversion(gpa: u64, size: u64, to_shared: bool) -> MemoryConversion {
    MemoryConversion {
        gpa,
        size,
        direction: if to_shared {
            ConversionDirection::ToShared
        } else {
            ConversionDirection::ToPrivate
        },
    }
}

/// Converts through the real conversion path; returns the pages changed.
pub fn convert(
    memory: &MemoryManager,
    gpa: u64,
    size: u64,
    to_shared: bool,
) -> Result<u64, ConversionFailure> {
    memory
        .convert(conversion(gpa, size, to_shared))
        .map(|o| o.changed_pages)
}

/// A device's DMA listener over a fake IOMMU that takes at most
/// `entry_limit` mappings, registered on the first `size` bytes of
/// `memory`'s first region: the IOMMU, to see what the device has mapped.
pub fn fake_device_on_ram(
    memory: &MemoryManager,
    size: u64,
    entry_limit: Option<u64>,
) -> Arc<FakeIommu> {
    let iommu = Arc::new(FakeIommu::new(None));
    let listener = Arc::new(DmaMappingListener::new(iommu.clone(), entry_limit));
    memory.regions()[0]
        .attributes
        .as_ref()
        .expect("guest_memfd RAM")
        .register_listener(listener, Section { gpa: 0, size })
        .unwrap();
    iommu
}

/// A vCPU's context without devices: conversions go through `memory`'s
/// real path, events to `tx`; not stopped or paused, no IOAPIC.
pub fn vcpu_context(memory: Arc<MemoryManager>, tx: Sender<VmmEvent>) -> VcpuContext {
    VcpuContext {
        io_bus: Arc::new(Bus::new()),
        mmio_bus: Arc::new(Bus::new()),
        conversions: Arc::new(ConversionPath::new(
            memory,
            Arc::new(EventMonitor::disabled()),
        )),
        events: GuestEvents { vm: 1, tx },
        stop: Arc::default(),
        pause: Arc::default(),
        ioapic: None,
    }
}

/// A test device served by threads of this process, in a fresh scratch
/// directory named by `tag`: its socket and its control socket. With
/// `dma_only` it is only a DMA target (no PCI function).
pub fn in_process_test_device(tag: &str, dma_only: bool) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("ch-dev-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (socket, ctl) = (dir.join("dev.sock"), dir.join("dev.ctl"));
    let state = test_device::SharedState::default();
    test_device::control(&ctl, state.clone()).unwrap();
    if dma_only {
        test_device::serve_dma_target(&socket, state).unwrap();
    } else {
        test_device::serve(&socket, state, true).unwrap();
    }
    (socket, ctl)
}

/// A path in the temporary directory for this test process, named by
/// `tag`, with nothing left there from an earlier run.
pub fn scratch_path(tag: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("ch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

/// An unlinked, readable and writable scratch file (named by `tag` while
/// it is created) holding `bytes`, its offset at their end.
pub fn scratch_file(tag: &str, bytes: &[u8]) -> std::fs::File {
    use std::io::Write;
    let path = scratch_path(tag);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    f.write_all(bytes).unwrap();
    let _ = std::fs::remove_file(&path);
    f
}

/// Runs `f` and returns what it logged on this thread at `warn` or above
/// (a logger for the test process is installed on first use; other
/// threads' records are dropped).
pub fn capture_warnings<R>(f: impl FnOnce() -> R) -> (R, Vec<String>) {
    use std::cell::RefCell;

    thread_local! {
        static CAPTURED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    }

    /// Threads capturing now: other threads' records (some run under a
    /// seccomp filter) never touch the thread-local.
    static CAPTURING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
            metadata.level() <= log::Level::Warn
        }
        fn log(&self, record: &log::Record<'_>) {
            if self.enabled(record.metadata())
                && CAPTURING.load(std::sync::atomic::Ordering::Acquire) > 0
            {
                CAPTURED.with(|c| {
                    if let Some(lines) = c.borrow_mut().as_mut() {
                        lines.push(record.args().to_string());
                    }
                });
            }
        }
        fn flush(&self) {}
    }

    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&Capture).expect("no other logger in the test process");
        log::set_max_level(log::LevelFilter::Warn);
    });
    CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
    CAPTURING.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let result = f();
    CAPTURING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    let lines = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    (result, lines)
}

/// One convertible region with no memory behind it, converted through the
/// production path (`ConvertibleRam::convert`) by region offset; derefs to
/// the region's RamBlockAttribute for listeners and state.
pub struct OneRegion {
    gpa: u64,
    ram: crate::memory::ConvertibleRam,
}

impl OneRegion {
    pub fn new(gpa: u64, size: u64) -> Self {
        OneRegion {
            gpa,
            ram: crate::memory::ConvertibleRam::without_backing(gpa, size),
        }
    }

    /// Converts `offset..offset+size` of the region; returns the pages
    /// changed. An offset that overflows the guest physical address space
    /// is sent as the wrapped GPA, which the path must refuse all the same.
    pub fn convert(
        &self,
        offset: u64,
        size: u64,
        to_shared: bool,
    ) -> Result<u64, ConversionFailure> {
        self.ram
            .convert(conversion(self.gpa.wrapping_add(offset), size, to_shared))
            .map(|o| o.changed_pages)
    }

    pub fn ram(&self) -> &crate::memory::ConvertibleRam {
        &self.ram
    }

    /// Counters of the region plus requests refused before reaching it.
    pub fn totals(&self) -> crate::memory::ConversionCounters {
        self.ram.conversion_totals()
    }
}

impl std::ops::Deref for OneRegion {
    type Target = crate::memory::RamBlockAttribute;

    fn deref(&self) -> &Self::Target {
        self.ram.regions()[0]
            .attributes
            .as_ref()
            .expect("a convertible region")
    }
}
