//! What the SEV-SNP and TDX firmware-boot tests share: Debian's OVMF.fd in
//! a scratch file, a configuration that boots it, `Vm::boot` against a fake
//! confidential hypervisor, the check that nothing of a VM is left, and the
//! count that lets a test refuse the n-th launch command.

use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex, MutexGuard};

use hypervisor::attribute_tracking::{AttributeTrackingVm, ConfidentialTestHypervisor};
use hypervisor::{Hypervisor, KvmHypervisor};

use crate::GuestEvents;
use crate::config::{ConsoleOutput, CpusConfig, MemoryConfig, PlatformConfig, VmConfig};
use crate::event_monitor::EventMonitor;
use crate::memory::{MemoryLayout, MemoryManager};
use crate::sev_snp::ovmf;
use crate::vm::{Vm, VmError};

/// The guest RAM every firmware-boot test gives.
pub(crate) const RAM: &str = "size=64M";

/// A fake confidential hypervisor whose launch backend `L` (the processor
/// or the module) the test keeps a handle on, and the firmware file it
/// boots.
pub(crate) struct FirmwareRig<L> {
    pub hypervisor: ConfidentialTestHypervisor,
    pub launcher: L,
    pub firmware: PathBuf,
}

impl<L: Clone> FirmwareRig<L> {
    /// The rig, or None without KVM or Debian's OVMF.fd. `hypervisor`
    /// builds the fake over this host's KVM with a clone of `launcher`.
    pub fn new(
        tag: &str,
        launcher: L,
        hypervisor: impl FnOnce(Arc<KvmHypervisor>, L) -> ConfidentialTestHypervisor,
    ) -> Option<Self> {
        let data = ovmf::tests::debian_ovmf()?;
        let kvm = crate::test_util::kvm()?;
        let firmware = crate::test_util::scratch_path(tag);
        std::fs::write(&firmware, data).unwrap();
        Some(FirmwareRig {
            hypervisor: hypervisor(Arc::new(kvm), launcher.clone()),
            launcher,
            firmware,
        })
    }

    /// A VM of `vcpus` booting the rig's firmware on `platform`.
    pub fn config(&self, vcpus: u8, platform: &str) -> VmConfig {
        VmConfig {
            kernel: Default::default(),
            firmware: Some(self.firmware.clone()),
            cmdline: None,
            initramfs: None,
            memory: MemoryConfig::parse(RAM).unwrap(),
            platform: PlatformConfig::parse(platform).unwrap(),
            cpus: CpusConfig::parse(&format!("boot={vcpus}")).unwrap(),
            serial: ConsoleOutput::Off,
            devices: Vec::new(),
            user_devices: Vec::new(),
        }
        .normalized()
    }

    pub fn boot(&self, config: VmConfig) -> Result<Vm, VmError> {
        let (tx, _events) = channel();
        Vm::boot(
            config,
            &self.hypervisor,
            GuestEvents { vm: 1, tx },
            Arc::new(EventMonitor::disabled()),
            None,
        )
    }

    /// The one VM the fake created.
    pub fn fake_vm(&self) -> Arc<AttributeTrackingVm> {
        let created = self.hypervisor.created();
        assert_eq!(created.len(), 1, "one VM created");
        created[0].clone()
    }

    /// The VM's guest_memfd memory is its RAM (`RAM`, from 0) and the
    /// firmware's 2 MiB ending at 4 GiB, and the fake holds both private.
    pub fn assert_ram_and_image_private(&self, vm: &Vm) {
        let ram = MemoryConfig::parse(RAM).unwrap().size;
        let (gpa, size) = OVMF_REGION;
        let fake = self.fake_vm();
        assert!(fake.is_private(gpa, size), "the image");
        assert!(fake.is_private(0, ram), "RAM");
        assert_eq!(vm.memory().guest_memfd_ranges(), [(0, ram), OVMF_REGION]);
    }

    /// Shuts `vm` down and drops it with the test's `fake` handle on it:
    /// then nothing of it is left.
    pub fn shut_down(&self, mut vm: Vm, fake: Arc<AttributeTrackingVm>) {
        vm.shutdown();
        drop(vm);
        drop(fake);
        self.assert_nothing_left();
    }

    /// Nothing of a VM is left: no vCPU exists and nothing but the fake's
    /// list and this check holds the VM (so its memory manager, slots and
    /// mappings are gone).
    pub fn assert_nothing_left(&self) {
        let vm = self.fake_vm();
        assert_eq!(vm.live_vcpus(), 0, "vCPUs left");
        assert_eq!(Arc::strong_count(&vm), 2, "something still holds the VM");
    }
}

impl<T> FirmwareRig<Counted<T>> {
    /// The build of `config` stops with `refusal` in its error chain after
    /// KVM saw `sent` launch commands (the simulation's rules refused the
    /// next before KVM could), the launch never finished, and nothing of
    /// the VM is left.
    pub fn assert_the_rules_refuse(&self, config: VmConfig, refusal: &str, sent: usize) {
        let Err(err) = self.boot(config) else {
            panic!("booted where {refusal:?} was due");
        };
        let chain = crate::error_chain(&err);
        assert!(chain.contains(refusal), "{chain}");
        assert_eq!(self.launcher.sent(), sent, "the commands KVM saw");
        assert!(!self.fake_vm().launch_finished());
        self.assert_nothing_left();
    }
}

impl<L> Drop for FirmwareRig<L> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.firmware);
    }
}

/// Every launch command the backend can refuse, in turn (`rig(Some(n))`
/// builds a rig refusing the n-th, `rig(None)` one refusing none): the
/// build of `config` stops naming the firmware boot, `launch` and the
/// reason; the VM's launch and the backend never `finished`, and nothing
/// of the VM is left. Returns how many commands a whole launch sends (at
/// least one), or None without KVM or the firmware.
pub(crate) fn assert_every_refused_step_stops<T>(
    rig: impl Fn(Option<usize>) -> Option<FirmwareRig<Counted<T>>>,
    config: impl Fn(&FirmwareRig<Counted<T>>) -> VmConfig,
    launch: &str,
    finished: impl Fn(&T) -> bool,
) -> Option<usize> {
    let whole = rig(None)?;
    drop(whole.boot(config(&whole)).unwrap());
    let steps = whole.launcher.sent();
    assert!(steps > 0);
    drop(whole);
    for step in 0..steps {
        let rig = rig(Some(step))?;
        let Err(err) = rig.boot(config(&rig)) else {
            panic!("step {step} refused, yet the VM booted");
        };
        let chain = crate::error_chain(&err);
        assert!(
            chain.contains("cannot boot the firmware")
                && chain.contains(launch)
                && chain.contains("refused: injected by the test"),
            "step {step}: {chain}"
        );
        assert!(!rig.fake_vm().launch_finished(), "step {step}");
        assert!(!finished(&rig.launcher.backend()), "step {step}");
        rig.assert_nothing_left();
    }
    Some(steps)
}

/// Boots `config` on this host's real KVM: a host with `vm_type` boots
/// it; one without stops before creating anything, saying which type is
/// missing and `absent` ("no TDX here").
pub(crate) fn assert_this_host_boots_or_says_why(
    config: VmConfig,
    vm_type: hypervisor::VmType,
    absent: &str,
) {
    let Some(kvm) = crate::test_util::kvm() else {
        return;
    };
    let (tx, _events) = channel();
    let result = Vm::boot(
        config,
        &kvm,
        GuestEvents { vm: 1, tx },
        Arc::new(EventMonitor::disabled()),
        None,
    );
    let Err(err) = result else {
        assert!(kvm.capabilities().supports_vm_type(vm_type));
        return;
    };
    let chain = crate::error_chain(&err);
    let unavailable = format!("VM type {} is not available on this host", vm_type.name());
    for part in ["cannot boot the firmware", &unavailable, absent] {
        assert!(chain.contains(part), "{part:?} is not in: {chain}");
    }
}

/// Where Debian's OVMF.fd goes: the 2 MiB below 4 GiB.
pub(crate) const OVMF_REGION: (u64, u64) = (0xffe0_0000, 0x20_0000);

/// A 16 MiB memory manager for `vm`, with the firmware region `firmware`
/// (address, size) when given.
pub(crate) fn memory_with_firmware(
    vm: Arc<dyn hypervisor::Vm>,
    firmware: Option<(u64, u64)>,
) -> MemoryManager {
    let memory = MemoryManager::new(vm, 16 << 20, MemoryLayout::Auto).unwrap();
    match firmware {
        Some((gpa, size)) => memory.with_firmware(gpa, size, MemoryLayout::Auto).unwrap(),
        None => memory,
    }
}

/// `launch` (into a VM, with a firmware region) refuses a default VM, a
/// VM of `confidential()` without a firmware region and one whose region
/// is elsewhere, saying the VM's type and the region the image needs;
/// into OVMF's region of a `confidential()` VM it succeeds.
pub(crate) fn assert_launch_needs_its_vm_and_the_firmware_region<T, E: std::fmt::Display>(
    confidential: impl Fn() -> Arc<dyn hypervisor::Vm>,
    launch: impl Fn(Arc<dyn hypervisor::Vm>, Option<(u64, u64)>) -> Result<T, E>,
) -> T {
    let refusal = |vm, firmware| match launch(vm, firmware) {
        Ok(_) => panic!("launched into a VM it should refuse ({firmware:x?})"),
        Err(err) => err.to_string(),
    };
    let kvm = crate::test_util::kvm().expect("KVM");
    let default_vm = kvm.create_vm(hypervisor::VmType::Default).unwrap();
    let why = refusal(default_vm, Some(OVMF_REGION));
    assert!(why.starts_with("the VM is of type default, not "), "{why}");
    for firmware in [None, Some((0xffff_f000, 0x1000))] {
        let why = refusal(confidential(), firmware);
        assert_eq!(
            why, "the firmware region is not where the image goes (0xffe00000+0x200000)",
            "{firmware:x?}"
        );
    }
    launch(confidential(), Some(OVMF_REGION))
        .map_err(|err| err.to_string())
        .unwrap()
}

/// A simulated launch backend `T` (the processor or the module) that a
/// fake hypervisor and the test share, behind a count of the commands
/// sent across its clones; the test refuses the `refuse_at`-th (0 = the
/// first) as the hardware might.
pub(crate) struct Counted<T> {
    backend: Arc<Mutex<T>>,
    sent: Arc<Mutex<usize>>,
    refuse_at: Option<usize>,
}

impl<T> Clone for Counted<T> {
    fn clone(&self) -> Self {
        Counted {
            backend: self.backend.clone(),
            sent: self.sent.clone(),
            refuse_at: self.refuse_at,
        }
    }
}

impl<T> Counted<T> {
    pub fn new(backend: T, refuse_at: Option<usize>) -> Self {
        Counted {
            backend: Arc::new(Mutex::new(backend)),
            sent: Arc::default(),
            refuse_at,
        }
    }

    /// Counts `command`; the backend to run it, or the refusal `refused`
    /// builds if the test refuses this one.
    pub fn next<E>(
        &self,
        command: &'static str,
        refused: fn(&'static str, String) -> E,
    ) -> Result<MutexGuard<'_, T>, E> {
        let this = {
            let mut sent = self.sent.lock().unwrap();
            *sent += 1;
            *sent - 1
        };
        if self.refuse_at == Some(this) {
            return Err(refused(command, "injected by the test".into()));
        }
        Ok(self.backend())
    }

    /// The backend, to look inside.
    pub fn backend(&self) -> MutexGuard<'_, T> {
        self.backend.lock().unwrap()
    }

    /// How many commands were sent.
    pub fn sent(&self) -> usize {
        *self.sent.lock().unwrap()
    }
}
