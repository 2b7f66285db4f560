use hypervisor::{Hypervisor, VmType};

use super::*;
use crate::le_bytes::{u32_at, u64_at};

fn entry(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> CpuidEntry {
    CpuidEntry {
        function,
        index,
        flags,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    }
}

/// Every field at the ABI's offset: the count at 0, function i at
/// 16 + 48 i, its inputs at +0, +4, +8, +16 and registers at +24..+40.
#[test]
fn entries_land_in_the_abi_layout() {
    let entries = [
        entry(1, 9, 0, [0xa00f11, 2, 3, 4]),
        entry(7, 1, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, [5, 6, 7, 8]),
    ];
    let page = build(&entries).unwrap();
    assert_eq!(u32_at(&page[..], 0), 2);
    assert_eq!(&page[4..16], &[0; 12]);
    // The index of a leaf without sub-leaves is not recorded.
    assert_eq!((u32_at(&page[..], 16), u32_at(&page[..], 20)), (1, 0));
    assert_eq!(u64_at(&page[..], 24), 0, "xcr0_in");
    assert_eq!(u64_at(&page[..], 32), 0, "xss_in");
    let regs = |at: usize| [0, 4, 8, 12].map(|r| u32_at(&page[..], at + 24 + r));
    assert_eq!(regs(16), [0xa00f11, 2, 3, 4]);
    let second = 16 + 48;
    assert_eq!(
        (u32_at(&page[..], second), u32_at(&page[..], second + 4)),
        (7, 1)
    );
    assert_eq!(regs(second), [5, 6, 7, 8]);
    assert!(page[second + 48..].iter().all(|b| *b == 0));
    assert_eq!(signature(&entries), Some(0xa00f11));
    assert_eq!(signature(&entries[1..]), None);
}

/// The PSP checks leaf 0xD's XSAVE sizes for the XCR0/XSS inputs of the
/// entry: sub-leaves 0 and 1 carry the size of the reset state (x87, 0x240
/// bytes) with XCR0 = 1 as their input; other sub-leaves (a component's
/// size and offset) and other leaves pass as KVM gave them.
#[test]
fn xsave_sizes_are_those_of_the_reset_state() {
    let indexed = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    let entries = [
        entry(0xd, 0, indexed, [0x7, 0x988, 0xa88, 0]),
        entry(0xd, 1, indexed, [0xf, 0x988, 0x1800, 0]),
        entry(0xd, 2, indexed, [0x100, 0x240, 0, 0]),
        entry(0xe, 0, 0, [0, 0x988, 0, 0]),
    ];
    let table = validate(&build(&entries).unwrap()[..]).unwrap();
    let expect = |eax_in, ecx_in, xcr0_in, regs: [u32; 4]| CpuidFunction {
        eax_in,
        ecx_in,
        xcr0_in,
        xss_in: 0,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
    };
    assert_eq!(
        table,
        [
            expect(0xd, 0, 1, [0x7, 0x240, 0xa88, 0]),
            expect(0xd, 1, 1, [0xf, 0x240, 0x1800, 0]),
            expect(0xd, 2, 0, [0x100, 0x240, 0, 0]),
            expect(0xe, 0, 0, [0, 0x988, 0, 0]),
        ]
    );
}

/// Sub-leaves are told apart by ECX for every leaf the ABI indexes, even
/// where the source did not flag the index; for other leaves an index
/// KVM did not flag means nothing and is dropped.
#[test]
fn indexed_leaves_keep_their_sub_leaf() {
    for function in [4, 7, 0xb, 0xd, 0xf, 0x10, 0x14, 0x1f, 0x8000_001d] {
        let f = CpuidFunction::from_entry(&entry(function, 3, 0, [0; 4]));
        assert_eq!((f.eax_in, f.ecx_in), (function, 3), "leaf {function:#x}");
    }
    for function in [1, 0x8000_0001, 0x4000_0000] {
        let f = CpuidFunction::from_entry(&entry(function, 3, 0, [0; 4]));
        assert_eq!((f.eax_in, f.ecx_in), (function, 0), "leaf {function:#x}");
        let flagged = entry(function, 3, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, [0; 4]);
        assert_eq!(CpuidFunction::from_entry(&flagged).ecx_in, 3);
    }
}

#[test]
fn the_table_holds_64_functions_and_no_more() {
    let full: Vec<_> = (0..64)
        .map(|i| entry(0x8000_0000 + i, 0, 0, [i; 4]))
        .collect();
    let table = validate(&build(&full).unwrap()[..]).unwrap();
    assert_eq!(table.len(), 64);
    assert_eq!(table[63].eax_in, 0x8000_003f);
    assert_eq!(table[63].edx, 63);
    let mut many = full;
    many.push(CpuidEntry::default());
    let err = build(&many).unwrap_err();
    assert_eq!(err, CpuidPageError::TooMany(65));
    assert_eq!(
        err.to_string(),
        "65 CPUID leaves, more than the 64 the CPUID page holds"
    );
    assert_eq!(validate(&build(&[]).unwrap()[..]), Ok(vec![]));
}

#[test]
fn malformed_tables_are_refused() {
    let good = build(&[CpuidEntry::default(), entry(1, 0, 0, [1; 4])]).unwrap();
    assert_eq!(validate(&good[..]).unwrap().len(), 2);
    let broken = |at: usize, value: u8| {
        let mut page = good.clone();
        page[at] = value;
        validate(&page[..])
    };
    assert_eq!(broken(0, 65), Err(CpuidPageError::Count(65)));
    assert_eq!(broken(3, 1), Err(CpuidPageError::Count(1 << 24 | 2)));
    // 64 is allowed by the count; the functions past the two are zero.
    assert_eq!(broken(0, 64).unwrap().len(), 64);
    assert_eq!(broken(4, 1), Err(CpuidPageError::ReservedHeader));
    assert_eq!(broken(15, 1), Err(CpuidPageError::ReservedHeader));
    assert_eq!(broken(16 + 40, 1), Err(CpuidPageError::ReservedField(0)));
    assert_eq!(
        broken(16 + 48 + 47, 1),
        Err(CpuidPageError::ReservedField(1))
    );
    // The byte before the reserved field is a register.
    assert!(broken(16 + 48 + 39, 1).is_ok());
    assert_eq!(broken(16 + 2 * 48, 1), Err(CpuidPageError::TrailingData));
    assert_eq!(broken(PAGE_BYTES - 1, 1), Err(CpuidPageError::TrailingData));
    // The table is 16 + 64 * 48 = 3088 bytes; a consumer may be given
    // just that.
    assert_eq!(validate(&good[..3087]), Err(CpuidPageError::Short(3087)));
    assert_eq!(validate(&good[..3088]).unwrap().len(), 2);
}

/// The page of a real launch: this host's KVM CPUID as vCPU 0 gets it,
/// fits the table, and carries what the vCPUs are given (the hypervisor
/// bit, the package's size, the hidden features taken away).
#[test]
fn kvms_cpuid_fills_the_page_as_the_vcpus_get_it() {
    let Some(kvm) = crate::test_util::kvm() else {
        return;
    };
    let vm = kvm.create_vm(VmType::Default).unwrap();
    let supported = vm.supported_cpuid();
    let entries = for_launch(&supported, 4, &[CpuFeature::Cx16]);
    assert_eq!(entries.len(), supported.len());
    let table = validate(&build(&entries).unwrap()[..]).unwrap();
    assert_eq!(table.len(), supported.len());
    let find = |leaf, sub| {
        *table
            .iter()
            .find(|f| f.eax_in == leaf && f.ecx_in == sub)
            .unwrap_or_else(|| panic!("leaf {leaf:#x}.{sub} missing"))
    };
    let host = std::arch::x86_64::__cpuid(0);
    let vendor = find(0, 0);
    assert_eq!(
        (vendor.ebx, vendor.ecx, vendor.edx),
        (host.ebx, host.ecx, host.edx)
    );
    let features = find(1, 0);
    assert_eq!(features.eax, std::arch::x86_64::__cpuid(1).eax);
    assert_ne!(features.ecx & (1 << 31), 0, "hypervisor bit");
    assert_eq!(features.ecx & (1 << 13), 0, "cx16 hidden");
    assert_eq!((features.ebx >> 16) & 0xff, 4, "logical processors");
    assert_eq!(features.ebx >> 24, 0, "vCPU 0's APIC id");
    // Every sub-leaf KVM lists stays its own function.
    for e in supported.iter().filter(|e| e.flags & 1 != 0) {
        find(e.function, e.index);
    }
    assert_eq!(signature(&entries), signature(&host_minimal()));
}

/// `--measure`'s leaves are this processor's: leaf 0 names a known x86
/// vendor (EBX, EDX, ECX), leaf 1 has the FPU, SSE and SSE2 every x86_64
/// processor has.
#[test]
fn the_minimal_leaves_are_the_hosts() {
    let leaves = host_minimal();
    assert_eq!(
        leaves.iter().map(|e| e.function).collect::<Vec<_>>(),
        [0, 1]
    );
    let mut vendor = Vec::new();
    for reg in [leaves[0].ebx, leaves[0].edx, leaves[0].ecx] {
        vendor.extend_from_slice(&reg.to_le_bytes());
    }
    let vendor = String::from_utf8(vendor).unwrap();
    assert!(
        [
            "AuthenticAMD",
            "GenuineIntel",
            "HygonGenuine",
            "CentaurHauls"
        ]
        .contains(&vendor.as_str()),
        "{vendor}"
    );
    let (fpu, sse, sse2) = (1, 1 << 25, 1 << 26);
    assert_eq!(leaves[1].edx & (fpu | sse | sse2), fpu | sse | sse2);
    assert!(leaves[0].eax >= 1, "leaf 1 exists");
}
