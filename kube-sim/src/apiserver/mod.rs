//! The API server: the Kubernetes REST and watch protocol over one in-memory store.
//!
//! A request goes `handlers` (routing and verbs; `http` plumbing) → `auth` (who) → `rbac`
//! (may they, by `attributes`) → the verb: reads from `store`, `watch` streams, pod `logs`,
//! writes through `patch` / `apply` into `store`, whose writes pass `admission` and, for custom
//! resources, `schema` (with `cel` rules) before they are stored.
//!
//! | module | what it owns |
//! |---|---|
//! | `handlers` | the entry point: authentication and authorization of each request, routing, the REST verbs, reviews |
//! | `http` | query decoding, the resource a URL names, request bodies, write/delete options, JSON responses |
//! | `watch` | watch streams: initial events, resume from the history, bookmarks, 410 Gone |
//! | `logs` | pod logs from the kubelet's files |
//! | `store` | objects, `resourceVersion`, served types, event history; `store/writes`, `store/deletion` |
//! | `admission` | the stage every create and update passes before it is stored: defaults and validation of built-in types, then the admission plugins below |
//! | `podsecurity` | Pod Security Admission (namespace labels, the baseline and restricted checks) |
//! | `limitrange` | LimitRanger: default requests and limits, min/max/ratio bounds |
//! | `quota` | ResourceQuota: admission, pod usage, the quota controller that keeps `status` |
//! | `quantity` | resource quantities: parsing, comparison, canonical form |
//! | `patch` | JSON, merge and strategic merge patches, and the read-patch-write loop |
//! | `apply` | server-side apply: structured merge, pruning, ownership conflicts |
//! | `managed_fields` | `metadata.managedFields`: entries, what an update takes over |
//! | `fieldset` | field sets (`fieldsV1`) and the shape of objects (list and map types) |
//! | `schema`, `cel` | CRD schemas: defaults, pruning, validation, `x-kubernetes-validations` |
//! | `resources` | the served types: built-in ones and those CRDs register |
//! | `discovery` | `/api`, `/apis`, `/version` (`--server-version`), `/openapi/v3` |
//! | `selectors` | label and field selectors |
//! | `table` | `Table` output for `kubectl get` |
//! | `gc` | garbage collection through owner references, namespace deletion |
//! | `auth` | authentication: users and tokens of the auth config, TokenReview |
//! | `attributes` | what a request asks for (verb, resource, namespace, name) |
//! | `rbac` | authorization: RBAC objects, auth config rules, SubjectAccessReviews, 403s |
//! | `errors` | API errors as `Status` objects, field errors |
//! | `tls` | the generated CA and serving certificate |

pub mod admission;
pub mod apply;
pub mod attributes;
pub mod auth;
pub mod cel;
pub mod discovery;
pub mod errors;
pub mod fieldset;
pub mod gc;
pub mod handlers;
pub mod http;
pub mod limitrange;
pub mod logs;
pub mod managed_fields;
pub mod patch;
pub mod podsecurity;
pub mod quantity;
pub mod quota;
pub mod rbac;
pub mod resources;
pub mod schema;
pub mod selectors;
pub mod store;
pub mod table;
pub mod tls;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use auth::AuthConfig;
use rbac::DenialLog;
use store::Store;

/// Where container logs are (the kubelet's files); the API server reads `kubectl logs` from
/// there, as the real one asks the node's kubelet.
pub trait PodLogs: Send + Sync {
    /// The log of the current instance of `container` in the pod with `uid`.
    fn log_path(&self, uid: &str, container: &str) -> PathBuf;
}

/// Shared state of the HTTP server.
pub struct App {
    pub store: Arc<Store>,
    pub auth: AuthConfig,
    /// The kubelet's logs (None: kube-sim runs without a kubelet).
    pub pod_logs: Option<Arc<dyn PodLogs>>,
    pub addr: String,
    pub bookmark_interval: Duration,
    /// Requests refused with 403.
    pub denials: Arc<DenialLog>,
}

/// The HTTP service: every request goes to [`handlers::handle`].
pub fn router(app: Arc<App>) -> axum::Router {
    axum::Router::new()
        .fallback(handlers::handle)
        .with_state(app)
}
