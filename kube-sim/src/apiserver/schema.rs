//! Structural-schema enforcement for custom resources: defaulting, pruning of unknown fields,
//! the validations of `openAPIV3Schema` that CRDs commonly use, and the CEL rules
//! (`x-kubernetes-validations`) of the subset `cel.rs` evaluates; [`validate`] turns the outcome
//! into the API server's answer (400 under `fieldValidation=Strict`, 422 `Invalid`).

use std::cmp::Ordering;

use regex::Regex;
use serde_json::{Map, Value};

use crate::apiserver::cel;
use crate::apiserver::errors::{ApiError, FieldError, short_value};
use crate::apiserver::resources::ResourceType;

/// Result of checking an object against its schema.
#[derive(Debug, Default)]
pub struct Outcome {
    pub errors: Vec<FieldError>,
    /// Paths of fields the schema does not know (they are pruned from the object).
    pub unknown: Vec<String>,
}

/// Applies defaults, prunes unknown fields and validates `obj` against `schema` (the
/// `openAPIV3Schema` of a CRD version). `apiVersion`, `kind` and `metadata` are not validated.
pub fn check(schema: &Value, obj: &mut Value) -> Outcome {
    check_update(schema, obj, None)
}

/// Like [`check`], with the stored object for transition rules (`oldSelf`).
pub fn check_update(schema: &Value, obj: &mut Value, old: Option<&Value>) -> Outcome {
    let mut out = Outcome::default();
    let Some(map) = obj.as_object_mut() else {
        out.errors.push(FieldError::with(
            "<root>",
            "FieldValueTypeInvalid",
            "must be an object",
        ));
        return out;
    };
    let props = schema.get("properties").and_then(Value::as_object);
    apply_defaults(schema, map);
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match props.and_then(|p| p.get(&key)) {
            Some(sub) => {
                if let Some(v) = map.get_mut(&key) {
                    walk(sub, v, &key, &mut out, old.and_then(|o| o.get(&key)));
                }
            }
            None if preserves(schema) => {}
            None => {
                out.unknown.push(key.clone());
                map.remove(&key);
            }
        }
    }
    check_required(schema, map, "", &mut out);
    if out.errors.is_empty() {
        check_rules(schema, obj, "", old, &mut out);
    }
    out
}

/// Evaluates the `x-kubernetes-validations` of one node.
fn check_rules(schema: &Value, v: &Value, path: &str, old: Option<&Value>, out: &mut Outcome) {
    let Some(rules) = schema["x-kubernetes-validations"].as_array() else {
        return;
    };
    for r in rules {
        let Some(rule) = r["rule"].as_str() else {
            continue;
        };
        let transition = cel::is_transition_rule(rule);
        if transition && old.is_none() {
            continue;
        }
        let field = match r["fieldPath"].as_str() {
            Some(fp) => child(path, fp.trim_start_matches('.')),
            None if path.is_empty() => "<nil>".to_string(),
            None => path.to_string(),
        };
        let message = r["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| format!("failed rule: {rule}"));
        match cel::eval_rule(rule, v, if transition { old } else { None }) {
            Ok(true) => {}
            Ok(false) => out.errors.push(FieldError::with(
                &field,
                "FieldValueInvalid",
                format!("Invalid value: \"{}\": {message}", type_name(v)),
            )),
            Err(cel::CelError::Eval(e)) => out.errors.push(FieldError::with(
                &field,
                "FieldValueInvalid",
                format!(
                    "Invalid value: \"{}\": {message} (evaluating {rule:?}: {e})",
                    type_name(v)
                ),
            )),
            Err(cel::CelError::Unsupported(e)) => {
                tracing::warn!(
                    "kube-sim does not evaluate the CEL rule {rule:?} at {field}: {e}; skipped"
                );
            }
        }
    }
}

fn preserves(schema: &Value) -> bool {
    schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true)
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn apply_defaults(schema: &Value, map: &mut Map<String, Value>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (k, sub) in props {
            if !map.contains_key(k)
                && let Some(d) = sub.get("default")
            {
                map.insert(k.clone(), d.clone());
            }
        }
    }
}

fn check_required(schema: &Value, map: &Map<String, Value>, path: &str, out: &mut Outcome) {
    for req in schema["required"].as_array().into_iter().flatten() {
        if let Some(r) = req.as_str()
            && !map.contains_key(r)
        {
            out.errors.push(FieldError::required(&child(path, r)));
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_ok(want: &str, v: &Value) -> bool {
    match want {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "number" => v.is_number(),
        _ => true,
    }
}

fn walk(schema: &Value, v: &mut Value, path: &str, out: &mut Outcome, old: Option<&Value>) {
    if v.is_null() && schema["nullable"] == Value::Bool(true) {
        return;
    }
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            out.errors.push(FieldError::invalid(
                path,
                v,
                format!(
                    "{path} in body must be of type int-or-string: {:?}",
                    type_name(v)
                ),
            ));
        }
        return;
    }
    if let Some(want) = schema["type"].as_str()
        && !type_ok(want, v)
    {
        out.errors.push(FieldError::with(
            path,
            "FieldValueTypeInvalid",
            format!(
                "Invalid value: {}: {path} in body must be of type {want}: {:?}",
                short_value(v),
                type_name(v)
            ),
        ));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(v)
    {
        let list: Vec<String> = allowed.iter().map(short_value).collect();
        out.errors.push(FieldError::with(
            path,
            "FieldValueNotSupported",
            format!(
                "Unsupported value: {}: supported values: {}",
                short_value(v),
                list.join(", ")
            ),
        ));
    }
    let before = out.errors.len();
    match v {
        Value::Object(map) => walk_object(schema, map, path, out, old),
        Value::Array(items) => walk_array(schema, items, path, out, old),
        Value::String(s) => check_string(schema, s, path, out),
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                check_number(schema, x, v, path, out)
            }
        }
        _ => {}
    }
    if out.errors.len() == before {
        check_rules(schema, v, path, old, out);
    }
}

fn walk_object(
    schema: &Value,
    map: &mut Map<String, Value>,
    path: &str,
    out: &mut Outcome,
    old: Option<&Value>,
) {
    apply_defaults(schema, map);
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        let sub_path = child(path, &key);
        let sub_schema = props.and_then(|p| p.get(&key)).or(match additional {
            Some(Value::Object(_)) => additional,
            _ => None,
        });
        match sub_schema {
            Some(sub) => {
                if let Some(val) = map.get_mut(&key) {
                    walk(sub, val, &sub_path, out, old.and_then(|o| o.get(&key)));
                }
            }
            None if preserves(schema) || additional == Some(&Value::Bool(true)) => {}
            None => {
                out.unknown.push(sub_path);
                map.remove(&key);
            }
        }
    }
    check_required(schema, map, path, out);
    check_most(schema, "maxProperties", map.len(), path, out);
}

/// `FieldValueTooMany` when an object or list has more than its `bound` (`maxProperties`,
/// `maxItems`) allows.
fn check_most(schema: &Value, bound: &str, len: usize, path: &str, out: &mut Outcome) {
    if let Some(max) = schema[bound].as_u64()
        && len as u64 > max
    {
        out.errors.push(FieldError::with(
            path,
            "FieldValueTooMany",
            format!("Too many: {len}: must have at most {max} items"),
        ));
    }
}

fn walk_array(
    schema: &Value,
    items: &mut [Value],
    path: &str,
    out: &mut Outcome,
    old: Option<&Value>,
) {
    check_most(schema, "maxItems", items.len(), path, out);
    if let Some(min) = schema["minItems"].as_u64()
        && (items.len() as u64) < min
    {
        out.errors.push(FieldError::with(
            path,
            "FieldValueInvalid",
            format!(
                "Invalid value: {}: {path} in body should have at least {min} items",
                items.len()
            ),
        ));
    }
    let list_type = schema["x-kubernetes-list-type"].as_str();
    let map_keys = crate::json::string_list(&schema["x-kubernetes-list-map-keys"]);
    if let Some(item_schema) = schema.get("items") {
        for (i, it) in items.iter_mut().enumerate() {
            // Old items are correlated by key in map lists only, as on a real server.
            let old_item = match (list_type, old.and_then(Value::as_array)) {
                (Some("map"), Some(olds)) => olds
                    .iter()
                    .find(|o| map_keys.iter().all(|k| o.get(k) == it.get(k))),
                _ => None,
            };
            walk(item_schema, it, &format!("{path}[{i}]"), out, old_item);
        }
    }
    let unique = schema["uniqueItems"] == Value::Bool(true);
    if list_type == Some("map") || list_type == Some("set") || unique {
        let keys = crate::json::string_list(&schema["x-kubernetes-list-map-keys"]);
        let mut seen: Vec<Value> = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let key = if list_type == Some("map") {
                let mut k = Map::new();
                for name in &keys {
                    k.insert(name.clone(), it.get(name).cloned().unwrap_or(Value::Null));
                }
                Value::Object(k)
            } else {
                it.clone()
            };
            if seen.contains(&key) {
                out.errors.push(FieldError::with(
                    &format!("{path}[{i}]"),
                    "FieldValueDuplicate",
                    format!("Duplicate value: {key}"),
                ));
            } else {
                seen.push(key);
            }
        }
    }
}

fn check_string(schema: &Value, s: &str, path: &str, out: &mut Outcome) {
    let len = s.chars().count() as u64;
    if let Some(max) = schema["maxLength"].as_u64()
        && len > max
    {
        out.errors.push(FieldError::with(
            path,
            "FieldValueTooLong",
            format!("Too long: may not be more than {max} bytes"),
        ));
    }
    if let Some(min) = schema["minLength"].as_u64()
        && len < min
    {
        out.errors.push(FieldError::invalid(
            path,
            &Value::String(s.into()),
            format!("{path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(p) = schema["pattern"].as_str() {
        match Regex::new(p) {
            Ok(re) if !re.is_match(s) => out.errors.push(FieldError::invalid(
                path,
                &Value::String(s.into()),
                format!("{path} in body should match '{p}'"),
            )),
            Ok(_) => {}
            Err(e) => out.errors.push(FieldError::with(
                path,
                "FieldValueInvalid",
                format!("kube-sim cannot compile pattern {p:?}: {e}"),
            )),
        }
    }
}

fn check_number(schema: &Value, x: f64, v: &Value, path: &str, out: &mut Outcome) {
    // Each bound, its exclusive flag, what the value must be, and the side of it that is out.
    for (bound, exclusive, relation, out_side) in [
        (
            "minimum",
            "exclusiveMinimum",
            "greater than",
            Ordering::Less,
        ),
        (
            "maximum",
            "exclusiveMaximum",
            "less than",
            Ordering::Greater,
        ),
    ] {
        let Some(limit) = schema[bound].as_f64() else {
            continue;
        };
        let excl = schema[exclusive] == Value::Bool(true);
        let outside = match x.partial_cmp(&limit) {
            Some(Ordering::Equal) => excl,
            side => side == Some(out_side),
        };
        if outside {
            let op = if excl {
                relation.to_string()
            } else {
                format!("{relation} or equal to")
            };
            out.errors.push(FieldError::invalid(
                path,
                v,
                format!("{path} in body should be {op} {}", fmt_num(limit)),
            ));
        }
    }
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 {
        format!("{}", x as i64)
    } else {
        x.to_string()
    }
}

/// Checks (and defaults and prunes) a custom resource against its version's schema: 400 for
/// unknown fields under `fieldValidation=Strict`, 422 `Invalid` for what the schema refuses.
pub fn validate(
    t: &ResourceType,
    name: &str,
    obj: &mut Value,
    strict: bool,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let Some(s) = &t.schema else { return Ok(()) };
    let out = check_update(s, obj, old);
    if strict && !out.unknown.is_empty() {
        let fields: Vec<String> = out
            .unknown
            .iter()
            .map(|f| format!("unknown field \"{f}\""))
            .collect();
        return Err(ApiError::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
            t.kind,
            t.version,
            t.kind,
            fields.join(", ")
        )));
    }
    if !out.errors.is_empty() {
        return Err(ApiError::invalid(&t.kind, &t.group, name, &out.errors));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["command"],
                    "properties": {
                        "command": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                        "replicas": {"type": "integer", "minimum": 1, "maximum": 5, "default": 1},
                        "mode": {"type": "string", "enum": ["a", "b"]},
                        "name": {"type": "string", "pattern": "^[a-z]+$"},
                        "vars": {"type": "array", "x-kubernetes-list-type": "map",
                                 "x-kubernetes-list-map-keys": ["name"],
                                 "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    }
                },
                "status": {"type": "object", "properties": {"phase": {"type": "string"}}}
            }
        })
    }

    fn errs(mut obj: Value) -> Vec<String> {
        check(&schema(), &mut obj)
            .errors
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn required_and_types() {
        assert_eq!(
            errs(json!({"spec": {}})),
            vec!["spec.command: Required value"]
        );
        let e = errs(json!({"spec": {"command": ["x"], "replicas": "two"}}));
        assert_eq!(
            e,
            vec![
                "spec.replicas: Invalid value: \"two\": spec.replicas in body must be of type integer: \"string\""
            ]
        );
    }

    #[test]
    fn ranges_enums_patterns_lists() {
        let e = errs(
            json!({"spec": {"command": ["a","b","c","d"], "replicas": 9, "mode": "c", "name": "A1",
            "vars": [{"name": "x"}, {"name": "x"}]}}),
        );
        assert_eq!(e.len(), 5, "{e:?}");
        assert!(e.iter().any(|m| m.starts_with("spec.command: Too many: 4")));
        assert!(e.iter().any(|m| m.contains("less than or equal to 5")));
        assert!(e.iter().any(|m| m.contains("Unsupported value: \"c\"")));
        assert!(e.iter().any(|m| m.contains("should match '^[a-z]+$'")));
        assert!(
            e.iter()
                .any(|m| m.starts_with("spec.vars[1]: Duplicate value"))
        );
    }

    #[test]
    fn defaults_and_pruning() {
        let mut obj =
            json!({"spec": {"command": ["x"], "extra": 1, "free": {"k": 1}}, "junk": true});
        let mut out = check(&schema(), &mut obj);
        assert!(out.errors.is_empty());
        out.unknown.sort();
        assert_eq!(
            out.unknown,
            vec!["junk".to_string(), "spec.extra".to_string()]
        );
        assert_eq!(
            obj,
            json!({"spec": {"command": ["x"], "replicas": 1, "free": {"k": 1}}})
        );
    }
}
