//! What the tests of every module share: scripted servers, reply
//! builders, and the crate's items and std names they use.

pub(crate) use std::io::{Read, Write};
pub(crate) use std::os::fd::AsRawFd;
pub(crate) use std::os::unix::net::UnixStream;
pub(crate) use std::os::unix::thread::JoinHandleExt;
pub(crate) use std::time::{Duration, Instant};

pub(crate) use crate::client::*;
pub(crate) use crate::dma::*;
pub(crate) use crate::error::*;
pub(crate) use crate::wire::*;

pub(crate) extern "C" fn ignore_signal(
    _: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
}

/// A server on the other end of a socket pair that answers each
/// request with what `script` returns for it (raw bytes), then stops.
pub(crate) fn scripted(
    script: impl Fn(Header, &[u8]) -> Vec<u8> + Send + 'static,
) -> (VfioUserClient, std::thread::JoinHandle<()>) {
    let (client_end, mut server_end) = UnixStream::pair().unwrap();
    let server = std::thread::spawn(move || {
        loop {
            let mut raw = [0u8; HEADER_SIZE];
            if server_end.read_exact(&mut raw).is_err() {
                return;
            }
            let header = Header::decode(&raw);
            let mut body = vec![0u8; header.size as usize - HEADER_SIZE];
            server_end.read_exact(&mut body).unwrap();
            let answer = script(header, &body);
            if answer.is_empty() || server_end.write_all(&answer).is_err() {
                return;
            }
        }
    });
    let client = VfioUserClient::over(client_end, Duration::from_millis(300), None);
    (client, server)
}

pub(crate) fn reply_to(request: Header, flags: u32, error: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Header {
        id: request.id,
        command: request.command,
        size: u32::try_from(HEADER_SIZE + body.len()).unwrap(),
        flags,
        error,
    }
    .encode()
    .to_vec();
    out.extend_from_slice(body);
    out
}

/// (offset, size) of mmappable areas.
pub(crate) type Areas = Vec<(u64, u64)>;
/// A capability: its id, the offset of the next one, its areas.
pub(crate) type Capability = (u16, u32, Areas);

/// A DEVICE_GET_REGION_INFO reply: the 32-byte info (index, flags,
/// cap_offset, size, offset) and, at `caps`, a capability chain.
pub(crate) fn region_reply(index: u32, flags: u32, size: u64, caps: &[Capability]) -> Vec<u8> {
    let mut reply = vec![0u8; 32];
    reply[0..4].copy_from_slice(&REGION_INFO_ARGSZ.to_le_bytes());
    reply[4..8].copy_from_slice(&flags.to_le_bytes());
    reply[8..12].copy_from_slice(&index.to_le_bytes());
    reply[16..24].copy_from_slice(&size.to_le_bytes());
    reply[24..32].copy_from_slice(&0x7000u64.to_le_bytes());
    if !caps.is_empty() {
        reply[12..16].copy_from_slice(&32u32.to_le_bytes());
    }
    for (i, (id, next, areas)) in caps.iter().enumerate() {
        let at = reply.len();
        let mut cap = vec![0u8; 16];
        cap[0..4].copy_from_slice(&u32::from(*id).to_le_bytes());
        cap[4..8].copy_from_slice(&next.to_le_bytes());
        cap[8..12].copy_from_slice(&u32::try_from(areas.len()).unwrap().to_le_bytes());
        for (offset, len) in areas {
            cap.extend_from_slice(&offset.to_le_bytes());
            cap.extend_from_slice(&len.to_le_bytes());
        }
        reply.extend_from_slice(&cap);
        debug_assert!(i > 0 || at == 32);
    }
    reply
}

/// Memory of 64 KiB at GPA 0.
pub(crate) struct Ram(pub(crate) std::sync::Mutex<Vec<u8>>);

impl DmaMemory for Ram {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaMemoryError> {
        let ram = self.0.lock().unwrap();
        buf.copy_from_slice(&ram[usize::try_from(gpa).unwrap()..][..buf.len()]);
        Ok(())
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaMemoryError> {
        let mut ram = self.0.lock().unwrap();
        ram[usize::try_from(gpa).unwrap()..][..data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// Connects to a one-shot server whose VERSION reply body is `reply`.
/// A client over one end of a socket pair, giving up on a reply after
/// `timeout`, and the other end: the server's.
pub(crate) fn client_and_server(timeout: Duration) -> (VfioUserClient, UnixStream) {
    let (client_end, server_end) = UnixStream::pair().unwrap();
    (VfioUserClient::over(client_end, timeout, None), server_end)
}

pub(crate) fn connect_to(reply: Vec<u8>) -> Result<VfioUserClient, VfioUserError> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("vfu-version-{}-{n}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    // Ends when the client goes.
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut raw = [0u8; HEADER_SIZE];
        s.read_exact(&mut raw).unwrap();
        let h = Header::decode(&raw);
        assert_eq!(h.command, CMD_VERSION);
        let mut body = vec![0u8; h.size as usize - HEADER_SIZE];
        s.read_exact(&mut body).unwrap();
        assert_eq!(&body[..4], &[0, 0, 1, 0], "we speak 0.1");
        let _ = s.write_all(&reply_to(h, FLAG_REPLY, 0, &reply));
        // Hold the connection until the client is done with it.
        let _ = s.read(&mut [0u8; 1]);
    });
    let client = VfioUserClient::connect(&path, Duration::from_secs(2), None);
    let _ = std::fs::remove_file(&path);
    client
}

pub(crate) fn read_request(s: &mut UnixStream) -> Header {
    read_request_bytes(s).0
}

/// One whole message from the client: its header and its body.
pub(crate) fn read_request_bytes(s: &mut UnixStream) -> (Header, Vec<u8>) {
    let mut raw = [0u8; HEADER_SIZE];
    s.read_exact(&mut raw).unwrap();
    let h = Header::decode(&raw);
    let mut body = vec![0u8; h.size as usize - HEADER_SIZE];
    s.read_exact(&mut body).unwrap();
    (h, body)
}

/// A DMA_READ of `count` bytes at `addr` as the server sends it.
pub(crate) fn dma_read_request(id: u16, addr: u64, count: u64) -> Vec<u8> {
    let mut body = addr.to_le_bytes().to_vec();
    body.extend_from_slice(&count.to_le_bytes());
    let mut out = Header {
        id,
        command: CMD_DMA_READ,
        size: u32::try_from(HEADER_SIZE + body.len()).unwrap(),
        flags: FLAG_COMMAND,
        error: 0,
    }
    .encode()
    .to_vec();
    out.extend_from_slice(&body);
    out
}
