//! The client side of the vfio-user protocol: version negotiation, DMA_MAP
//! (with the memory's fd), DMA_UNMAP, the DMA_READ / DMA_WRITE requests a
//! server may send while it owes a reply, and what the PCI function model
//! needs (DEVICE_GET_REGION_INFO, REGION_READ / REGION_WRITE,
//! DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS with eventfds, DEVICE_RESET).
//!
//! Ours rather than `vfio_user::Client` (0.1.7) because that client ignores
//! the error flag of a DMA_MAP reply (a refused map looks like success) and
//! reads an error reply to DMA_UNMAP as a full DMA_UNMAP reply, blocking
//! forever; it also has no timeout, and a conversion runs on a vCPU thread.
//!
//! Faults: every request has an absolute deadline. A reply that does not
//! come in time, a malformed or out-of-order reply, EOF, or an error reply
//! to DMA_UNMAP closes the connection at once: a spec-following server then
//! drops every mapping, and no late reply can map anything. A closed client
//! refuses every later request with the reason it was closed.
//!
//! Modules follow the protocol's layers: `wire` (headers, commands,
//! layouts), `transport` (the socket, deadlines, fd passing, closing),
//! `client` (typed requests), `batch` (pipelined DMA_MAP / DMA_UNMAP),
//! `dma` (serving server-initiated DMA).

mod batch;
mod client;
mod dma;
mod error;
#[cfg(test)]
mod test_support;
mod transport;
mod wire;

pub use batch::{BATCH_WINDOW, DmaBatchState, DmaRequest};
pub use client::VfioUserClient;
pub use dma::{DmaMemory, DmaMemoryError};
pub use error::{DmaRequestError, VfioUserError};
pub use wire::{CONFIG_REGION, DEFAULT_MAX_DMA_MAPS, DeviceInfo, MAX_REGION_ACCESS, RegionInfo};
