//! The API side of the microVM metadata service: the data operations of
//! `/mmds` and the store behind them (implemented by `kiln-mmds`).

use serde_json::Value;

use crate::ApiError;

/// One data request on `/mmds`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MmdsOp {
    /// `PUT /mmds`: replace the document.
    Put(Value),
    /// `PATCH /mmds`: JSON merge patch.
    Patch(Value),
    /// `GET /mmds`.
    Get,
}

/// The document store the API reads and writes.
pub trait MmdsData: Send + Sync {
    /// Applies `op`; `GET` returns the document.
    fn apply(&self, op: MmdsOp) -> Result<Option<Value>, ApiError>;
}

/// Firecracker's fault when the running VM has no interface with MMDS.
pub const NOT_INITIALIZED: &str = "MMDS error: The MMDS data store is not initialized.";
