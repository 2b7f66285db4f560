//! Reliability: many vCPUs converting overlapping ranges while the API is
//! hammered and a device comes and goes, the VMM stopped by SIGTERM, the API
//! under load, and every thread under its seccomp filter. Real KVM guests and
//! real ch-test-device processes throughout.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
use arch::layout::PAGE_SIZE as PAGE;
/// The window every vCPU converts at random.
const WINDOW: u64 = 16 * MIB;
const VCPUS: u64 = 8;
const STRIPE: u64 = 8 * PAGE;
const WINDOW_SIZE: u64 = VCPUS * STRIPE;
/// Guest-written barrier flags, one byte per vCPU (never converted).
const BARRIER: u64 = 20 * MIB;
/// A shared page the device writes to start the guest's random phase.
const GO_PAGE: u64 = 24 * MIB;

/// xorshift64*: reproducible op lists from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// vCPU `cpu`'s ops: wait for GO, `random` conversions anywhere in the
/// window (overlapping the other vCPUs'), a barrier, then a fixed pattern on
/// its own stripe so the final state does not depend on the interleaving.
fn stress_ops(cpu: u64, random: usize, rng: &mut Rng) -> String {
    let mut ops = Vec::new();
    if cpu == 0 {
        ops.push(format!("shared@{GO_PAGE:#x}+4K"));
    }
    ops.push(format!("wait@{GO_PAGE:#x}+1=1"));
    for _ in 0..random {
        let first = rng.below(WINDOW_SIZE / PAGE);
        let pages = 1 + rng.below((WINDOW_SIZE / PAGE - first).min(16));
        let kind = if rng.below(2) == 0 {
            "shared"
        } else {
            "private"
        };
        ops.push(format!(
            "{kind}@{:#x}+{:#x}",
            WINDOW + first * PAGE,
            pages * PAGE
        ));
    }
    ops.push(format!("write@{:#x}+1=1", BARRIER + cpu));
    for other in 0..VCPUS {
        ops.push(format!("wait@{:#x}+1=1", BARRIER + other));
    }
    let stripe = WINDOW + cpu * STRIPE;
    ops.push(format!("private@{stripe:#x}+{STRIPE:#x}"));
    ops.push(format!("shared@{stripe:#x}+{:#x}", (cpu + 1) * PAGE));
    ops.join(",")
}

/// What the VMM and every device must show once the guest is done.
fn stress_final_state() -> Vec<(u64, u64)> {
    let mut ops = vec![(GO_PAGE, PAGE, true)];
    for cpu in 0..VCPUS {
        ops.push((WINDOW + cpu * STRIPE, (cpu + 1) * PAGE, true));
    }
    model_shared_ranges(&ops)
}

/// Each answer must be a consistent snapshot: sorted, disjoint, page-aligned
/// runs.
fn assert_consistent_ranges(body: &str) {
    let answer: serde_json::Value = serde_json::from_str(body).unwrap();
    let ranges = shared_ranges(&answer);
    for pair in ranges.windows(2) {
        assert!(
            pair[0].0 + pair[0].1 < pair[1].0,
            "not maximal runs: {ranges:x?}"
        );
    }
    for (gpa, size) in &ranges {
        assert!(gpa.is_multiple_of(PAGE) && size.is_multiple_of(PAGE) && *size > 0);
    }
}

/// Queries the API until `stop`; returns how many answers it checked.
fn api_reader(api: &Path, stop: &AtomicBool) -> usize {
    let mut answers = 0;
    while !stop.load(Ordering::Relaxed) {
        let (status, body) = get(api, "vm.memory-attributes");
        assert_eq!(status, 200, "{body}");
        assert_consistent_ranges(&body);
        for path in ["vm.counters", "vm.info"] {
            let (status, body) = get(api, path);
            assert_eq!(status, 200, "{path}: {body}");
            serde_json::from_str::<serde_json::Value>(&body).unwrap();
        }
        answers += 3;
    }
    answers
}

/// Boots 8 vCPUs running `random` conversions each (see `stress_ops`) with
/// `devices` cold-plugged, and lets them go once the first device has the GO
/// page mapped. Returns the VMM, its API socket and the total op count.
fn start_storm(
    dir: &TempDir,
    seed: u64,
    random: usize,
    devices: &[&TestDevice],
) -> (GuestVmm, PathBuf, usize) {
    let mut rng = Rng(seed);
    let lists: Vec<String> = (0..VCPUS)
        .map(|cpu| stress_ops(cpu, random, &mut rng))
        .collect();
    let total_ops = lists.iter().map(|l| l.split(',').count()).sum();
    let list_refs: Vec<&str> = lists.iter().map(String::as_str).collect();
    let guest = memconv_guest(dir, &list_refs, false);
    let api = dir.path("api.sock");
    let mut args: Vec<String> = [
        "--memory",
        "size=256M,guest_memfd=on",
        "--cpus",
        "boot=8",
        "--api-socket",
        api.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    for (i, device) in devices.iter().enumerate() {
        args.push("--user-device".into());
        args.push(user_device(&device.socket, &format!(",id=dev{i}")));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let vmm = GuestVmm::spawn(&guest, &args);
    wait_for_socket(&api);
    assert!(
        wait_until(|| devices[0].mapped() == [(GO_PAGE, PAGE)]),
        "the GO page never reached the device"
    );
    devices[0].write(GO_PAGE, 1);
    (vmm, api, total_ops)
}

/// Conversions the VMM has counted, refused ones included.
fn conversions_counted(api: &Path) -> u64 {
    let (ok, counters, err) = ch_remote(api, &["counters"]);
    assert!(ok, "{err}");
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap();
    let totals = &counters["memory"];
    totals["to_shared"].as_u64().unwrap() + totals["to_private"].as_u64().unwrap()
}

#[test]
fn eight_vcpus_convert_overlapping_ranges_while_the_api_is_queried_and_a_device_comes_and_goes() {
    kvm_test!();
    let seed = std::env::var("CH_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_cafe_u64);
    eprintln!("stress seed {seed:#x} (set CH_STRESS_SEED to replay)");
    const RANDOM_OPS: usize = 300;
    // Every vCPU's random ops, its 2 fixed conversions, and GO.
    let conversions = arch::usize_from(VCPUS) * (RANDOM_OPS + 2) + 1;
    let dir = TempDir::new("stress");
    let cold = TestDevice::spawn(&dir, "cold");
    let hot = TestDevice::spawn(&dir, "hot");
    let (vmm, api, total_ops) = start_storm(&dir, seed, RANDOM_OPS, &[&cold]);

    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (api, stop) = (api.clone(), stop.clone());
            std::thread::spawn(move || api_reader(&api, &stop))
        })
        .collect();

    // Hot-plug cycles for as long as the guest converts.
    let hot_config = hot.plug("");
    let mut cycles = 0;
    let mut replayed_runs = 0;
    let deadline = Instant::now() + TIMEOUT;
    while !vmm.console().iter().any(|l| l.starts_with("memconv: done")) {
        assert!(Instant::now() < deadline, "guest never finished");
        let (ok, out, err) = ch_remote(&api, &["add-user-device", &hot_config]);
        assert!(ok, "hot add {cycles} failed: {err}");
        let added: serde_json::Value = serde_json::from_str(&out).unwrap();
        replayed_runs += added["dma"]["entries"].as_u64().unwrap();
        let (ok, _, err) = ch_remote(&api, &["remove-device", "hot"]);
        assert!(ok, "hot remove {cycles} failed: {err}");
        cycles += 1;
    }
    let done = vmm.wait_for_line("memconv: done");
    assert_eq!(done, format!("memconv: done {total_ops} ok 0 failed"));
    stop.store(true, Ordering::Relaxed);
    let answers: usize = readers.into_iter().map(|r| r.join().unwrap()).sum();

    let (ok, _, err) = ch_remote(&api, &["add-user-device", &hot_config]);
    assert!(ok, "final hot add failed: {err}");
    let expected = stress_final_state();
    assert_eq!(vmm_shared_ranges(&api), expected, "RamBlockAttribute");
    assert_eq!(cold.mapped(), expected, "cold-plugged device");
    assert_eq!(hot.mapped(), expected, "hot-plugged device");
    let (_, counters, _) = ch_remote(&api, &["counters"]);
    let counters: serde_json::Value = serde_json::from_str(&counters).unwrap();
    let totals = &counters["memory"];
    assert_eq!(totals["failed"], 0, "{counters}");
    // A conversion to the state a range already has is still counted.
    assert_eq!(
        totals["to_shared"].as_u64().unwrap() + totals["to_private"].as_u64().unwrap(),
        conversions as u64,
        "{counters}"
    );
    eprintln!(
        "{conversions} conversions on {VCPUS} vCPUs, {cycles} hot-plug cycles \
         ({replayed_runs} runs replayed), {answers} API answers"
    );
    // The test only means something if the device really came and went
    // while the guest converted.
    assert!(
        cycles >= 3,
        "only {cycles} hot-plug cycles overlapped the guest"
    );
    assert!(
        replayed_runs > 0,
        "no hot add ever found shared runs to replay"
    );
}

#[test]
fn sigterm_stops_vcpus_unmaps_devices_and_removes_the_api_socket() {
    let dir = kvm_test!("sigterm");
    let device = TestDevice::spawn(&dir, "dev");
    // vCPU 0 converts, then both spin until the end: SIGTERM finds them
    // running guest code, not halted.
    let ops0 = format!("shared@{WINDOW:#x}+64K,wait@{BARRIER:#x}+1=1");
    let ops1 = format!("wait@{BARRIER:#x}+1=1");
    let guest = memconv_guest(&dir, &[&ops0, &ops1], false);
    let api = dir.path("api.sock");
    let events = dir.path("events.json");
    let mut vmm = GuestVmm::spawn(
        &guest,
        &[
            "--memory",
            "size=64M,guest_memfd=on",
            "--cpus",
            "boot=2",
            "--user-device",
            &device.plug(""),
            "--api-socket",
            api.to_str().unwrap(),
            "--event-monitor",
            &format!("path={}", events.display()),
            "-vv",
        ],
    );
    wait_for_socket(&api);
    assert!(wait_until(|| device.mapped() == [(WINDOW, 0x10000)]));

    vmm.signal(libc::SIGTERM);
    assert!(vmm.wait_exit(TIMEOUT).success(), "{}", vmm.stderr());
    let log = vmm.stderr();
    assert!(
        log.contains("vCPU 0 stopped") && log.contains("vCPU 1 stopped"),
        "{log}"
    );
    let device_log: Vec<String> = serde_json::from_str(&device.command("log")).unwrap();
    assert!(
        device_log.contains(&format!("unmap {WINDOW:#x}+0x10000")),
        "the VMM unmapped before it went, not just hung up: {device_log:?}"
    );
    assert!(device.mapped().is_empty());
    assert!(!api.exists(), "API socket left behind");
    let events = std::fs::read_to_string(&events).unwrap();
    let kinds: Vec<String> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|e| format!("{} {}", e["source"], e["event"]).replace('"', ""))
        .collect();
    let removed = kinds.iter().position(|k| k == "device removed");
    let shutdown = kinds.iter().position(|k| k == "vm shutdown");
    assert!(
        removed.is_some() && shutdown.is_some() && removed < shutdown,
        "{kinds:?}"
    );
}

#[test]
fn sigterm_in_the_middle_of_a_conversion_storm_leaves_no_mapping_behind() {
    // Far more ops than can run before the signal: vCPUs are converting
    // (some inside a DMA_MAP / DMA_UNMAP round trip) when it arrives.
    let dir = kvm_test!("sigstorm");
    let device = TestDevice::spawn(&dir, "dev");
    let (mut vmm, api, _) = start_storm(&dir, 0x51_6e_7e_a1, 2000, &[&device]);
    assert!(
        wait_until(|| conversions_counted(&api) >= 200),
        "the storm never started"
    );

    vmm.signal(libc::SIGTERM);
    let status = vmm.wait_exit(TIMEOUT);
    assert!(
        !vmm.console().iter().any(|l| l.starts_with("memconv: done")),
        "the guest finished before the signal: the test needs more ops"
    );
    assert!(status.success(), "{status:?}\n{}", vmm.stderr());
    assert!(device.mapped().is_empty(), "mappings left behind");
    // Every map the device accepted was taken back by an exact unmap (the
    // device refuses any other), none by hanging up.
    let device_log: Vec<String> = serde_json::from_str(&device.command("log")).unwrap();
    let maps = device_log.iter().filter(|l| l.starts_with("map ")).count();
    let unmaps = device_log
        .iter()
        .filter(|l| l.starts_with("unmap "))
        .count();
    assert!(maps > 10, "too few maps to mean anything: {maps}");
    assert_eq!(maps, unmaps, "{device_log:?}");
    assert!(!api.exists(), "API socket left behind");
    eprintln!("SIGTERM after {maps} DMA maps, all unmapped");
}

#[test]
fn a_device_killed_in_the_middle_of_a_conversion_storm_is_detached_and_the_storm_goes_on() {
    let dir = kvm_test!("killstorm");
    let survivor = TestDevice::spawn(&dir, "survivor");
    let mut victim = TestDevice::spawn(&dir, "victim");
    let (vmm, api, total_ops) = start_storm(&dir, 0xdead_d0e5, 300, &[&survivor, &victim]);
    assert!(
        wait_until(|| conversions_counted(&api) >= 200),
        "the storm never started"
    );
    victim.kill();
    let before_kill = conversions_counted(&api);

    let done = vmm.wait_for_line("memconv: done");
    let statuses = vmm.op_statuses();
    assert_eq!(statuses.len(), total_ops, "{done}");
    // The dead device is failed and detached; no guest conversion fails.
    assert!(statuses.iter().all(|s| s == "ok"), "{statuses:?}");
    assert_eq!(done, format!("memconv: done {total_ops} ok 0 failed"));
    let shared = vmm_shared_ranges(&api);
    assert_eq!(shared, stress_final_state());
    assert_eq!(survivor.mapped(), shared, "the survivor follows");
    let (ok, info, err) = ch_remote(&api, &["info"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["devices"][1]["state"], "failed", "{info}");
    assert_eq!(info["devices"][1]["dma"]["entries"], 0, "{info}");
    let (ok, _, err) = ch_remote(&api, &["remove-device", "dev1"]);
    assert!(ok, "removing the dead device failed: {err}");
    let (ok, info, err) = ch_remote(&api, &["info"]);
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["devices"].as_array().unwrap().len(), 1, "{info}");
    assert_eq!(vmm_shared_ranges(&api), shared);
    eprintln!("device killed after ~{before_kill} conversions; all {total_ops} ops ok");
}

fn vm_rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A request and the status it must get.
const LOAD_MIX: [(&str, u16); 6] = [
    ("GET /api/v1/vmm.ping", 200),
    ("GET /api/v1/vm.info", 200),
    ("GET /api/v1/vm.memory-attributes", 200),
    ("GET /api/v1/vm.counters", 200),
    ("GET /api/v1/vm.nonsense", 404),
    ("PUT /api/v1/vm.remove-device", 400),
];

/// Sends `count` requests from `clients` threads at once; panics on any
/// unexpected status.
fn api_load(api: &Path, clients: usize, count: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (api, next) = (api.to_path_buf(), next.clone());
            std::thread::spawn(move || {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count {
                        break;
                    }
                    let (request, expected) = LOAD_MIX[n % LOAD_MIX.len()];
                    let (status, body) = raw_http(
                        &api,
                        &format!(
                            "{request} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
                             Content-Length: 0\r\n\r\n"
                        ),
                    );
                    assert_eq!(status, expected, "request {n} {request}: {body}");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
}

/// Documented in docs/api.md: what 10 000 requests may add to the VMM's
/// resident memory once the first thousand have warmed it up.
const API_LOAD_RSS_BOUND_KIB: u64 = 2048;

#[test]
fn ten_thousand_concurrent_api_requests_all_answer_without_growing_the_vmm() {
    let dir = kvm_test!("apiload");
    let ops = format!("shared@{WINDOW:#x}+64K,private@{:#x}+4K", WINDOW + 0x4000);
    let guest = memconv_guest(&dir, &[&ops], false);
    let (vmm, api) = spawn_sized_with_api(&dir, &guest, "size=64M,guest_memfd=on", &[]);
    vmm.wait_for_line("memconv: done");
    wait_for_socket(&api);
    let pid = vmm.pid();

    // Warm-up: allocator arenas.
    api_load(&api, 16, 1000);
    std::thread::sleep(Duration::from_millis(200));
    let (rss_before, fds_before) = (vm_rss_kib(pid), open_fds(pid));
    let started = Instant::now();
    api_load(&api, 16, 10_000);
    let elapsed = started.elapsed();
    // Let connection workers finish closing their sockets.
    let settled = wait_until(|| open_fds(pid) <= fds_before);
    let (rss_after, fds_after) = (vm_rss_kib(pid), open_fds(pid));
    eprintln!(
        "10000 requests from 16 clients in {elapsed:?}; RSS {rss_before} -> {rss_after} KiB; \
         fds {fds_before} -> {fds_after}"
    );
    assert!(settled, "fds leaked: {fds_before} -> {fds_after}");
    assert!(
        rss_after <= rss_before + API_LOAD_RSS_BOUND_KIB,
        "RSS grew {rss_before} -> {rss_after} KiB"
    );
    // State is what the guest left, untouched by the load.
    assert_eq!(
        vmm_shared_ranges(&api),
        [(WINDOW, 0x4000), (WINDOW + 0x5000, 0xb000)]
    );
}

/// (name, seccomp mode) of every thread of `pid`; a thread that ends
/// while it is being looked at (a hot-plug worker) is left out.
fn seccomp_modes(pid: i32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|task| {
            let task = task.ok()?.path();
            let name = std::fs::read_to_string(task.join("comm")).ok()?;
            let status = std::fs::read_to_string(task.join("status")).ok()?;
            let mode = status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .unwrap()
                .trim()
                .to_string();
            Some((name.trim().to_string(), mode))
        })
        .collect()
}

#[test]
fn every_vmm_thread_runs_under_a_seccomp_filter_unless_disabled() {
    let dir = kvm_test!("seccomp");
    let device = TestDevice::spawn(&dir, "dev");
    let ops = format!("shared@{WINDOW:#x}+8K");
    let guest = memconv_guest(&dir, &[&ops, "nop@0+0"], false);
    for (flag, expected_mode) in [(None, "2"), (Some("log"), "2"), (Some("false"), "0")] {
        let api = dir.path("api.sock");
        let mut args = vec![
            "--memory".to_string(),
            "size=64M,guest_memfd=on".into(),
            "--cpus".into(),
            "boot=2".into(),
            "--api-socket".into(),
            api.to_str().unwrap().into(),
        ];
        if let Some(flag) = flag {
            args.extend(["--seccomp".into(), flag.into()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut vmm = GuestVmm::spawn(&guest, &args);
        vmm.wait_for_line("memconv: done");
        wait_for_socket(&api);
        // Touch every thread's job: API, hot-plug (VMM thread), a request
        // served by an http-conn thread.
        let config = device.plug("");
        let (ok, _, err) = ch_remote(&api, &["add-user-device", &config]);
        assert!(ok, "{err}");
        assert_eq!(device.mapped(), [(WINDOW, 0x2000)]);
        let threads = seccomp_modes(vmm.pid());
        let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
        for needed in [
            "vcpu0",
            "vcpu1",
            "http-server",
            "vmm_signal_hand",
            "vm_builder",
        ] {
            assert!(names.contains(&needed), "no {needed} thread: {names:?}");
        }
        for (name, mode) in &threads {
            // KVM's own kernel worker shows up among the tasks.
            if !name.starts_with("kvm") {
                assert_eq!(mode, expected_mode, "thread {name} ({flag:?}): {threads:?}");
            }
        }
        let (ok, _, err) = ch_remote(&api, &["remove-device", "dev"]);
        assert!(ok, "{err}");
        let (ok, _, err) = ch_remote(&api, &["shutdown-vmm"]);
        assert!(ok, "{err}");
        assert!(vmm.wait_exit(TIMEOUT).success(), "{}", vmm.stderr());
    }
}
