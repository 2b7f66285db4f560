//! Booting memconv guests on real KVM and the CLI's answers to bad input.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// Piped into a file or a pager, help is laid out at 100 columns; the
/// option syntaxes are wider, and descriptions must not end up one word
/// per line in a column past them. Both binaries, as users run them.
#[test]
fn help_stays_readable_when_piped() {
    for (binary, says) in [
        (CLOUD_HYPERVISOR, "Serve the REST API: a socket path"),
        (CH_REMOTE, "Connect a vfio-user device"),
    ] {
        let out = Command::new(binary)
            .arg("--help")
            .env_remove("COLUMNS")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{binary} --help");
        let help = String::from_utf8(out.stdout).unwrap();
        let deep: Vec<&str> = help
            .lines()
            .filter(|l| l.len() - l.trim_start().len() > 20)
            .collect();
        assert!(deep.is_empty(), "{binary}: {deep:?}");
        assert!(help.contains(says), "{binary}: {help}");
    }
}

#[test]
fn memconv_guest_reports_every_op_on_guest_memfd() {
    let dir = kvm_test!("boot");
    let guest = memconv_guest(
        &dir,
        &["shared@0x1000000+16K,private@0x1001000+4K,write@0x1000000+64=0x5a,nop@0+0"],
        false,
    );
    let vmm = GuestVmm::spawn(&guest, &["--memory", "size=512M,guest_memfd=on", "-v"]);
    let done = vmm.wait_for_line("memconv: done");
    assert_eq!(done, "memconv: done 4 ok 0 failed");
    let console = vmm.console();
    let ops: Vec<_> = console.iter().filter(|l| l.contains(" op ")).collect();
    assert_eq!(ops.len(), 4, "one line per op: {console:#?}");
    assert_eq!(
        ops[0],
        "memconv: cpu0 op 0 shared gpa=0x1000000 size=0x4000 status=ok"
    );
    assert_eq!(
        ops[1],
        "memconv: cpu0 op 1 private gpa=0x1001000 size=0x1000 status=ok"
    );
    assert_eq!(
        ops[2],
        "memconv: cpu0 op 2 write gpa=0x1000000 size=0x40 value=0x5a status=ok"
    );
    assert_eq!(ops[3], "memconv: cpu0 op 3 nop gpa=0x0 size=0x0 status=ok");
    let log = vmm.stderr();
    assert!(
        log.contains("backed by guest_memfd"),
        "guest_memfd in use:\n{log}"
    );
}

#[test]
fn bad_conversions_get_an_error_status_and_the_vmm_keeps_running() {
    let dir = kvm_test!("badconv");
    let ops = [
        "shared@0x1000001+4K",          // unaligned GPA
        "shared@0x1000000+0",           // zero size
        "private@0x1000000+0x1001",     // unaligned size
        "shared@0xfffffffffffff000+8K", // overflows
        "shared@0x1ffff000+8K",         // half RAM (512 MiB), half beyond
        "private@0x40000000+4K",        // beyond RAM: cannot be private
        "private@0xfec00000+4K",        // the IOAPIC page: cannot be private
        // Firmware of confidential guests makes MMIO shared before use:
        // accepted, nothing to track.
        "shared@0x40000000+4K",  // beyond RAM
        "shared@0xd0000000+64K", // the 32-bit MMIO hole
        "shared@0xfec00000+4K",  // the IOAPIC page
        "shared@0x1ff000+8K",    // ok: below 16 MiB is still RAM
    ];
    let guest = memconv_guest(&dir, &[&ops.join(",")], false);
    let mut vmm = GuestVmm::spawn(&guest, &["--memory", "size=512M,guest_memfd=on"]);
    assert_eq!(
        vmm.wait_for_line("memconv: done"),
        "memconv: done 4 ok 7 failed"
    );
    let statuses = vmm.op_statuses();
    assert_eq!(
        statuses,
        [
            "invalid",
            "invalid",
            "invalid",
            "invalid",
            "out-of-range",
            "out-of-range",
            "out-of-range",
            "ok",
            "ok",
            "ok",
            "ok"
        ]
    );
    assert!(vmm.is_running(), "the VMM survives bad guest input");
}

#[test]
fn anonymous_memory_refuses_conversions() {
    let dir = kvm_test!("anon");
    let guest = memconv_guest(&dir, &["shared@0x1000000+4K"], true);
    let mut vmm = GuestVmm::spawn(&guest, &["--memory", "size=64M"]);
    assert_eq!(
        vmm.wait_for_line("memconv: done"),
        "memconv: done 0 ok 1 failed"
    );
    assert!(vmm.console()[0].ends_with("status=out-of-range"));
    assert!(
        vmm.wait_exit(TIMEOUT).success(),
        "power-off ends the VMM with 0"
    );
}

#[test]
fn split_layout_boots_and_converts() {
    let dir = kvm_test!("split");
    let guest = memconv_guest(&dir, &["shared@0x1000000+64K,private@0x1000000+64K"], true);
    let mut vmm = GuestVmm::spawn(
        &guest,
        &["--memory", "size=64M,guest_memfd=on,layout=split", "-v"],
    );
    assert_eq!(
        vmm.wait_for_line("memconv: done"),
        "memconv: done 2 ok 0 failed"
    );
    assert!(vmm.wait_exit(TIMEOUT).success());
    assert!(vmm.stderr().contains("backed by guest_memfd+memfd"));
}

#[test]
fn serial_to_file_and_off() {
    let dir = kvm_test!("serial");
    let guest = memconv_guest(&dir, &["shared@0x1000000+4K"], true);
    let console = dir.path("console.txt");
    let serial = format!("file={}", console.display());
    // The guest run to the end with this memory and serial console.
    let run_with = |memory: &str, serial: &str| {
        let guest = guest.to_str().unwrap();
        run_vmm(&["--kernel", guest, "--memory", memory, "--serial", serial])
    };
    let (status, stdout, _) = run_with("size=32M,guest_memfd=on", &serial);
    assert!(status.success());
    assert!(stdout.is_empty());
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(text.contains("memconv: done 1 ok 0 failed"), "{text}");
    // A kernel pseudo-file is refused before the VM runs, under seccomp.
    let (status, _, stderr) = run_with("size=32M,guest_memfd=on", "file=/proc/self/comm");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("a procfs or sysfs file takes no console output"),
        "{stderr}"
    );
    let (status, stdout, _) = run_with("size=32M", "off");
    assert!(status.success());
    assert!(stdout.is_empty());
}

#[test]
fn bad_command_lines_fail_with_clear_errors() {
    let dir = TempDir::new("cli");
    let guest = memconv_guest(&dir, &["shared@0x1000000+4K"], true);
    let g = guest.to_str().unwrap();
    let garbage = dir.path("garbage.bin");
    std::fs::write(&garbage, b"definitely not an ELF").unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--kernel", g, "--memory", "size=0"], "must not be zero"),
        (
            &["--kernel", g, "--memory", "size=16777217"],
            "multiple of 4 KiB",
        ),
        (
            &["--kernel", g, "--memory", "size=1G,fast=yes"],
            "unknown key \"fast\"",
        ),
        (&["--kernel", g, "--cpus", "boot=0"], "expected 1..=32"),
        (&["--kernel", g, "--serial", "vga"], "--serial"),
        (&["--memory", "size=1G"], "--kernel"),
        (
            &["--kernel", "/nonexistent/guest.elf"],
            "cloud-hypervisor: cannot boot the VM: cannot read kernel /nonexistent/guest.elf",
        ),
        (&["--kernel", garbage.to_str().unwrap()], "not an ELF file"),
        (
            &["--kernel", g, "--platform", "tdx=on,sev_snp=on"],
            "choose one of tdx, sev_snp and sw_protected",
        ),
        (
            &["--kernel", g, "--platform", "num_pci_segments=2"],
            "only 1 PCI segment exists",
        ),
        (
            &["--kernel", g, "--disk", "path=/d.img"],
            "--disk is not supported by this VMM",
        ),
        (
            &["--kernel", g, "--memory", "size=1G,hugepages=on"],
            "hugepages are not supported",
        ),
        (&["--kernel", g, "--serial", "socket="], "empty path"),
    ];
    for (args, expected) in cases {
        let (status, _, stderr) = run_vmm(args);
        assert!(!status.success(), "{args:?} must fail");
        assert_ne!(status.code(), Some(101), "{args:?} panicked:\n{stderr}");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected {expected:?} in:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?}:\n{stderr}");
    }
}

/// `--platform` picks the VM type; a type the host does not offer is a
/// clear error naming what it does offer (on this machine: only the
/// default type, whose VMs track no memory attributes).
#[test]
fn platform_selects_the_vm_type_or_says_what_the_host_offers() {
    let dir = kvm_test!("platform");
    let guest = memconv_guest(&dir, &["shared@0x1000000+4K"], true);
    let g = guest.to_str().unwrap();
    let (status, caps, _) = run_vmm(&["--capabilities"]);
    assert!(status.success());
    let caps: serde_json::Value = serde_json::from_str(&caps).unwrap();
    let offered: Vec<String> = caps["vm_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    for (platform, name) in [
        ("tdx=on", "tdx"),
        ("sev_snp=on", "sev-snp"),
        ("sw_protected=on", "sw-protected"),
    ] {
        if offered.iter().any(|t| t == name) {
            continue;
        }
        let (status, _, err) = run_vmm(&["--kernel", g, "--platform", platform]);
        assert!(!status.success(), "{platform}");
        let expected = format!(
            "VM type {name} is not available on this host (it offers: {})",
            offered.join(", ")
        );
        assert!(err.contains(&expected), "{platform}: {err}");
    }
    let api = dir.path("api.sock");
    let spin = memconv_guest(&dir, &["wait@0x100f000+1=1"], false);
    let _vmm = GuestVmm::spawn(
        &spin,
        &[
            "--memory",
            "size=64M,guest_memfd=on",
            "--platform",
            "num_pci_segments=1",
            "--api-socket",
            api.to_str().unwrap(),
        ],
    );
    wait_for_socket(&api);
    let (ok, info, err) = ch_remote(&api, &["info"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["vm_type"], "default");
    assert_eq!(info["memory_attributes"], false);
    assert_eq!(info["config"]["platform"]["num_pci_segments"], 1);
}

/// VFIO through the type1 container or iommufd (`--platform iommufd=on`,
/// or per device): this machine has neither, so each choice must end in an
/// error naming the node it lacks and the other choice, at boot and at
/// hot-plug, with the VMM still serving after the hot-plug refusal.
#[test]
fn vfio_devices_name_the_kernel_interface_this_host_lacks() {
    let dir = kvm_test!("vfio");
    let guest = memconv_guest(&dir, &["shared@0x1000000+4K"], true);
    let g = guest.to_str().unwrap();
    let path = "path=/sys/bus/pci/devices/0000:00:01.0/";
    let iommufd = format!("{path},iommufd=on");
    let type1 = format!("{path},iommufd=off");
    let cases: &[(&[&str], &str, &str)] = &[
        (&["--device", path], "/dev/vfio/vfio", "iommufd=on"),
        (&["--device", &iommufd], "/dev/iommu", "iommufd=off"),
        (
            &["--platform", "iommufd=on", "--device", path],
            "/dev/iommu",
            "iommufd=off",
        ),
        (
            &["--platform", "iommufd=on", "--device", &type1],
            "/dev/vfio/vfio",
            "iommufd=on",
        ),
    ];
    for (extra, missing, hint) in cases {
        let mut args = vec!["--kernel", g, "--memory", "size=64M,guest_memfd=on"];
        args.extend_from_slice(extra);
        let (status, _, stderr) = run_vmm(&args);
        assert!(!status.success(), "{extra:?} must fail");
        assert_ne!(status.code(), Some(101), "{extra:?} panicked:\n{stderr}");
        assert!(
            stderr.contains(missing) && stderr.contains(hint),
            "{extra:?}: expected {missing:?} and {hint:?} in:\n{stderr}"
        );
    }

    let guest = memconv_guest(&dir, &["shared@0x1000000+4K"], false);
    let (mut vmm, api) = spawn_with_api(&dir, &guest, &["--platform", "iommufd=on"]);
    wait_for_socket(&api);
    vmm.wait_for_line("memconv: done");
    let (ok, _, err) = ch_remote(&api, &["add-device", path]);
    assert!(!ok);
    assert!(err.contains("/dev/iommu"), "{err}");
    let (ok, info, err) = ch_remote(&api, &["info"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["devices"], serde_json::json!([]));
    assert_eq!(info["config"]["platform"]["iommufd"], true);
    assert!(vmm.is_running());
}

/// A command line written for Cloud Hypervisor, with options that have no
/// effect here, boots as written.
#[test]
fn a_cloud_hypervisor_command_line_boots_as_written() {
    let dir = kvm_test!("chcli");
    let guest = memconv_guest(&dir, &["shared@0x1000000+4K"], true);
    let (status, stdout, stderr) = run_vmm(&[
        "--cpus",
        "boot=1,max=2",
        "--memory",
        "size=64M,shared=on,hugepages=off",
        "--kernel",
        guest.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=1",
        "--console",
        "off",
        "--serial",
        "tty",
        "--rng",
        "src=/dev/urandom",
        "--watchdog",
        "-v",
    ]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("memconv: done 0 ok 1 failed"), "{stdout}");
    assert!(stderr.contains("--rng: has no effect here"), "{stderr}");
}

/// `--serial pty` and `--serial socket=PATH`: the console reaches whoever
/// opens the pty or connects, from then on; before that it is dropped, and
/// the guest never waits for a reader. Seccomp filters are on.
#[test]
fn the_serial_console_on_a_pty_and_on_a_socket() {
    kvm_test!();
    use std::io::{BufRead, BufReader};
    const A: u64 = 16 << 20;
    let flag = A + 0x8000;
    for kind in ["pty", "socket"] {
        let dir = TempDir::new("serialout");
        let device = TestDevice::spawn(&dir, "dev0");
        // The guest waits for the test to be listening before it converts.
        let ops = format!("shared@{A:#x}+64K,wait@{flag:#x}+1=1,private@{A:#x}+4K");
        let guest = memconv_guest(&dir, &[&ops], false);
        let socket = dir.path("console.sock");
        let serial = match kind {
            "pty" => "pty".to_string(),
            _ => user_device(&socket, ""),
        };
        let (vmm, api) =
            spawn_with_devices(&dir, &guest, &[device.plug("")], &["--serial", &serial]);
        wait_for_socket(&api);
        let (ok, info, err) = ch_remote(&api, &["info"]);
        assert!(ok, "{err}");
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        let reader: Box<dyn std::io::Read> = if kind == "pty" {
            assert_eq!(info["config"]["serial"]["mode"], "Pty");
            let path = info["config"]["serial"]["file"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(path.starts_with("/dev/pts/"), "{path}");
            Box::new(std::fs::File::open(&path).unwrap())
        } else {
            assert_eq!(info["config"]["serial"]["mode"], "Socket");
            assert_eq!(info["config"]["serial"]["socket"], socket.to_str().unwrap());
            Box::new(std::os::unix::net::UnixStream::connect(&socket).unwrap())
        };
        assert!(
            wait_until(|| device.mapping_count() > 0),
            "{}",
            vmm.stderr()
        );
        device.write(flag, 1);
        let mut lines = BufReader::new(reader).lines();
        let mut seen = Vec::new();
        while let Some(Ok(line)) = lines.next() {
            let done = line.contains("memconv: done");
            seen.push(line);
            if done {
                break;
            }
        }
        let seen = seen.join("\n");
        assert!(seen.contains("op 2 private"), "{kind}: {seen}");
        assert!(
            seen.contains("memconv: done 3 ok 0 failed"),
            "{kind}: {seen}"
        );
        let (ok, _, err) = ch_remote(&api, &["shutdown-vmm"]);
        assert!(ok, "{kind}: {err}\n{}", vmm.stderr());
        let mut vmm = vmm;
        assert!(vmm.wait_exit(TIMEOUT).success(), "{}", vmm.stderr());
        assert!(!socket.exists(), "the console socket is removed");
    }
}
