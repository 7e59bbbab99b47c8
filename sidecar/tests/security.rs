//! The sidecar works with nothing more than its run's ACL user, and over TLS.

mod common;

use agentrun_protocol::RunState;
use agentrun_protocol::acl::{create_run_user, generate_password};
use agentrun_protocol::testing::{RedisServer, TlsFiles};
use common::*;

#[tokio::test]
async fn the_sidecar_needs_only_its_run_user() {
    let redis = RedisServer::start();
    let run = run_id("acl");
    let password = generate_password();
    let mut admin = redis.conn().await;
    let user = create_run_user(&mut admin, &run, &password).await.unwrap();
    // What the operator does on every master: the run user may call agentrun's functions only.
    agentrun_protocol::functions::load_library(&mut admin)
        .await
        .unwrap();
    let mut cmd = sidecar_run_with(
        &redis,
        &run,
        &["--redis-username", &user],
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
    );
    cmd.env("AGENTRUN_REDIS_PASSWORD", &password);
    let out = output_of(&mut cmd);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(&password),
        "the password must never be printed"
    );
    assert_eq!(
        concat(&read_all(&mut admin, &output_key(&run)).await),
        b"out\n"
    );
    assert_eq!(
        concat(&read_all(&mut admin, &logs_key(&run)).await),
        b"err\n"
    );
    let last = statuses(&mut admin, &run).await.pop().unwrap();
    assert_eq!((last.state, last.exit_code), (RunState::Failed, Some(3)));
    let ttl: i64 = redis::cmd("TTL")
        .arg(output_key(&run))
        .query_async(&mut admin)
        .await
        .unwrap();
    assert!(ttl > 0, "retention applied with the run user's rights");
}

#[tokio::test]
async fn the_sidecar_publishes_over_tls() {
    let tls = TlsFiles::generate();
    let redis = RedisServer::start_tls(&tls, true);
    let run = run_id("tls");
    let ca = tls.ca.display().to_string();
    let mut cmd = sidecar_run_with(
        &redis,
        &run,
        &["--redis-ca-file", &ca],
        &["echo", "over tls"],
    );
    cmd.env("AGENTRUN_REDIS_CLIENT_CERT", &tls.client_cert)
        .env("AGENTRUN_REDIS_CLIENT_KEY", &tls.client_key);
    let out = output_of(&mut cmd);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut settings = redis.tls_settings(&tls);
    settings.client_cert = Some(tls.client_cert.clone());
    settings.client_key = Some(tls.client_key.clone());
    let mut conn = settings.connect().await.unwrap();
    assert_eq!(
        concat(&read_all(&mut conn, &output_key(&run)).await),
        b"over tls\n"
    );
}
