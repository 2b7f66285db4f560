//! vCPU threads: run the guest, route exits to the buses and the conversion
//! path, and stop cleanly when asked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypervisor::{Vcpu, VmExit};
use log::{debug, error, warn};
use seccompiler::BpfProgram;
use vm_device::Bus;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::conversion_path::ConversionPath;
use crate::seccomp_filters::{SeccompError, spawn_filtered};
use crate::{GuestEvent, GuestEvents};

/// Signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn ignore_kick(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), ignore_kick) {
            error!("cannot install the vCPU kick handler: {e}");
        }
    });
}

pub struct VcpuContext {
    pub io_bus: Arc<Bus>,
    pub mmio_bus: Arc<Bus>,
    pub conversions: Arc<ConversionPath>,
    pub events: GuestEvents,
    pub stop: Arc<AtomicBool>,
    pub pause: Arc<PauseGate>,
}

/// Where vCPUs wait while the VM is paused (`vm.pause`): between two
/// exits, so a conversion or device access in progress finishes first.
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    /// vCPUs waiting at the gate.
    parked: usize,
}

impl PauseGate {
    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn close(&self) {
        self.state().paused = true;
    }

    /// Lets every parked vCPU go on.
    pub fn open(&self) {
        self.state().paused = false;
        self.changed.notify_all();
    }

    /// How many vCPUs wait at the gate.
    pub fn parked(&self) -> usize {
        self.state().parked
    }

    /// Waits while the gate is closed, unless `stop` is raised (shutdown
    /// wakes the gate too).
    fn pass(&self, stop: &AtomicBool) {
        let mut state = self.state();
        if !state.paused {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.paused && !stop.load(Ordering::Acquire) {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked -= 1;
    }

    /// Wakes waiting vCPUs so they see `stop`.
    pub fn wake(&self) {
        let _guard = self.state();
        self.changed.notify_all();
    }
}

pub struct VcpuHandle {
    index: u8,
    thread: Option<JoinHandle<()>>,
}

/// Starts vCPU `index` on its own thread, under `filter` from its first
/// guest instruction on.
pub fn start(
    index: u8,
    vcpu: Box<dyn Vcpu>,
    ctx: Arc<VcpuContext>,
    filter: Option<BpfProgram>,
) -> Result<VcpuHandle, SeccompError> {
    install_kick_handler();
    let thread = spawn_filtered(format!("vcpu{index}"), filter, move || {
        run(index, vcpu, &ctx)
    })?;
    Ok(VcpuHandle {
        index,
        thread: Some(thread),
    })
}

impl VcpuHandle {
    /// Kicks the thread out of KVM_RUN once (a kick that lands outside it
    /// is lost: callers that need the vCPU out retry).
    pub fn kick(&self) {
        if let Some(thread) = &self.thread {
            // A halted vCPU without an irqchip waits parked, not in KVM_RUN.
            thread.thread().unpark();
            let _ = thread.kill(kick_signal());
        }
    }

    /// Whether the vCPU thread still runs the guest.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Kicks the thread until it has left the guest, then joins it. The
    /// caller has already raised the stop flag.
    pub fn stop(&mut self) {
        self.stop_within(Duration::from_secs(5));
    }

    /// As `stop`, giving up (and leaving the thread) after `limit`.
    fn stop_within(&mut self, limit: Duration) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + limit;
        while !thread.is_finished() {
            thread.thread().unpark();
            // A kick that lands outside KVM_RUN is lost, hence the loop.
            let _ = thread.kill(kick_signal());
            if Instant::now() > deadline {
                error!("vCPU {} does not stop; leaving it", self.index);
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = thread.join();
        debug!("vCPU {} stopped", self.index);
    }
}

fn run(index: u8, mut vcpu: Box<dyn Vcpu>, ctx: &VcpuContext) {
    let stopped = || ctx.stop.load(Ordering::Acquire);
    while !stopped() {
        ctx.pause.pass(&ctx.stop);
        if stopped() {
            return;
        }
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                ctx.events.send(GuestEvent::VcpuError(index, e.to_string()));
                return;
            }
        };
        match exit {
            VmExit::IoOut { port, data } => {
                if !ctx.io_bus.write(u64::from(port), data) {
                    debug!("vCPU {index}: unclaimed out to port {port:#x}");
                }
            }
            VmExit::IoIn { port, data } => {
                ctx.io_bus.read(u64::from(port), data);
            }
            VmExit::MmioRead { addr, data } => {
                ctx.mmio_bus.read(addr, data);
            }
            VmExit::MmioWrite { addr, data } => {
                if !ctx.mmio_bus.write(addr, data) {
                    debug!("vCPU {index}: unclaimed MMIO write at {addr:#x}");
                }
            }
            VmExit::Hlt => {
                // Nothing can wake a halted vCPU (no interrupt controller), so
                // it waits for the VM to stop; a pause finds it at the gate.
                while !stopped() {
                    ctx.pause.pass(&ctx.stop);
                    std::thread::park();
                }
            }
            VmExit::MapGpaRange { conversion, reply } => {
                reply.complete(ctx.conversions.convert(conversion, index).is_ok());
            }
            VmExit::BadHypercall { nr } => warn!("vCPU {index}: refused hypercall {nr}"),
            VmExit::MemoryFault(conversion) => {
                // Re-entering without converting would fault again forever.
                if let Err(e) = ctx.conversions.convert(conversion, index) {
                    ctx.events.send(GuestEvent::VcpuError(
                        index,
                        format!("implicit conversion failed: {e}"),
                    ));
                    return;
                }
            }
            VmExit::Shutdown => {
                ctx.events.send(GuestEvent::Shutdown(index));
                return;
            }
            VmExit::SystemEvent(kind) => {
                debug!("vCPU {index}: system event {kind}");
                ctx.events.send(GuestEvent::Shutdown(index));
                return;
            }
            VmExit::Interrupted => {}
            VmExit::Unhandled(what) => {
                ctx.events.send(GuestEvent::VcpuError(
                    index,
                    format!("unhandled exit {what}"),
                ));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
    use vm_device::{DmaMappingListener, Section};

    use super::*;
    use crate::VmmEvent;
    use crate::event_monitor::EventMonitor;
    use crate::memory::{MemoryLayout, MemoryManager};
    use crate::test_util::{conversion, kvm};

    const MIB: u64 = 1 << 20;
    const PAGE: u64 = 4096;
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
        let iommu = Arc::new(FakeIommu::new(None));
        let listener = Arc::new(DmaMappingListener::new(iommu.clone(), entry_limit));
        memory.regions()[0]
            .attributes
            .as_ref()
            .unwrap()
            .register_listener(listener, Section { gpa: 0, size: RAM })
            .unwrap();
        let (tx, events) = channel();
        let ctx = VcpuContext {
            io_bus: Arc::new(Bus::new()),
            mmio_bus: Arc::new(Bus::new()),
            conversions: Arc::new(ConversionPath::new(
                memory.clone(),
                Arc::new(EventMonitor::disabled()),
            )),
            events: GuestEvents { vm: 1, tx },
            stop: Arc::new(AtomicBool::new(false)),
            pause: Arc::default(),
        };
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
}
