//! The vfio-user adapter: a `vfio_user_client::VfioUserClient` as the
//! device's DMA mapping (`vm_device::ExternalDmaMapping`) and as the PCI
//! function model's device (`pci::VfioOps`), plus the thread that answers
//! a message-DMA server's requests between ours.

use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use pci::{VfioOps, VfioOpsError};
use vfio_user_client::{DmaRequest, DmaRequestError, VfioUserClient, VfioUserError};
use vm_device::{CutOff, DmaBatch, DmaError, DmaOp, ExternalDmaMapping};

use super::{DeviceError, GuestRam, bar_maps};
use crate::config::DmaMode;

/// What the adapter itself refuses.
#[derive(Debug, thiserror::Error)]
pub enum VfioUserDmaError {
    #[error("message DMA needs IOVA = GPA, got {iova:#x} for {gpa:#x}")]
    IovaNotGpa { iova: u64, gpa: u64 },
}

/// A vfio-user server's DMA mapping. In `fd` mode the guest RAM's fd and
/// offset go with every map and the server mmaps them; in `messages` mode
/// maps carry no fd and the server's DMA_READ / DMA_WRITE are served
/// inside its current mappings only.
pub struct VfioUserDma {
    client: Arc<Mutex<VfioUserClient>>,
    mode: DmaMode,
    /// `messages` mode: answers the server's DMA requests that arrive
    /// while no request of ours is in flight.
    pub(super) server_requests: Option<JoinHandle<()>>,
    ram: Arc<GuestRam>,
    max_dma_maps: u64,
    /// Host mappings of the server's mmappable BAR areas.
    region_maps: bar_maps::BarMaps,
}

impl VfioUserDma {
    pub fn connect(
        socket: &std::path::Path,
        ram: Arc<GuestRam>,
        timeout: Duration,
        mode: DmaMode,
    ) -> Result<Self, DeviceError> {
        if !ram.all_file_backed() {
            return Err(DeviceError::NoFileBacking);
        }
        let client = VfioUserClient::connect(socket, timeout, Some(ram.clone()))
            .map_err(DeviceError::VfioUser)?;
        let max_dma_maps = client.max_dma_maps();
        let client = Arc::new(Mutex::new(client));
        let server_requests = match mode {
            DmaMode::Fd => None,
            DmaMode::Messages => Some(serve_server_requests(&client)?),
        };
        Ok(VfioUserDma {
            max_dma_maps,
            client,
            server_requests,
            mode,
            ram,
            region_maps: bar_maps::BarMaps::default(),
        })
    }

    /// Most mappings the server accepts at once (its VERSION reply).
    pub(super) fn max_dma_maps(&self) -> u64 {
        self.max_dma_maps
    }

    /// Whether the server is a PCI function (`VfioUserClient::is_pci_function`).
    pub(super) fn offers_pci_function(&self) -> Result<bool, DeviceError> {
        self.client()
            .is_pci_function()
            .map_err(DeviceError::VfioUser)
    }

    pub(super) fn client(&self) -> MutexGuard<'_, VfioUserClient> {
        lock_client(&self.client)
    }
}

fn lock_client(client: &Mutex<VfioUserClient>) -> MutexGuard<'_, VfioUserClient> {
    // The client's state is updated before any call that could panic.
    client.lock().unwrap_or_else(|e| e.into_inner())
}

/// A server doing message DMA from its own threads sends DMA_READ /
/// DMA_WRITE whenever it likes, not only inside one of our requests: this
/// thread waits on the socket without holding the client and answers what
/// arrives between requests. It ends when the connection closes.
fn serve_server_requests(
    client: &Arc<Mutex<VfioUserClient>>,
) -> Result<JoinHandle<()>, DeviceError> {
    let watch = lock_client(client).watch_handle().ok_or_else(|| {
        DeviceError::VfioUser(VfioUserError::Closed("closed before it was watched".into()))
    })?;
    let client = client.clone();
    std::thread::Builder::new()
        .name("vfio-user-dma".into())
        .spawn(move || {
            use std::os::fd::AsRawFd;
            loop {
                let mut waiting = libc::pollfd {
                    fd: watch.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd for a socket this thread owns a handle on.
                let ready = unsafe { libc::poll(&mut waiting, 1, -1) };
                if ready < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                {
                    break;
                }
                // A request of ours may have taken what woke us; the
                // client checks again under its lock. A closed client
                // (hang-up, removal) ends the thread.
                if ready > 0 && lock_client(&client).serve_pending().is_err() {
                    break;
                }
            }
        })
        .map_err(|e| DeviceError::VfioUser(VfioUserError::Io(e)))
}

impl Drop for VfioUserDma {
    fn drop(&mut self) {
        // Closing wakes the server-request thread, which then sees it.
        self.client().close("the device was let go");
        if let Some(thread) = self.server_requests.take() {
            let _ = thread.join();
        }
    }
}

/// Region and interrupt access for the PCI function model, over the same
/// connection the DMA mappings use.
impl VfioOps for VfioUserDma {
    fn region_size(&self, index: u32) -> Result<u64, VfioOpsError> {
        self.client().region_size(index).map_err(VfioOpsError::new)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioOpsError> {
        self.client()
            .region_read(index, offset, data)
            .map_err(VfioOpsError::new)
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioOpsError> {
        self.client()
            .region_write(index, offset, data)
            .map_err(VfioOpsError::new)
    }

    fn irq_count(&self, index: u32) -> Result<u32, VfioOpsError> {
        self.client().irq_count(index).map_err(VfioOpsError::new)
    }

    fn set_irq_eventfds(&self, index: u32, fds: &[std::os::fd::RawFd]) -> Result<(), VfioOpsError> {
        self.client()
            .set_irq_eventfds(index, fds)
            .map_err(VfioOpsError::new)
    }

    fn reset(&self) -> Result<(), VfioOpsError> {
        self.client().reset().map_err(VfioOpsError::new)
    }

    fn map_region_areas(&self, index: u32) -> Result<Vec<pci::DirectArea>, VfioOpsError> {
        use std::os::fd::AsRawFd;
        let info = self
            .client()
            .region_info(index)
            .map_err(VfioOpsError::new)?;
        match info.fd {
            Some(fd) => self
                .region_maps
                .map(fd.as_raw_fd(), info.offset, &info.mmap_areas),
            None => Ok(Vec::new()),
        }
    }
}

/// A failed DMA request as the listener takes it: a connection the client
/// closed (anything but a clean error reply to DMA_MAP) is a broken
/// device, with the client's reason as the device's.
fn dma_error(e: DmaRequestError) -> DmaError {
    match e {
        DmaRequestError::Refused(e) => DmaError::refused(e),
        closed @ DmaRequestError::Closed { .. } => DmaError::broken(closed),
    }
}

impl VfioUserDma {
    /// `op` as the client's request: a map names the guest memory's fd (or
    /// none, for DMA by messages, where the server's DMA_READ / DMA_WRITE
    /// name IOVAs the client takes as GPAs).
    fn request(&self, op: DmaOp) -> Result<DmaRequest, DmaError> {
        Ok(match op {
            DmaOp::Map { iova, gpa, size } => DmaRequest::Map {
                iova,
                size,
                backing: match self.mode {
                    DmaMode::Fd => {
                        Some(self.ram.file_offset(gpa, size).map_err(DmaError::refused)?)
                    }
                    DmaMode::Messages if iova == gpa => None,
                    DmaMode::Messages => {
                        return Err(DmaError::refused(VfioUserDmaError::IovaNotGpa {
                            iova,
                            gpa,
                        }));
                    }
                },
            },
            DmaOp::Unmap { iova, size } => DmaRequest::Unmap { iova, size },
        })
    }
}

impl ExternalDmaMapping for VfioUserDma {
    fn map(&self, iova: u64, gpa: u64, size: u64) -> Result<(), DmaError> {
        self.start_batch(&[DmaOp::Map { iova, gpa, size }])
            .finish()
            .pop()
            .expect("one result per request")
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<(), DmaError> {
        self.client().dma_unmap(iova, size).map_err(dma_error)
    }

    /// Every request in flight on the connection at once (up to the
    /// client's window); the client is held until the batch is finished,
    /// so no other request interleaves with it.
    fn start_batch(&self, ops: &[DmaOp]) -> DmaBatch<'_> {
        // A request that cannot be made (no fd for the range) is refused
        // here and not sent; the rest go out.
        let prepared: Vec<Result<DmaRequest, DmaError>> =
            ops.iter().map(|&op| self.request(op)).collect();
        let requests = prepared
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        let mut client = self.client();
        let batch = client.start_batch(requests);
        DmaBatch::InFlight(Box::new(move || {
            let mut answered = client.finish_batch(batch).into_iter();
            drop(client);
            prepared
                .into_iter()
                .map(|prepared| {
                    prepared?;
                    // The client answers every request it was given.
                    answered.next().map_or_else(
                        || Err(DmaError::broken("no answer from the connection")),
                        |answer| answer.map_err(dma_error),
                    )
                })
                .collect()
        }))
    }

    /// Closes the connection: the server must drop every mapping then, and
    /// no late reply can map anything.
    fn cut_off(&self, reason: &str) -> CutOff {
        self.client().close(reason);
        CutOff::MappingsDropped
    }
}
