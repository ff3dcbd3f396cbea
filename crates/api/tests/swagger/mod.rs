//! A small validator for the subset of Swagger 2.0 that Firecracker's API
//! specification uses: operations under `paths` (method, body parameter,
//! responses by status or `default`) and schemas made of `$ref` to
//! `#/definitions/...`, `type` (object, array, string, integer, number,
//! boolean), `properties`, `required`, `items`, `enum`, `minimum`,
//! `maximum` and `additionalProperties`. Anything else in a schema
//! (descriptions, formats, defaults, ...) is documentation and ignored.

use serde_json::Value as Json;
use serde_yaml::Value as Yaml;

/// Firecracker's specification, from the repository's copy.
pub struct Spec {
    root: Yaml,
}

const SPEC_TEXT: &str = include_str!("../data/firecracker-api.yaml");

impl Spec {
    /// Parses the copy in tests/data.
    pub fn load() -> Self {
        let root: Yaml = serde_yaml::from_str(SPEC_TEXT).expect("the spec copy parses as YAML");
        assert_eq!(root["swagger"].as_str(), Some("2.0"), "a Swagger 2.0 spec");
        Self { root }
    }

    /// Every operation: (method in upper case, path template).
    pub fn operations(&self) -> Vec<(String, String)> {
        let mut ops = Vec::new();
        for (path, item) in self.root["paths"].as_mapping().expect("paths") {
            for (method, _) in item.as_mapping().expect("path item") {
                let (p, m) = (path.as_str().unwrap(), method.as_str().unwrap());
                ops.push((m.to_uppercase(), p.to_string()));
            }
        }
        ops
    }

    /// The template of `path` among the spec's paths (`/drives/x` matches
    /// `/drives/{drive_id}`).
    pub fn template_of(&self, path: &str) -> Option<String> {
        let segs: Vec<&str> = path.split('/').collect();
        self.root["paths"]
            .as_mapping()?
            .keys()
            .filter_map(|k| k.as_str())
            .find(|t| {
                let ts: Vec<&str> = t.split('/').collect();
                ts.len() == segs.len()
                    && ts
                        .iter()
                        .zip(&segs)
                        .all(|(t, s)| t == s || (t.starts_with('{') && !s.is_empty()))
            })
            .map(str::to_string)
    }

    fn operation(&self, method: &str, template: &str) -> Option<&Yaml> {
        let op = &self.root["paths"][template][method.to_lowercase().as_str()];
        (!op.is_null()).then_some(op)
    }

    /// The schema of the operation's body parameter, if it has one.
    pub fn body_schema(&self, method: &str, template: &str) -> Option<&Yaml> {
        self.operation(method, template)?["parameters"]
            .as_sequence()?
            .iter()
            .find(|p| p["in"].as_str() == Some("body"))
            .map(|p| &p["schema"])
    }

    /// What the spec says about answering `status`: `Err` if the operation
    /// lists neither that status nor a `default`; else the response's schema
    /// (`None` when the response has no body).
    pub fn response_schema(
        &self,
        method: &str,
        template: &str,
        status: u16,
    ) -> Result<Option<&Yaml>, String> {
        let op = self
            .operation(method, template)
            .ok_or_else(|| format!("{method} {template} is not in the spec"))?;
        let responses = &op["responses"];
        let by_code = &responses[Yaml::Number(status.into())];
        let resp = if !by_code.is_null() {
            by_code
        } else if !responses["default"].is_null() {
            &responses["default"]
        } else {
            return Err(format!(
                "{method} {template}: status {status} not in the spec"
            ));
        };
        let schema = &resp["schema"];
        Ok((!schema.is_null()).then_some(schema))
    }

    /// The definition `name`.
    pub fn definition(&self, name: &str) -> &Yaml {
        let d = &self.root["definitions"][name];
        assert!(!d.is_null(), "no definition {name}");
        d
    }

    /// Checks `value` against `schema`; returns every violation, each with
    /// the JSON path where it is.
    pub fn validate(&self, schema: &Yaml, value: &Json) -> Vec<String> {
        let mut errors = Vec::new();
        self.check(schema, value, "$", &mut errors, 0);
        errors
    }

    fn resolve<'a>(&'a self, mut schema: &'a Yaml) -> &'a Yaml {
        for _ in 0..16 {
            match schema["$ref"].as_str() {
                Some(r) => {
                    let name = r
                        .strip_prefix("#/definitions/")
                        .unwrap_or_else(|| panic!("unsupported $ref {r}"));
                    schema = self.definition(name);
                }
                None => return schema,
            }
        }
        panic!("$ref chain too long");
    }

    fn check(&self, schema: &Yaml, value: &Json, at: &str, errors: &mut Vec<String>, depth: usize) {
        assert!(depth < 64, "schema nesting too deep at {at}");
        let schema = self.resolve(schema);
        if let Some(allowed) = schema["enum"].as_sequence() {
            let ok = allowed.iter().any(|a| yaml_eq_json(a, value));
            if !ok {
                errors.push(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        let ty = schema["type"].as_str().unwrap_or(
            // A schema with properties but no type describes an object.
            if schema["properties"].is_mapping() {
                "object"
            } else {
                ""
            },
        );
        let type_ok = match ty {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "" => true,
            other => panic!("unsupported schema type {other} at {at}"),
        };
        if !type_ok {
            errors.push(format!("{at}: expected {ty}, got {value}"));
            return;
        }
        if let Some(n) = value.as_f64() {
            if let Some(min) = schema["minimum"].as_f64() {
                if n < min {
                    errors.push(format!("{at}: {value} is below the minimum {min}"));
                }
            }
            if let Some(max) = schema["maximum"].as_f64() {
                if n > max {
                    errors.push(format!("{at}: {value} is above the maximum {max}"));
                }
            }
        }
        if let (Some(items), Some(list)) = (schema.get("items"), value.as_array()) {
            for (i, v) in list.iter().enumerate() {
                self.check(items, v, &format!("{at}[{i}]"), errors, depth + 1);
            }
        }
        let Some(obj) = value.as_object() else {
            return;
        };
        for req in schema["required"].as_sequence().into_iter().flatten() {
            let name = req.as_str().expect("required names are strings");
            if !obj.contains_key(name) {
                errors.push(format!("{at}: missing required property {name:?}"));
            }
        }
        let props = schema["properties"].as_mapping();
        for (k, v) in obj {
            let sub = props.and_then(|p| p.get(k.as_str()));
            match (sub, schema.get("additionalProperties")) {
                (Some(s), _) => self.check(s, v, &format!("{at}.{k}"), errors, depth + 1),
                (None, Some(Yaml::Bool(false))) => {
                    errors.push(format!("{at}: property {k:?} is not allowed"))
                }
                (None, Some(extra)) if extra.is_mapping() => {
                    self.check(extra, v, &format!("{at}.{k}"), errors, depth + 1)
                }
                // Swagger 2.0: other properties are allowed by default.
                _ => {}
            }
        }
    }
}

fn yaml_eq_json(y: &Yaml, j: &Json) -> bool {
    match (y, j) {
        (Yaml::String(a), Json::String(b)) => a == b,
        (Yaml::Bool(a), Json::Bool(b)) => a == b,
        (Yaml::Number(a), Json::Number(b)) => a.as_f64() == b.as_f64(),
        _ => false,
    }
}

#[test]
fn validator_catches_what_it_claims_to() {
    let spec = Spec::load();
    let mc = spec.definition("MachineConfiguration");
    let ok = serde_json::json!({"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"});
    assert!(spec.validate(mc, &ok).is_empty());
    for (bad, why) in [
        (serde_json::json!({"mem_size_mib": 256}), "missing required"),
        (
            serde_json::json!({"vcpu_count": "2", "mem_size_mib": 256}),
            "expected integer",
        ),
        (
            serde_json::json!({"vcpu_count": 33, "mem_size_mib": 256}),
            "above the maximum",
        ),
        (
            serde_json::json!({"vcpu_count": 0, "mem_size_mib": 256}),
            "below the minimum",
        ),
        (
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": 256, "huge_pages": "1G"}),
            "is not one of",
        ),
        (serde_json::json!([1]), "expected object"),
    ] {
        let e = spec.validate(mc, &bad);
        assert!(e.iter().any(|e| e.contains(why)), "{bad}: {e:?}");
    }
    // Nested $ref: a drive's rate limiter's bucket.
    let d = spec.definition("Drive");
    let bad = serde_json::json!({"drive_id": "a", "is_root_device": false,
        "rate_limiter": {"bandwidth": {"size": -1, "refill_time": 1}}});
    let e = spec.validate(d, &bad);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("$.rate_limiter.bandwidth.size"), "{e:?}");
    // additionalProperties as a schema (Metrics.properties: strings).
    let m = spec.definition("Metrics");
    let bad = serde_json::json!({"metrics_path": "/m", "properties": {"a": 1}});
    assert!(!spec.validate(m, &bad).is_empty());
    assert_eq!(
        spec.template_of("/drives/rootfs").as_deref(),
        Some("/drives/{drive_id}")
    );
    assert_eq!(spec.template_of("/drives/"), None);
    assert_eq!(spec.template_of("/nope"), None);
    assert!(spec.response_schema("GET", "/", 200).unwrap().is_some());
    assert!(spec
        .response_schema("PUT", "/actions", 204)
        .unwrap()
        .is_none());
    // 400 is not listed for GET /, but `default` covers it.
    assert!(spec.response_schema("GET", "/", 400).unwrap().is_some());
}
