//! AMD SEV-SNP launch: the firmware's GUIDed table, the launch digest, the
//! initial vCPU state, and the launch sequence against KVM or a simulated
//! security processor. One job per file.

pub mod cpuid_page;
pub mod digest;
pub mod launch;
pub mod ovmf;
pub mod simulated_psp;
pub mod vmsa;

pub use launch::{LaunchError, Measurement, SnpParams, launch, measure};
