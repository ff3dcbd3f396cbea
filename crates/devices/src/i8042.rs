//! The i8042 keyboard controller with a PS/2 keyboard behind it.
//!
//! Ports: data at 0x60, status/command at 0x64 (registered at 0x60, length 5).
//!
//! What the guest sees:
//! - the controller: status register, command byte (0x20/0x60), self tests
//!   (0xAA/0xAB/0xA9), keyboard and aux enable/disable (0xAD/0xAE/0xA7/0xA8),
//!   input/output ports (0xC0/0xD0/0xD1), output buffer writes (0xD2/0xD3),
//!   and the CPU reset line (0xFE, or an output port write with bit 0
//!   clear): `reboot=k` ends the VM through `reset`;
//! - an aux (mouse) channel with no device on it: bytes sent to it (0xD4)
//!   come back as 0xFE with the timeout bit, so a mouse driver gives up at
//!   once instead of waiting;
//! - a keyboard answering the usual commands (reset, identify, LEDs,
//!   typematic rate, scan code set, enable/disable, echo) and producing key
//!   codes in its current scan code set (2 by default), translated to set 1
//!   when the command byte's translation bit is set;
//! - IRQ 1 pulses when a byte reaches the head of the output buffer while
//!   the command byte enables that channel's interrupt (IRQ 12 is not
//!   wired: no mouse).
//!
//! [`I8042::send_ctrl_alt_del`] types Ctrl-Alt-Del (press and release), which
//! Linux's keyboard layer turns into a reboot by default.

use std::collections::VecDeque;

use vm_superio::Trigger;

use crate::{BusDevice, EventFdTrigger};

/// First I/O port (data); the command/status port is at +4.
pub const I8042_PORT: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// The keyboard's IRQ (GSI).
pub const I8042_IRQ: u32 = 1;

// Status register bits.
const STS_OBF: u8 = 1 << 0;
const STS_SYS: u8 = 1 << 2;
const STS_CMD: u8 = 1 << 3;
/// Set when the keyboard is *not* locked.
const STS_UNLOCKED: u8 = 1 << 4;
const STS_AUX: u8 = 1 << 5;
const STS_TIMEOUT: u8 = 1 << 6;

// Command byte bits.
/// Keyboard interrupt enable.
pub const CB_KBD_INT: u8 = 1 << 0;
/// Aux interrupt enable.
pub const CB_AUX_INT: u8 = 1 << 1;
/// System flag.
pub const CB_SYS: u8 = 1 << 2;
/// Keyboard interface disabled.
pub const CB_KBD_DIS: u8 = 1 << 4;
/// Aux interface disabled.
pub const CB_AUX_DIS: u8 = 1 << 5;
/// Translate keyboard codes to set 1.
pub const CB_XLATE: u8 = 1 << 6;

/// The command byte a PC BIOS leaves behind: interrupts for the keyboard,
/// system flag, aux disabled, translation on.
const CB_INITIAL: u8 = CB_KBD_INT | CB_SYS | CB_AUX_DIS | CB_XLATE;
/// Output port: bit 0 is the (active low) reset line, bit 1 the A20 gate.
const OUTPORT_INITIAL: u8 = 0x03;

/// Keyboard answers.
const KBD_ACK: u8 = 0xfa;
const KBD_RESEND: u8 = 0xfe;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_ECHO: u8 = 0xee;
/// A standard MF2 keyboard's identity.
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Output buffer size; bytes beyond it are dropped (a real keyboard
/// buffers 16 keys).
pub const BUFFER_SIZE: usize = 64;

/// Why keys could not be typed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyboardError {
    /// The guest disabled scanning (command 0xF5) and not enabled it again.
    #[error("the guest has disabled its keyboard")]
    ScanningDisabled,
    /// The guest does not read its keyboard.
    #[error("the keyboard buffer is full (the guest is not reading its keyboard)")]
    BufferFull,
}

/// One byte waiting in the output buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct OutByte {
    value: u8,
    aux: bool,
    timeout: bool,
}

/// Where the data byte of a controller write command (written to port
/// 0x60 next) goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum CtlArg {
    CommandByte,
    Ram,
    OutputPort,
    KbdBuffer,
    AuxBuffer,
    AuxDevice,
}

/// A keyboard command waiting for its argument byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum KbdArg {
    Leds,
    Typematic,
    ScanCodeSet,
}

/// The PS/2 keyboard's state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Keyboard {
    scanning: bool,
    set: u8,
    leds: u8,
    typematic: u8,
    pending: Option<KbdArg>,
}

impl Default for Keyboard {
    fn default() -> Self {
        Self {
            scanning: true,
            set: 2,
            leds: 0,
            typematic: 0x2b,
            pending: None,
        }
    }
}

/// A key Kiln can type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    LeftCtrl,
    LeftAlt,
    Delete,
}

/// (prefix, code) of `key` in scan code set `set` (1, 2 or 3).
fn make_code(key: Key, set: u8) -> (Option<u8>, u8) {
    match (set, key) {
        (1, Key::LeftCtrl) => (None, 0x1d),
        (1, Key::LeftAlt) => (None, 0x38),
        (1, Key::Delete) => (Some(0xe0), 0x53),
        (3, Key::LeftCtrl) => (None, 0x11),
        (3, Key::LeftAlt) => (None, 0x19),
        (3, Key::Delete) => (None, 0x64),
        (_, Key::LeftCtrl) => (None, 0x14),
        (_, Key::LeftAlt) => (None, 0x11),
        (_, Key::Delete) => (Some(0xe0), 0x71),
    }
}

/// The bytes of pressing (`down`) or releasing `key` in set `set`.
fn key_bytes(key: Key, down: bool, set: u8) -> Vec<u8> {
    let (prefix, code) = make_code(key, set);
    let mut out: Vec<u8> = prefix.into_iter().collect();
    match (set, down) {
        (_, true) => out.push(code),
        (1, false) => out.push(code | 0x80),
        (_, false) => out.extend([0xf0, code]),
    }
    out
}

/// The controller's set 2 → set 1 translation, for the set 2 codes the
/// keyboard can produce here (the 0xF0 release prefix sets bit 7 of the
/// next code).
fn translate(set2: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(set2.len());
    let mut release = false;
    for &b in set2 {
        if b == 0xf0 {
            release = true;
            continue;
        }
        let t = match b {
            0x14 => 0x1d,
            0x11 => 0x38,
            0x71 => 0x53,
            0x83 => 0x41,
            other => other,
        };
        out.push(if release && b != 0xe0 { t | 0x80 } else { t });
        if b != 0xe0 {
            release = false;
        }
    }
    out
}

/// The i8042 controller and its keyboard.
pub struct I8042 {
    reset: EventFdTrigger,
    irq: Option<EventFdTrigger>,
    out: VecDeque<OutByte>,
    /// What port 0x60 returns when the buffer is empty (the last byte).
    last: u8,
    command_byte: u8,
    output_port: u8,
    /// The last write went to the command port.
    cmd_flag: bool,
    pending: Option<CtlArg>,
    kbd: Keyboard,
}

impl I8042 {
    /// A controller whose reset line signals `reset`, without an interrupt
    /// line (the guest then has to poll).
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            reset,
            irq: None,
            out: VecDeque::new(),
            last: 0,
            command_byte: CB_INITIAL,
            output_port: OUTPORT_INITIAL,
            cmd_flag: false,
            pending: None,
            kbd: Keyboard::default(),
        }
    }

    /// Raises `irq` (the keyboard's IRQ 1) for keyboard bytes.
    pub fn with_irq(mut self, irq: EventFdTrigger) -> Self {
        self.irq = Some(irq);
        self
    }

    /// The status register.
    pub fn status(&self) -> u8 {
        let mut s = STS_UNLOCKED;
        if let Some(b) = self.out.front() {
            s |= STS_OBF;
            if b.aux {
                s |= STS_AUX;
            }
            if b.timeout {
                s |= STS_TIMEOUT;
            }
        }
        if self.command_byte & CB_SYS != 0 {
            s |= STS_SYS;
        }
        if self.cmd_flag {
            s |= STS_CMD;
        }
        s
    }

    /// The controller command byte.
    pub fn command_byte(&self) -> u8 {
        self.command_byte
    }

    /// Types Ctrl-Alt-Del: Ctrl and Alt down, Delete down, then all three
    /// up, in the keyboard's scan code set (translated to set 1 when the
    /// command byte says so).
    pub fn send_ctrl_alt_del(&mut self) -> Result<(), KeyboardError> {
        if !self.kbd.scanning {
            return Err(KeyboardError::ScanningDisabled);
        }
        let set = self.kbd.set;
        let mut bytes = Vec::new();
        for (key, down) in [
            (Key::LeftCtrl, true),
            (Key::LeftAlt, true),
            (Key::Delete, true),
            (Key::Delete, false),
            (Key::LeftAlt, false),
            (Key::LeftCtrl, false),
        ] {
            bytes.extend(key_bytes(key, down, set));
        }
        if set == 2 && self.command_byte & CB_XLATE != 0 {
            bytes = translate(&bytes);
        }
        if self.out.len() + bytes.len() > BUFFER_SIZE {
            return Err(KeyboardError::BufferFull);
        }
        for b in bytes {
            self.push(b, false, false);
        }
        Ok(())
    }

    /// Queues a byte; the interrupt fires when it is the new head.
    fn push(&mut self, value: u8, aux: bool, timeout: bool) {
        if self.out.len() >= BUFFER_SIZE {
            log::debug!("i8042: output buffer full, dropping {value:#04x}");
            return;
        }
        self.out.push_back(OutByte {
            value,
            aux,
            timeout,
        });
        if self.out.len() == 1 {
            self.interrupt();
        }
    }

    /// A controller answer: ahead of keyboard bytes (the controller holds
    /// the keyboard while it runs a command).
    fn push_controller(&mut self, value: u8) {
        if self.out.len() >= BUFFER_SIZE {
            self.out.pop_back();
        }
        self.out.push_front(OutByte {
            value,
            aux: false,
            timeout: false,
        });
        self.interrupt();
    }

    fn interrupt(&self) {
        let Some(head) = self.out.front() else { return };
        let enabled = if head.aux {
            // No mouse: IRQ 12 is not wired.
            false
        } else {
            self.command_byte & CB_KBD_INT != 0
        };
        if let (true, Some(irq)) = (enabled, &self.irq) {
            if let Err(e) = irq.trigger() {
                log::error!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    fn pulse_reset(&self) {
        if let Err(e) = self.reset.trigger() {
            log::error!("i8042: failed to signal reset: {e}");
        }
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.out.pop_front() {
            self.last = b.value;
            self.interrupt();
        }
        self.last
    }

    fn write_command(&mut self, cmd: u8) {
        self.cmd_flag = true;
        self.pending = None;
        match cmd {
            0x20..=0x3f => {
                let v = if cmd == 0x20 { self.command_byte } else { 0 };
                self.push_controller(v);
            }
            0x60 => self.pending = Some(CtlArg::CommandByte),
            0x61..=0x7f => self.pending = Some(CtlArg::Ram),
            // Password installed? No.
            0xa4 => self.push_controller(0xf1),
            0xa7 => self.command_byte |= CB_AUX_DIS,
            0xa8 => self.command_byte &= !CB_AUX_DIS,
            // Aux interface test: the lines are fine; the missing device
            // shows when bytes are sent to it (0xD4).
            0xa9 => self.push_controller(0x00),
            0xaa => {
                self.command_byte |= CB_SYS;
                self.push_controller(0x55);
            }
            0xab => self.push_controller(0x00),
            0xad => self.command_byte |= CB_KBD_DIS,
            0xae => self.command_byte &= !CB_KBD_DIS,
            // Input port: keyboard not inhibited.
            0xc0 => self.push_controller(0x80),
            0xd0 => self.push_controller(self.output_port),
            0xd1 => self.pending = Some(CtlArg::OutputPort),
            0xd2 => self.pending = Some(CtlArg::KbdBuffer),
            0xd3 => self.pending = Some(CtlArg::AuxBuffer),
            0xd4 => self.pending = Some(CtlArg::AuxDevice),
            // Pulse output lines: bit 0 low pulses the reset line.
            0xf0..=0xff => {
                if cmd & 1 == 0 {
                    self.pulse_reset();
                }
            }
            other => log::debug!("i8042: ignoring controller command {other:#04x}"),
        }
    }

    fn write_data(&mut self, v: u8) {
        self.cmd_flag = false;
        match self.pending.take() {
            Some(CtlArg::CommandByte) => {
                self.command_byte = v;
                // Interrupts just enabled with data waiting.
                self.interrupt();
            }
            Some(CtlArg::Ram) => {}
            Some(CtlArg::OutputPort) => {
                self.output_port = v;
                if v & 1 == 0 {
                    self.pulse_reset();
                }
            }
            Some(CtlArg::KbdBuffer) => self.push(v, false, false),
            Some(CtlArg::AuxBuffer) => self.push(v, true, false),
            // Nothing on the aux port answers.
            Some(CtlArg::AuxDevice) => self.push(0xfe, true, true),
            None => self.keyboard_write(v),
        }
    }

    fn keyboard_write(&mut self, v: u8) {
        if let Some(arg) = self.kbd.pending.take() {
            match arg {
                KbdArg::Leds => {
                    self.kbd.leds = v & 0x07;
                    self.push(KBD_ACK, false, false);
                }
                KbdArg::Typematic => {
                    self.kbd.typematic = v & 0x7f;
                    self.push(KBD_ACK, false, false);
                }
                KbdArg::ScanCodeSet => match v {
                    0 => {
                        self.push(KBD_ACK, false, false);
                        let set = self.kbd.set;
                        self.push(set, false, false);
                    }
                    1..=3 => {
                        self.kbd.set = v;
                        self.push(KBD_ACK, false, false);
                    }
                    _ => self.push(KBD_RESEND, false, false),
                },
            }
            return;
        }
        match v {
            0xed => {
                self.kbd.pending = Some(KbdArg::Leds);
                self.push(KBD_ACK, false, false);
            }
            0xee => self.push(KBD_ECHO, false, false),
            0xf0 => {
                self.kbd.pending = Some(KbdArg::ScanCodeSet);
                self.push(KBD_ACK, false, false);
            }
            0xf2 => {
                self.push(KBD_ACK, false, false);
                let id = if self.command_byte & CB_XLATE != 0 {
                    translate(&KBD_ID)
                } else {
                    KBD_ID.to_vec()
                };
                for b in id {
                    self.push(b, false, false);
                }
            }
            0xf3 => {
                self.kbd.pending = Some(KbdArg::Typematic);
                self.push(KBD_ACK, false, false);
            }
            0xf4 => {
                self.kbd.scanning = true;
                self.push(KBD_ACK, false, false);
            }
            0xf5 => {
                let set = self.kbd.set;
                self.kbd = Keyboard {
                    scanning: false,
                    set,
                    ..Keyboard::default()
                };
                self.push(KBD_ACK, false, false);
            }
            0xf6 => {
                let set = self.kbd.set;
                self.kbd = Keyboard {
                    set,
                    ..Keyboard::default()
                };
                self.push(KBD_ACK, false, false);
            }
            // Set 3 key type commands: accepted, no effect.
            0xf7..=0xfd => self.push(KBD_ACK, false, false),
            // Resend: the last byte again.
            0xfe => {
                let last = self.last;
                self.push(last, false, false);
            }
            0xff => {
                self.kbd = Keyboard::default();
                self.push(KBD_ACK, false, false);
                self.push(KBD_BAT_OK, false, false);
            }
            other => {
                log::debug!("i8042: unknown keyboard command {other:#04x}");
                self.push(KBD_RESEND, false, false);
            }
        }
    }
}

/// The controller's and keyboard's state, as saved in a snapshot: the
/// bytes the guest has not read, the command byte, the output port, a
/// command waiting for its data byte, and the keyboard's settings.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042Snapshot {
    out: Vec<OutByte>,
    last: u8,
    command_byte: u8,
    output_port: u8,
    cmd_flag: bool,
    pending: Option<CtlArg>,
    kbd: Keyboard,
}

impl I8042 {
    /// The state to save.
    pub fn save_state(&self) -> I8042Snapshot {
        I8042Snapshot {
            out: self.out.iter().copied().collect(),
            last: self.last,
            command_byte: self.command_byte,
            output_port: self.output_port,
            cmd_flag: self.cmd_flag,
            pending: self.pending,
            kbd: self.kbd.clone(),
        }
    }

    /// Loads saved state, keeping this controller's reset and interrupt
    /// lines. No interrupt is raised: one pending at snapshot time is in the
    /// saved interrupt controller state.
    pub fn restore_state(&mut self, snap: &I8042Snapshot) -> Result<(), String> {
        if snap.out.len() > BUFFER_SIZE {
            return Err(format!(
                "i8042: {} bytes waiting exceed the {BUFFER_SIZE}-byte buffer",
                snap.out.len()
            ));
        }
        if !(1..=3).contains(&snap.kbd.set) {
            return Err(format!(
                "i8042: scan code set {} is not 1, 2 or 3",
                snap.kbd.set
            ));
        }
        self.out = snap.out.iter().copied().collect();
        self.last = snap.last;
        self.command_byte = snap.command_byte;
        self.output_port = snap.output_port;
        self.cmd_flag = snap.cmd_flag;
        self.pending = snap.pending;
        self.kbd = snap.kbd.clone();
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match (data.len(), offset) {
            (1, 0) => self.read_data(),
            (1, 4) => self.status(),
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (data, offset) {
            ([v], 0) => self.write_data(*v),
            ([v], 4) => self.write_command(*v),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    struct Rig {
        dev: I8042,
        reset: EventFd,
        irq: EventFd,
    }

    fn rig() -> Rig {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042::new(EventFdTrigger::new(reset.try_clone().unwrap()))
            .with_irq(EventFdTrigger::new(irq.try_clone().unwrap()));
        Rig { dev, reset, irq }
    }

    impl Rig {
        fn cmd(&mut self, v: u8) {
            self.dev.write(4, &[v]);
        }
        fn data(&mut self, v: u8) {
            self.dev.write(0, &[v]);
        }
        fn status(&mut self) -> u8 {
            let mut b = [0];
            self.dev.read(4, &mut b);
            b[0]
        }
        /// Everything in the output buffer, as the guest reads it.
        fn drain(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            while self.status() & STS_OBF != 0 {
                let mut b = [0];
                self.dev.read(0, &mut b);
                out.push(b[0]);
                assert!(out.len() <= BUFFER_SIZE, "the buffer never empties");
            }
            out
        }
        fn irqs(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }
        fn resets(&self) -> u64 {
            self.reset.read().unwrap_or(0)
        }
    }

    #[test]
    fn reset_command_pulses_the_reset_line() {
        let mut r = rig();
        assert_eq!(r.resets(), 0);
        r.cmd(0xfe);
        assert_eq!(r.resets(), 1);
        // Output port write with bit 0 clear also resets; 0xdf (A20 on,
        // Linux does this at probe) does not.
        r.cmd(0xd1);
        r.data(0xdf);
        // Linux's "null command" 0xff pulses no line.
        r.cmd(0xff);
        assert_eq!(r.resets(), 0);
        r.cmd(0xd0);
        assert_eq!(r.drain(), vec![0xdf]);
        r.cmd(0xd1);
        r.data(0xde);
        assert_eq!(r.resets(), 1);
    }

    #[test]
    fn controller_commands_answer() {
        let mut r = rig();
        // Keylock off, system flag set, buffer empty.
        assert_eq!(
            r.status() & (STS_OBF | STS_SYS | STS_UNLOCKED),
            STS_SYS | STS_UNLOCKED
        );
        r.cmd(0xaa);
        assert_ne!(r.status() & STS_CMD, 0, "last write was a command");
        assert_eq!(r.drain(), vec![0x55]);
        r.cmd(0xab);
        assert_eq!(r.drain(), vec![0x00]);
        r.cmd(0x20);
        assert_eq!(r.drain(), vec![CB_INITIAL]);
        // Write a command byte without interrupts, read it back.
        r.cmd(0x60);
        r.data(0x74);
        assert_eq!(r.status() & STS_CMD, 0);
        r.cmd(0x20);
        assert_eq!(r.drain(), vec![0x74]);
        r.cmd(0xae);
        r.cmd(0xa8);
        r.cmd(0x20);
        assert_eq!(r.drain(), vec![0x44]);
        r.cmd(0xad);
        r.cmd(0xa7);
        assert_eq!(r.dev.command_byte(), 0x74);
        // Unknown commands are ignored.
        r.cmd(0x01);
        r.cmd(0xc8);
        assert_eq!(r.drain(), Vec::<u8>::new());
        assert_eq!(r.resets(), 0);
    }

    #[test]
    fn aux_channel_has_no_device() {
        let mut r = rig();
        r.cmd(0xd3);
        r.data(0x5a);
        assert_eq!(r.status() & (STS_OBF | STS_AUX), STS_OBF | STS_AUX);
        assert_eq!(r.drain(), vec![0x5a]);
        r.cmd(0xd4);
        r.data(0xf2);
        let s = r.status();
        assert_eq!(s & (STS_AUX | STS_TIMEOUT), STS_AUX | STS_TIMEOUT);
        assert_eq!(r.drain(), vec![0xfe]);
        assert_eq!(r.status() & (STS_AUX | STS_TIMEOUT), 0);
        r.cmd(0xa9);
        assert_eq!(r.drain(), vec![0x00]);
    }

    #[test]
    fn keyboard_commands_are_acknowledged() {
        let mut r = rig();
        r.data(0xff);
        assert_eq!(r.drain(), vec![0xfa, 0xaa]);
        // Translated identity (the command byte has translation on).
        r.data(0xf2);
        assert_eq!(r.drain(), vec![0xfa, 0xab, 0x41]);
        r.cmd(0x60);
        r.data(0x05);
        r.data(0xf2);
        assert_eq!(r.drain(), vec![0xfa, 0xab, 0x83]);
        r.data(0xed);
        r.data(0x07);
        assert_eq!(r.drain(), vec![0xfa, 0xfa]);
        r.data(0xf3);
        r.data(0x20);
        assert_eq!(r.drain(), vec![0xfa, 0xfa]);
        r.data(0xf0);
        r.data(0x00);
        assert_eq!(r.drain(), vec![0xfa, 0xfa, 0x02]);
        r.data(0xf0);
        r.data(0x09);
        assert_eq!(r.drain(), vec![0xfa, 0xfe]);
        r.data(0xee);
        assert_eq!(r.drain(), vec![0xee]);
        r.data(0xf5);
        r.data(0xf4);
        r.data(0xf6);
        assert_eq!(r.drain(), vec![0xfa, 0xfa, 0xfa]);
        r.data(0x12);
        assert_eq!(r.drain(), vec![0xfe]);
        // Resend repeats the last byte read.
        r.data(0xfe);
        assert_eq!(r.drain(), vec![0xfe]);
    }

    #[test]
    fn irq_fires_for_each_byte_when_enabled() {
        let mut r = rig();
        // Linux disables keyboard interrupts while it probes.
        r.cmd(0x60);
        r.data(CB_INITIAL & !CB_KBD_INT);
        r.irqs();
        r.data(0xff);
        assert_eq!(r.irqs(), 0);
        // Enabling interrupts with data waiting raises one.
        r.cmd(0x60);
        r.data(CB_INITIAL);
        assert_eq!(r.irqs(), 1);
        // One interrupt per byte as each reaches the head.
        let mut b = [0];
        r.dev.read(0, &mut b);
        assert_eq!(b[0], 0xfa);
        assert_eq!(r.irqs(), 1);
        r.dev.read(0, &mut b);
        assert_eq!(b[0], 0xaa);
        assert_eq!(r.irqs(), 0);
        // Reading an empty buffer returns the last byte again.
        r.dev.read(0, &mut b);
        assert_eq!(b[0], 0xaa);
        r.data(0xf4);
        assert_eq!(r.irqs(), 1);
        r.drain();
        // Aux bytes do not raise IRQ 1.
        r.irqs();
        r.cmd(0xd3);
        r.data(0x01);
        assert_eq!(r.irqs(), 0);
    }

    #[test]
    fn ctrl_alt_del_in_each_scan_code_mode() {
        let mut r = rig();
        // Translated set 2 (how Linux leaves a PC controller): set 1 codes.
        r.dev.send_ctrl_alt_del().unwrap();
        assert_ne!(r.irqs(), 0);
        assert_eq!(
            r.drain(),
            vec![0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
        );
        // Untranslated set 2.
        r.cmd(0x60);
        r.data(CB_KBD_INT | CB_SYS);
        r.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(
            r.drain(),
            vec![0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
        // Set 3.
        r.data(0xf0);
        r.data(0x03);
        r.drain();
        r.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(
            r.drain(),
            vec![0x11, 0x19, 0x64, 0xf0, 0x64, 0xf0, 0x19, 0xf0, 0x11]
        );
        // Set 1 without translation.
        r.data(0xf0);
        r.data(0x01);
        r.drain();
        r.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(
            r.drain(),
            vec![0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
        );
        // Scanning disabled: refused.
        r.data(0xf5);
        r.drain();
        assert_eq!(
            r.dev.send_ctrl_alt_del(),
            Err(KeyboardError::ScanningDisabled)
        );
        r.data(0xf4);
        r.drain();
        // A guest that never reads: the buffer fills and typing fails.
        let mut errors = 0;
        for _ in 0..20 {
            if r.dev.send_ctrl_alt_del().is_err() {
                errors += 1;
            }
        }
        assert!(errors > 0);
        assert!(r.drain().len() <= BUFFER_SIZE);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let mut r = rig();
        for v in 0..=255u8 {
            r.cmd(v);
            r.data(v);
            r.data(!v);
        }
        let mut wide = [0u8; 4];
        r.dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        r.dev.write(0, &[1, 2]);
        r.dev.write(1, &[1]);
        r.dev.read(2, &mut wide[..1]);
        assert_eq!(wide[0], 0xff);
        r.drain();
    }

    #[test]
    fn state_survives_save_and_restore() {
        let mut a = rig();
        // Scan code set 1, LEDs on, translation off, and a command waiting
        // for its data byte, with two bytes unread.
        a.data(0xf0);
        a.data(0x01);
        a.data(0xed);
        a.data(0x05);
        a.cmd(0x60);
        a.data(CB_KBD_INT | CB_SYS);
        assert_eq!(a.drain(), vec![KBD_ACK, KBD_ACK, KBD_ACK, KBD_ACK]);
        a.data(0xee); // echo
        a.cmd(0xd0); // output port (ahead of the echo)
        a.cmd(0xd2); // the next data byte goes to the keyboard buffer
        let snap = a.dev.save_state();

        // Into a fresh controller.
        let mut b = rig();
        b.dev.restore_state(&snap).unwrap();
        assert_eq!(b.dev.save_state(), snap);
        assert_eq!(b.irqs(), 0, "restoring raises no interrupt");
        assert_eq!(b.dev.command_byte(), CB_KBD_INT | CB_SYS);
        assert_eq!(
            b.status() & STS_CMD,
            STS_CMD,
            "the last write was a command"
        );
        b.data(0x42); // the pending 0xD2 takes it
        assert_eq!(b.drain(), vec![OUTPORT_INITIAL, KBD_ECHO, 0x42]);
        // The keyboard kept set 1 (untranslated): Ctrl-Alt-Del in set 1.
        b.dev.send_ctrl_alt_del().unwrap();
        assert_eq!(
            b.drain(),
            vec![0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
        );
        b.data(0xf0);
        b.data(0x00);
        assert_eq!(b.drain(), vec![KBD_ACK, KBD_ACK, 0x01]);
        // The restored controller keeps its own lines.
        b.cmd(0xfe);
        assert_eq!((a.resets(), b.resets()), (0, 1));
    }

    #[test]
    fn impossible_saved_state_is_refused() {
        let mut r = rig();
        let good = r.dev.save_state();
        let mut too_much = good.clone();
        too_much.out = vec![
            OutByte {
                value: 0,
                aux: false,
                timeout: false
            };
            BUFFER_SIZE + 1
        ];
        let err = r.dev.restore_state(&too_much).unwrap_err();
        assert!(err.contains("buffer"), "{err}");
        let mut bad_set = good.clone();
        bad_set.kbd.set = 7;
        let err = r.dev.restore_state(&bad_set).unwrap_err();
        assert!(err.contains("scan code set 7"), "{err}");
        assert_eq!(r.dev.save_state(), good, "a refused state changes nothing");
    }
}
