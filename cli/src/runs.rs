//! `kubectl agentrun list` and `get`: runs as the relay lists them, live and archived
//! (`GET /api/runs`, `GET /api/runs/{run}`); and finding a run by its AgentRun name through
//! that list once the AgentRun is gone.

use crate::{RelayClient, Sent, Target, error_message};
use anyhow::{Context, anyhow, bail};
use clap::{Args, ValueEnum};
use std::io::Write;

/// Runs asked for per page of `list`.
const PAGE: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListFormat {
    /// A table: run, namespace, name, phase, created, where it is read from.
    Table,
    /// The relay's run summaries as JSON (`list`: an array).
    Json,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only runs in this phase: pending, starting, running, paused, succeeded, failed, stopped.
    #[arg(long)]
    pub phase: Option<String>,
    /// Only runs whose id or AgentRun name holds this text.
    #[arg(long)]
    pub name: Option<String>,
    /// At most this many runs (newest first).
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: ListFormat,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// Run id (or AgentRun name).
    pub run: String,
    #[arg(short, long, value_enum, default_value = "table")]
    pub output: ListFormat,
}

/// A GET of the relay's API as JSON; `None` for a 404.
async fn get_json(
    relay: &mut RelayClient,
    url: &reqwest::Url,
) -> anyhow::Result<Option<serde_json::Value>> {
    let resp = match relay.send(|http| http.get(url.clone())).await? {
        Sent::Answer(resp) => resp,
        Sent::Unreachable(e) => bail!("cannot reach the relay at {url}: {e}"),
    };
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !resp.status().is_success() {
        bail!("the relay answered {}", error_message(resp).await);
    }
    Ok(Some(
        resp.json().await.context("reading the relay's answer")?,
    ))
}

fn api_url(base: &str, path: &str) -> anyhow::Result<reqwest::Url> {
    reqwest::Url::parse(&format!("{base}{path}"))
        .with_context(|| format!("relay URL {base} is not valid"))
}

/// Runs of `GET /api/runs` with these filters, following `next`, at most `limit`.
pub async fn list(
    relay: &mut RelayClient,
    base: &str,
    filters: &[(&str, &str)],
    limit: usize,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut runs = Vec::new();
    let mut after: Option<String> = None;
    while runs.len() < limit {
        let mut url = api_url(base, "/api/runs")?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("limit", &PAGE.min(limit - runs.len()).to_string());
            for (k, v) in filters {
                q.append_pair(k, v);
            }
            if let Some(a) = &after {
                q.append_pair("after", a);
            }
        }
        let page = get_json(relay, &url)
            .await?
            .ok_or_else(|| anyhow!("the relay at {base} has no run list (404)"))?;
        if let Some(page_runs) = page["runs"].as_array() {
            runs.extend(page_runs.iter().take(limit - runs.len()).cloned());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    Ok(runs)
}

/// The run `target.run` names: a run id the relay knows, else the newest run whose AgentRun
/// is named so (in `namespace`, when given), found through the relay's list: an AgentRun
/// that was deleted leaves its runs in the archive.
pub async fn find(
    relay: &mut RelayClient,
    target: &Target,
    namespace: Option<&str>,
) -> anyhow::Result<(Target, serde_json::Value)> {
    let url = api_url(&target.base, &format!("/api/runs/{}", target.run))?;
    if let Some(summary) = get_json(relay, &url).await? {
        return Ok((target.clone(), summary));
    }
    let mut filters = vec![("name", target.run.as_str())];
    if let Some(ns) = namespace {
        filters.push(("namespace", ns));
    }
    // Newest first: the first whose AgentRun name is exactly this one.
    let runs = list(relay, &target.base, &filters, 1000).await?;
    let found = runs
        .into_iter()
        .find(|r| r["name"].as_str() == Some(target.run.as_str()));
    let Some(summary) = found else {
        bail!(
            "run {} not found: it is neither a run id nor the AgentRun name of a run{} at the relay {} (live or archived); list runs with `kubectl agentrun list`",
            target.run,
            namespace.map_or(String::new(), |ns| format!(" in namespace {ns}")),
            target.base
        );
    };
    let id = summary["run"].as_str().unwrap_or_default().to_owned();
    eprintln!("AgentRun {} is run {id}", target.run);
    Ok((
        Target {
            base: target.base.clone(),
            run: id,
        },
        summary,
    ))
}

fn when(ms: &serde_json::Value) -> String {
    ms.as_i64()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map_or("-".to_owned(), |t| format!("{t:.0}"))
}

/// Prints runs as a table or JSON (an array; one run alone as itself, for `get`).
pub fn print(
    runs: &[serde_json::Value],
    format: ListFormat,
    out: &mut impl Write,
    one: bool,
) -> anyhow::Result<()> {
    if format == ListFormat::Json {
        match runs {
            [run] if one => serde_json::to_writer_pretty(&mut *out, run)?,
            _ => serde_json::to_writer_pretty(&mut *out, runs)?,
        }
        writeln!(out)?;
        return Ok(());
    }
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let rows: Vec<[String; 6]> = runs
        .iter()
        .map(|r| {
            [
                text(&r["run"]),
                text(&r["namespace"]),
                text(&r["name"]),
                text(&r["phase"]),
                when(&r["created"]),
                if r["archived"].as_bool() == Some(true) {
                    "archive".to_owned()
                } else {
                    "live".to_owned()
                },
            ]
        })
        .collect();
    let header = ["RUN", "NAMESPACE", "NAME", "PHASE", "CREATED", "FROM"].map(str::to_owned);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}
