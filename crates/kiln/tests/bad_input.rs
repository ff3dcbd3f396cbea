//! Bad input to `kiln run`: one clear error line, non-zero exit, no panic,
//! no hang. These need no working KVM (the checks come first).

mod common;

use common::{guest_images, kiln_here, temp_file};

fn assert_one_line_error(out: &std::process::Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "expected one line, got: {stderr}"
    );
    assert!(stderr.starts_with("kiln: "), "{stderr}");
    assert!(
        stderr.contains(needle),
        "{stderr:?} should mention {needle:?}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn missing_kernel_names_the_path() {
    let out = kiln_here(&["run", "--kernel", "/nonexistent/kiln-vmlinuz"]);
    assert_one_line_error(&out, "/nonexistent/kiln-vmlinuz");
}

#[test]
fn non_kernel_file_is_refused() {
    let p = temp_file("not-a-kernel", &[0x5a; 64 * 1024]);
    let out = kiln_here(&["run", "--kernel", p.to_str().unwrap()]);
    assert_one_line_error(&out, "is not a Linux kernel");
}

#[test]
fn missing_initrd_names_the_path() {
    let imgs = guest_images();
    let out = kiln_here(&[
        "run",
        "--kernel",
        imgs.kernel.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd.img",
    ]);
    assert_one_line_error(&out, "/nonexistent/initrd.img");
}

#[test]
fn too_little_memory() {
    let imgs = guest_images();
    let out = kiln_here(&[
        "run",
        "--kernel",
        imgs.kernel.to_str().unwrap(),
        "--mem",
        "64",
    ]);
    assert_one_line_error(&out, "at least 128 MiB");
}

#[test]
fn vcpu_count_out_of_range() {
    let imgs = guest_images();
    for n in ["0", "33"] {
        let out = kiln_here(&[
            "run",
            "--kernel",
            imgs.kernel.to_str().unwrap(),
            "--vcpus",
            n,
        ]);
        assert_one_line_error(&out, "use 1 to 32");
    }
}

#[test]
fn missing_dev_kvm() {
    // Hide /dev in a private mount namespace (needs root, as the CI runs).
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "this test needs root (unshare -m)");
    let imgs = guest_images();
    let script = format!(
        "mount -t tmpfs tmpfs /dev && exec {} run --kernel {}",
        common::kiln_bin().display(),
        imgs.kernel.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .env("KILN_LAB", "0")
        .output()
        .expect("unshare");
    assert_one_line_error(&out, "cannot open /dev/kvm");
}
