use super::state::*;
use super::*;

fn sample() -> MicrovmState {
    let mut vcpu = VcpuState {
        regs: Default::default(),
        sregs: Default::default(),
        xsave: vec![0x37f; 1024],
        xcrs: Default::default(),
        debugregs: Default::default(),
        lapic: Default::default(),
        mp_state: Default::default(),
        events: Default::default(),
        msrs: vec![kvm_bindings::kvm_msr_entry {
            index: 0x10,
            data: 0x1234_5678_9abc,
            ..Default::default()
        }],
        cpuid: vec![],
        tsc_khz: Some(2_000_000),
    };
    vcpu.regs.rip = 0x100_0000;
    vcpu.regs.rsp = 0x8ff0;
    vcpu.sregs.cr0 = 0x8000_0011;
    vcpu.lapic.regs[0x20] = 7;
    MicrovmState {
        config: "{\"machine-config\":{}}".into(),
        memory: MemoryLayout {
            regions: vec![
                MemoryRegion {
                    guest_addr: 0,
                    size: 0xc000_0000,
                    file_offset: 0,
                },
                MemoryRegion {
                    guest_addr: 0x1_0000_0000,
                    size: 0x4000_0000,
                    file_offset: 0xc000_0000,
                },
            ],
        },
        vm: VmState {
            irqchips: vec![Default::default(); 3],
            pit: Default::default(),
            clock: kvm_bindings::kvm_clock_data {
                clock: 42,
                ..Default::default()
            },
        },
        vcpus: vec![vcpu.clone(), vcpu],
        devices: vec![DeviceState {
            kind: "serial".into(),
            id: String::new(),
            base: 0x3f8,
            data: vec![1, 2, 3],
        }],
    }
}

#[test]
fn round_trip() {
    let s = sample();
    let image = encode(&s).unwrap();
    assert_eq!(&image[..8], b"KILNSNAP");
    let back: MicrovmState = decode(&image).unwrap();
    // Field by field where it matters, then byte for byte.
    assert_eq!(back.vcpus.len(), 2);
    assert_eq!(back.vcpus[1].regs.rip, 0x100_0000);
    assert_eq!(back.vcpus[1].sregs.cr0, 0x8000_0011);
    assert_eq!(back.vcpus[0].lapic.regs[0x20], 7);
    assert_eq!(back.vcpus[0].msrs[0].data, 0x1234_5678_9abc);
    assert_eq!(back.vm.clock.clock, 42);
    assert_eq!(back.devices, s.devices);
    assert_eq!(back.memory, s.memory);
    assert_eq!(encode(&back).unwrap(), image);
    assert_eq!(back.memory.file_len(), 0x1_0000_0000);
}

#[test]
fn file_round_trip_is_atomic() {
    let dir = std::env::temp_dir().join(format!("kiln-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state");
    write_file(&path, &sample()).unwrap();
    assert!(!dir.join("state.tmp").exists());
    let back: MicrovmState = read_file(&path).unwrap();
    assert_eq!(encode(&back).unwrap(), encode(&sample()).unwrap());
    let missing = read_file::<MicrovmState>(&dir.join("nope")).unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_truncation_is_refused() {
    let image = encode(&sample()).unwrap();
    for len in 0..image.len() {
        let err = decode::<MicrovmState>(&image[..len]).unwrap_err();
        assert!(
            matches!(err, SnapshotError::Truncated { .. }),
            "length {len}: {err}"
        );
    }
}

#[test]
fn every_flipped_payload_byte_is_caught() {
    let image = encode(&sample()).unwrap();
    // Every payload byte, and the checksum itself.
    for i in 24..image.len() {
        let mut bad = image.clone();
        bad[i] ^= 0x40;
        let err = decode::<MicrovmState>(&bad).unwrap_err();
        assert!(matches!(err, SnapshotError::Checksum), "byte {i}: {err}");
    }
}

#[test]
fn header_errors_name_the_problem() {
    let image = encode(&sample()).unwrap();

    let mut bad = image.clone();
    bad[0] = b'X';
    assert!(matches!(
        decode::<MicrovmState>(&bad),
        Err(SnapshotError::BadMagic)
    ));
    assert!(matches!(
        decode::<MicrovmState>(b"GARBAGE!GARBAGE!"),
        Err(SnapshotError::BadMagic)
    ));

    let mut bad = image.clone();
    bad[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
    let err = decode::<MicrovmState>(&bad).unwrap_err();
    let found = FORMAT_VERSION + 1;
    assert!(
        matches!(err, SnapshotError::Version { found: f, .. } if f == found),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("version {found}")),
        "{err}"
    );

    let mut bad = image.clone();
    let other = if Arch::host() == Arch::X86_64 {
        2u32
    } else {
        1
    };
    bad[12..16].copy_from_slice(&other.to_le_bytes());
    let err = decode::<MicrovmState>(&bad).unwrap_err();
    assert!(matches!(err, SnapshotError::Arch { .. }), "{err}");

    let mut long = image.clone();
    long.push(0);
    assert!(matches!(
        decode::<MicrovmState>(&long),
        Err(SnapshotError::TrailingBytes(1))
    ));
}

#[test]
fn a_valid_file_of_another_type_does_not_decode() {
    // Right header and checksum, but the payload is not a MicrovmState.
    let image = encode(&(1u8, 2u8)).unwrap();
    let err = decode::<MicrovmState>(&image).unwrap_err();
    assert!(matches!(err, SnapshotError::Decode(_)), "{err}");
}
