//! Pipelined DMA_MAP / DMA_UNMAP: many requests in flight on one
//! connection, replies matched to requests by message id (the protocol
//! allows any order), so a server works through a batch without a round
//! trip per request. What holds for one request holds for each request of a
//! batch: a request must be answered within the timeout of being sent, a
//! refused map leaves the connection open, and anything else (a refused
//! unmap, a timeout, a reply out of step, a broken socket) closes it at
//! once, so no late reply can map anything.

use std::os::fd::RawFd;
use std::time::Instant;

use crate::client::VfioUserClient;
use crate::error::{DmaRequestError, VfioUserError, with_sources};
use crate::wire::*;

/// Requests of one batch in flight at once: enough to keep a server busy,
/// few enough that neither side's socket buffer fills (a reply is 16 bytes,
/// a request at most 48).
pub const BATCH_WINDOW: usize = 64;

/// One request of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaRequest {
    /// Maps `size` bytes at `iova`, read-write: of `fd` at `offset`, or
    /// with no fd (`None`) for DMA by messages.
    Map {
        iova: u64,
        size: u64,
        backing: Option<(RawFd, u64)>,
    },
    /// Unmaps exactly an earlier mapping.
    Unmap { iova: u64, size: u64 },
}

impl DmaRequest {
    fn command(&self) -> u16 {
        match self {
            DmaRequest::Map { .. } => CMD_DMA_MAP,
            DmaRequest::Unmap { .. } => CMD_DMA_UNMAP,
        }
    }
}

/// A request sent and not yet answered.
struct Sent {
    id: u16,
    index: usize,
    deadline: Instant,
}

/// A batch in flight: what was sent, what is still to send, and what has
/// been answered.
pub struct DmaBatchState {
    requests: Vec<DmaRequest>,
    next: usize,
    in_flight: Vec<Sent>,
    results: Vec<Option<Result<(), DmaRequestError>>>,
}

impl DmaBatchState {
    fn done(&self) -> bool {
        self.next == self.requests.len() && self.in_flight.is_empty()
    }
}

impl VfioUserClient {
    /// Sends the first requests of `requests` (up to `BATCH_WINDOW`) and
    /// returns the batch for `finish_batch`; nothing is waited for.
    pub fn start_batch(&mut self, requests: Vec<DmaRequest>) -> DmaBatchState {
        let mut batch = DmaBatchState {
            results: requests.iter().map(|_| None).collect(),
            requests,
            next: 0,
            in_flight: Vec::with_capacity(BATCH_WINDOW),
        };
        self.fill_window(&mut batch);
        batch
    }

    /// Waits for every reply of `batch`, sending the rest as replies free
    /// the window, and answering the server's own requests meanwhile.
    /// Returns one result per request, in order.
    pub fn finish_batch(&mut self, mut batch: DmaBatchState) -> Vec<Result<(), DmaRequestError>> {
        // The first unanswered request takes the error that closed the
        // connection as its cause (requests go out in order, so it is the
        // oldest in flight); the others name the reason.
        let mut cause: Option<VfioUserError> = None;
        while !batch.done() && self.transport.check_open().is_ok() {
            if let Err(e) = self.receive_one(&mut batch) {
                let waiting = batch.results.iter().position(Option::is_none);
                let name =
                    waiting.map_or("DMA request", |i| command_name(batch.requests[i].command()));
                let reason = match e {
                    VfioUserError::Timeout { .. } | VfioUserError::Protocol(_) => with_sources(&e),
                    _ => format!("{name} failed: {}", with_sources(&e)),
                };
                self.close(&reason);
                cause = Some(e);
                break;
            }
            self.fill_window(&mut batch);
        }
        let reason = self.closed_reason().unwrap_or("closed").to_string();
        batch
            .results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    Err(DmaRequestError::Closed {
                        reason: reason.clone(),
                        source: cause
                            .take()
                            .unwrap_or_else(|| VfioUserError::Closed(reason.clone())),
                    })
                })
            })
            .collect()
    }

    /// Sends requests until the window is full or none are left; a failed
    /// send closes the connection.
    fn fill_window(&mut self, batch: &mut DmaBatchState) {
        while batch.in_flight.len() < BATCH_WINDOW && batch.next < batch.requests.len() {
            if self.transport.check_open().is_err() {
                return;
            }
            let index = batch.next;
            let request = batch.requests[index];
            let id = self.transport.next_id();
            if let Err(e) = self.send_dma(id, &request) {
                let reason = format!(
                    "{} failed: {}",
                    command_name(request.command()),
                    with_sources(&e)
                );
                self.close(&reason);
                batch.results[index] = Some(Err(DmaRequestError::Closed { reason, source: e }));
                return;
            }
            batch.next += 1;
            batch.in_flight.push(Sent {
                id,
                index,
                deadline: self.transport.deadline(),
            });
        }
    }

    fn send_dma(&mut self, id: u16, request: &DmaRequest) -> Result<(), VfioUserError> {
        let mut payload = [0u8; 32];
        let (len, fds) = match *request {
            DmaRequest::Map {
                iova,
                size,
                ref backing,
            } => {
                let (fds, offset) = match backing {
                    Some((fd, offset)) => (std::slice::from_ref(fd), *offset),
                    None => (&[][..], 0),
                };
                payload[0..4].copy_from_slice(&32u32.to_le_bytes()); // argsz
                payload[4..8].copy_from_slice(&DMA_READ_WRITE.to_le_bytes());
                payload[8..16].copy_from_slice(&offset.to_le_bytes());
                payload[16..24].copy_from_slice(&iova.to_le_bytes());
                payload[24..32].copy_from_slice(&size.to_le_bytes());
                (32, fds)
            }
            DmaRequest::Unmap { iova, size } => {
                payload[0..4].copy_from_slice(&24u32.to_le_bytes()); // argsz
                payload[8..16].copy_from_slice(&iova.to_le_bytes());
                payload[16..24].copy_from_slice(&size.to_le_bytes());
                (24, &[][..])
            }
        };
        let header = Header {
            id,
            command: request.command(),
            size: u32::try_from(HEADER_SIZE + len).expect("a DMA request is at most 32 bytes"),
            flags: 0,
            error: 0,
        };
        let mut message = Vec::with_capacity(HEADER_SIZE + len);
        message.extend_from_slice(&header.encode());
        message.extend_from_slice(&payload[..len]);
        self.transport.send(&message, fds)
    }

    /// Reads one message before the oldest request's deadline: a reply
    /// settles its request, a server request is answered. An error is one
    /// the connection cannot survive.
    fn receive_one(&mut self, batch: &mut DmaBatchState) -> Result<(), VfioUserError> {
        const WHAT: &str = "a pipelined DMA request";
        let deadline = batch
            .in_flight
            .iter()
            .map(|sent| sent.deadline)
            .min()
            .unwrap_or_else(|| self.transport.deadline());
        // A timeout names the request that waited longest.
        let oldest = batch
            .in_flight
            .iter()
            .min_by_key(|sent| sent.deadline)
            .map_or(WHAT, |sent| {
                command_name(batch.requests[sent.index].command())
            });
        let incoming = self.transport.read_header(deadline, oldest)?;
        drop(self.transport.take_received_fd());
        let body = self.transport.read_body(&incoming, deadline, oldest)?;
        if incoming.flags & FLAG_TYPE_MASK == FLAG_COMMAND {
            return self.serve(incoming, &body);
        }
        let at = batch
            .in_flight
            .iter()
            .position(|sent| sent.id == incoming.id)
            .ok_or(VfioUserError::Protocol(oldest))?;
        let index = batch.in_flight[at].index;
        let request = batch.requests[index];
        let name = command_name(request.command());
        if incoming.command != request.command() || incoming.flags & FLAG_TYPE_MASK != FLAG_REPLY {
            return Err(VfioUserError::Protocol(name));
        }
        batch.in_flight.swap_remove(at);
        if incoming.flags & FLAG_ERROR != 0 {
            let refused = VfioUserError::Refused {
                command: name,
                errno: incoming.error,
            };
            if let DmaRequest::Unmap { iova, size } = request {
                // The range could stay reachable: the connection goes, and
                // the requests after this one with it.
                let reason = format!("DMA_UNMAP of {iova:#x}+{size:#x} failed: {refused}");
                self.close(&reason);
                batch.results[index] = Some(Err(DmaRequestError::Closed {
                    reason,
                    source: refused,
                }));
            } else {
                batch.results[index] = Some(Err(DmaRequestError::Refused(refused)));
            }
            return Ok(());
        }
        match request {
            DmaRequest::Map { iova, size, .. } => {
                self.mapped.insert(iova, size);
            }
            DmaRequest::Unmap { iova, .. } => {
                self.mapped.remove(&iova);
            }
        }
        batch.results[index] = Some(Ok(()));
        Ok(())
    }
}

#[cfg(test)]
mod tests;
