//! Where the serial console's output goes besides stdout and files: a
//! pseudo-terminal (`--serial pty`) or a Unix socket a client connects to
//! (`--serial socket=PATH`), as Cloud Hypervisor offers them.
//!
//! Both are written from the vCPU thread that runs the guest's port write,
//! so neither may ever block it: output nobody reads is dropped (and
//! counted) rather than waited on. The console is output-only here.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum SerialOutputError {
    #[error("cannot open a pseudo-terminal")]
    Pty(#[source] std::io::Error),
    #[error("cannot listen on serial socket {0}")]
    Socket(PathBuf, #[source] std::io::Error),
    #[error("serial socket {0} exists; refusing to replace it")]
    SocketExists(PathBuf),
}

/// Bytes the guest wrote that nobody could take.
#[derive(Clone, Default)]
pub struct Dropped(Arc<AtomicU64>);

impl Dropped {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Writes `buf` to a non-blocking `out`; what does not fit is dropped.
/// `Err` only when the reader is gone for good.
fn write_lossy(out: &mut impl Write, buf: &[u8], dropped: &Dropped) -> std::io::Result<()> {
    let mut rest = buf;
    while !rest.is_empty() {
        match out.write(rest) {
            Ok(0) => break,
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => {
                dropped.add(rest.len());
                return Err(e);
            }
        }
    }
    dropped.add(rest.len());
    Ok(())
}

/// The master side of a pseudo-terminal; its slave is what a user opens
/// (`screen /dev/pts/N`).
pub struct PtyOutput {
    master: File,
    dropped: Dropped,
}

impl PtyOutput {
    /// Opens a new pseudo-terminal; returns it and its slave's path.
    pub fn open() -> Result<(PtyOutput, PathBuf), SerialOutputError> {
        let err = || SerialOutputError::Pty(std::io::Error::last_os_error());
        // SAFETY: posix_openpt takes flags only and returns a new fd or -1.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(err());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: grantpt and unlockpt take an open pty master fd.
        if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
            return Err(err());
        }
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: ptsname_r writes at most `name.len()` bytes into `name`.
        if unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) } != 0 {
            return Err(err());
        }
        // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let path = PathBuf::from(path.to_string_lossy().into_owned());
        Ok((
            PtyOutput {
                master: File::from(master),
                dropped: Dropped::default(),
            },
            path,
        ))
    }

    pub fn dropped(&self) -> Dropped {
        self.dropped.clone()
    }
}

impl Write for PtyOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Nobody has the slave open (EIO) or nobody reads (EAGAIN): the
        // output is dropped, never waited on.
        let _ = write_lossy(&mut self.master, buf, &self.dropped);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A Unix socket the console is served on: the latest client that connects
/// gets the output from then on. Clients are taken and written to without
/// blocking and without signals, from the vCPU thread (its seccomp filter
/// allows `accept4` and `sendto` for this).
pub struct SocketOutput {
    listener: UnixListener,
    client: Option<OwnedFd>,
    dropped: Dropped,
}

impl SocketOutput {
    /// Listens on `path`, which must not exist.
    pub fn bind(path: &Path) -> Result<SocketOutput, SerialOutputError> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(SerialOutputError::SocketExists(path.to_path_buf()));
        }
        let failed = |e| SerialOutputError::Socket(path.to_path_buf(), e);
        let listener = UnixListener::bind(path).map_err(failed)?;
        // fcntl rather than set_nonblocking (an ioctl the filters refuse).
        // SAFETY: F_GETFL/F_SETFL on an fd the listener owns.
        let ok = unsafe {
            let flags = libc::fcntl(listener.as_raw_fd(), libc::F_GETFL);
            flags >= 0
                && libc::fcntl(
                    listener.as_raw_fd(),
                    libc::F_SETFL,
                    flags | libc::O_NONBLOCK,
                ) == 0
        };
        if !ok {
            return Err(failed(std::io::Error::last_os_error()));
        }
        Ok(SocketOutput {
            listener,
            client: None,
            dropped: Dropped::default(),
        })
    }

    pub fn dropped(&self) -> Dropped {
        self.dropped.clone()
    }

    /// Takes the newest waiting client, if any.
    fn accept(&mut self) {
        loop {
            // SAFETY: accept4 on our listening fd, no address wanted; a
            // new fd or -1.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                return;
            }
            // SAFETY: `fd` was just accepted and is owned by nothing else.
            self.client = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }

    /// Sends what the client takes now; `false` once it has gone.
    fn send(&mut self, buf: &[u8]) -> bool {
        match &self.client {
            Some(client) => write_lossy(&mut NoSignalSend(client), buf, &self.dropped).is_ok(),
            None => {
                self.dropped.add(buf.len());
                true
            }
        }
    }
}

/// Writes to a socket as `send(MSG_DONTWAIT | MSG_NOSIGNAL)`: never blocks,
/// and a client gone away is an error, not a SIGPIPE.
struct NoSignalSend<'a>(&'a OwnedFd);

impl Write for NoSignalSend<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: sends from `buf`, valid for its length, on our fd.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n.cast_unsigned())
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Write for SocketOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.accept();
        if !self.send(buf) {
            // The client went away; the next one takes over.
            self.client = None;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Removes the console socket's file when the VM goes. Kept apart from
/// `SocketOutput`, whose last owner may be a vCPU thread (which may not
/// remove files).
pub struct SocketFile(pub PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn a_socket_client_gets_the_output_from_when_it_connects() {
        let path = std::env::temp_dir().join(format!("ch-serial-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut out = SocketOutput::bind(&path).unwrap();
        let file = SocketFile(path.clone());
        assert!(matches!(
            SocketOutput::bind(&path),
            Err(SerialOutputError::SocketExists(_))
        ));
        out.write_all(b"before\n").unwrap();
        assert_eq!(out.dropped().get(), 7, "nobody to read it");
        let mut client = UnixStream::connect(&path).unwrap();
        out.write_all(b"hello\n").unwrap();
        // The client stays connected from one write to the next.
        out.write_all(b"there\n").unwrap();
        let mut got = [0u8; 12];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello\nthere\n");
        // Taken without blocking and not passed on to children.
        let accepted = out.client.as_ref().unwrap().as_raw_fd();
        // SAFETY: F_GETFL / F_GETFD on an fd the output owns.
        let (status, fd_flags) = unsafe {
            (
                libc::fcntl(accepted, libc::F_GETFL),
                libc::fcntl(accepted, libc::F_GETFD),
            )
        };
        assert_ne!(status & libc::O_NONBLOCK, 0);
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);
        // A client that reads nothing never blocks the writer.
        let started = std::time::Instant::now();
        for _ in 0..4096 {
            out.write_all(&[b'x'; 256]).unwrap();
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert!(out.dropped().get() > 7);
        // It goes; the next one takes over.
        drop(client);
        let _ = out.write(b"lost\n");
        let _ = out.write(b"lost\n");
        let mut next = UnixStream::connect(&path).unwrap();
        out.write_all(b"again\n").unwrap();
        let mut got = [0u8; 6];
        next.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"again\n");
        drop(out);
        assert!(path.exists(), "the output alone never removes files");
        drop(file);
        assert!(!path.exists());
    }

    /// A writer that answers from a script, then takes everything.
    struct Scripted(Vec<std::io::Result<usize>>, Vec<u8>);

    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.0.is_empty() {
                self.1.extend_from_slice(buf);
                return Ok(buf.len());
            }
            let answer = self.0.remove(0);
            if let Ok(n) = answer {
                self.1.extend_from_slice(&buf[..n]);
            }
            answer
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lossy_writes_retry_interruptions_drop_what_does_not_fit_and_stop_on_errors() {
        let kind = |k: ErrorKind| Err(std::io::Error::from(k));
        // Interrupted: tried again, nothing lost.
        let dropped = Dropped::default();
        let mut out = Scripted(vec![Ok(2), kind(ErrorKind::Interrupted)], Vec::new());
        write_lossy(&mut out, b"abcdef", &dropped).unwrap();
        assert_eq!((out.1.as_slice(), dropped.get()), (&b"abcdef"[..], 0));
        // Full: the rest is dropped and counted, not waited on.
        let mut out = Scripted(vec![Ok(2), kind(ErrorKind::WouldBlock)], Vec::new());
        write_lossy(&mut out, b"abcdef", &dropped).unwrap();
        assert_eq!((out.1.as_slice(), dropped.get()), (&b"ab"[..], 4));
        // Gone: an error, the rest counted.
        let mut out = Scripted(vec![Ok(1), kind(ErrorKind::BrokenPipe)], Vec::new());
        let e = write_lossy(&mut out, b"abcdef", &dropped).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BrokenPipe);
        assert_eq!((out.1.as_slice(), dropped.get()), (&b"a"[..], 9));
    }

    #[test]
    fn a_pty_delivers_to_its_reader_and_drops_what_nobody_reads() {
        let (mut out, path) = PtyOutput::open().unwrap();
        assert!(path.starts_with("/dev/pts"), "{}", path.display());
        let mut slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        out.write_all(b"hi\n").unwrap();
        let mut got = [0u8; 2];
        slave.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        // Nobody reads: the pty fills, then the output is dropped, and the
        // writer never blocks.
        let started = std::time::Instant::now();
        for _ in 0..4096 {
            out.write_all(&[b'y'; 256]).unwrap();
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert!(out.dropped().get() > 0);
    }
}
