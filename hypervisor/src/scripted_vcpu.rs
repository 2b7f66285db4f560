//! A vCPU that plays a script of exits, for driving the VMM's real vCPU loop
//! through exits this machine's KVM cannot produce (`KVM_EXIT_HYPERCALL`
//! with `KVM_HC_MAP_GPA_RANGE`, `KVM_EXIT_MEMORY_FAULT`, `KVM_EXIT_TDX`).
//! It keeps KVM's contract for hypercalls: the VMM writes the result into
//! the exit's return slot, and it lands in the guest's RAX when the vCPU
//! re-enters; a TDVMCALL's answer is read back from the exit the same way.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::tdvmcall::{TDX_EXIT_BYTES, TdVmCall, TdVmCallReply, completion};
use crate::vcpu_exit::HypercallReply;
use crate::{MemoryConversion, Result, Vcpu, VmExit, arch};

/// What the return slot holds until the VMM completes a hypercall.
pub const UNANSWERED: u64 = 0x5c21_7ed0_dead_beef;

#[derive(Debug, Clone, Copy)]
pub enum ScriptedExit {
    MapGpaRange(MemoryConversion),
    MemoryFault(MemoryConversion),
    TdVmCall(TdVmCall),
    /// `KVM_EXIT_IOAPIC_EOI` of this vector.
    IoapicEoi(u8),
}

/// What a TD got back from a TDVMCALL: R10 (the status) and R11..R14.
pub type TdVmCallAnswers = Arc<Mutex<Vec<(u64, [u64; 4])>>>;

pub struct ScriptedVcpu {
    script: VecDeque<ScriptedExit>,
    ret: u64,
    rax: u64,
    hypercall_pending: bool,
    /// The guest's RAX after each MAP_GPA_RANGE, in order.
    results: Arc<Mutex<Vec<u64>>>,
    tdx_exit: [u8; TDX_EXIT_BYTES],
    tdvmcall_pending: bool,
    tdvmcall_answers: TdVmCallAnswers,
}

impl ScriptedVcpu {
    /// Plays `script`, then exits with `Shutdown`.
    pub fn new(script: impl IntoIterator<Item = ScriptedExit>) -> (Self, Arc<Mutex<Vec<u64>>>) {
        let results = Arc::new(Mutex::new(Vec::new()));
        let vcpu = ScriptedVcpu {
            script: script.into_iter().collect(),
            ret: UNANSWERED,
            rax: 0,
            hypercall_pending: false,
            results: results.clone(),
            tdx_exit: [0; TDX_EXIT_BYTES],
            tdvmcall_pending: false,
            tdvmcall_answers: Arc::default(),
        };
        (vcpu, results)
    }

    /// What the guest got back from each TDVMCALL, in order.
    pub fn tdvmcall_answers(&self) -> TdVmCallAnswers {
        self.tdvmcall_answers.clone()
    }
}

impl Vcpu for ScriptedVcpu {
    fn get_regs(&self) -> Result<arch::StandardRegisters> {
        Ok(arch::StandardRegisters {
            rax: self.rax,
            ..Default::default()
        })
    }

    fn set_regs(&self, _regs: &arch::StandardRegisters) -> Result<()> {
        Ok(())
    }

    fn get_sregs(&self) -> Result<arch::SpecialRegisters> {
        Ok(arch::SpecialRegisters::default())
    }

    fn set_sregs(&self, _sregs: &arch::SpecialRegisters) -> Result<()> {
        Ok(())
    }

    // A scripted vCPU runs no guest code: there is no CPU state to set.
    fn set_cpuid(&self, _entries: &[arch::CpuidEntry]) -> Result<()> {
        Ok(())
    }

    fn set_fpu(&self, _fpu: &arch::FpuState) -> Result<()> {
        Ok(())
    }

    fn set_msrs(&self, _msrs: &[(u32, u64)]) -> Result<()> {
        Ok(())
    }

    fn set_lapic_lints(&self) -> Result<()> {
        Ok(())
    }

    fn wait_for_startup_ipi(&self) -> Result<()> {
        Ok(())
    }

    fn run(&mut self) -> Result<VmExit<'_>> {
        // Re-entry: KVM copies the hypercall's result into RAX.
        if std::mem::take(&mut self.hypercall_pending) {
            self.rax = self.ret;
            self.results.lock().unwrap().push(self.rax);
        }
        // KVM reads a TDVMCALL's answer from the exit on re-entry.
        if std::mem::take(&mut self.tdvmcall_pending) {
            let answer = completion(&self.tdx_exit);
            self.tdvmcall_answers.lock().unwrap().push(answer);
        }
        Ok(match self.script.pop_front() {
            Some(ScriptedExit::MapGpaRange(conversion)) => {
                self.ret = UNANSWERED;
                self.hypercall_pending = true;
                VmExit::MapGpaRange {
                    conversion,
                    reply: HypercallReply::new(&mut self.ret),
                }
            }
            Some(ScriptedExit::MemoryFault(conversion)) => VmExit::MemoryFault(conversion),
            Some(ScriptedExit::TdVmCall(call)) => {
                self.tdx_exit = call.encode();
                self.tdvmcall_pending = true;
                VmExit::TdVmCall {
                    call,
                    reply: TdVmCallReply::new(&mut self.tdx_exit),
                }
            }
            Some(ScriptedExit::IoapicEoi(vector)) => VmExit::IoapicEoi(vector),
            None => VmExit::Shutdown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConversionDirection;

    #[test]
    fn a_completed_hypercall_lands_in_rax_on_reentry_as_kvm_does() {
        let conversion = MemoryConversion {
            gpa: 0x10_0000,
            size: 0x1000,
            direction: ConversionDirection::ToShared,
        };
        let (mut vcpu, results) = ScriptedVcpu::new([
            ScriptedExit::MapGpaRange(conversion),
            ScriptedExit::MapGpaRange(conversion),
            ScriptedExit::MemoryFault(conversion),
        ]);
        for ok in [false, true] {
            match vcpu.run().unwrap() {
                VmExit::MapGpaRange { reply, .. } => reply.complete(ok),
                other => panic!("{other:?}"),
            }
            // A result reaches RAX only when the vCPU enters again: now RAX
            // holds the previous hypercall's (none before the first).
            let previous = if ok {
                crate::vcpu_exit::HYPERCALL_EINVAL
            } else {
                0
            };
            assert_eq!(vcpu.get_regs().unwrap().rax, previous);
        }
        assert!(matches!(vcpu.run().unwrap(), VmExit::MemoryFault(c) if c == conversion));
        assert_eq!(vcpu.get_regs().unwrap().rax, 0);
        assert!(matches!(vcpu.run().unwrap(), VmExit::Shutdown));
        assert_eq!(
            *results.lock().unwrap(),
            [crate::vcpu_exit::HYPERCALL_EINVAL, 0]
        );
    }

    /// An answered TDVMCALL is what the guest gets on re-entry; one left
    /// unanswered gets KVM's default, "unsupported".
    #[test]
    fn a_tdvmcalls_answer_is_read_back_on_reentry() {
        use crate::tdvmcall::{TdVmCallAnswer, TdVmCallStatus};
        let info = TdVmCall::GetTdVmCallInfo { leaf: 1 };
        let (mut vcpu, _) = ScriptedVcpu::new([
            ScriptedExit::TdVmCall(info),
            ScriptedExit::TdVmCall(TdVmCall::Unknown { nr: 5, flags: 0 }),
        ]);
        let answers = vcpu.tdvmcall_answers();
        match vcpu.run().unwrap() {
            VmExit::TdVmCall { call, reply } => {
                assert_eq!(call, info);
                reply.complete(TdVmCallAnswer::Info([1, 2, 3, 4]));
            }
            other => panic!("{other:?}"),
        }
        assert!(answers.lock().unwrap().is_empty(), "not before re-entry");
        assert!(matches!(vcpu.run().unwrap(), VmExit::TdVmCall { .. }));
        assert!(matches!(vcpu.run().unwrap(), VmExit::Shutdown));
        assert_eq!(
            *answers.lock().unwrap(),
            [
                (0, [1, 2, 3, 4]),
                (TdVmCallStatus::SubfuncUnsupported as u64, [0; 4])
            ]
        );
    }
}
