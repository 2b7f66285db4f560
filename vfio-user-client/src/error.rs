//! What can go wrong talking to a vfio-user server.

#[derive(Debug, thiserror::Error)]
pub enum VfioUserError {
    #[error("cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("socket I/O")]
    Io(#[source] std::io::Error),
    #[error("cannot pass the memory fd")]
    SendFd(#[source] vmm_sys_util::errno::Error),
    #[error("no reply to {command} within {ms} ms")]
    Timeout { command: &'static str, ms: u128 },
    #[error("the server closed the connection")]
    Eof,
    #[error("the server refused {command} (errno {errno})")]
    Refused { command: &'static str, errno: u32 },
    #[error("malformed reply to {0}")]
    Protocol(&'static str),
    #[error("a region access of {0} bytes (1..=4096)")]
    AccessSize(usize),
    #[error("the connection was closed after an earlier failure: {0}")]
    Closed(String),
}

/// A DMA_MAP or DMA_UNMAP that did not happen, and whether the connection
/// survived it.
#[derive(Debug, thiserror::Error)]
pub enum DmaRequestError {
    /// A clean error reply, or a request that was never sent: the
    /// connection stays and nothing changed.
    #[error(transparent)]
    Refused(VfioUserError),
    /// The connection is closed, by this failure or an earlier one; the
    /// message is the reason it was closed.
    #[error("{reason}")]
    Closed {
        reason: String,
        #[source]
        source: VfioUserError,
    },
}

impl DmaRequestError {
    /// What went wrong on the wire.
    pub fn cause(&self) -> &VfioUserError {
        match self {
            DmaRequestError::Refused(e) | DmaRequestError::Closed { source: e, .. } => e,
        }
    }
}

/// `e` and its sources, each after a colon: the reason a connection was
/// closed names the root cause.
pub(crate) fn with_sources(e: &dyn std::error::Error) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
