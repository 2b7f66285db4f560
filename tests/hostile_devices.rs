//! vfio-user servers that lie on purpose (tests/common/lying_server.rs)
//! against the real VMM process: BAR sizes no BAR can have, MSI-X
//! structures outside the device's BARs, and servers that fail while they
//! are given the guest's shared pages. Each is refused with a clear error,
//! at cold plug and hot-plug; the VMM keeps answering, keeps no part of the
//! device and gives back every fd and thread it took for it.

mod common;

use common::lying_server::{Lies, LyingServer, OnMap};
use common::*;

const A: u64 = 16 << 20;
const B: u64 = 32 << 20;

/// A guest that makes three shared runs and halts, so a hot-plugged
/// device has something to be given.
fn sharing_guest(dir: &TempDir) -> std::path::PathBuf {
    memconv_guest(
        dir,
        &[&format!(
            "shared@{A:#x}+16K,private@{:#x}+4K,shared@{B:#x}+8K",
            A + 0x1000
        )],
        false,
    )
}

fn devices(api: &std::path::Path) -> serde_json::Value {
    let (status, body) = get(api, "vm.info");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["devices"].clone()
}

/// Boots the sharing guest with an API socket and waits for its ops.
fn booted(dir: &TempDir) -> (GuestVmm, std::path::PathBuf) {
    let guest = sharing_guest(dir);
    let (vmm, api) = spawn_with_api(dir, &guest, &[]);
    vmm.wait_for_line("memconv: done 3 ok 0 failed");
    wait_for_socket(&api);
    (vmm, api)
}

/// Hot-plugs each lying server in turn into one running VM: every one is
/// refused with an error naming `expect`, and the VMM is left as it was.
fn each_hot_plug_is_refused(tag: &str, cases: Vec<(&str, Lies, &str)>) {
    let dir = TempDir::new(tag);
    let (mut vmm, api) = booted(&dir);
    let shared = vmm_shared_ranges(&api);
    // The first refusal warms up what is made once (allocator arenas, the
    // hot-plug thread's stack).
    let warm_up = LyingServer::start(&dir.path("warm.sock"), cases[0].1.clone());
    let (ok, _, err) = ch_remote(
        &api,
        &["add-user-device", &user_device(&warm_up.socket, "")],
    );
    assert!(!ok, "the first lying server was accepted");
    assert!(err.contains(cases[0].2), "{err}");
    let baseline = settled_holdings(vmm.pid(), &holdings(vmm.pid()));
    for (name, lies, expect) in cases {
        let server = LyingServer::start(&dir.path(&format!("{name}.sock")), lies);
        let (ok, out, err) = ch_remote(
            &api,
            &[
                "add-user-device",
                &user_device(&server.socket, &format!(",id={name},timeout_ms=500")),
            ],
        );
        assert!(!ok, "{name}: a lying server was accepted: {out}");
        assert!(err.contains(expect), "{name}: {err}");
        assert_eq!(devices(&api), serde_json::json!([]), "{name}");
        assert_eq!(vmm_shared_ranges(&api), shared, "{name}");
        assert_back_to(vmm.pid(), &baseline, 4096, name);
    }
    // Nothing of them stays: an honest device gets the first slot and
    // exactly the shared pages.
    let honest = LyingServer::start(&dir.path("honest.sock"), Lies::honest());
    let (ok, out, err) = ch_remote(
        &api,
        &[
            "add-user-device",
            &user_device(&honest.socket, ",id=honest"),
        ],
    );
    assert!(ok, "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["bdf"], "0000:00:01.0", "{info}");
    let maps: Vec<(u64, u64)> = honest
        .log()
        .iter()
        .filter_map(|l| l.strip_prefix("map "))
        .map(|m| {
            let (iova, size) = m.split_once('+').unwrap();
            let hex = |t: &str| u64::from_str_radix(t.trim_start_matches("0x"), 16).unwrap();
            (hex(iova), hex(size))
        })
        .collect();
    assert_eq!(merge_ranges(maps), shared);
    assert!(vmm.is_running());
}

#[test]
fn bar_sizes_no_bar_can_have_are_refused_at_hot_plug() {
    kvm_test!();
    let mut huge32 = Lies::honest();
    huge32.region_sizes[0] = (1 << 63) | 0x1000;
    let mut huge64 = Lies::honest().bar64(2);
    huge64.region_sizes[2] = u64::MAX;
    let mut past32 = Lies::honest();
    past32.region_sizes[1] = (1 << 31) + 1;
    each_hot_plug_is_refused(
        "hugebar",
        vec![
            ("huge32", huge32, "BAR 0 of 0x8000000000001000 bytes"),
            ("huge64", huge64, "BAR 2 of 0xffffffffffffffff bytes"),
            ("past32", past32, "larger than a 32-bit BAR may be"),
        ],
    );
}

#[test]
fn a_bar_size_no_bar_can_have_stops_a_cold_boot_with_an_error() {
    let dir = kvm_test!("hugebar-cold");
    let mut lies = Lies::honest().bar64(0);
    lies.region_sizes[0] = (1 << 63) + (1 << 62);
    let server = LyingServer::start(&dir.path("huge.sock"), lies);
    let guest = sharing_guest(&dir);
    let (status, _, stderr) = run_vmm(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--memory",
        "size=256M,guest_memfd=on",
        "--user-device",
        &user_device(&server.socket, ""),
    ]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("larger than a 64-bit BAR may be"),
        "{stderr}"
    );
    assert!(!stderr.contains("seccomp"), "{stderr}");
}

#[test]
fn msix_structures_outside_the_devices_bars_are_refused_at_hot_plug() {
    kvm_test!();
    let past_bar = "runs past the end of its BAR";
    each_hot_plug_is_refused(
        "badmsix",
        vec![
            // 64 vectors (1 KiB) from 0xd00 run past the 4 KiB BAR0.
            (
                "table-past",
                Lies::honest().msix(64, 0xd00, 0x800),
                past_bar,
            ),
            ("pba-past", Lies::honest().msix(2, 0x800, 0x1000), past_bar),
            (
                "table-bir6",
                Lies::honest().msix(2, 0x800 | 6, 0xc00),
                "past BAR 5",
            ),
            (
                "pba-bir7",
                Lies::honest().msix(2, 0x800, 0xc00 | 7),
                "past BAR 5",
            ),
            (
                "absent-bar",
                Lies::honest().msix(2, 0x800 | 3, 0xc00),
                "in a BAR the device does not have",
            ),
        ],
    );
}

#[test]
fn a_server_that_fails_while_given_the_shared_pages_is_refused_and_leaves_nothing() {
    kvm_test!();
    let hang_up = Lies::on_map(OnMap::HangUpAt(2));
    let hang = Lies::on_map(OnMap::HangAt(2));
    let first = Lies::on_map(OnMap::HangUpAt(1));
    each_hot_plug_is_refused(
        "replayfail",
        vec![
            (
                "hang-up",
                hang_up,
                "failed while it was being given the shared pages",
            ),
            (
                "hang",
                hang,
                "failed while it was being given the shared pages",
            ),
            (
                "first",
                first,
                "failed while it was being given the shared pages",
            ),
        ],
    );
}
