//! 16550A UART (COM1) backed by vm-superio, wired to a host writer, plus the
//! console scanner that notices a guest kernel panic in the output.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{BusDevice, EventFdTrigger};

/// COM1 base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;

const PANIC_TEXT: &[u8] = b"Kernel panic - not syncing";

/// A writer that forwards the guest console to `out` and raises `panicked`
/// when the kernel prints its panic banner.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    panicked: Arc<AtomicBool>,
}

impl ConsoleWriter {
    /// Wraps `out`; `panicked` is set when a panic line goes by.
    pub fn new(out: Box<dyn Write + Send>, panicked: Arc<AtomicBool>) -> Self {
        Self {
            out,
            line: Vec::with_capacity(256),
            panicked,
        }
    }

    fn scan(&mut self, b: u8) {
        if b == b'\n' {
            self.line.clear();
            return;
        }
        if self.line.len() < 512 {
            self.line.push(b);
        }
        if self.line.ends_with(PANIC_TEXT) {
            self.panicked.store(true, Ordering::SeqCst);
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            self.scan(b);
        }
        // A closed or full host console must not stop the guest.
        let _ = self.out.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.out.flush();
        Ok(())
    }
}

/// The UART as a bus device on ports 0x3f8..0x400.
pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl Serial {
    /// A UART raising `irq` and writing its output to `out`.
    pub fn new(irq: EventFdTrigger, out: ConsoleWriter) -> Self {
        Self {
            inner: vm_superio::Serial::new(irq, out),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.inner.fifo_capacity() == 0 {
            return 0;
        }
        match self.inner.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: input dropped: {e}");
                0
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.inner.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.inner.write(offset as u8, data[0]) {
                log::warn!("serial: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_writer_and_panic_is_noticed() {
        let sink = Sink::default();
        let panicked = Arc::new(AtomicBool::new(false));
        let irq = EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut s = Serial::new(
            irq,
            ConsoleWriter::new(Box::new(sink.clone()), panicked.clone()),
        );
        for b in b"hello\nKernel panic - not" {
            s.write(0, &[*b]);
        }
        assert_eq!(&sink.0.lock().unwrap()[..], b"hello\nKernel panic - not");
        assert!(!panicked.load(Ordering::SeqCst));
        for b in b" syncing: boom\n" {
            s.write(0, &[*b]);
        }
        assert!(panicked.load(Ordering::SeqCst));
    }

    #[test]
    fn input_is_readable_by_guest() {
        let panicked = Arc::new(AtomicBool::new(false));
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFdTrigger::new(evt.try_clone().unwrap());
        let mut s = Serial::new(irq, ConsoleWriter::new(Box::new(io::sink()), panicked));
        // Enable the received-data interrupt as a driver would.
        s.write(1, &[0x01]);
        assert_eq!(s.enqueue_input(b"ab"), 2);
        assert_eq!(evt.read().unwrap(), 1);
        let mut b = [0u8];
        s.read(0, &mut b);
        assert_eq!(b[0], b'a');
        s.read(0, &mut b);
        assert_eq!(b[0], b'b');
    }
}
