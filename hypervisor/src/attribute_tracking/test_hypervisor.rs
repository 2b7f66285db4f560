//! A hypervisor that offers one confidential VM type over a real KVM:
//! each VM of that type is an `AttributeTrackingVm` playing KVM's part of
//! the launch in front of the processor or module the test gives; every
//! other VM type is the real hypervisor's.

use std::sync::{Arc, Mutex};

use super::{AttributeTrackingVm, SnpFirmware, TdxModule};
use crate::sev_snp::SnpResult;
use crate::{Capabilities, Hypervisor, KvmHypervisor, Result, Vm, VmType};

type MakeVm = Box<dyn Fn() -> Result<AttributeTrackingVm> + Send + Sync>;

pub struct ConfidentialTestHypervisor {
    inner: Arc<dyn Hypervisor>,
    capabilities: Capabilities,
    vm_type: VmType,
    make: MakeVm,
    /// What `sev_snp_vmsa_features` says (None: the real hypervisor's).
    vmsa_features: Option<u64>,
    created: Mutex<Vec<Arc<AttributeTrackingVm>>>,
}

impl ConfidentialTestHypervisor {
    /// `sev-snp` VMs, each over one of the real KVM's default VMs and
    /// answered by a processor `firmware` makes; the host supports the
    /// VMSA features `vmsa_features`.
    pub fn sev_snp(
        inner: Arc<dyn Hypervisor>,
        vmsa_features: u64,
        firmware: impl Fn() -> SnpFirmware + Send + Sync + 'static,
    ) -> Self {
        let kvm = inner.clone();
        let make = move || {
            let vm = kvm.create_vm(VmType::Default)?;
            Ok(AttributeTrackingVm::new(vm).with_sev_snp(firmware()))
        };
        Self::offering(inner, VmType::SevSnp, Box::new(make), Some(vmsa_features))
    }

    /// `tdx` VMs, each over a real default VM with a split irqchip and
    /// answered by a module `module` makes.
    pub fn tdx(
        inner: Arc<KvmHypervisor>,
        module: impl Fn() -> TdxModule + Send + Sync + 'static,
    ) -> Self {
        let kvm = inner.clone();
        let make = move || {
            let vm = kvm.create_split_irqchip_vm()?;
            Ok(AttributeTrackingVm::new(vm).with_tdx(module()))
        };
        Self::offering(inner, VmType::Tdx, Box::new(make), None)
    }

    fn offering(
        inner: Arc<dyn Hypervisor>,
        vm_type: VmType,
        make: MakeVm,
        vmsa_features: Option<u64>,
    ) -> Self {
        let mut capabilities = inner.capabilities().clone();
        capabilities.vm_types |= 1 << vm_type.kvm_value();
        ConfidentialTestHypervisor {
            inner,
            capabilities,
            vm_type,
            make,
            vmsa_features,
            created: Mutex::default(),
        }
    }

    /// The confidential VMs created so far, oldest first.
    pub fn created(&self) -> Vec<Arc<AttributeTrackingVm>> {
        self.created.lock().unwrap().clone()
    }
}

impl Hypervisor for ConfidentialTestHypervisor {
    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn create_vm(&self, vm_type: VmType) -> Result<Arc<dyn Vm>> {
        if vm_type != self.vm_type {
            return self.inner.create_vm(vm_type);
        }
        let vm = Arc::new((self.make)()?);
        self.created.lock().unwrap().push(vm.clone());
        Ok(vm)
    }

    fn sev_snp_vmsa_features(&self) -> SnpResult<u64> {
        match self.vmsa_features {
            Some(features) => Ok(features),
            None => self.inner.sev_snp_vmsa_features(),
        }
    }
}
