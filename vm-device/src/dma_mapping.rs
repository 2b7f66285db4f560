//! DMA mapping of an assigned device's IOMMU domain.

/// Any error behind a DMA refusal or breakage, with its own sources.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a DMA map or unmap did not happen, in the two kinds the listener
/// acts on. Both show their cause's message unchanged.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// A clean error reply from the device or the kernel: nothing changed
    /// and the device stays live (a map refuses the conversion).
    #[error(transparent)]
    Refused(BoxError),
    /// The device or its connection is dead: it must be cut off. The
    /// message is the reason shown for the failed device.
    #[error(transparent)]
    Broken(BoxError),
}

impl DmaError {
    pub fn refused(cause: impl Into<BoxError>) -> Self {
        DmaError::Refused(cause.into())
    }

    pub fn broken(cause: impl Into<BoxError>) -> Self {
        DmaError::Broken(cause.into())
    }

    pub fn is_broken(&self) -> bool {
        matches!(self, DmaError::Broken(_))
    }

    /// The errno of the first `std::io::Error` among the causes, if any.
    pub fn raw_os_error(&self) -> Option<i32> {
        let (DmaError::Refused(cause) | DmaError::Broken(cause)) = self;
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(cause.as_ref());
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return io.raw_os_error();
            }
            next = e.source();
        }
        None
    }
}

/// What cutting a device off left for the caller to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutOff {
    /// Every mapping went with it (a closed vfio-user connection: the
    /// server must drop them on disconnect).
    MappingsDropped,
    /// The mappings stay until the caller unmaps them (a VFIO container).
    MappingsLeft,
}

/// Maps guest memory for device DMA. Implemented by VFIO containers and
/// vfio-user clients; `gpa` is resolved to host memory by the implementation.
pub trait ExternalDmaMapping: Send + Sync {
    fn map(&self, iova: u64, gpa: u64, size: u64) -> Result<(), DmaError>;
    fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaError>;

    /// Cuts the device off from guest memory for good, at once (a live
    /// connection is closed, so no late reply can map anything). Called
    /// once, when the device is failed.
    fn cut_off(&self, _reason: &str) -> CutOff {
        CutOff::MappingsLeft
    }
}
