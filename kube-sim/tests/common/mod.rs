//! Shared helpers of kube-sim's tests: the cluster, kubectl and deadline helpers of
//! `kube_sim::testing`, this crate's fixtures (the Widget CRD), and raw requests (for
//! response headers and requests kube-rs will not send).

#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};

pub mod pods;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ApiResource, GroupVersionKind, PostParams};
pub use kube_sim::testing::{Cluster, eventually, kubectl_bin};
use serde_json::Value;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// The test CRD's Widget (`tests/fixtures/widgets-crd.yaml`).
pub fn widget_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("test.agentrun.dev", "v1", "Widget"),
        "widgets",
    )
}

/// Installs the Widget CRD and waits until it is established.
pub async fn install_crd(client: &Client) {
    let text = std::fs::read_to_string(fixture("widgets-crd.yaml")).expect("read CRD");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("parse CRD");
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    match api.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_already_exists() => {}
        Err(e) => panic!("create CRD: {e}"),
    }
    eventually(30, "CRD established", || {
        let api = api.clone();
        async move {
            let c = api.get("widgets.test.agentrun.dev").await.ok()?;
            let est = c
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            est.then_some(())
        }
    })
    .await;
}

/// A response as the tests read it: status code, `Warning` headers, JSON body.
pub struct Raw {
    pub code: u16,
    pub warnings: Vec<String>,
    pub body: Value,
}

/// Sends `body` (JSON, or nothing) with `method` to `path` as `content_type`.
pub async fn raw(
    client: &Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Option<&Value>,
) -> Raw {
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(kube::client::Body::from(bytes))
        .expect("request");
    let resp = client.send(req).await.expect("send");
    let code = resp.status().as_u16();
    let warnings = resp
        .headers()
        .get_all("warning")
        .iter()
        .filter_map(|h| h.to_str().ok().map(String::from))
        .collect();
    let bytes = resp.into_body().collect_bytes().await.expect("body");
    Raw {
        code,
        warnings,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// The API error of a refused request (panics when it was not refused).
pub fn refusal<T: std::fmt::Debug>(r: kube::Result<T>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}
