//! Faults injected under the entrypoint and the sidecar: after each one the stream holds the
//! agent's bytes in order, each at most once, and whatever is missing is covered by an explicit
//! `gap` entry whose counts add up (docs/reliability.md has the whole matrix).

mod common;

use agentrun_protocol::testing::{ChildGuard, RedisServer, dying_with_test, wait_for};
use agentrun_protocol::{Entry, EntryType};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A size-limited tmpfs mounted for one test (root only), unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "mounting a small tmpfs to fill the disk needs root (CI runs as root)"
        );
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount -t tmpfs at {}",
            dir.path().display()
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// `count` numbered lines of 14 bytes each: `line 00000000\n`, ...
fn numbered_lines(count: usize) -> Vec<u8> {
    (0..count)
        .flat_map(|i| format!("line {i:08}\n").into_bytes())
        .collect()
}

fn numbered_lines_script(count: usize) -> String {
    format!("awk 'BEGIN {{ for (i = 0; i < {count}; i++) printf \"line %08d\\n\", i }}'")
}

/// Walks the stream against what the agent wrote: every data entry must be the next bytes,
/// every gap skips exactly the bytes it says it dropped, and together they cover everything.
/// Returns (bytes kept, bytes reported dropped).
fn check_against(entries: &[Entry], written: &[u8]) -> (u64, u64) {
    let mut offset = 0usize;
    let (mut kept, mut dropped) = (0u64, 0u64);
    for e in entries {
        match e.kind {
            EntryType::Output => {
                let end = offset + e.content.len();
                assert!(
                    end <= written.len() && written[offset..end] == e.content[..],
                    "entry seq {} is not the agent's bytes at offset {offset}: silent loss or reordering",
                    e.seq
                );
                offset = end;
                kept += e.content.len() as u64;
            }
            EntryType::Gap => {
                let meta: serde_json::Value =
                    serde_json::from_str(e.meta.as_deref().unwrap_or("{}")).unwrap();
                let n = meta["droppedBytes"]
                    .as_u64()
                    .expect("a gap counts its bytes");
                offset += n as usize;
                dropped += n;
            }
            _ => {}
        }
    }
    assert_eq!(
        offset,
        written.len(),
        "kept ({kept}) + reported dropped ({dropped}) must account for every byte written"
    );
    (kept, dropped)
}

/// An agent under the entrypoint that writes `count` numbered lines, says so, then waits for
/// the test's go before a last `end` line.
struct GatedAgent {
    child: ChildGuard,
    markers: tempfile::TempDir,
    /// Every byte it writes, `end` included.
    expected: Vec<u8>,
}

impl GatedAgent {
    fn start(socket: &Path, count: usize) -> GatedAgent {
        let markers = tempfile::tempdir().unwrap();
        let mut expected = numbered_lines(count);
        expected.extend_from_slice(b"end\n");
        let script = format!(
            "{}; touch {w}; while [ ! -e {go} ]; do sleep 0.02; done; echo end",
            numbered_lines_script(count),
            w = markers.path().join("written").display(),
            go = markers.path().join("go").display()
        );
        let child = ChildGuard::spawn(
            dying_with_test(ENTRYPOINT)
                .arg("--socket")
                .arg(socket)
                .args(["--no-tee", "--", "sh", "-c", &script])
                .stderr(std::process::Stdio::null()),
        );
        GatedAgent {
            child,
            markers,
            expected,
        }
    }

    /// Waits until it has written its numbered lines.
    async fn wait_written(&self) {
        let written = self.markers.path().join("written");
        wait_for("the agent to write everything", DEADLINE, || {
            let done = written.exists();
            async move { done.then_some(()) }
        })
        .await;
    }

    /// Lets it write its last line, and waits for it to exit 0.
    async fn finish(&mut self) {
        std::fs::write(self.markers.path().join("go"), "").unwrap();
        let status = wait_for("the agent to finish", DEADLINE, || {
            let exited = self.child.try_wait().unwrap();
            async move { exited }
        })
        .await;
        assert_eq!(status.code(), Some(0));
    }
}

/// The run's output entries once its last line, `end`, is in the stream.
async fn entries_through_the_end_line(
    conn: &agentrun_protocol::RedisConn,
    run: &agentrun_protocol::RunId,
    within: std::time::Duration,
) -> Vec<Entry> {
    wait_for("the last line in the stream", within, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move {
            let entries = read_all(&mut c, &output_key(&r)).await;
            entries
                .iter()
                .any(|e| e.content.ends_with(b"end\n"))
                .then_some(entries)
        }
    })
    .await
}

#[tokio::test]
async fn a_full_disk_under_the_spool_is_an_explicit_gap_never_a_silent_loss() {
    let redis = RedisServer::start();
    let run = run_id("disk-full");
    // The whole shared volume is a 1 MiB tmpfs: the spool fills the disk long before its own
    // 1 GiB bound, while the agent writes 2.1 MB with no sidecar there. The sidecar comes
    // while the agent still runs, and the agent writes a last line after that.
    let volume = Tmpfs::mount("1m");
    let socket: PathBuf = volume.path().join("agentrun.sock");
    provision_key(&socket);
    let mut agent = GatedAgent::start(&socket, 150_000);
    agent.wait_written().await;
    let mut sidecar = serve(&redis, &run, &socket);
    let conn = redis.conn().await;
    wait_for("the sidecar to publish something", DEADLINE, || {
        let mut c = conn.clone();
        let r = run.clone();
        async move { (!read_all(&mut c, &output_key(&r)).await.is_empty()).then_some(()) }
    })
    .await;
    agent.finish().await;
    let entries = entries_through_the_end_line(&conn, &run, DEADLINE).await;
    let (kept, dropped) = check_against(&entries, &agent.expected);
    assert!(kept > 500_000, "the spool's content was published: {kept}");
    assert!(dropped > 0, "what did not fit is reported");
    sidecar.kill().unwrap();
    sidecar.wait().unwrap();
}

/// Peak resident memory of a process (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

fn spool_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("agentrun-spool-"))
        .collect()
}

#[tokio::test]
async fn adopting_a_200_mb_spool_takes_bounded_memory() {
    let redis = RedisServer::start();
    let run = run_id("big-spool");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentrun.sock");
    let size: u64 = 200 * 1024 * 1024;
    let out = entrypoint_without_sidecar(&socket, &[], &format!("head -c {size} /dev/urandom"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(spool_files(dir.path()).len(), 1);

    // Uncapped stream: how many entries 200 MiB makes depends on how the agent's writes were
    // read (about 20 KiB each when the entrypoint keeps up), and the default cap of 10,000
    // entries would trim the oldest.
    let mut sidecar = serve_with(&redis, &run, &socket, 0, &["--stream-max-len", "0"]);
    let pid = sidecar.id();
    wait_for("the spool published and removed", DEADLINE * 3, || {
        let left = spool_files(dir.path());
        async move { left.is_empty().then_some(()) }
    })
    .await;
    let peak = peak_rss(pid);
    eprintln!("the sidecar's peak RSS: {} MiB", peak / (1024 * 1024));
    let entries = read_all(&mut redis.conn().await, &output_key(&run)).await;
    let bytes: u64 = entries.iter().map(|e| e.content.len() as u64).sum();
    assert_eq!(bytes, size, "every byte of the spool is in the stream");
    // The sidecar holds at most its buffer (16 MiB by default) of frames for Redis.
    assert!(
        peak < 96 * 1024 * 1024,
        "the sidecar's peak RSS was {} MiB while adopting a 200 MiB spool",
        peak / (1024 * 1024)
    );
    sidecar.kill().unwrap();
    sidecar.wait().unwrap();
}

#[tokio::test]
async fn a_spool_to_adopt_with_redis_down_neither_blocks_the_entrypoint_nor_the_exit() {
    let run = run_id("adopt-redis-down");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentrun.sock");
    let out = entrypoint_without_sidecar(&socket, &[], "echo left behind");
    assert_eq!(out.status.code(), Some(0));
    // A Redis that is not there: the port of a server that was stopped.
    let redis = RedisServer::start();
    let url = redis.url();
    drop(redis);

    let mut sidecar = ChildGuard::spawn(
        dying_with_test(SIDECAR)
            .args(["serve", "--metrics-interval-seconds", "0"])
            .args([
                "--metrics-addr",
                "127.0.0.1:0",
                "--drain-timeout-seconds",
                "2",
            ])
            .args(["--redis-url", &url, "--run-id", run.as_str(), "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(state_dir(&socket))
            .env("RUST_LOG", "warn"),
    );
    wait_for("the socket", DEADLINE, || {
        let there = socket.exists();
        async move { there.then_some(()) }
    })
    .await;
    // The entrypoint of the next agent is taken at once (its output waits for Redis in the
    // entrypoint, which is told Redis is down, and spools).
    provision_key(&socket);
    let out = Command::new(ENTRYPOINT)
        .arg("--socket")
        .arg(&socket)
        .args([
            "--no-tee",
            "--drain-timeout-seconds",
            "1",
            "--",
            "echo",
            "hi",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("no sidecar ever answered"),
        "the sidecar took the connection while adopting: {stderr}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sidecar.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exited = wait_for(
        "the sidecar to exit after its drain timeout",
        DEADLINE / 4,
        || {
            let exited = sidecar.try_wait().unwrap();
            async move { exited }
        },
    )
    .await;
    assert_eq!(
        exited.code(),
        Some(1),
        "it reports what it could not deliver"
    );
    assert!(
        !spool_files(dir.path()).is_empty(),
        "what Redis did not take stays in a spool for the next sidecar"
    );
}

/// How many commands Redis refused for lack of memory (`errorstat_OOM`).
async fn refused_for_memory(conn: &mut agentrun_protocol::RedisConn) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(conn)
        .await
        .unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("errorstat_OOM:count="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_full_redis_refuses_writes_and_the_output_arrives_once_it_has_room() {
    // The bundled Redis runs with maxmemory and `noeviction`: when it is full it refuses
    // writes instead of being OOM-killed or evicting history. The agent must not block, and
    // nothing may be lost silently: once Redis has room again the stream is the agent's bytes.
    let redis =
        RedisServer::start_with(&["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"]);
    let run = run_id("redis-full");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentrun.sock");
    let mut sidecar = serve(&redis, &run, &socket);
    let mut agent = GatedAgent::start(&socket, 400_000);
    // 5.6 MB of output into a Redis that holds 3 MB: it refuses, the agent goes on.
    let conn = redis.conn().await;
    wait_for(
        "Redis to refuse writes for lack of memory",
        DEADLINE,
        || {
            let mut c = conn.clone();
            async move { (refused_for_memory(&mut c).await > 0).then_some(()) }
        },
    )
    .await;
    agent.wait_written().await;
    assert!(
        sidecar.try_wait().unwrap().is_none(),
        "the sidecar is still up"
    );

    // Room again (retention expired old runs, or an operator raised maxmemory).
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "maxmemory", "0"])
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    agent.finish().await;
    let entries = entries_through_the_end_line(&conn, &run, DEADLINE * 2).await;
    let (_, dropped) = check_against(&entries, &agent.expected);
    assert_eq!(
        dropped, 0,
        "the spool had room for everything Redis refused"
    );
    sidecar.kill().unwrap();
    sidecar.wait().unwrap();
}

/// A sidecar killed (`SIGKILL`) half-way through publishing a spool an entrypoint left behind:
/// the spool stays, the next sidecar publishes it again from its start, and the stream ends
/// with every byte once (what the first had published is skipped by producer sequence).
#[tokio::test]
async fn a_sidecar_killed_while_adopting_a_spool_leaves_it_to_the_next_with_nothing_lost_or_doubled()
 {
    let redis = RedisServer::start();
    let run = run_id("adopt-killed");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agentrun.sock");
    let count = 400_000;
    let out = entrypoint_without_sidecar(&socket, &[], &numbered_lines_script(count));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(spool_files(dir.path()).len(), 1);

    let mut first = serve_with(&redis, &run, &socket, 0, &["--stream-max-len", "0"]);
    let mut admin = redis.conn().await;
    let key = output_key(&run);
    wait_for("the first sidecar publishing the spool", DEADLINE, || {
        let mut conn = admin.clone();
        let key = key.clone();
        async move {
            let len: u64 = redis::cmd("XLEN")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap_or(0);
            (len > 0).then_some(())
        }
    })
    .await;
    // Hold Redis's writes so that the sidecar is caught in the middle of the spool, then kill it.
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(60_000)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let published_by_first = read_all(&mut admin, &key).await;
    assert!(
        !published_by_first.is_empty() && spool_files(dir.path()).len() == 1,
        "the first sidecar published part of the spool and left it"
    );

    let mut second = serve_with(&redis, &run, &socket, 0, &["--stream-max-len", "0"]);
    wait_for("the spool published and removed", DEADLINE, || {
        let left = spool_files(dir.path());
        async move { left.is_empty().then_some(()) }
    })
    .await;
    let entries = read_all(&mut admin, &key).await;
    let (kept, dropped) = check_against(&entries, &numbered_lines(count));
    assert_eq!(
        (kept, dropped),
        (count as u64 * 14, 0),
        "every byte once, no gap"
    );
    second.kill().unwrap();
    second.wait().unwrap();
}

/// A record cut short by a full disk is cut off the spool: a later, shorter record written in
/// its place is followed by nothing, so a sidecar adopting the spool after a crash reads every
/// record and refuses none (a leftover tail would not verify and end the adoption as if the
/// agent had tampered with the file).
#[test]
fn a_record_cut_short_by_a_full_disk_leaves_no_tail_in_the_spool() {
    use agentrun_sidecar::auth::Key;
    use agentrun_sidecar::frame::{Frame, Pipe};
    use agentrun_sidecar::spool::{SpoolFile, orphan_spools};

    let disk = Tmpfs::mount("64k");
    let key = Key::from_bytes([7; agentrun_sidecar::auth::KEY_LEN]);
    let data = |fseq: u64, len: usize| Frame::Data {
        fseq,
        pipe: Pipe::Stdout,
        pseq: fseq,
        ts: 0,
        bytes: vec![b'a' + fseq as u8; len].into(),
    };
    let mut spool = SpoolFile::create(disk.path(), "p", &key).unwrap();
    spool.append(&data(1, 100)).unwrap();
    let whole = std::fs::metadata(spool.path()).unwrap().len();
    let err = spool
        .append(&data(2, 256 * 1024))
        .expect_err("a record larger than the disk");
    assert_eq!(err.raw_os_error(), Some(nix::libc::ENOSPC), "{err}");
    assert_eq!(
        std::fs::metadata(spool.path()).unwrap().len(),
        whole,
        "the partial record is cut off"
    );
    spool.append(&data(3, 100)).unwrap();
    let path = spool.persist(&[], &[]).unwrap();

    let mut orphans = orphan_spools(disk.path());
    assert_eq!(orphans.len(), 1, "{}", path.display());
    let mut frames = Vec::new();
    while let Some(frame) = orphans[0].next_frame(&key).expect("every record verifies") {
        frames.push(frame);
    }
    assert_eq!(frames, [data(1, 100), data(3, 100)]);
}
