//! Dirty-page tracking for diff snapshots and live migration.
//!
//! KVM logs the pages the guest's vCPUs write once a memory slot carries
//! `KVM_MEM_LOG_DIRTY_PAGES`. The VMM's own writes (devices, through
//! vm-memory, or marked by hand where the kernel writes) are in the guest
//! memory's bitmaps ([`kiln_devices::dirty`]). [`VmHandle::take_dirty_bitmaps`]
//! reads (and clears) both and ORs them, one bitmap per guest memory region
//! in KVM's format: bit `i % 64` of word `i / 64` stands for page `i` of the
//! region.

use kiln_devices::GuestMem;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory_file;
use crate::vm::VmHandle;
use crate::SnapshotStats;

/// Firecracker's refusal of a diff snapshot without dirty-page tracking.
pub const DIFF_NEEDS_TRACKING: &str =
    "Diff snapshots are not allowed on uVMs with dirty page tracking disabled.";

/// (Re-)registers every region of `mem` with KVM as slot `index`, with or
/// without dirty-page logging.
pub(crate) fn set_slots(vm: &VmFd, mem: &GuestMem, log_dirty: bool) -> Result<(), String> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| format!("guest memory region {slot}: {e}"))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
        };
        // SAFETY: `host` is the start of a live mapping of `region.len()`
        // bytes owned by `mem`, which lives as long as the VM.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION (slot {slot}): {e}"))?;
    }
    Ok(())
}

impl VmHandle {
    /// Starts logging the pages the guest writes (idempotent). Pages
    /// written before this call are not in the first bitmap read after it.
    pub fn start_dirty_log(&self) -> Result<(), String> {
        if self.parts.dirty_log.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Device writes are always recorded: forget those made before.
        kiln_devices::dirty::clear(&self.parts.mem);
        if let Err(e) = set_slots(&self.parts.vm, &self.parts.mem, true) {
            self.parts.dirty_log.store(false, Ordering::SeqCst);
            return Err(e);
        }
        Ok(())
    }

    /// Stops logging (idempotent).
    pub fn stop_dirty_log(&self) -> Result<(), String> {
        if !self.parts.dirty_log.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        set_slots(&self.parts.vm, &self.parts.mem, false)
    }

    /// Whether dirty pages are being logged.
    pub fn dirty_log_enabled(&self) -> bool {
        self.parts.dirty_log.load(Ordering::SeqCst)
    }

    /// The pages written since logging started or since the last call, one
    /// bitmap per region (KVM's format), and clears the log: the guest's
    /// writes (KVM's log) and the VMM's (devices) together.
    pub fn take_dirty_bitmaps(&self) -> Result<Vec<Vec<u64>>, String> {
        if !self.dirty_log_enabled() {
            return Err("dirty page tracking is not enabled for this VM".into());
        }
        // Before KVM's log is read (and cleared): nothing is lost on error.
        kiln_devices::dirty::check(&self.parts.mem)?;
        let mut kvm: Vec<Vec<u64>> = self
            .parts
            .mem
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                self.parts
                    .vm
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(|e| format!("KVM_GET_DIRTY_LOG (slot {slot}): {e}"))
            })
            .collect::<Result<_, _>>()?;
        let devices = kiln_devices::dirty::take(&self.parts.mem)?;
        merge(&mut kvm, &devices)?;
        Ok(kvm)
    }

    /// Writes a diff snapshot of the paused VM: its state to `state_path`
    /// (as a full snapshot's) and, to `mem_path`, a memory file of the full
    /// size holding only the pages written since the last snapshot (or
    /// since boot, restore or [`VmHandle::start_dirty_log`]); every other
    /// page is a hole. [`memory_file::rebase`] applies it onto the memory
    /// file of the snapshot before. If anything fails the pages stay logged
    /// for the next snapshot.
    pub fn snapshot_diff(
        &self,
        config: &str,
        state_path: &Path,
        mem_path: &Path,
    ) -> Result<SnapshotStats, String> {
        let t0 = Instant::now();
        if !self.dirty_log_enabled() {
            return Err(DIFF_NEEDS_TRACKING.into());
        }
        let mut state = self.capture_state(config)?;
        let dirty = self.take_dirty_bitmaps()?;
        let saved = memory_file::save_diff(&self.parts.mem, mem_path, &dirty)
            .map_err(|e| e.to_string())
            .and_then(|(memory, written)| {
                state.memory = memory;
                kiln_snapshot::write_file(state_path, &state).map_err(|e| e.to_string())?;
                Ok(written)
            });
        match saved {
            Ok(written) => Ok(SnapshotStats {
                mem_bytes_written: written,
                elapsed: t0.elapsed(),
            }),
            Err(e) => {
                // Not in any snapshot: keep them for the next one.
                put_back(&self.parts.mem, &dirty);
                Err(e)
            }
        }
    }

    /// Clears the dirty log (after a full snapshot: the next diff is
    /// relative to it). Does nothing when pages are not tracked.
    pub fn reset_dirty_log(&self) -> Result<(), String> {
        if self.dirty_log_enabled() {
            self.take_dirty_bitmaps()?;
        }
        Ok(())
    }
}

/// Marks the pages of `bitmaps` (one per region) dirty again in the device
/// bitmaps, so the next take reports them.
fn put_back(mem: &GuestMem, bitmaps: &[Vec<u64>]) {
    for (region, words) in mem.iter().zip(bitmaps) {
        for (w, word) in words.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let page = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let addr = region.start_addr().0 + (page * memory_file::PAGE) as u64;
                kiln_devices::dirty::mark(mem, vm_memory::GuestAddress(addr), memory_file::PAGE);
            }
        }
    }
}

/// ORs `add` into `into` (same regions, same sizes).
fn merge(into: &mut [Vec<u64>], add: &[Vec<u64>]) -> Result<(), String> {
    if into.len() != add.len() {
        return Err(format!(
            "dirty bitmaps for {} regions, the device bitmaps have {}",
            into.len(),
            add.len()
        ));
    }
    for (i, (a, b)) in into.iter_mut().zip(add).enumerate() {
        if a.len() != b.len() {
            return Err(format!(
                "region {i}: KVM's dirty log has {} words, the device bitmap {}",
                a.len(),
                b.len()
            ));
        }
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
    Ok(())
}

/// Number of pages set in `bitmaps`.
pub fn count_dirty(bitmaps: &[Vec<u64>]) -> u64 {
    bitmaps
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_put_back_are_taken_again() {
        use vm_memory::GuestAddress;
        let mem = GuestMem::from_ranges(&[
            (GuestAddress(0), 128 * memory_file::PAGE),
            (GuestAddress(0x100_0000), 64 * memory_file::PAGE),
        ])
        .unwrap();
        let bitmaps = vec![vec![0b101, 1 << 63], vec![1 << 7]];
        put_back(&mem, &bitmaps);
        assert_eq!(kiln_devices::dirty::take(&mem).unwrap(), bitmaps);
    }

    #[test]
    fn device_bitmaps_are_ored_into_kvms() {
        let mut kvm = vec![vec![0b0011, 0], vec![1 << 63]];
        merge(&mut kvm, &[vec![0b0110, 1], vec![1]]).unwrap();
        assert_eq!(kvm, vec![vec![0b0111, 1], vec![(1 << 63) | 1]]);
        assert!(merge(&mut kvm, &[vec![0, 0]]).is_err());
        let err = merge(&mut kvm, &[vec![0], vec![0]]).unwrap_err();
        assert!(err.contains("region 0"), "{err}");
    }

    #[test]
    fn counts_set_bits_over_regions() {
        assert_eq!(count_dirty(&[vec![0b1011, 0], vec![u64::MAX]]), 67);
        assert_eq!(count_dirty(&[]), 0);
    }
}
