//! Installing filters on threads, and what happens on a violation or a
//! panic under them.

use std::sync::mpsc::sync_channel;
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

use super::SeccompError;

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
