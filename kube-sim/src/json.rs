//! Reading API objects as JSON: strings at a pointer, string lists, dotted paths, and scalars
//! rendered for selectors and table cells.

use serde_json::Value;

/// The string at JSON pointer `ptr` (`/metadata/name`), or "" when it is missing or not a
/// string.
pub fn str_at(v: &Value, ptr: &str) -> String {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// The strings of a JSON array (anything else, and non-string items, count as none).
pub fn string_list(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect()
}

/// Reads a dotted path (`spec.nodeName`) from a JSON object.
pub fn get_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = v;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        cur = cur.get(part)?;
    }
    Some(cur)
}

/// Renders a scalar for selectors and table cells.
pub fn scalar_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}
