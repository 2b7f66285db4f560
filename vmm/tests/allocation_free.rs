//! The common conversion (one page to shared and back, through the real
//! conversion path on real KVM, with the event monitor writing to a file)
//! allocates nothing on the converting thread. A counting allocator,
//! per thread, proves it; the event writer's own allocations happen on its
//! thread and are not counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;

use hypervisor::{ConversionDirection, Hypervisor, KvmHypervisor, MemoryConversion, VmType};
use vmm::config::EventMonitorConfig;
use vmm::conversion_path::ConversionPath;
use vmm::event_monitor::EventMonitor;
use vmm::memory::{MemoryLayout, MemoryManager};

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call goes straight to the system allocator; counting only
// touches a const-initialised thread-local Cell, which never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded with the caller's arguments.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

fn conversion(gpa: u64, to_shared: bool) -> MemoryConversion {
    MemoryConversion {
        gpa,
        size: 4096,
        direction: if to_shared {
            ConversionDirection::ToShared
        } else {
            ConversionDirection::ToPrivate
        },
    }
}

#[test]
fn converting_a_page_and_back_allocates_nothing_on_the_vcpu_thread() {
    let Some(hypervisor) = KvmHypervisor::for_tests() else {
        return;
    };
    let vm = hypervisor.create_vm(VmType::Default).unwrap();
    let memory = Arc::new(MemoryManager::new(vm, 64 << 20, MemoryLayout::Auto).unwrap());
    let dir = std::env::temp_dir().join(format!("ch-alloc-free-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let events = dir.join("events");
    let monitor =
        Arc::new(EventMonitor::open(&EventMonitorConfig::Path(events.clone()), None).unwrap());
    let path = ConversionPath::new(memory, monitor.clone());
    let gpa = 16 << 20;
    // The first pair may set things up (a chunk's block, the channel).
    path.convert(conversion(gpa, true), 0).unwrap();
    path.convert(conversion(gpa, false), 0).unwrap();

    let before = allocations();
    for i in 0..200u64 {
        let page = gpa + (i % 8) * 4096;
        path.convert(conversion(page, true), 0).unwrap();
        path.convert(conversion(page, false), 0).unwrap();
    }
    let allocated = allocations() - before;
    assert_eq!(allocated, 0, "{allocated} allocations in 400 conversions");

    // The events were written all the same.
    monitor.flush(std::time::Duration::from_secs(5));
    let written = std::fs::read_to_string(&events).unwrap();
    assert_eq!(written.lines().count(), 402);
    assert!(
        written
            .lines()
            .all(|l| l.contains(r#""event":"conversion""#))
    );
    let _ = std::fs::remove_dir_all(&dir);
}
