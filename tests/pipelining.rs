//! Conversions at device speed (docs/design.md, "Every device at once"):
//! a conversion asks every device at once, a device's requests are
//! pipelined, replies may come in any order, a refusal anywhere rolls every
//! device back, and a server that stops half-way through a batch is cut
//! off within its timeout. Real VMM, real KVM, real device processes and
//! servers written here; after each case the VMM's shared set equals every
//! live device's mapped set and the VMM still answers.

mod common;

use std::collections::BTreeMap;

use common::lying_server::{Lies, LyingServer, OnMap};
use common::*;

const MIB: u64 = 1 << 20;
const A: u64 = 16 * MIB;
const B: u64 = 32 * MIB;

fn devices(api: &std::path::Path) -> serde_json::Value {
    let (status, body) = get(api, "vm.info");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["devices"].clone()
}

/// What a lying server holds, from its log (maps less unmaps), merged.
fn held_by(server: &LyingServer) -> Vec<(u64, u64)> {
    let hex = |t: &str| u64::from_str_radix(t.trim_start_matches("0x"), 16).unwrap();
    let mut held = BTreeMap::new();
    for line in server.log() {
        if let Some(range) = line.strip_prefix("map ") {
            let (iova, size) = range.split_once('+').unwrap();
            held.insert(hex(iova), hex(size));
        } else if let Some(iova) = line.strip_prefix("unmap ") {
            held.remove(&hex(iova));
        }
    }
    merge_ranges(held.into_iter().collect())
}

/// `duration_us` of every conversion event, in order.
fn conversion_durations(events: &std::path::Path) -> Vec<u64> {
    read_events(events)
        .iter()
        .filter(|e| e["event"] == "conversion")
        .map(|e| e["properties"]["duration_us"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_per_page_conversion_is_pipelined_and_replies_out_of_order_are_matched() {
    let dir = kvm_test!("pipelined");
    let reversed = LyingServer::start(&dir.path("reversed.sock"), Lies::on_map(OnMap::Reversed));
    let real = TestDevice::spawn(&dir, "real");
    let ops = [(A, 2 * MIB, true), (A, MIB, false), (A, 512 << 10, true)];
    let text = format!("shared@{A:#x}+2M,private@{A:#x}+1M,shared@{A:#x}+512K");
    let guest = memconv_guest(&dir, &[&text], false);
    let (vmm, api) = spawn_with_devices(
        &dir,
        &guest,
        &[
            user_device(&reversed.socket, ",id=reversed,mapping=pages"),
            real.plug(",mapping=pages"),
        ],
        &[],
    );
    vmm.wait_for_line("memconv: done 3 ok 0 failed");
    let model = model_shared_ranges(&ops);
    assert_eq!(vmm_shared_ranges(&api), model);
    assert_eq!(
        merge_ranges(real.mapped()),
        model,
        "the real device follows"
    );
    assert_eq!(real.mapping_count(), 384, "one mapping per page");
    assert_eq!(held_by(&reversed), model, "the reversing server follows");
    let most_reversed = reversed
        .log()
        .iter()
        .filter_map(|l| {
            l.strip_prefix("reversed ")
                .map(|n| n.parse::<usize>().unwrap())
        })
        .max()
        .unwrap_or(0);
    assert!(
        most_reversed > 1,
        "no burst of requests was in flight: {most_reversed}"
    );
    for device in devices(&api).as_array().unwrap() {
        assert_ne!(device["state"], "failed", "{device}");
    }
}

#[test]
fn a_server_that_stops_half_way_through_a_batch_is_cut_off_within_its_timeout() {
    let dir = kvm_test!("halfway");
    let stopping = LyingServer::start(&dir.path("stopping.sock"), Lies::on_map(OnMap::HangAt(200)));
    let real = TestDevice::spawn(&dir, "real");
    let guest = memconv_guest(&dir, &[&format!("shared@{A:#x}+2M")], false);
    let events = dir.path("events.json");
    let (vmm, api) = spawn_with_devices(
        &dir,
        &guest,
        &[
            user_device(
                &stopping.socket,
                ",id=stopping,mapping=pages,timeout_ms=1000",
            ),
            real.plug(",mapping=pages"),
        ],
        &["--event-monitor", &format!("path={}", events.display())],
    );
    vmm.wait_for_line("memconv: done 1 ok 0 failed");
    let info = devices(&api);
    let stopped = &info[0];
    assert_eq!(stopped["state"], "failed", "{info}");
    let why = stopped["failure"].as_str().unwrap();
    assert!(why.contains("no reply to DMA_MAP within 1000 ms"), "{why}");
    // The live device followed; the failed one holds nothing.
    assert_eq!(vmm_shared_ranges(&api), [(A, 2 * MIB)]);
    assert_eq!(merge_ranges(real.mapped()), [(A, 2 * MIB)]);
    assert!(stopping.log().iter().any(|l| l == "hang"));
    // One timeout for the whole batch, not one per request left.
    assert!(wait_until(|| !conversion_durations(&events).is_empty()));
    let took = conversion_durations(&events)[0];
    assert!(
        (1_000_000..2_500_000).contains(&took),
        "the conversion took {took} us"
    );
    assert_eq!(get(&api, "vmm.ping").0, 200);
}

#[test]
fn every_device_is_asked_at_once() {
    let dir = kvm_test!("fanout");
    let slow = |name: &str| {
        LyingServer::start(
            &dir.path(&format!("{name}.sock")),
            Lies::on_map(OnMap::Delay(300)),
        )
    };
    let (first, second) = (slow("first"), slow("second"));
    let text = format!("shared@{A:#x}+4K,private@{A:#x}+4K,shared@{A:#x}+4K,private@{A:#x}+4K");
    let guest = memconv_guest(&dir, &[&text], false);
    let events = dir.path("events.json");
    let (vmm, api) = spawn_with_devices(
        &dir,
        &guest,
        &[
            user_device(&first.socket, ",id=first"),
            user_device(&second.socket, ",id=second"),
        ],
        &["--event-monitor", &format!("path={}", events.display())],
    );
    vmm.wait_for_line("memconv: done 4 ok 0 failed");
    assert!(wait_until(|| conversion_durations(&events).len() == 4));
    // Each conversion waits for two devices that take 300 ms each: at once
    // that is 300 ms, one after the other 600.
    for took in conversion_durations(&events) {
        assert!(
            (300_000..500_000).contains(&took),
            "a conversion took {took} us"
        );
    }
    assert!(vmm_shared_ranges(&api).is_empty());
    assert!(held_by(&first).is_empty() && held_by(&second).is_empty());
}

#[test]
fn a_refusal_at_one_device_rolls_every_device_back() {
    let dir = kvm_test!("refusal");
    let refusing = LyingServer::start(
        &dir.path("refusing.sock"),
        Lies::on_map(OnMap::RefuseFrom(2)),
    );
    let real = TestDevice::spawn(&dir, "real");
    let text = format!("shared@{A:#x}+8K,shared@{B:#x}+64K");
    let guest = memconv_guest(&dir, &[&text], false);
    let (vmm, api) = spawn_with_devices(
        &dir,
        &guest,
        &[real.plug(""), user_device(&refusing.socket, ",id=refusing")],
        &[],
    );
    vmm.wait_for_line("memconv: done 1 ok 1 failed");
    assert_eq!(vmm.op_statuses()[0], "ok");
    assert_ne!(vmm.op_statuses()[1], "ok");
    // The real device mapped B while the other refused it, and gave it back.
    assert_eq!(vmm_shared_ranges(&api), [(A, 0x2000)]);
    assert!(wait_until(|| real.mapped() == [(A, 0x2000)]));
    assert_eq!(held_by(&refusing), [(A, 0x2000)]);
    assert!(refusing.log().iter().any(|l| l.starts_with("refuse ")));
    for device in devices(&api).as_array().unwrap() {
        assert_ne!(
            device["state"], "failed",
            "a refusal fails no device: {device}"
        );
    }
}
