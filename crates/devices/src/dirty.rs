//! Pages of guest memory the VMM itself writes.
//!
//! KVM's dirty log sees only the guest's vCPU writes. Everything the VMM
//! writes into guest memory (used rings, block reads, network and vsock
//! receive buffers, balloon statistics, boot data) goes through vm-memory,
//! whose per-region [`AtomicBitmap`] marks the pages a `Bytes` or
//! `VolatileSlice` write touches. Writes vm-memory cannot see — the kernel
//! filling guest buffers for an io_uring read, `madvise` dropping a page —
//! are marked with [`mark`] once they are done.
//!
//! [`take`] reads and clears those bitmaps in KVM's dirty-log format, so the
//! VMM can OR them into KVM's log.

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{GuestMem, GuestRegion};

/// Size of a tracked page.
pub const PAGE: usize = 4096;

/// The whole bitmap of a region (not the offset view the region trait gives).
fn bitmap(region: &GuestRegion) -> &AtomicBitmap {
    // `GuestRegionMmap` derefs to its `MmapRegion`, whose `bitmap()` is the
    // region's own bitmap.
    std::ops::Deref::deref(region).bitmap()
}

/// Marks `len` bytes at `addr` dirty (written behind vm-memory's back).
/// The part of the range outside guest memory is ignored.
pub fn mark(mem: &GuestMem, addr: GuestAddress, len: usize) {
    let mut addr = addr;
    let mut left = len as u64;
    while left > 0 {
        let Some(region) = mem.find_region(addr) else {
            return;
        };
        let offset = addr.0 - region.start_addr().0;
        let n = left.min(region.len() - offset);
        bitmap(region).mark_dirty(offset as usize, n as usize);
        left -= n;
        addr = GuestAddress(addr.0 + n);
    }
}

/// Checks every region has a bitmap covering all its pages (memory built
/// with `MmapRegionBuilder::new` gets an empty one and tracks nothing).
pub fn check(mem: &GuestMem) -> Result<(), String> {
    for (i, region) in mem.iter().enumerate() {
        let pages = (region.len() as usize).div_ceil(PAGE);
        let have = bitmap(region).len();
        if have != pages {
            return Err(format!(
                "guest memory region {i} tracks writes to {have} pages, it has {pages}: \
                 built without a sized dirty bitmap"
            ));
        }
    }
    Ok(())
}

/// The pages written through vm-memory (or [`mark`]ed) since the last call,
/// one bitmap per region in KVM's format (bit `i % 64` of word `i / 64` is
/// page `i` of the region), and clears them.
pub fn take(mem: &GuestMem) -> Result<Vec<Vec<u64>>, String> {
    check(mem)?;
    Ok(mem.iter().map(|r| bitmap(r).get_and_reset()).collect())
}

/// Forgets every page marked so far.
pub fn clear(mem: &GuestMem) {
    for region in mem.iter() {
        bitmap(region).reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::Bytes;

    fn two_regions() -> GuestMem {
        GuestMem::from_ranges(&[
            (GuestAddress(0), 64 * PAGE),
            (GuestAddress(0x10_0000), 128 * PAGE),
        ])
        .unwrap()
    }

    fn pages(bitmaps: &[Vec<u64>]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for (r, words) in bitmaps.iter().enumerate() {
            for (w, word) in words.iter().enumerate() {
                for b in 0..64 {
                    if word & (1 << b) != 0 {
                        out.push((r, w * 64 + b));
                    }
                }
            }
        }
        out
    }

    #[test]
    fn a_write_through_bytes_marks_its_pages_and_take_clears_them() {
        let mem = two_regions();
        assert_eq!(pages(&take(&mem).unwrap()), vec![]);
        // Spans pages 3 and 4 of region 0.
        mem.write_slice(&[1u8; 8], GuestAddress(4 * PAGE as u64 - 4))
            .unwrap();
        mem.write_obj(7u32, GuestAddress(0x10_0000 + 70 * PAGE as u64))
            .unwrap();
        let got = take(&mem).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].len(), 1, "64 pages: one word");
        assert_eq!(got[1].len(), 2, "128 pages: two words");
        assert_eq!(pages(&got), vec![(0, 3), (0, 4), (1, 70)]);
        assert_eq!(pages(&take(&mem).unwrap()), vec![], "cleared by the take");
        // Reads mark nothing.
        let _: u32 = mem.read_obj(GuestAddress(0)).unwrap();
        assert_eq!(pages(&take(&mem).unwrap()), vec![]);
    }

    #[test]
    fn explicit_marks_cover_ranges_across_regions_and_ignore_holes() {
        let mem = two_regions();
        mark(&mem, GuestAddress(PAGE as u64), 2 * PAGE + 1);
        // From the last page of region 0 into the hole after it.
        mark(&mem, GuestAddress(63 * PAGE as u64), 10 * PAGE);
        mark(&mem, GuestAddress(0x10_0000 + 127 * PAGE as u64), 1);
        mark(&mem, GuestAddress(0x8000_0000), PAGE);
        mark(&mem, GuestAddress(0x10_0000), 0);
        assert_eq!(
            pages(&take(&mem).unwrap()),
            vec![(0, 1), (0, 2), (0, 3), (0, 63), (1, 127)]
        );
        mark(&mem, GuestAddress(0), 1);
        clear(&mem);
        assert_eq!(pages(&take(&mem).unwrap()), vec![]);
    }

    #[test]
    fn memory_without_a_sized_bitmap_is_refused() {
        let mapping = MmapRegionBuilder::<AtomicBitmap>::new(16 * PAGE)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .build()
            .unwrap();
        let region = GuestRegion::new(mapping, GuestAddress(0)).unwrap();
        let mem = GuestMem::from_regions(vec![region]).unwrap();
        let err = take(&mem).unwrap_err();
        assert!(err.contains("0 pages, it has 16"), "{err}");
    }
}
