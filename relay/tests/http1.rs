//! The relay's HTTP/1.1 as a client sees it on the wire: a connection that opens with a
//! request for a run's events is answered without hyper (chunked, then closed); every other
//! connection is served by hyper with keep-alive, including a stream asked for after other
//! requests; and a client that leaves, or never asks, holds nothing up.

mod support;

use agentrun_protocol::testing::wait_for;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(relay: &Relay) -> TcpStream {
    let addr = relay.base.trim_start_matches("http://");
    TcpStream::connect(addr).await.unwrap()
}

/// Reads a byte at a time up to and with `end`.
async fn read_until(s: &mut TcpStream, end: &[u8], what: &str) -> Vec<u8> {
    let mut read = Vec::new();
    while !read.ends_with(end) {
        let mut b = [0u8; 1];
        tokio::time::timeout(WAIT, s.read_exact(&mut b))
            .await
            .unwrap_or_else(|_| panic!("{what} comes in time"))
            .unwrap_or_else(|e| panic!("{what}: {e} after {read:?}"));
        read.push(b[0]);
    }
    read
}

/// Reads one response head (status line and headers, lowercased names).
async fn read_head(s: &mut TcpStream) -> (String, Vec<(String, String)>) {
    let head = read_until(s, b"\r\n\r\n", "the response head").await;
    let text = String::from_utf8(head).unwrap();
    let mut lines = text.trim_end().split("\r\n");
    let status = lines.next().unwrap().to_owned();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(": ").expect("a header line");
            (n.to_ascii_lowercase(), v.to_owned())
        })
        .collect();
    (status, headers)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Reads a chunked body to its last chunk.
async fn read_chunked(s: &mut TcpStream) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line = read_until(s, b"\r\n", "a chunk size line").await;
        let size = std::str::from_utf8(&line[..line.len() - 2]).unwrap();
        let size = usize::from_str_radix(size, 16).expect("a hex chunk size");
        let mut chunk = vec![0u8; size + 2];
        s.read_exact(&mut chunk).await.unwrap();
        assert!(chunk.ends_with(b"\r\n"), "a chunk ends with CRLF");
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

async fn expect_eof(s: &mut TcpStream) {
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("the relay closes the connection")
        .unwrap();
    assert!(rest.is_empty(), "bytes after the response: {rest:?}");
}

/// A relay, and a run with `lines` lines of output in variation `a`.
async fn relay_with_lines(
    name: &str,
    lines: u64,
) -> (
    agentrun_protocol::testing::RedisServer,
    Relay,
    agentrun_protocol::RunId,
) {
    let (redis, mut conn, run) = redis_with_run(name, &["a"]).await;
    let mut p = Producer::new("p");
    p.output(&mut conn, &run, "a", &tagged_lines(1..=lines, "line"))
        .await;
    let relay = Relay::start(&redis.url()).await;
    (redis, relay, run)
}

#[tokio::test]
async fn a_stream_is_written_chunked_and_its_connection_ends_with_it() {
    let (_redis, relay, run) = relay_with_lines("h1-stream", 3).await;

    let mut s = connect(&relay).await;
    // The head arrives in pieces, as a slow client sends it.
    let request = format!(
        "GET /api/runs/{run}/events?channels=output&follow=false HTTP/1.1\r\nHost: relay\r\n\r\n"
    );
    for piece in request.as_bytes().chunks(7) {
        s.write_all(piece).await.unwrap();
        s.flush().await.unwrap();
    }
    let (status, headers) = read_head(&mut s).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(header(&headers, "transfer-encoding"), Some("chunked"));
    assert_eq!(header(&headers, "connection"), Some("close"));
    assert_eq!(header(&headers, "content-type"), Some("text/event-stream"));
    assert_eq!(header(&headers, "cache-control"), Some("no-cache"));
    assert!(header(&headers, "date").is_some_and(|d| d.ends_with(" GMT")));
    assert!(header(&headers, "content-length").is_none());

    let body = String::from_utf8(read_chunked(&mut s).await).unwrap();
    let mut parser = agentrun_protocol::sse::Parser::default();
    parser.push(body.as_bytes());
    let events: Vec<SseEvent> = std::iter::from_fn(|| parser.next_event()).collect();
    let lines: Vec<String> = events
        .iter()
        .filter(|e| e.event == "output")
        .map(|e| e.json()["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(lines.concat(), tagged_lines(1..=3, "line").concat());
    assert_eq!(events.last().map(|e| e.event.as_str()), Some("end"));
    expect_eof(&mut s).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn an_error_is_written_whole_with_its_length() {
    let (redis, _conn, _run) = redis_with_run("h1-error", &["a"]).await;
    let relay = Relay::start(&redis.url()).await;
    let mut s = connect(&relay).await;
    let missing = run_id("h1-missing");
    s.write_all(
        format!("GET /api/runs/{missing}/events HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let (status, headers) = read_head(&mut s).await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert_eq!(header(&headers, "connection"), Some("close"));
    assert_eq!(header(&headers, "content-type"), Some("application/json"));
    let len: usize = header(&headers, "content-length").unwrap().parse().unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.contains("h1-missing")),
        "{error}"
    );
    expect_eof(&mut s).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_ends_its_stream() {
    let (redis, _conn, run) = redis_with_run("h1-leave", &["a"]).await;
    let relay = Relay::start(&redis.url()).await;
    let mut s = connect(&relay).await;
    s.write_all(format!("GET /api/runs/{run}/events HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, _) = read_head(&mut s).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    let base = relay.base.clone();
    wait_for("the relay counts the stream", WAIT, || {
        let base = base.clone();
        async move { (relay_metric(&base, "agentrun_relay_connections").await == 1).then_some(()) }
    })
    .await;
    // Bytes a client sends during the stream are read and dropped; its leaving is noticed.
    s.write_all(b"anything").await.unwrap();
    drop(s);
    wait_for("the relay lets the stream go", WAIT, || {
        let base = base.clone();
        async move { (relay_metric(&base, "agentrun_relay_connections").await == 0).then_some(()) }
    })
    .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn other_requests_keep_their_connection_and_a_stream_may_follow_them() {
    let (_redis, relay, run) = relay_with_lines("h1-keepalive", 2).await;
    let mut s = connect(&relay).await;
    // Two requests in one write: the second is pipelined behind the first.
    s.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\nGET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n",
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let (status, headers) = read_head(&mut s).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_ne!(header(&headers, "connection"), Some("close"));
        let len: usize = header(&headers, "content-length").unwrap().parse().unwrap();
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
    }
    // A stream on the same connection, after them.
    s.write_all(
        format!(
            "GET /api/runs/{run}/events?channels=output&follow=false HTTP/1.1\r\nHost: relay\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let (status, headers) = read_head(&mut s).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(header(&headers, "transfer-encoding"), Some("chunked"));
    let body = String::from_utf8(read_chunked(&mut s).await).unwrap();
    assert!(body.contains("event: end"), "{body}");
    // And the connection is still there for the next request.
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        .await
        .unwrap();
    let (status, _) = read_head(&mut s).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    relay.shutdown().await;
}

#[tokio::test]
async fn a_client_that_never_asks_does_not_hold_up_the_shutdown() {
    let (redis, _conn, run) = redis_with_run("h1-silent", &["a"]).await;
    let relay = Relay::start(&redis.url()).await;
    let mut silent = connect(&relay).await;
    let mut half = connect(&relay).await;
    half.write_all(b"GET /api/runs/").await.unwrap();
    let mut stream = connect(&relay).await;
    stream
        .write_all(format!("GET /api/runs/{run}/events HTTP/1.1\r\nHost: relay\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let (status, _) = read_head(&mut stream).await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    // Far less than the 30 s a client has to send its first head.
    tokio::time::timeout(Duration::from_secs(10), relay.shutdown())
        .await
        .expect("the shutdown does not wait for clients that sent no request");
    let body = String::from_utf8(read_chunked(&mut stream).await).unwrap();
    assert!(body.contains("event: shutdown"), "{body}");
    expect_eof(&mut stream).await;
    for s in [&mut silent, &mut half] {
        expect_eof(s).await;
    }
}
