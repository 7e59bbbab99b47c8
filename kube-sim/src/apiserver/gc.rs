//! Garbage collection of dependents through `ownerReferences`, foreground deletion, and the
//! namespace controller (deleting a namespace deletes everything in it).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::apiserver::store::{DeleteOpts, EventType, Store, TypeKey};
use crate::json::str_at;

/// Runs the collector until the store goes away.
pub async fn run(store: Arc<Store>) {
    let mut rx = store.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            ev = rx.recv() => match ev {
                Ok(ev) => {
                    let relevant = ev.kind == EventType::Deleted
                        || ev.object.pointer("/metadata/deletionTimestamp").is_some();
                    if !relevant {
                        continue;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            },
            _ = tick.tick() => {}
        }
        collect(&store);
    }
}

/// One pass over every object.
pub fn collect(store: &Store) {
    let all = store.all_objects();
    let uids: HashSet<String> = all
        .iter()
        .map(|(_, o)| str_at(o, "/metadata/uid"))
        .collect();
    let deleting_foreground: HashSet<String> = all
        .iter()
        .filter(|(_, o)| {
            o.pointer("/metadata/deletionTimestamp").is_some()
                && has_finalizer(o, "foregroundDeletion")
        })
        .map(|(_, o)| str_at(o, "/metadata/uid"))
        .collect();
    let types = store.types();
    let type_of = |k: &TypeKey| {
        types
            .iter()
            .find(|t| t.group == k.0 && t.plural == k.1 && t.storage)
            .cloned()
    };
    // Dependents whose owners are all gone, or whose owner is being deleted in the foreground.
    for (key, obj) in &all {
        let refs = obj
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array);
        let Some(refs) = refs.filter(|r| !r.is_empty()) else {
            continue;
        };
        let owner_uids: Vec<String> = refs.iter().map(|r| str_at(r, "/uid")).collect();
        let orphaned = owner_uids.iter().all(|u| !uids.contains(u));
        let foreground = owner_uids.iter().any(|u| deleting_foreground.contains(u));
        if (orphaned || foreground)
            && obj.pointer("/metadata/deletionTimestamp").is_none()
            && let Some(t) = type_of(key)
        {
            let opts = DeleteOpts {
                propagation: Some(
                    if foreground {
                        "Foreground"
                    } else {
                        "Background"
                    }
                    .into(),
                ),
                ..DeleteOpts::default()
            };
            let ns = str_at(obj, "/metadata/namespace");
            let name = str_at(obj, "/metadata/name");
            if let Err(e) = store.delete(&t, &ns, &name, &opts) {
                tracing::debug!("gc: deleting {}/{ns}/{name}: {e}", key.1);
            }
        }
    }
    // Owners deleted in the foreground lose their finalizer once no dependent remains.
    let all = store.all_objects();
    for (key, obj) in &all {
        if obj.pointer("/metadata/deletionTimestamp").is_none()
            || !has_finalizer(obj, "foregroundDeletion")
        {
            continue;
        }
        let uid = str_at(obj, "/metadata/uid");
        let has_dependents = all.iter().any(|(_, o)| {
            o.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|r| r.iter().any(|r| r["uid"] == uid.as_str()))
        });
        if !has_dependents {
            let (ns, name) = (
                str_at(obj, "/metadata/namespace"),
                str_at(obj, "/metadata/name"),
            );
            store.modify(key, &ns, &name, |o| {
                if let Some(f) = o
                    .pointer_mut("/metadata/finalizers")
                    .and_then(Value::as_array_mut)
                {
                    f.retain(|x| x != "foregroundDeletion");
                }
            });
        }
    }
    // Namespaces being deleted: delete their content, then the namespace.
    for (key, obj) in &all {
        if !(key.0.is_empty() && key.1 == "namespaces")
            || obj.pointer("/metadata/deletionTimestamp").is_none()
        {
            continue;
        }
        let ns = str_at(obj, "/metadata/name");
        let content: Vec<&(TypeKey, Value)> = all
            .iter()
            .filter(|(k, o)| {
                !(k.0.is_empty() && k.1 == "namespaces") && str_at(o, "/metadata/namespace") == ns
            })
            .collect();
        if content.is_empty() {
            store.finish_deletion(key, "", &ns);
            continue;
        }
        for (k, o) in content {
            if o.pointer("/metadata/deletionTimestamp").is_some() {
                continue;
            }
            if let Some(t) = type_of(k) {
                let name = str_at(o, "/metadata/name");
                if let Err(e) = store.delete(&t, &ns, &name, &DeleteOpts::default()) {
                    tracing::debug!("namespace {ns}: deleting {}/{name}: {e}", k.1);
                }
            }
        }
    }
}

fn has_finalizer(o: &Value, f: &str) -> bool {
    o.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x == f))
}
