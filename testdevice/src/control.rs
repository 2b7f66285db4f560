//! The control socket: one line per command (the list is in the crate's
//! documentation), one answer line each.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use super::*;

fn answer(state: &SharedState, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let number = |w: &str| {
        let parsed = match w.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => w.parse(),
        };
        parsed.map_err(|_| format!("bad number {w:?}"))
    };
    let result = match words.as_slice() {
        ["maps"] => {
            let s = lock(state);
            let maps: Vec<[u64; 2]> = s.maps.iter().map(|(&a, m)| [a, m.size]).collect();
            Ok(serde_json::to_string(&maps).expect("plain numbers"))
        }
        // A DMA_READ sent whatever the device's own mappings say: what a
        // lying device would try; the client must refuse what it did not map.
        ["raw-read", iova, len] => (|| {
            let (iova, len) = (number(iova)?, number(len)?);
            let port = lock(state).port.clone().ok_or("no client connected")?;
            let mut bytes = vec![0u8; arch::usize_from(len)];
            port.read(iova, &mut bytes)?;
            Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
        })(),
        // How many mappings came with an fd (the device could mmap them).
        ["fd-maps"] => {
            let s = lock(state);
            Ok(s.maps
                .values()
                .filter(|m| m.host.is_some())
                .count()
                .to_string())
        }
        ["log"] => Ok(serde_json::to_string(&lock(state).log).expect("strings")),
        ["engine"] => {
            let s = lock(state);
            let e = &s.engine;
            Ok(serde_json::json!({
                "faults": e.faults,
                "completions": e.completions,
                "stream_passes": e.stream_passes,
                "interrupts_sent": e.interrupts_sent,
                "scratch_messages": e.scratch_messages,
                "msix_fds": e.msix.iter().filter(|f| f.is_some()).count(),
            })
            .to_string())
        }
        ["stream", iova, len, byte] => (|| {
            let (iova, len, byte) = (number(iova)?, number(len)?, number(byte)?);
            for (offset, value) in [
                (0x0, arch::low32(iova)),
                (0x4, arch::high32(iova)),
                (0x8, arch::low32(len)),
                (0xc, arch::low32(byte)),
            ] {
                pci::bar0_write(state, offset, &value.to_le_bytes());
            }
            pci::bar0_write(state, 0x10, &pci::COMMAND_STREAM_START.to_le_bytes());
            Ok("ok".to_string())
        })(),
        ["scratch", offset] => number(offset).and_then(|at| {
            let s = lock(state);
            let scratch = s.scratch.as_ref().ok_or("no BAR0 memory")?;
            Ok(format!("{:02x}", scratch.read(at)))
        }),
        ["stop"] => {
            pci::bar0_write(state, 0x10, &pci::COMMAND_STREAM_STOP.to_le_bytes());
            Ok("ok".to_string())
        }
        ["refuse", n] => number(n).map(|n| {
            lock(state).refuse_maps = n;
            "ok".to_string()
        }),
        ["read", iova, len] => (|| {
            let (iova, len) = (number(iova)?, number(len)?);
            let bytes = lock(state).dma_read(iova, len)?;
            Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
        })(),
        ["write", iova, byte] => (|| {
            let (iova, byte) = (number(iova)?, number(byte)?);
            let byte = u8::try_from(byte).map_err(|_| "byte out of range".to_string())?;
            lock(state).dma_write(iova, &[byte])?;
            Ok("ok".to_string())
        })(),
        _ => Err(format!("unknown command {line:?}")),
    };
    result.unwrap_or_else(|e| format!("error: {e}"))
}

fn control_session(stream: UnixStream, state: &SharedState) {
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if writeln!(writer, "{}", answer(state, &line)).is_err() {
            return;
        }
    }
}

/// Sends one control command to a running device and returns its answer
/// (the client side of `control`, for `ch-test-device --ask`).
pub fn ask(path: &Path, command: &str) -> Result<String, String> {
    let stream = UnixStream::connect(path)
        .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?;
    writeln!(&stream, "{command}").map_err(|e| format!("cannot send the command: {e}"))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(|e| format!("cannot read the answer: {e}"))?;
    if answer.is_empty() {
        return Err("the device closed the connection without answering".into());
    }
    Ok(answer.trim_end().to_string())
}

/// Answers control commands, one connection after another.
pub fn control(path: &Path, state: SharedState) -> Result<std::thread::JoinHandle<()>, String> {
    let listener = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                control_session(stream, &state);
            }
        })
        .map_err(|e| e.to_string())
}
