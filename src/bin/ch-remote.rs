// Copyright © 2026 The project authors
// SPDX-License-Identifier: Apache-2.0

//! `ch-remote`: talks to a running `cloud-hypervisor` over its API socket
//! and prints the JSON answers.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vmm::config::{DeviceConfig, UserDeviceConfig};

#[derive(Parser)]
#[command(
    name = "ch-remote",
    version,
    // The value syntaxes are wider than any terminal: descriptions go
    // under their option, or clap squeezes them into a one-word column.
    next_line_help = true,
    about = "Controls a running cloud-hypervisor"
)]
struct Cli {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

/// Subcommands sorted by name, as Cloud Hypervisor keeps them (a test
/// checks).
#[derive(Subcommand)]
enum Command {
    /// Assign a VFIO device: path=/sys/bus/pci/devices/BDF/[,id=ID].
    AddDevice {
        #[arg(value_name = DeviceConfig::SYNTAX, value_parser = DeviceConfig::parse)]
        config: DeviceConfig,
    },
    /// Connect a vfio-user device: socket=PATH[,id=ID].
    AddUserDevice {
        #[arg(value_name = UserDeviceConfig::SYNTAX, value_parser = UserDeviceConfig::parse)]
        config: UserDeviceConfig,
    },
    /// Boot the created VM.
    Boot,
    /// Conversion counters.
    Counters,
    /// Create the VM from a Cloud Hypervisor VmConfig JSON file ("-" reads
    /// standard input).
    Create {
        #[arg(value_name = "VM_CONFIG_JSON")]
        path: PathBuf,
    },
    /// Shut the VM down if it runs and forget it.
    Delete,
    /// VM configuration, state and memory regions.
    Info,
    /// Shared ranges of guest_memfd RAM, optionally within a window.
    MemoryAttributes {
        #[arg(long, requires = "size")]
        gpa: Option<String>,
        #[arg(long, requires = "gpa")]
        size: Option<String>,
        /// At most this many ranges (the answer says where to continue).
        #[arg(long)]
        limit: Option<String>,
    },
    /// Pause the VM: every vCPU stops between two exits.
    Pause,
    /// VMM version and pid.
    Ping,
    /// Press the VM's power button (refused: there is no ACPI here).
    PowerButton,
    /// Shut the VM down and boot it again.
    Reboot,
    /// Detach a device; everything it had mapped is unmapped.
    RemoveDevice { id: String },
    /// Resume a paused VM.
    Resume,
    /// Shut the VM down; the VMM keeps serving.
    Shutdown,
    /// Shut the VMM down.
    ShutdownVmm,
}

#[derive(Debug, thiserror::Error)]
enum RemoteError {
    #[error("cannot connect to {0}")]
    Connect(String, #[source] std::io::Error),
    #[error("API socket I/O failed")]
    Io(#[from] std::io::Error),
    #[error("malformed HTTP answer")]
    Malformed,
    #[error("server answered {status}: {body}")]
    Server { status: u16, body: String },
}

/// One request. The answer is read as far as its `Content-Length` (servers
/// that keep the connection open, as Cloud Hypervisor's does, are not
/// waited on), or to EOF when it has none.
fn request(socket: &PathBuf, method: &str, path: &str, body: &str) -> Result<String, RemoteError> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| RemoteError::Connect(socket.display().to_string(), e))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        stream,
        "{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let raw = read_answer(&mut stream)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or(RemoteError::Malformed)?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(RemoteError::Malformed)?;
    let body = decode_body(head, body)?;
    if !(200..300).contains(&status) {
        return Err(RemoteError::Server { status, body });
    }
    Ok(body)
}

/// Head and body of one answer.
fn read_answer(stream: &mut UnixStream) -> Result<Vec<u8>, RemoteError> {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            // A 204 has no body, whatever the headers say (or do not).
            if head.split_whitespace().nth(1) == Some("204") {
                raw.truncate(end + 4);
                return Ok(raw);
            }
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| RemoteError::Malformed)
                })
                .transpose()?;
            if let Some(length) = length {
                while raw.len() < end + 4 + length {
                    let n = stream.read(&mut chunk)?;
                    if n == 0 {
                        return Err(RemoteError::Malformed);
                    }
                    raw.extend_from_slice(&chunk[..n]);
                }
                raw.truncate(end + 4 + length);
                return Ok(raw);
            }
            stream.read_to_end(&mut raw)?;
            return Ok(raw);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(raw);
        }
        raw.extend_from_slice(&chunk[..n]);
    }
}

/// Undoes chunked transfer encoding where the server used it.
fn decode_body(head: &str, body: &str) -> Result<String, RemoteError> {
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if !chunked {
        return Ok(body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or(RemoteError::Malformed)?;
        let size = usize::from_str_radix(size.trim(), 16).map_err(|_| RemoteError::Malformed)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).ok_or(RemoteError::Malformed)?);
        rest = after.get(size + 2..).ok_or(RemoteError::Malformed)?;
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut body = String::new();
    let (method, path) = match &cli.command {
        Command::Boot => ("PUT", "vm.boot".to_string()),
        Command::Create { path } => {
            let read = if path.as_os_str() == "-" {
                let mut text = String::new();
                std::io::stdin().read_to_string(&mut text).map(|_| text)
            } else {
                std::fs::read_to_string(path)
            };
            body = match read {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("ch-remote: cannot read {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            };
            ("PUT", "vm.create".to_string())
        }
        Command::Delete => ("PUT", "vm.delete".to_string()),
        Command::PowerButton => ("PUT", "vm.power-button".to_string()),
        Command::Reboot => ("PUT", "vm.reboot".to_string()),
        Command::Ping => ("GET", "vmm.ping".to_string()),
        Command::Info => ("GET", "vm.info".to_string()),
        Command::Counters => ("GET", "vm.counters".to_string()),
        Command::Pause => ("PUT", "vm.pause".to_string()),
        Command::Resume => ("PUT", "vm.resume".to_string()),
        Command::MemoryAttributes { gpa, size, limit } => {
            let mut query = Vec::new();
            if let (Some(gpa), Some(size)) = (gpa, size) {
                query.push(format!("gpa={gpa}&size={size}"));
            }
            if let Some(limit) = limit {
                query.push(format!("limit={limit}"));
            }
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            ("GET", format!("vm.memory-attributes{query}"))
        }
        Command::Shutdown => ("PUT", "vm.shutdown".to_string()),
        Command::ShutdownVmm => ("PUT", "vmm.shutdown".to_string()),
        Command::AddDevice { config } => {
            body = serde_json::to_string(config).expect("plain config");
            ("PUT", "vm.add-device".to_string())
        }
        Command::AddUserDevice { config } => {
            body = serde_json::to_string(config).expect("plain config");
            ("PUT", "vm.add-user-device".to_string())
        }
        Command::RemoveDevice { id } => {
            body = serde_json::json!({ "id": id }).to_string();
            ("PUT", "vm.remove-device".to_string())
        }
    };
    match request(&cli.api_socket, method, &path, &body) {
        Ok(body) => {
            if !body.is_empty() {
                println!("{body}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("ch-remote: {text}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn subcommands_are_sorted_by_name() {
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .filter(|n| n != "help")
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        for needed in ["boot", "create", "delete", "power-button", "reboot"] {
            assert!(names.iter().any(|n| n == needed), "{needed}");
        }
    }
}
