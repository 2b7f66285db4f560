//! The real vCPU loop driven by a scripted vCPU through the exits this
//! machine's KVM cannot produce, on real guest_memfd RAM whose memory
//! attributes are tracked with KVM's rules (`AttributeTrackingVm`), with
//! a device following. After the script: the guest saw the right value
//! in RAX for every hypercall, KVM's attributes are the complement of
//! the shared set, and the device maps exactly the shared set.

use std::sync::mpsc::channel;

use hypervisor::attribute_tracking::AttributeTrackingVm;
use hypervisor::scripted_vcpu::{ScriptedExit, ScriptedVcpu};
use hypervisor::{HYPERCALL_EINVAL, Hypervisor, VmType};
use vm_device::fake_iommu::FakeIommu;

use super::*;
use crate::VmmEvent;
use crate::memory::{MemoryLayout, MemoryManager};
use crate::test_util::{conversion, fake_device_on_ram, kvm, vcpu_context};

const MIB: u64 = 1 << 20;
use arch::layout::PAGE_SIZE as PAGE;
const RAM: u64 = 64 * MIB;

struct Rig {
    vm: Arc<AttributeTrackingVm>,
    memory: Arc<MemoryManager>,
    iommu: Arc<FakeIommu>,
    ctx: VcpuContext,
    events: std::sync::mpsc::Receiver<VmmEvent>,
}

/// `entry_limit`: most mappings the device accepts.
fn rig(entry_limit: Option<u64>) -> Option<Rig> {
    let vm = Arc::new(AttributeTrackingVm::new(
        kvm()?.create_vm(VmType::Default).unwrap(),
    ));
    let memory = Arc::new(MemoryManager::new(vm.clone(), RAM, MemoryLayout::Auto).unwrap());
    let iommu = fake_device_on_ram(&memory, RAM, entry_limit);
    let (tx, events) = channel();
    let ctx = vcpu_context(memory.clone(), tx);
    Some(Rig {
        vm,
        memory,
        iommu,
        ctx,
        events,
    })
}

fn shared_runs(memory: &MemoryManager) -> Vec<(u64, u64)> {
    let attrs = memory.regions()[0].attributes.as_ref().unwrap();
    let mut runs = Vec::new();
    attrs
        .replay_populated(0, RAM, |s| {
            runs.push((s.gpa, s.size));
            Ok::<(), ()>(())
        })
        .unwrap();
    runs
}

/// KVM's private set must be the complement of the shared set, and the
/// device must map exactly the shared set.
fn assert_in_step(rig: &Rig) {
    let shared = shared_runs(&rig.memory);
    let mut complement = Vec::new();
    let mut cursor = 0;
    for &(gpa, size) in &shared {
        if gpa > cursor {
            complement.push((cursor, gpa - cursor));
        }
        cursor = gpa + size;
    }
    if cursor < RAM {
        complement.push((cursor, RAM - cursor));
    }
    assert_eq!(rig.vm.private_ranges(), complement, "KVM attributes");
    let mapped: Vec<(u64, u64)> = rig
        .iommu
        .mappings()
        .iter()
        .map(|s| (s.gpa, s.size))
        .collect();
    assert_eq!(mapped, shared, "device mappings");
}

#[test]
fn hypercalls_and_memory_faults_go_through_the_real_loop() {
    // Two mappings at most: the fifth exit below needs a third.
    let Some(rig) = rig(Some(2)) else { return };
    let base = 16 * MIB;
    let (vcpu, results) = ScriptedVcpu::new([
        // Accepted: four pages shared (one mapping).
        ScriptedExit::MapGpaRange(conversion(base, 4 * PAGE, true)),
        // An implicit conversion: the guest touched page 1 as private
        // (the mapping splits in two).
        ScriptedExit::MemoryFault(conversion(base + PAGE, PAGE, false)),
        // Beyond RAM (MMIO, holes): to-shared is accepted with nothing
        // to change, as firmware expects; to-private is refused.
        ScriptedExit::MapGpaRange(conversion(RAM, PAGE, true)),
        ScriptedExit::MapGpaRange(conversion(RAM, PAGE, false)),
        // Refused: unaligned, half RAM half hole, and by the device's
        // limit.
        ScriptedExit::MapGpaRange(conversion(base + 1, PAGE, true)),
        ScriptedExit::MapGpaRange(conversion(RAM - PAGE, 2 * PAGE, true)),
        ScriptedExit::MapGpaRange(conversion(base + 8 * PAGE, PAGE, true)),
        // Accepted again: page 0 back to private.
        ScriptedExit::MapGpaRange(conversion(base, PAGE, false)),
    ]);
    assert_eq!(rig.memory.unbacked_to_shared(), 0);
    run(0, Box::new(vcpu), &rig.ctx);
    assert_eq!(
        *results.lock().unwrap(),
        [
            0,
            0,
            HYPERCALL_EINVAL,
            HYPERCALL_EINVAL,
            HYPERCALL_EINVAL,
            HYPERCALL_EINVAL,
            0
        ],
        "the guest's RAX after each hypercall"
    );
    assert!(matches!(
        rig.events.try_recv(),
        Ok(VmmEvent::Guest {
            vm: 1,
            event: GuestEvent::Shutdown(0)
        })
    ));
    assert_in_step(&rig);
    assert_eq!(
        shared_runs(&rig.memory),
        [(base + 2 * PAGE, 2 * PAGE)],
        "page 0 back to private, page 1 private by fault"
    );
    let totals = rig.memory.conversion_totals();
    assert_eq!(
        (totals.to_shared, totals.to_private, totals.failed),
        (1, 2, 4)
    );
    assert_eq!(rig.memory.unbacked_to_shared(), 1);
}

#[test]
fn a_refused_memory_fault_stops_the_vcpu_loudly_and_changes_nothing() {
    let Some(rig) = rig(None) else { return };
    let base = 16 * MIB;
    rig.iommu.fail_next_maps(1);
    let (vcpu, results) = ScriptedVcpu::new([
        ScriptedExit::MemoryFault(conversion(base, PAGE, true)),
        ScriptedExit::MapGpaRange(conversion(base, PAGE, true)),
    ]);
    run(3, Box::new(vcpu), &rig.ctx);
    match rig.events.try_recv() {
        Ok(VmmEvent::Guest {
            event: GuestEvent::VcpuError(3, what),
            ..
        }) => {
            assert!(what.contains("implicit conversion failed"), "{what}")
        }
        _ => panic!("no vCPU error"),
    }
    assert!(results.lock().unwrap().is_empty(), "the loop stopped");
    assert!(shared_runs(&rig.memory).is_empty());
    assert_in_step(&rig);
}

/// Runs `f` on a thread; whether it returned within `limit`.
fn returns_within(limit: Duration, f: impl FnOnce() + Send + 'static) -> bool {
    let (done, finished) = channel();
    std::thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    finished.recv_timeout(limit).is_ok()
}

fn wait_for(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn the_pause_gate_holds_vcpus_until_it_opens_or_the_vm_stops() {
    let gate = Arc::new(PauseGate::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Open: nobody waits.
    gate.pass(&stop);
    assert_eq!(gate.parked(), 0);

    gate.close();
    let passed = Arc::new(AtomicBool::new(false));
    let (g, st, p) = (gate.clone(), stop.clone(), passed.clone());
    let waiter = std::thread::spawn(move || {
        g.pass(&st);
        p.store(true, Ordering::Release);
    });
    assert!(wait_for(|| gate.parked() == 1), "the vCPU never parked");
    std::thread::sleep(Duration::from_millis(50));
    assert!(!passed.load(Ordering::Acquire), "passed a closed gate");
    gate.open();
    assert!(
        wait_for(|| passed.load(Ordering::Acquire)),
        "open let nobody go"
    );
    waiter.join().unwrap();
    assert_eq!(gate.parked(), 0);

    // Closed again: a stop and a wake let the vCPU go without opening.
    gate.close();
    let (g, st) = (gate.clone(), stop.clone());
    let waiter = std::thread::spawn(move || g.pass(&st));
    assert!(wait_for(|| gate.parked() == 1));
    stop.store(true, Ordering::Release);
    gate.wake();
    assert!(
        wait_for(|| waiter.is_finished()),
        "stop and wake left it waiting"
    );
    assert_eq!(gate.parked(), 0);
}

/// A vCPU whose every `run` is `step` (exits that borrow nothing);
/// its register calls do nothing.
struct FakeVcpu<F>(F);

impl<F: FnMut() -> VmExit<'static> + Send> Vcpu for FakeVcpu<F> {
    fn get_regs(&self) -> hypervisor::Result<hypervisor::arch::StandardRegisters> {
        Ok(Default::default())
    }
    fn set_regs(&self, _: &hypervisor::arch::StandardRegisters) -> hypervisor::Result<()> {
        Ok(())
    }
    fn get_sregs(&self) -> hypervisor::Result<hypervisor::arch::SpecialRegisters> {
        Ok(Default::default())
    }
    fn set_sregs(&self, _: &hypervisor::arch::SpecialRegisters) -> hypervisor::Result<()> {
        Ok(())
    }
    fn set_cpuid(&self, _: &[hypervisor::arch::CpuidEntry]) -> hypervisor::Result<()> {
        Ok(())
    }
    fn set_fpu(&self, _: &hypervisor::arch::FpuState) -> hypervisor::Result<()> {
        Ok(())
    }
    fn set_msrs(&self, _: &[(u32, u64)]) -> hypervisor::Result<()> {
        Ok(())
    }
    fn set_lapic_lints(&self) -> hypervisor::Result<()> {
        Ok(())
    }
    fn wait_for_startup_ipi(&self) -> hypervisor::Result<()> {
        Ok(())
    }
    fn run(&mut self) -> hypervisor::Result<VmExit<'_>> {
        Ok((self.0)())
    }
}

/// Raises its flag when dropped, a while after: a `stop` that does not
/// wait for the vCPU thread to end shows.
struct SlowToGo(Arc<AtomicBool>);

impl Drop for SlowToGo {
    fn drop(&mut self) {
        std::thread::sleep(Duration::from_millis(100));
        self.0.store(true, Ordering::Release);
    }
}

fn blocked_vcpu() -> Option<(VcpuHandle, Arc<AtomicBool>, Arc<AtomicBool>)> {
    let rig = rig(None)?;
    let stop = rig.ctx.stop.clone();
    let gone = Arc::new(AtomicBool::new(false));
    let guard = SlowToGo(gone.clone());
    // Blocks as KVM_RUN does, until a signal interrupts it.
    let vcpu = Box::new(FakeVcpu(move || {
        let _ = &guard;
        // SAFETY: pause() takes nothing and returns once a signal has
        // been handled.
        unsafe { libc::pause() };
        VmExit::Interrupted
    }));
    let handle = start(0, vcpu, Arc::new(rig.ctx), None).unwrap();
    Some((handle, stop, gone))
}

#[test]
fn a_halted_vcpu_stays_out_of_the_guest_until_the_vm_stops() {
    let Some(rig) = rig(None) else { return };
    let stop = rig.ctx.stop.clone();
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let entries = runs.clone();
    // Halts, counting every entry.
    let vcpu = Box::new(FakeVcpu(move || {
        entries.fetch_add(1, Ordering::AcqRel);
        VmExit::Hlt
    }));
    let mut handle = start(1, vcpu, Arc::new(rig.ctx), None).unwrap();
    assert!(wait_for(|| runs.load(Ordering::Acquire) == 1));
    // Kicks (a pause, say) do not send it back in.
    for _ in 0..5 {
        handle.kick();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(runs.load(Ordering::Acquire), 1, "a halted vCPU re-entered");
    assert!(handle.is_running());
    stop.store(true, Ordering::Release);
    handle.stop();
    assert_eq!(runs.load(Ordering::Acquire), 1);
}

#[test]
fn the_kick_is_a_real_time_signal_the_vmm_handles_nowhere_else() {
    // SIGTERM, SIGINT and SIGHUP end the VMM; a kick must not.
    assert!((libc::SIGRTMIN()..=libc::SIGRTMAX()).contains(&kick_signal()));
}

#[test]
fn a_kick_takes_a_vcpu_out_of_a_blocking_run() {
    let Some((handle, stop, gone)) = blocked_vcpu() else {
        return;
    };
    assert!(handle.is_running());
    std::thread::sleep(Duration::from_millis(20));
    assert!(handle.is_running(), "the vCPU left without a kick");
    stop.store(true, Ordering::Release);
    // A kick landing before the thread blocks is lost: kick again.
    assert!(
        wait_for(|| {
            handle.kick();
            !handle.is_running()
        }),
        "kicks never took the vCPU out"
    );
    assert!(gone.load(Ordering::Acquire));
}

#[test]
fn stop_gives_up_on_a_vcpu_that_never_leaves_the_guest() {
    let Some(rig) = rig(None) else { return };
    let stop = rig.ctx.stop.clone();
    let release = Arc::new(AtomicBool::new(false));
    let entered = Arc::new(AtomicBool::new(false));
    let (inside, let_go) = (entered.clone(), release.clone());
    // Ignores kicks until released.
    let vcpu = Box::new(FakeVcpu(move || {
        inside.store(true, Ordering::Release);
        while !let_go.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(1));
        }
        VmExit::Interrupted
    }));
    let mut handle = start(2, vcpu, Arc::new(rig.ctx), None).unwrap();
    assert!(wait_for(|| entered.load(Ordering::Acquire)));
    stop.store(true, Ordering::Release);
    let started = Instant::now();
    assert!(returns_within(Duration::from_secs(3), move || {
        handle.stop_within(Duration::from_millis(50))
    }));
    assert!(started.elapsed() >= Duration::from_millis(50));
    release.store(true, Ordering::Release);
}

#[test]
fn stop_returns_once_the_vcpu_thread_has_ended() {
    let Some((mut handle, stop, gone)) = blocked_vcpu() else {
        return;
    };
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, Ordering::Release);
    assert!(returns_within(Duration::from_secs(3), move || {
        handle.stop();
        assert!(!handle.is_running());
        assert!(
            gone.load(Ordering::Acquire),
            "stop returned before the thread ended"
        );
    }));
}

/// What a TD sends to userspace after launch goes through the real loop:
/// every TDVMCALL gets its answer on re-entry (none left at KVM's default
/// by accident, none stopping the vCPU), and a MapGPA between them still
/// converts.
#[test]
fn a_tds_tdvmcalls_are_answered_by_the_real_loop() {
    use hypervisor::TdVmCall;
    let Some(rig) = rig(None) else { return };
    let base = 16 * MIB;
    let (vcpu, results) = ScriptedVcpu::new([
        ScriptedExit::TdVmCall(TdVmCall::GetTdVmCallInfo { leaf: 1 }),
        ScriptedExit::TdVmCall(TdVmCall::GetTdVmCallInfo { leaf: 3 }),
        ScriptedExit::TdVmCall(TdVmCall::GetQuote {
            gpa: base,
            size: 2 * PAGE,
        }),
        ScriptedExit::TdVmCall(TdVmCall::GetQuote {
            gpa: base + 8,
            size: PAGE,
        }),
        ScriptedExit::MapGpaRange(conversion(base, PAGE, true)),
        ScriptedExit::TdVmCall(TdVmCall::SetupEventNotifyInterrupt { vector: 0x40 }),
        ScriptedExit::TdVmCall(TdVmCall::Unknown {
            nr: 0x1_0042,
            flags: 0,
        }),
    ]);
    let answers = vcpu.tdvmcall_answers();
    // KVM's default before the VMM answers: the info answer must change it.
    let (unsupported, invalid, align) = (
        0x8000_0000_0000_0003,
        0x8000_0000_0000_0000,
        0x8000_0000_0000_0002,
    );
    run(0, Box::new(vcpu), &rig.ctx);
    let statuses: Vec<u64> = answers.lock().unwrap().iter().map(|a| a.0).collect();
    assert_eq!(
        statuses,
        [0, invalid, unsupported, align, unsupported, unsupported],
        "R10 after each TDVMCALL"
    );
    assert_eq!(answers.lock().unwrap()[0].1, [0; 4], "no optional TDVMCALL");
    assert_eq!(*results.lock().unwrap(), [0], "the MapGPA converted");
    assert_eq!(shared_runs(&rig.memory), [(base, PAGE)]);
    assert!(matches!(
        rig.events.try_recv(),
        Ok(VmmEvent::Guest {
            vm: 1,
            event: GuestEvent::Shutdown(0)
        })
    ));
}
