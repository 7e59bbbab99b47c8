//! `--auth kubernetes`: the caller's bearer token is checked with a TokenReview, and what it
//! may do with a run with SubjectAccessReviews on the run's AgentRun (group `agentrun.dev`,
//! resource `agentruns`): `get` to view it, `update` to control it.
//!
//! Answers are cached for `--auth-cache-seconds` (denials and unknown tokens for at most
//! [`NEGATIVE_TTL_MAX`]) in a cache of bounded size. Tokens are kept only as SHA-256 digests
//! and never logged. The review objects are encoded and decoded here rather than with kube's
//! typed `Api::create`, because the API server echoes the token in its answer and kube logs an
//! answer it cannot decode.

use crate::metrics::Metrics;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The AgentRun API group and resource the reviews ask about.
pub const GROUP: &str = "agentrun.dev";
pub const RESOURCE: &str = "agentruns";
/// Denials and unknown tokens are cached at most this long, so that a permission just granted
/// (or a token just created) works soon.
pub const NEGATIVE_TTL_MAX: Duration = Duration::from_secs(5);
/// How long one review may take.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the Kubernetes mode (from the flags).
#[derive(Debug, Clone)]
pub struct KubeAuthSettings {
    /// Kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config` or the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// How long answers are cached; zero: not cached.
    pub cache_ttl: Duration,
    /// Most answers kept in the cache.
    pub cache_size: usize,
}

/// Who a token belongs to, from its TokenReview.
#[derive(Debug)]
pub struct Caller {
    pub username: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
    /// SHA-256 of the token: the cache key of this caller's access reviews.
    digest: [u8; 32],
}

/// Why a review could not be made (the API server is away, or refused the relay itself).
#[derive(Debug, Clone)]
pub struct Unavailable(pub String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    Update,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Update => "update",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Token([u8; 32]),
    /// Token digest, verb, namespace, name (empty: every AgentRun of the namespace).
    Access([u8; 32], Verb, String, String),
}

#[derive(Debug, Clone)]
enum Answer {
    Token(Option<Arc<Caller>>),
    Access(bool),
}

/// A map of bounded size that forgets entries after their time: two generations, each at most
/// half the capacity; when the young one is full it becomes the old one and the old one goes.
/// Every operation is O(1) whatever the clients send.
pub struct BoundedCache<K, V> {
    young: HashMap<K, (V, Instant)>,
    old: HashMap<K, (V, Instant)>,
    half: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> BoundedCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            young: HashMap::new(),
            old: HashMap::new(),
            half: (capacity / 2).max(1),
        }
    }

    pub fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        for map in [&mut self.young, &mut self.old] {
            match map.get(key) {
                Some((v, until)) if *until > now => return Some(v.clone()),
                Some(_) => {
                    map.remove(key);
                }
                None => {}
            }
        }
        None
    }

    pub fn insert(&mut self, key: K, value: V, until: Instant) {
        if self.young.len() >= self.half && !self.young.contains_key(&key) {
            self.old = std::mem::take(&mut self.young);
        }
        self.old.remove(&key);
        self.young.insert(key, (value, until));
    }

    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The Kubernetes client and the cache of answers.
pub struct KubeAuth {
    client: kube::Client,
    /// What the API server is called in messages.
    server: String,
    ttl: Duration,
    cache: Mutex<BoundedCache<Key, Answer>>,
    metrics: Metrics,
}

impl std::fmt::Debug for KubeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuth")
            .field("server", &self.server)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

pub fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl KubeAuth {
    /// Builds the Kubernetes client (no request is made yet).
    pub async fn new(settings: &KubeAuthSettings, metrics: Metrics) -> anyhow::Result<Self> {
        use kube::config::{KubeConfigOptions, Kubeconfig};
        let config = match &settings.kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path).map_err(|e| {
                    anyhow::anyhow!("could not read the kubeconfig {}: {e}", path.display())
                })?;
                kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
            }
            None => kube::Config::infer().await.map_err(|e| {
                anyhow::anyhow!(
                    "--auth kubernetes needs a Kubernetes config ({e}): run in a cluster (in-cluster ServiceAccount), set KUBECONFIG, or pass --kubeconfig FILE"
                )
            })?,
        };
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config)?;
        Ok(Self {
            client,
            server,
            ttl: settings.cache_ttl,
            cache: Mutex::new(BoundedCache::new(settings.cache_size.max(2))),
            metrics,
        })
    }

    fn cached(&self, key: &Key) -> Option<Answer> {
        if self.ttl.is_zero() {
            return None;
        }
        let hit = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key, Instant::now());
        if hit.is_some() {
            self.metrics.auth_cache_hits.inc();
        }
        hit
    }

    fn remember(&self, key: Key, answer: Answer, positive: bool) {
        let ttl = if positive {
            self.ttl
        } else {
            self.ttl.min(NEGATIVE_TTL_MAX)
        };
        if ttl.is_zero() {
            return;
        }
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(
            key,
            answer,
            Instant::now() + ttl,
        );
    }

    /// Entries in the cache (for tests and metrics).
    pub fn cache_len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// POSTs a review object and decodes the answer. Neither the request nor the answer is
    /// ever logged (both may hold the token).
    async fn review<T: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        kind: &'static str,
        path: &str,
        resource: &str,
        object: &T,
    ) -> Result<T, Unavailable> {
        self.metrics.auth_reviews.with_label_values(&[kind]).inc();
        let body = serde_json::to_vec(object).map_err(|e| Unavailable(e.to_string()))?;
        let req = axum::http::Request::post(path)
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .body(body)
            .map_err(|e| Unavailable(e.to_string()))?;
        let text = match tokio::time::timeout(REVIEW_TIMEOUT, self.client.request_text(req)).await {
            Ok(Ok(text)) => text,
            Ok(Err(kube::Error::Api(status))) if status.code == 401 || status.code == 403 => {
                return Err(Unavailable(format!(
                    "the Kubernetes API server at {} refused the relay's own request ({} {}): the relay's ServiceAccount needs 'create' on {resource}",
                    self.server, status.code, status.message
                )));
            }
            Ok(Err(e)) => {
                return Err(Unavailable(format!(
                    "the Kubernetes API server at {} could not be reached to check credentials ({e}); retry when it is reachable",
                    self.server
                )));
            }
            Err(_) => {
                return Err(Unavailable(format!(
                    "the Kubernetes API server at {} did not answer a {kind} review within {} s; retry when it is reachable",
                    self.server,
                    REVIEW_TIMEOUT.as_secs()
                )));
            }
        };
        serde_json::from_str(&text).map_err(|e| {
            Unavailable(format!(
                "the Kubernetes API server at {} sent a {kind} review answer that does not decode (line {}, column {})",
                self.server,
                e.line(),
                e.column()
            ))
        })
    }

    /// Who the token belongs to; `Ok(None)` when the API server does not accept it.
    pub async fn authenticate(&self, token: &str) -> Result<Option<Arc<Caller>>, Unavailable> {
        let digest = digest(token);
        let key = Key::Token(digest);
        if let Some(Answer::Token(caller)) = self.cached(&key) {
            return Ok(caller);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: None,
            },
            ..Default::default()
        };
        let answer = self
            .review(
                "token",
                "/apis/authentication.k8s.io/v1/tokenreviews",
                "tokenreviews.authentication.k8s.io",
                &review,
            )
            .await?;
        let caller = answer
            .status
            .filter(|s| s.authenticated == Some(true))
            .and_then(|s| s.user)
            .and_then(|u| {
                Some(Arc::new(Caller {
                    username: u.username.filter(|n| !n.is_empty())?,
                    uid: u.uid.filter(|n| !n.is_empty()),
                    groups: u.groups.unwrap_or_default(),
                    extra: u.extra.unwrap_or_default(),
                    digest,
                }))
            });
        self.remember(key, Answer::Token(caller.clone()), caller.is_some());
        Ok(caller)
    }

    /// A cached answer of [`KubeAuth::allowed`], without asking the API server.
    pub fn cached_allowed(
        &self,
        caller: &Caller,
        verb: Verb,
        namespace: &str,
        name: &str,
    ) -> Option<bool> {
        let key = Key::Access(caller.digest, verb, namespace.to_owned(), name.to_owned());
        match self.cached(&key) {
            Some(Answer::Access(allowed)) => Some(allowed),
            _ => None,
        }
    }

    /// Whether `caller` may `verb` the AgentRun `name` in `namespace` (`name` empty: every
    /// AgentRun of the namespace).
    pub async fn allowed(
        &self,
        caller: &Caller,
        verb: Verb,
        namespace: &str,
        name: &str,
    ) -> Result<bool, Unavailable> {
        let key = Key::Access(caller.digest, verb, namespace.to_owned(), name.to_owned());
        if let Some(Answer::Access(allowed)) = self.cached(&key) {
            return Ok(allowed);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.username.clone()),
                uid: caller.uid.clone(),
                groups: Some(caller.groups.clone()),
                extra: (!caller.extra.is_empty()).then(|| caller.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.to_owned()),
                    resource: Some(RESOURCE.to_owned()),
                    verb: Some(verb.as_str().to_owned()),
                    namespace: Some(namespace.to_owned()),
                    name: (!name.is_empty()).then(|| name.to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = self
            .review(
                "access",
                "/apis/authorization.k8s.io/v1/subjectaccessreviews",
                "subjectaccessreviews.authorization.k8s.io",
                &review,
            )
            .await?;
        let allowed = answer.status.is_some_and(|s| s.allowed);
        self.remember(key, Answer::Access(allowed), allowed);
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_stays_bounded_and_forgets_expired_entries() {
        let mut c = BoundedCache::new(100);
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        for i in 0..10_000u32 {
            c.insert(i, i, later);
            assert!(c.len() <= 100, "{} entries", c.len());
        }
        // The newest entries are still there.
        assert_eq!(c.get(&9_999, now), Some(9_999));
        assert_eq!(c.get(&9_950, now), Some(9_950));
        assert_eq!(c.get(&0, now), None);
        // Expired entries are not answered, and go.
        c.insert(7, 7, now + Duration::from_millis(1));
        assert_eq!(c.get(&7, now + Duration::from_secs(1)), None);
        // Re-inserting a key keeps one copy.
        let mut c = BoundedCache::new(4);
        for _ in 0..10 {
            c.insert(1, 1, later);
            c.insert(2, 2, later);
        }
        assert_eq!(c.len(), 2);
    }
}
