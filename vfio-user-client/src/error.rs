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

/// `e` and its sources, each after a colon: the reason a connection was
/// closed names the root cause.
pub(crate) fn with_sources(e: &dyn std::error::Error) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}
