//! The VMM's answers to the TDVMCALLs KVM leaves to userspace, per the
//! GHCI specification's status codes. This VMM serves none of the
//! optional TDVMCALLs and has no quoting service, so the guest is told so
//! in terms it can act on: GetTdVmCallInfo reports no optional call,
//! GetQuote gets the operand errors a malformed request earns and
//! otherwise "unsupported" (as KVM answers a GetQuote nobody serves), and
//! every other call gets "unsupported". Nothing here panics or waits.

use hypervisor::TdVmCall;
use hypervisor::TdVmCallAnswer::{self, Info, Status};
use hypervisor::tdvmcall::TdVmCallStatus::{AlignError, InvalidOperand, SubfuncUnsupported};

/// The GetTdVmCallInfo leaf that lists the optional TDVMCALLs served
/// (leaf 0 is KVM's: it answers it without exiting).
const INFO_LEAF_OPTIONAL_CALLS: u64 = 1;
/// GetQuote's buffer is whole 4 KiB pages.
const QUOTE_ALIGN: u64 = 4096;

/// The answer to `call`.
pub fn answer(call: TdVmCall) -> TdVmCallAnswer {
    match call {
        // No optional TDVMCALL (SetupEventNotifyInterrupt, bit 1 of R11)
        // is served: every bit clear.
        TdVmCall::GetTdVmCallInfo {
            leaf: INFO_LEAF_OPTIONAL_CALLS,
        } => Info([0; 4]),
        TdVmCall::GetTdVmCallInfo { .. } => Status(InvalidOperand),
        TdVmCall::GetQuote { gpa, size } => {
            if !gpa.is_multiple_of(QUOTE_ALIGN) || !size.is_multiple_of(QUOTE_ALIGN) {
                Status(AlignError)
            } else if size == 0 || gpa.checked_add(size).is_none() {
                Status(InvalidOperand)
            } else {
                // No quoting service on this host.
                Status(SubfuncUnsupported)
            }
        }
        TdVmCall::SetupEventNotifyInterrupt { .. } | TdVmCall::Unknown { .. } => {
            Status(SubfuncUnsupported)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNSUPPORTED: u64 = 0x8000_0000_0000_0003;
    const INVALID_OPERAND: u64 = 0x8000_0000_0000_0000;
    const ALIGN_ERROR: u64 = 0x8000_0000_0000_0002;

    #[test]
    fn get_td_vm_call_info_reports_no_optional_call() {
        assert_eq!(answer(TdVmCall::GetTdVmCallInfo { leaf: 1 }), Info([0; 4]));
        for leaf in [0, 2, u64::MAX] {
            assert_eq!(
                answer(TdVmCall::GetTdVmCallInfo { leaf }).status(),
                INVALID_OPERAND,
                "leaf {leaf}"
            );
        }
    }

    /// A malformed quote request gets the operand error it earns; a
    /// well-formed one learns there is no quoting service.
    #[test]
    fn get_quote_is_checked_then_unsupported() {
        let quote = |gpa, size| answer(TdVmCall::GetQuote { gpa, size }).status();
        assert_eq!(quote(0x10_0000, 0x2000), UNSUPPORTED);
        assert_eq!(quote(0x10_0800, 0x1000), ALIGN_ERROR);
        assert_eq!(quote(0x10_0000, 0x1800), ALIGN_ERROR);
        assert_eq!(quote(0x10_0000, 0), INVALID_OPERAND);
        assert_eq!(quote(u64::MAX - 0xfff, 0x2000), INVALID_OPERAND);
        // Up to the last page of the address space.
        assert_eq!(quote(u64::MAX - 0x1fff, 0x1000), UNSUPPORTED);
    }

    #[test]
    fn calls_not_served_are_unsupported() {
        assert_eq!(
            answer(TdVmCall::SetupEventNotifyInterrupt { vector: 0x40 }).status(),
            UNSUPPORTED
        );
        for (nr, flags) in [(0x10003, 0), (0x10002, 1), (u64::MAX, 0)] {
            assert_eq!(
                answer(TdVmCall::Unknown { nr, flags }).status(),
                UNSUPPORTED
            );
        }
    }
}
