//! The KVM backend on this machine's real /dev/kvm (PVM, default VM type
//! only; see docs/testing.md). A tiny real-mode guest, run from anonymous
//! memory and from a guest_memfd slot at a non-zero file offset, exits for
//! every kind of access the VMM handles. Skips loudly without /dev/kvm
//! unless `CH_REQUIRE_KVM=1` (CI), where it fails instead.

use std::os::fd::AsRawFd;

use super::*;
use crate::caps::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

const SLOT_SIZE: u64 = 0x10000;
const CODE: u64 = 0x1000;
/// DS points here, past the only memory slot: data accesses are MMIO.
const DATA_SEGMENT: u64 = 0x10000;

fn kvm() -> Option<KvmHypervisor> {
    KvmHypervisor::for_tests()
}

/// A default VM (no vCPUs, no memory) on `/dev/kvm`; None without it.
fn default_vm() -> Option<Arc<dyn Vm>> {
    Some(kvm()?.create_vm(VmType::Default).unwrap())
}

/// An anonymous or shared mapping of `len` bytes, unmapped on drop.
struct Mapping {
    addr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: u64, fd: Option<(i32, u64)>) -> Self {
        let (flags, fd, offset) = match fd {
            Some((fd, offset)) => (libc::MAP_SHARED, fd, offset.cast_signed()),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0),
        };
        // SAFETY: a fresh mapping at a place the kernel picks.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ::arch::usize_from(len),
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "{}",
            std::io::Error::last_os_error()
        );
        Mapping {
            addr: addr.cast(),
            len: ::arch::usize_from(len),
        }
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: inside the mapping, which no Rust reference covers.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.addr.add(offset), bytes.len())
        };
    }
}

impl Mapping {
    /// Takes every access to the memory away while keeping the range
    /// reserved, so no other mapping of this process can take its place.
    fn revoke(&self) {
        // SAFETY: the mapping made in `new`; no Rust reference covers it.
        let rc = unsafe { libc::mprotect(self.addr.cast(), self.len, libc::PROT_NONE) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Binds `ram` as slot 0 at GPA 0.
fn bind(vm: &dyn Vm, ram: &Mapping) {
    let region = UserMemoryRegion {
        slot: 0,
        guest_phys_addr: 0,
        size: SLOT_SIZE,
        userspace_addr: ram.addr as u64,
        guest_memfd: None,
    };
    // SAFETY: each test keeps `ram` mapped until its vCPU is done, except
    // the one that unmaps it on purpose to see KVM fail to fault it in.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
}

/// vCPU 0 in real mode at `CODE`: CS and SS at 0, DS at `ds_base`, the
/// stack below 0x8000.
fn real_mode_vcpu(vm: &dyn Vm, ds_base: u64) -> Box<dyn Vcpu> {
    let vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ss.base = 0;
    sregs.ss.selector = 0;
    sregs.ds.base = ds_base;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rsp = 0x8000;
    regs.rflags = 2;
    vcpu.set_regs(&regs).unwrap();
    vcpu
}

/// mov al,0x5a; out 0x10,al; in al,0x11; mov [0],al; mov al,[4];
/// out 0x12,al; then hlt, which never exits: with the in-kernel irqchip
/// KVM waits for an interrupt itself.
const GUEST: [u8; 14] = [
    0xb0, 0x5a, 0xe6, 0x10, 0xe4, 0x11, 0xa2, 0x00, 0x00, 0xa0, 0x04, 0x00, 0xe6, 0x12,
];
const HLT: u8 = 0xf4;

/// Runs `GUEST` from the slot's memory in real mode up to its last port
/// write and checks each exit; the values the VMM answers with travel
/// through the guest's AL.
fn run_guest(vm: &dyn Vm) {
    let mut vcpu = real_mode_vcpu(vm, DATA_SEGMENT);
    assert_eq!(vcpu.get_regs().unwrap().rip, CODE);
    assert_eq!(vcpu.get_sregs().unwrap().ds.base, DATA_SEGMENT);

    let mut seen = Vec::new();
    loop {
        let exit = vcpu.run().unwrap();
        match exit {
            VmExit::IoOut { port: 0x12, data } => {
                seen.push(format!("out 0x12 {data:x?}"));
                break;
            }
            VmExit::IoOut { port, data } => seen.push(format!("out {port:#x} {data:x?}")),
            VmExit::IoIn { port, data } => {
                data[0] = 0x33;
                seen.push(format!("in {port:#x} {}", data.len()));
            }
            VmExit::MmioWrite { addr, data } => seen.push(format!("write {addr:#x} {data:x?}")),
            VmExit::MmioRead { addr, data } => {
                data[0] = 0x44;
                seen.push(format!("read {addr:#x} {}", data.len()));
            }
            other => panic!("unexpected exit {other:?} after {seen:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "out 0x10 [5a]",
            "in 0x11 1",
            "write 0x10000 [33]",
            "read 0x10004 1",
            "out 0x12 [44]",
        ]
    );
}

fn guest_code() -> Vec<u8> {
    let mut code = GUEST.to_vec();
    code.push(HLT);
    code
}

#[test]
fn a_guest_in_anonymous_memory_exits_for_port_and_mmio_accesses() {
    let Some(vm) = default_vm() else { return };
    let ram = Mapping::new(SLOT_SIZE, None);
    ram.write(::arch::usize_from(CODE), &guest_code());
    bind(vm.as_ref(), &ram);
    run_guest(vm.as_ref());
}

#[test]
fn a_guest_in_a_guest_memfd_slot_runs_from_the_slots_file_offset() {
    let Some(vm) = default_vm() else { return };
    if !vm.capabilities().guest_memfd_in_place() {
        eprintln!("*** SKIPPED: this host cannot mmap guest_memfd ***");
        return;
    }
    let flags = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
    let gmem = vm.create_guest_memfd(2 * SLOT_SIZE, flags).unwrap();
    // The slot is the file's second half; the first half holds a guest
    // that would exit differently, so running the wrong half fails.
    let file = Mapping::new(2 * SLOT_SIZE, Some((gmem.as_raw_fd(), 0)));
    file.write(::arch::usize_from(CODE), &[HLT]);
    file.write(::arch::usize_from(SLOT_SIZE + CODE), &guest_code());
    let view = Mapping::new(SLOT_SIZE, Some((gmem.as_raw_fd(), SLOT_SIZE)));
    let region = UserMemoryRegion {
        slot: 1,
        guest_phys_addr: 0,
        size: SLOT_SIZE,
        userspace_addr: view.addr as u64,
        guest_memfd: Some((gmem.as_raw_fd(), SLOT_SIZE)),
    };
    // SAFETY: `view` outlives the VM's use of it.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    run_guest(vm.as_ref());
}

#[test]
fn a_slot_the_kernel_refuses_names_itself() {
    let Some(vm) = default_vm() else { return };
    let region = UserMemoryRegion {
        slot: 3,
        guest_phys_addr: 0x1000,
        size: 0x800,
        userspace_addr: 0,
        guest_memfd: None,
    };
    // SAFETY: the kernel refuses an unaligned size before mapping anything.
    let e = unsafe { vm.set_user_memory_region(region) }.unwrap_err();
    assert!(
        matches!(
            e,
            HypervisorError::SetUserMemoryRegion {
                slot: 3,
                gpa: 0x1000,
                size: 0x800,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn a_signal_takes_a_vcpu_out_of_a_guest_that_never_exits() {
    let Some(vm) = default_vm() else { return };
    let ram = Mapping::new(SLOT_SIZE, None);
    // jmp $
    ram.write(::arch::usize_from(CODE), &[0xeb, 0xfe]);
    bind(vm.as_ref(), &ram);
    let vcpu = real_mode_vcpu(vm.as_ref(), 0);
    // The loop never exits by itself: only the kick ends the run.
    let exit = first_exit_within(vcpu, std::time::Duration::from_millis(50));
    assert_eq!(exit, "Interrupted");
}

#[test]
fn only_the_vm_types_the_host_reports_are_created() {
    let Some(hv) = kvm() else { return };
    for vm_type in VmType::ALL {
        let created = hv.create_vm(vm_type);
        if hv.capabilities().supports_vm_type(vm_type) {
            let vm = created.unwrap();
            assert_eq!(vm.vm_type(), vm_type);
        } else {
            let e = created.err().unwrap();
            assert!(
                matches!(e, HypervisorError::VmTypeUnsupported(t) if t == vm_type),
                "{e:?}"
            );
        }
    }
    assert!(hv.capabilities().supports_vm_type(VmType::Default));
}

#[test]
fn guest_memfd_gets_the_size_and_flags_asked_for() {
    let Some(vm) = default_vm() else { return };
    assert!(
        vm.capabilities().guest_memfd,
        "this machine has guest_memfd"
    );
    let gmem = vm.create_guest_memfd(SLOT_SIZE, 0).unwrap();
    let file = std::fs::File::from(gmem);
    assert_eq!(file.metadata().unwrap().len(), SLOT_SIZE);
    for (size, flags) in [(0x800, 0), (SLOT_SIZE, 1 << 20)] {
        let e = vm.create_guest_memfd(size, flags).unwrap_err();
        assert!(
            matches!(e, HypervisorError::CreateGuestMemfd { size: s, flags: f, .. } if s == size && f == flags),
            "{e:?}"
        );
    }
}

#[test]
fn memory_attributes_are_set_or_refused_by_capability() {
    let Some(vm) = default_vm() else { return };
    let supported = vm.capabilities().private_memory_attribute();
    assert_eq!(vm.supports_memory_attributes(), supported);
    let result = vm.set_memory_attributes(0, SLOT_SIZE, true);
    if supported {
        result.unwrap();
        vm.set_memory_attributes(0, SLOT_SIZE, false).unwrap();
        let e = vm.set_memory_attributes(0x800, 0x1000, true).unwrap_err();
        assert!(
            matches!(e, HypervisorError::SetMemoryAttributes { gpa: 0x800, .. }),
            "{e:?}"
        );
    } else {
        // This machine (KVM_CAP_MEMORY_ATTRIBUTES = 0).
        assert!(matches!(
            result,
            Err(HypervisorError::MemoryAttributesUnsupported)
        ));
    }
}

#[test]
fn a_vcpu_id_is_taken_once() {
    let Some(vm) = default_vm() else { return };
    vm.create_vcpu(0).unwrap();
    vm.create_vcpu(1).unwrap();
    let e = vm.create_vcpu(0).err().unwrap();
    assert!(matches!(e, HypervisorError::CreateVcpu(0, _)), "{e:?}");
}

#[test]
fn msi_routes_and_irqfds_reach_the_in_kernel_irqchip() {
    let Some(vm) = default_vm() else { return };
    assert!(vm.has_irqchip());
    // The split irqchip is TDX's only: a default VM keeps the kernel's
    // IOAPIC, and with it the PIT.
    assert!(!vm.has_split_irqchip());
    vm.create_pit().unwrap();
    let route = |gsi| MsiRoute {
        gsi,
        address: 0xfee0_0000,
        data: 0x40,
    };
    vm.set_msi_routes(&[route(24), route(25)]).unwrap();
    vm.set_msi_routes(&[]).unwrap();
    // A GSI past KVM's routing table is refused by the kernel.
    let e = vm.set_msi_routes(&[route(1 << 20)]).unwrap_err();
    assert!(matches!(e, HypervisorError::GsiRouting(1, _)), "{e:?}");
    let fd = EventFd::new(0).unwrap();
    vm.register_irqfd(&fd, 24).unwrap();
    // The same eventfd twice is refused (EBUSY) and names the action.
    let e = vm.register_irqfd(&fd, 24).unwrap_err();
    assert!(
        matches!(
            e,
            HypervisorError::Irqfd {
                action: "register",
                gsi: 24,
                ..
            }
        ),
        "{e:?}"
    );
    vm.unregister_irqfd(&fd, 24).unwrap();
    // Registered again once released.
    vm.register_irqfd(&fd, 24).unwrap();
}

/// Runs `vcpu` on a thread until its first exit, as text; a vCPU that
/// has not left the guest after `limit` is kicked out ("Interrupted").
fn first_exit_within(vcpu: Box<dyn Vcpu>, limit: std::time::Duration) -> String {
    exit_and_vcpu_within(vcpu, limit).0
}

/// A vCPU whose guest has enabled its local APIC (a 32-bit write of SVR at
/// DS:0xf0, DS at the APIC's page), told the VMM (port 0x10), taken
/// interrupts and halted to wait for one; `ram` holds its handlers.
fn waiting_for_an_interrupt(vm: &dyn Vm, ram: &Mapping) -> Box<dyn Vcpu> {
    ram.write(
        ::arch::usize_from(CODE),
        &[
            0x66, 0xc7, 0x06, 0xf0, 0x00, 0xff, 0x01, 0x00, 0x00, 0xe6, 0x10, 0xfb, HLT, 0xe6, 0x12,
        ],
    );
    bind(vm, ram);
    let mut vcpu = real_mode_vcpu(vm, 0xfee0_0000);
    assert!(matches!(
        vcpu.run().unwrap(),
        VmExit::IoOut { port: 0x10, .. }
    ));
    vcpu
}

/// As `first_exit_within`, handing the vCPU back.
fn exit_and_vcpu_within(
    mut vcpu: Box<dyn Vcpu>,
    limit: std::time::Duration,
) -> (String, Box<dyn Vcpu>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

    extern "C" fn ignore(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    let kick = SIGRTMIN() + 2;
    register_signal_handler(kick, ignore).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let finished = done.clone();
    let thread = std::thread::spawn(move || {
        let exit = format!("{:?}", vcpu.run().unwrap());
        finished.store(true, Ordering::Release);
        (exit, vcpu)
    });
    let deadline = std::time::Instant::now() + limit;
    while !done.load(Ordering::Acquire) {
        if std::time::Instant::now() > deadline {
            // A signal landing before KVM_RUN is entered is lost: resend.
            thread.kill(kick).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    thread.join().unwrap()
}

#[test]
fn an_irqfd_delivers_its_routed_msi_to_the_guest() {
    let Some(vm) = default_vm() else { return };
    let ram = Mapping::new(SLOT_SIZE, None);
    // Real-mode interrupt vectors 0x40 and 0x41: handlers that report
    // which one ran.
    ram.write(0x40 * 4, &[0x00, 0x20, 0x00, 0x00]);
    ram.write(0x41 * 4, &[0x00, 0x21, 0x00, 0x00]);
    ram.write(0x2000, &[0xe6, 0x40, HLT]); // out 0x40,al
    ram.write(0x2100, &[0xe6, 0x41, HLT]); // out 0x41,al
    let vcpu = waiting_for_an_interrupt(vm.as_ref(), &ram);

    // GSI 24 carries vector 0x40 to APIC 0 (this vCPU); GSI 25 carries
    // vector 0x41 to APIC 1, which does not exist. Both fire: only 0x40
    // may arrive (0x41 would win on priority if it were misdelivered).
    let route = |gsi, apic: u64, vector| MsiRoute {
        gsi,
        address: 0xfee0_0000 | (apic << 12),
        data: vector,
    };
    vm.set_msi_routes(&[route(24, 0, 0x40), route(25, 1, 0x41)])
        .unwrap();
    let to_us = EventFd::new(0).unwrap();
    let elsewhere = EventFd::new(0).unwrap();
    vm.register_irqfd(&to_us, 24).unwrap();
    vm.register_irqfd(&elsewhere, 25).unwrap();
    elsewhere.write(1).unwrap();
    to_us.write(1).unwrap();
    let exit = first_exit_within(vcpu, std::time::Duration::from_secs(5));
    assert!(
        exit.contains("port: 64"),
        "the guest took no or the wrong interrupt: {exit}"
    );
}

/// On a split irqchip (a TD's) the guest's EOI of a level-triggered vector
/// that an IOAPIC pin's route carries leaves KVM as `KVM_EXIT_IOAPIC_EOI`
/// (`VmExit::IoapicEoi`), for the VMM's IOAPIC to clear Remote IRR: a real
/// guest takes an MSI sent with `KVM_SIGNAL_MSI` and EOIs it in its LAPIC.
#[test]
fn a_split_irqchip_reports_the_guests_eoi_of_a_level_vector() {
    let Some(hv) = kvm() else { return };
    let vm = hv.create_split_irqchip_vm().unwrap();
    assert!(vm.has_split_irqchip() && vm.has_irqchip());
    assert_eq!(vm.vm_type(), VmType::Default);
    let ram = Mapping::new(SLOT_SIZE, None);
    // Vector 0x40's handler: EOI (a 32-bit write of 0 to the LAPIC's EOI
    // register at DS:0xb0), then tell the VMM.
    ram.write(0x40 * 4, &[0x00, 0x20, 0x00, 0x00]);
    ram.write(
        0x2000,
        &[
            0x66, 0xc7, 0x06, 0xb0, 0x00, 0x00, 0x00, 0x00, 0x00, 0xe6, 0x40, HLT,
        ],
    );
    let vcpu = waiting_for_an_interrupt(vm.as_ref(), &ram);
    // IOAPIC pin 5's route: vector 0x40, level-triggered (data bit 15),
    // to APIC 0. KVM scans such routes for the vectors whose EOIs it
    // reports.
    let level = 1 << 15;
    vm.set_msi_routes(&[MsiRoute {
        gsi: 5,
        address: 0xfee0_0000,
        data: 0x40 | level,
    }])
    .unwrap();
    vm.signal_msi(0xfee0_0000, 0x40 | level).unwrap();
    // The handler's EOI, then its port write; KVM reports the EOI at the
    // next entry (here, where guest code is emulated, that can be after
    // the port write the same run reached).
    let mut exits = Vec::new();
    let mut vcpu = Some(vcpu);
    for _ in 0..2 {
        let (exit, v) =
            exit_and_vcpu_within(vcpu.take().unwrap(), std::time::Duration::from_secs(5));
        exits.push(exit);
        vcpu = Some(v);
    }
    // Measured here (PVM, Linux 6.18): the port write, then the EOI exit.
    assert!(exits.contains(&"IoapicEoi(64)".to_string()), "{exits:?}");
    assert!(
        exits.contains(&"IoOut { port: 64, data: [0] }".to_string()),
        "{exits:?}"
    );
}

#[test]
fn a_guest_whose_memory_is_gone_stops_with_an_error_not_a_retry() {
    let Some(vm) = default_vm() else { return };
    let ram = Mapping::new(SLOT_SIZE, None);
    bind(vm.as_ref(), &ram);
    // Not unmapped: another test thread's mapping could land in the freed
    // range and give the guest memory again.
    ram.revoke();
    let mut vcpu = real_mode_vcpu(vm.as_ref(), 0);
    // Depending on the host, KVM_RUN fails (EFAULT) or reports an exit
    // the VMM cannot handle (PVM: an emulation failure); either ends the
    // vCPU loop. Never `Interrupted`, which the loop would retry forever.
    match vcpu.run() {
        Err(HypervisorError::Run(io)) => assert_eq!(io.raw_os_error(), Some(libc::EFAULT)),
        Ok(VmExit::Unhandled(what)) => assert!(!what.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_kvm_vfio_device_exists_once_per_vm() {
    let Some(vm) = default_vm() else { return };
    let device = vm.create_vfio_device().unwrap();
    assert!(device.as_raw_fd() >= 0);
    // KVM refuses a second one (EBUSY): the device manager creates it with
    // the first VFIO device and shares it.
    let e = vm.create_vfio_device().unwrap_err();
    assert!(
        matches!(&e, HypervisorError::CreateVfioDevice(io) if io.raw_os_error() == Some(libc::EBUSY)),
        "{e:?}"
    );
}

/// The raw vCPU behind a `Box<dyn Vcpu>` made by this backend, to read back
/// what the trait only writes.
fn raw(vcpu: &dyn Vcpu) -> &KvmVcpu {
    // SAFETY: every vCPU these tests create comes from KvmVm::create_vcpu,
    // which boxes a KvmVcpu; the reference lives no longer than the box.
    unsafe { &*(vcpu as *const dyn Vcpu as *const KvmVcpu) }
}

#[test]
fn linux_boot_state_reaches_the_vcpu() {
    let Some(vm) = default_vm() else { return };
    let vcpu = vm.create_vcpu(0).unwrap();
    let kvm_vcpu = raw(vcpu.as_ref());

    // CPUID: what is set is what the vCPU reports, leaf by leaf.
    let mut entries = vm.supported_cpuid();
    assert!(
        entries.iter().any(|e| e.function == 0x4000_0000),
        "KVM's leaf"
    );
    let leaf1 = entries.iter_mut().find(|e| e.function == 1).unwrap();
    leaf1.ecx &= !(1 << 13); // CX16
    vcpu.set_cpuid(&entries).unwrap();
    let back = kvm_vcpu.fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
    let leaf1 = back.as_slice().iter().find(|e| e.function == 1).unwrap();
    assert_eq!(leaf1.ecx & (1 << 13), 0);

    // LINT0 ExtINT, LINT1 NMI.
    vcpu.set_lapic_lints().unwrap();
    let lapic = kvm_vcpu.fd.get_lapic().unwrap();
    let lvt = |offset: usize| {
        u32::from_le_bytes(std::array::from_fn(|i| {
            lapic.regs[offset + i].cast_unsigned()
        }))
    };
    assert_eq!(lvt(0x350) & 0x700, 0x700);
    assert_eq!(lvt(0x360) & 0x700, 0x400);

    // MSRs: taken, or refused by index.
    vcpu.set_msrs(&[(0x1a0, 1)]).unwrap(); // IA32_MISC_ENABLE: fast strings
    let err = vcpu.set_msrs(&[(0x1a0, 1), (0xdead_beef, 0)]).unwrap_err();
    assert!(err.to_string().contains("2 MSRs"), "{err}");

    // The FPU's control words.
    let fpu = crate::arch::FpuState {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).unwrap();
    // (PVM reads MXCSR back as 0 whatever was set; the x87 control word
    // comes back.)
    assert_eq!(kvm_vcpu.fd.get_fpu().unwrap().fcw, 0x37f);

    // An application processor waits for its startup IPI.
    let ap = vm.create_vcpu(1).unwrap();
    ap.wait_for_startup_ipi().unwrap();
    assert_eq!(
        raw(ap.as_ref()).fd.get_mp_state().unwrap().mp_state,
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED
    );
}

/// Linux's SMP bring-up in miniature: vCPU 1 waits for its startup IPI;
/// vCPU 0 enables its LAPIC and sends INIT then SIPI (vector 8: start at
/// 0x8000) to APIC 1 through the in-kernel LAPIC. vCPU 1's first exit is
/// the port write of the code at 0x8000; without the IPIs it never leaves.
#[test]
fn an_application_processor_starts_on_init_and_sipi_from_the_bsp() {
    let Some(vm) = default_vm() else { return };
    let ram = Mapping::new(SLOT_SIZE, None);
    let mov_dword = |offset: u16, value: u32| {
        let mut insn = vec![0x66, 0xc7, 0x06];
        insn.extend_from_slice(&offset.to_le_bytes());
        insn.extend_from_slice(&value.to_le_bytes());
        insn
    };
    let mut bsp_code = Vec::new();
    bsp_code.extend(mov_dword(0xf0, 0x1ff)); // SVR: APIC on
    bsp_code.extend(mov_dword(0x310, 1 << 24)); // ICR high: APIC 1
    bsp_code.extend(mov_dword(0x300, 0x4500)); // INIT, level assert
    bsp_code.extend(mov_dword(0x300, 0x4608)); // SIPI, vector 8
    bsp_code.extend([0xe6, 0x10, HLT]); // out 0x10,al
    ram.write(::arch::usize_from(CODE), &bsp_code);
    ram.write(0x8000, &[0xb0, 0x42, 0xe6, 0x99, HLT]); // mov al,0x42; out 0x99,al
    bind(vm.as_ref(), &ram);
    let mut bsp = real_mode_vcpu(vm.as_ref(), 0xfee0_0000);
    let ap = vm.create_vcpu(1).unwrap();
    ap.wait_for_startup_ipi().unwrap();
    let bsp_thread = std::thread::spawn(move || {
        let exit = format!("{:?}", bsp.run().unwrap());
        (exit, bsp)
    });
    // KVM_RUN of a vCPU woken by its IPIs returns EAGAIN once (an
    // "interrupted" exit) before it runs: the vCPU loop simply runs again.
    let ap_exit = first_exit_past_wake_up(ap, std::time::Duration::from_secs(10));
    let (bsp_exit, _bsp) = bsp_thread.join().unwrap();
    assert!(bsp_exit.contains("port: 16"), "{bsp_exit}");
    assert!(
        ap_exit.contains("port: 153") && ap_exit.contains("66"),
        "the AP did not start at the SIPI vector: {ap_exit}"
    );
}

/// As `first_exit_within`, past the "interrupted" exits of a wake-up.
fn first_exit_past_wake_up(mut vcpu: Box<dyn Vcpu>, limit: std::time::Duration) -> String {
    use std::sync::atomic::{AtomicBool, Ordering};
    use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

    extern "C" fn ignore(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    let kick = SIGRTMIN() + 3;
    register_signal_handler(kick, ignore).unwrap();
    let (done, give_up) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (finished, stop) = (done.clone(), give_up.clone());
    let thread = std::thread::spawn(move || {
        let exit = loop {
            match vcpu.run().unwrap() {
                VmExit::Interrupted if !stop.load(Ordering::Acquire) => continue,
                exit => break format!("{exit:?}"),
            }
        };
        finished.store(true, Ordering::Release);
        exit
    });
    let deadline = std::time::Instant::now() + limit;
    while !done.load(Ordering::Acquire) {
        if std::time::Instant::now() > deadline {
            give_up.store(true, Ordering::Release);
            // A signal landing before KVM_RUN is entered is lost: resend.
            thread.kill(kick).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    thread.join().unwrap()
}
