//! vCPU state for an SEV-SNP launch: the registers the VMM gives each vCPU
//! (the BSP at the reset vector, APs where OVMF's SEV-ES reset block says),
//! and the VMSA page KVM builds from them at `SNP_LAUNCH_FINISH`.
//!
//! KVM fills a VMSA by copying the vCPU's VMCB save area, then its general
//! registers, XCR0 / XSS / PKRU / DR6, SEV_FEATURES, and (for VMs made with
//! `KVM_SEV_INIT2`) the x87 / SSE state. `build_vmsa` does the same from
//! what the VMM set, with KVM's own adjustments on the way into the VMCB,
//! so the digest of the simulated processor is the digest of the launch.
//! The layout is the kernel's `struct sev_es_save_area`.

use hypervisor::SnpVcpuState;
use hypervisor::arch::{SegmentRegister, SpecialRegisters, StandardRegisters};

use super::ovmf::SevEsResetBlock;
use crate::boot::x86::{CR0_CD, CR0_ET, CR0_NW, CR4_MCE, EFER_SVME, MXCSR_RESET, X87_FCW_RESET};

pub const VMSA_SIZE: usize = arch::layout::PAGE_BYTES;

/// Byte offsets in `struct sev_es_save_area`.
mod offset {
    pub const ES: usize = 0x000;
    pub const CS: usize = 0x010;
    pub const SS: usize = 0x020;
    pub const DS: usize = 0x030;
    pub const FS: usize = 0x040;
    pub const GS: usize = 0x050;
    pub const GDTR: usize = 0x060;
    pub const LDTR: usize = 0x070;
    pub const IDTR: usize = 0x080;
    pub const TR: usize = 0x090;
    pub const CPL: usize = 0x0cb;
    pub const EFER: usize = 0x0d0;
    pub const XSS: usize = 0x140;
    pub const CR4: usize = 0x148;
    pub const CR3: usize = 0x150;
    pub const CR0: usize = 0x158;
    pub const DR7: usize = 0x160;
    pub const DR6: usize = 0x168;
    pub const RFLAGS: usize = 0x170;
    pub const RIP: usize = 0x178;
    pub const RSP: usize = 0x1d8;
    pub const RAX: usize = 0x1f8;
    pub const CR2: usize = 0x240;
    pub const G_PAT: usize = 0x268;
    pub const PKRU: usize = 0x2e8;
    pub const RCX: usize = 0x308;
    pub const RDX: usize = 0x310;
    pub const RBX: usize = 0x318;
    pub const RBP: usize = 0x328;
    pub const RSI: usize = 0x330;
    pub const RDI: usize = 0x338;
    pub const R8: usize = 0x340;
    pub const SEV_FEATURES: usize = 0x3b0;
    pub const XCR0: usize = 0x3e8;
    pub const MXCSR: usize = 0x408;
    pub const X87_FCW: usize = 0x410;
}

/// What KVM puts in every new vCPU and the VMM does not set: the reset
/// values of the architecture and of KVM's FPU state.
const RESET_DR7: u64 = 0x400;
const RESET_DR6: u64 = 0xffff_0ff0;
/// The PAT MSR's power-on value.
const RESET_PAT: u64 = 0x0007_0406_0007_0406;
/// XCR0 with only x87 enabled.
const RESET_XCR0: u64 = 1;

/// The BSP starts at the reset vector, 16 bytes below 4 GiB.
const BSP_CS_BASE: u64 = 0xffff_0000;
const BSP_IP: u64 = 0xfff0;

fn segment(selector: u16, base: u64, type_: u8, s: u8) -> SegmentRegister {
    SegmentRegister {
        base,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        s,
        ..Default::default()
    }
}

/// Real mode at `cs_base:ip`, as after INIT. CR0 is ET alone rather than
/// the architectural 0x60000010: KVM would clear CD and NW on the way into
/// the VMCB anyway (unless a VMM turned that quirk off), so giving ET alone
/// keeps the VMSA independent of the quirk. CR4.MCE is set for the same
/// reason: KVM adds the host's MCE bit, which every SNP host has set.
pub fn reset_state(cs_base: u64, ip: u64, vcpu_signature: u32) -> SnpVcpuState {
    let data = segment(0, 0, 0x3, 1);
    let mut sregs = SpecialRegisters {
        cs: segment(0xf000, cs_base, 0xb, 1),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        // A busy 32-bit TSS and an LDT, as QEMU resets them.
        tr: segment(0, 0, 0xb, 0),
        ldt: segment(0, 0, 0x2, 0),
        cr0: CR0_ET,
        cr4: CR4_MCE,
        ..Default::default()
    };
    sregs.gdt.limit = 0xffff;
    sregs.idt.limit = 0xffff;
    let regs = StandardRegisters {
        rip: ip,
        rflags: 0x2,
        // EDX holds the processor signature after reset (CPUID 1 EAX).
        rdx: u64::from(vcpu_signature),
        ..Default::default()
    };
    SnpVcpuState { regs, sregs }
}

pub fn bsp_state(vcpu_signature: u32) -> SnpVcpuState {
    reset_state(BSP_CS_BASE, BSP_IP, vcpu_signature)
}

pub fn ap_state(reset: SevEsResetBlock, vcpu_signature: u32) -> SnpVcpuState {
    reset_state(reset.cs_base(), reset.ip(), vcpu_signature)
}

/// The VMCB's attribute word of a segment, as KVM's SVM code packs it.
fn attributes(s: &SegmentRegister) -> u16 {
    if s.unusable != 0 {
        return 0;
    }
    u16::from(s.type_ & 0xf)
        | u16::from(s.s & 1) << 4
        | u16::from(s.dpl & 3) << 5
        | u16::from(s.present & 1) << 7
        | u16::from(s.avl & 1) << 8
        | u16::from(s.l & 1) << 9
        | u16::from(s.db & 1) << 10
        | u16::from(s.g & 1) << 11
}

struct Page(Box<[u8; VMSA_SIZE]>);

impl Page {
    fn u16(&mut self, at: usize, value: u16) {
        self.0[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }
    fn u32(&mut self, at: usize, value: u32) {
        self.0[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }
    fn u64(&mut self, at: usize, value: u64) {
        self.0[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
    /// `struct vmcb_seg`: selector, attributes, limit, base.
    fn seg(&mut self, at: usize, selector: u16, attrib: u16, limit: u32, base: u64) {
        self.u16(at, selector);
        self.u16(at + 2, attrib);
        self.u32(at + 4, limit);
        self.u64(at + 8, base);
    }
    fn segment(&mut self, at: usize, s: &SegmentRegister) {
        self.seg(at, s.selector, attributes(s), s.limit, s.base);
    }
}

/// The VMSA page KVM builds for a vCPU with `state` in a VM whose
/// SEV_FEATURES are `sev_features` (SNP-active included).
pub fn build_vmsa(state: &SnpVcpuState, sev_features: u64) -> Box<[u8; VMSA_SIZE]> {
    let mut page = Page(Box::new([0; VMSA_SIZE]));
    let (r, s) = (&state.regs, &state.sregs);
    page.segment(offset::ES, &s.es);
    page.segment(offset::CS, &s.cs);
    page.segment(offset::SS, &s.ss);
    page.segment(offset::DS, &s.ds);
    page.segment(offset::FS, &s.fs);
    page.segment(offset::GS, &s.gs);
    page.seg(offset::GDTR, 0, 0, s.gdt.limit.into(), s.gdt.base);
    page.segment(offset::LDTR, &s.ldt);
    page.seg(offset::IDTR, 0, 0, s.idt.limit.into(), s.idt.base);
    page.segment(offset::TR, &s.tr);
    // KVM takes the CPL from SS's DPL.
    page.0[offset::CPL] = s.ss.dpl & 3;
    page.u64(offset::EFER, s.efer | EFER_SVME);
    page.u64(offset::XSS, 0);
    // With nested paging KVM's VMCB CR0 is the guest's, less CD and NW.
    page.u64(offset::CR0, s.cr0 & !(CR0_CD | CR0_NW));
    page.u64(offset::CR3, s.cr3);
    page.u64(offset::CR4, s.cr4 | CR4_MCE);
    page.u64(offset::CR2, s.cr2);
    page.u64(offset::DR7, RESET_DR7);
    page.u64(offset::DR6, RESET_DR6);
    page.u64(offset::RFLAGS, r.rflags);
    page.u64(offset::RIP, r.rip);
    page.u64(offset::RSP, r.rsp);
    page.u64(offset::RAX, r.rax);
    page.u64(offset::G_PAT, RESET_PAT);
    page.u32(offset::PKRU, 0);
    page.u64(offset::RCX, r.rcx);
    page.u64(offset::RDX, r.rdx);
    page.u64(offset::RBX, r.rbx);
    page.u64(offset::RBP, r.rbp);
    page.u64(offset::RSI, r.rsi);
    page.u64(offset::RDI, r.rdi);
    for (i, value) in [r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15]
        .into_iter()
        .enumerate()
    {
        page.u64(offset::R8 + 8 * i, value);
    }
    page.u64(offset::SEV_FEATURES, sev_features);
    page.u64(offset::XCR0, RESET_XCR0);
    page.u32(offset::MXCSR, MXCSR_RESET);
    page.u16(offset::X87_FCW, X87_FCW_RESET);
    page.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::le_bytes::u64_at;

    #[test]
    fn the_bsp_starts_at_the_reset_vector_and_aps_at_the_reset_block() {
        let bsp = build_vmsa(&bsp_state(0xa00f11), 1);
        assert_eq!(
            &bsp[0x10..0x20],
            &[
                0x00, 0xf0, 0x9b, 0, 0xff, 0xff, 0, 0, 0, 0, 0xff, 0xff, 0, 0, 0, 0
            ]
        );
        assert_eq!(u64_at(&bsp[..], offset::RIP), 0xfff0);
        assert_eq!(u64_at(&bsp[..], offset::RDX), 0xa00f11);
        let ap = build_vmsa(
            &ap_state(
                SevEsResetBlock {
                    ap_reset_address: 0x0080_b004,
                },
                0xa00f11,
            ),
            1,
        );
        assert_eq!(u64_at(&ap[..], offset::CS + 8), 0x80_0000);
        assert_eq!(u64_at(&ap[..], offset::RIP), 0xb004);
        // Only CS and RIP differ.
        let differing: Vec<usize> = (0..VMSA_SIZE).filter(|i| bsp[*i] != ap[*i]).collect();
        assert!(
            differing
                .iter()
                .all(|i| (0x18..0x20).contains(i) || (0x178..0x180).contains(i)),
            "{differing:x?}"
        );
    }

    #[test]
    fn kvm_adjustments_reach_the_vmsa() {
        let mut state = bsp_state(1);
        state.sregs.cr0 = 0x6000_0010;
        state.sregs.cr4 = 0;
        state.sregs.ds.unusable = 1;
        let vmsa = build_vmsa(&state, 0x5);
        assert_eq!(u64_at(&vmsa[..], offset::CR0), 0x10);
        assert_eq!(u64_at(&vmsa[..], offset::CR4), 0x40);
        assert_eq!(u64_at(&vmsa[..], offset::EFER), 0x1000);
        assert_eq!(u64_at(&vmsa[..], offset::SEV_FEATURES), 0x5);
        assert_eq!(&vmsa[offset::DS + 2..offset::DS + 4], &[0, 0]);
        assert_eq!(&vmsa[offset::TR + 2..offset::TR + 4], &[0x8b, 0]);
        assert_eq!(&vmsa[offset::LDTR + 2..offset::LDTR + 4], &[0x82, 0]);
    }

    /// The VMCB attribute word packs each descriptor field at its own bit
    /// (the reset state sets only type, S and P, so each is tried here),
    /// and only the field's width of it.
    #[test]
    fn segment_attributes_pack_every_field_at_its_bit() {
        let field = |f: &dyn Fn(&mut SegmentRegister)| {
            let mut s = SegmentRegister::default();
            f(&mut s);
            attributes(&s)
        };
        assert_eq!(field(&|s| s.type_ = 0xb), 0x00b);
        assert_eq!(field(&|s| s.type_ = 0x1b), 0x00b);
        assert_eq!(field(&|s| s.s = 1), 0x010);
        assert_eq!(field(&|s| s.s = 2), 0x000);
        assert_eq!(field(&|s| s.dpl = 3), 0x060);
        assert_eq!(field(&|s| s.dpl = 6), 0x040);
        assert_eq!(field(&|s| s.present = 1), 0x080);
        assert_eq!(field(&|s| s.present = 2), 0x000);
        assert_eq!(field(&|s| s.avl = 1), 0x100);
        assert_eq!(field(&|s| s.avl = 2), 0x000);
        assert_eq!(field(&|s| s.l = 1), 0x200);
        assert_eq!(field(&|s| s.l = 2), 0x000);
        assert_eq!(field(&|s| s.db = 1), 0x400);
        assert_eq!(field(&|s| s.db = 2), 0x000);
        assert_eq!(field(&|s| s.g = 1), 0x800);
        assert_eq!(field(&|s| s.g = 2), 0x000);
        // A ring-3 64-bit code segment, and a 4 GiB flat data segment.
        let code = field(&|s| {
            (s.type_, s.s, s.dpl, s.present, s.avl, s.l, s.g) = (0xb, 1, 3, 1, 1, 1, 1);
        });
        assert_eq!(code, 0xbfb);
        let data = field(&|s| (s.type_, s.s, s.present, s.db, s.g) = (0x3, 1, 1, 1, 1));
        assert_eq!(data, 0xc93);
        assert_eq!(
            field(&|s| (s.type_, s.present, s.unusable) = (0x3, 1, 1)),
            0
        );
    }

    /// The state KVM is given at reset is the architecture's (with CR4.MCE,
    /// which KVM keeps set for an SEV-ES guest), and every register of a
    /// state lands at its own offset.
    #[test]
    fn reset_registers_and_every_gpr_reach_their_offsets() {
        let reset = bsp_state(0xa00f11);
        assert_eq!((reset.sregs.cr0, reset.sregs.cr4), (0x10, 0x40));
        assert_eq!(reset.regs.rflags, 0x2);

        let mut state = bsp_state(1);
        let r = &mut state.regs;
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) = (1, 2, 3, 4, 5, 6, 7, 8);
        (r.r8, r.r9, r.r10, r.r11) = (0x108, 0x109, 0x10a, 0x10b);
        (r.r12, r.r13, r.r14, r.r15) = (0x10c, 0x10d, 0x10e, 0x10f);
        // A long-mode EFER (LME, LMA) that already has SVME keeps it.
        state.sregs.efer = 0x1500;
        let vmsa = build_vmsa(&state, 1);
        let at = |offset| u64_at(&vmsa[..], offset);
        let named = [
            (offset::RAX, 1),
            (offset::RBX, 2),
            (offset::RCX, 3),
            (offset::RDX, 4),
            (offset::RSI, 5),
            (offset::RDI, 6),
            (offset::RBP, 7),
            (offset::RSP, 8),
        ];
        for (offset, value) in named {
            assert_eq!(at(offset), value, "{offset:#x}");
        }
        for i in 0..8 {
            assert_eq!(at(offset::R8 + 8 * i), 0x108 + i as u64, "r{}", 8 + i);
        }
        assert_eq!(at(offset::EFER), 0x1500);
    }
}
