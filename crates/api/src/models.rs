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
    /// Free page hinting (refused: not supported by Kiln). Always in the
    /// answers, as Firecracker's.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// The guest reports free memory, which the VMM gives back to the host.
    #[serde(default)]
    pub free_page_reporting: bool,
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

/// `PATCH /drives/{drive_id}` after boot (Firecracker's `PartialDrive`): a
/// new backing file and/or new rate limits for a running drive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive to change.
    pub drive_id: String,
    /// A new backing file (the drive keeps its read-only mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// New limits: a bucket given replaces the old one (removes it when its
    /// size or refill_time is 0); a bucket left out is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<crate::preboot::RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}` after boot (Firecracker's
/// `PartialNetworkInterface`): new rate limits for a running interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface to change.
    pub iface_id: String,
    /// New limits on frames to the guest (same rules as a drive's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<crate::preboot::RateLimiter>,
    /// New limits on frames from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<crate::preboot::RateLimiter>,
}

/// The MMDS version (`PUT /mmds/config`): V2 requires session tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// Tokens optional (Firecracker's default, deprecated there).
    #[default]
    V1,
    /// Every GET needs a token from `PUT /latest/api/token`.
    V2,
}

/// `PUT /mmds/config`: which interfaces reach the metadata service, where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    /// V1 or V2.
    #[serde(default)]
    pub version: MmdsVersion,
    /// IDs of the network interfaces whose guest traffic to the MMDS
    /// address is answered by the MMDS.
    pub network_interfaces: Vec<String>,
    /// The service's IPv4 address (default 169.254.169.254).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<std::net::Ipv4Addr>,
    /// Always answer in the IMDS text format, whatever `Accept` says.
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// The default MMDS address.
    pub const DEFAULT_IPV4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 169, 254);

    /// The address the service answers on.
    pub fn ipv4(&self) -> std::net::Ipv4Addr {
        self.ipv4_address.unwrap_or(Self::DEFAULT_IPV4)
    }

    /// Firecracker's checks that need no device list: a non-empty interface
    /// list and a link-local address outside 169.254.0.x and 169.254.255.x.
    pub fn validate(&self) -> Result<(), String> {
        if self.network_interfaces.is_empty() {
            return Err(
                "MMDS config error: The list of network interface IDs that allow \
                        forwarding MMDS requests is empty."
                    .into(),
            );
        }
        let o = self.ipv4().octets();
        if o[0] != 169 || o[1] != 254 || o[2] == 0 || o[2] == 255 {
            return Err("MMDS config error: The MMDS IPv4 address is not link local.".into());
        }
        Ok(())
    }
}
