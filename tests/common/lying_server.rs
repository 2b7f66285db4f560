//! A vfio-user PCI server written for the tests, on a real Unix socket,
//! that says whatever the test tells it to: region sizes, configuration
//! space, MSI-X vector counts, and how it answers DMA_MAP (or does not).
//! It serves one connection at a time, on its own thread, until the test
//! drops it.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// The command numbers are the third-party server crate's, so the VMM's
// client is checked against numbers it does not share.
pub use vfio_user::Command;

const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
const CONFIG_REGION: usize = 7;
const REGIONS: usize = 9;
const MSIX_IRQ_INDEX: u32 = 2;

fn is_dma_map_or_unmap(command: u16) -> bool {
    matches!(
        Command::n(command),
        Some(Command::DmaMap | Command::DmaUnmap)
    )
}

/// One message off the wire: (id, command, flags, error, body).
pub type Message = (u16, u16, u32, u32, Vec<u8>);

pub fn read_message(s: &mut UnixStream) -> Option<Message> {
    let mut header = [0u8; 16];
    s.read_exact(&mut header).ok()?;
    let u32_at = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
    let id = u16::from_le_bytes([header[0], header[1]]);
    let command = u16::from_le_bytes([header[2], header[3]]);
    let size = (u32_at(4) as usize).checked_sub(16)?;
    let mut body = vec![0u8; size];
    s.read_exact(&mut body).ok()?;
    Some((id, command, u32_at(8), u32_at(12), body))
}

pub fn message(id: u16, command: u16, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + body.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&command.to_le_bytes());
    m.extend_from_slice(&u32::try_from(16 + body.len()).unwrap().to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// An error reply with `errno`.
pub fn error_reply(id: u16, command: u16, errno: u32) -> Vec<u8> {
    let mut reply = message(id, command, FLAG_REPLY | FLAG_ERROR, &[]);
    reply[12..16].copy_from_slice(&errno.to_le_bytes());
    reply
}

/// What the server does with the `n`-th DMA_MAP (counted from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMap {
    /// Answers every map.
    Answer,
    /// Never answers map `n` or anything after it (the client times out).
    HangAt(usize),
    /// Closes the connection on map `n`.
    HangUpAt(usize),
    /// Refuses map `n` and every later one with ENOMEM (a clean error
    /// reply: the connection stays).
    RefuseFrom(usize),
    /// Answers every DMA_MAP and DMA_UNMAP after sleeping this many
    /// milliseconds (a slow device).
    Delay(u64),
    /// Answers every DMA_MAP and DMA_UNMAP, but holds the replies while
    /// more requests keep arriving (within 20 ms) and then sends them last
    /// first: replies out of order wherever the client pipelines.
    Reversed,
}

/// What the server claims.
#[derive(Debug, Clone)]
pub struct Lies {
    pub region_sizes: [u64; REGIONS],
    /// The first 256 bytes of configuration space.
    pub config: Vec<u8>,
    pub msix_vectors: u32,
    pub on_map: OnMap,
}

impl Lies {
    /// An honest PCI function: vendor 0x1af4, a 4 KiB 32-bit BAR0 with a
    /// 2-vector MSI-X table at 0x800 and its PBA at 0xc00.
    pub fn honest() -> Self {
        let mut config = vec![0u8; 256];
        config[0..4].copy_from_slice(&0x1234_1af4u32.to_le_bytes());
        config[6] = 0x10; // status: capability list
        config[0x34] = 0x40;
        config[0x40] = 0x11; // MSI-X
        config[0x42..0x44].copy_from_slice(&1u16.to_le_bytes()); // 2 vectors
        config[0x44..0x48].copy_from_slice(&0x800u32.to_le_bytes());
        config[0x48..0x4c].copy_from_slice(&0xc00u32.to_le_bytes());
        let mut region_sizes = [0; REGIONS];
        region_sizes[0] = 0x1000;
        region_sizes[CONFIG_REGION] = 256;
        Lies {
            region_sizes,
            config,
            msix_vectors: 2,
            on_map: OnMap::Answer,
        }
    }

    /// The honest function, answering DMA_MAP as `on_map` says.
    pub fn on_map(on_map: OnMap) -> Self {
        Lies {
            on_map,
            ..Lies::honest()
        }
    }

    /// Sets BAR `index`'s register to a 64-bit memory BAR.
    pub fn bar64(mut self, index: usize) -> Self {
        self.config[0x10 + 4 * index] = 0b100;
        self
    }

    /// The MSI-X capability's message control (vectors - 1), table and PBA
    /// dwords (offset | BAR indicator).
    pub fn msix(mut self, vectors: u16, table: u32, pba: u32) -> Self {
        self.config[0x42..0x44].copy_from_slice(&(vectors - 1).to_le_bytes());
        self.config[0x44..0x48].copy_from_slice(&table.to_le_bytes());
        self.config[0x48..0x4c].copy_from_slice(&pba.to_le_bytes());
        self.msix_vectors = u32::from(vectors);
        self
    }
}

pub struct LyingServer {
    pub socket: PathBuf,
    /// `map IOVA+SIZE`, `unmap IOVA`, `hang`, `hang-up`, `closed` lines.
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl LyingServer {
    pub fn start(socket: &Path, lies: Lies) -> Self {
        let listener = UnixListener::bind(socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, stopped) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Acquire) {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &lies, &sink, &stopped),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        LyingServer {
            socket: socket.to_path_buf(),
            log,
            stop,
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for LyingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Whether a message is waiting on `s` (or arrives within `wait`).
fn more_waiting(s: &UnixStream, wait: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let mut readable = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one pollfd for a socket this thread owns.
    unsafe { libc::poll(&mut readable, 1, ms) > 0 }
}

fn serve(mut s: UnixStream, lies: &Lies, log: &Mutex<Vec<String>>, stop: &AtomicBool) {
    s.set_nonblocking(false).unwrap();
    let note = |line: String| log.lock().unwrap().push(line);
    let mut maps = 0;
    // Replies held back by `OnMap::Reversed`, in arrival order.
    let mut held: Vec<Vec<u8>> = Vec::new();
    while let Some((id, command, _, _, body)) = read_message(&mut s) {
        let u32_at = |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
        let reply = match Command::n(command) {
            Some(Command::Version) => {
                let mut reply = vec![0, 0, 1, 0];
                reply.extend_from_slice(br#"{"capabilities":{"max_msg_fds":1}}"#);
                reply.push(0);
                message(id, command, FLAG_REPLY, &reply)
            }
            Some(Command::DmaMap) => {
                maps += 1;
                match lies.on_map {
                    OnMap::HangAt(n) if maps >= n => {
                        note("hang".into());
                        // Keeps the connection open and silent until the
                        // client gives up on it.
                        while !stop.load(Ordering::Acquire) && read_message(&mut s).is_some() {}
                        break;
                    }
                    OnMap::HangUpAt(n) if maps >= n => {
                        note("hang-up".into());
                        break;
                    }
                    OnMap::RefuseFrom(n) if maps >= n => {
                        note(format!("refuse {:#x}+{:#x}", u64_at(16), u64_at(24)));
                        if s.write_all(&error_reply(id, command, 12)).is_err() {
                            break;
                        }
                        continue;
                    }
                    _ => {}
                }
                note(format!("map {:#x}+{:#x}", u64_at(16), u64_at(24)));
                message(id, command, FLAG_REPLY, &[])
            }
            Some(Command::DmaUnmap) => {
                note(format!("unmap {:#x}", u64_at(8)));
                message(id, command, FLAG_REPLY, &[])
            }
            Some(Command::DeviceGetInfo) => {
                let mut reply = [0u8; 16];
                reply[0..4].copy_from_slice(&16u32.to_le_bytes());
                reply[4..8].copy_from_slice(&0b11u32.to_le_bytes()); // reset, PCI
                reply[8..12].copy_from_slice(&u32::try_from(REGIONS).unwrap().to_le_bytes());
                reply[12..16].copy_from_slice(&5u32.to_le_bytes());
                message(id, command, FLAG_REPLY, &reply)
            }
            Some(Command::DeviceGetRegionInfo) => {
                let index = u32_at(8);
                let mut reply = [0u8; 32];
                reply[0..4].copy_from_slice(&32u32.to_le_bytes());
                reply[4..8].copy_from_slice(&0b11u32.to_le_bytes()); // read, write
                reply[8..12].copy_from_slice(&index.to_le_bytes());
                let size = lies.region_sizes.get(index as usize).copied().unwrap_or(0);
                reply[16..24].copy_from_slice(&size.to_le_bytes());
                message(id, command, FLAG_REPLY, &reply)
            }
            Some(Command::GetIrqInfo) => {
                let index = u32_at(8);
                let mut reply = [0u8; 16];
                reply[0..4].copy_from_slice(&16u32.to_le_bytes());
                reply[8..12].copy_from_slice(&index.to_le_bytes());
                let count = if index == MSIX_IRQ_INDEX {
                    lies.msix_vectors
                } else {
                    0
                };
                reply[12..16].copy_from_slice(&count.to_le_bytes());
                message(id, command, FLAG_REPLY, &reply)
            }
            Some(Command::RegionRead) => {
                let (offset, index, count) = (u64_at(0), u32_at(8), u32_at(12) as usize);
                let mut reply = body[..16].to_vec();
                let start = arch::usize_from(offset);
                for at in start..start + count {
                    let byte = match index as usize {
                        CONFIG_REGION => lies.config.get(at).copied().unwrap_or(0),
                        _ => 0,
                    };
                    reply.push(byte);
                }
                message(id, command, FLAG_REPLY, &reply)
            }
            Some(Command::RegionWrite) => message(id, command, FLAG_REPLY, &body[..16]),
            // Reset, SET_IRQS and the rest: accepted, nothing to do.
            _ => message(id, command, FLAG_REPLY, &[]),
        };
        if let OnMap::Delay(ms) = lies.on_map
            && is_dma_map_or_unmap(command)
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if lies.on_map == OnMap::Reversed && is_dma_map_or_unmap(command) {
            held.push(reply);
            if more_waiting(&s, Duration::from_millis(20)) {
                continue;
            }
            if held.len() > 1 {
                note(format!("reversed {}", held.len()));
            }
            let burst: Vec<u8> = held.drain(..).rev().flatten().collect();
            if s.write_all(&burst).is_err() {
                break;
            }
            continue;
        }
        if s.write_all(&reply).is_err() {
            break;
        }
    }
    note("closed".into());
}
