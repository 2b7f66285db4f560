//! Message-based DMA for the test device. `vfio_user::Server` owns its
//! connection and cannot send requests of its own, so the device puts a
//! bridge in front of it: the client connects to the device's socket, the
//! bridge connects to the crate's server on a private (abstract) socket and
//! passes every message and fd through in both directions, and the DMA
//! engine sends DMA_READ / DMA_WRITE to the client through a `MessagePort`
//! on the same connection. Replies to those come back to the port; every
//! other message reaches the crate's server unchanged.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vfio_user::Command;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER_SIZE: usize = 16;
const FLAG_TYPE_MASK: u32 = 0xf;
const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
/// What one DMA message moves at most (the VMM's `max_data_xfer_size`).
pub const MAX_TRANSFER: usize = 1 << 20;
/// Largest message the bridge passes on.
const MAX_MESSAGE: usize = HEADER_SIZE + 64 + MAX_TRANSFER;
/// How long the engine waits for the client to answer a DMA message.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One message and the fds that came with it.
struct Message {
    bytes: Vec<u8>,
    fds: Vec<File>,
}

impl Message {
    fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[2], self.bytes[3]])
    }

    fn id(&self) -> u16 {
        u16::from_le_bytes([self.bytes[0], self.bytes[1]])
    }

    fn flags(&self) -> u32 {
        u32::from_le_bytes(self.bytes[8..12].try_into().expect("4 bytes"))
    }
}

/// Reads one whole message; `None` at end of stream or on a malformed one.
fn read_message(stream: &UnixStream) -> Option<Message> {
    let mut header = [0u8; HEADER_SIZE];
    let mut raw_fds = [0 as RawFd; 16];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER_SIZE,
    }];
    // The fds travel with a message's first bytes.
    // SAFETY: the iovec points at `header`, which outlives the call, and
    // `raw_fds` has room for what the kernel may hand over.
    let (got, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw_fds) }.ok()?;
    // SAFETY: the kernel just gave us these descriptors; nothing else owns them.
    let fds = raw_fds[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if got == 0 {
        return None;
    }
    (&*stream).read_exact(&mut header[got..]).ok()?;
    let size = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    if !(HEADER_SIZE..=MAX_MESSAGE).contains(&size) {
        return None;
    }
    let mut bytes = header.to_vec();
    bytes.resize(size, 0);
    (&*stream).read_exact(&mut bytes[HEADER_SIZE..]).ok()?;
    Some(Message { bytes, fds })
}

fn send_message(stream: &UnixStream, message: &Message) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if message.fds.is_empty() {
        return (&*stream).write_all(&message.bytes);
    }
    let fds: Vec<RawFd> = message.fds.iter().map(File::as_raw_fd).collect();
    let sent = stream
        .send_with_fds(&[&message.bytes[..]], &fds)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    (&*stream).write_all(&message.bytes[sent..])
}

/// The engine's way to the client's memory over the vfio-user connection.
pub struct MessagePort {
    /// Writes to the client; shared with the bridge, one whole message at
    /// a time.
    to_client: Mutex<UnixStream>,
    replies: Mutex<HashMap<u16, Vec<u8>>>,
    arrived: Condvar,
    next_id: AtomicU16,
    closed: AtomicBool,
}

impl MessagePort {
    fn new(to_client: UnixStream) -> Self {
        MessagePort {
            to_client: Mutex::new(to_client),
            replies: Mutex::new(HashMap::new()),
            arrived: Condvar::new(),
            // Our ids live apart from the client's, which only matters
            // for reading a log.
            next_id: AtomicU16::new(0x8000),
            closed: AtomicBool::new(false),
        }
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.arrived.notify_all();
    }

    fn deliver(&self, id: u16, message: Vec<u8>) {
        lock(&self.replies).insert(id, message);
        self.arrived.notify_all();
    }

    /// Sends one DMA request and waits for its reply's body.
    fn request(&self, command: Command, body: &[u8]) -> Result<Vec<u8>, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(HEADER_SIZE + body.len());
        bytes.extend_from_slice(&id.to_le_bytes());
        bytes.extend_from_slice(&(command as u16).to_le_bytes());
        bytes.extend_from_slice(
            &u32::try_from(HEADER_SIZE + body.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        bytes.extend_from_slice(&[0; 8]);
        bytes.extend_from_slice(body);
        (&*lock(&self.to_client))
            .write_all(&bytes)
            .map_err(|e| format!("cannot send the DMA request: {e}"))?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut replies = lock(&self.replies);
        loop {
            if let Some(reply) = replies.remove(&id) {
                let flags = u32::from_le_bytes(reply[8..12].try_into().expect("4 bytes"));
                let errno = u32::from_le_bytes(reply[12..16].try_into().expect("4 bytes"));
                if flags & FLAG_ERROR != 0 {
                    return Err(format!("the client refused the DMA (errno {errno})"));
                }
                return Ok(reply[HEADER_SIZE..].to_vec());
            }
            if self.closed.load(Ordering::Acquire) {
                return Err("the client went away".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the client did not answer the DMA request".into());
            }
            replies = self
                .arrived
                .wait_timeout(replies, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reads `buf.len()` bytes at `iova` from the client.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), String> {
        let mut at = iova;
        for chunk in buf.chunks_mut(MAX_TRANSFER) {
            let mut body = at.to_le_bytes().to_vec();
            body.extend_from_slice(&(chunk.len() as u64).to_le_bytes());
            let reply = self.request(Command::DmaRead, &body)?;
            let data = reply
                .get(16..16 + chunk.len())
                .ok_or("a short DMA_READ reply")?;
            chunk.copy_from_slice(data);
            at += chunk.len() as u64;
        }
        Ok(())
    }

    /// Writes `data` at `iova` in the client.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), String> {
        let mut at = iova;
        for chunk in data.chunks(MAX_TRANSFER) {
            let mut body = at.to_le_bytes().to_vec();
            body.extend_from_slice(&(chunk.len() as u64).to_le_bytes());
            body.extend_from_slice(chunk);
            self.request(Command::DmaWrite, &body)?;
            at += chunk.len() as u64;
        }
        Ok(())
    }
}

/// Carries one client connection to the crate's server and back until
/// either side ends; `on_port` learns the connection's port first.
pub fn bridge(
    client: UnixStream,
    server: UnixStream,
    on_port: impl FnOnce(Arc<MessagePort>),
) -> std::io::Result<()> {
    let port = Arc::new(MessagePort::new(client.try_clone()?));
    on_port(port.clone());
    let from_server = server.try_clone()?;
    let out_port = port.clone();
    let backward = std::thread::Builder::new()
        .name("bridge-out".into())
        .spawn(move || {
            while let Some(message) = read_message(&from_server) {
                // The engine's requests and the server's replies share the
                // socket: one whole message at a time.
                if send_message(&lock(&out_port.to_client), &message).is_err() {
                    break;
                }
            }
            let _ = lock(&out_port.to_client).shutdown(std::net::Shutdown::Both);
        })?;
    while let Some(message) = read_message(&client) {
        let is_reply = message.flags() & FLAG_TYPE_MASK == FLAG_REPLY;
        if is_reply
            && matches!(
                Command::n(message.command()),
                Some(Command::DmaRead | Command::DmaWrite)
            )
        {
            port.deliver(message.id(), message.bytes);
        } else if send_message(&server, &message).is_err() {
            break;
        }
    }
    port.close();
    let _ = server.shutdown(std::net::Shutdown::Both);
    let _ = client.shutdown(std::net::Shutdown::Both);
    let _ = backward.join();
    Ok(())
}
