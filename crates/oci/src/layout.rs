//! Reading an OCI image layout: a directory, or an `oci-layout` tar archive
//! read in place (its entries are indexed once; blobs are read by seeking).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::spec::{parse_user, Process, DEFAULT_PATH};
use crate::OciError;

/// Largest JSON document (index, manifest, config) read into memory.
const MAX_JSON: u64 = 16 << 20;
const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An OCI content descriptor.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Annotations (the ref name lives here).
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// Platform (in indexes).
    #[serde(default)]
    pub platform: Option<Platform>,
}

/// A descriptor's platform.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    /// CPU architecture (`amd64`).
    #[serde(default)]
    pub architecture: String,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
}

#[derive(Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize, Default)]
struct ImageConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<ContainerConfig>,
}

/// The part of an image config that says how to run it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// Program and leading arguments.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Default arguments (after the entrypoint).
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    /// Environment, `KEY=VALUE`.
    #[serde(default)]
    pub env: Option<Vec<String>>,
    /// Working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `UID[:GID]` or a name.
    #[serde(default)]
    pub user: Option<String>,
}

impl ContainerConfig {
    /// Parses the config document of an image (`{"config": {...}, ...}`).
    pub fn from_image_config(json: &[u8]) -> Result<Self, serde_json::Error> {
        let c: ImageConfig = serde_json::from_slice(json)?;
        Ok(c.config.unwrap_or_default())
    }
}

/// Where the blobs are.
#[derive(Debug)]
enum Source {
    Dir(PathBuf),
    /// Entry name → (data offset, size) in the archive.
    Archive(HashMap<String, (u64, u64)>),
}

/// An opened image: its manifest's layers and its config.
#[derive(Debug)]
pub struct Image {
    path: PathBuf,
    source: Source,
    /// Digest of the chosen manifest.
    pub manifest_digest: String,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
    /// How to run it.
    pub config: ContainerConfig,
}

/// A reader that hashes what passes through it.
pub(crate) struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

impl<R: Read> Hashing<R> {
    /// Reads to the end, then checks size and digest against `d`.
    pub(crate) fn finish(mut self, d: &Descriptor) -> Result<(), String> {
        io::copy(&mut self, &mut io::sink()).map_err(|e| format!("reading: {e}"))?;
        let got = format!("sha256:{}", hex(&self.hasher.finalize()));
        if self.count != d.size {
            return Err(format!(
                "{} bytes, the manifest says {}",
                self.count, d.size
            ));
        }
        if got != d.digest {
            return Err(format!("its content hashes to {got}"));
        }
        Ok(())
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hex part of a `sha256:` digest, checked to be exactly that.
fn sha256_hex(digest: &str) -> Option<&str> {
    let h = digest.strip_prefix("sha256:")?;
    (h.len() == 64
        && h.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
    .then_some(h)
}

impl Image {
    /// Opens the image at `path` (a layout directory or an oci-layout tar
    /// archive), choosing the manifest named `reference` (its
    /// `org.opencontainers.image.ref.name`), or the only one.
    pub fn open(path: &Path, reference: Option<&str>) -> Result<Self, OciError> {
        let meta = std::fs::metadata(path).map_err(|error| OciError::Open {
            path: path.into(),
            error,
        })?;
        let not_oci = |why: &str| OciError::NotOci {
            path: path.into(),
            why: why.into(),
        };
        let source = if meta.is_dir() {
            if !path.join("oci-layout").is_file() {
                return Err(not_oci("a directory without an oci-layout file"));
            }
            Source::Dir(path.into())
        } else {
            Source::Archive(index_archive(path, meta.len())?)
        };
        let mut img = Image {
            path: path.into(),
            source,
            manifest_digest: String::new(),
            layers: Vec::new(),
            config: ContainerConfig::default(),
        };
        let layout = img
            .read_named("oci-layout")?
            .ok_or_else(|| not_oci("no oci-layout file"))?;
        let layout: serde_json::Value = img.json(&layout, "oci-layout")?;
        if layout.get("imageLayoutVersion").is_none() {
            return Err(not_oci("oci-layout has no imageLayoutVersion"));
        }
        let index = img
            .read_named("index.json")?
            .ok_or_else(|| not_oci("no index.json"))?;
        let index: Index = img.json(&index, "index.json")?;
        let mut desc = img.choose(&index.manifests, reference, "index.json")?;
        // An index may point at another index (multi-platform images).
        for _ in 0..4 {
            if desc.media_type != MT_INDEX && desc.media_type != MT_DOCKER_LIST {
                break;
            }
            let inner: Index = img.json_blob(&desc, "image index")?;
            desc = img.choose(&inner.manifests, None, &format!("index {}", desc.digest))?;
        }
        let manifest: Manifest = img.json_blob(&desc, "manifest")?;
        let config: ImageConfig = img.json_blob(&manifest.config, "image config")?;
        for (what, got, want) in [
            ("architecture", &config.architecture, "amd64"),
            ("os", &config.os, "linux"),
        ] {
            if !got.is_empty() && got != want {
                return Err(OciError::Unsupported {
                    path: path.into(),
                    why: format!("the image is for {what} {got}; Kiln runs {want} images"),
                });
            }
        }
        for l in &manifest.layers {
            layer_compression(l).map_err(|why| OciError::Unsupported {
                path: path.into(),
                why: format!("layer {}: {why}", l.digest),
            })?;
        }
        img.manifest_digest = desc.digest;
        img.layers = manifest.layers;
        img.config = config.config.unwrap_or_default();
        Ok(img)
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Picks a manifest from an index's list.
    fn choose(
        &self,
        list: &[Descriptor],
        reference: Option<&str>,
        what: &str,
    ) -> Result<Descriptor, OciError> {
        let no = |why: String| OciError::NoManifest {
            path: self.path.clone(),
            why,
        };
        let names = || -> String {
            let v: Vec<&str> = list
                .iter()
                .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
                .collect();
            if v.is_empty() {
                "none is named".into()
            } else {
                format!("names: {}", v.join(", "))
            }
        };
        if let Some(r) = reference {
            return list
                .iter()
                .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(r))
                .cloned()
                .ok_or_else(|| no(format!("{what} has no manifest named {r:?} ({})", names())));
        }
        let for_us: Vec<&Descriptor> = list
            .iter()
            .filter(|d| {
                d.platform
                    .as_ref()
                    .is_none_or(|p| p.architecture == "amd64" && p.os == "linux")
            })
            .collect();
        match (list.len(), for_us.as_slice()) {
            (0, _) => Err(no(format!("{what} lists no manifest"))),
            (1, _) => Ok(list[0].clone()),
            (_, [one]) => Ok((*one).clone()),
            (n, _) => Err(no(format!(
                "{what} lists {n} manifests; choose one as PATH:NAME ({})",
                names()
            ))),
        }
    }

    fn json<T: serde::de::DeserializeOwned>(&self, data: &[u8], what: &str) -> Result<T, OciError> {
        serde_json::from_slice(data).map_err(|error| OciError::Json {
            path: self.path.clone(),
            what: what.into(),
            error,
        })
    }

    fn json_blob<T: serde::de::DeserializeOwned>(
        &self,
        d: &Descriptor,
        what: &'static str,
    ) -> Result<T, OciError> {
        if d.size > MAX_JSON {
            return Err(self.bad(d, what, format!("{} bytes is too large", d.size)));
        }
        let mut r = self.open_blob(d, what)?;
        let mut data = Vec::new();
        r.by_ref()
            .take(MAX_JSON)
            .read_to_end(&mut data)
            .map_err(|e| self.bad(d, what, e.to_string()))?;
        r.finish(d).map_err(|why| self.bad(d, what, why))?;
        self.json(&data, &format!("{what} {}", d.digest))
    }

    fn bad(&self, d: &Descriptor, what: &'static str, why: String) -> OciError {
        OciError::BadBlob {
            path: self.path.clone(),
            digest: d.digest.clone(),
            what,
            why,
        }
    }

    /// A top-level file of the layout (`oci-layout`, `index.json`).
    fn read_named(&self, name: &str) -> Result<Option<Vec<u8>>, OciError> {
        let r = match &self.source {
            Source::Dir(d) => match std::fs::read(d.join(name)) {
                Ok(v) => Some(v),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(crate::io_err(format!("reading {name}"))(e)),
            },
            Source::Archive(entries) => match entries.get(name) {
                None => None,
                Some(&(off, len)) => {
                    if len > MAX_JSON {
                        return Err(OciError::NotOci {
                            path: self.path.clone(),
                            why: format!("{name} is {len} bytes"),
                        });
                    }
                    let mut v = Vec::new();
                    self.archive_range(off, len)
                        .and_then(|mut r| r.read_to_end(&mut v))
                        .map_err(crate::io_err(format!("reading {name}")))?;
                    Some(v)
                }
            },
        };
        Ok(r)
    }

    fn archive_range(&self, off: u64, len: u64) -> io::Result<io::Take<File>> {
        let mut f = File::open(&self.path)?;
        f.seek(SeekFrom::Start(off))?;
        Ok(f.take(len))
    }

    /// A blob's content, hashed as it is read (call `finish` to verify).
    pub(crate) fn open_blob(
        &self,
        d: &Descriptor,
        what: &'static str,
    ) -> Result<Hashing<Box<dyn Read>>, OciError> {
        let hex = sha256_hex(&d.digest).ok_or_else(|| OciError::Unsupported {
            path: self.path.clone(),
            why: format!(
                "digest {:?} ({what}) is not sha256:<64 hex digits>",
                d.digest
            ),
        })?;
        let missing = || OciError::MissingBlob {
            path: self.path.clone(),
            digest: d.digest.clone(),
            what,
        };
        let inner: Box<dyn Read> = match &self.source {
            Source::Dir(dir) => match File::open(dir.join("blobs/sha256").join(hex)) {
                Ok(f) => Box::new(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
                Err(e) => return Err(crate::io_err(format!("opening blob {}", d.digest))(e)),
            },
            Source::Archive(entries) => {
                let &(off, len) = entries
                    .get(&format!("blobs/sha256/{hex}"))
                    .ok_or_else(missing)?;
                Box::new(
                    self.archive_range(off, len)
                        .map_err(crate::io_err(format!("reading blob {}", d.digest)))?,
                )
            }
        };
        Ok(Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        })
    }

    /// The process to run: `command` (if not empty) replaces the image's
    /// Cmd and follows its Entrypoint, as with `docker run` and `ctr run`.
    pub fn process(&self, command: &[String]) -> Result<Process, OciError> {
        let c = &self.config;
        let mut args = c.entrypoint.clone().unwrap_or_default();
        if command.is_empty() {
            args.extend(c.cmd.clone().unwrap_or_default());
        } else {
            args.extend(command.iter().cloned());
        }
        if args.is_empty() || args[0].is_empty() {
            return Err(OciError::NoCommand {
                path: self.path.clone(),
            });
        }
        let user = c.user.clone().unwrap_or_default();
        let (uid, gid) = parse_user(&user).ok_or_else(|| OciError::User {
            path: self.path.clone(),
            user: user.clone(),
        })?;
        let mut env = c.env.clone().unwrap_or_default();
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(DEFAULT_PATH.into());
        }
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            env.push(if uid == 0 { "HOME=/root" } else { "HOME=/" }.into());
        }
        let cwd = match c.working_dir.as_deref() {
            None | Some("") => "/".to_string(),
            Some(w) if w.starts_with('/') => w.to_string(),
            Some(w) => format!("/{w}"),
        };
        Ok(Process {
            args,
            env,
            cwd,
            uid,
            gid,
        })
    }
}

/// How a layer is compressed: `Ok(true)` for gzip, `Ok(false)` for none.
pub(crate) fn layer_compression(d: &Descriptor) -> Result<bool, String> {
    let mt = d.media_type.as_str();
    if mt.ends_with("+gzip") || mt.ends_with(".tar.gzip") {
        Ok(true)
    } else if mt.ends_with("+zstd") || mt.ends_with(".tar.zstd") {
        Err("zstd-compressed layers are not supported yet".into())
    } else if mt.contains(".tar") || mt.ends_with("tar") {
        Ok(false)
    } else {
        Err(format!("media type {mt:?} is not a tar layer"))
    }
}

/// An error's message cut to its first line (tar errors quote raw headers).
fn one_line(e: &dyn std::fmt::Display) -> String {
    let s = e.to_string();
    let first = s.lines().next().unwrap_or("");
    first.chars().take(120).collect()
}

/// Indexes a tar archive: entry name (without `./`) → (offset, size).
fn index_archive(path: &Path, len: u64) -> Result<HashMap<String, (u64, u64)>, OciError> {
    let not_oci = |why: String| OciError::NotOci {
        path: path.into(),
        why,
    };
    let truncated = |why: String| OciError::Truncated {
        path: path.into(),
        why,
    };
    let mut f = File::open(path).map_err(|error| OciError::Open {
        path: path.into(),
        error,
    })?;
    let mut magic = [0u8; 2];
    if f.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b] {
        return Err(not_oci(
            "a gzip file: decompress it into an oci-layout tar archive first".into(),
        ));
    }
    f.seek(SeekFrom::Start(0))
        .map_err(crate::io_err("seeking"))?;
    if len < 512 {
        return Err(not_oci(format!(
            "neither an image layout directory nor a tar archive: {len} bytes"
        )));
    }
    let mut archive = tar::Archive::new(f);
    let mut entries = HashMap::new();
    let mut end = 0u64;
    let iter = archive
        .entries_with_seek()
        .map_err(|e| not_oci(format!("not a tar archive: {e}")))?;
    for (i, e) in iter.enumerate() {
        let e = match e {
            Ok(e) => e,
            Err(_) if i == 0 => {
                return Err(not_oci(
                    "neither an image layout directory nor a tar archive".into(),
                ))
            }
            Err(err) => return Err(truncated(format!("after entry {i}: {}", one_line(&err)))),
        };
        let name = e
            .path()
            .map_err(|err| not_oci(format!("entry {i}: {}", one_line(&err))))?
            .to_string_lossy()
            .trim_start_matches("./")
            .trim_start_matches('/')
            .to_string();
        let (off, size) = (e.raw_file_position(), e.size());
        end = off + size.div_ceil(512) * 512;
        if off + size > len {
            return Err(truncated(format!(
                "{name} needs {} bytes, {} are there",
                size,
                len.saturating_sub(off)
            )));
        }
        if e.header().entry_type().is_file() {
            entries.insert(name, (off, size));
        }
    }
    // A complete archive ends with zero blocks; none means it was cut
    // between two entries.
    let mut f = File::open(path).map_err(crate::io_err("reopening the archive"))?;
    let mut tail = [0u8; 512];
    let ended = f.seek(SeekFrom::Start(end)).is_ok()
        && f.read_exact(&mut tail).is_ok()
        && tail.iter().all(|&b| b == 0);
    if !ended && !entries.is_empty() {
        return Err(truncated(format!(
            "it ends at byte {len}, without the end-of-archive blocks"
        )));
    }
    Ok(entries)
}
