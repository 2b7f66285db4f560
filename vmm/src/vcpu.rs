//! vCPU threads: run the guest, route exits to the buses and the conversion
//! path, and stop cleanly when asked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hypervisor::{Vcpu, VmExit};
use log::{debug, error, warn};
use seccompiler::BpfProgram;
use vm_device::Bus;
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::VmmEvent;
use crate::conversion_path::ConversionPath;
use crate::seccomp_filters::{SeccompError, spawn_filtered};

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
    pub events: Sender<VmmEvent>,
    pub stop: Arc<AtomicBool>,
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
    /// Kicks the thread until it has left the guest, then joins it. The
    /// caller has already raised the stop flag.
    pub fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
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
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                let _ = ctx.events.send(VmmEvent::VcpuError(index, e.to_string()));
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
                // it waits for the VM to stop.
                while !stopped() {
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
                    let _ = ctx.events.send(VmmEvent::VcpuError(
                        index,
                        format!("implicit conversion failed: {e}"),
                    ));
                    return;
                }
            }
            VmExit::Shutdown => {
                let _ = ctx.events.send(VmmEvent::GuestShutdown(index));
                return;
            }
            VmExit::SystemEvent(kind) => {
                debug!("vCPU {index}: system event {kind}");
                let _ = ctx.events.send(VmmEvent::GuestShutdown(index));
                return;
            }
            VmExit::Interrupted => {}
            VmExit::Unhandled(what) => {
                let _ = ctx
                    .events
                    .send(VmmEvent::VcpuError(index, format!("unhandled exit {what}")));
                return;
            }
        }
    }
}
