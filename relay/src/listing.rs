//! `GET /api/runs`: live and archived runs in one list, newest first, filtered and paged.
//!
//! Runs are ordered by creation time (newest first), then by run id (descending), the order of
//! the run index in Redis (`agentrun:runs`, scored by creation time). A page token (`after`,
//! the `next` of the previous page) is a cut in that order: the next page lists the runs after
//! it. Each page merges two sources read from that cut:
//!
//! - **live**: the run index, with each run's state hash (runs whose hash expired are not
//!   live), filtered and checked for access;
//! - **archived**: the archive's catalog (`agentrun_archiver::catalog`), filtered by its
//!   names; a run Redis still holds is left to the live source (live wins), so each run appears
//!   once.
//!
//! Each source says up to where what it returned is complete; the page holds at most `limit`
//! runs that are before both limits, and `next` is the cut after them. So following `next`
//! until it is `null` lists every run once, whatever arrives or expires meanwhile (a run that
//! moves from Redis to the archive keeps its place). A page may hold fewer than `limit` runs
//! (runs the caller may not see are left out after the page is cut) while `next` is not null.

use crate::AppState;
use crate::auth::Access;
use crate::error::ApiError;
use agentrun_archiver::catalog::{CatalogEntry, CatalogFilter};
use agentrun_protocol::names::RUNS_INDEX_KEY;
use agentrun_protocol::{RunId, RunState, state_hash};
use base64::Engine;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};

/// What `GET /api/runs/{run}` and each item of `GET /api/runs` say about a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    pub run: String,
    /// Creation time, ms since the epoch.
    pub created: Option<u64>,
    /// Run-level state (`pending`, `running`, ..., `succeeded`, `failed`, `stopped`).
    pub phase: Option<String>,
    /// When the run reached a final phase, ms since the epoch.
    pub ended: Option<u64>,
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub url: Option<String>,
    /// Latest status of each variation (a `StatusEvent` object, or null when not known yet).
    pub variations: BTreeMap<String, serde_json::Value>,
    /// Whether the run has reached a final phase.
    pub finished: bool,
    /// Whether the run is served from its archive (Redis no longer holds it).
    #[serde(default)]
    pub archived: bool,
}

pub fn summary(
    run: &str,
    created_score: Option<u64>,
    state: &HashMap<String, String>,
) -> RunSummary {
    let text = |k: &str| state.get(k).cloned();
    let mut variations = BTreeMap::new();
    for v in state_hash::variations(state) {
        let status = state_hash::variation_status(state, &v)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(serde_json::Value::Null);
        variations.insert(v.as_str().to_owned(), status);
    }
    RunSummary {
        run: run.to_owned(),
        created: state_hash::millis(state, state_hash::CREATED).or(created_score),
        phase: text(state_hash::PHASE),
        ended: state_hash::millis(state, state_hash::ENDED),
        name: text(state_hash::NAME),
        namespace: text(state_hash::NAMESPACE),
        url: text(state_hash::URL),
        variations,
        finished: state_hash::phase(state).is_some_and(|p| p.is_final()),
        archived: false,
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// How many runs to list: 1 to 1000 (default 100; beyond the range, the nearest bound).
    pub limit: Option<String>,
    /// Only runs of this namespace.
    pub namespace: Option<String>,
    /// Only runs in this phase (`succeeded`, `failed`, `running`...).
    pub phase: Option<String>,
    /// Only runs whose id or AgentRun name holds this text.
    pub name: Option<String>,
    /// The `next` of the previous page.
    pub after: Option<String>,
}

impl ListQuery {
    /// How many runs to list.
    pub fn limit(&self) -> Result<usize, ApiError> {
        let Some(text) = self
            .limit
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        else {
            return Ok(100);
        };
        if !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ApiError::bad_request(format!(
                "limit {text:?} is not a number: give `limit` as a whole number of runs, 1 to 1000"
            )));
        }
        // All digits: only too many of them fail to parse, and that is above the range too.
        Ok(text.parse::<usize>().unwrap_or(usize::MAX).clamp(1, 1000))
    }
}

/// Run index entries read per Redis round trip.
const INDEX_CHUNK: usize = 200;
/// Most run index entries one page reads (a filter that matches little gives a shorter page
/// with a `next`, rather than a scan of the whole index).
pub const MAX_LIVE_SCAN: usize = 10_000;
/// Most catalog pages one page of the list reads.
const MAX_CATALOG_PAGES: usize = 64;
/// Catalog names asked for at least, per catalog page.
const MIN_CATALOG_PAGE: usize = 100;
/// Manifests read at once (archived runs of a page).
const MANIFESTS_AT_ONCE: usize = 16;

/// A place in the list's order (creation time descending, then run id descending).
///
/// Runs *before* the cut: created later than `created`, or created at `created` with a run id
/// at or above `run`. With `run: None` the cut is before every run created at `created`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub created: u64,
    pub run: Option<String>,
}

impl Cut {
    /// The cut just after a run.
    pub fn after_run(created: u64, run: &str) -> Self {
        Self {
            created,
            run: Some(run.to_owned()),
        }
    }

    /// Whether a run is after this cut (on a later page).
    pub fn precedes(&self, created: u64, run: &str) -> bool {
        created < self.created
            || (created == self.created && self.run.as_deref().is_none_or(|r| run < r))
    }

    /// Whether `self` is at or before `other` (fewer runs before it).
    fn not_after(&self, other: &Cut) -> bool {
        match (&self.run, &other.run) {
            _ if self.created != other.created => self.created > other.created,
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a >= b,
        }
    }

    /// The page token (`next`) of this cut: opaque to clients.
    pub fn token(&self) -> String {
        let text = format!("1:{}:{}", self.created, self.run.as_deref().unwrap_or(""));
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    /// Reads a page token back.
    pub fn from_token(token: &str) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::bad_request(format!(
                "`after` {token:?} is not a page token: give the `next` of the previous page unchanged, or leave `after` out for the first page"
            ))
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| bad())?;
        let text = String::from_utf8(bytes).map_err(|_| bad())?;
        let mut parts = text.splitn(3, ':');
        if parts.next() != Some("1") {
            return Err(bad());
        }
        let created = parts.next().and_then(|c| c.parse().ok()).ok_or_else(bad)?;
        let run = parts.next().ok_or_else(bad)?;
        Ok(Self {
            created,
            run: (!run.is_empty()).then(|| run.to_owned()),
        })
    }
}

/// The list's filters, checked.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub phase: Option<RunState>,
    pub name: Option<String>,
}

fn given(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

impl Filter {
    /// Checks the filters of a list query; a bad one is a 400 naming it.
    pub fn from_query(q: &ListQuery) -> Result<Self, ApiError> {
        let namespace = given(&q.namespace)
            .map(|ns| {
                let ok = ns.len() <= 63
                    && ns
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if ok {
                    Ok(ns.to_owned())
                } else {
                    Err(ApiError::bad_request(format!(
                        "`namespace` {ns:?} is not a namespace name: up to 63 characters of a-z, 0-9 and -"
                    )))
                }
            })
            .transpose()?;
        let phase = given(&q.phase)
            .map(|p| {
                RunState::parse(&p.to_ascii_lowercase()).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "`phase` {p:?} is not a phase: give one of pending, starting, running, paused, succeeded, failed, stopped"
                    ))
                })
            })
            .transpose()?;
        let name = given(&q.name)
            .map(|n| {
                if n.len() <= 253 && !n.chars().any(char::is_control) {
                    Ok(n.to_owned())
                } else {
                    Err(ApiError::bad_request(
                        "`name` is too long or holds control characters: give a part of a run id or AgentRun name (at most 253 characters)",
                    ))
                }
            })
            .transpose()?;
        Ok(Self {
            namespace,
            phase,
            name,
        })
    }

    /// Whether a live run (its id and state hash) passes.
    fn keeps_live(&self, run: &str, state: &HashMap<String, String>) -> bool {
        self.namespace
            .as_deref()
            .is_none_or(|ns| state.get(state_hash::NAMESPACE).map(String::as_str) == Some(ns))
            && self
                .phase
                .is_none_or(|p| state_hash::phase(state) == Some(p))
            && self.name.as_deref().is_none_or(|n| {
                run.contains(n)
                    || state
                        .get(state_hash::NAME)
                        .is_some_and(|name| name.contains(n))
            })
    }

    fn catalog(&self) -> CatalogFilter {
        CatalogFilter {
            namespace: self.namespace.clone(),
            phase: self.phase.map(|p| p.as_str().to_owned()),
            name: self.name.clone(),
        }
    }
}

/// Runs of one source, in order, and the cut up to which they are complete (`None`: to the
/// end of the list).
struct Part<T> {
    runs: Vec<(u64, String, T)>,
    complete_to: Option<Cut>,
}

/// Reads state hashes, in order (one pipeline; one by one, a few at a time, on a cluster,
/// where each hash is in its run's slot).
pub async fn read_states(
    app: &AppState,
    runs: &[RunId],
) -> Result<Vec<HashMap<String, String>>, ApiError> {
    if runs.is_empty() {
        return Ok(Vec::new());
    }
    if app.settings.mode == agentrun_protocol::RedisMode::Cluster {
        let keys: Vec<String> = runs.iter().map(RunId::state_key).collect();
        return futures::stream::iter(keys)
            .map(|key| {
                let app = app.clone();
                async move {
                    app.query::<HashMap<String, String>>(redis::cmd("HGETALL").arg(key))
                        .await
                }
            })
            .buffered(16)
            .try_collect()
            .await;
    }
    let mut pipe = redis::pipe();
    for run in runs {
        pipe.cmd("HGETALL").arg(run.state_key());
    }
    let pipe = &pipe;
    app.redis(|mut conn| async move { pipe.query_async(&mut conn).await })
        .await
}

/// Live runs after `after` that pass `filter` and that the caller may see: up to `limit`.
async fn live_part(
    app: &AppState,
    access: &Access,
    filter: &Filter,
    after: Option<&Cut>,
    limit: usize,
) -> Result<Part<HashMap<String, String>>, ApiError> {
    let max = after.map_or("+inf".to_owned(), |c| c.created.to_string());
    let mut part = Part {
        runs: Vec::new(),
        complete_to: None,
    };
    let mut offset = 0;
    while offset < MAX_LIVE_SCAN {
        let chunk: Vec<(String, f64)> = app
            .query(
                redis::cmd("ZREVRANGEBYSCORE")
                    .arg(RUNS_INDEX_KEY)
                    .arg(&max)
                    .arg("-inf")
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(offset)
                    .arg(INDEX_CHUNK),
            )
            .await?;
        offset += chunk.len();
        let Some((last_id, last_score)) = chunk.last().cloned() else {
            part.complete_to = None;
            return Ok(part);
        };
        let ids: Vec<(u64, RunId)> = chunk
            .iter()
            .map(|(id, score)| (*score as u64, id))
            .filter(|(created, id)| after.is_none_or(|c| c.precedes(*created, id)))
            .filter_map(|(created, id)| RunId::new(id).ok().map(|r| (created, r)))
            .collect();
        let runs: Vec<RunId> = ids.iter().map(|(_, r)| r.clone()).collect();
        let states = read_states(app, &runs).await?;
        let kept: Vec<usize> = (0..states.len())
            .filter(|&i| !states[i].is_empty() && filter.keeps_live(runs[i].as_str(), &states[i]))
            .collect();
        let visible = access
            .visible(&kept.iter().map(|&i| &states[i]).collect::<Vec<_>>())
            .await?;
        for (&i, ok) in kept.iter().zip(visible) {
            if ok {
                let (created, run) = &ids[i];
                part.runs
                    .push((*created, run.as_str().to_owned(), states[i].clone()));
                if part.runs.len() >= limit {
                    part.complete_to = Some(Cut::after_run(*created, run.as_str()));
                    return Ok(part);
                }
            }
        }
        if chunk.len() < INDEX_CHUNK {
            part.complete_to = None;
            return Ok(part);
        }
        part.complete_to = Some(Cut::after_run(last_score as u64, &last_id));
    }
    Ok(part)
}

/// The creation time a catalog name (or a page's `next`) stands for.
fn catalog_created(name: &str) -> Option<u64> {
    let inverted: u64 = name
        .strip_prefix("catalog/")?
        .split('/')
        .next()?
        .parse()
        .ok()?;
    Some(u64::MAX - inverted)
}

/// Archived runs after `after` that pass `filter`: at least `limit` of those it is complete
/// for, when there are that many.
async fn archive_part(
    app: &AppState,
    filter: &Filter,
    after: Option<&Cut>,
    limit: usize,
) -> Result<Part<CatalogEntry>, ApiError> {
    let mut part = Part {
        runs: Vec::new(),
        complete_to: None,
    };
    let Some(archive) = &app.archive else {
        return Ok(part);
    };
    let filter = filter.catalog();
    // Every name of a run created at or before the cut's time comes after this one.
    let mut offset = after.map(|c| {
        format!(
            "{}/{:020}",
            agentrun_archiver::catalog::CATALOG_DIR,
            u64::MAX - c.created
        )
    });
    for _ in 0..MAX_CATALOG_PAGES {
        let page = archive
            .list(
                &filter,
                offset.as_deref(),
                (limit + 1).max(MIN_CATALOG_PAGE),
            )
            .await
            .map_err(|e| crate::archived::store_failed(app, e))?;
        part.runs.extend(
            page.runs
                .into_iter()
                .filter(|e| after.is_none_or(|c| c.precedes(e.created_ms, &e.run)))
                .map(|e| (e.created_ms, e.run.clone(), e)),
        );
        let Some(next) = page.next else {
            part.complete_to = None;
            return Ok(part);
        };
        let Some(created) = catalog_created(&next) else {
            return Err(crate::archived::store_failed(
                app,
                format!("the catalog name {next:?} is not one"),
            ));
        };
        // Names are in creation order, but runs created in the same millisecond are not in
        // run id order: the runs of `created` may go on in the next catalog page.
        let cut = Cut { created, run: None };
        let complete = part
            .runs
            .iter()
            .filter(|(c, r, _)| !cut.precedes(*c, r))
            .count();
        part.complete_to = Some(cut);
        if complete >= limit {
            break;
        }
        offset = Some(next);
    }
    Ok(part)
}

/// `GET /api/runs?limit=N&namespace=NS&phase=PHASE&name=TEXT&after=TOKEN`.
pub async fn list_runs(
    app: &AppState,
    access: &Access,
    query: &ListQuery,
) -> Result<serde_json::Value, ApiError> {
    let limit = query.limit()?;
    let filter = Filter::from_query(query)?;
    let after = given(&query.after).map(Cut::from_token).transpose()?;
    let live = live_part(app, access, &filter, after.as_ref(), limit).await?;
    let archived = archive_part(app, &filter, after.as_ref(), limit).await?;

    // Only what both sources are complete for may be on this page.
    let complete_to = match (live.complete_to, archived.complete_to) {
        (Some(a), Some(b)) => Some(if a.not_after(&b) { a } else { b }),
        (a, b) => a.or(b),
    };
    let within = |created: u64, run: &str| {
        complete_to
            .as_ref()
            .is_none_or(|c| !c.precedes(created, run))
    };
    let live_ids: HashSet<&str> = live.runs.iter().map(|(_, r, _)| r.as_str()).collect();
    enum Item<'a> {
        Live(&'a HashMap<String, String>),
        Archived,
    }
    let mut items: Vec<(u64, &str, Item)> = live
        .runs
        .iter()
        .filter(|(c, r, _)| within(*c, r))
        .map(|(c, r, s)| (*c, r.as_str(), Item::Live(s)))
        .chain(
            archived
                .runs
                .iter()
                .filter(|(c, r, _)| within(*c, r) && !live_ids.contains(r.as_str()))
                .map(|(c, r, _)| (*c, r.as_str(), Item::Archived)),
        )
        .collect();
    items.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(a.1)));
    items.dedup_by(|a, b| a.1 == b.1);
    items.truncate(limit);
    let next = if items.len() >= limit {
        items.last().map(|(c, r, _)| Cut::after_run(*c, r))
    } else {
        complete_to
    };

    // Archived runs: left to the live source if Redis holds them (whatever the live filters
    // said), else summarised from their manifest, for callers who may see them.
    let archived_ids: Vec<RunId> = items
        .iter()
        .filter(|(_, _, i)| matches!(i, Item::Archived))
        .filter_map(|(_, r, _)| RunId::new(*r).ok())
        .collect();
    let in_redis = read_states(app, &archived_ids).await?;
    let gone: Vec<RunId> = archived_ids
        .into_iter()
        .zip(&in_redis)
        .filter(|(_, s)| s.is_empty())
        .map(|(run, _)| run)
        .collect();
    let summaries: Vec<Option<RunSummary>> = futures::stream::iter(gone)
        .map(|run| {
            let (app, access) = (app.clone(), access.clone());
            async move { archived_summary(&app, &access, &run).await }
        })
        .buffered(MANIFESTS_AT_ONCE)
        .try_collect()
        .await?;
    let mut archived: HashMap<String, RunSummary> = summaries
        .into_iter()
        .flatten()
        .map(|s| (s.run.clone(), s))
        .collect();
    let runs: Vec<RunSummary> = items
        .iter()
        .filter_map(|(created, run, item)| match item {
            Item::Live(state) => Some(summary(run, Some(*created), state)),
            Item::Archived => archived.remove(*run),
        })
        .collect();
    Ok(serde_json::json!({
        "runs": runs,
        "next": next.map(|c| c.token()),
    }))
}

/// The summary of an archived run from its manifest, if the caller may see it.
async fn archived_summary(
    app: &AppState,
    access: &Access,
    run: &RunId,
) -> Result<Option<RunSummary>, ApiError> {
    let Some(archive) = &app.archive else {
        return Ok(None);
    };
    let Some(reader) = archive
        .reader(run)
        .await
        .map_err(|e| crate::archived::store_failed(app, e))?
    else {
        // Listed in the catalog but gone since (deleted from the store).
        return Ok(None);
    };
    let state = crate::archive::state_of(&reader);
    if !access.can_see(&state).await? {
        return Ok(None);
    }
    let mut s = summary(run.as_str(), None, &state);
    s.archived = true;
    Ok(Some(s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A page token reads back as the cut it was made from; anything else is a 400 naming
        /// `after`.
        #[test]
        fn tokens_read_back_and_junk_is_refused(created in any::<u64>(), run in proptest::option::of("[a-z0-9.-]{1,40}"), junk in any::<String>()) {
            let cut = Cut { created, run };
            prop_assert_eq!(Cut::from_token(&cut.token()).unwrap(), cut);
            if let Err(e) = Cut::from_token(&junk) {
                prop_assert!(e.message.contains("`after`"), "{}", e.message);
            }
        }
    }

    #[test]
    fn a_cut_orders_runs_newest_first_then_by_id_descending() {
        let cut = Cut::after_run(100, "m");
        assert!(!cut.precedes(101, "a"));
        assert!(!cut.precedes(100, "m"));
        assert!(!cut.precedes(100, "z"));
        assert!(cut.precedes(100, "l"));
        assert!(cut.precedes(99, "z"));
        let all_at = Cut {
            created: 100,
            run: None,
        };
        assert!(all_at.precedes(100, "z"));
        assert!(all_at.not_after(&cut));
        assert!(!cut.not_after(&all_at));
        assert!(Cut::after_run(101, "a").not_after(&all_at));
    }

    #[test]
    fn bad_filters_are_refused_naming_the_parameter() {
        let q = |f: fn(&mut ListQuery)| {
            let mut q = ListQuery::default();
            f(&mut q);
            Filter::from_query(&q)
        };
        let e = q(|q| q.namespace = Some("Not_A_NS".into())).unwrap_err();
        assert!(e.message.contains("`namespace`"), "{}", e.message);
        let e = q(|q| q.phase = Some("done".into())).unwrap_err();
        assert!(e.message.contains("`phase`"), "{}", e.message);
        let e = q(|q| q.name = Some("x".repeat(300))).unwrap_err();
        assert!(e.message.contains("`name`"), "{}", e.message);
        let f = q(|q| q.phase = Some("Failed".into())).unwrap();
        assert_eq!(f.phase, Some(RunState::Failed));
    }
}
