//! Discovery documents: `/api`, `/apis`, group and group/version resource lists, `/version`,
//! and the skeleton `/openapi/v3` kubectl needs for server-side field validation.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::apiserver::resources::ResourceType;

/// The version kube-sim answers on `/version` (`--server-version`); its minor version is also
/// what PodSecurity's `latest` means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerVersion {
    pub git_version: String,
    pub major: u32,
    pub minor: u32,
}

/// The default: a current release.
pub const DEFAULT_VERSION: &str = "v1.33.4";

impl Default for ServerVersion {
    fn default() -> Self {
        ServerVersion {
            git_version: DEFAULT_VERSION.into(),
            major: 1,
            minor: 33,
        }
    }
}

impl ServerVersion {
    /// Parses `v1.28.5` (or `1.28`, `v1.30.0-rc.1`, `v1.29.3+k3s1`).
    pub fn parse(s: &str) -> Result<ServerVersion, String> {
        let bad = || format!("server version {s:?} is not like v1.33.4");
        let bare = s.strip_prefix('v').unwrap_or(s);
        let mut parts = bare.splitn(3, '.');
        let num = |p: Option<&str>| -> Result<u32, String> {
            let p = p.ok_or_else(bad)?;
            let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
            if digits.is_empty() || digits.len() != p.len() {
                return Err(bad());
            }
            digits.parse().map_err(|_| bad())
        };
        let major = num(parts.next())?;
        let minor = num(parts.next())?;
        if let Some(rest) = parts.next() {
            let patch: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let tail = &rest[patch.len()..];
            if patch.is_empty() || !(tail.is_empty() || tail.starts_with(['-', '+'])) {
                return Err(bad());
            }
        }
        Ok(ServerVersion {
            git_version: format!("v{bare}"),
            major,
            minor,
        })
    }

    /// The `/version` document.
    pub fn document(&self) -> Value {
        json!({
            "major": self.major.to_string(),
            "minor": self.minor.to_string(),
            "gitVersion": self.git_version,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2025-01-01T00:00:00Z",
            "goVersion": "go1.24.0",
            "compiler": "gc",
            "platform": "linux/amd64"
        })
    }
}

pub fn core_versions(addr: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]
    })
}

/// Group name → (versions in preference order).
fn groups(types: &[ResourceType]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Storage versions first so they are preferred.
    let mut sorted: Vec<&ResourceType> = types.iter().filter(|t| !t.group.is_empty()).collect();
    sorted.sort_by_key(|t| !t.storage);
    for t in sorted {
        let v = out.entry(t.group.clone()).or_default();
        if !v.contains(&t.version) {
            v.push(t.version.clone());
        }
    }
    out
}

fn group_doc(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": name,
        "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

pub fn group_list(types: &[ResourceType]) -> Value {
    let groups: Vec<Value> = groups(types)
        .iter()
        .map(|(name, versions)| {
            let mut g = group_doc(name, versions);
            if let Some(o) = g.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
            g
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn group(types: &[ResourceType], name: &str) -> Option<Value> {
    groups(types).get(name).map(|v| group_doc(name, v))
}

/// The types served in `group`/`version`; `None` when there are none.
fn served_in<'a>(
    types: &'a [ResourceType],
    group: &str,
    version: &str,
) -> Option<Vec<&'a ResourceType>> {
    let matching: Vec<&ResourceType> = types
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .collect();
    (!matching.is_empty()).then_some(matching)
}

pub fn resource_list(types: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let matching = served_in(types, group, version)?;
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let resources: Vec<Value> = matching
        .iter()
        .flat_map(|t| t.discovery_entries())
        .collect();
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": gv,
        "resources": resources,
    }))
}

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: the list of group/version documents.
pub fn openapi_root(types: &[ResourceType]) -> Value {
    let mut paths = serde_json::Map::new();
    for t in types {
        let p = gv_path(&t.group, &t.version);
        paths.insert(
            p.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash=kube-sim")}),
        );
    }
    json!({"paths": paths})
}

/// `/openapi/v3/{api/v1 | apis/G/V}`: a skeleton document with one PATCH operation per kind.
/// kubectl only reads it to learn that the server validates fields itself
/// (`fieldValidation`); it carries no schemas.
pub fn openapi_gv(types: &[ResourceType], group: &str, version: &str) -> Option<Value> {
    let matching = served_in(types, group, version)?;
    let mut paths = serde_json::Map::new();
    for t in matching {
        let base = format!("/{}", gv_path(group, version));
        let p = if t.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", t.plural)
        } else {
            format!("{base}/{}/{{name}}", t.plural)
        };
        paths.insert(
            p,
            json!({"patch": {
                "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": t.kind},
                "x-kubernetes-action": "patch",
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
                    {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": {"description": "OK"}},
            }}),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (kube-sim)", "version": DEFAULT_VERSION},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_parse_with_consistent_major_and_minor() {
        let v = ServerVersion::parse("v1.28.5").expect("version");
        assert_eq!(
            (v.major, v.minor, v.git_version.as_str()),
            (1, 28, "v1.28.5")
        );
        let d = ServerVersion::parse("1.30").expect("version").document();
        assert_eq!(
            (d["major"].as_str(), d["minor"].as_str()),
            (Some("1"), Some("30"))
        );
        assert_eq!(d["gitVersion"], "v1.30");
        assert!(ServerVersion::parse("v1.29.3+k3s1").is_ok());
        for bad in ["", "v1", "latest", "v1.x.0", "v1.28.5x"] {
            assert!(ServerVersion::parse(bad).is_err(), "{bad}");
        }
    }
}
