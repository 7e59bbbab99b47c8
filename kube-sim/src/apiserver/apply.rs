//! Server-side apply (`application/apply-patch+yaml`): the entry point of an apply PATCH. The
//! applied configuration is merged into the stored object with the strategic merge of
//! `patch.rs`: there is no field ownership yet, so no conflicts, and fields a manager stops
//! applying are not removed; the manager is recorded in `managedFields` (`managed_fields.rs`).
//! An apply to an object that does not exist creates it.

use serde_json::Value;

use crate::apiserver::errors::ApiError;
use crate::apiserver::patch::{self, PatchKind};
use crate::apiserver::resources::ResourceType;
use crate::apiserver::store::{Store, WriteOpts};

/// Applies `applied` as field manager `opts.field_manager` (required) to the object `name`
/// (its `/status` with `status`), creating it when it does not exist (not through `/status`).
pub fn server_side_apply(
    store: &Store,
    t: &ResourceType,
    ns: &str,
    name: &str,
    status: bool,
    applied: &Value,
    mut opts: WriteOpts,
) -> Result<Value, ApiError> {
    opts.operation = Some("Apply");
    if opts.field_manager.is_none() {
        return Err(ApiError::bad_request(
            "PATCH with apply requires a fieldManager",
        ));
    }
    let pinned_rv = applied.pointer("/metadata/resourceVersion").is_some();
    let merged = patch::patch_stored(store, t, ns, name, &opts, pinned_rv, |existing| {
        patch::apply(PatchKind::Apply, existing, applied)
    })?;
    match merged {
        Some(obj) => Ok(obj),
        None if !status => {
            let mut obj = applied.clone();
            obj["metadata"]["name"] = Value::String(name.to_string());
            store.create(t, ns, obj, &opts)
        }
        None => Err(ApiError::not_found(&t.group, &t.plural, name)),
    }
}
