//! The MMDS data store: one JSON document, replaced (`PUT /mmds`), merged
//! into (`PATCH /mmds`, RFC 7396 merge patch) and read by the guest through
//! JSON pointers, in JSON or in the IMDS text format.

use serde_json::{Map, Value};

use crate::MmdsError;

/// Firecracker's default size limit of the serialized store, bytes.
pub const DEFAULT_SIZE_LIMIT: usize = 51200;

/// The store.
#[derive(Debug)]
pub struct DataStore {
    data: Option<Value>,
    limit: usize,
}

impl DataStore {
    /// An empty (uninitialized) store holding at most `limit` bytes of JSON.
    pub fn new(limit: usize) -> Self {
        Self { data: None, limit }
    }

    fn check(&self, v: &Value) -> Result<(), MmdsError> {
        let size = serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX);
        if size > self.limit {
            return Err(MmdsError::TooLarge);
        }
        Ok(())
    }

    /// Replaces the whole document.
    pub fn put(&mut self, v: Value) -> Result<(), MmdsError> {
        self.check(&v)?;
        self.data = Some(v);
        Ok(())
    }

    /// Applies a JSON merge patch; on any error the store is unchanged.
    pub fn patch(&mut self, patch: &Value) -> Result<(), MmdsError> {
        let Some(current) = &self.data else {
            return Err(MmdsError::NotInitialized);
        };
        let mut merged = current.clone();
        merge_patch(&mut merged, patch);
        self.check(&merged)?;
        self.data = Some(merged);
        Ok(())
    }

    /// The document (`{}` before the first `PUT`).
    pub fn get(&self) -> Value {
        match &self.data {
            Some(Value::Null) | None => Value::Object(Map::new()),
            Some(v) => v.clone(),
        }
    }

    /// Whether a document was ever put.
    pub fn initialized(&self) -> bool {
        self.data.is_some()
    }

    /// The value at a guest request path (`/a/b/0`; `//` runs collapsed, one
    /// trailing `/` ignored), or `None`.
    pub fn lookup(&self, path: &str) -> Option<&Value> {
        let pointer = normalize(path);
        match &self.data {
            Some(d) => d.pointer(&pointer),
            None => None,
        }
    }
}

/// A guest request path as a JSON pointer.
pub fn normalize(path: &str) -> String {
    let mut p = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && p.ends_with('/')) {
            p.push(c);
        }
    }
    if p.ends_with('/') {
        p.pop();
    }
    p
}

/// RFC 7396: `null` members of an object patch remove keys, object members
/// merge recursively, anything else replaces the target.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// The IMDS text form of `v`: an object lists its keys one per line, sorted,
/// sub-objects with a trailing `/`; a string is itself. Other values have no
/// IMDS form (`None`).
pub fn imds_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => {
            let mut keys: Vec<String> = m
                .iter()
                .map(|(k, v)| {
                    if v.is_object() {
                        format!("{k}/")
                    } else {
                        k.clone()
                    }
                })
                .collect();
            keys.sort();
            Some(keys.join("\n"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}, "n": [1]}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "n": [1]}));
        let mut t = json!(["x"]);
        merge_patch(&mut t, &json!({"k": {"q": null, "r": 1}}));
        assert_eq!(t, json!({"k": {"r": 1}}));
        merge_patch(&mut t, &json!("s"));
        assert_eq!(t, json!("s"));
    }

    #[test]
    fn put_patch_limits_and_lookup() {
        let mut s = DataStore::new(64);
        assert!(matches!(
            s.patch(&json!({"a": 1})),
            Err(MmdsError::NotInitialized)
        ));
        assert_eq!(s.get(), json!({}));
        s.put(json!({"latest": {"meta-data": {"id": "i-1"}}, "l": [5, 6]}))
            .unwrap();
        assert!(matches!(
            s.put(json!({"big": "x".repeat(80)})),
            Err(MmdsError::TooLarge)
        ));
        // A patch that does not fit leaves the store as it was.
        assert!(matches!(
            s.patch(&json!({"big": "x".repeat(80)})),
            Err(MmdsError::TooLarge)
        ));
        assert_eq!(s.lookup("/latest//meta-data/id/"), Some(&json!("i-1")));
        assert_eq!(s.lookup("/l/1"), Some(&json!(6)));
        assert_eq!(s.lookup("/nope"), None);
        assert_eq!(s.lookup("/").and_then(|v| v.get("l")), Some(&json!([5, 6])));
    }

    #[test]
    fn imds_text_lists_keys_and_returns_strings() {
        let v = json!({"b": "1", "a": {"x": "y"}, "c": 3});
        assert_eq!(imds_text(&v).unwrap(), "a/\nb\nc");
        assert_eq!(imds_text(&json!("raw")).unwrap(), "raw");
        assert_eq!(imds_text(&json!(3)), None);
        assert_eq!(imds_text(&json!([1])), None);
    }
}
