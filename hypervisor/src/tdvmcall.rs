//! The TDVMCALLs KVM hands to userspace from a TD (`KVM_EXIT_TDX`, Linux
//! 6.16 and later; `struct kvm_run`'s `tdx` member): GetQuote,
//! GetTdVmCallInfo (leaf 1; KVM answers leaf 0 itself) and
//! SetupEventNotifyInterrupt, and any call a later KVM adds. MapGPA does
//! not come this way: KVM turns it into `KVM_HC_MAP_GPA_RANGE`.
//!
//! The exit is 64 bytes of the run structure's exit union: `flags`, `nr`
//! (the TDVMCALL's sub-function), then per call a return status `ret`
//! (which KVM puts in the guest's R10 on re-entry, pre-set to
//! "unsupported") and up to five values: GetQuote's shared buffer (`gpa`
//! with the shared bit stripped, `size`), GetTdVmCallInfo's `leaf` and its
//! outputs `r11`..`r14`, SetupEventNotifyInterrupt's `vector`.

/// `KVM_EXIT_TDX` (not in kvm-bindings 0.14).
pub const KVM_EXIT_TDX: u32 = 40;
/// The bytes of the exit, at the start of the run structure's exit union.
pub const TDX_EXIT_BYTES: usize = 64;

/// TDVMCALL sub-functions (the GHCI specification's leaf numbers).
pub const TDVMCALL_GET_TD_VM_CALL_INFO: u64 = 0x10000;
pub const TDVMCALL_GET_QUOTE: u64 = 0x10002;
pub const TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT: u64 = 0x10004;

/// TDVMCALL completion statuses (GHCI), what the guest reads in R10.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum TdVmCallStatus {
    Success = 0,
    InvalidOperand = 0x8000_0000_0000_0000,
    AlignError = 0x8000_0000_0000_0002,
    /// Also what KVM pre-sets: a call nobody answers gets it.
    SubfuncUnsupported = 0x8000_0000_0000_0003,
}

const FLAGS: usize = 0;
const NR: usize = 8;
const RET: usize = 16;
/// The call's values after `ret`: five words.
const DATA: usize = 24;

/// The little-endian word at `at` of an exit.
fn word(exit: &[u8; TDX_EXIT_BYTES], at: usize) -> u64 {
    u64::from_le_bytes(exit[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes `value` as the little-endian word at `at` of an exit.
fn put(exit: &mut [u8; TDX_EXIT_BYTES], at: usize, value: u64) {
    exit[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// What a TD asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TdVmCall {
    /// A quote of the TDREPORT in the shared buffer `gpa..gpa+size`.
    GetQuote { gpa: u64, size: u64 },
    /// Which optional TDVMCALLs the host serves (leaf 1).
    GetTdVmCallInfo { leaf: u64 },
    /// The interrupt vector to raise when a quote is ready.
    SetupEventNotifyInterrupt { vector: u64 },
    /// A call this code does not know (or flags it does not understand).
    Unknown { nr: u64, flags: u64 },
}

impl TdVmCall {
    /// Reads the exit KVM wrote.
    pub fn decode(exit: &[u8; TDX_EXIT_BYTES]) -> Self {
        let (flags, nr) = (word(exit, FLAGS), word(exit, NR));
        let data = |i: usize| word(exit, DATA + 8 * i);
        match (flags, nr) {
            (0, TDVMCALL_GET_QUOTE) => TdVmCall::GetQuote {
                gpa: data(0),
                size: data(1),
            },
            (0, TDVMCALL_GET_TD_VM_CALL_INFO) => TdVmCall::GetTdVmCallInfo { leaf: data(0) },
            (0, TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT) => {
                TdVmCall::SetupEventNotifyInterrupt { vector: data(0) }
            }
            (flags, nr) => TdVmCall::Unknown { nr, flags },
        }
    }

    /// The exit as KVM writes it, `ret` pre-set to "unsupported" (for
    /// test vCPUs, which play exits this host's KVM cannot produce).
    pub fn encode(&self) -> [u8; TDX_EXIT_BYTES] {
        let (flags, nr, data) = match *self {
            TdVmCall::GetQuote { gpa, size } => (0, TDVMCALL_GET_QUOTE, [gpa, size]),
            TdVmCall::GetTdVmCallInfo { leaf } => (0, TDVMCALL_GET_TD_VM_CALL_INFO, [leaf, 0]),
            TdVmCall::SetupEventNotifyInterrupt { vector } => {
                (0, TDVMCALL_SETUP_EVENT_NOTIFY_INTERRUPT, [vector, 0])
            }
            TdVmCall::Unknown { nr, flags } => (flags, nr, [0, 0]),
        };
        let mut exit = [0u8; TDX_EXIT_BYTES];
        put(&mut exit, FLAGS, flags);
        put(&mut exit, NR, nr);
        put(&mut exit, RET, TdVmCallStatus::SubfuncUnsupported as u64);
        put(&mut exit, DATA, data[0]);
        put(&mut exit, DATA + 8, data[1]);
        exit
    }
}

/// The VMM's answer to a TDVMCALL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TdVmCallAnswer {
    /// Only a status.
    Status(TdVmCallStatus),
    /// GetTdVmCallInfo's success: R11..R14 as the GHCI defines them for
    /// the leaf asked.
    Info([u64; 4]),
}

impl TdVmCallAnswer {
    /// The status the guest reads in R10.
    pub fn status(&self) -> u64 {
        match self {
            TdVmCallAnswer::Status(status) => *status as u64,
            TdVmCallAnswer::Info(_) => TdVmCallStatus::Success as u64,
        }
    }
}

/// Where the answer goes: KVM copies it into the guest's registers when
/// the vCPU re-enters.
#[derive(Debug)]
pub struct TdVmCallReply<'a> {
    exit: &'a mut [u8; TDX_EXIT_BYTES],
}

impl<'a> TdVmCallReply<'a> {
    pub fn new(exit: &'a mut [u8; TDX_EXIT_BYTES]) -> Self {
        TdVmCallReply { exit }
    }

    /// Writes `answer`: the status, and for an info answer R11..R14 (the
    /// words after GetTdVmCallInfo's leaf).
    pub fn complete(self, answer: TdVmCallAnswer) {
        put(self.exit, RET, answer.status());
        if let TdVmCallAnswer::Info(regs) = answer {
            for (i, value) in regs.into_iter().enumerate() {
                put(self.exit, DATA + 8 + 8 * i, value);
            }
        }
    }
}

/// The TDX exit in `run`'s exit union, typed, with its reply.
pub(crate) fn exit_in(run: &mut kvm_bindings::kvm_run) -> crate::VmExit<'_> {
    // SAFETY: the exit union is 256 plain bytes (`padding` spans it), of
    // which the TDX exit is the first 64, alignment 1; the reference
    // borrows `run`, so it is the only one.
    let exit =
        unsafe { &mut *(&raw mut run.__bindgen_anon_1.padding).cast::<[u8; TDX_EXIT_BYTES]>() };
    crate::VmExit::TdVmCall {
        call: TdVmCall::decode(exit),
        reply: TdVmCallReply::new(exit),
    }
}

/// What the guest gets back from a completed exit: its status (R10) and
/// GetTdVmCallInfo's R11..R14, as KVM reads them from the exit.
pub fn completion(exit: &[u8; TDX_EXIT_BYTES]) -> (u64, [u64; 4]) {
    (
        word(exit, RET),
        [0, 1, 2, 3].map(|i| word(exit, DATA + 8 + 8 * i)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The offsets of the uapi's `tdx` member: flags 0, nr 8, then the
    /// union: ret 16, gpa/leaf/vector 24, size/r11 32, r12..r14 40..64.
    #[test]
    fn exits_decode_from_the_uapi_layout() {
        let mut exit = [0u8; TDX_EXIT_BYTES];
        // Little-endian words, as KVM writes them on x86.
        exit[8..10].copy_from_slice(&[0x02, 0x00]);
        exit[10] = 0x01;
        put(&mut exit, 24, 0x7f00_0000);
        put(&mut exit, 32, 0x2000);
        assert_eq!(
            TdVmCall::decode(&exit),
            TdVmCall::GetQuote {
                gpa: 0x7f00_0000,
                size: 0x2000
            }
        );
        for (nr, flags, expected) in [
            (0x10000, 0, TdVmCall::GetTdVmCallInfo { leaf: 0x7f00_0000 }),
            (
                0x10003,
                0,
                TdVmCall::Unknown {
                    nr: 0x10003,
                    flags: 0,
                },
            ),
            // A known call with flags this code does not know is not
            // guessed at.
            (
                0x10002,
                1,
                TdVmCall::Unknown {
                    nr: 0x10002,
                    flags: 1,
                },
            ),
        ] {
            put(&mut exit, 0, flags);
            put(&mut exit, 8, nr);
            assert_eq!(TdVmCall::decode(&exit), expected, "{nr:#x} {flags}");
        }
        exit = [0; TDX_EXIT_BYTES];
        put(&mut exit, 8, 0x10004);
        put(&mut exit, 24, 0x40);
        assert_eq!(
            TdVmCall::decode(&exit),
            TdVmCall::SetupEventNotifyInterrupt { vector: 0x40 }
        );
    }

    /// The exit is read from, and answered into, the start of the run
    /// structure's exit union (offset 32 of `struct kvm_run`).
    #[test]
    fn the_exit_sits_in_the_run_structures_exit_union() {
        let mut run = kvm_bindings::kvm_run::default();
        let exit = TdVmCall::GetTdVmCallInfo { leaf: 1 }.encode();
        // SAFETY: a plain byte view of a plain C structure, for the test.
        let raw = unsafe {
            std::slice::from_raw_parts_mut(
                (&raw mut run).cast::<u8>(),
                std::mem::size_of::<kvm_bindings::kvm_run>(),
            )
        };
        raw[32..96].copy_from_slice(&exit);
        match exit_in(&mut run) {
            crate::VmExit::TdVmCall { call, reply } => {
                assert_eq!(call, TdVmCall::GetTdVmCallInfo { leaf: 1 });
                reply.complete(TdVmCallAnswer::Info([7, 0, 0, 9]));
            }
            other => panic!("{other:?}"),
        }
        // SAFETY: as above.
        let raw = unsafe {
            std::slice::from_raw_parts(
                (&raw const run).cast::<u8>(),
                std::mem::size_of::<kvm_bindings::kvm_run>(),
            )
        };
        let answered: [u8; TDX_EXIT_BYTES] = raw[32..96].try_into().unwrap();
        assert_eq!(completion(&answered), (0, [7, 0, 0, 9]));
    }

    #[test]
    fn encoding_is_what_kvm_writes_and_decodes_back() {
        for call in [
            TdVmCall::GetQuote { gpa: 1, size: 2 },
            TdVmCall::GetTdVmCallInfo { leaf: 1 },
            TdVmCall::SetupEventNotifyInterrupt { vector: 32 },
            TdVmCall::Unknown { nr: 9, flags: 0 },
            TdVmCall::Unknown { nr: 9, flags: 4 },
        ] {
            let exit = call.encode();
            assert_eq!(TdVmCall::decode(&exit), call);
            assert_eq!(word(&exit, 16), 0x8000_0000_0000_0003, "KVM's default");
        }
        let exit = TdVmCall::GetQuote { gpa: 5, size: 6 }.encode();
        assert_eq!(
            (word(&exit, 8), word(&exit, 24), word(&exit, 32)),
            (0x10002, 5, 6)
        );
    }

    /// A status lands in `ret` and nothing else changes; an info answer
    /// is a success with R11..R14 after the leaf, which stays.
    #[test]
    fn answers_land_where_kvm_reads_them() {
        let call = TdVmCall::GetQuote { gpa: 5, size: 6 };
        let mut exit = call.encode();
        TdVmCallReply::new(&mut exit).complete(TdVmCallAnswer::Status(TdVmCallStatus::AlignError));
        assert_eq!(word(&exit, 16), 0x8000_0000_0000_0002);
        assert_eq!(TdVmCall::decode(&exit), call);
        assert_eq!(completion(&exit), (0x8000_0000_0000_0002, [6, 0, 0, 0]));

        let mut exit = TdVmCall::GetTdVmCallInfo { leaf: 1 }.encode();
        TdVmCallReply::new(&mut exit).complete(TdVmCallAnswer::Info([0xa, 0xb, 0xc, 0xd]));
        assert_eq!(word(&exit, 16), 0);
        assert_eq!(word(&exit, 24), 1, "the leaf");
        assert_eq!(
            [32, 40, 48, 56].map(|at| word(&exit, at)),
            [0xa, 0xb, 0xc, 0xd]
        );
        assert_eq!(completion(&exit), (0, [0xa, 0xb, 0xc, 0xd]));
        assert_eq!(TdVmCallAnswer::Info([1; 4]).status(), 0);
    }

    /// The GHCI's numbers, which the guest reads in R10.
    #[test]
    fn statuses_are_the_ghcis_numbers() {
        for (status, number) in [
            (TdVmCallStatus::Success, 0),
            (TdVmCallStatus::InvalidOperand, 0x8000_0000_0000_0000),
            (TdVmCallStatus::AlignError, 0x8000_0000_0000_0002),
            (TdVmCallStatus::SubfuncUnsupported, 0x8000_0000_0000_0003),
        ] {
            assert_eq!(TdVmCallAnswer::Status(status).status(), number);
        }
    }
}
