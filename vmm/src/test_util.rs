//! Helpers shared by this crate's KVM-backed unit tests.

use hypervisor::{ConversionDirection, KvmHypervisor, MemoryConversion};

use crate::memory::{ConversionFailure, MemoryManager};

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

/// A path in the temporary directory for this test process, named by
/// `tag`, with nothing left there from an earlier run.
pub fn scratch_path(tag: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("ch-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}
