//! Images built here byte by byte (no registry, no VM): layouts and
//! archives, manifest choice, config parsing, errors, and the erofs cache.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_oci::{chain_digest, Image, OciError};
use sha2::{Digest, Sha256};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-oci-test-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

fn sha(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a blob into `layout`, returning its descriptor JSON.
fn blob(layout: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
    let h = sha(data);
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::write(layout.join("blobs/sha256").join(&h), data).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{h}"), "size": data.len()})
}

fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (p, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o755);
        h.set_mtime(1);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(content.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, p, content.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A layout with two layers (gzip, then plain tar deleting a file) and
/// `config`; `names` are the ref names of manifests to list (each the same).
fn layout(dir: &Path, config: serde_json::Value, names: &[&str]) {
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let l1 = blob(
        dir,
        "application/vnd.oci.image.layer.v1.tar+gzip",
        &gzip(&tar_of(&[
            ("bin/hello", "#!/bin/sh\necho hi\n"),
            ("etc/old", "x"),
        ])),
    );
    let l2 = blob(
        dir,
        "application/vnd.oci.image.layer.v1.tar",
        &tar_of(&[("etc/.wh.old", ""), ("etc/new", "y")]),
    );
    let cfg = blob(
        dir,
        "application/vnd.oci.image.config.v1+json",
        serde_json::to_string(&config).unwrap().as_bytes(),
    );
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cfg, "layers": [l1, l2]});
    let m = blob(
        dir,
        "application/vnd.oci.image.manifest.v1+json",
        serde_json::to_string(&manifest).unwrap().as_bytes(),
    );
    let manifests: Vec<serde_json::Value> = names
        .iter()
        .map(|n| {
            let mut d = m.clone();
            if !n.is_empty() {
                d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": n});
            }
            d
        })
        .collect();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    fs::write(
        dir.join("index.json"),
        serde_json::to_string(&index).unwrap(),
    )
    .unwrap();
}

fn full_config() -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {
            "Entrypoint": ["/bin/hello"], "Cmd": ["--flag"],
            "Env": ["PATH=/bin", "GREETING=hi there"],
            "WorkingDir": "/srv", "User": "1000:100"
        },
        "rootfs": {"type": "layers", "diff_ids": []}
    })
}

/// `tar cf` of a layout directory, entries named `./...` as `umoci` users make them.
fn archive(dir: &Path, out: &Path) {
    let st = Command::new("tar")
        .arg("cf")
        .arg(out)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn config_and_process_from_a_layout_directory() {
    let d = tmp("dir");
    layout(&d, full_config(), &["latest"]);
    let img = Image::open(&d, None).unwrap();
    assert_eq!(img.layers.len(), 2);
    assert_eq!(
        img.config.entrypoint.as_deref(),
        Some(&["/bin/hello".to_string()][..])
    );
    let p = img.process(&[]).unwrap();
    assert_eq!(p.args, ["/bin/hello", "--flag"]);
    assert_eq!(p.env, ["PATH=/bin", "GREETING=hi there", "HOME=/"]);
    assert_eq!((p.cwd.as_str(), p.uid, p.gid), ("/srv", 1000, 100));
    // A command replaces Cmd and follows the Entrypoint (as `docker run`).
    let p = img.process(&["x".into(), "y".into()]).unwrap();
    assert_eq!(p.args, ["/bin/hello", "x", "y"]);
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn defaults_and_a_missing_command() {
    let d = tmp("nocmd");
    layout(
        &d,
        serde_json::json!({"architecture": "amd64", "os": "linux"}),
        &[""],
    );
    let img = Image::open(&d, None).unwrap();
    let err = img.process(&[]).unwrap_err();
    assert!(matches!(err, OciError::NoCommand { .. }), "{err}");
    assert!(
        err.to_string().contains("has no Entrypoint or Cmd"),
        "{err}"
    );
    let p = img.process(&["sh".into()]).unwrap();
    assert_eq!(p.cwd, "/");
    assert!(p.env.iter().any(|e| e.starts_with("PATH=/usr/local/sbin:")));
    assert!(p.env.contains(&"HOME=/root".to_string()));
    assert_eq!((p.uid, p.gid), (0, 0));
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn manifests_are_chosen_by_ref_name() {
    let d = tmp("refs");
    layout(&d, full_config(), &["a", "b"]);
    let err = Image::open(&d, None).unwrap_err().to_string();
    assert!(
        err.contains("lists 2 manifests; choose one as PATH:NAME (names: a, b)"),
        "{err}"
    );
    assert!(Image::open(&d, Some("b")).is_ok());
    let err = Image::open(&d, Some("c")).unwrap_err().to_string();
    assert!(err.contains("has no manifest named \"c\""), "{err}");
    layout(&d, full_config(), &[]);
    let err = Image::open(&d, None).unwrap_err().to_string();
    assert!(err.contains("index.json lists no manifest"), "{err}");
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn archives_read_in_place_and_bad_archives_say_what_is_wrong() {
    let d = tmp("archive");
    let l = d.join("layout");
    fs::create_dir(&l).unwrap();
    layout(&l, full_config(), &["latest"]);
    let a = d.join("img.tar");
    archive(&l, &a);
    let img = Image::open(&a, None).unwrap();
    assert_eq!(img.process(&[]).unwrap().args, ["/bin/hello", "--flag"]);

    let data = fs::read(&a).unwrap();
    let cut = d.join("cut.tar");
    let last = data.iter().rposition(|&b| b != 0).unwrap();
    for len in [data.len() / 2, last - 10, 1024 + 100] {
        fs::write(&cut, &data[..len]).unwrap();
        let err = Image::open(&cut, None).unwrap_err();
        assert!(
            matches!(err, OciError::Truncated { .. } | OciError::NotOci { .. }),
            "{len}: {err}"
        );
        assert!(!err.to_string().contains('\n'), "{err}");
    }
    fs::write(&cut, &data[..data.len() / 2]).unwrap();
    let err = Image::open(&cut, None).unwrap_err().to_string();
    assert!(err.contains("the archive is truncated"), "{err}");

    let text = d.join("notes.txt");
    fs::write(&text, "just some text, not an image\n".repeat(40)).unwrap();
    let err = Image::open(&text, None).unwrap_err().to_string();
    assert!(err.contains("not an OCI image"), "{err}");
    fs::write(&text, "tiny").unwrap();
    let err = Image::open(&text, None).unwrap_err().to_string();
    assert!(err.contains("not an OCI image"), "{err}");
    let plain = d.join("plain.tar");
    fs::write(&plain, tar_of(&[("hello", "world")])).unwrap();
    let err = Image::open(&plain, None).unwrap_err().to_string();
    assert!(
        err.contains("not an OCI image (no oci-layout file)"),
        "{err}"
    );
    let err = Image::open(&d.join("absent.tar"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("No such file"), "{err}");
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn corrupt_and_missing_blobs() {
    let d = tmp("blobs");
    layout(&d, full_config(), &[""]);
    let img = Image::open(&d, None).unwrap();
    let l1 = img.layers[0]
        .digest
        .strip_prefix("sha256:")
        .unwrap()
        .to_string();
    fs::write(d.join("blobs/sha256").join(&l1), b"garbage").unwrap();
    let err = img.build_rootfs(&d.join("cache")).unwrap_err().to_string();
    assert!(err.contains("is corrupt"), "{err}");
    fs::remove_file(d.join("blobs/sha256").join(&l1)).unwrap();
    let err = img.build_rootfs(&d.join("cache")).unwrap_err().to_string();
    assert!(err.contains("(layer) is missing"), "{err}");
    // Nothing half-built stays in the cache.
    assert_eq!(fs::read_dir(d.join("cache")).unwrap().count(), 0);
    fs::remove_dir_all(&d).unwrap();
}

fn have_mkfs_erofs() -> bool {
    Command::new("sh")
        .arg("-c")
        .arg("PATH=$PATH:/usr/sbin:/sbin command -v mkfs.erofs")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn erofs_images_are_cached_by_layer_chain() {
    assert!(
        have_mkfs_erofs(),
        "mkfs.erofs is not installed (scripts/setup.sh installs erofs-utils)"
    );
    let d = tmp("cache");
    let l = d.join("layout");
    fs::create_dir(&l).unwrap();
    layout(&l, full_config(), &[""]);
    let cache = d.join("cache");
    let img = Image::open(&l, None).unwrap();
    let first = img.build_rootfs(&cache).unwrap();
    assert!(!first.reused);
    assert_eq!(
        first.path,
        cache.join(format!("{}.erofs", chain_digest(&img.layers)))
    );
    let data = fs::read(&first.path).unwrap();
    // The erofs superblock magic at 1024.
    assert_eq!(&data[1024..1028], &0xE0F5_E1E2u32.to_le_bytes());
    assert_eq!(data.len() % 4096, 0);
    let mtime = fs::metadata(&first.path).unwrap().modified().unwrap();
    let second = Image::open(&l, None).unwrap().build_rootfs(&cache).unwrap();
    assert!(second.reused);
    assert_eq!(second.path, first.path);
    assert_eq!(
        fs::metadata(&second.path).unwrap().modified().unwrap(),
        mtime
    );
    // Only the image is left in the cache (no staging directories).
    let names: Vec<_> = fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    // Concurrent builders of one chain each finish with a complete image.
    fs::remove_file(&first.path).unwrap();
    let builders: Vec<_> = (0..3)
        .map(|_| {
            let (l, cache) = (l.clone(), cache.clone());
            std::thread::spawn(move || Image::open(&l, None).unwrap().build_rootfs(&cache).unwrap())
        })
        .collect();
    for b in builders {
        let r = b.join().unwrap();
        assert_eq!(fs::read(&r.path).unwrap().len(), data.len());
    }
    assert_eq!(fs::read_dir(&cache).unwrap().count(), 1);
    // The files the layers leave: a whiteout removed etc/old.
    // (fsck.erofs comes with mkfs.erofs, in erofs-utils.)
    let listing = erofs_listing(&first.path).expect("fsck.erofs --extract");
    assert!(listing.contains("./bin/hello\n"), "{listing}");
    assert!(listing.contains("./etc/new\n"), "{listing}");
    assert!(!listing.contains("etc/old"), "{listing}");
    fs::remove_dir_all(&d).unwrap();
}

/// Lists an erofs image's files with `fsck.erofs --extract`, if available.
fn erofs_listing(image: &Path) -> Option<String> {
    let out = image.with_extension("x");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "PATH=$PATH:/usr/sbin:/sbin fsck.erofs --extract={} {} >/dev/null 2>&1",
            out.display(),
            image.display()
        ))
        .status()
        .ok()?;
    if !st.success() {
        return None;
    }
    let o = Command::new("find")
        .arg(".")
        .current_dir(&out)
        .output()
        .ok()?;
    let _ = fs::remove_dir_all(&out);
    Some(String::from_utf8_lossy(&o.stdout).into_owned())
}
