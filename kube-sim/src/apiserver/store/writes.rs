//! Writes: create and update (PUT) with the API server's semantics (names and `generateName`,
//! admission, CRD schemas, immutable metadata, the `/status` subresource, `generation`,
//! optimistic concurrency on `resourceVersion`, field managers, dry runs), and the
//! read-modify-write of kube-sim's own controllers.

use serde_json::{Value, json};

use super::{
    Event, EventType, Store, TypeKey, WriteOpts, bad_shape, check_shape, finalizers, is_pod, meta,
    meta_mut, new_uid, pod_terminal, random_suffix, spec_part,
};
use crate::apiserver::admission::{self, Operation};
use crate::apiserver::apply::shape_of;
use crate::apiserver::errors::{ApiError, FieldError};
use crate::apiserver::managed_fields::{self, Section};
use crate::apiserver::resources::{ResourceType, crd_status};
use crate::apiserver::schema;
use crate::time::now_rfc3339;

impl Store {
    /// Creates an object. `ns` is the namespace from the URL ("" for cluster-scoped types).
    pub fn create(
        &self,
        t: &ResourceType,
        ns: &str,
        mut obj: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        check_shape(&obj)?;
        // Namespaced creates pass quota admission one at a time.
        let _quota = t.namespaced.then(|| self.quota_guard());
        let key: TypeKey = (t.group.clone(), t.plural.clone());
        obj["apiVersion"] = Value::String(t.api_version());
        obj["kind"] = Value::String(t.kind.clone());
        if let Some(body_ns) = meta(&obj, "namespace")
            && t.namespaced
            && body_ns != ns
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        let name = match meta(&obj, "name").filter(|n| !n.is_empty()) {
            Some(n) => n,
            None => match meta(&obj, "generateName") {
                Some(prefix) => format!("{prefix}{}", random_suffix(5)),
                None => {
                    return Err(ApiError::invalid(
                        &t.kind,
                        &t.group,
                        "",
                        &[FieldError::with(
                            "metadata.name",
                            "FieldValueRequired",
                            "Required value: name or generateName is required",
                        )],
                    ));
                }
            },
        };
        admission::admit(
            &admission::Request {
                operation: Operation::Create,
                t,
                namespace: ns,
                name: &name,
                old: None,
                subresource: None,
                store: self,
                warnings: opts.warnings.as_ref(),
            },
            &mut obj,
        )?;
        if t.custom {
            schema::validate(t, &name, &mut obj, opts.strict, None)?;
        }
        let now = now_rfc3339();
        {
            let Some(m) = meta_mut(&mut obj) else {
                return Err(bad_shape());
            };
            m.insert("name".into(), Value::String(name.clone()));
            if t.namespaced {
                m.insert("namespace".into(), Value::String(ns.to_string()));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), Value::String(new_uid()));
            m.insert("creationTimestamp".into(), Value::String(now.clone()));
            m.insert("generation".into(), json!(1));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("managedFields");
        }
        let section = Section {
            has_status: t.has_status,
            status: false,
        };
        match (&opts.managed_fields, &opts.field_manager) {
            (Some(mf), _) => managed_fields::store_in(&mut obj, mf),
            (None, Some(manager)) => managed_fields::record_update(
                None,
                &mut obj,
                manager,
                &t.api_version(),
                shape_of(t),
                section,
            ),
            (None, None) => {}
        }
        let mut st = self.lock();
        let store_ns = if t.namespaced { ns } else { "" };
        if t.namespaced {
            let nskey: TypeKey = (String::new(), "namespaces".into());
            match st
                .objects
                .get(&nskey)
                .and_then(|m| m.get(&(String::new(), ns.to_string())))
            {
                None => return Err(ApiError::not_found("", "namespaces", ns)),
                Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                            t.plural
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        if st
            .objects
            .get(&key)
            .is_some_and(|m| m.contains_key(&(store_ns.to_string(), name.clone())))
        {
            return Err(ApiError::already_exists(&t.group, &t.plural, &name));
        }
        if key.0.is_empty() && key.1 == "services" {
            let ip = st.next_ip;
            st.next_ip += 1;
            if obj.pointer("/spec/clusterIP").and_then(Value::as_str) != Some("None") {
                obj["spec"]["clusterIP"] = json!(format!("10.96.{}.{}", ip / 250, ip % 250 + 1));
            }
        }
        if opts.dry_run {
            return Ok(obj);
        }
        let rv = Self::next_rv(&mut st);
        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        self.put(&mut st, &key, store_ns, &name, obj.clone());
        self.emit(
            &mut st,
            Event {
                rv,
                key: key.clone(),
                namespace: store_ns.to_string(),
                kind: EventType::Added,
                object: obj.clone(),
                old: None,
            },
        );
        if key.1 == "customresourcedefinitions" && key.0 == "apiextensions.k8s.io" {
            self.crd_changed(&mut st, &name);
        }
        drop(st);
        if key.0.is_empty() && key.1 == "namespaces" {
            self.create_namespace_defaults(&name);
        }
        Ok(self.get(&key, store_ns, &name).unwrap_or(obj))
    }

    fn create_namespace_defaults(&self, ns: &str) {
        if let Some(t) = self.builtin_type("", "serviceaccounts") {
            let sa = json!({"metadata": {"name": "default"}});
            if let Err(e) = self.create(&t, ns, sa, &WriteOpts::default()) {
                tracing::warn!("default service account in {ns}: {e}");
            }
        }
    }

    /// Replaces an object (PUT). Honors `metadata.resourceVersion` as a precondition.
    pub fn update(
        &self,
        t: &ResourceType,
        ns: &str,
        name: &str,
        mut new: Value,
        opts: &WriteOpts,
    ) -> Result<Value, ApiError> {
        let key: TypeKey = (t.group.clone(), t.plural.clone());
        let store_ns = if t.namespaced { ns } else { "" };
        check_shape(&new)?;
        if let Some(body_name) = meta(&new, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let old = self
            .get(&key, store_ns, name)
            .ok_or_else(|| ApiError::not_found(&t.group, &t.plural, name))?;
        if let Some(rv) = meta(&new, "resourceVersion").filter(|r| !r.is_empty())
            && Some(rv) != meta(&old, "resourceVersion")
        {
            return Err(ApiError::conflict(&t.group, &t.plural, name));
        }
        new["apiVersion"] = Value::String(t.api_version());
        new["kind"] = Value::String(t.kind.clone());
        // Admission of this update, of the whole object or of its `status` subresource.
        let admit = |obj: &mut Value, subresource: Option<&str>| {
            admission::admit(
                &admission::Request {
                    operation: Operation::Update,
                    t,
                    namespace: store_ns,
                    name,
                    old: Some(&old),
                    subresource,
                    store: self,
                    warnings: opts.warnings.as_ref(),
                },
                obj,
            )
        };
        let mut merged = if opts.status {
            let mut m = old.clone();
            m["status"] = new.get("status").cloned().unwrap_or(Value::Null);
            if m["status"].is_null()
                && let Some(o) = m.as_object_mut()
            {
                o.remove("status");
            }
            admit(&mut m, Some("status"))?;
            m
        } else {
            if t.has_status {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            // Immutable metadata comes from the stored object.
            let old_meta = old["metadata"].clone();
            let Some(m) = meta_mut(&mut new) else {
                return Err(bad_shape());
            };
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "namespace",
                "name",
                "generation",
                "managedFields",
            ] {
                match old_meta.get(f) {
                    Some(v) => {
                        m.insert(f.into(), v.clone());
                    }
                    None => {
                        m.remove(f);
                    }
                }
            }
            if t.custom {
                schema::validate(t, name, &mut new, opts.strict, Some(&old))?;
            }
            admit(&mut new, None)?;
            new
        };
        if t.custom && opts.status {
            schema::validate(t, name, &mut merged, opts.strict, Some(&old))?;
        }
        if spec_part(&merged) != spec_part(&old) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            merged["metadata"]["generation"] = json!(g + 1);
        }
        merged["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if key.0 == "apiextensions.k8s.io" && !opts.status {
            merged["status"] = crd_status(&merged);
            if let Some(conds) = old.pointer("/status/conditions") {
                merged["status"]["conditions"] = conds.clone();
            }
        }
        if let Some(mf) = &opts.managed_fields {
            managed_fields::store_in(&mut merged, mf);
        }
        // A write that changes nothing is a no-op: no new resourceVersion, no event.
        if merged == old {
            return Ok(old);
        }
        if let (None, Some(manager)) = (&opts.managed_fields, &opts.field_manager) {
            let section = Section {
                has_status: t.has_status,
                status: opts.status,
            };
            managed_fields::record_update(
                Some(&old),
                &mut merged,
                manager,
                &t.api_version(),
                shape_of(t),
                section,
            );
        }
        if opts.dry_run {
            return Ok(merged);
        }
        self.commit_update(&key, store_ns, name, merged, Some(old), false)
    }

    /// Stores a modified object, or removes it when it is being deleted and nothing holds it.
    pub(super) fn commit_update(
        &self,
        key: &TypeKey,
        ns: &str,
        name: &str,
        mut obj: Value,
        old: Option<Value>,
        force: bool,
    ) -> Result<Value, ApiError> {
        let mut st = self.lock();
        // The object may have changed since the caller read it; the caller checked the
        // precondition against its read, which is the same lock-free window a real server's
        // guaranteed update closes by retrying. Re-check here.
        let current = st
            .objects
            .get(key)
            .and_then(|m| m.get(&(ns.to_string(), name.to_string())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(&key.0, &key.1, name))?;
        if let Some(o) = &old
            && meta(o, "resourceVersion") != meta(&current, "resourceVersion")
        {
            return Err(ApiError::conflict(&key.0, &key.1, name));
        }
        let rv = Self::next_rv(&mut st);
        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
        let held = !finalizers(&obj).is_empty()
            || (!force
                && is_pod(key)
                && obj.pointer("/spec/nodeName").is_some()
                && !pod_terminal(&obj))
            || (key.0.is_empty() && key.1 == "namespaces");
        if deleting && !held {
            Self::take(&mut st, key, ns, name);
            self.emit_deleted(&mut st, key, ns, rv, obj.clone(), current);
        } else {
            self.put(&mut st, key, ns, name, obj.clone());
            self.emit(
                &mut st,
                Event {
                    rv,
                    key: key.clone(),
                    namespace: ns.into(),
                    kind: EventType::Modified,
                    object: obj.clone(),
                    old: Some(current),
                },
            );
        }
        if key.0 == "apiextensions.k8s.io" && key.1 == "customresourcedefinitions" {
            self.crd_changed(&mut st, name);
            if deleting && !held {
                self.drop_custom_resources(&mut st, &obj);
            }
        }
        Ok(obj)
    }

    /// Read-modify-write by a controller of kube-sim (kubelet, GC): no precondition, retried
    /// on conflict. Returns None when the object is gone.
    pub fn modify(
        &self,
        key: &TypeKey,
        ns: &str,
        name: &str,
        f: impl Fn(&mut Value),
    ) -> Option<Value> {
        for _ in 0..50 {
            let old = self.get(key, ns, name)?;
            let mut new = old.clone();
            f(&mut new);
            if new == old {
                return Some(old);
            }
            match self.commit_update(key, ns, name, new, Some(old), false) {
                Ok(v) => return Some(v),
                Err(e) if e.code == 409 => continue,
                Err(_) => return None,
            }
        }
        None
    }
}
