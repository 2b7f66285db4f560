//! Capability probing: what this host's KVM can do for guest_memfd VMs.

use serde_like::CapsJson;

/// Capability numbers that kvm-bindings 0.14 does not define yet.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1;
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 2;

/// KVM VM types on x86_64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmType {
    Default,
    SwProtected,
    Sev,
    SevEs,
    SevSnp,
    Tdx,
}

impl VmType {
    pub const ALL: [VmType; 6] = [
        VmType::Default,
        VmType::SwProtected,
        VmType::Sev,
        VmType::SevEs,
        VmType::SevSnp,
        VmType::Tdx,
    ];

    pub fn kvm_value(self) -> u32 {
        match self {
            VmType::Default => kvm_bindings::KVM_X86_DEFAULT_VM,
            VmType::SwProtected => kvm_bindings::KVM_X86_SW_PROTECTED_VM,
            VmType::Sev => kvm_bindings::KVM_X86_SEV_VM,
            VmType::SevEs => kvm_bindings::KVM_X86_SEV_ES_VM,
            VmType::SevSnp => kvm_bindings::KVM_X86_SNP_VM,
            VmType::Tdx => kvm_bindings::KVM_X86_TDX_VM,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            VmType::Default => "default",
            VmType::SwProtected => "sw-protected",
            VmType::Sev => "sev",
            VmType::SevEs => "sev-es",
            VmType::SevSnp => "sev-snp",
            VmType::Tdx => "tdx",
        }
    }
}

/// What the host (or one VM) reports. Raw KVM_CHECK_EXTENSION values are kept
/// so they can be shown to users as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub guest_memfd: bool,
    /// Bit mask of GUEST_MEMFD_FLAG_* accepted by KVM_CREATE_GUEST_MEMFD.
    pub guest_memfd_flags: u64,
    pub user_memory2: bool,
    /// Bit mask of KVM_MEMORY_ATTRIBUTE_* (0: no private memory tracking).
    pub memory_attributes: u64,
    pub memory_fault_info: bool,
    /// Bit mask of hypercalls that can exit to userspace (1 << KVM_HC_*).
    pub exit_hypercall: u64,
    /// Bit mask of supported VM types (1 << KVM_X86_*_VM).
    pub vm_types: u64,
}

impl Capabilities {
    /// Builds the capability set from a KVM_CHECK_EXTENSION function, so the
    /// decoding is testable without /dev/kvm.
    pub fn probe(check: impl Fn(u32) -> i32) -> Self {
        let positive = |cap: u32| u64::try_from(check(cap)).unwrap_or(0);
        Capabilities {
            guest_memfd: check(kvm_bindings::KVM_CAP_GUEST_MEMFD) > 0,
            guest_memfd_flags: positive(KVM_CAP_GUEST_MEMFD_FLAGS),
            user_memory2: check(kvm_bindings::KVM_CAP_USER_MEMORY2) > 0,
            memory_attributes: positive(kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES),
            memory_fault_info: check(kvm_bindings::KVM_CAP_MEMORY_FAULT_INFO) > 0,
            exit_hypercall: positive(kvm_bindings::KVM_CAP_EXIT_HYPERCALL),
            // Kernels without KVM_CAP_VM_TYPES only know the default type.
            vm_types: match positive(kvm_bindings::KVM_CAP_VM_TYPES) {
                0 => 1 << kvm_bindings::KVM_X86_DEFAULT_VM,
                types => types,
            },
        }
    }

    pub fn supports_vm_type(&self, vm_type: VmType) -> bool {
        self.vm_types & (1 << vm_type.kvm_value()) != 0
    }

    /// guest_memfd that the host can mmap and that starts shared: the
    /// in-place layout where one fd serves both views.
    pub fn guest_memfd_in_place(&self) -> bool {
        let wanted = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        self.guest_memfd && self.guest_memfd_flags & wanted == wanted
    }

    pub fn private_memory_attribute(&self) -> bool {
        self.memory_attributes & u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0
    }

    pub fn map_gpa_range_exit(&self) -> bool {
        self.exit_hypercall & (1 << crate::conversion::KVM_HC_MAP_GPA_RANGE) != 0
    }

    pub fn supported_vm_types(&self) -> Vec<&'static str> {
        VmType::ALL
            .iter()
            .filter(|t| self.supports_vm_type(**t))
            .map(|t| t.name())
            .collect()
    }

    /// Stable, human-readable key=value lines (used by `--capabilities`).
    pub fn to_json_like(&self) -> CapsJson<'_> {
        CapsJson(self)
    }
}

mod serde_like {
    use super::Capabilities;
    use std::fmt;

    /// Renders capabilities as a JSON object without pulling serde into this crate.
    pub struct CapsJson<'a>(pub &'a Capabilities);

    impl fmt::Display for CapsJson<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            let c = self.0;
            let types: Vec<String> = c
                .supported_vm_types()
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect();
            write!(
                f,
                "{{\"guest_memfd\":{},\"guest_memfd_flags\":{},\"guest_memfd_in_place\":{},\
                 \"user_memory2\":{},\"memory_attributes\":{},\"memory_fault_info\":{},\
                 \"exit_hypercall\":{},\"map_gpa_range_exit\":{},\"vm_types\":[{}]}}",
                c.guest_memfd,
                c.guest_memfd_flags,
                c.guest_memfd_in_place(),
                c.user_memory2,
                c.memory_attributes,
                c.memory_fault_info,
                c.exit_hypercall,
                c.map_gpa_range_exit(),
                types.join(",")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn this_machine(cap: u32) -> i32 {
        match cap {
            kvm_bindings::KVM_CAP_GUEST_MEMFD => 1,
            kvm_bindings::KVM_CAP_USER_MEMORY2 => 1,
            kvm_bindings::KVM_CAP_MEMORY_FAULT_INFO => 1,
            kvm_bindings::KVM_CAP_EXIT_HYPERCALL => 1 << 12,
            KVM_CAP_GUEST_MEMFD_FLAGS => 3,
            _ => 0,
        }
    }

    #[test]
    fn decodes_this_machines_answers() {
        let caps = Capabilities::probe(this_machine);
        assert!(caps.guest_memfd);
        assert!(caps.guest_memfd_in_place());
        assert!(caps.user_memory2);
        assert!(!caps.private_memory_attribute());
        assert!(caps.map_gpa_range_exit());
        assert_eq!(caps.supported_vm_types(), vec!["default"]);
    }

    #[test]
    fn confidential_host_reports_types_and_split_layout() {
        let caps = Capabilities::probe(|cap| match cap {
            kvm_bindings::KVM_CAP_GUEST_MEMFD => 1,
            kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES => 8,
            kvm_bindings::KVM_CAP_VM_TYPES => 0b110001,
            _ => 0,
        });
        assert!(caps.private_memory_attribute());
        assert!(!caps.guest_memfd_in_place(), "no MMAP flag: split layout");
        assert_eq!(caps.supported_vm_types(), vec!["default", "sev-snp", "tdx"]);
        assert!(!caps.map_gpa_range_exit());
    }

    #[test]
    fn a_zero_answer_is_an_absent_capability() {
        let caps = Capabilities::probe(|_| 0);
        assert!(!caps.guest_memfd && !caps.user_memory2 && !caps.memory_fault_info);
        assert_eq!(caps.supported_vm_types(), vec!["default"]);
        // Each flag comes from its own capability.
        let only = |wanted: u32| move |cap: u32| i32::from(cap == wanted);
        let caps = Capabilities::probe(only(kvm_bindings::KVM_CAP_MEMORY_FAULT_INFO));
        assert!(caps.memory_fault_info && !caps.guest_memfd && !caps.user_memory2);
        let caps = Capabilities::probe(only(kvm_bindings::KVM_CAP_USER_MEMORY2));
        assert!(caps.user_memory2 && !caps.guest_memfd && !caps.memory_fault_info);
        // KVM_CAP_VM_TYPES answering only the default type.
        let caps = Capabilities::probe(only(kvm_bindings::KVM_CAP_VM_TYPES));
        assert!(caps.supports_vm_type(VmType::Default));
        assert_eq!(caps.supported_vm_types(), vec!["default"]);
    }

    #[test]
    fn negative_answers_are_not_capabilities() {
        let caps = Capabilities::probe(|_| -1);
        assert_eq!(caps.guest_memfd_flags, 0);
        assert_eq!(caps.memory_attributes, 0);
        assert!(!caps.guest_memfd && !caps.user_memory2 && !caps.memory_fault_info);
        assert_eq!(caps.supported_vm_types(), vec!["default"]);
    }

    #[test]
    fn json_rendering_is_parseable_shape() {
        let text = Capabilities::probe(this_machine).to_json_like().to_string();
        assert!(text.starts_with('{') && text.ends_with('}'));
        assert!(text.contains("\"guest_memfd_in_place\":true"));
        assert!(text.contains("\"vm_types\":[\"default\"]"));
    }
}
