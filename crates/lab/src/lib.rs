//! Kiln lab: reproducible guest images and a QEMU/TCG test host with nested KVM.
//!
//! This host's `/dev/kvm` cannot boot a stock Linux guest, so integration tests
//! that need a real L2 guest run inside a *lab*: QEMU in TCG mode with
//! emulated AMD-V booting Debian's cloud kernel, which loads `kvm-amd` and
//! thus offers a working `/dev/kvm` to the Kiln VMM.
//!
//! ```no_run
//! use kiln_lab::{images, Lab};
//! let imgs = images::ensure(&images::default_cache_dir())?;
//! let out = Lab::new(imgs)
//!     .binary("/usr/bin/env")
//!     .run(&["test -c /dev/kvm".to_string(), "env true".to_string()])?;
//! assert_eq!(out[0].status, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layout inside the lab: kernel at `/images/vmlinuz`, guest initramfs at
//! `/images/initramfs.img`, binaries at `/usr/local/bin/<name>`, per-run
//! script at `/lab/run.sh`.

#![deny(missing_docs)]

pub mod cpio;
pub mod framing;
pub mod images;
pub mod lab;
pub mod monitor;
pub mod scripts;

pub use images::{default_cache_dir, ensure, ImageError, Images};
pub use lab::{
    mode_from_env, qemu_available, wanted, CommandOutput, Lab, LabError, LabMode, RunReport,
};
