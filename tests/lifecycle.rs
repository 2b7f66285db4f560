//! Cloud Hypervisor's VM lifecycle as its clients drive it: an empty VMM,
//! `vm.create` with CH's `VmConfig` JSON (as `ch-remote create` sends a
//! file), boot, pause/resume, shutdown that keeps the VMM serving, boot
//! again, reboot, delete, and `vmm.shutdown`; every answer checked against
//! our OpenAPI schemas, every device mapping against the VMM's shared set.

mod common;

use std::path::PathBuf;

use common::openapi::Spec;
use common::*;
use serde_json::{Value, json};

const A: u64 = 16 << 20;

fn info(api: &std::path::Path) -> (u16, Value) {
    let (status, body) = get(api, "vm.info");
    (status, serde_json::from_str(&body).unwrap())
}

/// The number of times the guest has run to its end.
fn runs(vmm: &GuestVmm) -> usize {
    vmm.console()
        .iter()
        .filter(|l| l.starts_with("memconv: done"))
        .count()
}

fn wait_runs(vmm: &GuestVmm, n: usize) {
    assert!(
        wait_until(|| runs(vmm) >= n),
        "guest run {n} never finished:\n{}\n{}",
        vmm.console().join("\n"),
        vmm.stderr()
    );
}

/// The guest the lifecycle tests boot: shares 16 KiB, makes 4 KiB of it
/// private again, and halts when done (no power-off: the VM stays booted
/// until told).
fn halting_guest(dir: &TempDir) -> PathBuf {
    let ops = format!("shared@{A:#x}+16K,private@{A:#x}+4K");
    memconv_guest(dir, &[&ops], false)
}

#[test]
fn an_empty_vmm_creates_boots_shuts_down_boots_again_reboots_and_deletes() {
    kvm_test!();
    let spec = Spec::load();
    let dir = TempDir::new("lifecycle");
    let device = TestDevice::spawn(&dir, "dev0");
    let guest = halting_guest(&dir);
    let api = dir.path("api.sock");
    let events = dir.path("events.jsonl");
    let monitor = format!("path={}", events.display());
    let mut vmm = GuestVmm::spawn_args(&[
        "--api-socket",
        &format!("path={}", api.display()),
        "--event-monitor",
        &monitor,
    ]);
    wait_for_socket(&api);

    // Empty: the VMM answers; there is no VM to show or boot.
    let (ok, ping, err) = ch_remote(&api, &["ping"]);
    assert!(ok, "{err}");
    spec.check("VmmPingResponse", &serde_json::from_str(&ping).unwrap())
        .unwrap();
    let (status, body) = info(&api);
    assert_eq!(status, 404);
    spec.check("Error", &body).unwrap();
    let (status, _) = put(&api, "vm.boot", "");
    assert_eq!(status, 404);

    // What a Cloud Hypervisor client sends: every section, most of them
    // empty or off.
    let config = json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256u64 << 20, "guest_memfd": true, "shared": false,
                   "hugepages": false},
        "payload": {"kernel": guest, "cmdline": "console=ttyS0"},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
        "disks": [], "net": [], "rng": {"src": "/dev/urandom"},
        "user_devices": [{"socket": device.socket, "id": "dev0", "pci_segment": 0}],
        "iommu": false, "watchdog": false, "pvpanic": false,
        "platform": {"num_pci_segments": 1},
    });
    let config_file = dir.path("vm.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let (ok, _, err) = ch_remote(&api, &["create", config_file.to_str().unwrap()]);
    assert!(ok, "{err}");
    // A second create is refused and changes nothing.
    let (ok, _, err) = ch_remote(&api, &["create", config_file.to_str().unwrap()]);
    assert!(!ok && err.contains("already been created"), "{err}");
    // So is a configuration asking for what this VMM lacks, by name.
    let (status, body) = put(
        &api,
        "vm.create",
        r#"{"payload":{"kernel":"/k"},"memory":{"size":67108864},"disks":[{"path":"/d"}]}"#,
    );
    assert_eq!(status, 400);
    assert!(body.contains("disks"), "{body}");

    let (status, created) = info(&api);
    assert_eq!(status, 200);
    spec.check("VmInfo", &created).unwrap();
    assert_eq!(created["state"], "Created");
    assert_eq!(created["config"]["payload"]["kernel"], json!(guest));
    assert_eq!(created["config"]["payload"]["cmdline"], "console=ttyS0");
    assert_eq!(created["config"]["user_devices"][0]["id"], "dev0");
    // Nothing runs yet: counters and pause need a booted VM.
    let (status, _) = get(&api, "vm.counters");
    assert_eq!(status, 500);
    assert_eq!(device.mapping_count(), 0);

    // Boot: the guest runs; the device follows its conversions.
    let (ok, _, err) = ch_remote(&api, &["boot"]);
    assert!(ok, "{err}");
    wait_runs(&vmm, 1);
    let (_, running) = info(&api);
    spec.check("VmInfo", &running).unwrap();
    assert_eq!(running["state"], "Running");
    let shared = vmm_shared_ranges(&api);
    assert_eq!(shared, [(A + 0x1000, 0x3000)]);
    assert!(wait_until(|| device.mapped() == shared));
    let (status, counters) = get(&api, "vm.counters");
    assert_eq!(status, 200);
    spec.check("VmCounters", &serde_json::from_str(&counters).unwrap())
        .unwrap();
    let (status, attributes) = get(&api, "vm.memory-attributes");
    assert_eq!(status, 200);
    spec.check(
        "MemoryAttributes",
        &serde_json::from_str(&attributes).unwrap(),
    )
    .unwrap();
    let (ok, _, err) = ch_remote(&api, &["pause"]);
    assert!(ok, "{err}");
    assert_eq!(info(&api).1["state"], "Paused");
    let (ok, _, err) = ch_remote(&api, &["resume"]);
    assert!(ok, "{err}");
    // No ACPI: the power button is refused, the VM keeps running.
    let (ok, _, err) = ch_remote(&api, &["power-button"]);
    assert!(!ok && err.contains("no power button"), "{err}");
    assert_eq!(info(&api).1["state"], "Running");

    // Shutdown: the VM stops, its device is unmapped and let go, the VMM
    // keeps serving with the configuration kept.
    let (ok, _, err) = ch_remote(&api, &["shutdown"]);
    assert!(ok, "{err}");
    assert_eq!(info(&api).1["state"], "Created");
    assert!(wait_until(|| device.mapping_count() == 0));
    let (ok, _, err) = ch_remote(&api, &["shutdown"]);
    assert!(!ok && err.contains("not booted"), "{err}");
    assert!(vmm.is_running());

    // Boot again: a fresh VM (all private), the device attached anew.
    let (ok, _, err) = ch_remote(&api, &["boot"]);
    assert!(ok, "{err}");
    wait_runs(&vmm, 2);
    assert!(wait_until(|| device.mapped() == vmm_shared_ranges(&api)));
    assert_eq!(vmm_shared_ranges(&api), shared);

    // Reboot: shut down and booted once more.
    let (ok, _, err) = ch_remote(&api, &["reboot"]);
    assert!(ok, "{err}");
    wait_runs(&vmm, 3);
    assert!(wait_until(|| device.mapped() == vmm_shared_ranges(&api)));

    // Delete: the VM and its configuration are gone; a new one can come.
    let (ok, _, err) = ch_remote(&api, &["delete"]);
    assert!(ok, "{err}");
    assert_eq!(info(&api).0, 404);
    assert!(wait_until(|| device.mapping_count() == 0));
    let (ok, _, err) = ch_remote(&api, &["delete"]);
    assert!(ok, "deleting nothing is not an error: {err}");
    let bare = json!({"payload": {"kernel": guest}, "memory": {"size": 64u64 << 20}});
    let (status, body) = put(&api, "vm.create", &bare.to_string());
    assert_eq!(status, 204, "{body}");
    let (status, body) = put(&api, "vm.boot", "");
    assert_eq!(status, 204, "{body}");
    // CH's serial default is Null: nothing reaches the console; the guest's
    // two conversions are refused (anonymous RAM) and counted.
    let refused = || {
        let (_, counters) = get(&api, "vm.counters");
        serde_json::from_str::<Value>(&counters).unwrap()["memory"]["failed"] == 2
    };
    assert!(wait_until(refused));
    assert_eq!(runs(&vmm), 3);
    let (_, anonymous) = info(&api);
    spec.check("VmInfo", &anonymous).unwrap();
    assert_eq!(
        anonymous["config"]["serial"]["mode"], "Off",
        "CH's serial default"
    );

    let (ok, _, err) = ch_remote(&api, &["shutdown-vmm"]);
    assert!(ok, "{err}");
    assert!(vmm.wait_exit(TIMEOUT).success(), "{}", vmm.stderr());

    let names: Vec<String> = event_names(&read_events(&events))
        .into_iter()
        .filter(|n| n.starts_with("vm"))
        .collect();
    assert_eq!(
        names,
        [
            "vmm/starting",
            "vm/booting",
            "vm/booted",
            "vm/paused",
            "vm/resumed",
            "vm/shutdown",
            "vm/booting",
            "vm/booted",
            "vm/rebooting",
            "vm/shutdown",
            "vm/booting",
            "vm/booted",
            "vm/rebooted",
            "vm/shutdown",
            "vm/deleted",
            "vm/booting",
            "vm/booted",
            "vm/shutdown",
            "vm/deleted",
            "vmm/shutdown",
        ]
    );
}

#[test]
fn cold_plugged_devices_change_the_created_configuration() {
    let dir = kvm_test!("coldplug");
    let device = TestDevice::spawn(&dir, "dev0");
    let guest = memconv_guest(&dir, &[&format!("shared@{A:#x}+8K")], false);
    let api = dir.path("api.sock");
    let mut vmm = GuestVmm::spawn_args(&["--api-socket", api.to_str().unwrap()]);
    wait_for_socket(&api);
    let config = json!({
        "payload": {"kernel": guest},
        "memory": {"size": 64u64 << 20, "guest_memfd": true},
        "serial": {"mode": "Tty"},
    });
    assert_eq!(put(&api, "vm.create", &config.to_string()).0, 204);
    // Before boot, add and remove change the configuration (204, as in
    // Cloud Hypervisor); nothing connects to the device yet.
    let user_device = device.plug("");
    let (ok, out, err) = ch_remote(&api, &["add-user-device", &user_device]);
    assert!(ok && out.is_empty(), "{out} {err}");
    let (ok, _, err) = ch_remote(&api, &["add-user-device", &user_device]);
    assert!(
        !ok && err.contains("dev0"),
        "a duplicate id is refused: {err}"
    );
    let (ok, _, err) = ch_remote(&api, &["remove-device", "nothing"]);
    assert!(!ok && err.contains("404"), "{err}");
    assert_eq!(info(&api).1["config"]["user_devices"][0]["id"], "dev0");
    assert_eq!(device.mapping_count(), 0);
    // Booted, the device is there and follows the guest.
    assert_eq!(put(&api, "vm.boot", "").0, 204);
    wait_runs(&vmm, 1);
    let shared = vmm_shared_ranges(&api);
    assert_eq!(shared, [(A, 0x2000)]);
    assert!(wait_until(|| device.mapped() == shared));
    assert_eq!(info(&api).1["devices"][0]["id"], "dev0");
    let (ok, _, err) = ch_remote(&api, &["shutdown-vmm"]);
    assert!(ok, "{err}");
    assert!(vmm.wait_exit(TIMEOUT).success());
    assert!(wait_until(|| device.mapping_count() == 0));
}

#[test]
fn an_empty_vmm_needs_an_api_socket_and_refuses_half_a_vm() {
    let (status, _, stderr) = run_vmm(&[]);
    assert!(!status.success());
    assert!(
        stderr.contains("--api-socket to wait for vm.create"),
        "{stderr}"
    );
    let (status, _, stderr) = run_vmm(&["--memory", "size=1G", "--api-socket", "/tmp/x.sock"]);
    assert!(!status.success());
    assert!(
        stderr.contains("--memory configures a VM, which needs --kernel"),
        "{stderr}"
    );
}

#[test]
fn twenty_lifecycles_give_back_every_vm_fd_thread_and_page() {
    let dir = kvm_test!("lifecycle-leaks");
    let device = TestDevice::spawn(&dir, "dev0");
    let guest = halting_guest(&dir);
    let api = dir.path("api.sock");
    let vmm = GuestVmm::spawn_args(&["--api-socket", &format!("path={}", api.display())]);
    wait_for_socket(&api);
    let config = json!({
        "cpus": {"boot_vcpus": 2},
        "memory": {"size": 128u64 << 20, "guest_memfd": true},
        "payload": {"kernel": guest},
        "serial": {"mode": "Null"},
        "user_devices": [{"socket": device.socket, "id": "dev0"}],
    })
    .to_string();
    // One lifecycle: create, boot (the guest runs, the device follows),
    // then shutdown, reboot or delete as the three ways a VM ends.
    let cycle = |round: usize| {
        let (status, body) = put(&api, "vm.create", &config);
        assert_eq!(status, 204, "round {round}: {body}");
        let (status, body) = put(&api, "vm.boot", "");
        assert_eq!(status, 204, "round {round}: {body}");
        assert!(
            wait_until(|| device.mapped() == [(A + 0x1000, 0x3000)]),
            "round {round}: the guest's conversions never reached the device"
        );
        if round % 2 == 1 {
            let (status, body) = put(&api, "vm.reboot", "");
            assert_eq!(status, 204, "round {round}: {body}");
            assert!(wait_until(|| device.mapped() == [(A + 0x1000, 0x3000)]));
        }
        if !round.is_multiple_of(3) {
            let (status, body) = put(&api, "vm.shutdown", "");
            assert_eq!(status, 204, "round {round}: {body}");
        }
        let (status, body) = put(&api, "vm.delete", "");
        assert_eq!(status, 204, "round {round}: {body}");
        assert!(wait_until(|| device.mapping_count() == 0));
    };
    // The first round warms up what is made once (the builder thread, the
    // allocator's arenas, the device's connection pool).
    cycle(0);
    let baseline = settled_holdings(vmm.pid(), &holdings(vmm.pid()));
    assert_eq!(baseline.kvm_vms, 0, "a deleted VM's fd stays: {baseline:?}");
    for round in 1..=20 {
        cycle(round);
    }
    let after = settled_holdings(vmm.pid(), &baseline);
    assert_eq!(after.kvm_vms, 0, "VM fds left behind: {after:?}");
    assert!(
        after.fds <= baseline.fds && after.threads <= baseline.threads,
        "fds or threads grew over 20 lifecycles: {baseline:?} -> {after:?}"
    );
    // Guest RAM (128 MiB a VM) is given back each time; the allocator may
    // keep a little.
    assert!(
        after.rss_kib <= baseline.rss_kib + 8 * 1024,
        "RSS grew over 20 lifecycles: {baseline:?} -> {after:?}"
    );
    let (ok, _, err) = ch_remote(&api, &["shutdown-vmm"]);
    assert!(ok, "{err}");
}
