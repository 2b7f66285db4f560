//! What `dma=messages` costs against `dma=fd`: the in-process test device
//! (a real `vfio_user::Server` behind its message bridge) fills 4 MiB of
//! guest RAM for the guest, commanded as a guest would (BAR0 registers,
//! then COMMAND = fill, answered once the fill is done).
//!
//! - `fd (baseline)`: the 4 MiB were mapped with the RAM's fd; the device
//!   writes its own mmap of them.
//! - `messages`: mapped without an fd; the device sends four 1 MiB
//!   DMA_WRITE messages, which our client serves into guest RAM inside the
//!   REGION_WRITE that started the fill.
//!
//! Then the same pair in alternating batches (`device_fill_4mib_paired`),
//! whose ratio a shared machine moves far less.
//!
//! Run: `cargo bench -p vmm --bench message_dma`

mod paired;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use vfio_user_client::{DmaMemory, DmaMemoryError, VfioUserClient};

const RAM: u64 = 8 << 20;
const FILL: u64 = 4 << 20;
const BAR0: u32 = 0;
const STATUS_OK: u32 = 0;

/// Guest RAM: a memfd the fd-mode device maps and the client's message
/// DMA reaches through its own mapping (GPA = offset).
struct Ram {
    fd: OwnedFd,
    host: *mut u8,
}

// SAFETY: `host` is a shared mapping of `fd` that lives as long as `Ram`;
// accesses are plain byte copies, as a device's DMA would be.
unsafe impl Send for Ram {}
// SAFETY: as above.
unsafe impl Sync for Ram {}

impl Ram {
    fn new() -> Self {
        // SAFETY: memfd_create with a static name; the fd is owned at once.
        let fd = unsafe { libc::memfd_create(c"bench-ram".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: the fd was just returned to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate and a fresh shared mapping of our own fd.
        let host = unsafe {
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), RAM.cast_signed()), 0);
            libc::mmap(
                std::ptr::null_mut(),
                ::arch::usize_from(RAM),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        Ram {
            fd,
            host: host.cast(),
        }
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), String> {
        gpa.checked_add(len as u64)
            .filter(|&end| end <= RAM)
            .map(|_| ())
            .ok_or_else(|| format!("{gpa:#x}+{len:#x} is outside RAM"))
    }

    fn byte(&self, gpa: u64) -> u8 {
        // SAFETY: inside the mapping.
        unsafe { std::ptr::read_volatile(self.host.add(::arch::usize_from(gpa))) }
    }
}

impl DmaMemory for Ram {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), DmaMemoryError> {
        self.check(gpa, buf.len())?;
        // SAFETY: inside the mapping (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.host.add(::arch::usize_from(gpa)),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaMemoryError> {
        self.check(gpa, data.len())?;
        // SAFETY: inside the mapping (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.host.add(::arch::usize_from(gpa)),
                data.len(),
            )
        };
        Ok(())
    }
}

/// A test device with the first 4 MiB of RAM mapped, by fd or for
/// messages, and a client to command it.
struct Filler {
    client: VfioUserClient,
    next_value: u8,
}

impl Filler {
    fn start(tag: &str, ram: &Arc<Ram>, messages: bool) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ch-msg-dma-bench-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("dev.sock");
        test_device::serve(&socket, test_device::SharedState::default(), false).unwrap();
        let memory: Arc<dyn DmaMemory> = ram.clone();
        let mut client =
            VfioUserClient::connect(&socket, Duration::from_secs(5), Some(memory)).unwrap();
        if messages {
            client.dma_map_for_messages(0, FILL).unwrap();
        } else {
            client.dma_map(0, FILL, ram.fd.as_raw_fd(), 0).unwrap();
        }
        let _ = std::fs::remove_dir_all(&dir);
        Filler {
            client,
            next_value: 1,
        }
    }

    fn register(&mut self, offset: u64, value: u32) {
        self.client
            .region_write(BAR0, offset, &value.to_le_bytes())
            .unwrap();
    }

    /// One fill of the 4 MiB, as the guest commands it.
    fn fill(&mut self) -> u8 {
        let value = self.next_value;
        self.next_value = self.next_value.wrapping_add(1).max(1);
        self.register(0x00, 0);
        self.register(0x04, 0);
        self.register(0x08, u32::try_from(FILL).unwrap());
        self.register(0x0c, u32::from(value));
        self.register(0x10, 1);
        value
    }

    fn status(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.client.region_read(BAR0, 0x14, &mut b).unwrap();
        u32::from_le_bytes(b)
    }
}

fn fills(c: &mut Criterion) {
    let ram = Arc::new(Ram::new());
    let mut by_fd = Filler::start("fd", &ram, false);
    let mut by_messages = Filler::start("messages", &ram, true);
    // Both really fill the guest's memory.
    for filler in [&mut by_fd, &mut by_messages] {
        let value = filler.fill();
        assert_eq!(filler.status(), STATUS_OK);
        assert!(
            [0, FILL / 2, FILL - 1]
                .iter()
                .all(|&at| ram.byte(at) == value)
        );
    }
    let mut group = c.benchmark_group("device_fill_4mib");
    group.sample_size(20);
    group.bench_function("fd (baseline)", |b| b.iter(|| by_fd.fill()));
    group.bench_function("messages", |b| b.iter(|| by_messages.fill()));
    group.finish();

    fn timed(filler: &mut Filler, n: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..n {
            filler.fill();
        }
        start.elapsed()
    }
    let result = paired::compare(
        &mut |n| timed(&mut by_fd, n),
        &mut |n| timed(&mut by_messages, n),
        Duration::from_millis(40),
        21,
    );
    println!("device_fill_4mib_paired (messages over fd): {result}");
}

criterion_group!(benches, fills);
criterion_main!(benches);
