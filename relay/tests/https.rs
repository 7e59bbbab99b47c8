//! The relay over HTTPS (`--tls-cert`, `--tls-key`): HTTP/2 for clients that offer it, so that
//! one connection carries the SSE streams of many runs; HTTP/1.1 for the others.

mod support;

use agentrun_protocol::testing::wait_for;
use agentrun_relay::Config;
use reqwest::Version;
use std::path::PathBuf;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A certificate for `localhost` and its key, written where the relay reads them.
struct Cert {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    pem: Vec<u8>,
}

fn localhost_cert() -> Cert {
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let pem = generated.cert.pem().into_bytes();
    std::fs::write(&cert, &pem).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    Cert {
        _dir: dir,
        cert,
        key,
        pem,
    }
}

async fn https_relay(redis_url: &str, cert: &Cert) -> Relay {
    let mut config = Config::for_redis(redis_url);
    config.tls_cert = Some(cert.cert.clone());
    config.tls_key = Some(cert.key.clone());
    Relay::start_with(config, "127.0.0.1:0").await
}

/// A client that trusts the test certificate; `http1` keeps it from offering HTTP/2.
fn client(cert: &Cert, http1: bool) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&cert.pem).unwrap();
    let builder = reqwest::Client::builder()
        .add_root_certificate(ca)
        .https_only(true);
    let builder = if http1 { builder.http1_only() } else { builder };
    builder.build().unwrap()
}

async fn open_stream(client: &reqwest::Client, url: &str) -> (Version, SseClient) {
    let resp = client
        .get(url)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    (resp.version(), SseClient::from_response(resp))
}

#[tokio::test]
async fn many_runs_stream_over_one_http2_connection() {
    let (redis, mut conn, _) = redis_with_run("https-0", &["a"]).await;
    let cert = localhost_cert();
    let relay = https_relay(&redis.url(), &cert).await;
    let client = client(&cert, false);
    let mut p = Producer::new("p");

    // More streams than the six HTTP/1.1 connections a browser opens to one host.
    let runs: Vec<String> = (0..10).map(|i| format!("https-{i}")).collect();
    let mut streams = Vec::new();
    for name in &runs {
        let run = run_id(name);
        register(&mut conn, &run, &["a"]).await;
        p.output(&mut conn, &run, "a", &tagged_lines(1..=2, name))
            .await;
        let (version, sse) = open_stream(&client, &relay.events_url(name, "channels=output")).await;
        assert_eq!(version, Version::HTTP_2, "{name}");
        streams.push(sse);
    }
    // Every stream has its history, then follows live output, all at once.
    for (name, sse) in runs.iter().zip(&mut streams) {
        for seq in 1..=2u64 {
            let ev = sse.expect_entry(name).await.json();
            assert_eq!(ev["seq"], seq, "{name}");
        }
    }
    for name in &runs {
        p.output(&mut conn, &run_id(name), "a", &tagged_lines(3..=3, name))
            .await;
    }
    for (name, sse) in runs.iter().zip(&mut streams) {
        let ev = sse.expect_entry(name).await.json();
        assert_eq!(
            (ev["seq"].as_u64(), ev["content"].as_str()),
            (Some(3), Some(&*format!("{name} 3\n")))
        );
    }

    // A graceful shutdown ends every stream on the shared connection with a resumable cursor.
    relay.shutdown().await;
    for (name, sse) in runs.iter().zip(&mut streams) {
        assert_eq!(sse.expect_entry(name).await.event, "shutdown", "{name}");
    }
}

#[tokio::test]
async fn http1_clients_are_served_over_tls_too() {
    let (redis, mut conn, run) = redis_with_run("https-h1", &["a"]).await;
    let cert = localhost_cert();
    let relay = https_relay(&redis.url(), &cert).await;
    let mut p = Producer::new("p");
    p.output(&mut conn, &run, "a", &tagged_lines(1..=3, "x"))
        .await;

    let client = client(&cert, true);
    let (version, mut sse) =
        open_stream(&client, &relay.events_url("https-h1", "channels=output")).await;
    assert_eq!(version, Version::HTTP_11);
    for seq in 1..=3u64 {
        assert_eq!(sse.expect_entry("history").await.json()["seq"], seq);
    }
    let page = client.get(format!("{}/", relay.base)).send().await.unwrap();
    assert_eq!(page.version(), Version::HTTP_11);
    assert!(page.status().is_success());
}

/// Over TLS too, a connection that opens with a stream request is written by the relay
/// itself (chunked, `Connection: close`), without hyper's buffers: a client that leaves ends
/// its stream, an error is written whole, a graceful shutdown ends the stream with its event,
/// and a connection that opens with another request keeps hyper's keep-alive.
#[tokio::test]
async fn an_http1_stream_over_tls_is_written_directly_and_ends_with_its_client() {
    let (redis, mut conn, run) = redis_with_run("https-direct", &["a"]).await;
    let cert = localhost_cert();
    let relay = https_relay(&redis.url(), &cert).await;
    let mut p = Producer::new("p");
    p.output(&mut conn, &run, "a", &tagged_lines(1..=2, "x"))
        .await;
    let connections = || {
        let (http, base) = (client(&cert, true), relay.base.clone());
        async move {
            let text = metrics_text_with(&http, &base).await;
            metric(&text, "agentrun_relay_connections")
        }
    };

    let url = relay.events_url("https-direct", "channels=output");
    let (version, mut sse) = open_stream(&client(&cert, true), &url).await;
    assert_eq!(version, Version::HTTP_11);
    assert_eq!(sse.headers["connection"], "close");
    assert_eq!(sse.headers["transfer-encoding"], "chunked");
    for seq in 1..=2u64 {
        assert_eq!(sse.expect_entry("history").await.json()["seq"], seq);
    }
    p.output(&mut conn, &run, "a", &tagged_lines(3..=3, "x"))
        .await;
    assert_eq!(sse.expect_entry("live").await.json()["seq"], 3);
    wait_for("the relay counts the stream", WAIT, || async {
        (connections().await == 1).then_some(())
    })
    .await;
    drop(sse);
    wait_for("the relay lets the stream go", WAIT, || async {
        (connections().await == 0).then_some(())
    })
    .await;

    let missing = client(&cert, true)
        .get(relay.events_url("https-no-such-run", "channels=output"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    assert_eq!(missing.headers()["connection"], "close");
    let length: usize = missing.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(missing.bytes().await.unwrap().len(), length);

    let keep = client(&cert, true);
    for _ in 0..2 {
        let ok = keep
            .get(format!("{}/healthz", relay.base))
            .send()
            .await
            .unwrap();
        assert_eq!(
            (ok.version(), ok.status().as_u16()),
            (Version::HTTP_11, 200)
        );
        assert!(ok.headers().get("connection").is_none());
    }

    let (_, mut sse) = open_stream(&client(&cert, true), &url).await;
    assert_eq!(sse.expect_entry("history again").await.json()["seq"], 1);
    relay.shutdown().await;
    let mut last = String::new();
    while let Some(ev) = tokio::time::timeout(WAIT, sse.next())
        .await
        .expect("the stream ends after the shutdown")
    {
        last = ev.event;
    }
    assert_eq!(last, "shutdown");
}

#[tokio::test]
async fn a_stalled_or_broken_handshake_does_not_hold_up_other_clients() {
    let (redis, _conn, _run) = redis_with_run("https-stall", &["a"]).await;
    let cert = localhost_cert();
    let relay = https_relay(&redis.url(), &cert).await;
    let port = relay.base.rsplit(':').next().unwrap().to_owned();

    // One client connects and says nothing; another speaks plain HTTP to the TLS port.
    let _silent = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let mut plain = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "a plain-HTTP client on the TLS port is closed"
    );
    assert!(!answer.starts_with(b"HTTP/1.1 200"), "no plain-HTTP answer");

    let ok = client(&cert, false)
        .get(format!("{}/healthz", relay.base))
        .send()
        .await
        .unwrap();
    assert_eq!((ok.version(), ok.status().as_u16()), (Version::HTTP_2, 200));

    // The silent client, still in its handshake, does not hold up a graceful shutdown (it
    // would for the 10 s handshake timeout).
    let stopping = std::time::Instant::now();
    relay.shutdown().await;
    assert!(
        stopping.elapsed() < std::time::Duration::from_secs(5),
        "shutdown waited {:?} for a client that never finished its handshake",
        stopping.elapsed()
    );
}
