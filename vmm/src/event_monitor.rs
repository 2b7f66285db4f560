//! The event stream (`--event-monitor path=FILE|fd=N`): one JSON object per
//! line, each with a timestamp (Cloud Hypervisor's `{secs, nanos}`), a
//! source, an event name and properties. Lines go through
//! a bounded queue to a writer thread: a reader that stops reading loses
//! events (counted in `vm.counters` as `events_dropped`), never stalls a vCPU.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use hypervisor::MemoryConversion;
use log::warn;
use serde::Serialize;
use serde_json::Value;

use crate::config::EventMonitorConfig;
use crate::lossy_writer::LossyWriter;
use crate::memory::{ConversionFailure, ConversionOutcome};

/// Events waiting for the writer; past this, new events are dropped (and
/// counted) rather than making a vCPU wait for a slow reader.
pub const QUEUE_DEPTH: usize = 4096;

enum Message {
    Line(EventLine<Value>),
    /// A conversion, serialized by the writer: the vCPU that converted only
    /// copies these fields (no allocation when it succeeded).
    Conversion(Duration, ConversionProperties),
}

/// Time since the VMM started, as Cloud Hypervisor writes it (serde's
/// `Duration`: whole seconds and the nanoseconds past them).
#[derive(Serialize)]
struct Timestamp {
    secs: u64,
    nanos: u32,
}

impl From<Duration> for Timestamp {
    fn from(elapsed: Duration) -> Self {
        Timestamp {
            secs: elapsed.as_secs(),
            nanos: elapsed.subsec_nanos(),
        }
    }
}

/// One line of the stream, in Cloud Hypervisor's field order.
#[derive(Serialize)]
struct EventLine<P> {
    timestamp: Timestamp,
    source: &'static str,
    event: &'static str,
    properties: P,
}

/// The properties of a `memory` / `conversion` event.
#[derive(Serialize)]
struct ConversionProperties {
    gpa: u64,
    size: u64,
    direction: &'static str,
    result: &'static str,
    error: Option<String>,
    changed_pages: u64,
    duration_us: u64,
}

/// Writes one event line (a JSON object and a newline).
fn write_event(out: &mut impl Write, message: Message) -> std::io::Result<()> {
    match message {
        Message::Line(line) => serde_json::to_writer(&mut *out, &line),
        Message::Conversion(elapsed, properties) => serde_json::to_writer(
            &mut *out,
            &EventLine {
                timestamp: elapsed.into(),
                source: "memory",
                event: "conversion",
                properties,
            },
        ),
    }
    .map_err(std::io::Error::from)?;
    out.write_all(b"\n")
}

pub use crate::lossy_writer::flush_queue;

/// Where events go. Emitting never blocks: lines are queued for the
/// `event-monitor` thread, which does the writing.
pub struct EventMonitor {
    writer: Option<LossyWriter<Message>>,
    started: Instant,
}

#[derive(Debug, thiserror::Error)]
pub enum EventMonitorError {
    #[error("cannot open {0}")]
    Open(String, #[source] std::io::Error),
    #[error("fd {0} is not open")]
    BadFd(i32, #[source] std::io::Error),
    #[error("fd {0} is not open for writing")]
    ReadOnlyFd(i32),
    #[error("{0} is not a file, pipe, socket or terminal that takes event lines")]
    NotWritable(String),
    #[error("cannot start the event writer")]
    Thread(#[source] crate::seccomp_filters::SeccompError),
}

/// procfs and sysfs files open for writing but refuse event lines.
pub(crate) fn is_pseudo_file(file: &File) -> bool {
    const PROC_SUPER_MAGIC: i64 = 0x9fa0;
    const SYSFS_MAGIC: i64 = 0x6265_6572;
    // SAFETY: statfs is plain data; zero is a valid value for every field.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid open fd and a pointer to a live statfs.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut stat) };
    rc == 0 && matches!(stat.f_type as i64, PROC_SUPER_MAGIC | SYSFS_MAGIC)
}

fn open_sink(config: &EventMonitorConfig) -> Result<File, EventMonitorError> {
    let (file, name) = match config {
        EventMonitorConfig::Path(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let name = path.display().to_string();
            // Non-blocking, so a FIFO without a reader is an error (ENXIO)
            // rather than a VMM that never starts; blocking again after,
            // since only the writer thread writes.
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| EventMonitorError::Open(name.clone(), e))?;
            // SAFETY: F_GETFL / F_SETFL on an fd we own.
            unsafe {
                let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
            (file, name)
        }
        EventMonitorConfig::Fd(fd) => {
            // SAFETY: F_GETFL reads the fd's flags; it fails on a closed fd.
            let flags = unsafe { libc::fcntl(*fd, libc::F_GETFL) };
            if flags < 0 {
                return Err(EventMonitorError::BadFd(
                    *fd,
                    std::io::Error::last_os_error(),
                ));
            }
            if flags & libc::O_ACCMODE == libc::O_RDONLY {
                return Err(EventMonitorError::ReadOnlyFd(*fd));
            }
            // SAFETY: checked open above; the user handed it to us and
            // nothing else in the VMM uses it.
            (unsafe { File::from_raw_fd(*fd) }, format!("fd {fd}"))
        }
    };
    let kind = file
        .metadata()
        .map_err(|e| EventMonitorError::Open(name.clone(), e))?
        .file_type();
    use std::os::unix::fs::FileTypeExt;
    let takes_lines = kind.is_file() || kind.is_fifo() || kind.is_socket() || kind.is_char_device();
    if !takes_lines || is_pseudo_file(&file) {
        return Err(EventMonitorError::NotWritable(name));
    }
    Ok(file)
}

impl EventMonitor {
    pub fn disabled() -> Self {
        EventMonitor {
            writer: None,
            started: Instant::now(),
        }
    }

    /// Checks the target takes event lines and starts the writer under
    /// `filter`.
    pub fn open(
        config: &EventMonitorConfig,
        filter: Option<seccompiler::BpfProgram>,
    ) -> Result<Self, EventMonitorError> {
        let sink = std::io::BufWriter::new(open_sink(config)?);
        let writer = LossyWriter::spawn(
            "event-monitor",
            QUEUE_DEPTH,
            filter,
            sink,
            Box::new(|sink, message, _dropped| write_event(sink, message)),
            Box::new(|e| warn!("event monitor write failed: {e}")),
        )
        .map_err(EventMonitorError::Thread)?;
        Ok(EventMonitor {
            writer: Some(writer),
            started: Instant::now(),
        })
    }

    /// Events lost because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.writer.as_ref().map_or(0, LossyWriter::dropped)
    }

    /// Emits an event (`source` and `event` are names from this VMM's
    /// fixed set).
    pub fn emit(&self, source: &'static str, event: &'static str, properties: Value) {
        if let Some(writer) = &self.writer {
            writer.send(Message::Line(EventLine {
                timestamp: self.started.elapsed().into(),
                source,
                event,
                properties,
            }));
        }
    }

    /// Waits (at most `timeout`) until every event emitted so far is written.
    pub fn flush(&self, timeout: Duration) {
        if let Some(writer) = &self.writer {
            writer.flush(timeout);
        }
    }

    pub fn conversion(
        &self,
        request: &MemoryConversion,
        result: &Result<ConversionOutcome, ConversionFailure>,
        elapsed: Duration,
    ) {
        let Some(writer) = &self.writer else {
            return;
        };
        let (changed_pages, error) = match result {
            Ok(o) => (o.changed_pages, None),
            Err(e) => (0, Some(crate::error_chain(e))),
        };
        writer.send(Message::Conversion(
            self.started.elapsed(),
            ConversionProperties {
                gpa: request.gpa,
                size: request.size,
                direction: request.direction.name(),
                result: if error.is_some() { "error" } else { "ok" },
                error,
                changed_pages,
                duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            },
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::sync_channel;

    use serde_json::json;

    use super::*;

    #[test]
    fn conversion_lines_are_json_with_cloud_hypervisors_fields() {
        for error in [None, Some("a \"quoted\" reason\n".to_string())] {
            let record = Message::Conversion(
                Duration::new(3, 25),
                ConversionProperties {
                    gpa: 0x100_0000,
                    size: 0x2000,
                    direction: "private",
                    result: if error.is_some() { "error" } else { "ok" },
                    changed_pages: 2,
                    duration_us: 7,
                    error: error.clone(),
                },
            );
            let mut out = Vec::new();
            write_event(&mut out, record).unwrap();
            assert!(out.ends_with(b"\n"));
            if error.is_none() {
                // Cloud Hypervisor's field order, byte for byte.
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    concat!(
                        r#"{"timestamp":{"secs":3,"nanos":25},"source":"memory","event":"conversion","#,
                        r#""properties":{"gpa":16777216,"size":8192,"direction":"private","result":"ok","#,
                        r#""error":null,"changed_pages":2,"duration_us":7}}"#,
                        "\n"
                    )
                );
            }
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["timestamp"], json!({ "secs": 3, "nanos": 25 }));
            assert_eq!(
                (v["source"].as_str(), v["event"].as_str()),
                (Some("memory"), Some("conversion"))
            );
            let p = &v["properties"];
            assert_eq!(p["gpa"], 0x100_0000);
            assert_eq!(p["size"], 0x2000);
            assert_eq!(p["direction"], "private");
            assert_eq!(p["changed_pages"], 2);
            assert_eq!(p["duration_us"], 7);
            assert_eq!(p["result"], if error.is_some() { "error" } else { "ok" });
            assert_eq!(p["error"], json!(error));
        }
    }

    #[test]
    fn targets_that_cannot_take_lines_are_refused_at_start() {
        let open = |config: EventMonitorConfig| EventMonitor::open(&config, None).err();
        assert!(matches!(
            open(EventMonitorConfig::Path("/proc/version".into())),
            Some(EventMonitorError::NotWritable(_) | EventMonitorError::Open(..))
        ));
        assert!(matches!(
            open(EventMonitorConfig::Path("/nonexistent-dir/events".into())),
            Some(EventMonitorError::Open(..))
        ));
        assert!(matches!(
            open(EventMonitorConfig::Fd(987)),
            Some(EventMonitorError::BadFd(987, _))
        ));
        let read_only = File::open("/dev/null").unwrap();
        let fd = read_only.as_raw_fd();
        assert!(matches!(
            open(EventMonitorConfig::Fd(fd)),
            Some(EventMonitorError::ReadOnlyFd(_))
        ));
        drop(read_only);
    }

    #[test]
    fn a_reader_that_stops_reading_loses_events_but_never_blocks() {
        let (mut reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(writer);
        let monitor =
            std::sync::Arc::new(EventMonitor::open(&EventMonitorConfig::Fd(fd), None).unwrap());
        // Far more than the socket buffer and the queue together. A
        // blocking emit would never finish: nobody reads yet.
        let emitter = {
            let monitor = monitor.clone();
            std::thread::spawn(move || {
                let pad = "x".repeat(256);
                for _ in 0..(QUEUE_DEPTH * 4) {
                    monitor.emit("test", "event", json!({ "pad": pad }));
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !emitter.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(emitter.is_finished(), "emit blocked on a stalled reader");
        emitter.join().unwrap();
        assert!(monitor.dropped() > 0);
        // A reader that comes back gets whole lines.
        reader
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut first = vec![0u8; 64];
        std::io::Read::read_exact(&mut reader, &mut first).unwrap();
        assert!(
            first.starts_with(b"{"),
            "{:?}",
            String::from_utf8_lossy(&first)
        );
    }

    #[test]
    fn events_reach_the_file_in_order_and_flush_waits_for_them() {
        let path = crate::test_util::scratch_path("events-file");
        let monitor = EventMonitor::open(&EventMonitorConfig::Path(path.clone()), None).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        monitor.emit("vm", "booted", json!({ "id": 1 }));
        let request = MemoryConversion {
            gpa: 0x20_0000,
            size: 0x3000,
            direction: hypervisor::ConversionDirection::ToShared,
        };
        let ok = Ok(crate::memory::ConversionOutcome { changed_pages: 3 });
        monitor.conversion(&request, &ok, Duration::from_micros(42));
        let refused = Err(ConversionFailure::OutOfRange {
            gpa: 0x20_0000,
            size: 0x3000,
        });
        monitor.conversion(&request, &refused, Duration::from_micros(5));
        // The writer runs on its own thread: without the flush the lines may
        // not be there yet.
        monitor.flush(Duration::from_secs(5));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(
            (
                &lines[0]["source"],
                &lines[0]["event"],
                &lines[0]["properties"]
            ),
            (&json!("vm"), &json!("booted"), &json!({ "id": 1 }))
        );
        let at = |line: &Value| {
            let t = &line["timestamp"];
            Duration::new(
                t["secs"].as_u64().unwrap(),
                u32::try_from(t["nanos"].as_u64().unwrap()).unwrap(),
            )
        };
        // Time since the monitor started, in emission order.
        assert!(at(&lines[0]) >= Duration::from_millis(20), "{}", lines[0]);
        assert!(at(&lines[0]) <= at(&lines[1]) && at(&lines[1]) <= at(&lines[2]));
        let p = &lines[1]["properties"];
        assert_eq!(
            (&p["result"], &p["changed_pages"], &p["duration_us"]),
            (&json!("ok"), &json!(3), &json!(42))
        );
        assert_eq!(p["direction"], "shared");
        let p = &lines[2]["properties"];
        assert_eq!(p["result"], "error");
        assert!(
            p["error"]
                .as_str()
                .unwrap()
                .contains("not entirely guest_memfd RAM")
        );
        assert_eq!(monitor.dropped(), 0);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_fifo_with_a_reader_is_written_blocking_and_one_without_is_refused() {
        let path = crate::test_util::scratch_path("events-fifo");
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        let config = EventMonitorConfig::Path(path.clone());
        assert!(matches!(
            open_sink(&config),
            Err(EventMonitorError::Open(..))
        ));
        let reader = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path)
                .unwrap()
        };
        let sink = open_sink(&config).unwrap();
        // SAFETY: F_GETFL on an fd we own.
        let flags = unsafe { libc::fcntl(sink.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(
            flags & libc::O_NONBLOCK,
            0,
            "the writer thread blocks on a full pipe"
        );
        assert_eq!(flags & libc::O_APPEND, libc::O_APPEND);
        drop((sink, reader));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_flush_waits_for_room_until_its_deadline() {
        // Room comes before the deadline: the marker goes out and the flush
        // returns once it is answered.
        let (queue, lines) = sync_channel::<u32>(1);
        queue.send(1).unwrap();
        let (answer, written) = sync_channel(1);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let first = lines.recv().unwrap();
            let marker = lines.recv().unwrap();
            answer.send(()).unwrap();
            (first, marker)
        });
        let started = Instant::now();
        flush_queue(&queue, 2, &written, Duration::from_secs(5));
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(writer.join().unwrap(), (1, 2));

        // A writer that never drains: the flush gives up at its deadline.
        let (queue, _lines) = sync_channel::<u32>(1);
        queue.send(1).unwrap();
        let (_answer, written) = sync_channel(1);
        let started = Instant::now();
        flush_queue(&queue, 2, &written, Duration::from_millis(100));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}
