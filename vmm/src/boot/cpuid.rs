//! The CPUID a vCPU sees: what KVM supports, with the VMM's adjustments
//! (each vCPU's APIC id and the package's topology, the hypervisor bit) and
//! the features the user hid (`--cpus hide=`), for hosts whose instruction
//! emulator lacks an instruction a feature bit would invite the guest to use.

use hypervisor::arch::CpuidEntry;

/// A CPUID feature `--cpus hide=` can take away: (leaf, subleaf, register,
/// bit). Hiding XSAVE also hides what needs it (AVX, OSXSAVE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuFeature {
    Cx16,
    Xsave,
    Avx,
    Avx2,
    X2apic,
    Pcid,
    TscDeadline,
    Rdrand,
    Smep,
    Smap,
    La57,
}

#[derive(Debug, Clone, Copy)]
enum Register {
    Ebx,
    Ecx,
}

impl CpuFeature {
    pub const ALL: [CpuFeature; 11] = [
        CpuFeature::Cx16,
        CpuFeature::Xsave,
        CpuFeature::Avx,
        CpuFeature::Avx2,
        CpuFeature::X2apic,
        CpuFeature::Pcid,
        CpuFeature::TscDeadline,
        CpuFeature::Rdrand,
        CpuFeature::Smep,
        CpuFeature::Smap,
        CpuFeature::La57,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CpuFeature::Cx16 => "cx16",
            CpuFeature::Xsave => "xsave",
            CpuFeature::Avx => "avx",
            CpuFeature::Avx2 => "avx2",
            CpuFeature::X2apic => "x2apic",
            CpuFeature::Pcid => "pcid",
            CpuFeature::TscDeadline => "tsc-deadline",
            CpuFeature::Rdrand => "rdrand",
            CpuFeature::Smep => "smep",
            CpuFeature::Smap => "smap",
            CpuFeature::La57 => "la57",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The bits that go with this feature.
    fn bits(self) -> &'static [(u32, Register, u32)] {
        use Register::{Ebx, Ecx};
        match self {
            CpuFeature::Cx16 => &[(1, Ecx, 13)],
            // OSXSAVE (27) and AVX (28) mean nothing without XSAVE (26).
            CpuFeature::Xsave => &[(1, Ecx, 26), (1, Ecx, 27), (1, Ecx, 28)],
            CpuFeature::Avx => &[(1, Ecx, 28)],
            CpuFeature::Avx2 => &[(7, Ebx, 5)],
            CpuFeature::X2apic => &[(1, Ecx, 21)],
            CpuFeature::Pcid => &[(1, Ecx, 17)],
            CpuFeature::TscDeadline => &[(1, Ecx, 24)],
            CpuFeature::Rdrand => &[(1, Ecx, 30)],
            CpuFeature::Smep => &[(7, Ebx, 7)],
            CpuFeature::Smap => &[(7, Ebx, 20)],
            CpuFeature::La57 => &[(7, Ecx, 16)],
        }
    }
}

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_TOPOLOGY: u32 = 4;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;
const HYPERVISOR_BIT: u32 = 1 << 31;
const HTT_BIT: u32 = 1 << 28;
/// Topology level types in leaf 0xB's ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// The CPUID of vCPU `index` of `count`: one package of `count` cores, one
/// thread each, APIC id = index.
pub fn for_vcpu(
    supported: &[CpuidEntry],
    index: u8,
    count: u8,
    hidden: &[CpuFeature],
) -> Vec<CpuidEntry> {
    let id = u32::from(index);
    let cores = u32::from(count.max(1));
    // Bits of the APIC id that number cores inside the package.
    let core_bits = u32::BITS - (cores - 1).leading_zeros();
    let mut entries = supported.to_vec();
    for e in &mut entries {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0xffff) | (id << 24) | (cores.min(255) << 16);
                e.ecx |= HYPERVISOR_BIT;
                if cores > 1 {
                    e.edx |= HTT_BIT;
                }
            }
            LEAF_CACHE_TOPOLOGY => {
                e.eax = (e.eax & 0x03ff_ffff) | ((cores - 1).min(63) << 26);
            }
            LEAF_EXTENDED_TOPOLOGY | LEAF_V2_EXTENDED_TOPOLOGY => {
                let (shift, logical, level) = match e.index {
                    0 => (0, 1, LEVEL_SMT),
                    1 => (core_bits, cores, LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = logical;
                e.ecx = (level << 8) | (e.index & 0xff);
                e.edx = id;
            }
            _ => {}
        }
    }
    for feature in hidden {
        for &(leaf, register, bit) in feature.bits() {
            for e in entries
                .iter_mut()
                .filter(|e| e.function == leaf && e.index == 0)
            {
                match register {
                    Register::Ebx => e.ebx &= !(1 << bit),
                    Register::Ecx => e.ecx &= !(1 << bit),
                }
            }
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    fn host() -> Vec<CpuidEntry> {
        vec![
            entry(0, 0, 0x756e_6547, 0x6c65_746e),
            entry(
                1,
                0,
                0xff00_0800,
                (1 << 13) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 21),
            ),
            entry(4, 0, 0, 0),
            entry(7, 0, (1 << 5) | (1 << 7), 1 << 16),
            entry(0xb, 0, 0x77, 0x77),
            entry(0xb, 1, 0x77, 0x77),
            entry(0xb, 2, 0x77, 0x77),
            entry(0x4000_0000, 0, 0x4b4d_564b, 0),
        ]
    }

    fn leaf(entries: &[CpuidEntry], function: u32, index: u32) -> CpuidEntry {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_packages_topology() {
        let cpus = for_vcpu(&host(), 3, 4, &[]);
        let l1 = leaf(&cpus, 1, 0);
        assert_eq!(l1.ebx >> 24, 3, "initial APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size and brand kept");
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
        assert_ne!(l1.edx & HTT_BIT, 0);
        assert_eq!(leaf(&cpus, 4, 0).eax >> 26, 3, "cores per package - 1");
        let smt = leaf(&cpus, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        let core = leaf(&cpus, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
        let end = leaf(&cpus, 0xb, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 3));
        // KVM's own leaves pass unchanged.
        assert_eq!(leaf(&cpus, 0x4000_0000, 0).ebx, 0x4b4d_564b);
        // One vCPU: no HTT, a one-core package.
        let one = for_vcpu(&host(), 0, 1, &[]);
        assert_eq!(leaf(&one, 1, 0).edx & HTT_BIT, 0);
        assert_eq!(leaf(&one, 0xb, 1).eax, 0);
        assert_eq!(
            leaf(&for_vcpu(&host(), 0, 5, &[]), 0xb, 1).eax,
            3,
            "5 cores need 3 bits"
        );
    }

    #[test]
    fn hidden_features_and_what_depends_on_them_are_cleared() {
        let cpus = for_vcpu(&host(), 0, 1, &[CpuFeature::Cx16, CpuFeature::Xsave]);
        let ecx = leaf(&cpus, 1, 0).ecx;
        assert_eq!(ecx & (1 << 13), 0, "cx16");
        assert_eq!(ecx & (0b111 << 26), 0, "xsave, osxsave, avx");
        assert_ne!(ecx & (1 << 21), 0, "x2apic stays");
        let cpus = for_vcpu(&host(), 0, 1, &[CpuFeature::Avx2, CpuFeature::La57]);
        assert_eq!(leaf(&cpus, 7, 0).ebx, 1 << 7, "avx2 gone, smep stays");
        assert_eq!(leaf(&cpus, 7, 0).ecx, 0);
        for feature in CpuFeature::ALL {
            assert_eq!(CpuFeature::parse(feature.name()), Some(feature));
        }
        assert_eq!(CpuFeature::parse("sse9"), None);
    }
}
