//! What the SEV-SNP and TDX firmware-boot tests share: Debian's OVMF.fd in
//! a scratch file, a configuration that boots it, `Vm::boot` against a fake
//! confidential hypervisor, the check that nothing of a VM is left, and the
//! count that lets a test refuse the n-th launch command.

use std::path::PathBuf;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use hypervisor::attribute_tracking::AttributeTrackingVm;
use hypervisor::{Hypervisor, KvmHypervisor};

use crate::GuestEvents;
use crate::config::{ConsoleOutput, CpusConfig, MemoryConfig, PlatformConfig, VmConfig};
use crate::event_monitor::EventMonitor;
use crate::sev_snp::ovmf;
use crate::vm::{Vm, VmError};

/// The guest RAM every firmware-boot test gives.
pub(crate) const RAM: &str = "size=64M";

/// A fake confidential hypervisor `H` whose launch backend `L` (the
/// processor or the module) the test keeps a handle on, and the firmware
/// file it boots.
pub(crate) struct FirmwareRig<H, L> {
    pub hypervisor: H,
    pub launcher: L,
    pub firmware: PathBuf,
    created: fn(&H) -> Vec<Arc<AttributeTrackingVm>>,
}

impl<H: Hypervisor, L: Clone> FirmwareRig<H, L> {
    /// The rig, or None without KVM or Debian's OVMF.fd. `hypervisor`
    /// builds the fake over this host's KVM with a clone of `launcher`;
    /// `created` lists the VMs it made.
    pub fn new(
        tag: &str,
        launcher: L,
        hypervisor: impl FnOnce(Arc<KvmHypervisor>, L) -> H,
        created: fn(&H) -> Vec<Arc<AttributeTrackingVm>>,
    ) -> Option<Self> {
        let data = ovmf::tests::debian_ovmf()?;
        let kvm = crate::test_util::kvm()?;
        let firmware = crate::test_util::scratch_path(tag);
        std::fs::write(&firmware, data).unwrap();
        Some(FirmwareRig {
            hypervisor: hypervisor(Arc::new(kvm), launcher.clone()),
            launcher,
            firmware,
            created,
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
        let created = (self.created)(&self.hypervisor);
        assert_eq!(created.len(), 1, "one VM created");
        created[0].clone()
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

impl<H, L> Drop for FirmwareRig<H, L> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.firmware);
    }
}

/// The launch commands a fake backend was sent, counted across its
/// clones; the test refuses the `refuse_at`-th (0 = the first) as the
/// hardware might.
#[derive(Clone)]
pub(crate) struct CommandCount {
    sent: Arc<Mutex<usize>>,
    refuse_at: Option<usize>,
}

impl CommandCount {
    pub fn new(refuse_at: Option<usize>) -> Self {
        CommandCount {
            sent: Arc::default(),
            refuse_at,
        }
    }

    /// Counts one more command; true if the test refuses this one.
    pub fn refuses_next(&self) -> bool {
        let mut sent = self.sent.lock().unwrap();
        let this = *sent;
        *sent += 1;
        self.refuse_at == Some(this)
    }

    /// How many commands were sent.
    pub fn sent(&self) -> usize {
        *self.sent.lock().unwrap()
    }
}
