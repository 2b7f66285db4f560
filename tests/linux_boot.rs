//! Debian's own cloud kernel (the image `linux-image-cloud-amd64` depends
//! on, fetched by .ci/run from the package registry) booted on our VMM with
//! two vCPUs and 512 MiB of guest_memfd RAM. This host's instruction
//! emulator stops such a kernel at its int3 self-test, so the proof is the
//! kernel's own account of what it was given: our command line, an e820
//! map whose usable RAM is ours, our MCFG, and SMP taken from our MADT.
//! The test stops the VM once those lines are in. The kernel comes by PVH
//! (its vmlinux, taken out of the bzImage) and as the bzImage itself.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// Where .ci/run unpacks the kernel package, or `CH_LINUX_KERNEL`.
fn debian_kernel() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CH_LINUX_KERNEL") {
        return Some(PathBuf::from(path));
    }
    let boot = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/debian-kernel/boot");
    std::fs::read_dir(boot)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// The ELF vmlinux inside a bzImage whose payload is LZ4 (Debian's is):
/// the kernel's legacy LZ4 format, 8 MiB blocks each behind its
/// compressed length. Booted by PVH it skips the decompressor, which this
/// host's emulator runs for minutes.
fn vmlinux_of(bzimage: &[u8]) -> Vec<u8> {
    let u32_at = |at: usize| u32::from_le_bytes(bzimage[at..at + 4].try_into().unwrap());
    let setup = (usize::from(bzimage[0x1f1].max(4)) + 1) * 512;
    let (offset, length) = (u32_at(0x248) as usize, u32_at(0x24c) as usize);
    let payload = &bzimage[setup + offset..setup + offset + length];
    const LEGACY_LZ4: u32 = 0x184c_2102;
    const BLOCK: usize = 8 << 20;
    let word = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().unwrap());
    assert_eq!(word(0), LEGACY_LZ4, "not an LZ4 payload");
    // The payload ends with the uncompressed size.
    let end = payload.len() - 4;
    let mut out = Vec::new();
    let mut at = 4;
    while at + 4 <= end {
        let size = word(at) as usize;
        at += 4;
        if u32::try_from(size).unwrap() == LEGACY_LZ4 {
            continue;
        }
        let start = out.len();
        out.resize(start + BLOCK, 0);
        let n = lz4_flex::block::decompress_into(&payload[at..at + size], &mut out[start..])
            .expect("an LZ4 block");
        out.truncate(start + n);
        at += size;
    }
    assert!(
        out.starts_with(b"\x7fELF"),
        "the payload is not an ELF vmlinux"
    );
    out
}

/// How long the kernel may take to print what we check, its early boot
/// running under this host's instruction emulator (measured 27 s by PVH on
/// a loaded machine), and how long a bzImage's decompressor takes to say
/// what it read (well under a second).
const PVH_DEADLINE: Duration = Duration::from_secs(110);
const BZIMAGE_DEADLINE: Duration = Duration::from_secs(30);

/// Debian's kernel, or None when it may be skipped (never in CI).
fn kernel_or_skip(test: &str) -> Option<PathBuf> {
    if !kvm_available(test) {
        return None;
    }
    let kernel = debian_kernel();
    if kernel.is_none() {
        assert!(
            std::env::var("CH_REQUIRE_KVM").as_deref() != Ok("1"),
            "Debian's cloud kernel is missing: .ci/run unpacks it into target/debian-kernel"
        );
        eprintln!(
            "*** SKIPPED: {test}: no Debian cloud kernel (run .ci/run or set CH_LINUX_KERNEL) ***"
        );
    }
    kernel
}

/// CX16 and XSAVE hidden and `noxsave`: this host's emulator has no
/// cmpxchg16b or xrstor (docs/user-guide.md, "Boot a Linux guest").
const CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 noxsave nokaslr panic=-1";

/// The VMM running `kernel` with two vCPUs and 512 MiB of guest_memfd RAM,
/// its console in `console`.
fn spawn_linux(kernel: &std::path::Path, console: &std::path::Path, extra: &[&str]) -> GuestVmm {
    let serial = format!("file={}", console.display());
    let mut args = vec![
        "--cmdline",
        CMDLINE,
        "--cpus",
        "boot=2,hide=cx16:xsave",
        "--memory",
        "size=512M,guest_memfd=on",
        "--serial",
        &serial,
    ];
    args.extend_from_slice(extra);
    GuestVmm::spawn(kernel, &args)
}

/// Boots `kernel` with two vCPUs and 512 MiB and waits (up to `deadline`)
/// for the kernel to report our command line, e820 map, MCFG and MADT;
/// then stops the VMM over the API.
fn boot_and_read_what_the_kernel_was_given(
    dir: &TempDir,
    kernel: &std::path::Path,
    deadline: Duration,
) {
    let console = dir.path("console.log");
    let api = dir.path("api.sock");
    // An initramfs the kernel finds where the boot protocol says (it stops
    // before unpacking it).
    let initramfs = dir.path("initramfs");
    std::fs::write(&initramfs, vec![0x5a; 8192]).unwrap();
    let mut vmm = spawn_linux(
        kernel,
        &console,
        &[
            "--api-socket",
            api.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
        ],
    );
    let wanted = [
        format!("Command line: {CMDLINE}"),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".to_string(),
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved".to_string(),
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable".to_string(),
        "BIOS-e820: [mem 0x00000000e0000000-0x00000000e00fffff] reserved".to_string(),
        "ACPI: MCFG 0x00000000000E".to_string(),
        "(v01 CLOUDH CHSHARED".to_string(),
        "ACPI: Using ACPI (MADT) for SMP configuration information".to_string(),
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs".to_string(),
        // 8 KiB at the top of the 512 MiB.
        "RAMDISK: [mem 0x1fffe000-0x1fffffff]".to_string(),
    ];
    let started = Instant::now();
    let log = || std::fs::read_to_string(&console).unwrap_or_default();
    let missing = |text: &str| -> Vec<String> {
        wanted
            .iter()
            .filter(|w| !text.contains(w.as_str()))
            .cloned()
            .collect()
    };
    loop {
        let text = log();
        if missing(&text).is_empty() {
            break;
        }
        assert!(
            started.elapsed() < deadline && vmm.is_running(),
            "after {:?} the kernel has not said {:?}:\n{text}\n{}",
            started.elapsed(),
            missing(&text),
            vmm.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "{}: the kernel reported what it was given after {:?}",
        kernel.display(),
        started.elapsed()
    );
    // No other usable RAM than ours.
    let usable: Vec<String> = log()
        .lines()
        .filter(|l| l.contains("BIOS-e820") && l.ends_with("usable"))
        .map(str::to_string)
        .collect();
    assert_eq!(usable.len(), 2, "{usable:?}");
    // The VMM still answers, and shuts the VM down on request.
    let (ok, _, err) = ch_remote(&api, &["ping"]);
    assert!(ok, "{err}");
    let (ok, _, err) = ch_remote(&api, &["shutdown-vmm"]);
    assert!(ok, "{err}");
    assert!(vmm.wait_exit(TIMEOUT).success(), "{}", vmm.stderr());
}

/// The vmlinux inside Debian's image, by PVH: the kernel from its first
/// instruction, without the decompressor.
#[test]
fn debians_kernel_by_pvh_reports_our_e820_acpi_tables_and_smp() {
    let Some(kernel) = kernel_or_skip("debians_kernel_by_pvh_reports_our_e820_acpi_tables_and_smp")
    else {
        return;
    };
    let dir = TempDir::new("linux-pvh");
    let vmlinux = dir.path("vmlinux");
    std::fs::write(&vmlinux, vmlinux_of(&std::fs::read(&kernel).unwrap())).unwrap();
    boot_and_read_what_the_kernel_was_given(&dir, &vmlinux, PVH_DEADLINE);
}

/// Debian's bzImage as it ships, through the 64-bit boot protocol. Its
/// decompressor runs first, under this host's emulator, for one to several
/// minutes depending on load, so the test stops at the decompressor's own
/// account: it ran from our 64-bit entry and read our command line from our
/// zero page. (What the decompressed kernel then reports is the PVH test's
/// check; by hand, the bzImage reports the same lines, see docs/testing.md.)
#[test]
fn debians_bzimage_starts_from_our_64_bit_entry_and_reads_our_command_line() {
    let Some(kernel) =
        kernel_or_skip("debians_bzimage_starts_from_our_64_bit_entry_and_reads_our_command_line")
    else {
        return;
    };
    let dir = TempDir::new("linux-bzimage");
    let console = dir.path("console.log");
    let mut vmm = spawn_linux(&kernel, &console, &[]);
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("KASLR disabled: 'nokaslr' on cmdline.") {
            break;
        }
        assert!(
            started.elapsed() < BZIMAGE_DEADLINE && vmm.is_running(),
            "after {:?} the decompressor has not spoken:\n{text}\n{}",
            started.elapsed(),
            vmm.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    vmm.signal(libc::SIGTERM);
    assert!(vmm.wait_exit(TIMEOUT).success(), "{}", vmm.stderr());
}

#[test]
fn a_linux_kernel_that_cannot_be_booted_is_a_clear_error() {
    let dir = kvm_test!("linux-bad");
    // A bzImage header promising more than the file holds.
    let mut truncated = vec![0u8; 4096];
    truncated[0x1f1] = 1;
    truncated[0x1f4..0x1f8].copy_from_slice(&0x1000u32.to_le_bytes());
    truncated[0x202..0x206].copy_from_slice(b"HdrS");
    truncated[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    truncated[0x236] = 1;
    let kernel = dir.path("bzImage");
    std::fs::write(&kernel, &truncated).unwrap();
    // The VMM exits with 1 and says `why` for `kernel` (and `extra`).
    let refused = |kernel: &Path, extra: &[&str], why: &str| {
        let mut args = vec!["--kernel", kernel.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--memory", "size=64M,guest_memfd=on"]);
        let (status, _, stderr) = run_vmm(&args);
        assert_eq!(status.code(), Some(1), "{why:?}: {stderr}");
        assert!(stderr.contains(why), "{why:?}: {stderr}");
    };
    refused(&kernel, &[], "the bzImage is 4096 bytes, its header says");
    // An initramfs for one of our test guests is refused too.
    let guest = memconv_guest(&dir, &["nop@0+4K"], true);
    let rd = dir.path("initrd");
    std::fs::write(&rd, b"x").unwrap();
    let initramfs = ["--initramfs", rd.to_str().unwrap()];
    refused(&guest, &initramfs, "an initramfs needs a Linux kernel");
}
