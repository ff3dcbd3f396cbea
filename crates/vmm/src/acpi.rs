//! ACPI tables: RSDP → XSDT → {FADT → DSDT, MADT}. The DSDT declares the
//! devices a stock kernel cannot find by legacy probing: virtio-mmio windows
//! (_HID "LNRO0005"), pvpanic (_HID "QEMU0001"), the i8042 keyboard
//! controller (_HID "PNP0303") and the \_S5 sleep state behind the
//! hardware-reduced sleep control register.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use kiln_devices::GuestMem;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{ACPI_START, BIOS_END, IOAPIC_ADDR, LAPIC_ADDR};
use kiln_devices::i8042::{I8042_IRQ, I8042_PORT};
use kiln_devices::pvpanic::{PVPANIC_ADDR, PVPANIC_LEN};

/// I/O port of the sleep control/status register (poweroff).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
/// Sleep type the DSDT's \_S5 package names.
pub const S5_SLEEP_TYPE: u8 = 5;

const OEM_ID: [u8; 6] = *b"KILNVM";
const OEM_TABLE: [u8; 8] = *b"KILNVMM ";
/// IA-PC boot architecture flag "8042 present". Kiln leaves it clear: the
/// guest finds the i8042 through the DSDT's PNP0303 device instead, which
/// also tells Linux there is no aux (mouse) port, so it does not probe one.
#[cfg(test)]
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const MADT_PCAT_COMPAT: u32 = 1;

/// A virtio-mmio window to declare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    /// Base address.
    pub addr: u64,
    /// Window length.
    pub len: u64,
    /// GSI.
    pub irq: u32,
}

/// Errors building or writing ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// Tables do not fit between ACPI_START and 1 MiB.
    #[error("ACPI tables need {0} bytes, more than the BIOS area holds")]
    TooLarge(usize),
    /// Guest memory write failed.
    #[error("writing ACPI tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The DSDT body.
pub fn dsdt(devices: &[MmioDeviceInfo]) -> Vec<u8> {
    let mut body = Vec::new();

    // COM1, so the guest's PNP layer knows the port and IRQ.
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(0x3f8, 0x3f8, 0, 8),
                    &aml::Interrupt::new(true, true, false, false, 4),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    // The i8042 keyboard controller (PNP0303): data and command ports, IRQ 1.
    // No PNP0F13 mouse: Linux then leaves the aux port alone.
    aml::Device::new(
        "_SB_.PS2K".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(I8042_PORT as u16, I8042_PORT as u16, 1, 1),
                    &aml::IO::new(I8042_PORT as u16 + 4, I8042_PORT as u16 + 4, 1, 1),
                    &aml::Interrupt::new(true, true, false, false, I8042_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    aml::Device::new(
        "_SB_.PVPN".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![&aml::Memory32Fixed::new(
                    true,
                    PVPANIC_ADDR as u32,
                    PVPANIC_LEN as u32,
                )]),
            ),
        ],
    )
    .to_aml_bytes(&mut body);

    for (i, d) in devices.iter().enumerate() {
        let path = format!("_SB_.V{i:03X}");
        let uid = i as u32;
        aml::Device::new(
            path.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, d.addr as u32, d.len as u32),
                        &aml::Interrupt::new(true, true, false, false, d.irq),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut body);
    }

    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    body
}

fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE,
        1,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus, IOAPIC_ADDR as u32, 0));
    let mut bytes = Vec::new();
    madt.to_aml_bytes(&mut bytes);
    // Dual 8259 PICs are present (the crate leaves the flags at zero).
    bytes[40..44].copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut bytes);
    bytes
}

fn fix_checksum(table: &mut [u8]) {
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch = IAPC_NO_VGA.into();
    let reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(SLEEP_CONTROL_PORT),
    );
    b.sleep_control_reg = reg;
    b.sleep_status_reg = reg;
    let mut bytes = Vec::new();
    b.finalize().to_aml_bytes(&mut bytes);
    bytes
}

fn align8(v: u64) -> u64 {
    (v + 7) & !7
}

/// Builds all tables for `cpus` vCPUs and `devices`, laid out from
/// [`ACPI_START`]. Returns (address, bytes) pairs, RSDP first.
pub fn build(cpus: u8, devices: &[MmioDeviceInfo]) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = align8(rsdp_addr + Rsdp::len() as u64);

    let mut dsdt_table = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    dsdt_table.append_slice(&dsdt(devices));
    let dsdt_bytes = dsdt_table.as_slice().to_vec();
    let dsdt_addr = next;
    next = align8(next + dsdt_bytes.len() as u64);

    let fadt_bytes = fadt(dsdt_addr);
    let fadt_addr = next;
    next = align8(next + fadt_bytes.len() as u64);

    let madt_bytes = madt(cpus);
    let madt_addr = next;
    next = align8(next + madt_bytes.len() as u64);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = next;
    next += xsdt_bytes.len() as u64;

    if next > BIOS_END {
        return Err(AcpiError::TooLarge((next - ACPI_START) as usize));
    }
    let mut rsdp_bytes = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp_bytes);

    Ok(vec![
        (rsdp_addr, rsdp_bytes),
        (dsdt_addr, dsdt_bytes),
        (fadt_addr, fadt_bytes),
        (madt_addr, madt_bytes),
        (xsdt_addr, xsdt_bytes),
    ])
}

/// Writes the tables into guest memory; returns the RSDP address.
pub fn write(mem: &GuestMem, cpus: u8, devices: &[MmioDeviceInfo]) -> Result<u64, AcpiError> {
    let tables = build(cpus, devices)?;
    for (addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))?;
    }
    Ok(tables[0].0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn find(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let devs = [
            MmioDeviceInfo {
                addr: 0xd000_2000,
                len: 0x1000,
                irq: 5,
            },
            MmioDeviceInfo {
                addr: 0xd000_3000,
                len: 0x1000,
                irq: 6,
            },
        ];
        let t = build(4, &devs).unwrap();
        let (rsdp_addr, rsdp) = &t[0];
        assert_eq!(*rsdp_addr, ACPI_START);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = &t.iter().find(|(a, _)| *a == xsdt_addr).unwrap().1;
        assert_eq!(&xsdt[0..4], b"XSDT");
        let ptrs: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<&[u8]> = ptrs
            .iter()
            .map(|p| &t.iter().find(|(a, _)| a == p).unwrap().1[0..4])
            .collect();
        assert_eq!(sigs, vec![b"FACP" as &[u8], b"APIC"]);
        for (addr, table) in &t[1..] {
            assert_eq!(sum(table), 0, "checksum of table at {addr:#x}");
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
        }
        let fadt = &t.iter().find(|(_, b)| &b[0..4] == b"FACP").unwrap().1;
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = &t.iter().find(|(a, _)| *a == x_dsdt).unwrap().1;
        assert_eq!(&dsdt[0..4], b"DSDT");
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced ACPI");
        let boot_arch = u16::from_le_bytes(fadt[109..111].try_into().unwrap());
        assert_eq!(boot_arch & IAPC_8042, 0);
        assert_ne!(boot_arch & IAPC_NO_VGA, 0);
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let m = madt(3);
        assert_eq!(sum(&m), 0);
        assert_eq!(
            u32::from_le_bytes(m[36..40].try_into().unwrap()),
            LAPIC_ADDR as u32
        );
        assert_eq!(
            u32::from_le_bytes(m[40..44].try_into().unwrap()),
            MADT_PCAT_COMPAT
        );
        let mut i = 44;
        let mut lapics = vec![];
        let mut ioapics = 0;
        while i < m.len() {
            match m[i] {
                0 => lapics.push(m[i + 3]),
                1 => ioapics += 1,
                t => panic!("unexpected MADT entry {t}"),
            }
            i += m[i + 1] as usize;
        }
        assert_eq!(lapics, vec![0, 1, 2]);
        assert_eq!(ioapics, 1);
    }

    #[test]
    fn dsdt_declares_virtio_pvpanic_keyboard_and_s5() {
        let devs: Vec<MmioDeviceInfo> = (0..8)
            .map(|i| MmioDeviceInfo {
                addr: 0xd000_2000 + i * 0x1000,
                len: 0x1000,
                irq: 5 + i as u32,
            })
            .collect();
        let d = dsdt(&devs);
        assert!(find(&d, b"LNRO0005"));
        assert!(find(&d, b"QEMU0001"));
        // PNP0303 as a compressed EISA id, with its two ports (IO
        // descriptors: 0x47, decode16, min, max, align 1, length 1).
        assert!(find(&d, &[0x41, 0xd0, 0x03, 0x03]));
        assert!(find(&d, &[0x47, 0x01, 0x60, 0x00, 0x60, 0x00, 0x01, 0x01]));
        assert!(find(&d, &[0x47, 0x01, 0x64, 0x00, 0x64, 0x00, 0x01, 0x01]));
        assert!(find(&d, b"_S5_"));
        assert!(find(&d, b"V007"));
        assert!(!find(&d, b"V008"));
        // The last device's window base appears in its Memory32Fixed descriptor.
        assert!(find(&d, &(0xd000_9000u32).to_le_bytes()));
        assert!(build(32, &devs).is_ok());
    }
}
