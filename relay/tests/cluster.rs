//! The relay on a real Redis Cluster (3 masters, 3 replicas): runs on every master stream
//! byte-exact through two relays, and viewers that follow a run while its slot's master fails
//! over (`CLUSTER FAILOVER`, or a SIGKILL and the cluster's own failover), while its slot
//! migrates to another master, or while the relay they watch through is killed, get every
//! entry once, in order; and a cluster that speaks only TLS is reached by the addresses its
//! nodes announce (see docs/scaling.md).

mod support;

use agentrun_protocol::publish::{Batch, Expected};
use agentrun_protocol::testing::{RedisCluster, TlsFiles, wait_for};
use agentrun_protocol::{
    EntryType, NewEntry, PublishOptions, Publisher, RedisConn, RunId, RunState, StreamName,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

/// A run id no other test uses.
fn fresh_run(tag: &str) -> RunId {
    run_id(&format!("{tag}-{:08x}", rand::random::<u32>()))
}

/// A producer that announces with `SPUBLISH`, as every component does on a cluster.
fn cluster_producer(id: &str) -> Producer {
    Producer::with_options(
        id,
        PublishOptions {
            publish_command: "SPUBLISH",
            ..Default::default()
        },
    )
}

/// What one viewer received of a run's output stream.
#[derive(Default, Debug)]
struct Followed {
    /// `seq` of each output entry, in arrival order (since the last `reset`).
    seqs: Vec<u64>,
    /// Their bytes, concatenated.
    content: Vec<u8>,
    /// `reset` events (the stream's history was rewritten: start over).
    resets: usize,
    /// Other events that are not entries, `open` or `status`.
    notices: Vec<String>,
    /// The id of the last event, to resume from.
    last_id: Option<String>,
    ended: bool,
}

impl Followed {
    /// Every entry once, in order: seqs 1, 2, 3...
    fn assert_in_order_once(&self, who: &str) {
        let expected: Vec<u64> = (1..=self.seqs.len() as u64).collect();
        if self.seqs != expected {
            let dup = self.seqs.len() - {
                let mut s = self.seqs.clone();
                s.sort_unstable();
                s.dedup();
                s.len()
            };
            panic!(
                "{who}: entries not once each in order ({} received, {dup} duplicated, first seqs {:?})",
                self.seqs.len(),
                &self.seqs[..self.seqs.len().min(20)]
            );
        }
    }
}

/// The bytes of an `output` event's data (text, or base64 for binary content).
fn content_of(j: &serde_json::Value) -> Vec<u8> {
    use base64::Engine;
    let text = j["content"].as_str().expect("content");
    if j["encoding"] == "base64" {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .expect("base64 content")
    } else {
        text.as_bytes().to_vec()
    }
}

/// Connects a viewer to `url` (from `followed.last_id`, if any), waits for `open` (the relay
/// has subscribed the run by then), and records what it receives into `followed` until the
/// run ends or the connection drops.
async fn follow(url: String, followed: Arc<Mutex<Followed>>) -> tokio::task::JoinHandle<()> {
    let last_id = followed.lock().unwrap().last_id.clone();
    let mut sse = SseClient::connect(&url, last_id.as_deref()).await;
    let open = sse.expect("open").await;
    assert_eq!(open.event, "open", "{url}");
    tokio::spawn(async move {
        while let Some(ev) = sse.next().await {
            let mut f = followed.lock().unwrap();
            if ev.id.is_some() {
                f.last_id = ev.id.clone();
            }
            match ev.event.as_str() {
                "output" => {
                    let j = ev.json();
                    f.seqs.push(j["seq"].as_u64().expect("seq"));
                    f.content.extend(content_of(&j));
                }
                "reset" => {
                    f.resets += 1;
                    f.seqs.clear();
                    f.content.clear();
                }
                "end" => {
                    f.ended = true;
                    return;
                }
                "status" | "open" => {}
                other => f.notices.push(format!("{other}: {}", ev.data)),
            }
        }
    })
}

/// Waits until every viewer received `want` exactly, while the run is live (before it ends):
/// the entries came live or by a resync, not from the replay at the end.
async fn wait_until_all_received(viewers: &[(String, Arc<Mutex<Followed>>)], want: &[u8]) {
    for (who, followed) in viewers {
        wait_for(
            &format!("{who} to receive every entry while the run is live"),
            Duration::from_secs(60),
            || {
                let f = followed.clone();
                async move {
                    let f = f.lock().unwrap();
                    assert!(!f.ended, "{who}: the run ended early");
                    (f.content.len() >= want.len()).then_some(())
                }
            },
        )
        .await;
        let f = followed.lock().unwrap();
        f.assert_in_order_once(who);
        assert!(
            f.content == want,
            "{who}: received {} bytes that differ from the {} published",
            f.content.len(),
            want.len()
        );
        assert_eq!(f.resets, 0, "{who}: no reset");
        assert!(f.notices.is_empty(), "{who}: {:?}", f.notices);
    }
}

/// Publishes `count` lines (`line N\n`) on output `a` of `run`, one entry per call, as a
/// sidecar does: after an error (a failover or a migration in progress) it sends the same
/// entry again (same producer sequence, which the publish function deduplicates), and it tells
/// the function the stream's top and epoch at its last acknowledgement, so that a stream
/// that lost acknowledged entries (a killed master that had not replicated them) gets a new
/// epoch. `published` counts the lines acknowledged. Returns the lines acknowledged in each
/// epoch that ended by a rewind (Redis lost some of them).
fn stream_lines(
    mut conn: RedisConn,
    run: RunId,
    count: Arc<AtomicU64>,
    published: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let publisher = Publisher::new(PublishOptions {
            publish_command: "SPUBLISH",
            ..Default::default()
        });
        let stream = StreamName::Output(var("a"));
        let mut expected = Expected::default();
        let mut rewinds = 0;
        let mut pseq = 0;
        while pseq < count.load(Ordering::SeqCst) {
            pseq += 1;
            let entry = NewEntry::now(
                pseq,
                EntryType::Output,
                format!("line {pseq}\n").into_bytes(),
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            let outcome = loop {
                let batch = Batch {
                    stream: &stream,
                    producer: "lines",
                    entries: std::slice::from_ref(&entry),
                };
                match publisher
                    .publish_many_checked(&mut conn, &run, &[batch], &[expected])
                    .await
                {
                    Ok(mut outcomes) => break outcomes.remove(0),
                    Err(e) => {
                        assert!(Instant::now() < deadline, "line {pseq} not published: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            };
            if outcome.rewound {
                rewinds += 1;
            }
            expected = Expected {
                top: outcome.last_seq,
                epoch: outcome.epoch,
            };
            published.store(pseq, Ordering::SeqCst);
            // A line every 2 ms or so: the run streams while the cluster changes.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        rewinds
    })
}

fn lines_text(count: u64) -> Vec<u8> {
    (1..=count)
        .flat_map(|i| format!("line {i}\n").into_bytes())
        .collect()
}

/// Waits until at least `n` lines are acknowledged.
async fn published_at_least(published: &Arc<AtomicU64>, n: u64) {
    wait_for("the producer to publish", Duration::from_secs(60), || {
        let p = published.clone();
        async move { (p.load(Ordering::SeqCst) >= n).then_some(()) }
    })
    .await;
}

/// A run streaming while viewers follow it.
struct Streaming {
    viewers: Vec<(String, Arc<Mutex<Followed>>)>,
    /// Lines acknowledged so far.
    published: Arc<AtomicU64>,
    /// How many lines the producer publishes in all (none given: until told).
    count: Arc<AtomicU64>,
    /// Ends when every line is published; returns how many epochs lost entries started.
    producer: tokio::task::JoinHandle<u64>,
}

impl Streaming {
    /// Tells the producer to stop `more` lines after what it has published (so that the run
    /// streams across the cluster change however long that takes); returns the lines in all.
    fn stop_after(&self, more: u64) -> u64 {
        let count = self.published.load(Ordering::SeqCst) + more;
        self.count.store(count, Ordering::SeqCst);
        count
    }
}

/// A cluster with agentrun's library, two relays on it, a run registered with variation `a`,
/// and a viewer of the run's output on each relay.
struct Setup {
    cluster: RedisCluster,
    conn: RedisConn,
    relays: Vec<Relay>,
    run: RunId,
    slot: u16,
}

impl Setup {
    async fn new(tag: &str) -> Self {
        let cluster = RedisCluster::start(3, 1).await;
        cluster.load_library().await;
        let url = cluster.url();
        let relays = vec![Relay::start(&url).await, Relay::start(&url).await];
        let mut conn = cluster.settings().connect().await.unwrap();
        let run = fresh_run(tag);
        register(&mut conn, &run, &["a"]).await;
        let slot = agentrun_protocol::topology::key_slot(run.state_key().as_bytes());
        Setup {
            cluster,
            conn,
            relays,
            run,
            slot,
        }
    }

    /// Every relay subscribed the run's channels again (where its slot is now) at least once.
    async fn assert_every_relay_resubscribed(&self) {
        for (i, relay) in self.relays.iter().enumerate() {
            let n = relay_metric(&relay.base, "agentrun_relay_resubscribed_runs_total").await;
            assert!(n >= 1, "relay {} resubscribed the run {n} times", i + 1);
        }
    }

    /// A viewer on each relay, then a producer of `count` lines; returns once 200 are
    /// published, the run streaming on.
    async fn stream_while_viewers_follow(&self) -> Streaming {
        let viewers = self.viewers().await;
        let published = Arc::new(AtomicU64::new(0));
        let count = Arc::new(AtomicU64::new(u64::MAX));
        let producer = stream_lines(
            self.conn.clone(),
            self.run.clone(),
            count.clone(),
            published.clone(),
        );
        published_at_least(&published, 200).await;
        Streaming {
            viewers,
            published,
            count,
            producer,
        }
    }

    /// One viewer of the run's output on each relay.
    async fn viewers(&self) -> Vec<(String, Arc<Mutex<Followed>>)> {
        let mut viewers = Vec::new();
        for (i, relay) in self.relays.iter().enumerate() {
            let followed = Arc::new(Mutex::new(Followed::default()));
            follow(
                relay.events_url(self.run.as_str(), "channels=output,status&variation=a"),
                followed.clone(),
            )
            .await;
            viewers.push((format!("viewer on relay {}", i + 1), followed));
        }
        viewers
    }
}

/// A cluster that speaks only TLS, to clients and on its bus: the relay and the producer
/// reach each master at the address `CLUSTER SLOTS` announces (`127.0.0.1`), checked against
/// the names in the nodes' certificate, and runs in every slot stream through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_stream_from_a_cluster_that_speaks_only_tls() {
    let tls = TlsFiles::generate();
    let cluster = RedisCluster::start_tls(3, &tls).await;
    let mut conn = cluster.tls_settings(&tls).connect().await.unwrap();
    let mut config = agentrun_relay::Config::for_redis(cluster.url().replacen(
        "redis+cluster://",
        "rediss+cluster://",
        1,
    ));
    config.redis.ca_file = Some(tls.ca.clone());
    let relay = Relay::start_with(config, "127.0.0.1:0").await;
    // Nine runs: their slots are spread over the three masters.
    let mut viewers = Vec::new();
    let mut wanted = Vec::new();
    for i in 0..9u64 {
        let run = fresh_run("tls");
        register(&mut conn, &run, &["a"]).await;
        let followed = Arc::new(Mutex::new(Followed::default()));
        follow(
            relay.events_url(run.as_str(), "channels=output&variation=a"),
            followed.clone(),
        )
        .await;
        viewers.push((run.to_string(), followed));
        let lines = tagged_lines(1..=20 + i, run.as_str());
        cluster_producer("tls")
            .output(&mut conn, &run, "a", &lines)
            .await;
        wanted.push(lines.concat().into_bytes());
    }
    for (viewer, want) in viewers.iter().zip(&wanted) {
        wait_until_all_received(std::slice::from_ref(viewer), want).await;
    }
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_every_master_stream_byte_exact_through_two_relays() {
    let cluster = RedisCluster::start(3, 1).await;
    let masters = cluster.load_library().await;
    let runs = cluster.a_run_on_every_master(|| fresh_run("every")).await;
    assert_eq!(runs.keys().copied().collect::<Vec<_>>(), masters);
    let url = cluster.url();
    let relays = [Relay::start(&url).await, Relay::start(&url).await];
    let mut conn = cluster.settings().connect().await.unwrap();

    let mut viewers = Vec::new();
    for run in runs.values() {
        register(&mut conn, run, &["a"]).await;
        for (i, relay) in relays.iter().enumerate() {
            let followed = Arc::new(Mutex::new(Followed::default()));
            follow(
                relay.events_url(run.as_str(), "channels=output,status&variation=a"),
                followed.clone(),
            )
            .await;
            viewers.push((run.clone(), format!("{run} on relay {}", i + 1), followed));
        }
    }
    // Each relay subscribed the channels of the three runs, each on its own master.
    for relay in &relays {
        assert!(relay.state.hub().subscribed_channels().await >= 3 * 4);
    }

    // Binary chunks of every byte value and size, live.
    let mut wanted = std::collections::HashMap::new();
    for (i, run) in runs.values().enumerate() {
        let chunks: Vec<Vec<u8>> = (0..120u32)
            .map(|j| {
                let len = [1usize, 7, 100, 1000, 4096][(j as usize) % 5];
                (0..len as u32)
                    .map(|k| (k.wrapping_mul(2_654_435_761) ^ (j << 3) ^ i as u32) as u8)
                    .collect()
            })
            .collect();
        let mut p = cluster_producer("bytes");
        for batch in chunks.chunks(8) {
            p.publish(
                &mut conn,
                run,
                &StreamName::Output(var("a")),
                EntryType::Output,
                batch,
            )
            .await
            .unwrap();
        }
        wanted.insert(run.clone(), chunks.concat());
    }
    for (run, who, followed) in &viewers {
        wait_until_all_received(&[(who.clone(), followed.clone())], &wanted[run]).await;
    }

    // The run list, read from every master, names the three runs on both relays.
    for relay in &relays {
        let list = run_list(&relay.base).await;
        for run in runs.values() {
            assert!(
                list["runs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["run"] == run.as_str()),
                "{run} in {list}"
            );
        }
    }
    // The runs end; each viewer is told.
    for run in runs.values() {
        let mut p = cluster_producer("ender");
        finish(&mut conn, &mut p, run, "a", RunState::Succeeded).await;
    }
    for (_, who, followed) in &viewers {
        wait_for(&format!("{who} to see the end"), WAIT, || {
            let f = followed.clone();
            async move { f.lock().unwrap().ended.then_some(()) }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_while_viewers_follow_loses_and_duplicates_nothing() {
    let s = Setup::new("failover").await;
    let (old_master, replica) = s.cluster.master_and_synced_replica(s.slot).await;
    // The producer streams until told to stop, 300 lines after the failover.
    let st = s.stream_while_viewers_follow().await;
    let started = Instant::now();
    s.cluster.fail_over_to(replica, s.slot).await;
    let took = started.elapsed();
    let at_takeover = st.published.load(Ordering::SeqCst);
    let count = st.stop_after(300);

    assert_eq!(
        st.producer.await.unwrap(),
        0,
        "a graceful failover loses nothing"
    );
    wait_until_all_received(&st.viewers, &lines_text(count)).await;
    s.assert_every_relay_resubscribed().await;
    eprintln!(
        "CLUSTER FAILOVER of {old_master} to {replica} took {took:?}, {at_takeover} lines in; {count} lines to 2 viewers through 2 relays, 0 lost, 0 duplicated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_while_viewers_follow_loses_and_duplicates_nothing() {
    let s = Setup::new("migrate").await;
    let from = s.cluster.master_and_synced_replica(s.slot).await.0;
    let to = *s
        .cluster
        .masters()
        .await
        .iter()
        .find(|&&m| m != from)
        .unwrap();
    let st = s.stream_while_viewers_follow().await;
    let started = Instant::now();
    // The run's keys move in one `MIGRATE` (a function over several keys cannot run while
    // they are split between two nodes: Redis answers TRYAGAIN). Then, before the slot is
    // handed over, the run streams on: the old master answers `ASK`, and the publish runs on
    // the new one, whose announcements the relays, still subscribed on the old one, do not
    // hear until the hand-over ends their subscriptions.
    s.cluster
        .migrate_slot(s.slot, to, 100, || {
            let published = st.published.clone();
            async move {
                let now = published.load(Ordering::SeqCst);
                published_at_least(&published, now + 20).await;
            }
        })
        .await;
    let took = started.elapsed();
    let count = st.stop_after(300);

    assert_eq!(st.producer.await.unwrap(), 0, "a migration loses nothing");
    wait_until_all_received(&st.viewers, &lines_text(count)).await;
    s.assert_every_relay_resubscribed().await;
    // The stream lives on the new master now.
    let mut direct = agentrun_protocol::testing::direct(to).await.unwrap();
    let top =
        agentrun_protocol::replay::last_seq(&mut direct, &StreamName::Output(var("a")).key(&s.run))
            .await
            .unwrap();
    assert_eq!(top, count);
    eprintln!(
        "slot {} moved from {from} to {to} in {took:?} while the run streamed; {count} lines to 2 viewers through 2 relays, 0 lost, 0 duplicated",
        s.slot
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_while_viewers_follow_loses_nothing_but_what_redis_lost_and_says_so() {
    let mut s = Setup::new("kill").await;
    let st = s.stream_while_viewers_follow().await;
    let started = Instant::now();
    let (old, new) = s.cluster.kill_master_of(s.slot).await;
    let took = started.elapsed();
    let at_takeover = st.published.load(Ordering::SeqCst);
    let count = st.stop_after(300);
    let rewinds = st.producer.await.unwrap();

    // What the stream holds now (on the promoted replica) is what every viewer must have,
    // exactly; lines the dead master acknowledged and never replicated are the gap, counted.
    let key = StreamName::Output(var("a")).key(&s.run);
    let mut conn = s.conn.clone();
    let stored: Vec<u8> = agentrun_protocol::replay::read_page(&mut conn, &key, 0, 100_000)
        .await
        .unwrap()
        .entries
        .iter()
        .flat_map(|e| e.content.to_vec())
        .collect();
    let text = String::from_utf8(stored.clone()).unwrap();
    let numbers: Vec<u64> = text
        .lines()
        .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
        .collect();
    let mut sorted = numbers.clone();
    sorted.dedup();
    assert_eq!(sorted, numbers, "no line twice in the stream");
    assert!(numbers.windows(2).all(|w| w[0] < w[1]), "lines in order");
    let gap = count - numbers.len() as u64;
    for (who, followed) in &st.viewers {
        wait_for(
            &format!("{who} to receive what the stream holds"),
            Duration::from_secs(60),
            || {
                let f = followed.clone();
                let len = stored.len();
                async move { (f.lock().unwrap().content.len() >= len).then_some(()) }
            },
        )
        .await;
        let f = followed.lock().unwrap();
        f.assert_in_order_once(who);
        assert!(
            f.content == stored,
            "{who}: what it received differs from the stream"
        );
        assert_eq!(
            f.resets as u64, rewinds,
            "{who}: one reset per epoch the lost entries started"
        );
    }
    s.assert_every_relay_resubscribed().await;
    eprintln!(
        "SIGKILL of master {old}, replica {new} promoted after {took:?}, {at_takeover} lines in: {} lines in the stream, gap of {gap} (acknowledged by the dead master, never replicated), {rewinds} new epoch(s); both viewers hold the stream exactly, 0 duplicated",
        numbers.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_of_a_killed_relay_resume_exactly_on_the_other_one() {
    let cluster = RedisCluster::start(3, 1).await;
    cluster.load_library().await;
    let url = cluster.url();
    let args = ["--redis-url", url.as_str(), "--listen", "127.0.0.1:0"];
    let first = RelayProcess::start(&args, &[], "info");
    let second = RelayProcess::start(&args, &[], "info");
    let mut conn = cluster.settings().connect().await.unwrap();
    let run = fresh_run("relaykill");
    register(&mut conn, &run, &["a"]).await;
    let events =
        |base: &str| format!("{base}/api/runs/{run}/events?channels=output,status&variation=a");

    let count = 1500;
    let viewers: Vec<Arc<Mutex<Followed>>> = (0..3).map(|_| Default::default()).collect();
    for v in &viewers {
        follow(events(&first.base), v.clone()).await;
    }
    let published = Arc::new(AtomicU64::new(0));
    let producer = stream_lines(
        conn.clone(),
        run.clone(),
        Arc::new(AtomicU64::new(count)),
        published.clone(),
    );
    wait_for("the viewers to receive 300 lines", WAIT, || {
        let viewers = viewers.clone();
        async move {
            viewers
                .iter()
                .all(|v| v.lock().unwrap().seqs.len() >= 300)
                .then_some(())
        }
    })
    .await;

    // SIGKILL: the viewers' connections drop mid-stream; they reconnect to the other relay
    // with the id of the last event they received.
    let log = first.stop();
    assert!(log.contains("agentrun-relay serving"), "{log}");
    let mut resumed_at = Vec::new();
    for v in &viewers {
        resumed_at.push(v.lock().unwrap().seqs.len());
        follow(events(&second.base), v.clone()).await;
    }
    assert_eq!(producer.await.unwrap(), 0);
    wait_until_all_received(
        &viewers
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("viewer {i}"), v.clone()))
            .collect::<Vec<_>>(),
        &lines_text(count),
    )
    .await;
    drop(second);
    eprintln!(
        "relay killed while 3 viewers followed (at lines {resumed_at:?}); they resumed on the other relay with Last-Event-ID: {count} lines each, 0 lost, 0 duplicated"
    );
}
