//! Kiln's microVM metadata service (MMDS), as in Firecracker: a JSON data
//! store the host fills through the API (`PUT`/`PATCH`/`GET /mmds`) and the
//! guest reads over HTTP at a link-local address (169.254.169.254 by
//! default) through the virtio-net interfaces named in `PUT /mmds/config`.
//!
//! - [`store`]: the document, merge patches, the IMDS text form;
//! - [`guest`]: the guest's HTTP requests and V2 session tokens;
//! - [`stack`]: the frames the guest sends to the MMDS address, taken off
//!   the interface before they reach the TAP and answered by a TCP/IP stack
//!   (smoltcp) inside the VMM.

pub mod guest;
pub mod stack;
pub mod store;

use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

use kiln_api::models::{MmdsConfig, MmdsVersion};

pub use stack::MmdsStack;
pub use store::{DataStore, DEFAULT_SIZE_LIMIT};

/// Errors of data store updates, with Firecracker's fault messages.
#[derive(Debug, thiserror::Error)]
pub enum MmdsError {
    /// `PATCH` before any `PUT`.
    #[error("MMDS error: The MMDS data store is not initialized.")]
    NotInitialized,
    /// The document would exceed the size limit.
    #[error("MMDS limit exceeded error: The MMDS patch request doesn't fit.")]
    TooLarge,
}

/// How the service answers: fixed at boot from `PUT /mmds/config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// V1 (tokens optional) or V2 (tokens required).
    pub version: MmdsVersion,
    /// The service's address.
    pub ipv4: Ipv4Addr,
    /// IMDS text whatever `Accept` says.
    pub imds_compat: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            version: MmdsVersion::V1,
            ipv4: MmdsConfig::DEFAULT_IPV4,
            imds_compat: false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The service shared by the API and every interface's stack.
#[derive(Debug)]
pub struct Mmds {
    store: Mutex<DataStore>,
    tokens: guest::Tokens,
    settings: Mutex<Settings>,
}

impl Mmds {
    /// An empty service whose document may hold `size_limit` bytes.
    pub fn new(size_limit: usize) -> Self {
        Self {
            store: Mutex::new(DataStore::new(size_limit)),
            tokens: guest::Tokens::default(),
            settings: Mutex::new(Settings::default()),
        }
    }

    /// Applies a `PUT /mmds/config` (validated by the caller).
    pub fn configure(&self, c: MmdsConfig) {
        *lock(&self.settings) = Settings {
            version: c.version,
            ipv4: c.ipv4(),
            imds_compat: c.imds_compat,
        };
    }

    /// The current settings.
    pub fn settings(&self) -> Settings {
        *lock(&self.settings)
    }

    /// The data store.
    pub fn store(&self) -> MutexGuard<'_, DataStore> {
        lock(&self.store)
    }

    /// The V2 session tokens.
    pub fn tokens(&self) -> &guest::Tokens {
        &self.tokens
    }
}

impl kiln_api::mmds::MmdsData for Mmds {
    fn apply(
        &self,
        op: kiln_api::mmds::MmdsOp,
    ) -> Result<Option<serde_json::Value>, kiln_api::ApiError> {
        use kiln_api::mmds::MmdsOp;
        let mut store = self.store();
        let r = match op {
            MmdsOp::Put(v) => store.put(v).map(|()| None),
            MmdsOp::Patch(v) => store.patch(&v).map(|()| None),
            MmdsOp::Get => Ok(Some(store.get())),
        };
        r.map_err(|e| match e {
            MmdsError::TooLarge => kiln_api::ApiError::PayloadTooLarge(e.to_string()),
            MmdsError::NotInitialized => kiln_api::ApiError::Invalid(e.to_string()),
        })
    }
}
