//! The catalog of archived runs: what a run list reads once Redis has let a run go.
//!
//! One empty object per archived run, whose name carries everything a list sorts and filters
//! on, so that listing needs no object body:
//!
//! ```text
//! catalog/<20-digit (u64::MAX - created ms)>/<phase>/<namespace or ->/<run id>
//! ```
//!
//! Object stores list names in lexical order, so the newest run comes first, and a page of the
//! list continues after the last name of the previous page (`list_with_offset`). The object is
//! written after the run's manifest, by whoever finds the archive complete (the archiver that
//! wrote it, or one that is asked again), so a run missing from the catalog after a crash is
//! added the next time it is requested; the name of a run never changes (its phase is final).

use crate::error::ArchiveError;
use crate::format::Manifest;
use crate::store::ArchiveStore;
use agentrun_protocol::state_hash;
use futures::TryStreamExt;
use object_store::PutPayload;

/// Folder of the catalog, under the store's root.
pub const CATALOG_DIR: &str = "catalog";

/// Most catalog names one [`list`] reads from a cloud store, whatever it finds: a filter that
/// matches little returns a shorter page with a `next` to go on from, rather than scanning the
/// whole store. (A folder lists in no order, so a page of a folder store reads every name.)
pub const MAX_SCAN: usize = 10_000;

/// One archived run, as the catalog names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    pub run: String,
    /// The run's namespace (empty for runs started outside Kubernetes).
    pub namespace: String,
    /// `succeeded`, `failed`, `stopped`... (`unknown` when the run had none).
    pub phase: String,
    pub created_ms: u64,
}

/// What a list keeps (every given field must match).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogFilter {
    pub namespace: Option<String>,
    pub phase: Option<String>,
    /// A part of the run id (which holds the AgentRun's name).
    pub name: Option<String>,
}

impl CatalogFilter {
    fn keeps(&self, e: &CatalogEntry) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == e.namespace)
            && self
                .phase
                .as_deref()
                .is_none_or(|p| p.eq_ignore_ascii_case(&e.phase))
            && self.name.as_deref().is_none_or(|n| e.run.contains(n))
    }
}

/// A page of the catalog, newest first; `next` continues it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogPage {
    pub runs: Vec<CatalogEntry>,
    pub next: Option<String>,
}

/// A name part that cannot be empty or hold a `/`.
fn part(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.replace('/', "_")
    }
}

/// The catalog name of an archived run, relative to the store's root.
pub fn entry_name(manifest: &Manifest) -> String {
    let created = manifest
        .state
        .get(state_hash::CREATED)
        .and_then(|c| c.parse::<u64>().ok())
        .unwrap_or(manifest.archived_ms);
    let phase = manifest.phase().unwrap_or("unknown");
    let namespace = manifest
        .state
        .get(state_hash::NAMESPACE)
        .map(String::as_str)
        .unwrap_or("");
    format!(
        "{CATALOG_DIR}/{:020}/{}/{}/{}",
        u64::MAX - created,
        part(phase),
        part(namespace),
        part(&manifest.run)
    )
}

/// Reads a catalog name back (relative to the store's root); `None` for what is not one.
pub fn parse_entry(relative: &str) -> Option<CatalogEntry> {
    let mut parts = relative
        .strip_prefix(CATALOG_DIR)?
        .strip_prefix('/')?
        .split('/');
    let inverted: u64 = parts.next()?.parse().ok()?;
    let phase = parts.next()?.to_owned();
    let namespace = match parts.next()? {
        "-" => String::new(),
        n => n.to_owned(),
    };
    let run = parts.next()?.to_owned();
    if parts.next().is_some() {
        return None;
    }
    Some(CatalogEntry {
        run,
        namespace,
        phase,
        created_ms: u64::MAX - inverted,
    })
}

/// Adds the run of a complete archive to the catalog (again, harmlessly).
pub async fn add(store: &ArchiveStore, manifest: &Manifest) -> Result<(), ArchiveError> {
    store
        .object_store()
        .put(&store.path(&entry_name(manifest)), PutPayload::new())
        .await?;
    Ok(())
}

/// Archived runs, newest first: up to `limit` that `filter` keeps, after `after` (the `next`
/// of the previous page).
pub async fn list(
    store: &ArchiveStore,
    filter: &CatalogFilter,
    after: Option<&str>,
    limit: usize,
) -> Result<CatalogPage, ArchiveError> {
    let prefix = store.path(CATALOG_DIR);
    let root_len = store.path("").as_ref().len();
    let relative =
        |location: &str| -> String { location[root_len..].trim_start_matches('/').to_owned() };
    let mut listing = match after {
        Some(after) => store
            .object_store()
            .list_with_offset(Some(&prefix), &store.path(after)),
        None => store.object_store().list(Some(&prefix)),
    };
    if store.lists_in_order() {
        // Cloud stores list names in lexical order: stop at the page's end.
        let mut page = CatalogPage::default();
        let mut scanned = 0;
        while let Some(meta) = listing.try_next().await? {
            let name = relative(meta.location.as_ref());
            scanned += 1;
            if let Some(entry) = parse_entry(&name).filter(|e| filter.keeps(e)) {
                page.runs.push(entry);
            }
            if page.runs.len() >= limit || scanned >= MAX_SCAN {
                page.next = Some(name);
                break;
            }
        }
        return Ok(page);
    }
    // A folder lists in no particular order: keep the `limit + 1` first names of all.
    let mut first = std::collections::BTreeSet::new();
    while let Some(meta) = listing.try_next().await? {
        let name = relative(meta.location.as_ref());
        if parse_entry(&name).is_some_and(|e| filter.keeps(&e)) {
            first.insert(name);
            if first.len() > limit + 1 {
                first.pop_last();
            }
        }
    }
    let more = first.len() > limit;
    let names: Vec<String> = first.into_iter().take(limit).collect();
    Ok(CatalogPage {
        next: if more { names.last().cloned() } else { None },
        runs: names.iter().filter_map(|n| parse_entry(n)).collect(),
    })
}

/// Adds every complete archive in the store to the catalog (archives written before the
/// catalog existed, or a catalog that was lost). Returns how many runs it holds.
pub async fn rebuild(store: &ArchiveStore) -> Result<usize, ArchiveError> {
    let root_len = store.path("").as_ref().len();
    let mut runs = Vec::new();
    let mut listing = store.object_store().list(Some(&store.path("runs")));
    while let Some(meta) = listing.try_next().await? {
        let name = meta.location.as_ref()[root_len..].trim_start_matches('/');
        let run = name
            .strip_prefix("runs/")
            .and_then(|rest| rest.strip_suffix("/manifest.json"))
            .filter(|run| !run.contains('/'));
        if let Some(run) = run {
            runs.push(run.to_owned());
        }
    }
    let mut added = 0;
    for run in runs {
        let Ok(id) = agentrun_protocol::RunId::new(run.clone()) else {
            continue;
        };
        if let Some(manifest) = crate::store::read_manifest(store, &id).await? {
            add(store, &manifest).await?;
            added += 1;
        }
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn manifest(run: &str, namespace: &str, phase: &str, created: u64) -> Manifest {
        let mut state = BTreeMap::new();
        state.insert(state_hash::CREATED.to_owned(), created.to_string());
        state.insert(state_hash::PHASE.to_owned(), phase.to_owned());
        if !namespace.is_empty() {
            state.insert(state_hash::NAMESPACE.to_owned(), namespace.to_owned());
        }
        Manifest {
            format: crate::format::FORMAT.into(),
            run: run.into(),
            attempt: "a".into(),
            archived_ms: created + 1000,
            variations: vec!["default".into()],
            state,
            streams: vec![],
        }
    }

    #[test]
    fn names_read_back_and_sort_newest_first() {
        let old = entry_name(&manifest("team.build.0a", "team", "succeeded", 1_000));
        let new = entry_name(&manifest("local-run", "", "failed", 2_000));
        assert!(new < old, "{new} sorts before {old}");
        assert_eq!(
            parse_entry(&new),
            Some(CatalogEntry {
                run: "local-run".into(),
                namespace: String::new(),
                phase: "failed".into(),
                created_ms: 2_000,
            })
        );
        assert_eq!(parse_entry("catalog/x/y"), None);
        assert_eq!(parse_entry("runs/r/manifest.json"), None);
    }

    #[tokio::test]
    async fn pages_follow_each_other_with_filters_and_no_run_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArchiveStore::from_url(dir.path().to_str().unwrap()).unwrap();
        for i in 0..25u64 {
            let (ns, phase) = if i % 2 == 0 {
                ("team", "succeeded")
            } else {
                ("other", "failed")
            };
            let m = manifest(&format!("{ns}.run{i:02}.ab"), ns, phase, 1_000 + i);
            add(&store, &m).await.unwrap();
            add(&store, &m).await.unwrap();
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = list(&store, &CatalogFilter::default(), after.as_deref(), 10)
                .await
                .unwrap();
            assert!(page.runs.len() <= 10);
            seen.extend(page.runs.iter().map(|e| e.created_ms));
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        let want: Vec<u64> = (1_000..1_025).rev().collect();
        assert_eq!(seen, want, "every run once, newest first");

        let team = CatalogFilter {
            namespace: Some("team".into()),
            ..Default::default()
        };
        let page = list(&store, &team, None, 100).await.unwrap();
        assert_eq!(page.runs.len(), 13);
        assert!(page.runs.iter().all(|e| e.phase == "succeeded"));

        let named = CatalogFilter {
            phase: Some("Failed".into()),
            name: Some("run03".into()),
            ..Default::default()
        };
        let page = list(&store, &named, None, 100).await.unwrap();
        assert_eq!(
            page.runs.iter().map(|e| e.run.as_str()).collect::<Vec<_>>(),
            ["other.run03.ab"]
        );
    }
}
