//! The REST API and ch-remote against a running VMM on real KVM.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use serde_json::Value;

const OPS: &str = "shared@0x1000000+64K,private@0x1004000+8K,shared@0x2000000+4K,\
                   shared@0x2001000+4K,private@0x3000000+4K,shared@0x1fff000+4K";

fn expected() -> Vec<(u64, u64)> {
    model_shared_ranges(&[
        (0x100_0000, 0x1_0000, true),
        (0x100_4000, 0x2000, false),
        (0x200_0000, 0x1000, true),
        (0x200_1000, 0x1000, true),
        (0x300_0000, 0x1000, false),
        (0x1ff_f000, 0x1000, true),
    ])
}

fn boot(dir: &TempDir, lists: &[&str], extra: &[&str]) -> (GuestVmm, std::path::PathBuf) {
    let guest = memconv_guest(dir, lists, false);
    let socket = dir.path("api.sock");
    let mut args = vec!["--memory", "size=512M,guest_memfd=on", "--api-socket"];
    let socket_arg = socket.to_str().unwrap().to_string();
    args.push(&socket_arg);
    args.extend_from_slice(extra);
    let vmm = GuestVmm::spawn(&guest, &args);
    wait_for_socket(&socket);
    (vmm, socket)
}

#[test]
fn shared_ranges_match_the_guests_ops() {
    let dir = kvm_test!("api-ranges");
    let (mut vmm, socket) = boot(&dir, &[OPS], &[]);
    assert_eq!(
        vmm.wait_for_line("memconv: done"),
        "memconv: done 6 ok 0 failed"
    );

    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "owner-only socket");

    let (ok, out, err) = ch_remote(&socket, &["memory-attributes"]);
    assert!(ok, "{err}");
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["granularity"], 4096);
    assert_eq!(shared_ranges(&answer), expected());
    let region = &answer["regions"][0];
    assert_eq!(region["guest_memfd"], true);
    let shared: u64 = expected().iter().map(|r| r.1).sum();
    assert_eq!(region["shared_bytes"].as_u64().unwrap(), shared);
    assert_eq!(
        region["private_bytes"].as_u64().unwrap(),
        (512 << 20) - shared
    );
    assert_eq!(answer["conversions"]["to_shared"], 4);
    assert_eq!(answer["conversions"]["to_private"], 2);
    assert_eq!(answer["conversions"]["failed"], 0);

    // The same through a raw HTTP client.
    let (status, body) = get(&socket, "vm.memory-attributes");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), answer);

    // A window clips ranges at both ends.
    let (ok, out, _) = ch_remote(
        &socket,
        &[
            "memory-attributes",
            "--gpa",
            "0x1002000",
            "--size",
            "0x1000",
        ],
    );
    assert!(ok);
    let clipped: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shared_ranges(&clipped), [(0x100_2000, 0x1000)]);
    let (_, body) = get(&socket, "vm.memory-attributes?gpa=0x1003000&size=0x1000000");
    let clipped: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        shared_ranges(&clipped),
        [
            (0x100_3000, 0x1000),
            (0x100_6000, 0xa000),
            (0x1ff_f000, 0x3000)
        ]
    );

    // A limit truncates with a continuation marker.
    let (_, body) = get(&socket, "vm.memory-attributes?limit=2");
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(shared_ranges(&page).len(), 2);
    assert_eq!(page["truncated"], true);
    assert_eq!(page["next_gpa"], 0x1ff_f000);

    for (cmd, key) in [
        ("ping", "version"),
        ("info", "config"),
        ("counters", "memory"),
    ] {
        let (ok, out, err) = ch_remote(&socket, &[cmd]);
        assert!(ok, "{cmd}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert!(v.get(key).is_some(), "{cmd}: {out}");
    }
    let (_, info, _) = ch_remote(&socket, &["info"]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["memory"]["regions"][0]["backing"], "guest_memfd");
    assert_eq!(info["state"], "Running");

    // As in Cloud Hypervisor, shutting the VM down keeps the VMM serving,
    // with the VM back in the created state; vmm.shutdown ends it.
    let (ok, _, err) = ch_remote(&socket, &["shutdown"]);
    assert!(ok, "{err}");
    let (ok, info, err) = ch_remote(&socket, &["info"]);
    assert!(ok, "{err}");
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["state"], "Created");
    assert!(vmm.is_running());
    let (ok, _, err) = ch_remote(&socket, &["shutdown-vmm"]);
    assert!(ok, "{err}");
    assert!(vmm.wait_exit(TIMEOUT).success());
    assert!(!socket.exists(), "socket removed on exit");
}

#[test]
fn four_vcpus_convert_concurrently() {
    let dir = kvm_test!("api-smp");
    let lists = [
        "shared@0x1000000+1M,private@0x1010000+64K",
        "shared@0x2000000+1M,private@0x2000000+4K",
        "shared@0x3000000+2M",
        "shared@0x4000000+4K,shared@0x4002000+4K,shared@0x4001000+4K",
    ];
    let (vmm, socket) = boot(&dir, &lists, &["--cpus", "boot=4"]);
    assert_eq!(
        vmm.wait_for_line("memconv: done"),
        "memconv: done 8 ok 0 failed"
    );
    let (_, body) = get(&socket, "vm.memory-attributes");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        shared_ranges(&answer),
        model_shared_ranges(&[
            (0x100_0000, 0x10_0000, true),
            (0x101_0000, 0x1_0000, false),
            (0x200_0000, 0x10_0000, true),
            (0x200_0000, 0x1000, false),
            (0x300_0000, 0x20_0000, true),
            (0x400_0000, 0x3000, true),
        ])
    );
    for cpu in 0..4 {
        assert!(
            vmm.console()
                .iter()
                .any(|l| l.starts_with(&format!("memconv: cpu{cpu} op"))),
            "vCPU {cpu} ran its ops"
        );
    }
}

#[test]
fn bad_requests_get_json_errors_and_leave_state_alone() {
    let dir = kvm_test!("api-bad");
    let (mut vmm, socket) = boot(&dir, &[OPS], &[]);
    vmm.wait_for_line("memconv: done");
    let (_, before) = get(&socket, "vm.memory-attributes");

    // A client that connects and says nothing must not block anyone.
    let _silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    // Nor one that hangs up mid-request.
    {
        use std::io::Write;
        let mut half = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        half.write_all(b"GET /api/v1/vm.in").unwrap();
    }

    let cases = [
        (
            "GET /api/v1/vm.nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            404,
        ),
        (
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            404,
        ),
        (
            "PUT /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            405,
        ),
        (
            "DELETE /api/v1/vm.info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            405,
        ),
        (
            "GET /api/v1/vm.memory-attributes?gpa=zz&size=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "GET /api/v1/vm.memory-attributes?gpa=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            400,
        ),
        (
            "PUT /api/v1/vm.shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{oops",
            400,
        ),
        (
            "PUT /api/v1/vm.shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n",
            413,
        ),
    ];
    for (request, status) in cases {
        let (got, body) = raw_http(&socket, request);
        assert_eq!(got, status, "{request:?}: {body}");
        let v: Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("JSON error body: {body:?}"));
        // Cloud Hypervisor's shape: an array of messages, outermost first.
        let messages = v
            .as_array()
            .unwrap_or_else(|| panic!("not an array: {body}"));
        assert!(!messages.is_empty(), "{body}");
        assert!(
            messages
                .iter()
                .all(|m| m.as_str().is_some_and(|m| !m.is_empty())),
            "{body}"
        );
    }
    let (_, after) = get(&socket, "vm.memory-attributes");
    assert_eq!(before, after);
    assert!(vmm.is_running(), "bad requests never shut the VMM down");

    // ch-remote reports server errors with a non-zero exit.
    let (ok, _, err) = ch_remote(&socket, &["memory-attributes", "--gpa", "1", "--size", "0"]);
    assert!(!ok);
    assert!(
        err.contains("400") && err.contains("size must not be 0"),
        "{err}"
    );

    // A second VMM refuses the socket in use.
    let guest = memconv_guest(&dir, &["shared@0x1000000+4K"], true);
    let (status, _, stderr) = run_vmm(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    assert!(!status.success());
    assert!(stderr.contains("is in use"), "{stderr}");
    assert!(socket.exists(), "the first VMM keeps its socket");

    let (ok, _, _) = ch_remote(&socket, &["shutdown-vmm"]);
    assert!(ok);
    assert!(vmm.wait_exit(TIMEOUT).success());
    assert!(!socket.exists());
    let (ok, _, err) = ch_remote(&socket, &["ping"]);
    assert!(!ok && err.contains("cannot connect"), "{err}");
}

#[test]
fn event_monitor_streams_boot_conversions_and_shutdown() {
    let dir = kvm_test!("events");
    let events = dir.path("events.jsonl");
    let monitor = format!("path={}", events.display());
    let guest = memconv_guest(
        &dir,
        &["shared@0x1000000+8K,private@0x1000000+4K,shared@0x1001+4K"],
        true,
    );
    let mut vmm = GuestVmm::spawn(
        &guest,
        &[
            "--memory",
            "size=64M,guest_memfd=on",
            "--event-monitor",
            &monitor,
        ],
    );
    assert!(vmm.wait_exit(TIMEOUT).success());
    let lines = read_events(&events);
    let names = event_names(&lines);
    // Cloud Hypervisor's lifecycle events around ours.
    assert_eq!(
        names,
        [
            "vmm/starting",
            "vm/booting",
            "vm/booted",
            "memory/conversion",
            "memory/conversion",
            "memory/conversion",
            "vm/shutdown",
            "vmm/shutdown"
        ]
    );
    // Cloud Hypervisor's timestamp: a serde Duration, rising.
    let stamps: Vec<(u64, u64)> = lines
        .iter()
        .map(|e| {
            let t = &e["timestamp"];
            assert!(t["nanos"].as_u64().unwrap() < 1_000_000_000, "{t}");
            (t["secs"].as_u64().unwrap(), t["nanos"].as_u64().unwrap())
        })
        .collect();
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]), "{stamps:?}");
    let lines = &lines[2..];
    let c = &lines[1]["properties"];
    assert_eq!(
        (c["gpa"].as_u64(), c["size"].as_u64()),
        (Some(0x100_0000), Some(0x2000))
    );
    assert_eq!(c["direction"], "shared");
    assert_eq!(c["result"], "ok");
    assert!(c["duration_us"].as_u64().is_some());
    assert_eq!(lines[2]["properties"]["direction"], "private");
    assert_eq!(lines[3]["properties"]["result"], "error");
}

#[test]
fn ram_above_the_mmio_hole_and_hole_spanning_requests() {
    let dir = kvm_test!("api-hole");
    let guest = memconv_guest(
        &dir,
        &["shared@0xbfffe000+4K,shared@0xbffff000+8K,shared@0x100000000+8K"],
        false,
    );
    let (vmm, socket) = spawn_sized_with_api(&dir, &guest, "size=4G,guest_memfd=on", &[]);
    wait_for_socket(&socket);
    assert_eq!(
        vmm.wait_for_line("memconv: done"),
        "memconv: done 2 ok 1 failed"
    );
    assert!(
        vmm.console()[1].ends_with("status=out-of-range"),
        "{:?}",
        vmm.console()
    );
    let (_, body) = get(&socket, "vm.memory-attributes");
    let answer: Value = serde_json::from_str(&body).unwrap();
    let regions = answer["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 2);
    assert_eq!(regions[1]["gpa"], 0x1_0000_0000u64);
    // The refused request that spans the hole changed nothing in region 0.
    assert_eq!(
        shared_ranges(&answer),
        [(0xbfff_e000, 0x1000), (0x1_0000_0000, 0x2000)]
    );
    assert_eq!(answer["conversions"]["failed"], 1);
}

/// Our `ch-remote` against a server that, like Cloud Hypervisor's, keeps
/// the connection open after answering: it reads the answer by its
/// Content-Length (or knows a 204 has none) and returns at once.
#[test]
fn ch_remote_reads_answers_of_a_server_that_keeps_the_connection_open() {
    use std::io::{BufRead, BufReader, Write};
    let dir = TempDir::new("keepopen");
    let socket = dir.path("ch.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let server = std::thread::spawn(move || {
        let mut held = Vec::new();
        // The answers first: zip then stops before accepting a fourth.
        for (answer, stream) in [
            "HTTP/1.1 200 \r\nServer: Cloud Hypervisor API\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"version\":\"x1\"}\n",
            "HTTP/1.1 204 \r\nServer: Cloud Hypervisor API\r\n\r\n",
            "HTTP/1.1 404 \r\nServer: Cloud Hypervisor API\r\nContent-Length: 11\r\n\r\n[\"missing\"]",
        ]
        .into_iter()
        .zip(listener.incoming())
        {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                line.clear();
            }
            stream.write_all(answer.as_bytes()).unwrap();
            // Never closed while the client runs.
            held.push(stream);
        }
        held
    });
    let started = std::time::Instant::now();
    let (ok, out, err) = ch_remote(&socket, &["ping"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "{\"version\":\"x1\"}");
    let (ok, out, err) = ch_remote(&socket, &["boot"]);
    assert!(ok && out.is_empty(), "{out} {err}");
    let (ok, _, err) = ch_remote(&socket, &["info"]);
    assert!(
        !ok && err.contains("404") && err.contains("missing"),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "ch-remote waited for the connection to close"
    );
    drop(server.join().unwrap());
}
