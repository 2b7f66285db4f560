//! DMA mapping of an assigned device's IOMMU domain.

/// Maps guest memory for device DMA. Implemented by VFIO containers and
/// vfio-user clients; `gpa` is resolved to host memory by the implementation.
pub trait ExternalDmaMapping: Send + Sync {
    fn map(&self, iova: u64, gpa: u64, size: u64) -> std::io::Result<()>;
    fn unmap(&self, iova: u64, size: u64) -> std::io::Result<()>;

    /// Why the device can no longer follow conversions (its connection
    /// failed), or `None` while it can. Asked after every failed call: a
    /// failure that leaves the device unusable fails the device rather than
    /// the guest's conversion.
    fn failure(&self) -> Option<String> {
        None
    }

    /// Cuts the device off from guest memory for good. Returns true when
    /// that alone dropped every mapping (a closed vfio-user connection: the
    /// server must drop them on disconnect), false when the caller still has
    /// to unmap what it holds.
    fn sever(&self, _reason: &str) -> bool {
        false
    }
}
