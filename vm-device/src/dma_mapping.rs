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

/// One request of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaOp {
    Map {
        iova: u64,
        gpa: u64,
        size: u64,
    },
    /// Unmaps exactly one earlier mapping.
    Unmap {
        iova: u64,
        size: u64,
    },
}

/// A batch of requests, settled or in flight at the device.
pub enum DmaBatch<'a> {
    Done(Vec<Result<(), DmaError>>),
    /// `finish` waits for the device's answers.
    InFlight(Box<dyn FnOnce() -> Vec<Result<(), DmaError>> + 'a>),
}

impl DmaBatch<'_> {
    /// One result per request, in the order they were given.
    pub fn finish(self) -> Vec<Result<(), DmaError>> {
        match self {
            DmaBatch::Done(results) => results,
            DmaBatch::InFlight(wait) => wait(),
        }
    }
}

/// Maps guest memory for device DMA. Implemented by VFIO containers and
/// vfio-user clients; `gpa` is resolved to host memory by the implementation.
pub trait ExternalDmaMapping: Send + Sync {
    fn map(&self, iova: u64, gpa: u64, size: u64) -> Result<(), DmaError>;
    fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaError>;

    /// Starts every one of `ops`, in order, and returns what finishing
    /// waits for. A device may have them all in flight at once (vfio-user
    /// matches replies to requests by message id); after it breaks, every
    /// request not yet answered reports `Broken`. The default runs them one
    /// by one in the call.
    fn start_batch(&self, ops: &[DmaOp]) -> DmaBatch<'_> {
        DmaBatch::Done(ops.iter().map(|&op| self.apply(op)).collect())
    }

    /// Runs one request now.
    fn apply(&self, op: DmaOp) -> Result<(), DmaError> {
        match op {
            DmaOp::Map { iova, gpa, size } => self.map(iova, gpa, size),
            DmaOp::Unmap { iova, size } => self.unmap(iova, size),
        }
    }

    /// Cuts the device off from guest memory for good, at once (a live
    /// connection is closed, so no late reply can map anything). Called
    /// once, when the device is failed.
    fn cut_off(&self, _reason: &str) -> CutOff {
        CutOff::MappingsLeft
    }
}
