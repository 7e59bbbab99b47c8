//! A container's environment, resolved like the kubelet's: `envFrom` with `prefix`, `env`
//! values with `$(VAR)` expansion, `fieldRef`, and `secretKeyRef` / `configMapKeyRef` looked up
//! in the store (with `optional`).

use base64::Engine;
use serde_json::Value;

use crate::apiserver::store::{NODE_NAME, Store};
use crate::json::str_at;

/// What a pod's containers' environment is resolved from.
pub(super) struct PodEnv<'a> {
    pub(super) store: &'a Store,
    pub(super) pod: &'a Value,
    pub(super) ns: &'a str,
    pub(super) name: &'a str,
    pub(super) pod_ip: &'a str,
    /// `HOME` unless the container sets it: the home of the user it runs as.
    pub(super) home: &'a str,
}

impl PodEnv<'_> {
    /// The environment of a container: a base `PATH`, `HOME` and `HOSTNAME`, then `envFrom`,
    /// then `env` (values with `$(VAR)` expansion, fieldRef, secret and configMap keys). An
    /// error names a missing Secret, ConfigMap or key (`CreateContainerConfigError`).
    pub(super) fn resolve(&self, spec: &Value) -> Result<Vec<(String, String)>, String> {
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                std::env::var("PATH").unwrap_or_else(|_| {
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
                }),
            ),
            ("HOME".into(), self.home.to_string()),
            ("HOSTNAME".into(), self.name.to_string()),
        ];
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(x, _)| *x != k);
            env.push((k, v));
        };
        for from in spec["envFrom"].as_array().into_iter().flatten() {
            let prefix = from["prefix"].as_str().unwrap_or_default();
            for (kind, field) in [("configmap", "configMapRef"), ("secret", "secretRef")] {
                let Some(r) = from.get(field) else { continue };
                let name = r["name"].as_str().unwrap_or_default();
                let plural = if kind == "secret" {
                    "secrets"
                } else {
                    "configmaps"
                };
                match self
                    .store
                    .get(&(String::new(), plural.into()), self.ns, name)
                {
                    Some(obj) => {
                        for (k, v) in obj["data"].as_object().into_iter().flatten() {
                            let raw = v.as_str().unwrap_or_default();
                            let val = if kind == "secret" {
                                base64::engine::general_purpose::STANDARD
                                    .decode(raw)
                                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                                    .unwrap_or_default()
                            } else {
                                raw.to_string()
                            };
                            set(&mut env, format!("{prefix}{k}"), val);
                        }
                    }
                    None if r["optional"] == true => {}
                    None => return Err(format!("{kind} \"{name}\" not found")),
                }
            }
        }
        for e in spec["env"].as_array().into_iter().flatten() {
            let name = str_at(e, "/name");
            let value = if let Some(v) = e.get("value").and_then(Value::as_str) {
                expand_vars(v, &env)
            } else if let Some(vf) = e.get("valueFrom") {
                if let Some(fr) = vf.get("fieldRef") {
                    field_ref(
                        self.pod,
                        fr["fieldPath"].as_str().unwrap_or_default(),
                        self.pod_ip,
                    )
                } else if let Some(r) = vf.get("secretKeyRef").or_else(|| vf.get("configMapKeyRef"))
                {
                    let kind = if vf.get("secretKeyRef").is_some() {
                        "secret"
                    } else {
                        "configmap"
                    };
                    let optional = r["optional"] == true;
                    let (rn, rk) = (str_at(r, "/name"), str_at(r, "/key"));
                    match self.lookup_key(kind, &rn, &rk) {
                        Ok(Some(v)) => v,
                        Ok(None) if optional => continue,
                        Ok(None) => {
                            return Err(format!(
                                "couldn't find key {rk} in {kind} {}/{rn}",
                                self.ns
                            ));
                        }
                        Err(_) if optional => continue,
                        Err(msg) => return Err(msg),
                    }
                } else if vf.get("resourceFieldRef").is_some() {
                    "0".to_string()
                } else {
                    String::new()
                }
            } else {
                String::new()
            };
            set(&mut env, name, value);
        }
        Ok(env)
    }

    fn lookup_key(&self, kind: &str, name: &str, key: &str) -> Result<Option<String>, String> {
        let plural = if kind == "secret" {
            "secrets"
        } else {
            "configmaps"
        };
        let Some(obj) = self
            .store
            .get(&(String::new(), plural.into()), self.ns, name)
        else {
            return Err(format!("{kind} \"{name}\" not found"));
        };
        if let Some(v) = obj
            .pointer(&format!(
                "/data/{}",
                key.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(Value::as_str)
        {
            if kind == "secret" {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|e| format!("secret \"{name}\" key {key}: bad base64: {e}"))?;
                return Ok(Some(String::from_utf8_lossy(&bytes).into_owned()));
            }
            return Ok(Some(v.to_string()));
        }
        Ok(None)
    }
}

fn field_ref(pod: &Value, path: &str, pod_ip: &str) -> String {
    let bracket = |prefix: &str| -> Option<String> {
        let rest = path.strip_prefix(prefix)?;
        let key = rest.trim_start_matches("['").trim_end_matches("']");
        Some(key.to_string())
    };
    for (field, pointer) in [
        ("metadata.labels", "/metadata/labels"),
        ("metadata.annotations", "/metadata/annotations"),
    ] {
        if let Some(k) = bracket(field) {
            return pod
                .pointer(pointer)
                .and_then(|m| m.get(&k))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into();
        }
    }
    match path {
        "metadata.name" => str_at(pod, "/metadata/name"),
        "metadata.namespace" => str_at(pod, "/metadata/namespace"),
        "metadata.uid" => str_at(pod, "/metadata/uid"),
        "spec.nodeName" => NODE_NAME.into(),
        "spec.serviceAccountName" => str_at(pod, "/spec/serviceAccountName"),
        "status.podIP" => pod_ip.into(),
        "status.hostIP" => "127.0.0.1".into(),
        _ => String::new(),
    }
}

/// Expands `$(VAR)` references like the kubelet (`$$(VAR)` escapes).
pub fn expand_vars(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn var_expansion() {
        let env = vec![("A".to_string(), "1".to_string())];
        assert_eq!(expand_vars("x$(A)y$(B)$$(A)", &env), "x1y$(B)$(A)");
    }
}
