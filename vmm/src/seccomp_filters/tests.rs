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

/// Whether this process is the child test `var` asks for (see `run_child`);
/// if so, forbidden syscalls are reported as the VMM reports them.
fn in_child(var: &str) -> bool {
    if std::env::var_os(var).is_none() {
        return false;
    }
    install_violation_reporter().unwrap();
    true
}

/// Runs `seccomp_filters::tests::<test>` in a child test process, with
/// `var=1` (and `env`) set; returns its exit status and stderr.
fn run_child(test: &str, var: &str, env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            &format!("seccomp_filters::tests::{test}"),
            "--nocapture",
        ])
        .env(var, "1")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status, stderr)
}

const VIOLATION_CHILD: &str = "CH_SECCOMP_VIOLATION_CHILD";

/// Runs in a child test process (see below): makes a forbidden syscall
/// from a filtered vCPU-like thread.
#[test]
fn violation_child() {
    if !in_child(VIOLATION_CHILD) {
        return;
    }
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
    let (status, stderr) = run_child("violation_child", VIOLATION_CHILD, &[]);
    assert_eq!(status.code(), Some(SECCOMP_VIOLATION_EXIT), "{stderr}");
    let expected = format!("thread 'vcpu7' made forbidden syscall {}", libc::SYS_socket);
    assert!(stderr.contains(&expected), "{stderr}");
}

const PANIC_CHILD: &str = "CH_SECCOMP_PANIC_CHILD";

/// Runs in a child test process (see below): a thread under each
/// filter panics; the panic must stay an ordinary panic.
#[test]
fn panic_child() {
    if !in_child(PANIC_CHILD) {
        return;
    }
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
        let env = [("RUST_BACKTRACE", backtrace)];
        let (status, stderr) = run_child("panic_child", PANIC_CHILD, &env);
        assert!(
            status.success()
                && stderr.contains("every filtered thread panicked and the process lives")
                && stderr.contains("thread 'Vmm' panicked at vmm/src/seccomp_filters/tests.rs:")
                && stderr.contains("a deliberate panic under the Vmm filter"),
            "RUST_BACKTRACE={backtrace}: {status:?}\n{stderr}"
        );
    }
}
