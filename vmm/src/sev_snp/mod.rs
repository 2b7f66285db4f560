//! AMD SEV-SNP launch: the firmware's GUIDed table, the launch digest, the
//! initial vCPU state, and the launch sequence against KVM or a simulated
//! security processor. One job per file.

pub mod ovmf;
