//! Loading the kernel, initrd and command line, and writing the boot
//! information the kernel reads first (zero page, or PVH start info).

use kiln_devices::GuestMem;
use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;
use crate::regs::BootProtocol;

/// Errors while loading what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        /// Path given.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("{path} is not a Linux kernel (neither an ELF vmlinux nor a bzImage): {detail}")]
    NotAKernel {
        /// Path given.
        path: PathBuf,
        /// What the loaders said.
        detail: String,
    },
    /// The initrd cannot be read.
    #[error("cannot read initrd {path}: {source}")]
    Initrd {
        /// Path given.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The initrd does not fit in guest memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge {
        /// Path given.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest address it could end at.
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing into guest memory failed.
    #[error("writing {what} into guest memory: {detail}")]
    Memory {
        /// What was being written.
        what: &'static str,
        /// Details.
        detail: String,
    },
}

type Result<T> = std::result::Result<T, BootError>;

/// Where the kernel and initrd landed and how to enter the kernel.
#[derive(Clone, Copy, Debug)]
pub struct KernelEntry {
    /// First instruction.
    pub entry: u64,
    /// The protocol to enter with.
    pub protocol: BootProtocol,
    /// End of the loaded kernel image.
    pub kernel_end: u64,
    /// The setup header, for bzImage.
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Checks, without guest memory, that `path` looks like an ELF or a bzImage.
pub fn check_kernel_file(path: &Path) -> Result<()> {
    use std::io::Read;
    let open_err = |source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    };
    let mut head = Vec::with_capacity(0x210);
    File::open(path)
        .map_err(open_err)?
        .take(0x210)
        .read_to_end(&mut head)
        .map_err(open_err)?;
    let elf = head.starts_with(b"\x7fELF");
    let bzimage = head.get(0x202..0x206) == Some(b"HdrS".as_slice());
    if elf || bzimage {
        Ok(())
    } else {
        Err(BootError::NotAKernel {
            path: path.to_owned(),
            detail: "no ELF magic and no bzImage setup header".into(),
        })
    }
}

/// Loads `path` (ELF vmlinux, using PVH when the ELF has the note; else bzImage).
pub fn load_kernel(mem: &GuestMem, path: &Path) -> Result<KernelEntry> {
    let mut f = File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    })?;
    let high = Some(GuestAddress(HIMEM_START));
    let elf_err = match Elf::load(mem, None, &mut f, high) {
        Ok(r) => {
            let (entry, protocol) = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => (a.0, BootProtocol::Pvh),
                _ => (r.kernel_load.0, BootProtocol::Linux64),
            };
            return Ok(KernelEntry {
                entry,
                protocol,
                kernel_end: r.kernel_end,
                setup_header: None,
            });
        }
        Err(e) => e,
    };
    match BzImage::load(mem, None, &mut f, high) {
        Ok(r) => Ok(KernelEntry {
            // The 64-bit entry point is 0x200 past the protected-mode code start.
            entry: r.kernel_load.0 + 0x200,
            protocol: BootProtocol::Linux64,
            kernel_end: r.kernel_end,
            setup_header: r.setup_header,
        }),
        Err(bz_err) => Err(BootError::NotAKernel {
            path: path.to_owned(),
            detail: format!("ELF: {elf_err}; bzImage: {bz_err}"),
        }),
    }
}

/// Loads the initrd at the top of low RAM; returns (address, size).
pub fn load_initrd(
    mem: &GuestMem,
    path: &Path,
    kernel: &KernelEntry,
    mem_bytes: u64,
) -> Result<(u64, u64)> {
    let err = |source| BootError::Initrd {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(err)?;
    let size = f.metadata().map_err(err)?.len();
    let mut limit = low_ram_end(mem_bytes);
    if let Some(h) = kernel.setup_header {
        let max = u64::from(h.initrd_addr_max);
        if max != 0 {
            limit = limit.min(max + 1);
        }
    }
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel.kernel_end && size > 0)
        .ok_or(BootError::InitrdTooLarge {
            path: path.to_owned(),
            size,
            limit,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| BootError::Memory {
            what: "initrd",
            detail: e.to_string(),
        })?;
    Ok((addr, size))
}

/// Writes the command line.
pub fn write_cmdline(mem: &GuestMem, cmdline: &str) -> Result<()> {
    let c =
        Cmdline::try_from(cmdline, CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &c).map_err(|e| BootError::Memory {
        what: "command line",
        detail: e.to_string(),
    })
}

/// Boot information for the kernel to find.
pub struct BootInfo<'a> {
    /// Loaded kernel.
    pub kernel: &'a KernelEntry,
    /// Initrd (address, size).
    pub initrd: Option<(u64, u64)>,
    /// Length of the command line, without NUL.
    pub cmdline_len: usize,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// RSDP address.
    pub rsdp: u64,
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Writes the zero page (Linux64) or the PVH start info.
pub fn write_boot_info(mem: &GuestMem, info: &BootInfo) -> Result<()> {
    let e820 = e820_map(info.mem_bytes);
    let memerr = |e: linux_loader::configurator::Error| BootError::Memory {
        what: "boot parameters",
        detail: e.to_string(),
    };
    match info.kernel.protocol {
        BootProtocol::Linux64 => {
            let mut p = boot_params::default();
            if let Some(h) = info.kernel.setup_header {
                p.hdr = h;
            }
            p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            p.hdr.header = KERNEL_HDR_MAGIC;
            p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
            p.hdr.cmdline_size = info.cmdline_len as u32;
            p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            if let Some((addr, size)) = info.initrd {
                p.hdr.ramdisk_image = addr as u32;
                p.hdr.ramdisk_size = size as u32;
            }
            p.acpi_rsdp_addr = info.rsdp;
            for (i, e) in e820.iter().enumerate() {
                p.e820_table[i].addr = e.addr;
                p.e820_table[i].size = e.size;
                p.e820_table[i].r#type = e.kind;
            }
            p.e820_entries = e820.len() as u8;
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&p, GuestAddress(ZERO_PAGE_ADDR)),
                mem,
            )
            .map_err(memerr)
        }
        BootProtocol::Pvh => {
            let mut start = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_ADDR,
                rsdp_paddr: info.rsdp,
                memmap_paddr: PVH_MEMMAP_ADDR,
                memmap_entries: e820.len() as u32,
                ..Default::default()
            };
            let memmap: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .map(|e| hvm_memmap_table_entry {
                    addr: e.addr,
                    size: e.size,
                    type_: e.kind,
                    reserved: 0,
                })
                .collect();
            let mut params = BootParams::new(&start, GuestAddress(PVH_INFO_ADDR));
            if let Some((addr, size)) = info.initrd {
                start.nr_modules = 1;
                start.modlist_paddr = PVH_MODLIST_ADDR;
                params = BootParams::new(&start, GuestAddress(PVH_INFO_ADDR));
                let module = hvm_modlist_entry {
                    paddr: addr,
                    size,
                    ..Default::default()
                };
                params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
            }
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(memerr)
        }
    }
}

/// Checks the whole guest RAM is addressable (a sanity check for tests).
pub fn ram_size(mem: &GuestMem) -> u64 {
    mem.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(mib: u64) -> GuestMem {
        GuestMem::from_ranges(&ram_ranges(mib << 20)).unwrap()
    }

    #[test]
    fn non_kernel_file_is_rejected_with_its_path() {
        let m = mem(128);
        let dir = std::env::temp_dir().join(format!("kiln-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("notakernel");
        std::fs::File::create(&p)
            .unwrap()
            .write_all(&[0x42; 8192])
            .unwrap();
        let e = load_kernel(&m, &p).unwrap_err();
        assert!(matches!(e, BootError::NotAKernel { .. }), "{e}");
        assert!(e.to_string().contains("notakernel"));
        let e = load_kernel(&m, &dir.join("missing")).unwrap_err();
        assert!(matches!(e, BootError::KernelOpen { .. }));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zero_page_carries_e820_cmdline_and_initrd() {
        let m = mem(256);
        let k = KernelEntry {
            entry: 0x100200,
            protocol: BootProtocol::Linux64,
            kernel_end: 0x200000,
            setup_header: None,
        };
        write_cmdline(&m, "console=ttyS0 quiet").unwrap();
        let info = BootInfo {
            kernel: &k,
            initrd: Some((0x0f00_0000, 0x1234)),
            cmdline_len: 19,
            mem_bytes: 256 << 20,
            rsdp: ACPI_START,
        };
        write_boot_info(&m, &info).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let (n, rsdp, ptr, img) = (
            p.e820_entries,
            p.acpi_rsdp_addr,
            p.hdr.cmd_line_ptr,
            p.hdr.ramdisk_image,
        );
        assert_eq!(n as usize, e820_map(256 << 20).len());
        assert_eq!(rsdp, ACPI_START);
        assert_eq!(ptr as u64, CMDLINE_ADDR);
        assert_eq!(img, 0x0f00_0000);
        let mut cmd = [0u8; 20];
        m.read_slice(&mut cmd, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cmd, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn pvh_start_info_has_magic_and_module() {
        let m = mem(128);
        let k = KernelEntry {
            entry: 0x1000000,
            protocol: BootProtocol::Pvh,
            kernel_end: 0x2000000,
            setup_header: None,
        };
        let info = BootInfo {
            kernel: &k,
            initrd: Some((0x0700_0000, 4096)),
            cmdline_len: 0,
            mem_bytes: 128 << 20,
            rsdp: ACPI_START,
        };
        write_boot_info(&m, &info).unwrap();
        let s: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(s.magic, XEN_HVM_START_MAGIC);
        assert_eq!(s.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(s.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x0700_0000, 4096));
        let first: hvm_memmap_table_entry = m.read_obj(GuestAddress(s.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.type_), (0, E820_RAM));
        assert_eq!(ram_size(&m), 128 << 20);
    }
}
