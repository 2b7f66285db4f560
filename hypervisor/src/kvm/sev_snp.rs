//! `KVM_MEMORY_ENCRYPT_OP` with KVM's SEV-SNP commands, and the VMSA
//! features `/dev/kvm` reports. Only reachable on an SEV-SNP host: KVM
//! creates VMs of type `sev-snp` only there.

use std::fs::File;
use std::os::fd::AsRawFd;

use kvm_bindings::{
    KVM_X86_GRP_SEV, KVM_X86_SEV_VMSA_FEATURES, kvm_device_attr, kvm_sev_cmd, kvm_sev_init,
    kvm_sev_snp_launch_finish, kvm_sev_snp_launch_start, kvm_sev_snp_launch_update,
    sev_cmd_id_KVM_SEV_INIT2, sev_cmd_id_KVM_SEV_SNP_LAUNCH_FINISH,
    sev_cmd_id_KVM_SEV_SNP_LAUNCH_START, sev_cmd_id_KVM_SEV_SNP_LAUNCH_UPDATE,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::sev_snp::{PAGE_SIZE, SevSnpCommand, SnpLaunchError, SnpPageType, SnpResult, SnpUpdate};

ioctl_iow_nr!(
    KVM_GET_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe2,
    kvm_device_attr
);

/// The SEV_FEATURES bits KVM lets an SEV-ES / SEV-SNP VM have
/// (`KVM_GET_DEVICE_ATTR` on `/dev/kvm`, group `KVM_X86_GRP_SEV`).
pub(super) fn supported_vmsa_features(kvm: &Kvm) -> SnpResult<u64> {
    let mut features = 0u64;
    let attr = kvm_device_attr {
        flags: 0,
        group: KVM_X86_GRP_SEV,
        attr: KVM_X86_SEV_VMSA_FEATURES.into(),
        addr: &mut features as *mut u64 as u64,
    };
    // SAFETY: `attr` is a valid kvm_device_attr whose `addr` points at a
    // u64 that lives for the call; KVM writes at most 8 bytes there.
    let ret = unsafe { ioctl_with_ref(kvm, KVM_GET_DEVICE_ATTR(), &attr) };
    if ret < 0 {
        return Err(SnpLaunchError::VmsaFeatures(std::io::Error::last_os_error()));
    }
    Ok(features)
}

/// A page-aligned copy of launch data: KVM copies `SNP_LAUNCH_UPDATE`
/// (and TDX's `KVM_TDX_INIT_MEM_REGION`) sources page by page and wants
/// them page aligned.
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
pub(super) struct Page(pub(super) [u8; ::arch::usize_from(PAGE_SIZE)]);

pub(super) fn aligned_copy(source: &[u8]) -> Vec<Page> {
    let mut pages = vec![
        Page([0; ::arch::usize_from(PAGE_SIZE)]);
        source.len().div_ceil(::arch::usize_from(PAGE_SIZE))
    ];
    for (page, chunk) in pages
        .iter_mut()
        .zip(source.chunks(::arch::usize_from(PAGE_SIZE)))
    {
        page.0[..chunk.len()].copy_from_slice(chunk);
    }
    pages
}

/// Sends one SEV command; `data` is the command's parameter block.
fn issue<T>(vm: &VmFd, sev: &File, name: &'static str, id: u32, data: &mut T) -> SnpResult<()> {
    let mut cmd = kvm_sev_cmd {
        id,
        data: data as *mut T as u64,
        sev_fd: sev.as_raw_fd().cast_unsigned(),
        ..Default::default()
    };
    vm.encrypt_op_sev(&mut cmd)
        .map_err(|e| SnpLaunchError::Kvm {
            command: name,
            firmware_error: cmd.error,
            source: std::io::Error::from_raw_os_error(e.errno()),
        })
}

pub(super) fn command(vm: &VmFd, sev: &File, command: SevSnpCommand<'_>) -> SnpResult<()> {
    let name = command.name();
    match command {
        SevSnpCommand::Init2 { vmsa_features } => {
            let mut init = kvm_sev_init {
                vmsa_features,
                // 0: KVM's default GHCB version for the VM type (2 for SNP).
                ghcb_version: 0,
                ..Default::default()
            };
            issue(vm, sev, name, sev_cmd_id_KVM_SEV_INIT2, &mut init)
        }
        SevSnpCommand::LaunchStart { policy } => {
            let mut start = kvm_sev_snp_launch_start {
                policy,
                ..Default::default()
            };
            issue(
                vm,
                sev,
                name,
                sev_cmd_id_KVM_SEV_SNP_LAUNCH_START,
                &mut start,
            )
        }
        SevSnpCommand::LaunchUpdate(SnpUpdate {
            gpa,
            len,
            source,
            page_type,
        }) => {
            let pages = source.map(aligned_copy);
            let uaddr = match (&pages, page_type) {
                // KVM ignores the source of zero pages.
                (_, SnpPageType::Zero) | (None, _) => 0,
                (Some(pages), _) => pages.as_ptr() as u64,
            };
            let mut update = kvm_sev_snp_launch_update {
                gfn_start: gpa / PAGE_SIZE,
                uaddr,
                len,
                type_: page_type as u8,
                ..Default::default()
            };
            // KVM may stop early; it leaves the rest of the range in the
            // parameter block for the next call.
            while update.len != 0 {
                issue(
                    vm,
                    sev,
                    name,
                    sev_cmd_id_KVM_SEV_SNP_LAUNCH_UPDATE,
                    &mut update,
                )?;
            }
            Ok(())
        }
        SevSnpCommand::LaunchFinish => {
            let mut finish = kvm_sev_snp_launch_finish::default();
            issue(
                vm,
                sev,
                name,
                sev_cmd_id_KVM_SEV_SNP_LAUNCH_FINISH,
                &mut finish,
            )
        }
    }
}

/// `/dev/sev`, which KVM wants beside SEV commands.
pub(super) fn open_sev() -> SnpResult<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/sev")
        .map_err(SnpLaunchError::OpenSev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_data_is_copied_page_aligned() {
        let pages = aligned_copy(&[7u8; 5000]);
        assert_eq!(pages.len(), 2);
        assert_eq!(pages.as_ptr() as usize % 4096, 0);
        assert!(pages[0].0.iter().all(|b| *b == 7));
        assert!(pages[1].0[..904].iter().all(|b| *b == 7));
        assert!(pages[1].0[904..].iter().all(|b| *b == 0));
    }

    /// This host's KVM (PVM) has no SEV: the attribute is absent and the
    /// error says so rather than reporting zero features.
    #[test]
    fn vmsa_features_without_sev_is_a_clear_error() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("*** SKIPPED: /dev/kvm unavailable ***");
            return;
        };
        if let Err(e) = supported_vmsa_features(&kvm) {
            assert!(e.to_string().contains("no SEV-SNP on this host"), "{e}");
        }
    }
}
