//! Hand-built split virtqueues for unit tests: descriptor tables, avail and
//! used rings written straight into a small guest memory.

use crate::GuestMem;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const QSIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x10000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// One descriptor to build.
pub struct Desc {
    addr: Option<u64>,
    data: Vec<u8>,
    len: u32,
    write: bool,
}

impl Desc {
    /// A device-readable buffer holding `data`.
    pub fn r(data: &[u8]) -> Self {
        Self {
            addr: None,
            data: data.to_vec(),
            len: data.len() as u32,
            write: false,
        }
    }
    /// A device-writable buffer of `len` bytes.
    pub fn w(len: u32) -> Self {
        Self {
            addr: None,
            data: vec![],
            len,
            write: true,
        }
    }
    /// A descriptor at an arbitrary guest address (possibly invalid).
    pub fn raw(addr: u64, len: u32, write: bool) -> Self {
        Self {
            addr: Some(addr),
            data: vec![],
            len,
            write,
        }
    }
}

/// Builds chains into guest memory and runs a device's queue handler.
pub struct ChainBuilder {
    mem: GuestMem,
    next_desc: u16,
    next_data: u64,
    chains: Vec<Vec<(u64, u32)>>,
}

impl ChainBuilder {
    /// 1 MiB of guest memory with empty rings.
    pub fn new() -> Self {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        Self {
            mem,
            next_desc: 0,
            next_data: DATA,
            chains: vec![],
        }
    }

    /// The guest memory.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    fn add_avail(&mut self, head: u16) {
        let idx: u16 = self.mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % QSIZE)))
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = DESC + 16 * u64::from(i);
        self.mem.write_obj(addr, GuestAddress(base)).unwrap();
        self.mem.write_obj(len, GuestAddress(base + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(base + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(base + 14)).unwrap();
    }

    /// Adds a chain made of `descs` and makes it available.
    pub fn push(&mut self, descs: &[Desc]) {
        let head = self.next_desc;
        let mut bufs = vec![];
        for (k, d) in descs.iter().enumerate() {
            let i = self.next_desc;
            self.next_desc += 1;
            let addr = d.addr.unwrap_or_else(|| {
                let a = self.next_data;
                self.next_data += u64::from(d.len.max(1)).next_multiple_of(16);
                a
            });
            if d.addr.is_none() && !d.data.is_empty() {
                self.mem.write_slice(&d.data, GuestAddress(addr)).unwrap();
            }
            let mut flags = if d.write { F_WRITE } else { 0 };
            if k + 1 < descs.len() {
                flags |= F_NEXT;
            }
            self.write_desc(i, addr, d.len, flags, i + 1);
            bufs.push((addr, d.len));
        }
        self.chains.push(bufs);
        self.add_avail(head);
    }

    /// Adds a chain whose two descriptors point at each other.
    pub fn push_loop(&mut self) {
        let a = self.next_desc;
        let b = a + 1;
        self.next_desc += 2;
        self.write_desc(a, DATA, 16, F_NEXT, b);
        self.write_desc(b, DATA, 16, F_NEXT | F_WRITE, a);
        self.chains.push(vec![(DATA, 16), (DATA, 16)]);
        self.add_avail(a);
    }

    /// Runs `f` on a queue over the rings; returns the used (head, len) pairs.
    pub fn run(&mut self, f: impl FnOnce(&GuestMem, &mut Queue) -> bool) -> Vec<(u16, u32)> {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(&self.mem));
        f(&self.mem, &mut q);
        let idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let e = USED + 4 + 8 * u64::from(i);
                let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
                (id as u16, len)
            })
            .collect()
    }

    /// The bytes of descriptor `desc` of chain `chain`.
    pub fn written(&self, chain: usize, desc: usize) -> Vec<u8> {
        let (addr, len) = self.chains[chain][desc];
        let mut v = vec![0u8; len as usize];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}
