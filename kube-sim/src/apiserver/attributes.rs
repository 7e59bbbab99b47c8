//! What a request asks for: verb, API group, resource, subresource, namespace and name, or a
//! non-resource path. Requests are mapped to verbs like the real API server's
//! `RequestInfoFactory`: GET of one object is `get`, of a collection `list`, with `?watch=true`
//! (or under `/watch/`) `watch`; POST `create`, PUT `update`, PATCH `patch`, DELETE of one
//! object `delete`, of a collection `deletecollection`. A list or watch with
//! `fieldSelector=metadata.name=X` names `X`, so `resourceNames` rules apply to it, as on a
//! real server.

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attrs {
    Resource {
        verb: String,
        group: String,
        resource: String,
        subresource: String,
        namespace: String,
        name: String,
    },
    NonResource {
        verb: String,
        path: String,
    },
}

impl Attrs {
    /// A resource request, for reviews and tests.
    pub fn resource(verb: &str, group: &str, resource: &str, namespace: &str) -> Attrs {
        let (resource, subresource) = resource.split_once('/').unwrap_or((resource, ""));
        Attrs::Resource {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            subresource: subresource.into(),
            namespace: namespace.into(),
            name: String::new(),
        }
    }

    /// The request's attributes, as the real API server derives them from method, path and
    /// query.
    pub fn of_request(method: &str, path: &str, query: &dyn Fn(&str) -> Option<String>) -> Attrs {
        let segs: Vec<&str> = path
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .collect();
        let (group, rest) = match segs.as_slice() {
            ["api", _v, rest @ ..] if !rest.is_empty() => ("", rest),
            ["apis", g, _v, rest @ ..] if !rest.is_empty() => (*g, rest),
            _ => {
                return Attrs::NonResource {
                    verb: method.to_ascii_lowercase(),
                    path: format!("/{}", segs.join("/")),
                };
            }
        };
        let mut verb = match method {
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            _ => "get",
        }
        .to_string();
        let mut parts: &[&str] = rest;
        if parts.first() == Some(&"watch") {
            verb = "watch".into();
            parts = &parts[1..];
        }
        let mut namespace = String::new();
        if parts.first() == Some(&"namespaces") && parts.len() > 1 {
            namespace = parts[1].to_string();
            if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
                parts = &parts[2..];
            }
        }
        let at = |i: usize| parts.get(i).map(|s| s.to_string()).unwrap_or_default();
        let (resource, mut name, subresource) = (at(0), at(1), at(2));
        if name.is_empty() && verb == "get" {
            let watching = query("watch").is_some_and(|w| w == "true" || w == "1");
            verb = if watching { "watch" } else { "list" }.into();
        }
        if name.is_empty() && verb == "delete" {
            verb = "deletecollection".into();
        }
        if name.is_empty()
            && (verb == "list" || verb == "watch")
            && let Some(fs) = query("fieldSelector")
            && let Some(n) = exact_name(&fs)
        {
            name = n;
        }
        Attrs::Resource {
            verb,
            group: group.into(),
            resource,
            subresource,
            namespace,
            name,
        }
    }

    /// `resource` or `resource/subresource`, as rules and messages name it (empty for a
    /// non-resource request).
    pub fn full_resource(&self) -> String {
        match self {
            Attrs::Resource {
                resource,
                subresource,
                ..
            } if !subresource.is_empty() => format!("{resource}/{subresource}"),
            Attrs::Resource { resource, .. } => resource.clone(),
            Attrs::NonResource { .. } => String::new(),
        }
    }

    pub fn verb(&self) -> &str {
        match self {
            Attrs::Resource { verb, .. } | Attrs::NonResource { verb, .. } => verb,
        }
    }
}

/// `metadata.name=X` (or `==`) alone in a field selector.
fn exact_name(fs: &str) -> Option<String> {
    let parts: Vec<&str> = fs.split(',').filter(|p| !p.trim().is_empty()).collect();
    let [one] = parts.as_slice() else {
        return None;
    };
    let (k, v) = one.split_once("==").or_else(|| one.split_once('='))?;
    (k.trim() == "metadata.name" && !v.is_empty()).then(|| v.trim().into())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn attrs(method: &str, path: &str, query: &[(&str, &str)]) -> Attrs {
        let q: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Attrs::of_request(method, path, &|k| {
            q.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone())
        })
    }

    pub(crate) fn res(verb: &str, group: &str, r: &str, sub: &str, ns: &str, name: &str) -> Attrs {
        Attrs::Resource {
            verb: verb.into(),
            group: group.into(),
            resource: r.into(),
            subresource: sub.into(),
            namespace: ns.into(),
            name: name.into(),
        }
    }

    type Case = (
        &'static str,
        &'static str,
        &'static [(&'static str, &'static str)],
        Attrs,
    );

    #[test]
    fn requests_map_to_verbs_like_the_api_server() {
        let cases: [Case; 8] = [
            (
                "GET",
                "/api/v1/namespaces/a/pods",
                &[],
                res("list", "", "pods", "", "a", ""),
            ),
            (
                "GET",
                "/api/v1/pods",
                &[("watch", "true")],
                res("watch", "", "pods", "", "", ""),
            ),
            (
                "GET",
                "/api/v1/watch/namespaces/a/pods",
                &[],
                res("watch", "", "pods", "", "a", ""),
            ),
            (
                "GET",
                "/api/v1/namespaces/a/pods/p/log",
                &[],
                res("get", "", "pods", "log", "a", "p"),
            ),
            (
                "PUT",
                "/apis/agentrun.dev/v1alpha1/namespaces/d/agentruns/x/status",
                &[],
                res("update", "agentrun.dev", "agentruns", "status", "d", "x"),
            ),
            (
                "DELETE",
                "/api/v1/namespaces/a/secrets",
                &[],
                res("deletecollection", "", "secrets", "", "a", ""),
            ),
            (
                "GET",
                "/api/v1/namespaces/a",
                &[],
                res("get", "", "namespaces", "", "a", "a"),
            ),
            (
                "GET",
                "/apis/coordination.k8s.io/v1/namespaces/a/leases",
                &[("fieldSelector", "metadata.name=l")],
                res("list", "coordination.k8s.io", "leases", "", "a", "l"),
            ),
        ];
        for (method, path, query, want) in cases {
            assert_eq!(attrs(method, path, query), want, "{method} {path}");
        }
        assert_eq!(
            attrs("GET", "/apis/apps/v1", &[]),
            Attrs::NonResource {
                verb: "get".into(),
                path: "/apis/apps/v1".into()
            }
        );
    }
}
