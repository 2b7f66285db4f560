//! The device's PCI face: configuration space (test ids, one 4 KiB 32-bit
//! memory BAR, an MSI-X capability with two vectors) and BAR0, a DMA engine
//! that reaches guest memory only through the device's current mappings.
//!
//! BAR0 registers (32-bit):
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x00 | IOVA_LO | R/W | DMA address bits 31:0 |
//! | 0x04 | IOVA_HI | R/W | bits 63:32 |
//! | 0x08 | LENGTH | R/W | bytes |
//! | 0x0c | VALUE | R/W | the byte to fill with or compare against |
//! | 0x10 | COMMAND | W | 1 fill, 2 verify, 3 start streaming fills, 4 stop streaming |
//! | 0x14 | STATUS | R | 0 ok, 1 dma-fault, 2 mismatch, 3 streaming, 4 bad-command, all ones idle |
//! | 0x18 | FAULTS | R | DMA faults so far (commands and streaming passes) |
//! | 0x1c | COMPLETIONS | R | commands completed |
//! | 0x800 | MSI-X table | | two vectors (emulated by the VMM) |
//! | 0xc00 | MSI-X PBA | | |
//! | 0x1000..0x2000 | SCRATCH | R/W | plain memory; offered as a sparse-mmap area (unless `--no-mmap`), so the VMM can map it into the guest |
//!
//! A fill or verify runs to completion before the register write is
//! answered, then raises MSI-X vector 0. A range not entirely inside the
//! current mappings is a fault: nothing is written, nothing is read.

use std::fs::File;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::{DeviceState, SharedState, lock};

pub const VENDOR_ID: u16 = 0xc0de;
pub const DEVICE_ID: u16 = 0xd3a0;
pub const BAR0_SIZE: u64 = 0x2000;
pub const SCRATCH_OFFSET: u64 = 0x1000;
pub const SCRATCH_SIZE: u64 = 0x1000;
pub const CONFIG_SIZE: u64 = 256;
pub const MSIX_VECTORS: u32 = 2;
pub const MSIX_TABLE_OFFSET: u32 = 0x800;
pub const MSIX_PBA_OFFSET: u32 = 0xc00;
const MSIX_CAPABILITY: usize = 0x40;

pub const STATUS_OK: u32 = 0;
pub const STATUS_DMA_FAULT: u32 = 1;
pub const STATUS_MISMATCH: u32 = 2;
pub const STATUS_STREAMING: u32 = 3;
pub const STATUS_BAD_COMMAND: u32 = 4;
pub const STATUS_IDLE: u32 = u32::MAX;

pub const COMMAND_FILL: u32 = 1;
pub const COMMAND_VERIFY: u32 = 2;
pub const COMMAND_STREAM_START: u32 = 3;
pub const COMMAND_STREAM_STOP: u32 = 4;

/// How long a streaming pass waits before the next one.
const STREAM_PAUSE: Duration = Duration::from_micros(50);

pub struct Engine {
    iova: u64,
    length: u32,
    value: u8,
    status: u32,
    pub faults: u64,
    pub completions: u64,
    pub stream_passes: u64,
    command_register: u16,
    /// MSI-X vector eventfds the VMM gave us (DEVICE_SET_IRQS).
    pub msix: Vec<Option<File>>,
    pub interrupts_sent: u64,
    /// REGION_READ / REGION_WRITE messages for the scratch page: none when
    /// the guest reaches it through a memory slot.
    pub scratch_messages: u64,
    stream: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Default for Engine {
    fn default() -> Self {
        Engine {
            iova: 0,
            length: 0,
            value: 0,
            status: STATUS_IDLE,
            faults: 0,
            completions: 0,
            stream_passes: 0,
            command_register: 0,
            msix: Vec::new(),
            interrupts_sent: 0,
            scratch_messages: 0,
            stream: None,
        }
    }
}

/// The configuration space the device reports (the VMM emulates BARs and
/// the MSI-X enable bits itself; only the command register is stored).
pub fn config_read(state: &DeviceState, offset: u64, data: &mut [u8]) {
    let mut space = [0u8; arch::usize_from(CONFIG_SIZE)];
    let put = |space: &mut [u8], at: usize, bytes: &[u8]| {
        space[at..at + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut space, 0, &VENDOR_ID.to_le_bytes());
    put(&mut space, 2, &DEVICE_ID.to_le_bytes());
    put(&mut space, 4, &state.engine.command_register.to_le_bytes());
    put(&mut space, 6, &0x0010u16.to_le_bytes()); // capability list
    put(&mut space, 8, &0xff00_0001u32.to_le_bytes()); // class ff, revision 1
    put(&mut space, 0x2c, &VENDOR_ID.to_le_bytes());
    put(&mut space, 0x2e, &DEVICE_ID.to_le_bytes());
    put(
        &mut space,
        0x34,
        &[const { arch::fit_u8(MSIX_CAPABILITY as u64) }],
    );
    put(&mut space, MSIX_CAPABILITY, &[0x11, 0]);
    put(
        &mut space,
        MSIX_CAPABILITY + 2,
        &const { arch::fit_u16(MSIX_VECTORS as u64 - 1) }.to_le_bytes(),
    );
    put(
        &mut space,
        MSIX_CAPABILITY + 4,
        &MSIX_TABLE_OFFSET.to_le_bytes(),
    );
    put(
        &mut space,
        MSIX_CAPABILITY + 8,
        &MSIX_PBA_OFFSET.to_le_bytes(),
    );
    for (i, b) in data.iter_mut().enumerate() {
        *b = space
            .get(arch::usize_from(offset) + i)
            .copied()
            .unwrap_or(0xff);
    }
}

pub fn config_write(state: &mut DeviceState, offset: u64, data: &[u8]) {
    let mut command = state.engine.command_register.to_le_bytes();
    for (i, b) in data.iter().enumerate() {
        if let Some(slot) = (arch::usize_from(offset) + i)
            .checked_sub(4)
            .and_then(|at| command.get_mut(at))
        {
            *slot = *b;
        }
    }
    state.engine.command_register = u16::from_le_bytes(command);
}

/// BAR0's scratch page: a memfd the device maps itself and may hand to the
/// VMM for the guest to map.
pub struct Scratch {
    pub file: File,
    host: usize,
}

impl Scratch {
    pub fn new() -> std::io::Result<Self> {
        // SAFETY: a plain memfd_create with a static name.
        let fd = unsafe { libc::memfd_create(c"ch-test-device-bar0".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: memfd_create just returned this fd to us.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // The area sits at SCRATCH_OFFSET of the region, as in the fd.
        file.set_len(BAR0_SIZE)?;
        let host = crate::map_shared(&file, SCRATCH_OFFSET, SCRATCH_SIZE)?;
        Ok(Scratch { file, host })
    }

    /// The byte at `offset` of the scratch page (0 past its end).
    pub fn read(&self, offset: u64) -> u8 {
        if offset >= SCRATCH_SIZE {
            return 0;
        }
        // SAFETY: inside our own mapping; volatile because the guest may
        // write the same page through its memory slot.
        unsafe { std::ptr::read_volatile((self.host + arch::usize_from(offset)) as *const u8) }
    }

    pub fn write(&self, offset: u64, byte: u8) {
        if offset < SCRATCH_SIZE {
            // SAFETY: as for read.
            unsafe {
                std::ptr::write_volatile((self.host + arch::usize_from(offset)) as *mut u8, byte)
            }
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: our own mapping of SCRATCH_SIZE bytes.
        unsafe {
            libc::munmap(
                self.host as *mut libc::c_void,
                arch::usize_from(SCRATCH_SIZE),
            )
        };
    }
}

pub fn bar0_read(state: &mut DeviceState, offset: u64, data: &mut [u8]) {
    if offset >= SCRATCH_OFFSET {
        state.engine.scratch_messages += 1;
    }
    if let (Some(scratch), Some(at)) = (&state.scratch, offset.checked_sub(SCRATCH_OFFSET)) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = scratch.read(at + i as u64);
        }
        return;
    }
    let e = &state.engine;
    let value: u32 = match offset & !3 {
        0x00 => arch::low32(e.iova),
        0x04 => arch::high32(e.iova),
        0x08 => e.length,
        0x0c => u32::from(e.value),
        0x14 => e.status,
        0x18 => arch::low32(e.faults),
        0x1c => arch::low32(e.completions),
        _ => 0,
    };
    let bytes = value.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get((offset & 3) as usize + i).copied().unwrap_or(0);
    }
}

/// A register write; `state` is the shared state so streaming can start.
pub fn bar0_write(shared: &SharedState, offset: u64, data: &[u8]) {
    if offset >= SCRATCH_OFFSET {
        let mut s = lock(shared);
        s.engine.scratch_messages += 1;
        if let Some(scratch) = &s.scratch {
            for (i, b) in data.iter().enumerate() {
                scratch.write(offset - SCRATCH_OFFSET + i as u64, *b);
            }
        }
        return;
    }
    let mut word = [0u8; 4];
    for (i, b) in data.iter().take(4).enumerate() {
        word[i] = *b;
    }
    let value = u32::from_le_bytes(word);
    let mut s = lock(shared);
    match offset {
        0x00 => s.engine.iova = (s.engine.iova & !0xffff_ffff) | u64::from(value),
        0x04 => s.engine.iova = (s.engine.iova & 0xffff_ffff) | (u64::from(value) << 32),
        0x08 => s.engine.length = value,
        0x0c => s.engine.value = value.to_le_bytes()[0],
        0x10 => run_command(shared, &mut s, value),
        _ => {}
    }
}

fn run_command(shared: &SharedState, s: &mut DeviceState, command: u32) {
    let (iova, len, value) = (s.engine.iova, u64::from(s.engine.length), s.engine.value);
    let status = match command {
        COMMAND_FILL => match s.dma_fill(iova, len, value) {
            Ok(()) => STATUS_OK,
            Err(_) => STATUS_DMA_FAULT,
        },
        COMMAND_VERIFY => match s.dma_verify(iova, len, value) {
            Ok(true) => STATUS_OK,
            Ok(false) => STATUS_MISMATCH,
            Err(_) => STATUS_DMA_FAULT,
        },
        COMMAND_STREAM_START => {
            stop_stream(s);
            let stop = Arc::new(AtomicBool::new(false));
            let thread_stop = stop.clone();
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name("dma-stream".into())
                .spawn(move || stream(&shared, &thread_stop, iova, len, value));
            match spawned {
                Ok(handle) => {
                    s.engine.stream = Some((stop, handle));
                    s.engine.status = STATUS_STREAMING;
                }
                Err(_) => s.engine.status = STATUS_BAD_COMMAND,
            }
            return;
        }
        COMMAND_STREAM_STOP => {
            stop_stream(s);
            STATUS_OK
        }
        _ => STATUS_BAD_COMMAND,
    };
    if status == STATUS_DMA_FAULT {
        s.engine.faults += 1;
    }
    s.engine.status = status;
    s.engine.completions += 1;
    raise_vector(s, 0);
}

/// Asks the streaming thread to stop; it ends after its current pass.
pub fn stop_stream(s: &mut DeviceState) {
    if let Some((stop, _handle)) = s.engine.stream.take() {
        // Not joined: the thread may be waiting for the lock we hold.
        stop.store(true, Ordering::Release);
    }
}

/// Fills `iova..iova+len` with `value` again and again, each pass under
/// the state lock, so an unmap waits for the pass and no pass reaches a
/// page after its unmap.
fn stream(shared: &SharedState, stop: &AtomicBool, iova: u64, len: u64, value: u8) {
    while !stop.load(Ordering::Acquire) {
        {
            let mut s = lock(shared);
            if stop.load(Ordering::Acquire) {
                return;
            }
            if s.dma_fill(iova, len, value).is_err() {
                s.engine.faults += 1;
            }
            s.engine.stream_passes += 1;
        }
        std::thread::sleep(STREAM_PAUSE);
    }
}

fn raise_vector(s: &mut DeviceState, vector: usize) {
    if let Some(Some(fd)) = s.engine.msix.get(vector) {
        let mut fd: &File = fd;
        if fd.write_all(&1u64.to_le_bytes()).is_ok() {
            s.engine.interrupts_sent += 1;
        }
    }
}
