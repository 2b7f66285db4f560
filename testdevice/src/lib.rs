// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! A vfio-user PCI device for tests, built on `vfio_user::Server`: a
//! function with test ids whose BAR0 is a DMA engine (see `pci`), and a
//! DMA target the tests can inspect. A DMA_MAP with an fd is mmapped from
//! it, so the device really sees guest memory; one without an fd is reached
//! by DMA_READ / DMA_WRITE messages to the client (`message_dma`). An unmap
//! must match a map exactly (as VFIO and libvfio-user demand). A control
//! socket answers one line per command:
//!
//! - `maps`: the current mappings as JSON `[[iova, size], ...]`
//! - `read IOVA LEN`: LEN bytes at IOVA, in hex, through the mapping
//! - `write IOVA BYTE`: stores BYTE at IOVA (a DMA write into the guest)
//! - `refuse N`: refuse the next N DMA_MAPs
//! - `fd-maps`: how many current mappings came with an fd (0 in the VMM's
//!   `dma=messages` mode, where every access is a DMA_READ / DMA_WRITE)
//! - `raw-read IOVA LEN`: a DMA_READ sent whatever the device's mappings
//!   say, as a lying device would (the VMM must refuse it outside them)
//! - `log`: every DMA_MAP / DMA_UNMAP received, as JSON strings
//! - `engine`: the DMA engine's counters as JSON (faults, completions,
//!   stream passes, interrupts sent)
//! - `stream IOVA LEN BYTE` / `stop`: start / stop streaming fills without
//!   the guest (what BAR0's commands 3 and 4 do)
//! - `scratch OFFSET`: the byte at OFFSET of BAR0's scratch page, as the
//!   device sees it

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

mod control;
pub mod message_dma;
pub mod pci;

pub use control::{ask, control};

struct Mapping {
    size: u64,
    /// Where we mmapped it from the client's fd; `None` for a mapping that
    /// came without one, reached by DMA messages.
    host: Option<usize>,
}

/// A piece of a DMA transfer inside one mapping.
#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// `len` bytes at a host address of ours.
    Host(usize, usize),
    /// `len` bytes at an IOVA, through DMA_READ / DMA_WRITE.
    Message(u64, usize),
}

#[derive(Default)]
pub struct DeviceState {
    maps: BTreeMap<u64, Mapping>,
    log: Vec<String>,
    refuse_maps: u64,
    pub engine: pci::Engine,
    pub scratch: Option<pci::Scratch>,
    /// The current client's connection for DMA messages.
    port: Option<Arc<message_dma::MessagePort>>,
}

impl DeviceState {
    /// The pieces covering `iova..iova+len` through one or more adjacent
    /// mappings, or an error if any byte is not mapped.
    fn dma_chunks(&self, iova: u64, len: u64) -> Result<Vec<Chunk>, String> {
        let end = iova
            .checked_add(len)
            .ok_or_else(|| format!("{iova:#x}+{len:#x} overflows"))?;
        let mut chunks = Vec::new();
        let mut at = iova;
        while at < end {
            let (start, m) = self
                .maps
                .range(..=at)
                .next_back()
                .filter(|(start, m)| at < *start + m.size)
                .ok_or_else(|| format!("{at:#x} is not mapped"))?;
            let n = (start + m.size).min(end) - at;
            chunks.push(match m.host {
                Some(host) => Chunk::Host(host + arch::usize_from(at - start), arch::usize_from(n)),
                None => Chunk::Message(at, arch::usize_from(n)),
            });
            at += n;
        }
        Ok(chunks)
    }

    fn port(&self) -> Result<&message_dma::MessagePort, String> {
        self.port
            .as_deref()
            .ok_or_else(|| "no client to send DMA messages to".into())
    }

    /// Writes `data` at `iova` by DMA: all of it inside the mappings, or
    /// nothing.
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> Result<(), String> {
        let mut done = 0;
        for chunk in self.dma_chunks(iova, data.len() as u64)? {
            match chunk {
                Chunk::Host(host, n) => {
                    // SAFETY: inside a live mapping of ours (checked by
                    // dma_chunks, kept by the state lock the caller holds);
                    // the guest may touch the same memory, which for DMA is
                    // expected.
                    unsafe {
                        std::ptr::copy_nonoverlapping(data[done..].as_ptr(), host as *mut u8, n)
                    };
                    done += n;
                }
                Chunk::Message(at, n) => {
                    self.port()?.write(at, &data[done..done + n])?;
                    done += n;
                }
            }
        }
        Ok(())
    }

    /// Fills `iova..iova+len` with `value` by DMA: all of it inside the
    /// mappings, or nothing.
    pub fn dma_fill(&self, iova: u64, len: u64, value: u8) -> Result<(), String> {
        for chunk in self.dma_chunks(iova, len)? {
            match chunk {
                // SAFETY: as for dma_write.
                Chunk::Host(host, n) => unsafe { std::ptr::write_bytes(host as *mut u8, value, n) },
                Chunk::Message(at, n) => {
                    let piece = vec![value; n.min(message_dma::MAX_TRANSFER)];
                    let mut done = 0;
                    while done < n {
                        let step = (n - done).min(piece.len());
                        self.port()?.write(at + done as u64, &piece[..step])?;
                        done += step;
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether every byte of `iova..iova+len` is `value`, read by DMA.
    pub fn dma_verify(&self, iova: u64, len: u64, value: u8) -> Result<bool, String> {
        for chunk in self.dma_chunks(iova, len)? {
            let same = match chunk {
                // SAFETY: as for dma_read.
                Chunk::Host(host, n) => (0..n)
                    .all(|i| unsafe { std::ptr::read_volatile((host + i) as *const u8) } == value),
                Chunk::Message(at, n) => {
                    let mut piece = vec![0u8; n.min(message_dma::MAX_TRANSFER)];
                    let mut done = 0;
                    let mut same = true;
                    while same && done < n {
                        let step = (n - done).min(piece.len());
                        self.port()?.read(at + done as u64, &mut piece[..step])?;
                        same = piece[..step].iter().all(|&b| b == value);
                        done += step;
                    }
                    same
                }
            };
            if !same {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Reads `len` bytes at `iova` by DMA.
    pub fn dma_read(&self, iova: u64, len: u64) -> Result<Vec<u8>, String> {
        let mut bytes = Vec::with_capacity(arch::usize_from(len));
        for chunk in self.dma_chunks(iova, len)? {
            match chunk {
                Chunk::Host(host, n) => bytes.extend(
                    // SAFETY: as for dma_write; volatile because the guest
                    // may write concurrently.
                    (0..n).map(|i| unsafe { std::ptr::read_volatile((host + i) as *const u8) }),
                ),
                Chunk::Message(at, n) => {
                    let start = bytes.len();
                    bytes.resize(start + n, 0);
                    self.port()?.read(at, &mut bytes[start..])?;
                }
            }
        }
        Ok(bytes)
    }

    /// What a client that goes away leaves: no mappings, no interrupts, no
    /// streaming.
    fn disconnect(&mut self) {
        pci::stop_stream(self);
        self.engine.msix.clear();
        self.unmap_all();
    }

    fn unmap_all(&mut self) {
        for (_, m) in std::mem::take(&mut self.maps) {
            m.release();
        }
    }
}

impl Mapping {
    fn release(self) {
        if let Some(host) = self.host {
            // SAFETY: `host` came from our own mmap of exactly `size` bytes.
            unsafe { libc::munmap(host as *mut libc::c_void, arch::usize_from(self.size)) };
        }
    }
}

pub type SharedState = Arc<Mutex<DeviceState>>;

/// Maps `size` bytes of `fd` from `offset`, shared and read-write, at an
/// address the kernel picks; returns that address. The caller owns the
/// mapping (and unmaps it).
pub(crate) fn map_shared(fd: &impl AsRawFd, offset: u64, size: u64) -> std::io::Result<usize> {
    // SAFETY: a fresh shared mapping of `fd`; nothing else lives at the
    // address the kernel picks.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            arch::usize_from(size),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            offset.cast_signed(),
        )
    };
    if host == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(host as usize)
}

pub(crate) fn lock(state: &SharedState) -> MutexGuard<'_, DeviceState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn invalid(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, why)
}

struct Backend(SharedState);

const REGION_BAR0: u32 = 0;
const REGION_CONFIG: u32 = 7;
const IRQ_MSIX: u32 = 2;
const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let mut s = lock(&self.0);
        match region {
            REGION_CONFIG if offset + data.len() as u64 <= pci::CONFIG_SIZE => {
                pci::config_read(&s, offset, data)
            }
            REGION_BAR0 if offset + data.len() as u64 <= pci::BAR0_SIZE => {
                pci::bar0_read(&mut s, offset, data)
            }
            _ => return Err(invalid(format!("no region {region} at {offset:#x}"))),
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        match region {
            REGION_CONFIG if offset + data.len() as u64 <= pci::CONFIG_SIZE => {
                pci::config_write(&mut lock(&self.0), offset, data)
            }
            REGION_BAR0 if offset + data.len() as u64 <= pci::BAR0_SIZE => {
                pci::bar0_write(&self.0, offset, data)
            }
            _ => return Err(invalid(format!("no region {region} at {offset:#x}"))),
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        offset: u64,
        iova: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let mut s = lock(&self.0);
        s.log
            .push(format!("map {iova:#x}+{size:#x} offset {offset:#x}"));
        if s.refuse_maps > 0 {
            s.refuse_maps -= 1;
            return Err(invalid("refused by request".into()));
        }
        let overlaps = s
            .maps
            .range(..iova + size)
            .next_back()
            .is_some_and(|(&a, m)| a + m.size > iova);
        if size == 0 || overlaps {
            return Err(invalid(format!("{iova:#x}+{size:#x} overlaps or is empty")));
        }
        // Without an fd the client serves our DMA messages for the range.
        let Some(fd) = fd else {
            s.maps.insert(iova, Mapping { size, host: None });
            return Ok(());
        };
        let host = map_shared(&fd, offset, size)?;
        s.maps.insert(
            iova,
            Mapping {
                size,
                host: Some(host),
            },
        );
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, iova: u64, size: u64) -> std::io::Result<()> {
        let mut s = lock(&self.0);
        s.log.push(format!("unmap {iova:#x}+{size:#x}"));
        match s.maps.get(&iova) {
            Some(m) if m.size == size => {
                s.maps.remove(&iova).expect("present").release();
                Ok(())
            }
            _ => Err(invalid(format!("{iova:#x}+{size:#x} is not one mapping"))),
        }
    }

    fn reset(&mut self) -> std::io::Result<()> {
        let mut s = lock(&self.0);
        pci::stop_stream(&mut s);
        s.engine.msix.clear();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> std::io::Result<()> {
        if index != IRQ_MSIX {
            return Err(invalid(format!("irq index {index} has no interrupts")));
        }
        if start + count > pci::MSIX_VECTORS {
            return Err(invalid(format!("vectors {start}+{count} do not exist")));
        }
        let mut s = lock(&self.0);
        if flags & IRQ_SET_DATA_EVENTFD == 0 {
            s.engine.msix.clear();
            return Ok(());
        }
        if fds.len() != count as usize {
            return Err(invalid(format!("{count} vectors but {} fds", fds.len())));
        }
        s.engine
            .msix
            .resize_with(pci::MSIX_VECTORS as usize, || None);
        for (i, fd) in fds.into_iter().enumerate() {
            s.engine.msix[start as usize + i] = Some(fd);
        }
        Ok(())
    }
}

/// Regions as DEVICE_GET_REGION_INFO reports them: BAR0 and configuration
/// space, read-write; BAR0's scratch page is also mmappable from
/// `scratch_fd` when given (everything else is message-based only).
fn regions(scratch_fd: Option<std::os::fd::RawFd>) -> Vec<ServerRegion> {
    use vfio_bindings::bindings::vfio::{vfio_region_info, vfio_region_sparse_mmap_area};
    const READ_WRITE: u32 = 0b11;
    const MMAP: u32 = 0b100;
    (0..9u32)
        .map(|index| {
            let size = match index {
                REGION_BAR0 => pci::BAR0_SIZE,
                REGION_CONFIG => pci::CONFIG_SIZE,
                _ => 0,
            };
            let mmap_fd = scratch_fd.filter(|_| index == REGION_BAR0);
            let mut flags = if size > 0 { READ_WRITE } else { 0 };
            let mut sparse_areas = Vec::new();
            if mmap_fd.is_some() {
                flags |= MMAP;
                sparse_areas.push(vfio_user::SparseArea {
                    area: vfio_region_sparse_mmap_area {
                        offset: pci::SCRATCH_OFFSET,
                        size: pci::SCRATCH_SIZE,
                    },
                });
            }
            ServerRegion {
                region_info: vfio_region_info {
                    argsz: 32,
                    flags,
                    index,
                    cap_offset: 0,
                    size,
                    offset: 0,
                },
                sparse_areas,
                mmap_fd,
            }
        })
        .collect()
}

fn irqs() -> Vec<IrqInfo> {
    const EVENTFD: u32 = 1;
    (0..5u32)
        .map(|index| IrqInfo {
            index,
            flags: EVENTFD,
            count: if index == IRQ_MSIX {
                pci::MSIX_VECTORS
            } else {
                0
            },
        })
        .collect()
}

/// Serves vfio-user clients one after another; a client that goes away
/// loses its mappings, as with a real device. `mmap`: offer BAR0's scratch
/// page for mapping (otherwise every BAR access is a message).
pub fn serve(
    socket: &Path,
    state: SharedState,
    mmap: bool,
) -> Result<std::thread::JoinHandle<()>, String> {
    let scratch = pci::Scratch::new().map_err(|e| format!("cannot create BAR0 memory: {e}"))?;
    let scratch_fd = mmap.then(|| scratch.file.as_raw_fd());
    lock(&state).scratch = Some(scratch);
    run_sessions(socket, irqs(), regions(scratch_fd), state)
}

/// As `serve`, for a device with no regions: a DMA target only, not a PCI
/// function (no configuration space to find it by).
pub fn serve_dma_target(
    socket: &Path,
    state: SharedState,
) -> Result<std::thread::JoinHandle<()>, String> {
    run_sessions(socket, Vec::new(), Vec::new(), state)
}

/// Serves clients on `socket` one after another: the crate's server runs
/// on a private socket behind a bridge that adds our DMA messages to the
/// connection (see `message_dma`).
fn run_sessions(
    socket: &Path,
    irqs: Vec<IrqInfo>,
    regions: Vec<ServerRegion>,
    state: SharedState,
) -> Result<std::thread::JoinHandle<()>, String> {
    use std::os::linux::net::SocketAddrExt;
    let public = UnixListener::bind(socket)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    let inner_name = format!("ch-test-device-{}-{}", std::process::id(), socket.display());
    let inner_addr = std::os::unix::net::SocketAddr::from_abstract_name(inner_name.as_bytes())
        .map_err(|e| format!("cannot name the private socket: {e}"))?;
    let inner = UnixListener::bind_addr(&inner_addr)
        .map_err(|e| format!("cannot listen on the private socket: {e}"))?;
    let server = Server::from_owned_fd(inner.into(), true, irqs, regions);
    let server_state = state.clone();
    std::thread::Builder::new()
        .name("vfio-user".into())
        .spawn(move || {
            let mut backend = Backend(server_state.clone());
            loop {
                if let Err(e) = server.run(&mut backend) {
                    eprintln!("ch-test-device: client session ended: {e}");
                }
                lock(&server_state).disconnect();
            }
        })
        .map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("bridge".into())
        .spawn(move || {
            for client in public.incoming().flatten() {
                let Ok(server) = UnixStream::connect_addr(&inner_addr) else {
                    continue;
                };
                let session_state = state.clone();
                let ended = message_dma::bridge(client, server, |port| {
                    lock(&session_state).port = Some(port);
                });
                if let Err(e) = ended {
                    eprintln!("ch-test-device: bridge failed: {e}");
                }
                lock(&state).port = None;
            }
        })
        .map_err(|e| e.to_string())
}
