//! Where the serial console writes.

use std::fs::File;
use std::io::Write;

use log::info;

use super::VmError;
use crate::config::ConsoleOutput;

/// Where the serial console writes.
pub(super) struct SerialSetup {
    pub(super) writer: Box<dyn Write + Send>,
    /// The pseudo-terminal it made (`vm.info` names it).
    pub(super) pty: Option<std::path::PathBuf>,
    /// The socket file to remove when the VM goes.
    pub(super) socket: Option<crate::serial_output::SocketFile>,
}

/// The serial console's file, emptied as `File::create` would, unless it
/// is a procfs or sysfs file: guest output written there would be kernel
/// settings, not a log (checked before anything is truncated).
pub(super) fn serial_file(path: &std::path::Path) -> Result<File, VmError> {
    let refuse = |source| VmError::SerialFile {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(path)
        .map_err(refuse)?;
    if crate::event_monitor::is_pseudo_file(&file) {
        return Err(refuse(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a procfs or sysfs file takes no console output",
        )));
    }
    file.set_len(0).map_err(refuse)?;
    Ok(file)
}

pub(super) fn serial_output(config: &ConsoleOutput) -> Result<SerialSetup, VmError> {
    use crate::serial_output::{PtyOutput, SocketFile, SocketOutput};
    // Lossy outputs write whole lines, not a system call per byte.
    let lines = |out: Box<dyn Write + Send>| Box::new(std::io::BufWriter::with_capacity(256, out));
    let plain = |writer| SerialSetup {
        writer,
        pty: None,
        socket: None,
    };
    Ok(match config {
        ConsoleOutput::Tty => plain(Box::new(std::io::stdout())),
        ConsoleOutput::Off => plain(Box::new(std::io::sink())),
        ConsoleOutput::File(path) => plain(Box::new(serial_file(path)?)),
        ConsoleOutput::Pty => {
            let (pty, path) = PtyOutput::open().map_err(VmError::SerialOutput)?;
            info!("serial console on {}", path.display());
            SerialSetup {
                writer: lines(Box::new(pty)),
                pty: Some(path),
                socket: None,
            }
        }
        ConsoleOutput::Socket(path) => {
            let socket = SocketOutput::bind(path).map_err(VmError::SerialOutput)?;
            info!("serial console on socket {}", path.display());
            SerialSetup {
                writer: lines(Box::new(socket)),
                pty: None,
                socket: Some(SocketFile(path.clone())),
            }
        }
    })
}
