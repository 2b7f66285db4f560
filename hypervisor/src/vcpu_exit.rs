//! Typed vCPU exits, so the VMM never touches `kvm_run`.

use crate::MemoryConversion;
use crate::tdvmcall::{TdVmCall, TdVmCallReply};

/// Where the result of a `KVM_HC_MAP_GPA_RANGE` goes: KVM copies it into the
/// guest's RAX when the vCPU re-enters.
#[derive(Debug)]
pub struct HypercallReply<'a> {
    ret: &'a mut u64,
}

/// `-KVM_EINVAL`, what the guest sees when a conversion is refused.
pub const HYPERCALL_EINVAL: u64 = (-22i64).cast_unsigned();

impl<'a> HypercallReply<'a> {
    pub fn new(ret: &'a mut u64) -> Self {
        HypercallReply { ret }
    }

    pub fn complete(self, ok: bool) {
        *self.ret = if ok { 0 } else { HYPERCALL_EINVAL };
    }
}

#[derive(Debug)]
pub enum VmExit<'a> {
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    Hlt,
    Shutdown,
    /// `KVM_HC_MAP_GPA_RANGE`; `reply` must be completed before re-entry.
    MapGpaRange {
        conversion: MemoryConversion,
        reply: HypercallReply<'a>,
    },
    /// A hypercall whose arguments could not be decoded; the guest already
    /// got an error in its return register.
    BadHypercall {
        nr: u64,
    },
    /// `KVM_EXIT_TDX`: a TDVMCALL KVM leaves to userspace; `reply` must be
    /// completed before re-entry (else the guest gets KVM's default,
    /// "unsupported").
    TdVmCall {
        call: TdVmCall,
        reply: TdVmCallReply<'a>,
    },
    /// `KVM_EXIT_MEMORY_FAULT`: an implicit conversion request.
    MemoryFault(MemoryConversion),
    SystemEvent(u32),
    /// `KVM_EXIT_IOAPIC_EOI` (split irqchip only): the guest's EOI of a
    /// level-triggered vector the userspace IOAPIC routes.
    IoapicEoi(u8),
    /// The run was cut short by a signal (a kick).
    Interrupted,
    /// Anything the VMM cannot handle; carries KVM's description.
    Unhandled(String),
}
