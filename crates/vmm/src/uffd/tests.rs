//! Tests of the userfaultfd backend: the ABI constants, the handover
//! message, and real page serving between threads of this process (the
//! kernel's userfaultfd, no VM needed).

use std::sync::mpsc::channel;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::uffd_handler::{ServeStats, WS_HEADER};

#[test]
fn abi_matches_the_kernel_header() {
    // Values from linux/userfaultfd.h as compiled for x86_64.
    assert_eq!(UFFDIO_API, 0xc018_aa3f);
    assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
    assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
    assert_eq!(UFFDIO_COPY, 0xc028_aa03);
    assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
    assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    assert_eq!(size_of::<UffdMsg>(), 32);
}

#[test]
fn region_messages_follow_firecracker() {
    let r = UffdRegion {
        base_host_virt_addr: 0x7f00_0000_0000,
        size: 1 << 20,
        offset: 4096,
        page_size: Some(4096),
        page_size_kib: Some(4),
    };
    let json = serde_json::to_string(std::slice::from_ref(&r)).unwrap();
    assert!(json.starts_with(r#"[{"base_host_virt_addr":139637976727552,"size":1048576,"offset":4096,"page_size":4096"#), "{json}");
    // Either page-size field alone (current or older Firecracker).
    let only_bytes: Vec<UffdRegion> = serde_json::from_str(
        r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096}]"#,
    )
    .unwrap();
    assert_eq!(only_bytes[0].page_bytes(), 4096);
    let only_kib: Vec<UffdRegion> = serde_json::from_str(
        r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":2048}]"#,
    )
    .unwrap();
    assert_eq!(only_kib[0].page_bytes(), 2 << 20);
}

#[test]
fn working_set_files_are_checked() {
    let ws = WorkingSet::parse(&format!("{WS_HEADER}\n5\n71\n\n20\n")).unwrap();
    assert_eq!(ws.pages, vec![5, 71, 20]);
    assert!(WorkingSet::parse("5\n6\n").unwrap_err().contains("header"));
    let bad = WorkingSet::parse(&format!("{WS_HEADER}\n5\nfive\n")).unwrap_err();
    assert!(bad.contains("line 3"), "{bad}");
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-uffd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// A sparse memory file of two regions (like a guest above 3 GiB, scaled
/// down) with data on low page 5 and high page 7 (file page 64 + 7).
fn memory_file(name: &str) -> (PathBuf, MemoryLayout) {
    let mem = kiln_devices::GuestMem::from_ranges(&[
        (GuestAddress(0), 64 * PAGE),
        (GuestAddress(0x1_0000_0000), 32 * PAGE),
    ])
    .unwrap();
    mem.write_slice(b"low", GuestAddress(5 * PAGE as u64))
        .unwrap();
    mem.write_slice(b"high", GuestAddress(0x1_0000_0000 + 7 * PAGE as u64))
        .unwrap();
    let path = tmp(name);
    let (layout, _) = crate::memory_file::save_full(&mem, &path).unwrap();
    (path, layout)
}

/// Registered memory, or None when this host refuses userfaultfd.
fn registered(layout: &MemoryLayout) -> Option<(kiln_devices::GuestMem, Uffd, Vec<UffdRegion>)> {
    match registered_memory(layout) {
        Ok(r) => Some(r),
        Err(UffdError::Io { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::EPERM) | Some(libc::ENOSYS)
            ) =>
        {
            eprintln!("skipped: userfaultfd is refused here ({source})");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// Hands `uffd` over a socket pair to a handler thread serving `file`;
/// the thread reports `ready` after its prefetch and returns its stats.
fn start_handler(
    uffd: Uffd,
    regions: &[UffdRegion],
    file: PathBuf,
    options: HandlerOptions,
) -> (
    HandlerLink,
    std::sync::mpsc::Receiver<()>,
    std::thread::JoinHandle<ServeStats>,
) {
    let (vmm_end, handler_end) = UnixStream::pair().unwrap();
    let (ready_tx, ready) = channel();
    let handler = std::thread::spawn(move || {
        let (uffd, regions) = receive(&handler_end).unwrap();
        let mut server = PageServer::new(uffd, &regions, &file, options.record.as_deref()).unwrap();
        if let Some(ws) = &options.prefetch {
            server.prefetch(&WorkingSet::read(ws).unwrap()).unwrap();
        }
        ready_tx.send(()).unwrap();
        server.serve(Some(&handler_end)).unwrap();
        server.stats
    });
    let link = hand_over(vmm_end, Path::new("pair"), uffd, regions).unwrap();
    (link, ready, handler)
}

fn read(mem: &kiln_devices::GuestMem, addr: u64, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

#[test]
fn faults_are_served_from_the_file_and_recorded_then_prefetched() {
    let (file, layout) = memory_file("mem");
    let Some((mem, uffd, regions)) = registered(&layout) else {
        return;
    };
    assert_eq!(regions.len(), 2);
    assert_eq!(regions[1].offset, 64 * PAGE as u64);
    let ws = tmp("ws");
    let options = HandlerOptions {
        record: Some(ws.clone()),
        prefetch: None,
    };
    let (link, ready, handler) = start_handler(uffd, &regions, file.clone(), options);
    ready.recv().unwrap();
    // Touch order: high page 7, a hole (page 20), low page 5, page 5 again.
    assert_eq!(read(&mem, 0x1_0000_0000 + 7 * PAGE as u64, 4), b"high");
    assert_eq!(read(&mem, 20 * PAGE as u64, 8), vec![0; 8]);
    assert_eq!(read(&mem, 5 * PAGE as u64, 3), b"low");
    assert_eq!(read(&mem, 5 * PAGE as u64 + 1, 2), b"ow");
    // A first write to a hole (page 40): one fault, a page of zeros.
    mem.write_slice(b"w", GuestAddress(40 * PAGE as u64))
        .unwrap();
    assert_eq!(read(&mem, 40 * PAGE as u64, 2), b"w\0");
    // The guest's writes land in its own memory, as with any RAM.
    mem.write_slice(b"new", GuestAddress(20 * PAGE as u64))
        .unwrap();
    assert_eq!(read(&mem, 20 * PAGE as u64, 3), b"new");
    drop(link); // the VMM goes: the handler ends
    let stats = handler.join().unwrap();
    assert_eq!(stats.faults, 4, "{stats}");
    assert_eq!((stats.copied, stats.zeroed), (2, 2), "{stats}");
    let recorded = std::fs::read_to_string(&ws).unwrap();
    assert_eq!(recorded, format!("{WS_HEADER}\n71\n20\n5\n40\n"));

    // A new restore with that working set prefetched: those pages need no
    // fault; another page still faults.
    let Some((mem, uffd, regions)) = registered(&layout) else {
        return;
    };
    let options = HandlerOptions {
        record: None,
        prefetch: Some(ws),
    };
    let (link, ready, handler) = start_handler(uffd, &regions, file, options);
    ready.recv().unwrap();
    assert_eq!(read(&mem, 5 * PAGE as u64, 3), b"low");
    assert_eq!(read(&mem, 0x1_0000_0000 + 7 * PAGE as u64, 4), b"high");
    assert_eq!(read(&mem, 20 * PAGE as u64, 8), vec![0; 8]);
    assert_eq!(read(&mem, 30 * PAGE as u64, 8), vec![0; 8]);
    drop(link);
    let stats = handler.join().unwrap();
    assert_eq!(stats.prefetched, 4, "{stats}");
    assert_eq!(stats.faults, 1, "only the page outside the set: {stats}");
}

#[test]
fn the_in_process_handler_thread_serves_the_file() {
    let (file, layout) = memory_file("mem-thread");
    if registered(&layout).is_none() {
        return;
    }
    let backend = MemBackend::UffdThread {
        mem_file: file,
        options: HandlerOptions::default(),
    };
    let (mem, link) = guest_memory(&backend, &layout).unwrap();
    assert!(link.is_none());
    assert_eq!(read(&mem, 0x1_0000_0000 + 7 * PAGE as u64, 4), b"high");
    assert_eq!(read(&mem, 5 * PAGE as u64, 3), b"low");
    assert_eq!(read(&mem, 63 * PAGE as u64, 2), vec![0; 2]);
}

#[test]
fn bad_handovers_and_files_are_refused_with_a_reason() {
    let (file, layout) = memory_file("mem-bad");
    // No handler listening: nothing is set up.
    let err = guest_memory(&MemBackend::Uffd(tmp("nobody.sock")), &layout).unwrap_err();
    assert!(err.to_string().contains("nobody.sock"), "{err}");

    let Some((_mem, uffd, mut regions)) = registered(&layout) else {
        return;
    };
    // A memory file too short for the regions.
    let short = tmp("short");
    std::fs::write(&short, vec![1u8; PAGE]).unwrap();
    let e = PageServer::new(uffd.try_clone().unwrap(), &regions, &short, None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("is 4096 bytes"), "{e}");
    // Huge pages are not served.
    regions[0].page_size = Some(2 << 20);
    let e = PageServer::new(uffd.try_clone().unwrap(), &regions, &file, None)
        .err()
        .unwrap();
    assert!(e.to_string().contains("only 4 KiB pages"), "{e}");

    // A message without a descriptor, or not JSON.
    let (a, b) = UnixStream::pair().unwrap();
    std::io::Write::write_all(&mut &a, b"[]").unwrap();
    let e = receive(&b).unwrap_err();
    assert!(e.to_string().contains("no userfaultfd"), "{e}");
    let (a, b) = UnixStream::pair().unwrap();
    a.send_with_fd(&b"not json"[..], uffd.as_raw_fd()).unwrap();
    drop(a);
    let e = receive(&b).unwrap_err();
    assert!(e.to_string().contains("bad region list"), "{e}");
}
