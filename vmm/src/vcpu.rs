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
    /// The userspace IOAPIC of a split irqchip (TDX), which EOI exits feed.
    pub ioapic: Option<Arc<crate::tdx::split_irqchip::SplitIoapic>>,
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
                // HLT exits to us only when the vCPU has no in-kernel irqchip
                // (with one, KVM waits in KVM_RUN for the interrupt that wakes
                // it). Without it nothing here can send one, so the vCPU
                // waits for the VM to stop; a pause finds it at the gate.
                while !stopped() {
                    ctx.pause.pass(&ctx.stop);
                    std::thread::park();
                }
            }
            VmExit::MapGpaRange { conversion, reply } => {
                reply.complete(ctx.conversions.convert(conversion, index).is_ok());
            }
            VmExit::BadHypercall { nr } => warn!("vCPU {index}: refused hypercall {nr}"),
            VmExit::TdVmCall { call, reply } => {
                let answer = guest_calls::answer(call);
                debug!("vCPU {index}: {call:?} answered {answer:?}");
                reply.complete(answer);
            }
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
            VmExit::IoapicEoi(vector) => match &ctx.ioapic {
                Some(ioapic) => ioapic.end_of_interrupt(vector),
                None => debug!("vCPU {index}: EOI of vector {vector} without a userspace IOAPIC"),
            },
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

mod guest_calls;

#[cfg(test)]
mod tests;
