// Long file: the plugin's commands share one relay client, reconnect loop and printer; lines.rs cuts lines.
//! `kubectl agentrun`: follow and steer agentrun runs through the relay.
//!
//! ```text
//! kubectl agentrun logs RUN [-f] [--variation V] [--channels output,logs] [--from earliest|now|CURSOR] [-o raw|json]
//! kubectl agentrun pause|resume|stop RUN [--variation V]
//! kubectl agentrun open RUN [--browser]
//! kubectl agentrun list [-n NS] [--phase PHASE] [--name TEXT] [--limit N] [-o table|json]
//! kubectl agentrun get RUN [-o table|json]
//! ```
//!
//! `list` and `get` show live runs and runs Redis no longer holds (read from the archive by a
//! relay with `--archive-url`). `logs` and `get` take a run id or an AgentRun name; once the
//! AgentRun is deleted, a name is looked up in the relay's run list (with `--relay-url`).
//!
//! The relay's URL comes from `--relay-url` or `AGENTRUN_RELAY_URL`; without either, the
//! plugin asks `kubectl` for the AgentRun named RUN and uses its `status.url` and
//! `status.runId`. Exit codes of `logs -f`: 0 the run succeeded, 1 it failed, 3 it was
//! stopped, 2 the plugin could not do its job (bad arguments, relay unreachable too long,
//! no token or a refused one).
//!
//! Control commands send an `Idempotency-Key` (random, one per command) and, when the relay
//! cannot be reached or answers 5xx, send the same request again with the same key for up to
//! `CONTROL_RETRY` (the relay applies a key once, so an action whose answer was lost is never
//! applied twice). `logs` says on stderr when the relay resets the history (`event: reset`:
//! Redis lost entries and the run's history was written again) and goes on with it.
//!
//! A relay with authentication gets a bearer token from `--token`, `--token-file` or
//! `AGENTRUN_TOKEN` (in that order). With none of them, when a relay in `--auth kubernetes`
//! mode answers 401, the plugin uses the `token` of the current kubeconfig context's user,
//! if it has one. Tokens are never printed.

pub mod lines;
pub mod runs;

use agentrun_protocol::Envelope;
use agentrun_protocol::RunState;
use agentrun_protocol::sse;
use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use std::io::Write;
use std::time::{Duration, Instant};

/// Exit code when the run succeeded (or for commands that did their job).
pub const EXIT_OK: i32 = 0;
/// Exit code of `logs -f` when the run failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit code for errors of the plugin itself.
pub const EXIT_ERROR: i32 = 2;
/// Exit code of `logs -f` when the run was stopped.
pub const EXIT_STOPPED: i32 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "kubectl-agentrun",
    bin_name = "kubectl agentrun",
    version,
    about = "Follow and steer agentrun runs"
)]
pub struct Cli {
    /// Base URL of the agentrun relay, e.g. http://127.0.0.1:8080 after
    /// `kubectl port-forward svc/agentrun-relay 8080:80`.
    #[arg(long, env = "AGENTRUN_RELAY_URL", global = true)]
    pub relay_url: Option<String>,
    /// Namespace of the AgentRun, when the relay URL is looked up with kubectl.
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Bearer token for the relay: one of its --tokens-file, or with `--auth kubernetes` a
    /// Kubernetes token (e.g. `kubectl create token NAME`). Also AGENTRUN_TOKEN.
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// File holding the bearer token (surrounding whitespace ignored).
    #[arg(long, global = true, conflicts_with = "token")]
    pub token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a run's output (stdout) and logs (stderr); -f follows until the run ends.
    Logs(LogsArgs),
    /// Suspend the run's agents (SIGSTOP).
    Pause(ControlArgs),
    /// Continue paused agents.
    Resume(ControlArgs),
    /// Stop the run's agents (SIGTERM, then SIGKILL after the grace period).
    Stop(ControlArgs),
    /// Print the URL of the run's page in the web UI.
    Open(OpenArgs),
    /// List runs, live and archived, newest first (needs --relay-url or AGENTRUN_RELAY_URL;
    /// -n filters by namespace).
    List(runs::ListArgs),
    /// Show one run, live or archived.
    Get(runs::GetArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Output bytes exactly as the agent wrote them; logs and notices on stderr.
    Raw,
    /// One JSON envelope per line on stdout.
    Json,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Run id (or AgentRun name when the relay URL is looked up with kubectl).
    pub run: String,
    /// Follow until the run ends; the exit code tells whether it succeeded.
    #[arg(short, long)]
    pub follow: bool,
    /// Only this variation (default: all).
    #[arg(long)]
    pub variation: Option<String>,
    /// Channels to show: any of output, logs, status, metrics.
    #[arg(long, value_delimiter = ',', default_value = "output,logs")]
    pub channels: Vec<String>,
    /// Where to start: earliest, now, or a cursor printed by `-o json` (`id`).
    #[arg(long, default_value = "earliest")]
    pub from: String,
    #[arg(short, long, value_enum, default_value = "raw")]
    pub output: OutputFormat,
    /// Give up after the relay has been unreachable this many seconds.
    #[arg(long, default_value_t = 300)]
    pub reconnect_timeout: u64,
    /// Label each line with its variation (`[alpha] ...`), as `kubectl logs --prefix` does.
    #[arg(long)]
    pub prefix: bool,
    /// Start each line with the time its output reached Redis (RFC 3339, UTC).
    #[arg(long)]
    pub timestamps: bool,
    /// Only the last N lines of each variation's history (then follow, with -f).
    #[arg(long, value_name = "N")]
    pub tail: Option<usize>,
    /// Only output newer than this: 30s, 5m, 1h30m...
    #[arg(long, value_name = "DURATION", value_parser = lines::parse_since)]
    pub since: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    pub run: String,
    /// Only this variation (default: all).
    #[arg(long)]
    pub variation: Option<String>,
}

#[derive(Debug, Args)]
pub struct OpenArgs {
    pub run: String,
    /// Also open the page in a browser (xdg-open or open).
    #[arg(long)]
    pub browser: bool,
}

/// Where the relay is and which run id to ask it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub base: String,
    pub run: String,
}

/// Finds the relay and the run id: from the flag/env, or from the AgentRun's status.
pub fn resolve(
    cli_url: Option<&str>,
    namespace: Option<&str>,
    run: &str,
) -> anyhow::Result<Target> {
    if let Some(url) = cli_url.map(str::trim).filter(|u| !u.is_empty()) {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            bail!("relay URL {url:?} must start with http:// or https://");
        }
        return Ok(Target {
            base: url.trim_end_matches('/').to_owned(),
            run: run.to_owned(),
        });
    }
    let mut cmd = std::process::Command::new("kubectl");
    cmd.args(["get", "agentrun", run, "-o", "json"]);
    if let Some(ns) = namespace {
        cmd.args(["-n", ns]);
    }
    let hint = "set --relay-url or AGENTRUN_RELAY_URL (for example `kubectl port-forward svc/agentrun-relay 8080:80` and http://127.0.0.1:8080)";
    let out = cmd
        .output()
        .map_err(|e| anyhow!("no relay URL given and kubectl could not be run ({e}); {hint}"))?;
    if !out.status.success() {
        bail!(
            "no relay URL given and `kubectl get agentrun {run}` failed: {}; {hint}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let obj: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading `kubectl get agentrun -o json`")?;
    let status = &obj["status"];
    let (Some(url), Some(run_id)) = (status["url"].as_str(), status["runId"].as_str()) else {
        bail!(
            "AgentRun {run} has no status.url or status.runId yet (the operator needs --relay-url); {hint}"
        );
    };
    let suffix = format!("/runs/{run_id}");
    let base = url
        .strip_suffix(&suffix)
        .unwrap_or(url)
        .trim_end_matches('/');
    Ok(Target {
        base: base.to_owned(),
        run: run_id.to_owned(),
    })
}

/// The environment variable read when neither `--token` nor `--token-file` is given.
pub const TOKEN_ENV: &str = "AGENTRUN_TOKEN";

/// The bearer token and where it came from (for messages; the token itself is never printed).
#[derive(Clone)]
pub struct Token {
    pub value: String,
    pub source: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(from {})", self.source)
    }
}

/// The token from `--token`, `--token-file` or `AGENTRUN_TOKEN`, in that order.
pub fn token(flag: Option<&str>, file: Option<&std::path::Path>) -> anyhow::Result<Option<Token>> {
    if let Some(t) = flag {
        let t = t.trim();
        if t.is_empty() {
            bail!("--token is empty");
        }
        return Ok(Some(Token {
            value: t.to_owned(),
            source: "--token".into(),
        }));
    }
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --token-file {}", path.display()))?;
        let t = text.trim();
        if t.is_empty() {
            bail!("--token-file {} is empty", path.display());
        }
        return Ok(Some(Token {
            value: t.to_owned(),
            source: format!("--token-file {}", path.display()),
        }));
    }
    Ok(std::env::var(TOKEN_ENV)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .map(|value| Token {
            value,
            source: TOKEN_ENV.into(),
        }))
}

/// The `token` of the current kubeconfig context's user, if it has one. The kubeconfig is
/// `KUBECONFIG` (its files merged as kubectl does: the first value found wins) or
/// `~/.kube/config`.
pub fn kubeconfig_token() -> Option<String> {
    let paths: Vec<std::path::PathBuf> = match std::env::var_os("KUBECONFIG") {
        Some(v) if !v.is_empty() => std::env::split_paths(&v).collect(),
        _ => vec![std::path::PathBuf::from(std::env::var_os("HOME")?).join(".kube/config")],
    };
    let docs: Vec<serde_yaml::Value> = paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|t| serde_yaml::from_str(&t).ok())
        .collect();
    let current = docs
        .iter()
        .find_map(|d| d["current-context"].as_str().filter(|s| !s.is_empty()))?;
    let named = |list: &str, name: &str| {
        docs.iter().find_map(|d| {
            d[list]
                .as_sequence()?
                .iter()
                .find(|e| e["name"].as_str() == Some(name))
                .cloned()
        })
    };
    let context = named("contexts", current)?;
    let user = named("users", context["context"]["user"].as_str()?)?;
    user["user"]["token"]
        .as_str()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// The relay's HTTP API with the caller's token.
pub struct RelayClient {
    http: reqwest::Client,
    base: String,
    token: Option<Token>,
    tried_kubeconfig: bool,
}

/// What a request got.
pub enum Sent {
    /// An answer other than 401.
    Answer(reqwest::Response),
    /// No answer (connection refused, reset, timed out).
    Unreachable(reqwest::Error),
}

impl RelayClient {
    pub fn new(base: &str, token: Option<Token>) -> anyhow::Result<Self> {
        Ok(Self {
            http: http()?,
            base: base.to_owned(),
            token,
            tried_kubeconfig: false,
        })
    }

    /// Sends the request built by `build` with the token. A `401` is an error that says how
    /// to pass a token (or that the one given was refused); without a token, a relay in
    /// Kubernetes mode is asked again with the kubeconfig's token, when there is one.
    pub async fn send(
        &mut self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> anyhow::Result<Sent> {
        loop {
            let mut req = build(&self.http);
            if let Some(t) = &self.token {
                req = req.bearer_auth(&t.value);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => return Ok(Sent::Unreachable(e)),
            };
            if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
                return Ok(Sent::Answer(resp));
            }
            let body = resp.text().await.unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let why = v["error"].as_str().unwrap_or(body.trim()).to_owned();
            if self.token.is_none() && !self.tried_kubeconfig && v["auth"] == "kubernetes" {
                self.tried_kubeconfig = true;
                if let Some(value) = kubeconfig_token() {
                    self.token = Some(Token {
                        value,
                        source: "the current kubeconfig context".into(),
                    });
                    continue;
                }
            }
            return Err(match &self.token {
                None => anyhow!(
                    "the relay at {} requires a token (401: {why}); pass --token TOKEN or --token-file FILE, or set {TOKEN_ENV} (a token of the relay's --tokens-file; with --auth kubernetes, a Kubernetes token, e.g. `kubectl create token NAME`)",
                    self.base
                ),
                Some(t) => anyhow!(
                    "the relay at {} did not accept the token from {} (401: {why}); check --token, --token-file or {TOKEN_ENV}",
                    self.base,
                    t.source
                ),
            });
        }
    }
}

/// Runs the command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let tok = token(cli.token.as_deref(), cli.token_file.as_deref())?;
    let run_arg = match &cli.command {
        Command::Logs(a) => a.run.as_str(),
        Command::Pause(a) | Command::Resume(a) | Command::Stop(a) => a.run.as_str(),
        Command::Open(a) => a.run.as_str(),
        Command::Get(a) => a.run.as_str(),
        Command::List(args) => {
            let Some(base) = cli
                .relay_url
                .as_deref()
                .map(str::trim)
                .filter(|u| !u.is_empty())
            else {
                bail!(
                    "list needs the relay's URL: set --relay-url or AGENTRUN_RELAY_URL (for example `kubectl port-forward svc/agentrun-relay 8080:80` and http://127.0.0.1:8080)"
                );
            };
            let target = resolve(Some(base), None, "")?;
            let mut relay = RelayClient::new(&target.base, tok)?;
            let mut filters = Vec::new();
            if let Some(ns) = &cli.namespace {
                filters.push(("namespace", ns.as_str()));
            }
            if let Some(p) = &args.phase {
                filters.push(("phase", p.as_str()));
            }
            if let Some(n) = &args.name {
                filters.push(("name", n.as_str()));
            }
            let found = runs::list(&mut relay, &target.base, &filters, args.limit).await?;
            runs::print(&found, args.output, &mut std::io::stdout().lock(), false)?;
            return Ok(EXIT_OK);
        }
    };
    let given_url = cli.relay_url.is_some();
    let mut target = resolve(cli.relay_url.as_deref(), cli.namespace.as_deref(), run_arg)?;
    let mut relay = RelayClient::new(&target.base, tok)?;
    // With the relay's URL given, RUN may be an AgentRun name (its object gone, the run archived).
    let mut summary = None;
    if given_url && matches!(cli.command, Command::Logs(_) | Command::Get(_)) {
        let (found, s) = runs::find(&mut relay, &target, cli.namespace.as_deref()).await?;
        target = found;
        summary = Some(s);
    }
    match &cli.command {
        Command::Get(a) => {
            let summary = match summary {
                Some(s) => s,
                None => runs::find(&mut relay, &target, None).await?.1,
            };
            runs::print(&[summary], a.output, &mut std::io::stdout().lock(), true)?;
            Ok(EXIT_OK)
        }
        Command::List(_) => Ok(EXIT_OK),
        Command::Logs(args) => logs(&mut relay, &target, args).await,
        Command::Pause(a) => control(&mut relay, &target, "pause", a).await,
        Command::Resume(a) => control(&mut relay, &target, "resume", a).await,
        Command::Stop(a) => control(&mut relay, &target, "stop", a).await,
        Command::Open(a) => {
            let url = format!("{}/runs/{}", target.base, target.run);
            println!("{url}");
            if a.browser {
                let opener = if cfg!(target_os = "macos") {
                    "open"
                } else {
                    "xdg-open"
                };
                if let Err(e) = std::process::Command::new(opener).arg(&url).spawn() {
                    eprintln!(
                        "kubectl-agentrun: could not start {opener} ({e}); open the URL above"
                    );
                }
            }
            Ok(EXIT_OK)
        }
    }
}

fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")
}

pub(crate) async fn error_message(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let msg = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or(body);
    format!("{status}: {}", msg.trim())
}

/// How long a control command keeps retrying while the relay is unreachable or answers 5xx.
pub const CONTROL_RETRY: Duration = Duration::from_secs(30);

async fn control(
    relay: &mut RelayClient,
    target: &Target,
    action: &str,
    args: &ControlArgs,
) -> anyhow::Result<i32> {
    let body = serde_json::json!({ "action": action, "variation": args.variation });
    let url = format!("{}/api/runs/{}/control", target.base, target.run);
    // One key for this action, the same on every retry: the relay applies it once.
    let key = format!("{:032x}", rand::random::<u128>());
    let deadline = Instant::now() + CONTROL_RETRY;
    let mut delay = Duration::from_millis(200);
    let resp = loop {
        let sent = relay
            .send(|http| http.post(&url).header("idempotency-key", &key).json(&body))
            .await?;
        let why = match sent {
            Sent::Answer(resp) if !resp.status().is_server_error() => break resp,
            Sent::Answer(resp) => error_message(resp).await,
            Sent::Unreachable(e) => format!("cannot reach the relay at {}: {e}", target.base),
        };
        if Instant::now() + delay > deadline {
            bail!(
                "{action} was not confirmed ({why}); it may or may not have been applied, retry the command"
            );
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    };
    if !resp.status().is_success() {
        bail!("the relay refused {action}: {}", error_message(resp).await);
    }
    let scope = args
        .variation
        .as_deref()
        .map_or("all variations".to_owned(), |v| format!("variation {v}"));
    eprintln!("{action} sent to run {} ({scope})", target.run);
    Ok(EXIT_OK)
}

enum Outcome {
    /// `end` received.
    End(sse::End),
    /// The connection ended without `end` (relay restart, network): resume.
    Disconnected { got_events: bool },
}

struct Printer {
    format: OutputFormat,
    lines: lines::LineWriter,
}

impl Printer {
    fn entry(&mut self, ev: &sse::Event) -> anyhow::Result<()> {
        let env: Envelope = serde_json::from_str(&ev.data).with_context(|| {
            format!(
                "the relay sent a {} event that is not an envelope",
                ev.event
            )
        })?;
        if !self.lines.wanted(env.ts) {
            return Ok(());
        }
        if self.format == OutputFormat::Json {
            let mut v = serde_json::to_value(&env)?;
            v["id"] = serde_json::Value::from(ev.id.clone());
            let mut out = std::io::stdout().lock();
            writeln!(out, "{v}")?;
            return Ok(());
        }
        let bytes = env
            .content_bytes()
            .context("the relay sent base64 content that does not decode")?;
        let sink = match ev.event.as_str() {
            "output" => Some(lines::Sink::Stdout),
            "logs" => Some(lines::Sink::Stderr),
            _ => None,
        };
        if let Some(sink) = sink.filter(|_| !self.lines.passthrough()) {
            let variation = env.variation.as_deref().unwrap_or("run");
            let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
            self.lines
                .write(variation, sink, env.ts, &bytes, &mut out, &mut err)?;
            return Ok(());
        }
        match ev.event.as_str() {
            "output" => std::io::stdout().lock().write_all(&bytes)?,
            "logs" => std::io::stderr().lock().write_all(&bytes)?,
            "status" => {
                let s: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
                let mut line = format!(
                    "agentrun: {} {}",
                    s["variation"]
                        .as_str()
                        .or(env.variation.as_deref())
                        .unwrap_or("run"),
                    s["state"].as_str().unwrap_or("?")
                );
                if let Some(r) = s["reason"].as_str() {
                    line.push_str(&format!(" ({r})"));
                }
                if let Some(m) = s["message"].as_str() {
                    line.push_str(&format!(": {m}"));
                }
                if let Some(c) = s["exitCode"].as_i64() {
                    line.push_str(&format!(" exit code {c}"));
                }
                eprintln!("{line}");
            }
            "gap" => eprintln!(
                "agentrun: {} of {} were dropped here before reaching Redis ({})",
                env.channel,
                env.variation.as_deref().unwrap_or("the run"),
                env.meta
            ),
            _ => {}
        }
        Ok(())
    }

    fn notice(&mut self, ev: &sse::Event) -> anyhow::Result<()> {
        let v: serde_json::Value = serde_json::from_str(&ev.data).unwrap_or_default();
        if self.format == OutputFormat::Json {
            let mut v = v;
            v["event"] = serde_json::Value::from(ev.event.clone());
            v["id"] = serde_json::Value::from(ev.id.clone());
            writeln!(std::io::stdout().lock(), "{v}")?;
        } else if let Some(reset) = ev.parse::<sse::Reset>() {
            let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
            self.lines.reset(&mut out, &mut err)?;
            out.flush()?;
            drop((out, err));
            eprintln!(
                "agentrun: the run's history was reset ({}): {}; what follows is the run's history from its first entry again",
                reset.reason, reset.message
            );
        } else if let Some(t) = ev.parse::<sse::Trimmed>() {
            eprintln!(
                "agentrun: {} entries of {}{} were trimmed from history before they could be shown (from seq {} on only)",
                t.missed,
                t.channel,
                t.variation.map(|s| format!(" of {s}")).unwrap_or_default(),
                t.first_available
            );
        }
        Ok(())
    }
}

async fn read_stream(
    resp: reqwest::Response,
    printer: &mut Printer,
    last_id: &mut Option<String>,
) -> anyhow::Result<Outcome> {
    let mut parser = sse::Parser::default();
    let mut body = resp.bytes_stream();
    let mut got_events = false;
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { break };
        parser.push(&chunk);
        while let Some(ev) = parser.next_event() {
            got_events = true;
            match ev.event.as_str() {
                "output" | "logs" | "status" | "metrics" | "gap" => printer.entry(&ev)?,
                <sse::Trimmed as sse::ServerEvent>::NAME
                | <sse::Reset as sse::ServerEvent>::NAME => printer.notice(&ev)?,
                <sse::End as sse::ServerEvent>::NAME => {
                    if let Some(id) = &ev.id {
                        *last_id = Some(id.clone());
                    }
                    if printer.format == OutputFormat::Json {
                        printer.notice(&ev)?;
                    }
                    let end = ev.parse::<sse::End>().ok_or_else(|| {
                        anyhow!(
                            "the relay sent an `end` event this plugin cannot read: {}",
                            ev.data
                        )
                    })?;
                    return Ok(Outcome::End(end));
                }
                // `open`, `shutdown` and future events only move the cursor.
                _ => {}
            }
            if let Some(id) = &ev.id {
                *last_id = Some(id.clone());
            }
        }
        std::io::stdout().flush()?;
    }
    std::io::stdout().flush()?;
    Ok(Outcome::Disconnected { got_events })
}

async fn logs(relay: &mut RelayClient, target: &Target, args: &LogsArgs) -> anyhow::Result<i32> {
    let since_ms = args.since.map(|d| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        u64::try_from(now.saturating_sub(d).as_millis()).unwrap_or(u64::MAX)
    });
    let mut printer = Printer {
        format: args.output,
        lines: lines::LineWriter::new(lines::LineOptions {
            prefix: args.prefix,
            timestamps: args.timestamps,
            tail: args.tail,
            since_ms,
        }),
    };
    // With --tail, the history up to now is read first (to keep its last lines), then, with
    // --follow, the rest is followed from where it ended.
    let mut reading_history = args.tail.is_some();
    let mut last_id: Option<String> = None;
    let mut failing_since: Option<Instant> = None;
    let mut delay = Duration::from_millis(100);
    loop {
        let mut url =
            reqwest::Url::parse(&format!("{}/api/runs/{}/events", target.base, target.run))
                .with_context(|| format!("relay URL {} is not valid", target.base))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("channels", &args.channels.join(","));
            if let Some(v) = &args.variation {
                q.append_pair("variation", v);
            }
            if !args.follow || reading_history {
                q.append_pair("follow", "false");
            }
            match &last_id {
                Some(id) => q.append_pair("from", id),
                None => q.append_pair("from", &args.from),
            };
        }
        let sent = relay
            .send(|http| http.get(url.clone()).header("accept", "text/event-stream"))
            .await?;
        let outcome = match sent {
            Sent::Answer(resp) if resp.status().is_success() => {
                read_stream(resp, &mut printer, &mut last_id).await?
            }
            Sent::Answer(resp) if resp.status().is_client_error() => {
                bail!("{}", error_message(resp).await);
            }
            Sent::Answer(_) | Sent::Unreachable(_) => Outcome::Disconnected { got_events: false },
        };
        match outcome {
            Outcome::End(sse::End {
                phase, finished, ..
            }) => {
                let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
                if reading_history {
                    reading_history = false;
                    printer.lines.end_tail(&mut out, &mut err)?;
                    if args.follow && !finished {
                        continue;
                    }
                }
                printer.lines.finish(&mut out, &mut err)?;
                out.flush()?;
                if !args.follow {
                    return Ok(EXIT_OK);
                }
                return Ok(match phase {
                    Some(RunState::Succeeded) => EXIT_OK,
                    Some(RunState::Stopped) => EXIT_STOPPED,
                    _ => EXIT_FAILED,
                });
            }
            Outcome::Disconnected { got_events } => {
                if got_events {
                    failing_since = None;
                    delay = Duration::from_millis(100);
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(args.reconnect_timeout) {
                    bail!(
                        "the relay at {} has been unreachable for {} s; check it and retry with --from {}",
                        target.base,
                        args.reconnect_timeout,
                        last_id.as_deref().unwrap_or("earliest")
                    );
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
