//! What each thread may call: the ioctl numbers and the per-thread rule
//! lists, merged with the rules every thread shares.

use std::collections::BTreeMap;

use libc::c_long;
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::Thread;

const KVMIO: u32 = 0xAE;
const VFIO_TYPE: u32 = 0x3B;
const VFIO_BASE: u32 = 100;

// Only the requests a thread issues after its filter is installed; VM
// creation happens before the VMM thread locks itself down.
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_iow_nr!(
    KVM_SET_MEMORY_ATTRIBUTES,
    KVMIO,
    0xd2,
    kvm_bindings::kvm_memory_attributes
);
// MSI-X routes change when the guest programs a device's vector table
// (vCPU threads) or a device comes or goes (VMM and hot-plug threads).
ioctl_iow_nr!(
    KVM_SET_GSI_ROUTING,
    KVMIO,
    0x6a,
    kvm_bindings::kvm_irq_routing
);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_bindings::kvm_irqfd);
// A device's mmapped BAR areas become memory slots wherever the guest
// places or moves the BAR (vCPU threads) or a device is plugged.
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_bindings::kvm_userspace_memory_region
);

/// VFIO requests are `_IO(';', 100 + n)`; these are the type1 container,
/// group and device requests vfio-ioctls issues for a VFIO device.
const VFIO_GET_API_VERSION: u32 = 0;
const VFIO_CHECK_EXTENSION: u32 = 1;
const VFIO_SET_IOMMU: u32 = 2;
const VFIO_GROUP_GET_STATUS: u32 = 3;
const VFIO_GROUP_SET_CONTAINER: u32 = 4;
const VFIO_GROUP_UNSET_CONTAINER: u32 = 5;
const VFIO_GROUP_GET_DEVICE_FD: u32 = 6;
const VFIO_DEVICE_GET_INFO: u32 = 7;
const VFIO_DEVICE_GET_REGION_INFO: u32 = 8;
const VFIO_DEVICE_GET_IRQ_INFO: u32 = 9;
const VFIO_DEVICE_SET_IRQS: u32 = 10;
const VFIO_DEVICE_RESET: u32 = 11;
const VFIO_IOMMU_GET_INFO: u32 = 12;
const VFIO_IOMMU_MAP_DMA: u32 = 13;
const VFIO_IOMMU_UNMAP_DMA: u32 = 14;
const VFIO_DEVICE_FEATURE: u32 = 17;

/// A request of VFIO's ioctl type: `_IO(';', base + request)`, where VFIO's
/// own requests start at `VFIO_BASE` and iommufd's at `IOMMUFD_BASE`.
fn vfio_ioctl(base: u32, request: u32) -> u64 {
    u64::from((VFIO_TYPE << 8) | (base + request))
}

// A VFIO device's cdev joins an iommufd and its IOAS.
const VFIO_DEVICE_BIND_IOMMUFD: u32 = 18;
const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u32 = 19;
const VFIO_DEVICE_DETACH_IOMMUFD_PT: u32 = 20;

/// iommufd requests are `_IO(';', 0x80 + n)`.
const IOMMUFD_BASE: u32 = 0x80;
const IOMMU_DESTROY: u32 = 0;
const IOMMU_IOAS_ALLOC: u32 = 1;
const IOMMU_IOAS_MAP: u32 = 5;
const IOMMU_IOAS_UNMAP: u32 = 6;

// The VM's KVM-VFIO device: created with the first VFIO device, which
// then adds its group or cdev to it.
ioctl_iowr_nr!(
    KVM_CREATE_DEVICE,
    KVMIO,
    0xe0,
    kvm_bindings::kvm_create_device
);
ioctl_iow_nr!(
    KVM_SET_DEVICE_ATTR,
    KVMIO,
    0xe1,
    kvm_bindings::kvm_device_attr
);

type Rules = Vec<(c_long, Vec<SeccompRule>)>;

/// Syscalls allowed whatever their arguments.
fn unconditional(syscalls: impl IntoIterator<Item = c_long>) -> Rules {
    syscalls.into_iter().map(|nr| (nr, Vec::new())).collect()
}

fn arg_equals(index: u8, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// One rule per allowed value of argument `index`.
fn any_of(index: u8, values: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    values
        .iter()
        .map(|&value| SeccompRule::new(vec![arg_equals(index, value)?]))
        .collect()
}

/// Opening files read-only: glibc's allocator reads
/// /sys/devices/system/cpu/online the first time a thread needs an arena.
fn open_read_only() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let write_bits = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
    Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(write_bits),
        libc::O_RDONLY as u64,
    )?])?])
}

fn unix_sockets_only() -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    any_of(0, &[libc::AF_UNIX as u64])
}

/// What every Rust thread needs to run, allocate, log, take signals (the
/// vCPU kick, signal-hook's self-pipe wake-up) and exit.
fn common_rules() -> Result<Rules, seccompiler::BackendError> {
    let thread_names = any_of(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64])?;
    let mut rules = unconditional([
        libc::SYS_brk,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_fcntl,
        libc::SYS_futex,
        libc::SYS_getpid,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_madvise,
        libc::SYS_mmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_munmap,
        libc::SYS_nanosleep,
        libc::SYS_read,
        libc::SYS_rseq,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_yield,
        libc::SYS_sendto,
        libc::SYS_set_robust_list,
        libc::SYS_sigaltstack,
        libc::SYS_write,
        libc::SYS_writev,
    ]);
    rules.push((libc::SYS_openat, open_read_only()?));
    rules.push((libc::SYS_prctl, thread_names));
    Ok(rules)
}

/// A vfio-user client talking over a Unix socket with deadlines.
fn vfio_user_client_syscalls() -> [c_long; 7] {
    [
        // Each read's timeout is what is left of the request's deadline.
        libc::SYS_setsockopt,
        libc::SYS_sendmsg,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_shutdown,
    ]
}

fn vcpu_rules() -> Result<Rules, seccompiler::BackendError> {
    let ioctls = [
        u64::from(::arch::low32(KVM_RUN())),
        u64::from(::arch::low32(KVM_SET_MEMORY_ATTRIBUTES())),
        u64::from(::arch::low32(KVM_SET_GSI_ROUTING())),
        u64::from(::arch::low32(KVM_IRQFD())),
        u64::from(::arch::low32(KVM_SET_USER_MEMORY_REGION())),
        vfio_ioctl(VFIO_BASE, VFIO_IOMMU_MAP_DMA),
        vfio_ioctl(VFIO_BASE, VFIO_IOMMU_UNMAP_DMA),
        vfio_ioctl(IOMMUFD_BASE, IOMMU_IOAS_MAP),
        vfio_ioctl(IOMMUFD_BASE, IOMMU_IOAS_UNMAP),
        // A guest enabling or disabling a VFIO function's MSI-X.
        vfio_ioctl(VFIO_BASE, VFIO_DEVICE_SET_IRQS),
    ];
    let mut rules = vec![(libc::SYS_ioctl, any_of(1, &ioctls)?)];
    // A VFIO function's configuration space and trapped BARs are file
    // offsets of the device fd.
    rules.extend(unconditional([libc::SYS_pread64, libc::SYS_pwrite64]));
    // Releasing private backing after a to-shared conversion: punching
    // holes only, so a vCPU thread can never grow or zero-fill a file.
    let punch_hole = (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64;
    rules.push((libc::SYS_fallocate, any_of(1, &[punch_hole])?));
    rules.extend(unconditional(vfio_user_client_syscalls()));
    // `--serial socket=`: the guest's console write takes a waiting client
    // (non-blocking); sending to it is `sendto`, in the common set.
    rules.extend(unconditional([libc::SYS_accept4]));
    Ok(rules)
}

fn vmm_rules() -> Result<Rules, seccompiler::BackendError> {
    let ioctls: Vec<u64> = [
        VFIO_GET_API_VERSION,
        VFIO_CHECK_EXTENSION,
        VFIO_SET_IOMMU,
        VFIO_GROUP_GET_STATUS,
        VFIO_GROUP_SET_CONTAINER,
        VFIO_GROUP_UNSET_CONTAINER,
        VFIO_GROUP_GET_DEVICE_FD,
        VFIO_DEVICE_GET_INFO,
        VFIO_DEVICE_GET_REGION_INFO,
        VFIO_DEVICE_GET_IRQ_INFO,
        VFIO_DEVICE_SET_IRQS,
        VFIO_DEVICE_RESET,
        VFIO_IOMMU_GET_INFO,
        VFIO_IOMMU_MAP_DMA,
        VFIO_IOMMU_UNMAP_DMA,
        VFIO_DEVICE_FEATURE,
        VFIO_DEVICE_BIND_IOMMUFD,
        VFIO_DEVICE_ATTACH_IOMMUFD_PT,
        VFIO_DEVICE_DETACH_IOMMUFD_PT,
    ]
    .into_iter()
    .map(|request| vfio_ioctl(VFIO_BASE, request))
    .chain(
        [
            IOMMU_DESTROY,
            IOMMU_IOAS_ALLOC,
            IOMMU_IOAS_MAP,
            IOMMU_IOAS_UNMAP,
        ]
        .map(|request| vfio_ioctl(IOMMUFD_BASE, request)),
    )
    .chain([
        u64::from(::arch::low32(KVM_CREATE_DEVICE())),
        u64::from(::arch::low32(KVM_SET_DEVICE_ATTR())),
        u64::from(::arch::low32(KVM_SET_GSI_ROUTING())),
        u64::from(::arch::low32(KVM_IRQFD())),
        u64::from(::arch::low32(KVM_SET_USER_MEMORY_REGION())),
    ])
    .collect();
    let mut rules = vec![
        (libc::SYS_ioctl, any_of(1, &ioctls)?),
        (libc::SYS_socket, unix_sockets_only()?),
    ];
    rules.extend(unconditional(
        [
            // VFIO device nodes and sysfs; hot-plugged devices.
            libc::SYS_openat,
            libc::SYS_readlink,
            libc::SYS_readlinkat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_pread64,
            libc::SYS_getdents64,
            libc::SYS_connect,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            // Kicking vCPUs out of KVM_RUN at shutdown.
            libc::SYS_tgkill,
            // Hot-plug workers and parallel device removal at shutdown.
            libc::SYS_clone,
            libc::SYS_clone3,
            // MSI-X vectors of a device being attached.
            libc::SYS_eventfd2,
            // Removing the API socket.
            libc::SYS_unlink,
            libc::SYS_unlinkat,
        ]
        .into_iter()
        .chain(vfio_user_client_syscalls()),
    ));
    Ok(rules)
}

fn http_server_rules() -> Result<Rules, seccompiler::BackendError> {
    let mut rules = vec![(libc::SYS_socket, unix_sockets_only()?)];
    rules.extend(unconditional([
        // Binding the socket: stale-socket check, umask, chmod.
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_connect,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_umask,
        libc::SYS_chmod,
        libc::SYS_fchmodat,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_getsockname,
        libc::SYS_setsockopt,
        // The acceptor and one thread per connection.
        libc::SYS_accept4,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ]));
    Ok(rules)
}

fn vm_builder_rules() -> Result<Rules, seccompiler::BackendError> {
    // Everything the VMM thread may do (cold-plugged devices attach here),
    // what creating a VM takes on top, and everything a vCPU may do: the
    // vCPU threads start here and their filters stack on this one, so a
    // call this filter refused would be refused to them too.
    let mut rules = vmm_rules()?;
    rules.extend(vcpu_rules()?);
    rules.retain(|(nr, _)| *nr != libc::SYS_ioctl);
    // Any KVM request (VM, vCPU and device set-up) and any VFIO / iommufd
    // one (cold-plugged devices), by the ioctl number's type byte.
    let of_type = |kind: u32| {
        SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            u64::from(kind << 8),
        )?])
    };
    // `--serial pty`: finding and unlocking the new pseudo-terminal.
    let pty = [libc::TIOCGPTN, libc::TIOCSPTLCK, libc::TCGETS];
    let mut ioctls = vec![of_type(KVMIO)?, of_type(VFIO_TYPE)?];
    ioctls.extend(any_of(1, &pty)?);
    rules.push((libc::SYS_ioctl, ioctls));
    rules.extend(unconditional([
        libc::SYS_memfd_create,
        libc::SYS_fallocate,
        libc::SYS_ftruncate,
        libc::SYS_mmap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_fstat,
        libc::SYS_fcntl,
        libc::SYS_rt_sigaction,
        libc::SYS_seccomp,
        libc::SYS_prctl,
        libc::SYS_sched_getaffinity,
        // `--serial socket=`: its listening socket.
        libc::SYS_bind,
        libc::SYS_listen,
        // `--serial file=`: refusing procfs and sysfs files.
        libc::SYS_fstatfs,
    ]));
    Ok(rules)
}

fn signal_handler_rules() -> Result<Rules, seccompiler::BackendError> {
    Ok(unconditional([
        libc::SYS_recvfrom,
        libc::SYS_recvmsg,
        libc::SYS_poll,
        libc::SYS_ppoll,
    ]))
}

pub(super) fn rules_for(
    thread: Thread,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let specific = match thread {
        Thread::Vmm => vmm_rules()?,
        Thread::Vcpu => vcpu_rules()?,
        Thread::HttpServer => http_server_rules()?,
        Thread::SignalHandler => signal_handler_rules()?,
        Thread::VmBuilder => vm_builder_rules()?,
        // Writing and waiting for the queue are in the common rules.
        Thread::EventMonitor | Thread::LogWriter => Vec::new(),
    };
    // None: allowed whatever the arguments. seccompiler reads an empty rule
    // list the same way, so a syscall allowed outright in one list must not
    // pick up another list's conditions.
    let mut merged: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for (nr, conditions) in common_rules()?.into_iter().chain(specific) {
        let unconditional = conditions.is_empty();
        match merged.entry(nr).or_insert_with(|| Some(Vec::new())) {
            slot if unconditional => *slot = None,
            Some(existing) => existing.extend(conditions),
            None => {}
        }
    }
    Ok(merged
        .into_iter()
        .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
        .collect())
}
