//! The TDX launch inside the VM build: once RAM and the firmware region
//! exist (private guest_memfd), the TD's TSC frequency is set on the VM,
//! then the launch runs against KVM with the simulated module in front
//! (`Mirrored`), so a step the rules refuse never reaches KVM and the
//! MRTD of what KVM launched is known. It returns the vCPUs KVM created
//! (initialized, their state the TDX module's), ready to run.

use std::sync::Arc;

use hypervisor::{CpuidEntry, KvmTdxLauncher, Vcpu, Vm, VmType};
use log::info;

use super::FirmwareError;
use super::launch::{Measurement, TdxParams, launch};
use super::simulated_module::{Mirrored, PrivateMemory, SimulatedTdxModule};
use crate::memory::MemoryManager;
use crate::sev_snp::ovmf::OvmfImage;

/// The TSC frequencies the TDX module accepts: 100 MHz to 10 GHz, in
/// steps of 25 MHz (TD_PARAMS' TSC_FREQUENCY).
pub const TSC_KHZ_MIN: u32 = 100_000;
pub const TSC_KHZ_MAX: u32 = 10_000_000;
pub const TSC_KHZ_STEP: u32 = 25_000;

/// A launched TD: its vCPUs (in index order) and what the launch measured.
pub struct Launched {
    pub vcpus: Vec<Box<dyn Vcpu>>,
    pub measurement: Measurement,
    /// The TSC frequency set on the VM, in kHz.
    pub tsc_khz: u32,
}

/// The frequency a TD of a host running at `host_khz` gets: the host's,
/// rounded to the module's 25 MHz steps, if within its range.
pub fn td_tsc_khz(host_khz: u32) -> Result<u32, FirmwareError> {
    let step = u64::from(TSC_KHZ_STEP);
    let rounded = (u64::from(host_khz) + step / 2) / step * step;
    match u32::try_from(rounded) {
        Ok(khz) if (TSC_KHZ_MIN..=TSC_KHZ_MAX).contains(&khz) => Ok(khz),
        _ => Err(FirmwareError::TscOutOfRange(host_khz)),
    }
}

/// Launches `firmware` into `vm`, whose memory `memory` has set up (RAM
/// and the firmware region). `cpuid` is what the vCPUs are to see (only
/// its configurable bits reach `KVM_TDX_INIT_VM`); `path` names the image
/// in errors.
pub fn launch_vm(
    vm: Arc<dyn Vm>,
    memory: &MemoryManager,
    firmware: &OvmfImage,
    path: &str,
    cpuid: &[CpuidEntry],
    params: TdxParams,
) -> Result<Launched, FirmwareError> {
    crate::sev_snp::check_launch_target(&*vm, VmType::Tdx, memory, firmware)?;
    // TDX fixes the TSC frequency for the whole TD at KVM_TDX_INIT_VM: it
    // is the VM's, set before any vCPU exists.
    let host_khz = vm.tsc_khz().map_err(FirmwareError::Tsc)?;
    let tsc_khz = td_tsc_khz(host_khz)?;
    vm.set_tsc_khz(tsc_khz).map_err(FirmwareError::Tsc)?;
    info!("TD TSC frequency: {tsc_khz} kHz (host {host_khz} kHz)");
    // The simulation checks against the memory this VM really has.
    let mut backend = Mirrored {
        simulated: SimulatedTdxModule::new(PrivateMemory(memory.guest_memfd_ranges())),
        real: KvmTdxLauncher::new(vm),
    };
    let ram_size = memory.regions().iter().map(|r| r.size).sum();
    let launched = launch(&mut backend, firmware, ram_size, cpuid, params);
    let (_, init) = launched.map_err(|source| FirmwareError::Launch {
        path: path.to_string(),
        source,
    })?;
    let mrtd = backend.simulated.mrtd().hex();
    Ok(Launched {
        vcpus: backend.real.into_vcpus(),
        measurement: Measurement {
            mrtd,
            attributes: init.attributes,
            xfam: init.xfam,
        },
        tsc_khz,
    })
}

#[cfg(test)]
mod tests;
