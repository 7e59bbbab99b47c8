//! A variation's output as numbered lines: the range endpoint (by seq before or after a
//! position, by line) and search across the whole output, against a real Redis over HTTP.

mod support;

use agentrun_protocol::{EntryType, StreamName};
use base64::Engine;
use support::*;

/// Output whose lines end anywhere in the entries: some entries hold many lines, some a part
/// of one, some bytes are not UTF-8, one line is coloured; more than a megabyte, so that the
/// relay's line index takes checkpoints.
fn sample() -> Vec<Vec<u8>> {
    let mut text = Vec::new();
    for i in 1..=20_000u32 {
        match i {
            7_777 => text.extend_from_slice(b"\x1b[1;31mNEEDLE in red\x1b[0m at 7777"),
            12_345 => text.extend_from_slice(b"a needle with \xff\xfe bytes"),
            _ => text.extend_from_slice(
                format!("line {i:05} {}", "x".repeat(i as usize % 90)).as_bytes(),
            ),
        }
        text.push(b'\n');
    }
    text.extend_from_slice(b"the last line has no newline");
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut n = 0usize;
    while at < text.len() {
        // 1 byte, 37 bytes, 4 KiB, 61 KiB, ...: chunks that end mid-line and mid-character.
        let len = [1, 37, 4096, 61 * 1024, 300][n % 5].min(text.len() - at);
        chunks.push(text[at..at + len].to_vec());
        at += len;
        n += 1;
    }
    chunks
}

/// The content of a range entry, as bytes.
fn content(e: &serde_json::Value) -> Vec<u8> {
    let c = e["content"].as_str().unwrap();
    if e["encoding"] == "base64" {
        base64::engine::general_purpose::STANDARD.decode(c).unwrap()
    } else {
        c.as_bytes().to_vec()
    }
}

/// Where each chunk starts in their concatenation.
fn offsets(chunks: &[Vec<u8>]) -> Vec<usize> {
    chunks
        .iter()
        .scan(0, |at, c| {
            let s = *at;
            *at += c.len();
            Some(s)
        })
        .collect()
}

/// The line number of each byte offset of `all` where an entry starts.
fn line_at(all: &[u8], offset: usize) -> u64 {
    all[..offset].iter().filter(|b| **b == b'\n').count() as u64 + 1
}

async fn publish_sample(
    name: &str,
) -> (
    agentrun_protocol::testing::RedisServer,
    Relay,
    String,
    Vec<Vec<u8>>,
) {
    let (redis, mut conn, run) = redis_with_run(name, &["main"]).await;
    let chunks = sample();
    let mut p = Producer::new("p");
    let stream = StreamName::Output(var("main"));
    for part in chunks.chunks(100) {
        p.publish(&mut conn, &run, &stream, EntryType::Output, part)
            .await
            .unwrap();
    }
    // A gap entry at the end: it adds no bytes and no lines.
    p.gap(&mut conn, &run, &stream).await;
    let relay = Relay::start(&redis.url()).await;
    (redis, relay, run.to_string(), chunks)
}

async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let resp = reqwest::get(url).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap())
}

#[tokio::test]
async fn ranges_by_seq_and_by_line_number_every_line_as_the_download_does() {
    let (_redis, relay, run, chunks) = publish_sample("range").await;
    let all = chunks.concat();
    let starts = offsets(&chunks);
    let total_entries = chunks.len() as u64 + 1;
    let base = format!("{}/api/runs/{run}/variations/main/output/range", relay.base);

    // The newest page: the last entries, the gap among them, with their line numbers.
    let (status, tail) = get_json(&format!("{base}?limit=10")).await;
    assert_eq!(status, 200, "{tail}");
    assert_eq!(tail["lastSeq"], total_entries);
    assert_eq!(tail["firstSeq"], 1);
    assert_eq!(tail["moreAfter"], false);
    assert_eq!(tail["moreBefore"], true);
    let entries = tail["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 10);
    assert_eq!(entries[9]["type"], "gap");
    for e in &entries[..9] {
        let seq = e["seq"].as_u64().unwrap();
        assert_eq!(
            e["line"],
            line_at(&all, starts[seq as usize - 1]),
            "entry {seq}"
        );
    }
    assert_eq!(tail["nextLine"], 20_001);

    // Paging back from the end with `before` gives every byte, in order, with the right lines.
    let mut before = total_entries + 1;
    let mut pages: Vec<Vec<u8>> = Vec::new();
    loop {
        let (status, page) = get_json(&format!("{base}?before={before}&limit=1000")).await;
        assert_eq!(status, 200, "{page}");
        let entries = page["entries"].as_array().unwrap();
        if entries.is_empty() {
            break;
        }
        let mut bytes = Vec::new();
        for e in entries {
            let seq = e["seq"].as_u64().unwrap();
            assert!(seq < before);
            if e["type"] == "output" {
                assert_eq!(
                    e["line"],
                    line_at(&all, starts[seq as usize - 1]),
                    "entry {seq}"
                );
                bytes.extend(content(e));
            }
        }
        // Pages are bounded in bytes as well as entries.
        assert!(bytes.len() <= 1024 * 1024 + 61 * 1024, "{}", bytes.len());
        before = entries[0]["seq"].as_u64().unwrap();
        pages.push(bytes);
        if page["moreBefore"] == false {
            break;
        }
    }
    pages.reverse();
    let got = pages.concat();
    assert!(
        got == all,
        "{} bytes read back, {} written",
        got.len(),
        all.len()
    );

    // `after` reads forward from a position.
    let (_, page) = get_json(&format!("{base}?after=3&limit=4")).await;
    let seqs: Vec<u64> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![4, 5, 6, 7]);
    assert_eq!(page["startsLine"], all[starts[3] - 1] == b'\n');
    assert_eq!(page["moreAfter"], true);

    // `line=N`: the page starts with the entry that ends line N-1; line N is in it, whole
    // (twice: the second read starts from the relay's checkpoints).
    for n in [1u64, 2, 3, 4_000, 7_777, 12_345, 19_999, 20_001, 7_777] {
        let (status, page) = get_json(&format!("{base}?line={n}&limit=50")).await;
        assert_eq!(status, 200, "{page}");
        let entries = page["entries"].as_array().unwrap();
        let first = &entries[0];
        let seq = first["seq"].as_u64().unwrap() as usize;
        let first_line = first["line"].as_u64().unwrap();
        assert!(
            first_line <= n,
            "line {n}: page starts at line {first_line}"
        );
        let mut text: Vec<u8> = entries
            .iter()
            .filter(|e| e["type"] == "output")
            .flat_map(content)
            .collect();
        // Skip to line n within the page.
        let mut skip = n - first_line;
        while skip > 0 {
            let nl = text
                .iter()
                .position(|b| *b == b'\n')
                .expect("line n is in the page");
            text.drain(..=nl);
            skip -= 1;
        }
        let want_line: Vec<u8> = all
            .split(|b| *b == b'\n')
            .nth(n as usize - 1)
            .unwrap()
            .to_vec();
        assert!(
            text.starts_with(&want_line),
            "line {n}: {:?}",
            String::from_utf8_lossy(&text[..text.len().min(80)])
        );
        // The entry before the page ends before line n-1 ends: the page is as late as it can be.
        if seq > 1 {
            assert!(line_at(&all, starts[seq - 1]) < n || n == 1, "line {n}");
        }
    }
    // A page forward from a position starts there, and ends after about a megabyte.
    for q in ["line=1", "after=0&limit=1000"] {
        let (_, page) = get_json(&format!("{base}?{q}")).await;
        let entries = page["entries"].as_array().unwrap();
        assert_eq!(entries[0]["seq"], 1, "{q}");
        let bytes: usize = entries.iter().map(|e| content(e).len()).sum();
        assert!(
            (1024 * 1024..1024 * 1024 + 62 * 1024).contains(&bytes),
            "{q}: {bytes}"
        );
        let last = entries.last().unwrap()["seq"].as_u64().unwrap();
        assert_eq!(page["nextSeq"], last);
        assert_eq!(entries.len() as u64, last);
    }
    // A line past the end: an empty page.
    let (status, page) = get_json(&format!("{base}?line=99999")).await;
    assert_eq!(status, 200);
    assert!(page["entries"].as_array().unwrap().is_empty());
    assert!(
        relay.state.line_index.len() >= 2,
        "the relay took checkpoints"
    );
}

#[tokio::test]
async fn bad_range_and_search_requests_are_refused_saying_what_to_send() {
    let (_redis, relay, run, _) = publish_sample("bad").await;
    let base = format!("{}/api/runs/{run}/variations/main/output", relay.base);
    for (url, needle) in [
        (format!("{base}/range?after=1&line=2"), "one of `after`"),
        (format!("{base}/range?line=0"), "`line` counts from 1"),
        (format!("{base}/range?before=soon"), "`before`"),
        (format!("{base}/range?limit=5000"), "`limit`"),
        (format!("{base}/search"), "`q` is empty"),
        (
            format!("{base}/search?q=(unclosed&regex=true"),
            "not a valid regular expression",
        ),
        (
            format!("{base}/search?q=.*&regex=true"),
            "matches the empty text",
        ),
        (format!("{base}/search?q=x&limit=-1"), "`limit`"),
    ] {
        let (status, body) = get_json(&url).await;
        assert_eq!(status, 400, "{url}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(needle),
            "{url}: {body}"
        );
    }
    for url in [
        format!("{}/api/runs/{run}/variations/nope/output/range", relay.base),
        format!(
            "{}/api/runs/nope/variations/main/output/search?q=x",
            relay.base
        ),
    ] {
        let (status, body) = get_json(&url).await;
        assert_eq!(status, 404, "{url}: {body}");
    }
}

/// The NDJSON records of a search.
async fn search(base: &str, query: &str) -> (Vec<serde_json::Value>, serde_json::Value) {
    let resp = reqwest::get(format!("{base}/search?{query}"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let body = resp.text().await.unwrap();
    let mut records: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = records.pop().unwrap();
    assert_eq!(summary["done"], true, "{summary}");
    (records, summary)
}

#[tokio::test]
async fn search_streams_every_matching_line_with_its_number_and_position() {
    let (_redis, relay, run, chunks) = publish_sample("search").await;
    let all = chunks.concat();
    let base = format!("{}/api/runs/{run}/variations/main/output", relay.base);
    let starts = offsets(&chunks);

    // Text, case-insensitive by default; colours do not hide a match; bytes that are not
    // UTF-8 do not either.
    let (matches, summary) = search(&base, "q=needle").await;
    assert_eq!(summary["complete"], true, "{summary}");
    assert_eq!(summary["matches"], 2);
    assert_eq!(summary["lines"], 20_001);
    let lines: Vec<u64> = matches
        .iter()
        .map(|m| m["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, vec![7_777, 12_345]);
    assert_eq!(matches[0]["text"], "NEEDLE in red at 7777");
    // The position is the line's first byte: entry `seq`, byte `offset`.
    for m in &matches {
        let seq = m["seq"].as_u64().unwrap() as usize;
        let at = starts[seq - 1] + m["offset"].as_u64().unwrap() as usize;
        assert_eq!(line_at(&all, at), m["line"].as_u64().unwrap());
        assert!(at == 0 || all[at - 1] == b'\n');
    }
    let (matches, _) = search(&base, "q=needle&case=true").await;
    assert_eq!(matches.len(), 1);
    assert_eq!(matches[0]["line"], 12_345);

    // Regular expressions; the last line (no newline) is searched too.
    let (matches, _) = search(&base, "q=%5Eline+1999%5B0-9%5D&regex=true").await;
    let lines: Vec<u64> = matches
        .iter()
        .map(|m| m["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, (19_990..=19_999).collect::<Vec<_>>());
    let (matches, _) = search(&base, "q=has+no+newline").await;
    assert_eq!(matches[0]["line"], 20_001);

    // At most `limit` matches, and the summary says the search stopped there.
    let (matches, summary) = search(&base, "q=line&limit=25").await;
    assert_eq!(matches.len(), 25);
    assert_eq!(matches[24]["line"], 25);
    assert_eq!(summary["complete"], false);
    assert_eq!(summary["reason"], "limit");
}
