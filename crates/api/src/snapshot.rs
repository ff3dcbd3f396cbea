//! `PUT /snapshot/create` and `PUT /snapshot/load`: Firecracker's bodies.

use serde::{Deserialize, Serialize};

/// Full or diff snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// Every page of guest memory.
    #[default]
    Full,
    /// Only the pages dirtied since the last snapshot.
    Diff,
}

/// Body of `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where the guest memory goes.
    pub mem_file_path: String,
    /// Where the microVM state goes.
    pub snapshot_path: String,
    /// Full (default) or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// How guest memory is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// Map the memory file.
    File,
    /// A userfaultfd page server.
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: MemBackendType,
    /// The memory file (File) or the page server's socket (Uffd).
    pub backend_path: String,
}

/// A TAP device to use instead of the snapshot's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new TAP device.
    pub host_dev_name: String,
}

/// A vsock socket path to use instead of the snapshot's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The new Unix socket path.
    pub uds_path: String,
}

/// Body of `PUT /snapshot/load`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: String,
    /// The memory file (deprecated form of `mem_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// How memory is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Track dirty pages (for later diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Resume the VM once loaded (else it stays paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// TAP devices to use instead of the snapshot's.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// Vsock socket path to use instead of the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Advance kvmclock by the wall-clock time since the snapshot.
    #[serde(default)]
    pub clock_realtime: bool,
    /// Huge pages of the restored memory ("None" or "Snapshot").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl SnapshotLoadParams {
    /// The memory backend and its path (the memory file, or the Unix socket
    /// of a `Uffd` page-fault handler), checking the rules Firecracker
    /// applies to the two `mem_*` fields.
    pub fn memory_backend(&self) -> Result<(MemBackendType, &str), String> {
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(_), Some(_)) => {
                Err("only one of mem_file_path and mem_backend may be given".into())
            }
            (None, None) => Err("one of mem_file_path or mem_backend is required".into()),
            (Some(p), None) => Ok((MemBackendType::File, p)),
            (None, Some(b)) => Ok((b.backend_type, &b.backend_path)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_follow_firecracker() {
        let c: SnapshotCreateParams =
            serde_json::from_str(r#"{"mem_file_path":"m","snapshot_path":"s"}"#).unwrap();
        assert_eq!(c.snapshot_type, SnapshotType::Full);
        assert!(serde_json::from_str::<SnapshotCreateParams>(
            r#"{"mem_file_path":"m","snapshot_path":"s","snapshot_type":"Partial"}"#
        )
        .is_err());
        assert!(serde_json::from_str::<SnapshotCreateParams>(r#"{"snapshot_path":"s"}"#).is_err());

        let l: SnapshotLoadParams = serde_json::from_str(
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"File","backend_path":"m"},
                "resume_vm":true,"network_overrides":[{"iface_id":"eth0","host_dev_name":"tap1"}]}"#,
        )
        .unwrap();
        assert_eq!(l.memory_backend().unwrap(), (MemBackendType::File, "m"));
        assert!(l.resume_vm);
        let both = SnapshotLoadParams {
            mem_file_path: Some("m".into()),
            ..l.clone()
        };
        assert!(both.memory_backend().unwrap_err().contains("only one"));
        let none = SnapshotLoadParams {
            mem_backend: None,
            ..l.clone()
        };
        assert!(none.memory_backend().unwrap_err().contains("required"));
        let uffd = SnapshotLoadParams {
            mem_backend: Some(MemBackend {
                backend_type: MemBackendType::Uffd,
                backend_path: "/sock".into(),
            }),
            ..l
        };
        assert_eq!(
            uffd.memory_backend().unwrap(),
            (MemBackendType::Uffd, "/sock")
        );
        assert!(
            serde_json::from_str::<SnapshotLoadParams>(r#"{"snapshot_path":"s","x":1}"#).is_err()
        );
    }
}
