//! Intel TDX launch: the TDVF metadata of an OVMF image, MRTD, the TD
//! HOB, and the launch sequence against KVM or a simulated TDX module.
//! One job per file.

pub mod tdvf;
