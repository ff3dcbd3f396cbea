//! Guest memory in snapshot memory files.
//!
//! A memory file holds the guest's RAM regions back to back (the offsets are
//! in the state file's [`MemoryLayout`]). A full snapshot writes every page
//! that is not all zeros and leaves zero pages as holes, so the file is
//! sparse. A diff snapshot writes only the pages dirtied since the previous
//! snapshot (KVM's dirty log and the devices' writes, see [`crate::dirty`])
//! into a sparse file of the same size; [`rebase`]
//! copies its written extents onto the full file it was taken after.
//!
//! Restore maps the file privately ([`map_private`]): pages are read from
//! the page cache on first touch and copied only when the guest writes them,
//! so a restore costs no copy and clones of one snapshot share its pages.

use kiln_devices::{GuestMem, GuestRegion};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kiln_snapshot::state::{MemoryLayout, MemoryRegion};
use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Page size used for zero detection and dirty bitmaps.
pub const PAGE: usize = 4096;

/// A memory file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MemFileError {
    /// Reading or writing the file failed.
    #[error("memory file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not the size the snapshot's layout needs.
    #[error("memory file {path} is {have} bytes, the snapshot needs {need}")]
    Size {
        /// The file.
        path: String,
        /// Its size.
        have: u64,
        /// The size the layout needs.
        need: u64,
    },
    /// The layout cannot be mapped (overlapping or empty regions, ...).
    #[error("memory file {path}: cannot map the guest memory: {detail}")]
    Map {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// A diff memory file is not the size of the base it is applied to.
    #[error("{diff} is {diff_len} bytes and {base} {base_len}: a diff applies only onto the memory file of the same VM")]
    Mismatch {
        /// The base file.
        base: String,
        /// Its size.
        base_len: u64,
        /// The diff file.
        diff: String,
        /// Its size.
        diff_len: u64,
    },
    /// A dirty bitmap does not match the memory it describes.
    #[error("dirty bitmap for region {region} covers {bits} pages, the region has {pages}")]
    Bitmap {
        /// Region index.
        region: usize,
        /// Pages the bitmap covers.
        bits: usize,
        /// Pages in the region.
        pages: usize,
    },
}

type Result<T> = std::result::Result<T, MemFileError>;

fn io(path: &Path) -> impl Fn(std::io::Error) -> MemFileError + '_ {
    move |source| MemFileError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Where each region of `mem` goes in a memory file: back to back.
pub fn layout(mem: &GuestMem) -> MemoryLayout {
    let mut offset = 0;
    let regions = mem
        .iter()
        .map(|r| {
            let region = MemoryRegion {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            region
        })
        .collect();
    MemoryLayout { regions }
}

/// The host bytes of one guest region.
fn region_bytes(r: &GuestRegion) -> &[u8] {
    // SAFETY: the region maps `len()` bytes at `as_ptr()` for as long as the
    // region (borrowed here) lives. The guest may write concurrently only if
    // it is running; callers save memory with every vCPU stopped, and a
    // torn read of a page being changed would only make the snapshot stale,
    // never unsafe for the host.
    unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) }
}

fn create(path: &Path, len: u64) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(io(path))?;
    f.set_len(len).map_err(io(path))?;
    Ok(f)
}

/// Writes runs of selected pages of `bytes` at `base` in `f`.
fn write_pages(
    f: &File,
    path: &Path,
    bytes: &[u8],
    base: u64,
    selected: impl Fn(usize) -> bool,
) -> Result<u64> {
    let pages = bytes.len().div_ceil(PAGE);
    let mut written = 0;
    let mut page = 0;
    while page < pages {
        if !selected(page) {
            page += 1;
            continue;
        }
        let start = page;
        while page < pages && selected(page) {
            page += 1;
        }
        let from = start * PAGE;
        let to = (page * PAGE).min(bytes.len());
        f.write_all_at(&bytes[from..to], base + from as u64)
            .map_err(io(path))?;
        written += (to - from) as u64;
    }
    Ok(written)
}

/// Writes a full snapshot of `mem` to `path` (zero pages become holes).
/// Returns the layout and the bytes written.
pub fn save_full(mem: &GuestMem, path: &Path) -> Result<(MemoryLayout, u64)> {
    let layout = layout(mem);
    let f = create(path, layout.file_len())?;
    let mut written = 0;
    for (r, l) in mem.iter().zip(&layout.regions) {
        let bytes = region_bytes(r);
        written += write_pages(&f, path, bytes, l.file_offset, |p| {
            let end = ((p + 1) * PAGE).min(bytes.len());
            bytes[p * PAGE..end].iter().any(|&b| b != 0)
        })?;
    }
    f.sync_all().map_err(io(path))?;
    Ok((layout, written))
}

/// Writes a diff snapshot: only the pages set in `dirty` (one bitmap per
/// region, bit i of word i/64 = page i, KVM's dirty-log format).
pub fn save_diff(mem: &GuestMem, path: &Path, dirty: &[Vec<u64>]) -> Result<(MemoryLayout, u64)> {
    let layout = layout(mem);
    let f = create(path, layout.file_len())?;
    let mut written = 0;
    for (i, (r, l)) in mem.iter().zip(&layout.regions).enumerate() {
        let bytes = region_bytes(r);
        let pages = bytes.len().div_ceil(PAGE);
        let bitmap = dirty.get(i).map(Vec::as_slice).unwrap_or(&[]);
        if bitmap.len() * 64 < pages {
            return Err(MemFileError::Bitmap {
                region: i,
                bits: bitmap.len() * 64,
                pages,
            });
        }
        written += write_pages(&f, path, bytes, l.file_offset, |p| {
            bitmap[p / 64] & (1 << (p % 64)) != 0
        })?;
    }
    f.sync_all().map_err(io(path))?;
    Ok((layout, written))
}

/// Opens a memory file, checking it has the size `layout` needs.
fn open_sized(path: &Path, layout: &MemoryLayout) -> Result<File> {
    let file = File::open(path).map_err(io(path))?;
    let have = file.metadata().map_err(io(path))?.len();
    let need = layout.file_len();
    if have != need {
        return Err(MemFileError::Size {
            path: path.display().to_string(),
            have,
            need,
        });
    }
    Ok(file)
}

/// Maps `path` as guest memory laid out as `layout`, privately and lazily:
/// nothing is read until the guest touches it, and guest writes never reach
/// the file.
pub fn map_private(path: &Path, layout: &MemoryLayout) -> Result<GuestMem> {
    let file = open_sized(path, layout)?;
    let map_err = |detail: String| MemFileError::Map {
        path: path.display().to_string(),
        detail,
    };
    let mut regions = Vec::with_capacity(layout.regions.len());
    for r in &layout.regions {
        let f = file.try_clone().map_err(io(path))?;
        let size = r.size as usize;
        let mapping = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(FileOffset::new(f, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegion::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| map_err(format!("region at {:#x} overflows", r.guest_addr)))?;
        regions.push(region);
    }
    GuestMem::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

/// Reads `path` into fresh anonymous guest memory laid out as `layout`
/// (every page copied up front; nothing shared with other restores).
pub fn load_copy(path: &Path, layout: &MemoryLayout) -> Result<GuestMem> {
    let file = open_sized(path, layout)?;
    let ranges: Vec<(GuestAddress, usize)> = layout
        .regions
        .iter()
        .map(|r| (GuestAddress(r.guest_addr), r.size as usize))
        .collect();
    let mem = GuestMem::from_ranges(&ranges).map_err(|e| MemFileError::Map {
        path: path.display().to_string(),
        detail: e.to_string(),
    })?;
    for (region, l) in mem.iter().zip(&layout.regions) {
        // SAFETY: the region maps `len()` writable bytes at `as_ptr()`; no
        // vCPU runs yet, so nothing else accesses them.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), region.len() as usize) };
        file.read_exact_at(bytes, l.file_offset).map_err(io(path))?;
    }
    Ok(mem)
}

/// Copies the written extents of the diff memory file `diff` onto `base`
/// (both from the same VM, so of the same size), making `base` the full
/// memory file of the diff snapshot. Returns the bytes copied.
pub fn rebase(base: &Path, diff: &Path) -> Result<u64> {
    let d = File::open(diff).map_err(io(diff))?;
    let b = OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(io(base))?;
    let len = d.metadata().map_err(io(diff))?.len();
    let base_len = b.metadata().map_err(io(base))?.len();
    if base_len != len {
        return Err(MemFileError::Mismatch {
            base: base.display().to_string(),
            base_len,
            diff: diff.display().to_string(),
            diff_len: len,
        });
    }
    // Holes are what tells written pages from untouched ones. A filesystem
    // that reports a written-looking extent over unallocated blocks would
    // make the copy overwrite the base with zeros: refuse it.
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        d.metadata().map_err(io(diff))?.blocks() * 512
    };
    let mut copied = 0;
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (pos as u64) < len {
        // SAFETY: lseek on a file descriptor we own; no memory is involved.
        let data = unsafe { libc::lseek(d.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(io(diff)(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(d.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io(diff)(std::io::Error::last_os_error()));
        }
        if copied + (hole - data) as u64 > allocated + PAGE as u64 {
            return Err(io(diff)(std::io::Error::other(
                "its filesystem does not report holes (SEEK_HOLE), so the written pages cannot be told apart",
            )));
        }
        let mut at = data as u64;
        while at < hole as u64 {
            let n = ((hole as u64 - at) as usize).min(buf.len());
            d.read_exact_at(&mut buf[..n], at).map_err(io(diff))?;
            b.write_all_at(&buf[..n], at).map_err(io(base))?;
            at += n as u64;
            copied += n as u64;
        }
        pos = hole;
    }
    b.sync_all().map_err(io(base))?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn tmp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-memfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    fn guest() -> GuestMem {
        // Two regions, like a guest above 3 GiB (scaled down).
        GuestMem::from_ranges(&[
            (GuestAddress(0), 64 * PAGE),
            (GuestAddress(0x1_0000_0000), 32 * PAGE),
        ])
        .unwrap()
    }

    #[test]
    fn full_snapshot_is_sparse_and_maps_back_privately() {
        let mem = guest();
        mem.write_slice(b"low", GuestAddress(5 * PAGE as u64))
            .unwrap();
        mem.write_slice(b"high", GuestAddress(0x1_0000_0000 + 7 * PAGE as u64))
            .unwrap();
        let path = tmp("full");
        let (layout, written) = save_full(&mem, &path).unwrap();
        assert_eq!(written, 2 * PAGE as u64, "only the two non-zero pages");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 96 * PAGE as u64);

        let back = map_private(&path, &layout).unwrap();
        let mut buf = [0u8; 4];
        back.read_slice(&mut buf[..3], GuestAddress(5 * PAGE as u64))
            .unwrap();
        assert_eq!(&buf[..3], b"low");
        back.read_slice(&mut buf, GuestAddress(0x1_0000_0000 + 7 * PAGE as u64))
            .unwrap();
        assert_eq!(&buf, b"high");
        // Private: guest writes do not reach the file.
        back.write_slice(b"XXXX", GuestAddress(5 * PAGE as u64))
            .unwrap();
        let again = map_private(&path, &layout).unwrap();
        again
            .read_slice(&mut buf[..3], GuestAddress(5 * PAGE as u64))
            .unwrap();
        assert_eq!(&buf[..3], b"low");
    }

    #[test]
    fn a_copied_restore_has_the_same_contents() {
        let mem = guest();
        mem.write_slice(b"copy", GuestAddress(0x1_0000_0000 + 3 * PAGE as u64))
            .unwrap();
        let path = tmp("copy");
        let (layout, _) = save_full(&mem, &path).unwrap();
        let back = load_copy(&path, &layout).unwrap();
        let mut buf = [0u8; 4];
        back.read_slice(&mut buf, GuestAddress(0x1_0000_0000 + 3 * PAGE as u64))
            .unwrap();
        assert_eq!(&buf, b"copy");
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            load_copy(&path, &layout),
            Err(MemFileError::Size { .. })
        ));
    }

    #[test]
    fn diff_rebased_onto_full_gives_the_new_memory() {
        let mem = guest();
        mem.write_slice(b"one", GuestAddress(0)).unwrap();
        mem.write_slice(b"two", GuestAddress(10 * PAGE as u64))
            .unwrap();
        let full = tmp("base");
        let (layout, _) = save_full(&mem, &full).unwrap();

        // Change two pages (one back to zeros: a diff must carry it).
        mem.write_slice(b"TWO", GuestAddress(10 * PAGE as u64))
            .unwrap();
        mem.write_slice(&[0u8; 3], GuestAddress(0)).unwrap();
        let mut low = vec![0u64; 1];
        low[0] |= 1 | (1 << 10);
        let dirty = vec![low, vec![0u64; 1]];
        let diff = tmp("diff");
        let (_, written) = save_diff(&mem, &diff, &dirty).unwrap();
        assert_eq!(written, 2 * PAGE as u64);

        let copied = rebase(&full, &diff).unwrap();
        assert!(copied >= 2 * PAGE as u64);
        let back = map_private(&full, &layout).unwrap();
        let mut buf = [0u8; 3];
        back.read_slice(&mut buf, GuestAddress(10 * PAGE as u64))
            .unwrap();
        assert_eq!(&buf, b"TWO");
        back.read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(buf, [0, 0, 0]);

        // A diff of another size (another VM) is refused, the base untouched.
        let other = tmp("other");
        std::fs::write(&other, b"short").unwrap();
        let before = std::fs::read(&full).unwrap();
        let err = rebase(&full, &other).unwrap_err().to_string();
        assert!(
            err.contains("is 5 bytes") && err.contains("393216"),
            "{err}"
        );
        assert_eq!(std::fs::read(&full).unwrap(), before);
    }

    #[test]
    fn wrong_sizes_are_refused_with_the_numbers() {
        let mem = guest();
        let path = tmp("short");
        let (layout, _) = save_full(&mem, &path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(PAGE as u64)
            .unwrap();
        let err = map_private(&path, &layout).unwrap_err().to_string();
        assert!(
            err.contains("4096 bytes") && err.contains("393216"),
            "{err}"
        );

        let err = save_diff(&mem, &tmp("bad"), &[vec![0]]).unwrap_err();
        assert!(matches!(err, MemFileError::Bitmap { .. }), "{err}");
        let missing = map_private(&tmp("missing"), &layout).unwrap_err();
        assert!(missing.to_string().contains("missing"), "{missing}");
    }
}
