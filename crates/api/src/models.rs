//! Request and response bodies, with Firecracker's field names
//! (see Firecracker's `firecracker.yaml`).

use serde::{Deserialize, Serialize};

/// `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Instance id.
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    /// Kiln's version.
    pub vmm_version: String,
    /// Always "kiln".
    pub app_name: String,
}

/// `GET /version`. Firecracker's field name, so its clients parse it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    /// Kiln's version.
    pub firecracker_version: String,
}

/// `GET /balloon` (and, later, `PUT /balloon`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Target balloon size, MiB.
    pub amount_mib: u64,
    /// Whether the guest deflates under memory pressure.
    pub deflate_on_oom: bool,
    /// Seconds between statistics refreshes; 0 disables statistics.
    #[serde(default)]
    pub stats_polling_interval_s: u32,
}

/// `PATCH /vm`: Firecracker's VM state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop every vCPU.
    Paused,
    /// Run again.
    Resumed,
}

/// The body of `PATCH /vm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmStateUpdate {
    /// The new state.
    pub state: VmState,
}

/// `PATCH /balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// New target balloon size, MiB.
    pub amount_mib: u64,
}

/// `PATCH /balloon/statistics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// New seconds between statistics refreshes. After boot, statistics
    /// cannot be turned on (from 0) or off (to 0).
    pub stats_polling_interval_s: u32,
}

/// `GET /balloon/statistics`. Guest statistics are in bytes (or counts) and
/// absent when the guest has not reported them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Target size, 4 KiB pages.
    pub target_pages: u64,
    /// Current size, 4 KiB pages.
    pub actual_pages: u64,
    /// Target size, MiB.
    pub target_mib: u64,
    /// Current size, MiB.
    pub actual_mib: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub swap_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub swap_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub major_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub minor_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub free_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub total_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub available_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub disk_caches: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub hugetlb_allocations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub hugetlb_failures: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub oom_kill: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub alloc_stall: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub async_scan: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub direct_scan: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub async_reclaim: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub direct_reclaim: Option<u64>,
}

impl BalloonStats {
    /// Numbers from the device: sizes in MiB and the guest's (tag, value)
    /// pairs (virtio 1.2+ tags 0..=15, Firecracker's order).
    pub fn from_device(target_mib: u64, actual_mib: u64, raw: &[(u16, u64)]) -> Self {
        let mut s = Self {
            target_pages: target_mib << 8,
            actual_pages: actual_mib << 8,
            target_mib,
            actual_mib,
            ..Default::default()
        };
        for &(tag, v) in raw {
            let slot = match tag {
                0 => &mut s.swap_in,
                1 => &mut s.swap_out,
                2 => &mut s.major_faults,
                3 => &mut s.minor_faults,
                4 => &mut s.free_memory,
                5 => &mut s.total_memory,
                6 => &mut s.available_memory,
                7 => &mut s.disk_caches,
                8 => &mut s.hugetlb_allocations,
                9 => &mut s.hugetlb_failures,
                10 => &mut s.oom_kill,
                11 => &mut s.alloc_stall,
                12 => &mut s.async_scan,
                13 => &mut s.direct_scan,
                14 => &mut s.async_reclaim,
                15 => &mut s.direct_reclaim,
                _ => continue,
            };
            *slot = Some(v);
        }
        s
    }
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What went wrong.
    pub fault_message: String,
}
