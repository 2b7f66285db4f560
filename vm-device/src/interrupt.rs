//! MSI / MSI-X delivery as devices see it: one eventfd per vector that the
//! device (or its server process) writes, routed by the VMM to the message
//! the guest programmed, so interrupts reach the guest without the VMM.

use std::os::fd::RawFd;

/// An MSI message: what a guest writes into an MSI-X table entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("vector {0} does not exist")]
    NoSuchVector(u16),
    #[error("the interrupt controller refused the route: {0}")]
    Route(String),
}

/// A device's block of MSI vectors.
pub trait MsiVectors: Send + Sync {
    fn count(&self) -> u16;
    /// The eventfd that raises `vector` when written.
    fn notifier(&self, vector: u16) -> Option<RawFd>;
    /// Delivers `vector` as `message` from now on, or holds it back (`None`:
    /// masked, or MSI-X disabled). A held-back vector stays pending in its
    /// eventfd and is delivered once routed again.
    fn route(&self, vector: u16, message: Option<MsiMessage>) -> Result<(), InterruptError>;
}
