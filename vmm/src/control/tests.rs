use std::time::Duration;

use super::*;
use crate::config::{ConsoleOutput, CpusConfig, MemoryConfig, PlatformConfig};
use crate::test_util::kvm;

/// A VMM over real KVM and a guest that converts a page and halts.
fn vmm(dir: &std::path::Path) -> Option<(Vmm, VmConfig, Receiver<VmmEvent>)> {
    let hv = kvm()?;
    let (tx, rx) = channel();
    let monitor = Arc::new(EventMonitor::disabled());
    let builder = VmBuilder::start(hv, tx, monitor.clone(), None, None).unwrap();
    let kernel = dir.join("guest.elf");
    let ops = test_guest::parse_ops("shared@0x1000000+4K").unwrap();
    let options = test_guest::MemconvOptions {
        poweroff: false,
        quiet: true,
    };
    std::fs::write(&kernel, test_guest::memconv_elf(&[ops], options)).unwrap();
    let config = VmConfig {
        kernel,
        firmware: None,
        cmdline: None,
        initramfs: None,
        memory: MemoryConfig::new("memory", 32 << 20, true, None).unwrap(),
        platform: PlatformConfig::default(),
        cpus: CpusConfig::default(),
        serial: ConsoleOutput::Off,
        devices: Vec::new(),
        user_devices: Vec::new(),
    };
    Some((Vmm::new(builder, monitor), config, rx))
}

/// A scratch directory, removed when the test ends (passed or not).
struct Scratch(std::path::PathBuf);

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Scratch {
    let dir = std::env::temp_dir().join(format!("ch-control-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Scratch(dir)
}

fn code(exit: Option<Exit>) -> Option<i32> {
    exit.map(|Exit::Code(code)| code)
}

#[test]
fn each_state_refuses_what_it_cannot_do_and_keeps_its_state() {
    let dir = dir("states");
    let Some((mut vmm, config, _events)) = vmm(&dir) else {
        return;
    };
    assert!(matches!(vmm.boot(), Err(LifecycleError::NotCreated)));
    assert!(matches!(vmm.shutdown_vm(), Err(LifecycleError::NotBooted)));
    assert!(matches!(vmm.reboot(), Err(LifecycleError::NotBooted)));
    vmm.delete();
    vmm.create(config.clone()).unwrap();
    assert!(matches!(
        vmm.create(config.clone()),
        Err(LifecycleError::AlreadyCreated)
    ));
    assert!(matches!(vmm.shutdown_vm(), Err(LifecycleError::NotBooted)));
    vmm.boot().unwrap();
    assert!(matches!(vmm.boot(), Err(LifecycleError::AlreadyBooted)));
    assert_eq!(vmm.vm.as_ref().unwrap().id(), 1);
    vmm.reboot().unwrap();
    assert_eq!(vmm.vm.as_ref().unwrap().id(), 2, "a reboot is a new VM");
    vmm.shutdown_vm().unwrap();
    assert!(vmm.vm.is_none() && vmm.config.is_some());
    vmm.boot().unwrap();
    vmm.delete();
    assert!(vmm.vm.is_none() && vmm.config.is_none());
    // A configuration that cannot boot leaves the VM created, not booted.
    let mut broken = config;
    broken.kernel = dir.join("missing.elf");
    vmm.create(broken).unwrap();
    assert!(matches!(vmm.boot(), Err(LifecycleError::Boot(_))));
    assert!(vmm.vm.is_none() && vmm.config.is_some());
}

#[test]
fn only_the_running_vms_guest_events_end_the_vmm() {
    let dir = dir("events");
    let Some((mut vmm, config, events)) = vmm(&dir) else {
        return;
    };
    // No VM: nothing a guest says counts.
    assert_eq!(code(vmm.guest_event(1, GuestEvent::PowerOff(0))), None);
    vmm.create(config).unwrap();
    vmm.boot().unwrap();
    let running = vmm.vm.as_ref().unwrap().id();
    // An event of an earlier VM is dropped; the running one's counts.
    assert_eq!(
        code(vmm.guest_event(running + 1, GuestEvent::PowerOff(3))),
        None
    );
    assert_eq!(
        code(vmm.guest_event(running, GuestEvent::PowerOff(3))),
        Some(3)
    );
    assert_eq!(
        code(vmm.guest_event(running, GuestEvent::Shutdown(0))),
        Some(1)
    );
    assert_eq!(
        code(vmm.guest_event(running, GuestEvent::VcpuError(0, "x".into()))),
        Some(1)
    );
    // The halted guest sends nothing on its own.
    assert!(events.recv_timeout(Duration::from_millis(100)).is_err());
    vmm.finish(0);
    assert!(vmm.vm.is_none());
}

#[test]
fn the_control_loop_ends_on_a_signal_a_guest_power_off_or_a_lost_channel() {
    let dir = dir("loop");
    let Some((mut vmm, config, _events)) = vmm(&dir) else {
        return;
    };
    let (tx, rx) = channel();
    tx.send(VmmEvent::Signal(libc::SIGTERM)).unwrap();
    assert_eq!(vmm.control_loop(&rx), 0);
    vmm.create(config).unwrap();
    vmm.boot().unwrap();
    let running = vmm.vm.as_ref().unwrap().id();
    // A stale VM's power-off is skipped; the running one's code ends it.
    for (vm, code) in [(running + 5, 9), (running, 7)] {
        tx.send(VmmEvent::Guest {
            vm,
            event: GuestEvent::PowerOff(code),
        })
        .unwrap();
    }
    assert_eq!(vmm.control_loop(&rx), 7);
    // Requests are answered while it runs; hot-plug answers from its
    // worker thread.
    let (answer_tx, answers) = channel();
    tx.send(VmmEvent::Api(api::ApiMessage {
        request: ApiRequest::VmRemoveDevice("nothing".into()),
        respond: answer_tx,
    }))
    .unwrap();
    drop(tx);
    assert_eq!(vmm.control_loop(&rx), 1, "a lost channel ends it with 1");
    let answer = answers.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(answer.err().map(|e| e.http_status()), Some(404));
    vmm.finish(0);
}

#[test]
fn cold_plug_keeps_ids_unique_and_removes_only_what_exists() {
    let dir = dir("coldplug");
    let Some((mut vmm, config, _events)) = vmm(&dir) else {
        return;
    };
    let device = |id: &str| crate::config::UserDeviceConfig {
        socket: "/tmp/d.sock".into(),
        id: Some(id.to_string()),
        ..Default::default()
    };
    let (tx, rx) = channel();
    vmm.cold_plug(tx.clone(), |c| {
        c.user_devices.push(device("a"));
        Ok(())
    });
    assert!(matches!(
        rx.recv().unwrap(),
        Err(ApiError::Lifecycle(LifecycleError::NotCreated))
    ));
    vmm.create(config).unwrap();
    for (id, ok) in [("a", true), ("b", true), ("a", false)] {
        vmm.cold_plug(tx.clone(), |c| {
            c.user_devices.push(device(id));
            Ok(())
        });
        assert_eq!(rx.recv().unwrap().is_ok(), ok, "{id}");
    }
    let user_ids = |vmm: &Vmm| -> Vec<String> {
        vmm.config
            .as_ref()
            .unwrap()
            .user_devices
            .iter()
            .map(|d| d.id.clone().unwrap())
            .collect()
    };
    assert_eq!(
        user_ids(&vmm),
        ["a", "b"],
        "the refused duplicate changed nothing"
    );
    // Removal before boot: an unknown id is 404, a known one goes.
    for (id, status) in [("zzz", Some(404)), ("a", None)] {
        vmm.handle_api(api::ApiMessage {
            request: ApiRequest::VmRemoveDevice(id.into()),
            respond: tx.clone(),
        });
        assert_eq!(rx.recv().unwrap().err().map(|e| e.http_status()), status);
    }
    assert_eq!(user_ids(&vmm), ["b"]);
    // VFIO devices too, by the same ids.
    vmm.cold_plug(tx.clone(), |c| {
        c.devices.push(crate::config::DeviceConfig {
            path: "/sys/bus/pci/devices/0000:01:00.0/".into(),
            id: Some("gpu".into()),
            ..Default::default()
        });
        Ok(())
    });
    assert!(rx.recv().unwrap().is_ok());
    vmm.handle_api(api::ApiMessage {
        request: ApiRequest::VmRemoveDevice("gpu".into()),
        respond: tx.clone(),
    });
    assert!(rx.recv().unwrap().is_ok());
    assert!(vmm.config.as_ref().unwrap().devices.is_empty());
}
