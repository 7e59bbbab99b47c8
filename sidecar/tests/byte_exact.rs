//! Whatever an agent writes reaches the streams byte-exact, in order, with contiguous seq, and
//! the exit code and signal are reported.

mod common;

use agentrun_protocol::RunState;
use agentrun_protocol::testing::RedisServer;
use common::*;
use proptest::prelude::*;
use std::io::Write;
use std::sync::OnceLock;

fn redis() -> &'static RedisServer {
    static REDIS: OnceLock<RedisServer> = OnceLock::new();
    REDIS.get_or_init(RedisServer::start)
}

/// An agent that replays a list of writes to stdout and stderr exactly (including empty ones).
const REPLAY_AGENT: &str = r#"
import os, sys, struct, time
data = open(sys.argv[1], 'rb').read()
i = 0
while i < len(data):
    fd, n, pause = struct.unpack('>BIB', data[i:i+6]); i += 6
    os.write(fd, data[i:i+n]); i += n
    if pause: time.sleep(0.03)
sys.exit(int(sys.argv[2]))
"#;

fn write_script(dir: &std::path::Path, writes: &[(u8, Vec<u8>, bool)]) -> String {
    let path = dir.join("writes.bin");
    let mut f = std::fs::File::create(&path).unwrap();
    for (fd, bytes, pause) in writes {
        f.write_all(&[*fd]).unwrap();
        f.write_all(&(bytes.len() as u32).to_be_bytes()).unwrap();
        f.write_all(&[u8::from(*pause)]).unwrap();
        f.write_all(bytes).unwrap();
    }
    path.to_string_lossy().into_owned()
}

fn check(writes: Vec<(u8, Vec<u8>, bool)>, exit: i32) {
    let dir = tempfile::tempdir().unwrap();
    let agent = python_agent(dir.path(), "agent.py", REPLAY_AGENT);
    let script = write_script(dir.path(), &writes);
    let run = run_id("exact");
    let out = output_of(&mut sidecar_run(
        redis(),
        &run,
        &["python3", &agent, &script, &exit.to_string()],
    ));
    assert_eq!(
        out.status.code(),
        Some(exit),
        "exit code; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let want_out: Vec<u8> = writes
        .iter()
        .filter(|w| w.0 == 1)
        .flat_map(|w| w.1.clone())
        .collect();
    let want_err: Vec<u8> = writes
        .iter()
        .filter(|w| w.0 == 2)
        .flat_map(|w| w.1.clone())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conn = redis().conn().await;
        let got_out = concat(&read_all(&mut conn, &output_key(&run)).await);
        let got_err = concat(&read_all(&mut conn, &logs_key(&run)).await);
        assert!(
            got_out == want_out,
            "stdout differs: got {} bytes, want {}",
            got_out.len(),
            want_out.len()
        );
        assert!(
            got_err == want_err,
            "stderr differs: got {} bytes, want {}",
            got_err.len(),
            want_err.len()
        );
        let last = statuses(&mut conn, &run).await.pop().unwrap();
        let want_state = if exit == 0 {
            RunState::Succeeded
        } else {
            RunState::Failed
        };
        assert_eq!((last.state, last.exit_code), (want_state, Some(exit)));
    });
}

fn write() -> impl Strategy<Value = (u8, Vec<u8>, bool)> {
    let bytes = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..200),
        2 => "[a-zé€😀 \n]{0,80}".prop_map(String::into_bytes),
        1 => Just(Vec::new()),
        1 => (1usize..3).prop_map(|n| {
            // A line of about a mebibyte, sometimes without its newline.
            let mut v = vec![b'm'; n * 700 * 1024];
            if n == 2 { v.push(b'\n'); }
            v
        }),
    ];
    (1u8..=2, bytes, proptest::bool::weighted(0.1))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 20, ..ProptestConfig::default() })]
    #[test]
    fn random_output_arrives_byte_exact(writes in proptest::collection::vec(write(), 0..25), exit in prop_oneof![Just(0), Just(3), Just(255)]) {
        check(writes, exit);
    }
}

#[test]
fn invalid_utf8_empty_writes_and_no_final_newline() {
    check(
        vec![
            (1, b"line one\n".to_vec(), false),
            (1, Vec::new(), false),
            (1, vec![0xff, 0xfe, 0x00, b'\n', 0xc3], true),
            (2, b"warning: \x1b[31mred\x1b[0m".to_vec(), true),
            (1, vec![0xa9, b'x'], false),
            (1, b"no newline at the end".to_vec(), false),
        ],
        0,
    );
}

#[test]
fn a_signal_is_reported_as_128_plus_n() {
    let run = run_id("signal");
    let out = output_of(&mut sidecar_run(
        redis(),
        &run,
        &["sh", "-c", "echo before; kill -9 $$"],
    ));
    assert_eq!(out.status.code(), Some(137));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conn = redis().conn().await;
        let last = statuses(&mut conn, &run).await.pop().unwrap();
        assert_eq!(last.state, RunState::Failed);
        assert_eq!((last.exit_code, last.signal), (Some(137), Some(9)));
        assert_eq!(last.reason.as_deref(), Some("Signaled"));
        let state: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(run.state_key())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(state.get("phase").map(String::as_str), Some("failed"));
        let ttl: i64 = redis::cmd("TTL")
            .arg(output_key(&run))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            ttl > 0 && ttl <= 86_400,
            "retention TTL is set once the run ends, got {ttl}"
        );
    });
}
