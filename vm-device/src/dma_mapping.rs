//! DMA mapping of an assigned device's IOMMU domain.

/// Maps guest memory for device DMA. Implemented by VFIO containers and
/// vfio-user clients; `gpa` is resolved to host memory by the implementation.
pub trait ExternalDmaMapping: Send + Sync {
    fn map(&self, iova: u64, gpa: u64, size: u64) -> std::io::Result<()>;
    fn unmap(&self, iova: u64, size: u64) -> std::io::Result<()>;
}
