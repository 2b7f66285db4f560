//! `KVM_MEMORY_ENCRYPT_OP` with KVM's TDX sub-commands, against the
//! kernel's uapi (`arch/x86/include/uapi/asm/kvm.h`, Linux 6.16 and
//! later). kvm-bindings 0.14 has none of it, so the structs are written
//! here, `#[repr(C)]`, with their sizes asserted. Only reachable on a TDX
//! host: KVM creates VMs of type `tdx` only there.

use std::os::fd::AsRawFd;

use kvm_bindings::{KVMIO, kvm_cpuid_entry2};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

use super::sev_snp::aligned_copy;
use crate::tdx::{PAGE_SIZE, TdxCapabilities, TdxInitVm, TdxLaunchError, TdxResult};

ioctl_iowr_nr!(KVM_MEMORY_ENCRYPT_OP, KVMIO, 0xba, std::os::raw::c_ulong);

/// `enum kvm_tdx_cmd_id`.
const KVM_TDX_CAPABILITIES: u32 = 0;
const KVM_TDX_INIT_VM: u32 = 1;
const KVM_TDX_INIT_VCPU: u32 = 2;
const KVM_TDX_INIT_MEM_REGION: u32 = 3;
const KVM_TDX_FINALIZE_VM: u32 = 4;
/// `KVM_TDX_INIT_MEM_REGION` flag: TDH.MR.EXTEND every added page.
const KVM_TDX_MEASURE_MEMORY_REGION: u32 = 1 << 0;

/// CPUID entries the buffers have room for: more leaves than a TDX
/// module configures or KVM reports (QEMU grows its buffer on E2BIG
/// instead; one generous size keeps this simple).
const CPUID_ENTRIES: usize = 256;

/// `struct kvm_tdx_cmd`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct KvmTdxCmd {
    id: u32,
    flags: u32,
    /// An immediate or a pointer to the sub-command's struct.
    data: u64,
    /// The TDX module's status where the SEAMCALL failed.
    hw_error: u64,
}

/// `struct kvm_cpuid2` without its flexible array.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct KvmCpuid2Header {
    nent: u32,
    padding: u32,
}

/// `struct kvm_tdx_capabilities` up to its `struct kvm_cpuid2 cpuid`.
#[repr(C)]
#[derive(Clone, Copy)]
struct KvmTdxCapabilities {
    supported_attrs: u64,
    supported_xfam: u64,
    kernel_tdvmcallinfo_1_r11: u64,
    user_tdvmcallinfo_1_r11: u64,
    kernel_tdvmcallinfo_1_r12: u64,
    user_tdvmcallinfo_1_r12: u64,
    reserved: [u64; 250],
    cpuid: KvmCpuid2Header,
}

/// `struct kvm_tdx_init_vm` up to its `struct kvm_cpuid2 cpuid`: 256
/// bytes of TD_PARAMS, then the CPUID header.
#[repr(C)]
#[derive(Clone, Copy)]
struct KvmTdxInitVm {
    attributes: u64,
    xfam: u64,
    mrconfigid: [u64; 6],
    mrowner: [u64; 6],
    mrownerconfig: [u64; 6],
    reserved: [u64; 12],
    cpuid: KvmCpuid2Header,
}

/// `struct kvm_tdx_init_mem_region`. KVM advances it as pages are added,
/// so a retried call continues where the last one stopped.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct KvmTdxInitMemRegion {
    source_addr: u64,
    gpa: u64,
    nr_pages: u64,
}

/// A struct ending in `struct kvm_cpuid2`, with room for its entries.
#[repr(C)]
struct WithCpuid<H> {
    header: H,
    entries: [kvm_cpuid_entry2; CPUID_ENTRIES],
}

const _: () = assert!(std::mem::size_of::<KvmTdxCmd>() == 24);
const _: () = assert!(std::mem::size_of::<KvmCpuid2Header>() == 8);
const _: () = assert!(std::mem::size_of::<KvmTdxCapabilities>() == 2048 + 8);
const _: () = assert!(std::mem::size_of::<KvmTdxInitVm>() == 256 + 8);
const _: () = assert!(std::mem::size_of::<KvmTdxInitMemRegion>() == 24);
const _: () = assert!(std::mem::size_of::<kvm_cpuid_entry2>() == 40);
// The entries follow the header directly, as the flexible array does.
const _: () = assert!(std::mem::offset_of!(WithCpuid<KvmTdxCapabilities>, entries) == 2056);
const _: () = assert!(std::mem::offset_of!(WithCpuid<KvmTdxInitVm>, entries) == 264);

impl<H> WithCpuid<H> {
    fn new(header: H) -> Box<Self> {
        Box::new(WithCpuid {
            header,
            entries: [kvm_cpuid_entry2::default(); CPUID_ENTRIES],
        })
    }
}

/// Sends one TDX sub-command on `fd` (the VM's or a vCPU's).
fn issue(
    fd: &impl AsRawFd,
    command: &'static str,
    id: u32,
    flags: u32,
    data: u64,
) -> TdxResult<()> {
    let mut cmd = KvmTdxCmd {
        id,
        flags,
        data,
        hw_error: 0,
    };
    // SAFETY: `cmd` is a valid kvm_tdx_cmd that lives for the call; where
    // `data` is a pointer, the caller keeps what it points at alive and
    // sized as the sub-command's struct for the call too.
    let ret = unsafe { ioctl_with_mut_ref(fd, KVM_MEMORY_ENCRYPT_OP(), &mut cmd) };
    if ret < 0 {
        return Err(TdxLaunchError::Kvm {
            command,
            hw_error: cmd.hw_error,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

pub(super) fn capabilities(vm: &impl AsRawFd) -> TdxResult<TdxCapabilities> {
    let mut caps = WithCpuid::new(KvmTdxCapabilities {
        supported_attrs: 0,
        supported_xfam: 0,
        kernel_tdvmcallinfo_1_r11: 0,
        user_tdvmcallinfo_1_r11: 0,
        kernel_tdvmcallinfo_1_r12: 0,
        user_tdvmcallinfo_1_r12: 0,
        reserved: [0; 250],
        cpuid: KvmCpuid2Header {
            nent: const { ::arch::fit_u32(CPUID_ENTRIES as u64) },
            padding: 0,
        },
    });
    issue(
        vm,
        "KVM_TDX_CAPABILITIES",
        KVM_TDX_CAPABILITIES,
        0,
        &mut *caps as *mut WithCpuid<KvmTdxCapabilities> as u64,
    )?;
    let n = (caps.header.cpuid.nent as usize).min(CPUID_ENTRIES);
    Ok(TdxCapabilities {
        supported_attributes: caps.header.supported_attrs,
        supported_xfam: caps.header.supported_xfam,
        configurable_cpuid: caps.entries[..n].to_vec(),
    })
}

pub(super) fn init_vm(vm: &impl AsRawFd, params: &TdxInitVm) -> TdxResult<()> {
    const NAME: &str = "KVM_TDX_INIT_VM";
    if params.cpuid.len() > CPUID_ENTRIES {
        return Err(TdxLaunchError::refused(
            NAME,
            format!(
                "{} CPUID entries, at most {CPUID_ENTRIES}",
                params.cpuid.len()
            ),
        ));
    }
    let mut init = WithCpuid::new(KvmTdxInitVm {
        attributes: params.attributes,
        xfam: params.xfam,
        mrconfigid: [0; 6],
        mrowner: [0; 6],
        mrownerconfig: [0; 6],
        reserved: [0; 12],
        cpuid: KvmCpuid2Header {
            nent: u32::try_from(params.cpuid.len()).unwrap_or(u32::MAX),
            padding: 0,
        },
    });
    init.entries[..params.cpuid.len()].copy_from_slice(&params.cpuid);
    issue(
        vm,
        NAME,
        KVM_TDX_INIT_VM,
        0,
        &mut *init as *mut WithCpuid<KvmTdxInitVm> as u64,
    )
}

pub(super) fn init_vcpu(vcpu: &impl AsRawFd, rcx: u64) -> TdxResult<()> {
    issue(vcpu, "KVM_TDX_INIT_VCPU", KVM_TDX_INIT_VCPU, 0, rcx)
}

pub(super) fn init_mem_region(
    vcpu: &impl AsRawFd,
    gpa: u64,
    source: &[u8],
    measure: bool,
) -> TdxResult<()> {
    const NAME: &str = "KVM_TDX_INIT_MEM_REGION";
    if source.is_empty() || !(source.len() as u64).is_multiple_of(PAGE_SIZE) {
        return Err(TdxLaunchError::refused(
            NAME,
            format!("{} bytes are not whole pages", source.len()),
        ));
    }
    // KVM wants a page-aligned source.
    let pages = aligned_copy(source);
    let mut region = KvmTdxInitMemRegion {
        source_addr: pages.as_ptr() as u64,
        gpa,
        nr_pages: source.len() as u64 / PAGE_SIZE,
    };
    let flags = if measure {
        KVM_TDX_MEASURE_MEMORY_REGION
    } else {
        0
    };
    loop {
        // `pages` and `region` outlive the call; KVM reads the one and
        // advances the other.
        match issue(
            vcpu,
            NAME,
            KVM_TDX_INIT_MEM_REGION,
            flags,
            &mut region as *mut KvmTdxInitMemRegion as u64,
        ) {
            Ok(()) if region.nr_pages == 0 => return Ok(()),
            Ok(()) => continue,
            // Interrupted or contended: the region says what is left.
            Err(TdxLaunchError::Kvm { source, .. })
                if matches!(source.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) =>
            {
                continue;
            }
            Err(e) => return Err(e),
        }
    }
}

pub(super) fn finalize_vm(vm: &impl AsRawFd) -> TdxResult<()> {
    issue(vm, "KVM_TDX_FINALIZE_VM", KVM_TDX_FINALIZE_VM, 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ioctl_number_is_kvm_memory_encrypt_op() {
        // _IOWR(KVMIO, 0xba, unsigned long) on x86_64.
        assert_eq!(KVM_MEMORY_ENCRYPT_OP(), 0xc008_aeba);
    }

    /// This host's KVM (PVM) has no TDX: every sub-command on a default
    /// VM fails cleanly with the command's name, and nothing is changed.
    #[test]
    fn tdx_commands_on_a_default_vm_fail_cleanly() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("*** SKIPPED: /dev/kvm unavailable ***");
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let err = capabilities(&vm).unwrap_err();
        assert!(
            matches!(
                err,
                TdxLaunchError::Kvm {
                    command: "KVM_TDX_CAPABILITIES",
                    ..
                }
            ),
            "{err}"
        );
        let err = init_vm(&vm, &TdxInitVm::default()).unwrap_err();
        assert!(
            err.to_string().starts_with("KVM_TDX_INIT_VM failed"),
            "{err}"
        );
        assert!(finalize_vm(&vm).is_err());
        let vcpu = vm.create_vcpu(0).unwrap();
        assert!(init_vcpu(&vcpu, 0x80_9000).is_err());
        let err = init_mem_region(&vcpu, 0x1000, &[0; 4096], true).unwrap_err();
        assert!(matches!(
            err,
            TdxLaunchError::Kvm {
                command: "KVM_TDX_INIT_MEM_REGION",
                ..
            }
        ));
        assert!(
            init_mem_region(&vcpu, 0x1000, &[0; 100], false)
                .unwrap_err()
                .to_string()
                .contains("not whole pages")
        );
    }
}
