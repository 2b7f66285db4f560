//! 16550A UART console (vm-superio) with output to any writer.

use std::io::Write;
use std::sync::Mutex;

use vm_device::BusDevice;
use vm_superio::{Serial, Trigger};

/// The console has no interrupt line: the test guests poll-free write only.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Flushes at every newline so console lines show up while the VM runs.
struct LineFlush(Box<dyn Write + Send>);

impl Write for LineFlush {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.0.write(buf)?;
        if buf[..n].contains(&b'\n') {
            self.0.flush()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

type Uart = Serial<NoInterrupt, vm_superio::serial::NoEvents, LineFlush>;

pub struct SerialConsole {
    uart: Mutex<Uart>,
}

impl SerialConsole {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Mutex::new(Serial::new(NoInterrupt, LineFlush(out))),
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if let (Ok(offset), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.lock().unwrap().read(offset);
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Some(value)) = (u8::try_from(offset), data.first())
            && let Err(e) = self.uart.lock().unwrap().write(offset, *value)
        {
            log::warn!("serial write failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A writer that shows bytes only once flushed, as stdout does.
    #[derive(Clone, Default)]
    struct Buffered {
        pending: Arc<Mutex<Vec<u8>>>,
        shown: Arc<Mutex<Vec<u8>>>,
    }
    impl Write for Buffered {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.pending.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            let mut pending = self.pending.lock().unwrap();
            self.shown.lock().unwrap().append(&mut pending);
            Ok(())
        }
    }

    /// A console on `out` whose guest wrote `bytes` to the transmit
    /// register, one at a time.
    fn typed(out: Box<dyn Write + Send>, bytes: &[u8]) -> SerialConsole {
        let console = SerialConsole::new(out);
        for b in bytes {
            console.write(0, &[*b]);
        }
        console
    }

    #[test]
    fn a_prompt_without_a_newline_is_shown_at_once() {
        let out = Buffered::default();
        let _console = typed(Box::new(out.clone()), b"login: ");
        assert_eq!(out.shown.lock().unwrap().as_slice(), b"login: ");
    }

    #[test]
    fn transmit_register_reaches_the_writer() {
        let sink = Sink::default();
        let console = typed(Box::new(sink.clone()), b"hi\n");
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"hi\n");
        let mut lsr = [0u8];
        console.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter always empty");
    }
}
