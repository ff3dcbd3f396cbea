//! 16550A UART (COM1) backed by vm-superio, wired to a host writer, plus the
//! console scanner that notices a guest kernel panic in the output.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::Trigger;

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

/// The UART's registers and unread input, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// DLL, DLM, IER, IIR, LCR, LSR, MCR, MSR, SCR, in that order.
    pub regs: [u8; 9],
    /// Input the guest has not read yet.
    pub input: Vec<u8>,
}

impl Serial {
    /// The state to save.
    pub fn save_state(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            input: s.in_buffer,
        }
    }

    /// Loads saved registers, keeping this UART's interrupt and output.
    pub fn restore_state(&mut self, snap: &SerialSnapshot) -> Result<(), String> {
        if snap.input.len() > 64 {
            return Err(format!(
                "serial: {} bytes of pending input exceed the 64-byte FIFO",
                snap.input.len()
            ));
        }
        let r = snap.regs;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: snap.input.clone(),
        };
        let trigger = self
            .inner
            .interrupt_evt()
            .try_clone()
            .map_err(|e| format!("serial: {e}"))?;
        let placeholder = vm_superio::Serial::new(
            trigger.try_clone().map_err(|e| format!("serial: {e}"))?,
            ConsoleWriter::new(Box::new(io::sink()), Arc::default()),
        );
        let old = std::mem::replace(&mut self.inner, placeholder);
        let out = old.into_writer();
        self.inner =
            vm_superio::Serial::from_state(&state, trigger, vm_superio::serial::NoEvents, out)
                .map_err(|e| format!("serial: {e:?}"))?;
        // An interrupt the UART had raised may not have reached the
        // interrupt controller before the snapshot (the irqfd write is not
        // part of any state): raise it again. A spurious one is harmless.
        if r[3] & 1 == 0 {
            self.inner
                .interrupt_evt()
                .trigger()
                .map_err(|e| format!("serial: {e}"))?;
        }
        Ok(())
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

    #[test]
    fn state_survives_save_and_restore() {
        let new = || {
            Serial::new(
                EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
                ConsoleWriter::new(Box::new(Sink::default()), Arc::default()),
            )
        };
        let mut a = new();
        a.write(1, &[0x0f]); // IER
        a.write(3, &[0x03]); // LCR: 8N1
        a.write(7, &[0x5a]); // scratch
        assert_eq!(a.enqueue_input(b"hi"), 2);
        let snap = a.save_state();
        assert_eq!(snap.input, b"hi");

        let out = Sink::default();
        let mut b = Serial::new(
            EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
            ConsoleWriter::new(Box::new(out.clone()), Arc::default()),
        );
        b.restore_state(&snap).unwrap();
        assert_eq!(b.save_state(), snap);
        let mut byte = [0u8];
        b.read(7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        b.read(0, &mut byte);
        assert_eq!(byte[0], b'h', "pending input is still there");
        // Output still goes to b's own writer.
        b.write(0, b"!");
        assert_eq!(*out.0.lock().unwrap(), b"!");

        let mut too_much = snap;
        too_much.input = vec![0; 65];
        assert!(b.restore_state(&too_much).unwrap_err().contains("FIFO"));
    }
}
