//! TLS and per-component ACL users, proven with real attempts against real Redis servers.

use agentrun_protocol::acl::{
    archiver_user_rules, create_run_user, delete_run_user, generate_password, operator_user_rules,
    relay_user_rules, set_user,
};
use agentrun_protocol::functions;
use agentrun_protocol::publish::Batch;
use agentrun_protocol::replay::read_page;
use agentrun_protocol::testing::{RedisServer, TlsFiles};
use agentrun_protocol::{
    ControlAction, ControlMessage, EntryType, NewEntry, PublishOptions, Publisher, RedisConn,
    RedisSettings, RunId, StreamName, Variation,
};
use bytes::Bytes;
use std::time::Duration;

fn entry(pseq: u64, kind: EntryType, content: &[u8]) -> NewEntry {
    NewEntry {
        pseq,
        ts: 1,
        kind,
        content: Bytes::copy_from_slice(content),
        meta: None,
    }
}

async fn connect_as(redis: &RedisServer, user: &str, password: &str) -> RedisConn {
    redis
        .settings()
        .with_credentials(Some(user.into()), Some(password.into()))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"))
}

fn assert_noperm<T: std::fmt::Debug>(what: &str, r: Result<T, redis::RedisError>) {
    let err = r.expect_err(&format!("{what} must be refused"));
    let text = err.to_string();
    assert!(
        text.contains("NOPERM") || text.contains("no permissions"),
        "{what}: {text}"
    );
}

async fn publish(
    conn: &mut RedisConn,
    run: &RunId,
    stream: &StreamName,
    kind: EntryType,
    pseq: u64,
) -> Result<(), redis::RedisError> {
    Publisher::new(PublishOptions::default())
        .publish(
            conn,
            run,
            Batch {
                stream,
                producer: "p",
                entries: &[entry(pseq, kind, b"x")],
            },
        )
        .await
        .map(|_| ())
}

#[tokio::test]
async fn a_run_user_touches_only_its_own_run() {
    let redis = RedisServer::start();
    let mut admin = redis.conn().await;
    let a = RunId::new("run-a").unwrap();
    let b = RunId::new("run-b").unwrap();
    let pa = generate_password();
    let pb = generate_password();
    let ua = create_run_user(&mut admin, &a, &pa).await.unwrap();
    create_run_user(&mut admin, &b, &pb).await.unwrap();
    // What the operator does on every master: run users may not load code.
    functions::load_library(&mut admin).await.unwrap();
    let out = |r: &RunId| StreamName::Output(Variation::default_name()).key(r);

    let mut conn_a = connect_as(&redis, &ua, &pa).await;
    // Its own run: publish, read, subscribe.
    publish(
        &mut conn_a,
        &a,
        &StreamName::Output(Variation::default_name()),
        EntryType::Output,
        1,
    )
    .await
    .unwrap();
    assert_eq!(
        read_page(&mut conn_a, &out(&a), 0, 10)
            .await
            .unwrap()
            .entries
            .len(),
        1
    );
    let mut ps = redis
        .settings()
        .with_credentials(Some(ua.clone()), Some(pa.clone()))
        .pubsub()
        .await
        .unwrap();
    ps.subscribe(out(&a)).await.unwrap();

    // Run B: nothing.
    publish(
        &mut admin,
        &b,
        &StreamName::Output(Variation::default_name()),
        EntryType::Output,
        1,
    )
    .await
    .unwrap();
    assert_noperm(
        "reading B's stream",
        read_page(&mut conn_a, &out(&b), 0, 10).await,
    );
    assert_noperm(
        "writing B's stream",
        publish(
            &mut conn_a,
            &b,
            &StreamName::Output(Variation::default_name()),
            EntryType::Output,
            2,
        )
        .await,
    );
    assert_noperm(
        "XADD to B",
        redis::cmd("XADD")
            .arg(out(&b))
            .arg("*")
            .arg("f")
            .arg("v")
            .query_async::<String>(&mut conn_a)
            .await,
    );
    assert_noperm(
        "reading B's state",
        redis::cmd("HGETALL")
            .arg(b.state_key())
            .query_async::<Vec<String>>(&mut conn_a)
            .await,
    );
    assert_noperm(
        "publishing on B's channel",
        redis::cmd("PUBLISH")
            .arg(out(&b))
            .arg("x")
            .query_async::<i64>(&mut conn_a)
            .await,
    );
    let mut ps_b = redis
        .settings()
        .with_credentials(Some(ua.clone()), Some(pa.clone()))
        .pubsub()
        .await
        .unwrap();
    assert_noperm("subscribing to B's channel", ps_b.subscribe(out(&b)).await);
    // No admin commands, no other keys.
    for (what, cmd) in [
        ("FLUSHALL", redis::cmd("FLUSHALL")),
        ("CONFIG GET", {
            let mut c = redis::cmd("CONFIG");
            c.arg("GET").arg("*");
            c
        }),
        ("ACL LIST", {
            let mut c = redis::cmd("ACL");
            c.arg("LIST");
            c
        }),
        ("KEYS", {
            let mut c = redis::cmd("KEYS");
            c.arg("*");
            c
        }),
        ("the run index", {
            let mut c = redis::cmd("ZADD");
            c.arg("agentrun:runs").arg(1).arg("x");
            c
        }),
        ("DEL own key", {
            let mut c = redis::cmd("DEL");
            c.arg(out(&a));
            c
        }),
        ("EVAL arbitrary Lua", {
            let mut c = redis::cmd("EVAL");
            c.arg("return 1").arg(0);
            c
        }),
    ] {
        assert_noperm(what, cmd.query_async::<redis::Value>(&mut conn_a).await);
    }

    // After cleanup the credentials stop working, and live connections are closed.
    delete_run_user(&mut admin, &a).await.unwrap();
    delete_run_user(&mut admin, &a).await.unwrap(); // idempotent
    let err = redis
        .settings()
        .with_credentials(Some(ua.clone()), Some(pa.clone()))
        .connect()
        .await
        .err()
        .expect("deleted user must not connect");
    assert!(
        err.to_string().contains("WRONGPASS") || err.to_string().to_lowercase().contains("auth"),
        "{err}"
    );
    let mut dead = ps;
    let pinged = tokio::time::timeout(Duration::from_secs(5), dead.ping::<String>()).await;
    assert!(
        !matches!(pinged, Ok(Ok(_))),
        "the deleted user's connection must be closed"
    );
}

/// A Redis with agentrun's functions, the relay's user, and one output entry of `run`:
/// (server, admin connection, relay connection, relay password).
async fn relay_setup(run: &RunId) -> (RedisServer, RedisConn, RedisConn, String) {
    let redis = RedisServer::start();
    let mut admin = redis.conn().await;
    let pw = generate_password();
    set_user(&mut admin, "agentrun-relay", &pw, &relay_user_rules())
        .await
        .unwrap();
    functions::load_library(&mut admin).await.unwrap();
    let output = StreamName::Output(Variation::default_name());
    publish(&mut admin, run, &output, EntryType::Output, 1)
        .await
        .unwrap();
    let relay = connect_as(&redis, "agentrun-relay", &pw).await;
    (redis, admin, relay, pw)
}

#[tokio::test]
async fn the_relay_user_reads_everything_but_writes_only_control() {
    let (redis, _admin, mut relay, pw) = relay_setup(&RunId::new("r").unwrap()).await;
    let run = RunId::new("r").unwrap();
    let output = StreamName::Output(Variation::default_name());

    assert_eq!(
        read_page(&mut relay, &output.key(&run), 0, 10)
            .await
            .unwrap()
            .entries
            .len(),
        1
    );
    let _: Vec<String> = redis::cmd("HGETALL")
        .arg(run.state_key())
        .query_async(&mut relay)
        .await
        .unwrap();
    let _: Vec<String> = redis::cmd("ZREVRANGE")
        .arg("agentrun:runs")
        .arg(0)
        .arg(-1)
        .query_async(&mut relay)
        .await
        .unwrap();
    let mut ps = redis
        .settings()
        .with_credentials(Some("agentrun-relay".into()), Some(pw.clone()))
        .pubsub()
        .await
        .unwrap();
    ps.subscribe(output.key(&run)).await.unwrap();

    // Control: allowed, through the publish function, without the run's state hash (the
    // relay's control entries carry no epoch; it may not write the state hash).
    let msg = ControlMessage::new(ControlAction::Pause);
    let entries = [entry(1, EntryType::Control, &msg.to_json())];
    let control = Batch {
        stream: &StreamName::Control,
        producer: "relay",
        entries: &entries,
    };
    let with_state = Publisher::new(PublishOptions::default());
    assert_noperm(
        "relay publishing control with the state hash",
        with_state.publish(&mut relay, &run, control).await,
    );
    with_state
        .without_run_state()
        .publish(&mut relay, &run, control)
        .await
        .unwrap();
    // Output, logs, status: refused, through the function or directly.
    for stream in [
        output.clone(),
        StreamName::Logs(Variation::new("control").unwrap()),
        StreamName::Status,
        StreamName::Metrics,
    ] {
        assert_noperm(
            &format!("relay writing {}", stream.key(&run)),
            publish(&mut relay, &run, &stream, EntryType::Output, 9).await,
        );
        assert_noperm(
            "relay PUBLISH",
            redis::cmd("PUBLISH")
                .arg(stream.key(&run))
                .arg("x")
                .query_async::<i64>(&mut relay)
                .await,
        );
    }
    assert_noperm(
        "relay HSET state",
        redis::cmd("HSET")
            .arg(run.state_key())
            .arg("phase")
            .arg("x")
            .query_async::<i64>(&mut relay)
            .await,
    );
    assert_noperm(
        "relay FLUSHALL",
        redis::cmd("FLUSHALL")
            .query_async::<String>(&mut relay)
            .await,
    );
    assert_noperm(
        "relay ACL SETUSER",
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("x")
            .query_async::<String>(&mut relay)
            .await,
    );
}

/// A server, an admin connection, and a connection as the operator's user.
async fn operator_setup() -> (RedisServer, RedisConn, RedisConn) {
    let redis = RedisServer::start();
    let mut admin = redis.conn().await;
    let pw = generate_password();
    set_user(&mut admin, "agentrun-operator", &pw, &operator_user_rules())
        .await
        .unwrap();
    let operator = connect_as(&redis, "agentrun-operator", &pw).await;
    (redis, admin, operator)
}

#[tokio::test]
async fn the_operator_user_manages_run_users_but_is_no_admin() {
    let (redis, _admin, mut operator) = operator_setup().await;
    let run = RunId::new("op").unwrap();
    let run_pw = generate_password();
    let user = create_run_user(&mut operator, &run, &run_pw).await.unwrap();
    connect_as(&redis, &user, &run_pw).await;
    delete_run_user(&mut operator, &run).await.unwrap();
    publish(
        &mut operator,
        &run,
        &StreamName::Status,
        EntryType::Status,
        1,
    )
    .await
    .unwrap();
    assert_noperm(
        "operator FLUSHALL",
        redis::cmd("FLUSHALL")
            .query_async::<String>(&mut operator)
            .await,
    );
    assert_noperm(
        "operator CONFIG SET",
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("save")
            .arg("")
            .query_async::<String>(&mut operator)
            .await,
    );
    assert_noperm(
        "operator other keys",
        redis::cmd("GET")
            .arg("session:1")
            .query_async::<Option<String>>(&mut operator)
            .await,
    );
}

/// The run index keeps only runs whose keys exist: the operator drops the others, in pages,
/// old entries only (a young one without a state hash may be a run being registered).
#[tokio::test]
async fn the_operator_prunes_runs_whose_keys_are_gone_from_the_run_index() {
    use agentrun_protocol::names::RUNS_INDEX_KEY;
    use agentrun_protocol::publish::{prune_run_index, register_run};
    let (_redis, mut admin, mut operator) = operator_setup().await;
    // 1,200 old runs (more than two pages), every other one with its keys gone; a young run
    // whose state hash is not written yet; an old entry that is no run id at all.
    let now = agentrun_protocol::now_ms();
    let cut = now - 60_000;
    let mut kept = Vec::new();
    for i in 0..1200u64 {
        let run = RunId::new(format!("old-{i}")).unwrap();
        register_run(&mut admin, &run, cut - 10_000 + i, &[])
            .await
            .unwrap();
        if i % 2 == 0 {
            kept.push(run.as_str().to_owned());
        } else {
            let _: () = redis::cmd("DEL")
                .arg(run.state_key())
                .query_async(&mut admin)
                .await
                .unwrap();
        }
    }
    let _: () = redis::cmd("ZADD")
        .arg(RUNS_INDEX_KEY)
        .arg(now)
        .arg("young")
        .arg(cut - 1)
        .arg("not a run id!")
        .query_async(&mut admin)
        .await
        .unwrap();

    let removed = prune_run_index(&mut operator, cut).await.unwrap();
    assert_eq!(removed, 601);
    let mut left: Vec<String> = redis::cmd("ZRANGE")
        .arg(RUNS_INDEX_KEY)
        .arg(0)
        .arg(-1)
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(left.pop().as_deref(), Some("young"));
    assert_eq!(left, kept);
    // Nothing more to drop.
    assert_eq!(prune_run_index(&mut operator, cut).await.unwrap(), 0);
}

/// A Redis command built from words.
fn command(words: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(words[0]);
    for w in &words[1..] {
        c.arg(*w);
    }
    c
}

/// Finding: a user that may `SCRIPT LOAD` and `EVALSHA` may run any Lua, and one endless
/// script makes Redis answer `BUSY` to every run. Only the operator may load code (agentrun's
/// function library); every other component may call those functions and nothing else.
#[tokio::test]
async fn no_component_but_the_operator_may_load_or_run_lua_of_its_own() {
    let redis = RedisServer::start();
    let mut admin = redis.conn().await;
    let run = RunId::new("lua").unwrap();
    let run_pw = generate_password();
    let run_user = create_run_user(&mut admin, &run, &run_pw).await.unwrap();
    let mut users = vec![(run_user, run_pw)];
    for (name, rules) in [
        ("agentrun-relay", relay_user_rules()),
        ("agentrun-archiver", archiver_user_rules()),
        ("agentrun-operator", operator_user_rules()),
    ] {
        let pw = generate_password();
        set_user(&mut admin, name, &pw, &rules).await.unwrap();
        users.push((name.to_owned(), pw));
    }
    let endless = "while true do end";
    let endless_library =
        "#!lua name=evil\nredis.register_function('evil', function() while true do end end)";
    let sha = redis::Script::new(endless).get_hash().to_owned();
    for (user, pw) in &users {
        let mut conn = connect_as(&redis, user, pw).await;
        for (what, cmd) in [
            ("EVAL", command(&["EVAL", endless, "0"])),
            ("EVAL_RO", command(&["EVAL_RO", endless, "0"])),
            ("SCRIPT LOAD", command(&["SCRIPT", "LOAD", endless])),
            ("EVALSHA", command(&["EVALSHA", &sha, "0"])),
            (
                "FUNCTION DELETE",
                command(&["FUNCTION", "DELETE", "agentrun"]),
            ),
            ("FUNCTION FLUSH", command(&["FUNCTION", "FLUSH"])),
            ("FUNCTION RESTORE", command(&["FUNCTION", "RESTORE", "x"])),
        ] {
            assert_noperm(
                &format!("{what} as {user}"),
                cmd.query_async::<redis::Value>(&mut conn).await,
            );
        }
        if user == "agentrun-operator" {
            // The operator loads agentrun's library: it holds a key as strong as an admin's.
            functions::load_library(&mut conn).await.unwrap();
        } else {
            assert_noperm(
                &format!("FUNCTION LOAD as {user}"),
                command(&["FUNCTION", "LOAD", "REPLACE", endless_library])
                    .query_async::<redis::Value>(&mut conn)
                    .await,
            );
        }
    }
    // Nothing hostile got in: Redis still answers, and only agentrun's library is loaded.
    let libraries: redis::Value = command(&["FUNCTION", "LIST"])
        .query_async(&mut admin)
        .await
        .unwrap();
    let listed = format!("{libraries:?}");
    assert!(listed.contains("agentrun_v1_publish"), "{listed}");
    assert!(!listed.contains("evil"), "{listed}");
}

/// Finding: the relay user could `HSET` any run's `producers` hash and so make the publish
/// function skip a sidecar's later output, with no gap. The relay now keeps its producer
/// sequence numbers in the control stream's own hash, and may not write the other.
#[tokio::test]
async fn the_relay_cannot_make_the_publish_function_skip_a_sidecars_output() {
    let run = RunId::new("skip").unwrap();
    let (_redis, mut admin, mut relay, _) = relay_setup(&run).await;
    let output = StreamName::Output(Variation::default_name());
    let field = format!("{}|p", output.key(&run));
    assert_noperm(
        "relay HSET of the producers hash",
        command(&["HSET", &run.producers_key(), &field, "999999"])
            .query_async::<i64>(&mut relay)
            .await,
    );
    assert_noperm(
        "relay FCALL with the producers hash",
        functions::Call::new(
            functions::PUBLISH,
            [run.control_producers_key(), run.producers_key()],
        )
        .arg("p")
        .arg(0)
        .arg("")
        .arg("")
        .arg(0)
        .arg("")
        .invoke::<redis::Value, _>(&mut relay)
        .await,
    );
    // The sidecar's next entry still lands.
    publish(&mut admin, &run, &output, EntryType::Output, 2)
        .await
        .unwrap();
    assert_eq!(
        read_page(&mut admin, &output.key(&run), 0, 10)
            .await
            .unwrap()
            .entries
            .len(),
        2
    );
    // Control entries keep their own producers hash.
    let msg = ControlMessage::new(ControlAction::Pause);
    let entries = [entry(1, EntryType::Control, &msg.to_json())];
    Publisher::new(PublishOptions::default())
        .without_run_state()
        .publish(
            &mut relay,
            &run,
            Batch {
                stream: &StreamName::Control,
                producer: "relay",
                entries: &entries,
            },
        )
        .await
        .unwrap();
    let control_field = format!("{}|relay", StreamName::Control.key(&run));
    let kept: Option<u64> = command(&["HGET", &run.control_producers_key(), &control_field])
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(kept, Some(1));
}

/// A run user on a server without agentrun's functions (a master that restarted without
/// persistence before the operator loaded them again) gets an error that says what is
/// missing and what to do; once they are loaded, the same call works.
#[tokio::test]
async fn a_run_user_on_a_server_without_the_functions_is_told_what_to_do() {
    let redis = RedisServer::start();
    let mut admin = redis.conn().await;
    let run = RunId::new("nofn").unwrap();
    let pw = generate_password();
    let user = create_run_user(&mut admin, &run, &pw).await.unwrap();
    let mut conn = connect_as(&redis, &user, &pw).await;
    let output = StreamName::Output(Variation::default_name());
    let err = publish(&mut conn, &run, &output, EntryType::Output, 1)
        .await
        .expect_err("no functions loaded");
    let text = err.to_string();
    assert!(
        text.contains("functions are not loaded") && text.contains("operator"),
        "{text}"
    );
    functions::load_library(&mut admin).await.unwrap();
    publish(&mut conn, &run, &output, EntryType::Output, 1)
        .await
        .unwrap();
    // The default user (a single-user setup with no operator) loads them itself.
    command(&["FUNCTION", "FLUSH"])
        .query_async::<()>(&mut admin)
        .await
        .unwrap();
    publish(&mut admin, &run, &output, EntryType::Output, 2)
        .await
        .unwrap();
}

#[tokio::test]
async fn tls_with_the_right_ca_works_and_anything_else_is_a_clear_error() {
    let tls = TlsFiles::generate();
    let redis = RedisServer::start_tls(&tls, false);
    let run = RunId::new("tls").unwrap();
    let mut conn = redis
        .tls_settings(&tls)
        .connect()
        .await
        .expect("TLS with the test CA");
    publish(&mut conn, &run, &StreamName::Status, EntryType::Status, 1)
        .await
        .unwrap();
    let mut ps = redis.tls_settings(&tls).pubsub().await.unwrap();
    ps.subscribe(StreamName::Status.key(&run)).await.unwrap();

    // The system roots do not trust the test CA.
    let err = tokio::time::timeout(Duration::from_secs(20), redis.settings().connect())
        .await
        .unwrap()
        .err()
        .expect("untrusted certificate");
    assert!(
        err.to_string()
            .contains("cannot connect to Redis at rediss://localhost"),
        "{err}"
    );
    // Plain TCP to a TLS port fails rather than hangs.
    let plain = RedisSettings::from_url(&format!("redis://127.0.0.1:{}", redis.port())).unwrap();
    let failed = match tokio::time::timeout(Duration::from_secs(30), plain.connect())
        .await
        .expect("no hang")
    {
        Err(_) => true,
        Ok(mut c) => tokio::time::timeout(
            Duration::from_secs(30),
            redis::cmd("PING").query_async::<String>(&mut c),
        )
        .await
        .expect("no hang")
        .is_err(),
    };
    assert!(failed, "plain TCP to a TLS port must fail");
    // A CA file that does not exist is named.
    let mut missing = redis.settings();
    missing.ca_file = Some("/no/such/ca.pem".into());
    let err = missing.connect().await.err().unwrap().to_string();
    assert!(err.contains("/no/such/ca.pem"), "{err}");
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() {
    let tls = TlsFiles::generate();
    let redis = RedisServer::start_tls(&tls, true);
    // TLS 1.3 lets the handshake finish before the server checks the client's certificate,
    // so the refusal shows at connect time or at the first command.
    let refused =
        match tokio::time::timeout(Duration::from_secs(20), redis.tls_settings(&tls).connect())
            .await
            .unwrap()
        {
            Err(_) => true,
            Ok(mut c) => tokio::time::timeout(
                Duration::from_secs(20),
                redis::cmd("PING").query_async::<String>(&mut c),
            )
            .await
            .unwrap()
            .is_err(),
        };
    assert!(refused, "a client without a certificate must be refused");
    let mut with = redis.tls_settings(&tls);
    with.client_cert = Some(tls.client_cert.clone());
    with.client_key = Some(tls.client_key.clone());
    let mut conn = with
        .connect()
        .await
        .expect("mTLS with the client certificate");
    let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
    assert_eq!(pong, "PONG");
    let mut half = redis.tls_settings(&tls);
    half.client_cert = Some(tls.client_cert.clone());
    assert!(
        half.connect()
            .await
            .err()
            .unwrap()
            .to_string()
            .contains("together")
    );
}
