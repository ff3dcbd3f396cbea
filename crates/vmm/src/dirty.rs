//! Dirty-page tracking for diff snapshots and live migration.
//!
//! KVM logs the pages the guest's vCPUs write once a memory slot carries
//! `KVM_MEM_LOG_DIRTY_PAGES`. [`VmHandle::take_dirty_bitmaps`] reads (and
//! clears) that log, one bitmap per guest memory region in KVM's format:
//! bit `i % 64` of word `i / 64` stands for page `i` of the region.

use std::sync::atomic::Ordering;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::vm::VmHandle;

/// (Re-)registers every region of `mem` with KVM as slot `index`, with or
/// without dirty-page logging.
pub(crate) fn set_slots(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), String> {
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
    /// bitmap per region (KVM's format), and clears the log.
    pub fn take_dirty_bitmaps(&self) -> Result<Vec<Vec<u64>>, String> {
        if !self.dirty_log_enabled() {
            return Err("dirty page tracking is not enabled for this VM".into());
        }
        self.parts
            .mem
            .iter()
            .enumerate()
            .map(|(slot, region)| {
                self.parts
                    .vm
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(|e| format!("KVM_GET_DIRTY_LOG (slot {slot}): {e}"))
            })
            .collect()
    }
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
    fn counts_set_bits_over_regions() {
        assert_eq!(count_dirty(&[vec![0b1011, 0], vec![u64::MAX]]), 67);
        assert_eq!(count_dirty(&[]), 0);
    }
}
