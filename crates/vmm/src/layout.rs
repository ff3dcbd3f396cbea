//! Guest physical memory layout (x86_64) and the e820 map derived from it.
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_0520  IDT
//! 0x0000_6000  PVH start info (+ memmap, modlist)
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000 PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP table
//! 0x000e_0000  ACPI tables (RSDP first), up to 1 MiB
//! 0x0010_0000  kernel
//! ...          RAM, initrd at the top of low RAM
//! 0xc000_0000  MMIO gap start (boot timer, pvpanic, virtio-mmio, IOAPIC, LAPIC)
//! 0x1_0000_0000 RAM above 4 GiB, when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

/// GDT location.
pub const GDT_ADDR: u64 = 0x500;
/// IDT location.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map table (follows the start info).
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
/// PVH module list (the initrd).
pub const PVH_MODLIST_ADDR: u64 = 0x6800;
/// Linux zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_TOP: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory (2 MiB pages).
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line we accept (bytes, including the NUL): x86 Linux
/// keeps at most 2048 (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables area (the RSDP must lie in 0xe0000..0x100000 for legacy scans).
pub const ACPI_START: u64 = 0xe0000;
/// End of the BIOS area.
pub const BIOS_END: u64 = 0x100000;
/// Where the kernel is loaded.
pub const HIMEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First address for virtio-mmio device windows.
pub const VIRTIO_MMIO_START: u64 = 0xd000_2000;
/// First GSI for virtio devices (COM1 has 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC pins usable by virtio devices (5..=23).
pub const MAX_VIRTIO_DEVICES: usize = 19;
/// IOAPIC registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (three pages below the identity-map page, inside the gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// Smallest guest we boot, in MiB.
pub const MIN_MEM_MIB: u64 = 128;
/// Largest vCPU count.
pub const MAX_VCPUS: u8 = 32;

/// e820 entry types.
pub const E820_RAM: u32 = 1;
/// Reserved.
pub const E820_RESERVED: u32 = 2;

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Entry type.
    pub kind: u32,
}

/// Guest RAM ranges (start, length) for `mem_bytes` of memory: everything
/// below the MMIO gap, the remainder above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, usize)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(MMIO_GAP_END),
                (mem_bytes - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

/// End of RAM below 4 GiB.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// The e820 map the guest sees.
pub fn e820_map(mem_bytes: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: ACPI_START,
            size: BIOS_END - ACPI_START,
            kind: E820_RESERVED,
        },
        E820Entry {
            addr: HIMEM_START,
            size: low_ram_end(mem_bytes) - HIMEM_START,
            kind: E820_RAM,
        },
    ];
    if mem_bytes > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_bytes - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_no_high_ram() {
        let mem = 256 << 20;
        assert_eq!(ram_ranges(mem), vec![(GuestAddress(0), mem as usize)]);
        let map = e820_map(mem);
        assert_eq!(map.len(), 4);
        assert_eq!(map[3].addr, HIMEM_START);
        assert_eq!(map[3].addr + map[3].size, mem);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        // Only the EBDA and BIOS holes are missing.
        assert_eq!(ram, mem - (0xa0000 - EBDA_START) - (BIOS_END - 0xa0000));
    }

    #[test]
    fn large_guest_skips_mmio_gap() {
        let mem = 5u64 << 30;
        let ranges = ram_ranges(mem);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges[0].1 as u64, MMIO_GAP_START);
        assert_eq!(ranges[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(ranges[1].1 as u64, mem - MMIO_GAP_START);
        let map = e820_map(mem);
        assert_eq!(map[3].addr + map[3].size, MMIO_GAP_START);
        assert_eq!(map[4].addr, MMIO_GAP_END);
        assert_eq!(
            map[4].addr + map[4].size,
            mem + (MMIO_GAP_END - MMIO_GAP_START)
        );
        // No entry overlaps the gap.
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }
}
