//! `metadata.managedFields`: which field managers wrote an object, and how (`Update`, or
//! `Apply` for server-side apply). One entry per manager and operation; the field set itself
//! is not tracked yet (`fieldsV1` is empty), so server-side apply has no ownership conflicts.

use serde_json::Value;
use serde_json::json;

use crate::apiserver::store::meta_mut;
use crate::time::now_rfc3339;

/// Records a field manager in `metadata.managedFields` (one entry per manager and operation).
pub fn record_manager(obj: &mut Value, manager: &str, operation: &str, api_version: &str) {
    let entry = json!({
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": now_rfc3339(),
        "fieldsType": "FieldsV1",
        "fieldsV1": {},
    });
    let Some(m) = meta_mut(obj) else {
        return;
    };
    let list = m.entry("managedFields").or_insert_with(|| json!([]));
    if let Some(a) = list.as_array_mut() {
        a.retain(|e| !(e["manager"] == manager && e["operation"] == operation));
        a.push(entry);
    }
}
