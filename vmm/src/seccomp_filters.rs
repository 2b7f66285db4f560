// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! Per-thread seccomp filters. Every VMM thread installs the filter for its
//! job before it touches guest-controlled input; a syscall outside it raises
//! SIGSYS (or is only logged by the kernel in `log` mode).
//!
//! The lists were taken from what each thread really calls (strace over the
//! integration suite) plus the paths this machine cannot exercise (VFIO), and
//! are kept honest by the integration tests, which all run with filters on.

use std::collections::BTreeMap;
use std::sync::mpsc::sync_channel;
use std::thread::JoinHandle;

use libc::c_long;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// How filters are enforced (`--seccomp true|false|log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// A forbidden syscall raises SIGSYS; the VMM reports it and exits.
    #[default]
    Enforce,
    /// The kernel logs forbidden syscalls and lets them run (debugging).
    Log,
    /// No filters.
    Off,
}

impl SeccompMode {
    pub const SYNTAX: &'static str = "true|false|log";

    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "true" | "on" => Ok(SeccompMode::Enforce),
            "false" | "off" => Ok(SeccompMode::Off),
            "log" => Ok(SeccompMode::Log),
            other => Err(format!("expected {}, got {other:?}", Self::SYNTAX)),
        }
    }
}

/// The jobs a VMM thread can have; each has its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thread {
    /// The control loop, once the VM is built: API requests, device
    /// hot-plug, shutdown.
    Vmm,
    Vcpu,
    /// The API server and the connection threads it starts.
    HttpServer,
    SignalHandler,
    /// Writes queued events to the event monitor's file or fd.
    EventMonitor,
    /// Writes queued log lines.
    LogWriter,
    /// Builds VMs (`vm.boot`, `vm.reboot`, the command line's VM): KVM VM
    /// and vCPU creation, guest memory, the kernel image, cold-plugged
    /// devices.
    VmBuilder,
}

impl Thread {
    pub const ALL: [Thread; 7] = [
        Thread::Vmm,
        Thread::Vcpu,
        Thread::HttpServer,
        Thread::SignalHandler,
        Thread::EventMonitor,
        Thread::LogWriter,
        Thread::VmBuilder,
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0:?} thread's seccomp filter")]
    Build(Thread, #[source] seccompiler::BackendError),
    #[error("cannot compile the {0:?} thread's seccomp filter")]
    Compile(Thread, #[source] seccompiler::BackendError),
    #[error("cannot install a seccomp filter")]
    Apply(#[source] seccompiler::Error),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot spawn thread {0}")]
    Spawn(String, #[source] std::io::Error),
    #[error("thread {0} died before installing its filter")]
    Died(String),
}

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

fn vfio_ioctl(request: u32) -> u64 {
    u64::from((VFIO_TYPE << 8) | (VFIO_BASE + request))
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

fn iommufd_ioctl(request: u32) -> u64 {
    u64::from((VFIO_TYPE << 8) | (IOMMUFD_BASE + request))
}

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
        u64::from(KVM_RUN() as u32),
        u64::from(KVM_SET_MEMORY_ATTRIBUTES() as u32),
        u64::from(KVM_SET_GSI_ROUTING() as u32),
        u64::from(KVM_IRQFD() as u32),
        u64::from(KVM_SET_USER_MEMORY_REGION() as u32),
        vfio_ioctl(VFIO_IOMMU_MAP_DMA),
        vfio_ioctl(VFIO_IOMMU_UNMAP_DMA),
        iommufd_ioctl(IOMMU_IOAS_MAP),
        iommufd_ioctl(IOMMU_IOAS_UNMAP),
        // A guest enabling or disabling a VFIO function's MSI-X.
        vfio_ioctl(VFIO_DEVICE_SET_IRQS),
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
    .map(vfio_ioctl)
    .chain(
        [
            IOMMU_DESTROY,
            IOMMU_IOAS_ALLOC,
            IOMMU_IOAS_MAP,
            IOMMU_IOAS_UNMAP,
        ]
        .map(iommufd_ioctl),
    )
    .chain([
        u64::from(KVM_CREATE_DEVICE() as u32),
        u64::from(KVM_SET_DEVICE_ATTR() as u32),
        u64::from(KVM_SET_GSI_ROUTING() as u32),
        u64::from(KVM_IRQFD() as u32),
        u64::from(KVM_SET_USER_MEMORY_REGION() as u32),
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

fn rules_for(thread: Thread) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
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

/// The BPF program for `thread`, or None when filters are off.
pub fn filter(mode: SeccompMode, thread: Thread) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Enforce => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules = rules_for(thread).map_err(|e| SeccompError::Build(thread, e))?;
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e| SeccompError::Build(thread, e))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|e| SeccompError::Build(thread, e))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e| SeccompError::Compile(thread, e))?;
    Ok(Some(program))
}

/// Installs `program` on the calling thread.
pub fn apply(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(SeccompError::Apply)
}

/// Spawns a named thread that installs `program` before it runs `body`.
/// Returns once the filter is in place, so a thread that cannot lock itself
/// down never runs.
pub fn spawn_filtered<F>(
    name: String,
    program: Option<BpfProgram>,
    body: F,
) -> Result<JoinHandle<()>, SeccompError>
where
    F: FnOnce() + Send + 'static,
{
    let (ready_tx, ready_rx) = sync_channel(1);
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            let installed = program.as_ref().map_or(Ok(()), apply);
            let ok = installed.is_ok();
            let _ = ready_tx.send(installed);
            if ok {
                body();
            }
        })
        .map_err(|e| SeccompError::Spawn(name.clone(), e))?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => Err(SeccompError::Died(name)),
    }
}

/// The `sigsys` member of `siginfo_t` (x86_64 layout), which libc does not
/// expose.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// Exit status after a forbidden syscall, as if SIGSYS had killed us.
pub const SECCOMP_VIOLATION_EXIT: i32 = 128 + libc::SIGSYS;

extern "C" fn report_forbidden_syscall(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    _context: *mut libc::c_void,
) {
    use std::io::Write;
    // SAFETY: the kernel hands a SIGSYS handler a siginfo whose union holds
    // the sigsys member, laid out as SigsysInfo.
    let syscall = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes plus a NUL into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(16);
    // Only stack memory and write(2) here: this runs in a signal handler.
    const CAPACITY: usize = 160;
    let mut message = [0u8; CAPACITY];
    let mut cursor = &mut message[..];
    let _ = write!(cursor, "cloud-hypervisor: seccomp: thread '");
    let _ = cursor.write(&name[..name_len]);
    let _ = writeln!(
        cursor,
        "' made forbidden syscall {syscall}; run with --seccomp log to find more"
    );
    let len = CAPACITY - cursor.len();
    // SAFETY: writes `len` initialised bytes of `message` to stderr, then
    // leaves without running any user-space teardown (the process is in an
    // unknown state; closing its fds releases devices and mappings).
    unsafe {
        libc::write(2, message.as_ptr().cast(), len);
        libc::_exit(SECCOMP_VIOLATION_EXIT);
    }
}

/// Makes a forbidden syscall a clear message and exit instead of a bare
/// SIGSYS core dump, and keeps panics ordinary panics under the filters.
pub fn install_violation_reporter() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, report_forbidden_syscall)
        .map_err(SeccompError::Handler)?;
    std::panic::set_hook(Box::new(report_panic));
    Ok(())
}

/// The panic hook for filtered threads. The standard hook resolves a
/// backtrace when RUST_BACKTRACE asks for one (getcwd, opening and mapping
/// the binary's debug information), which no thread's filter allows: a
/// panic would become a seccomp kill of the whole VMM. This one only
/// formats the message and writes it with one write(2), whatever thread
/// it runs on; the thread then unwinds as usual.
fn report_panic(info: &std::panic::PanicHookInfo<'_>) {
    use std::io::Write;
    let thread = std::thread::current();
    let message = info
        .payload()
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a non-text payload)");
    let location = info
        .location()
        .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
    let line = format!(
        "cloud-hypervisor: thread '{}' panicked{location}: {message} \
         (no backtrace under seccomp; --seccomp false gives one)\n",
        thread.name().unwrap_or("unnamed")
    );
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd};

    use super::*;

    #[test]
    fn every_thread_filter_compiles() {
        for thread in Thread::ALL {
            let program = filter(SeccompMode::Enforce, thread).unwrap().unwrap();
            assert!(
                program.len() > 10,
                "{thread:?}: {} instructions",
                program.len()
            );
        }
        assert!(filter(SeccompMode::Off, Thread::Vcpu).unwrap().is_none());
    }

    /// vCPU threads start on the builder thread, so both filters apply to
    /// them: the builder's must let through everything a vCPU may do.
    #[test]
    fn the_builders_filter_lets_through_everything_a_vcpu_may_do() {
        let vcpu = rules_for(Thread::Vcpu).unwrap();
        let builder = rules_for(Thread::VmBuilder).unwrap();
        for (nr, rules) in &vcpu {
            let allowed = &builder[nr];
            if *nr == libc::SYS_ioctl {
                continue;
            }
            assert!(
                allowed.is_empty() || !rules.is_empty(),
                "syscall {nr}: unconditional for vCPUs, conditional for the builder"
            );
        }
        // Behaviour, stacked as on a real vCPU thread: accept4 (serial
        // socket) and pwrite64 (a VFIO BAR write) get through both.
        let stacked = |syscall: i64| {
            let filters: Vec<BpfProgram> = [Thread::VmBuilder, Thread::Vcpu]
                .into_iter()
                .map(|t| {
                    SeccompFilter::new(
                        rules_for(t).unwrap(),
                        SeccompAction::Errno(libc::EPERM as u32),
                        SeccompAction::Allow,
                        std::env::consts::ARCH.try_into().unwrap(),
                    )
                    .unwrap()
                    .try_into()
                    .unwrap()
                })
                .collect();
            std::thread::spawn(move || {
                for filter in &filters {
                    apply(filter).unwrap();
                }
                // SAFETY: invalid fds (-1): the kernel answers EBADF unless
                // the filter answers EPERM first; no memory is touched.
                let rc = unsafe { libc::syscall(syscall, -1, 0, 0, 0) };
                if rc == 0 { 0 } else { last_errno() }
            })
            .join()
            .unwrap()
        };
        assert_eq!(stacked(libc::SYS_accept4), libc::EBADF);
        assert_eq!(stacked(libc::SYS_pwrite64), libc::EBADF);
        assert_eq!(
            stacked(libc::SYS_socket),
            libc::EPERM,
            "vCPUs make no sockets"
        );
    }

    #[test]
    fn mode_parses_like_cloud_hypervisor() {
        assert_eq!(SeccompMode::parse("true"), Ok(SeccompMode::Enforce));
        assert_eq!(SeccompMode::parse("false"), Ok(SeccompMode::Off));
        assert_eq!(SeccompMode::parse("log"), Ok(SeccompMode::Log));
        assert!(SeccompMode::parse("yes").is_err());
    }

    #[test]
    fn an_unconditional_rule_wins_over_a_conditional_one() {
        // openat is read-only for every thread but unrestricted for the VMM
        // thread, which opens VFIO nodes read-write.
        let vmm = rules_for(Thread::Vmm).unwrap();
        assert!(vmm[&libc::SYS_openat].is_empty());
        let vcpu = rules_for(Thread::Vcpu).unwrap();
        assert_eq!(vcpu[&libc::SYS_openat].len(), 1);
        assert_eq!(vcpu[&libc::SYS_ioctl].len(), 10);
    }

    /// Runs `body` in a thread under `thread`'s filter with a SIGSYS-free
    /// action: a forbidden syscall fails with EPERM instead of killing the
    /// test process.
    fn errno_of_syscall_under(thread: Thread, body: impl FnOnce() -> i32 + Send + 'static) -> i32 {
        let rules = rules_for(thread).unwrap();
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
            std::env::consts::ARCH.try_into().unwrap(),
        )
        .unwrap();
        let program: BpfProgram = filter.try_into().unwrap();
        std::thread::spawn(move || {
            apply(&program).unwrap();
            body()
        })
        .join()
        .unwrap()
    }

    fn last_errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn vcpu_threads_cannot_open_files_for_writing_or_make_sockets() {
        let open_rw = || {
            // SAFETY: a NUL-terminated path; the fd, if any, is closed.
            let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
            if fd >= 0 {
                // SAFETY: fd was just opened here.
                unsafe { libc::close(fd) };
                return 0;
            }
            last_errno()
        };
        assert_eq!(errno_of_syscall_under(Thread::Vcpu, open_rw), libc::EPERM);
        assert_eq!(errno_of_syscall_under(Thread::Vmm, open_rw), 0);
        let socket = || {
            // SAFETY: plain socket creation; the fd, if any, is closed.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd >= 0 {
                // SAFETY: fd was just created here.
                unsafe { libc::close(fd) };
                return 0;
            }
            last_errno()
        };
        assert_eq!(errno_of_syscall_under(Thread::Vcpu, socket), libc::EPERM);
        // Unix sockets only, even for the threads that make sockets.
        assert_eq!(
            errno_of_syscall_under(Thread::HttpServer, socket),
            libc::EPERM
        );
        assert_eq!(errno_of_syscall_under(Thread::Vmm, socket), libc::EPERM);
    }

    #[test]
    fn vcpu_threads_may_only_punch_holes() {
        // Created outside the filter: vCPU threads cannot make files.
        // SAFETY: a NUL-terminated name; the fd is owned by `file` below.
        let fd = unsafe { libc::memfd_create(c"punch".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: fd was just created and nothing else owns it.
        let file = std::sync::Arc::new(unsafe { std::fs::File::from_raw_fd(fd) });
        file.set_len(8192).unwrap();
        let fallocate_under = |thread, mode| {
            let file = file.clone();
            errno_of_syscall_under(thread, move || {
                // SAFETY: fallocate on an fd `file` keeps open; no pointers.
                let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, 0, 4096) };
                if rc == 0 { 0 } else { last_errno() }
            })
        };
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(fallocate_under(Thread::Vcpu, punch), 0);
        assert_eq!(fallocate_under(Thread::Vcpu, 0), libc::EPERM);
        assert_eq!(
            fallocate_under(Thread::Vcpu, libc::FALLOC_FL_ZERO_RANGE),
            libc::EPERM
        );
        // The VMM thread never touches guest backing after boot.
        assert_eq!(fallocate_under(Thread::Vmm, punch), libc::EPERM);
    }

    #[test]
    fn vcpu_ioctls_are_limited_to_the_allowed_requests() {
        let ioctl = || {
            // SAFETY: winsize is four integers; all zeros is a valid value.
            let mut size: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ writes at most one winsize into `size`.
            let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut size) };
            if rc == 0 { 0 } else { last_errno() }
        };
        assert_eq!(errno_of_syscall_under(Thread::Vcpu, ioctl), libc::EPERM);
        assert_eq!(
            errno_of_syscall_under(Thread::SignalHandler, ioctl),
            libc::EPERM
        );
        // The VM builder may issue any KVM or VFIO request, nothing else.
        assert_eq!(
            errno_of_syscall_under(Thread::VmBuilder, ioctl),
            libc::EPERM
        );
    }

    #[test]
    fn the_vmm_thread_may_create_the_kvm_vfio_device() {
        use hypervisor::Hypervisor;
        let Some(hv) = crate::test_util::kvm() else {
            return;
        };
        let vm = hv.create_vm(hypervisor::VmType::Default).unwrap();
        let create_under = |thread| {
            let vm = vm.clone();
            errno_of_syscall_under(thread, move || match vm.create_vfio_device() {
                Ok(_) => 0,
                Err(e) => std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<std::io::Error>())
                    .and_then(std::io::Error::raw_os_error)
                    .unwrap_or(-1),
            })
        };
        assert_eq!(create_under(Thread::Vmm), 0);
        assert_eq!(create_under(Thread::VmBuilder), 0);
        assert_eq!(create_under(Thread::Vcpu), libc::EPERM);
    }

    const VIOLATION_CHILD: &str = "CH_SECCOMP_VIOLATION_CHILD";

    /// Runs in a child test process (see below): makes a forbidden syscall
    /// from a filtered vCPU-like thread.
    #[test]
    fn violation_child() {
        if std::env::var_os(VIOLATION_CHILD).is_none() {
            return;
        }
        install_violation_reporter().unwrap();
        let program = filter(SeccompMode::Enforce, Thread::Vcpu).unwrap();
        let thread = spawn_filtered("vcpu7".into(), program, || {
            // SAFETY: the filter traps this before the kernel runs it.
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        })
        .unwrap();
        let _ = thread.join();
        unreachable!("the forbidden syscall returned");
    }

    #[test]
    fn a_forbidden_syscall_is_reported_with_its_thread_and_number() {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "seccomp_filters::tests::violation_child",
                "--nocapture",
            ])
            .env(VIOLATION_CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(SECCOMP_VIOLATION_EXIT),
            "{stderr}"
        );
        let expected = format!("thread 'vcpu7' made forbidden syscall {}", libc::SYS_socket);
        assert!(stderr.contains(&expected), "{stderr}");
    }

    const PANIC_CHILD: &str = "CH_SECCOMP_PANIC_CHILD";

    /// Runs in a child test process (see below): a thread under each
    /// filter panics; the panic must stay an ordinary panic.
    #[test]
    fn panic_child() {
        if std::env::var_os(PANIC_CHILD).is_none() {
            return;
        }
        install_violation_reporter().unwrap();
        for thread in Thread::ALL {
            let program = filter(SeccompMode::Enforce, thread).unwrap();
            let handle = spawn_filtered(format!("{thread:?}"), program, move || {
                panic!("a deliberate panic under the {thread:?} filter");
            })
            .unwrap();
            assert!(
                handle.join().is_err(),
                "{thread:?}: the thread did not panic"
            );
        }
        eprintln!("every filtered thread panicked and the process lives");
    }

    #[test]
    fn a_panic_under_any_filter_is_not_turned_into_a_seccomp_kill() {
        for backtrace in ["0", "1", "full"] {
            let output = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "seccomp_filters::tests::panic_child",
                    "--nocapture",
                ])
                .env(PANIC_CHILD, "1")
                .env("RUST_BACKTRACE", backtrace)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success()
                    && stderr.contains("every filtered thread panicked and the process lives")
                    && stderr.contains("thread 'Vmm' panicked at vmm/src/seccomp_filters.rs:")
                    && stderr.contains("a deliberate panic under the Vmm filter"),
                "RUST_BACKTRACE={backtrace}: {:?}\n{stderr}",
                output.status
            );
        }
    }
}
