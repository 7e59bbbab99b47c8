//! Deletion: immediately, or by setting `deletionTimestamp` while finalizers (and, for a
//! running pod, the kubelet) hold the object; propagation policies (Background, Foreground,
//! Orphan); the removal once nothing holds it; and a deleted CRD's custom resources.

use serde_json::{Value, json};

use super::{DeleteOpts, State, Store, TypeKey, bad_shape, finalizers, is_pod, meta, meta_mut};
use crate::apiserver::errors::ApiError;
use crate::apiserver::resources::ResourceType;
use crate::time::now_rfc3339;

impl Store {
    /// Deletes an object: immediately, or by setting `deletionTimestamp` when finalizers hold it
    /// or (for a running pod) the kubelet must stop it first.
    pub fn delete(
        &self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        opts: &DeleteOpts,
    ) -> Result<Value, ApiError> {
        let key: TypeKey = (t.group.clone(), t.plural.clone());
        let store_ns = if t.namespaced { ns } else { "" };
        let obj = self
            .get(&key, store_ns, name)
            .ok_or_else(|| ApiError::not_found(&t.group, &t.plural, name))?;
        if let Some(uid) = &opts.precondition_uid
            && meta(&obj, "uid").as_ref() != Some(uid)
        {
            return Err(ApiError::conflict(&t.group, &t.plural, name));
        }
        if let Some(rv) = &opts.precondition_rv
            && meta(&obj, "resourceVersion").as_ref() != Some(rv)
        {
            return Err(ApiError::conflict(&t.group, &t.plural, name));
        }
        if opts.dry_run {
            return Ok(obj);
        }
        let uid = meta(&obj, "uid").unwrap_or_default();
        let policy = opts
            .propagation
            .clone()
            .unwrap_or_else(|| "Background".into());
        if policy == "Orphan" {
            self.orphan_dependents(&uid);
        }
        let mut new = obj.clone();
        let already = obj.pointer("/metadata/deletionTimestamp").is_some();
        let grace = opts.grace_seconds.or_else(|| {
            if is_pod(&key) {
                obj.pointer("/spec/terminationGracePeriodSeconds")
                    .and_then(Value::as_i64)
            } else {
                None
            }
        });
        if policy == "Foreground" {
            let Some(m) = meta_mut(&mut new) else {
                return Err(bad_shape());
            };
            let f = m.entry("finalizers").or_insert_with(|| json!([]));
            if let Some(a) = f.as_array_mut()
                && !a.contains(&json!("foregroundDeletion"))
            {
                a.push(json!("foregroundDeletion"));
            }
        }
        if !already {
            let Some(m) = meta_mut(&mut new) else {
                return Err(bad_shape());
            };
            m.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
            m.insert(
                "deletionGracePeriodSeconds".into(),
                json!(grace.unwrap_or(0)),
            );
        } else if let Some(g) = grace {
            new["metadata"]["deletionGracePeriodSeconds"] = json!(g);
        }
        if key.0.is_empty() && key.1 == "namespaces" {
            new["status"]["phase"] = json!("Terminating");
        }
        let force = is_pod(&key) && grace == Some(0);
        self.commit_update(&key, store_ns, name, new, Some(obj), force)
    }

    /// Removes an object that is being deleted once nothing holds it any more (the kubelet
    /// calls this after stopping a pod; the namespace controller after emptying a namespace).
    pub fn finish_deletion(&self, key: &TypeKey, ns: &str, name: &str) {
        let mut st = self.lock();
        let Some(obj) = st
            .objects
            .get(key)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
        else {
            return;
        };
        if obj.pointer("/metadata/deletionTimestamp").is_none() || !finalizers(&obj).is_empty() {
            return;
        }
        let rv = Self::next_rv(&mut st);
        Self::take(&mut st, key, ns, name);
        self.emit_deleted(&mut st, key, ns, rv, obj.clone(), obj);
    }

    fn orphan_dependents(&self, owner_uid: &str) {
        for (key, obj) in self.all_objects() {
            let refs = obj
                .pointer("/metadata/ownerReferences")
                .and_then(Value::as_array);
            if refs.is_some_and(|r| r.iter().any(|o| o["uid"] == owner_uid)) {
                let ns = meta(&obj, "namespace").unwrap_or_default();
                let name = meta(&obj, "name").unwrap_or_default();
                self.modify(&key, &ns, &name, |o| {
                    if let Some(a) = o
                        .pointer_mut("/metadata/ownerReferences")
                        .and_then(Value::as_array_mut)
                    {
                        a.retain(|r| r["uid"] != owner_uid);
                    }
                });
            }
        }
    }

    pub(super) fn drop_custom_resources(&self, st: &mut State, crd: &Value) {
        let group = crd
            .pointer("/spec/group")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let plural = crd
            .pointer("/spec/names/plural")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let key: TypeKey = (group.into(), plural.into());
        let objs: Vec<((String, String), Value)> = st
            .objects
            .remove(&key)
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        for ((ns, _), obj) in objs {
            let rv = Self::next_rv(st);
            self.emit_deleted(st, &key, &ns, rv, obj.clone(), obj);
        }
    }
}
