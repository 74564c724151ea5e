//! The replica router: reads spread over replicas and never touch the
//! primary; session reads see their own writes while replicas lag;
//! lagging replicas leave `up` and come back. The read cache is off here:
//! these tests watch every read reach the router.

use std::time::Duration;

use serde_json::{Value, json};
use turnpike_testkit::{NODES, Paths, REPLICAS, Stack, TestApp, User, eventually};

both_paths!(
    reads_spread_over_replicas_and_skip_the_primary,
    session_reads_see_own_writes_while_replay_is_paused,
    one_message_statements_carry_their_arguments_exactly,
    a_session_read_right_after_its_write_sees_it
);

/// The item-page statement, as pg_stat_statements records it.
const ITEM_PAGE: &str = "LEFT JOIN LATERAL (SELECT id, kind, body FROM items";

async fn reads_spread_over_replicas_and_skip_the_primary(paths: Paths) {
    let stack = Stack::private().await;
    let mut settings = stack.settings(paths);
    settings.cache.enabled = false;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let id = user
        .new_conversation(json!([{"role": "user", "content": "hello"}]))
        .await;
    stack.wait_replicated().await;

    let mut before = Vec::new();
    let mut transactions_before = 0;
    for node in NODES {
        before.push(stack.statement_calls(node, ITEM_PAGE).await);
        transactions_before += stack.statement_calls(node, "BEGIN").await;
    }
    let reads = 200;
    for _ in 0..reads {
        let page = user.list_items(&id, "?consistency=eventual").await;
        assert_eq!(page.ok()["data"].as_array().unwrap().len(), 1);
    }
    let mut after = Vec::new();
    let mut transactions = -transactions_before;
    for node in NODES {
        after.push(stack.statement_calls(node, ITEM_PAGE).await);
        transactions += stack.statement_calls(node, "BEGIN").await;
    }
    // Through PgBouncer too: a page is one message, with no transaction around it.
    assert_eq!(transactions, 0, "item pages opened transactions");
    let served: Vec<i64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(served[0], 0, "the primary served item pages: {served:?}");
    assert_eq!(
        served[1] + served[2],
        reads,
        "every read ran on a replica: {served:?}"
    );
    assert!(
        served[1] >= reads / 5 && served[2] >= reads / 5,
        "reads are spread: {served:?}"
    );
}

async fn topology(admin: &User) -> Vec<Value> {
    let reply = admin.call("GET", "/v1/admin/topology", None).await;
    reply.ok()["nodes"].as_array().unwrap().clone()
}

async fn replica_states(admin: &User) -> Vec<String> {
    topology(admin)
        .await
        .iter()
        .filter(|n| n["role"] == "replica")
        .map(|n| n["state"].as_str().unwrap().to_owned())
        .collect()
}

fn texts(page: &Value) -> Vec<String> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["content"][0]["text"].as_str().unwrap().to_owned())
        .collect()
}

async fn session_reads_see_own_writes_while_replay_is_paused(paths: Paths) {
    let stack = Stack::private().await;
    let mut settings = stack.settings(paths);
    settings.database.max_lag_ms = 300;
    settings.database.session_wait_ms = 50;
    settings.cache.enabled = false;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let admin = app.new_admin().await;
    let id = user
        .new_conversation(json!([{"role": "user", "content": "before"}]))
        .await;
    // Both replicas have the conversation before replay stops.
    eventually(
        "replicas to replay the conversation",
        Duration::from_secs(10),
        || async {
            let page = user.list_items(&id, "?consistency=eventual").await;
            (page.status == 200).then_some(())
        },
    )
    .await;
    for replica in REPLICAS {
        let pool = stack.superuser(replica).await;
        sqlx::query("SELECT pg_wal_replay_pause()")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }

    let added = user
        .add_items(&id, json!([{"role": "user", "content": "after"}]))
        .await;
    let token = added.token().unwrap();
    added.ok();

    let with_token = user
        .call_with(
            "GET",
            &format!("/v1/conversations/{id}/items?order=asc"),
            None,
            &[("turnpike-consistency", &token)],
        )
        .await;
    assert_eq!(
        texts(with_token.ok()),
        ["before", "after"],
        "session read with the token"
    );
    // It went to a replica first, behind a question for its replay
    // position, and was read again once the answer showed it behind.
    let metrics = app.metrics().await;
    assert!(
        metrics.lines().any(
            |line| line.starts_with("turnpike_db_session_reads_checked_total")
                && line.contains("outcome=\"behind\"")
        ),
        "{metrics}"
    );
    let without_token = user.list_items(&id, "?order=asc").await;
    assert_eq!(
        texts(without_token.ok()),
        ["before", "after"],
        "session read without a token"
    );
    let strong = user.list_items(&id, "?order=asc&consistency=strong").await;
    assert_eq!(texts(strong.ok()), ["before", "after"]);
    let eventual = user
        .list_items(&id, "?order=asc&consistency=eventual")
        .await;
    assert_eq!(
        texts(eventual.ok()),
        ["before"],
        "eventual reads stay on the paused replicas"
    );

    // Another user, with no write of their own, is not sent to the primary.
    let other = app.new_user().await;
    other.call("GET", "/v1/conversations", None).await.ok();

    eventually(
        "both replicas to leave `up`",
        Duration::from_secs(10),
        || async {
            let states = replica_states(&admin).await;
            states.iter().all(|s| s == "lagging").then_some(())
        },
    )
    .await;
    let lagging = topology(&admin).await;
    assert!(lagging[1]["lag_bytes"].as_u64().unwrap() > 0, "{lagging:?}");
    assert!(lagging[1]["lag_ms"].as_u64().unwrap() > 300, "{lagging:?}");

    for replica in REPLICAS {
        let pool = stack.superuser(replica).await;
        sqlx::query("SELECT pg_wal_replay_resume()")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    eventually(
        "both replicas to return to `up`",
        Duration::from_secs(10),
        || async {
            let states = replica_states(&admin).await;
            states.iter().all(|s| s == "up").then_some(())
        },
    )
    .await;
    let eventual = user
        .list_items(&id, "?order=asc&consistency=eventual")
        .await;
    assert_eq!(texts(eventual.ok()), ["before", "after"]);
}

/// What the array round trip returns.
type Arrays = (
    Vec<i64>,
    Vec<uuid::Uuid>,
    Vec<Option<String>>,
    Vec<i64>,
    bool,
);

/// A session read sent right after its write commits, before any replica
/// is known to have replayed it, goes to a replica behind a question for
/// its replay position, and is kept only if that position covers the
/// write: each of many such reads sees its own write, replicas serving
/// those that replay in time and the usual wait the rest.
async fn a_session_read_right_after_its_write_sees_it(paths: Paths) {
    use turnpike_core::db::statement::{self, Arg};
    use turnpike_core::db::{Consistency, DbConn};

    let stack = Stack::shared().await;
    let router = turnpike_core::db::Router::new(&stack.settings(paths).database).unwrap();
    let table = format!("session_reads_{}", uuid::Uuid::now_v7().simple());
    committed(
        &router,
        &format!("CREATE TABLE {table} (id int8 PRIMARY KEY)"),
    )
    .await;
    let mut on_replicas = 0;
    for id in 0..200_i64 {
        let mut tx = router.write().await.unwrap();
        sqlx::query(&format!("INSERT INTO {table} VALUES ($1)"))
            .bind(id)
            .persistent(false)
            .execute(tx.conn())
            .await
            .unwrap();
        let lsn = tx.commit().await.unwrap();
        let sql = format!("SELECT count(*)::int8, pg_is_in_recovery() FROM {table} WHERE id = $1");
        let (seen, on_replica): (i64, bool) = router
            .read_one_message(Consistency::Session(Some(lsn)), |db| {
                let sql = sql.clone();
                Box::pin(async move {
                    let rows: Vec<(i64, bool)> =
                        statement::fetch_all(db, &sql, &[Arg::from(id)]).await?;
                    Ok(rows[0])
                })
            })
            .await
            .unwrap();
        assert_eq!(seen, 1, "read {id} did not see its own write");
        on_replicas += i64::from(on_replica);
    }
    assert!(on_replicas > 0, "no session read was served by a replica");
    println!("session reads served by replicas: {on_replicas} of 200");
    committed(&router, &format!("DROP TABLE {table}")).await;
}

/// One statement on the primary, committed.
async fn committed(router: &turnpike_core::db::Router, sql: &str) {
    use turnpike_core::db::DbConn;
    let mut tx = router.write().await.unwrap();
    sqlx::query(sql).execute(tx.conn()).await.unwrap();
    tx.commit().await.unwrap();
}

/// A write given up while its `BEGIN` is on the wire (its acquire timeout
/// ran out while PgBouncer queued it, or its caller went away) may leave
/// that `BEGIN` to run on the server after all: its connection must go back
/// to the pool with no transaction open. Left open, the next writer's
/// `BEGIN` joins it, and the connection holds its server (through
/// PgBouncer, a whole server connection) idle in a transaction meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_given_up_during_its_begin_leaves_no_transaction_open() {
    use futures_util::FutureExt;

    let stack = Stack::shared().await;
    let router = turnpike_core::db::Router::new(&stack.settings(Paths::DIRECT).database).unwrap();
    // The router's one connection so far, and its server process.
    let (rows, _) = router
        .write()
        .await
        .unwrap()
        .commit_after::<(i32,)>("SELECT pg_backend_pid()", &[])
        .await
        .unwrap();
    let backend = rows[0].0;

    // Polled once, the write takes that idle connection and sends `BEGIN`,
    // then waits for the answer; dropped there, it is given up.
    assert!(
        router.write().now_or_never().is_none(),
        "a BEGIN answered before it was polled again"
    );

    // Recovered in the background: back in the pool (or closed).
    eventually(
        "the given-up connection's recovery",
        Duration::from_secs(10),
        || {
            let pool = router
                .topology()
                .into_iter()
                .find(|node| node.name == "primary")
                .unwrap()
                .pool;
            async move { (pool.idle == pool.size).then_some(()) }
        },
    )
    .await;
    let superuser = stack.superuser("primary").await;
    let state: Option<(Option<String>, Option<String>)> =
        sqlx::query_as("SELECT state, query FROM pg_stat_activity WHERE pid = $1")
            .bind(backend)
            .fetch_optional(&superuser)
            .await
            .unwrap();
    if let Some((state, query)) = state {
        assert_eq!(
            state.as_deref(),
            Some("idle"),
            "the connection went back to the pool in a transaction (its last query: {query:?})"
        );
    }
    // And it serves the next write as any other.
    committed(&router, "SELECT 1").await;
}

/// A statement sent as one message (through PgBouncer, its arguments
/// written into it as literals) returns exactly what a bound statement
/// would, whatever the text holds; a NUL byte is refused, not sent; and
/// concurrent readers through PgBouncer each get their own statement's rows.
async fn one_message_statements_carry_their_arguments_exactly(paths: Paths) {
    use turnpike_core::db::Consistency;
    use turnpike_core::db::statement::{self, Arg};

    let stack = Stack::shared().await;
    let router = std::sync::Arc::new(
        turnpike_core::db::Router::new(&stack.settings(paths).database).unwrap(),
    );
    let texts = [
        "plain",
        "it's",
        "''; DROP TABLE items; --",
        "back\\slash \\' and \\",
        "$1 $2 $$ dollar $tag$ quoting $tag$",
        "/* comment */ -- line",
        "E'escape'",
        "ünïcödé ✓ 𝄞",
        "",
        "\\n is not a newline; this is:\nand a tab:\t.",
    ];
    for text in texts {
        let id = uuid::Uuid::new_v4();
        let (back_id, back_n, back_text, back_null): (uuid::Uuid, i64, String, Option<String>) =
            router
                .read_one_message(Consistency::Strong, move |db| {
                    Box::pin(async move {
                        statement::fetch_optional(
                            db,
                            "SELECT $1::uuid, $2::int8 - 1, $3, $4::text",
                            &[
                                Arg::from(id),
                                Arg::from(i64::MIN + 1),
                                Arg::from(text),
                                Arg::Text(None),
                            ],
                        )
                        .await
                        .map(Option::unwrap)
                    })
                })
                .await
                .unwrap();
        assert_eq!(
            (back_id, back_n, back_text.as_str(), back_null),
            (id, i64::MIN, text, None)
        );
    }

    let texts: Vec<Option<String>> = texts
        .iter()
        .map(|t| Some((*t).to_owned()))
        .chain([None])
        .collect();
    let ids = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()];
    let (back_ints, back_ids, back_texts, empty, flag): Arrays = router
        .read_one_message(Consistency::Strong, {
            let texts = texts.clone();
            move |db| {
                let texts = texts.clone();
                Box::pin(async move {
                    statement::fetch_optional(
                        db,
                        "SELECT $1::int8[], $2::uuid[], $3::text[], $4::int8[], $5::bool",
                        &[
                            Arg::Ints(&[i64::MAX, -1, 0]),
                            Arg::Uuids(&ids),
                            Arg::Texts(&texts),
                            Arg::Ints(&[]),
                            Arg::from(true),
                        ],
                    )
                    .await
                    .map(Option::unwrap)
                })
            }
        })
        .await
        .unwrap();
    assert_eq!(back_ints, [i64::MAX, -1, 0]);
    assert_eq!(back_ids, ids);
    assert_eq!(back_texts, texts);
    assert!(empty.is_empty() && flag);

    let refused = router
        .read_one_message(Consistency::Strong, |db| {
            Box::pin(async move {
                statement::fetch_all::<(String,)>(db, "SELECT $1", &[Arg::from("a\0b")]).await
            })
        })
        .await;
    assert!(refused.is_err(), "a NUL byte was sent: {refused:?}");

    let mut readers = tokio::task::JoinSet::new();
    for reader in 0..32_i64 {
        let router = std::sync::Arc::clone(&router);
        readers.spawn(async move {
            for round in 0..20_i64 {
                let n = reader * 1000 + round;
                let sql = if n % 2 == 0 {
                    "SELECT $1::int8 * 2"
                } else {
                    "SELECT $1::int8 * 3, 'odd'"
                };
                let first: i64 = router
                    .read_one_message(Consistency::Strong, move |db| {
                        Box::pin(async move {
                            let rows: Vec<(i64,)> = if n % 2 == 0 {
                                statement::fetch_all(db, sql, &[Arg::from(n)]).await?
                            } else {
                                statement::fetch_all::<(i64, String)>(db, sql, &[Arg::from(n)])
                                    .await?
                                    .into_iter()
                                    .map(|(v, _)| (v,))
                                    .collect()
                            };
                            Ok(rows[0].0)
                        })
                    })
                    .await
                    .unwrap();
                assert_eq!(first, if n % 2 == 0 { n * 2 } else { n * 3 });
            }
        });
    }
    while let Some(done) = readers.join_next().await {
        done.unwrap();
    }
}

/// Through PgBouncer, single-statement reads share pipelined connections
/// too, each statement one unnamed message: PgBouncer keeps a lane's
/// server until every statement in flight on it is answered. Concurrent
/// readers each get their own statement's answer, and statements that
/// fail among them (a division by zero) fail alone, with their SQLSTATE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_pgbouncer_are_pipelined_and_a_failing_one_fails_alone() {
    use turnpike_core::db::statement::{self, Arg};
    use turnpike_core::db::{Consistency, DbError};

    let stack = Stack::shared().await;
    let settings = stack.settings(Paths::PGBOUNCER).database;
    assert!(settings.pipeline_through_pgbouncer && settings.pipelined_connections_per_node > 0);
    let router = turnpike_core::db::Router::new(&settings).unwrap();

    let mut readers = tokio::task::JoinSet::new();
    for reader in 0..32_i64 {
        let router = std::sync::Arc::clone(&router);
        readers.spawn(async move {
            let mut failed = 0;
            for round in 0..25_i64 {
                let n = reader * 1000 + round;
                let answer = router
                    .read_one_message(Consistency::Strong, move |db| {
                        Box::pin(async move {
                            statement::fetch_all::<(i64, i64, String)>(
                                db,
                                "SELECT $1::int8, 60 / ($1::int8 % 5), $2",
                                &[Arg::from(n), Arg::from(format!("reader {reader}").as_str())],
                            )
                            .await
                        })
                    })
                    .await;
                if n % 5 == 0 {
                    let Err(DbError::Query(sqlx::Error::Database(e))) = &answer else {
                        panic!("{n} / 0 answered {answer:?}");
                    };
                    assert_eq!(e.code().as_deref(), Some("22012"), "{e}");
                    failed += 1;
                } else {
                    let rows = answer.unwrap();
                    assert_eq!(rows, [(n, 60 / (n % 5), format!("reader {reader}"))]);
                }
            }
            failed
        });
    }
    let mut failed = 0;
    while let Some(done) = readers.join_next().await {
        failed += done.unwrap();
    }
    assert_eq!(failed, 32 * 5);
    let primary = router
        .topology()
        .into_iter()
        .find(|node| node.name == "primary")
        .unwrap();
    assert_eq!(primary.path, "pgbouncer");
    assert!(
        primary.pool.pipelined > 0,
        "no pipelined connection opened through PgBouncer: {primary:?}"
    );
}

/// `SELECT pg_backend_pid()` as a strong read: the primary's server
/// process that ran it.
async fn backend_of_a_strong_read(router: &turnpike_core::db::Router) -> i32 {
    try_backend_of_a_strong_read(router).await.unwrap()
}

/// The same, or why the read failed.
async fn try_backend_of_a_strong_read(
    router: &turnpike_core::db::Router,
) -> Result<i32, turnpike_core::db::DbError> {
    use turnpike_core::db::Consistency;
    use turnpike_core::db::statement;

    router
        .read_one_message(Consistency::Strong, |db| {
            Box::pin(async move {
                let rows: Vec<(i32,)> =
                    statement::fetch_all(db, "SELECT pg_backend_pid()", &[]).await?;
                Ok(rows[0].0)
            })
        })
        .await
}

/// Single-statement reads on a direct connection share the node's few
/// pipelined connections, however many run at once. A statement stuck
/// behind a lock holds up its own connection only: once it has gone
/// without an answer for `pipeline_stalled_after_ms`, reads take the other
/// one, and with both stuck a read takes a pooled connection instead of
/// queueing behind them. Once the lock goes, the stuck reads
/// answer and the pipelined connections take reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_reads_share_two_connections_and_step_around_a_stuck_one() {
    use std::collections::HashSet;
    use turnpike_core::db::Consistency;
    use turnpike_core::db::statement;

    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT).database;
    settings.pipelined_connections_per_node = 2;
    settings.pipeline_stalled_after_ms = 200;
    settings.read_attempt_timeout_ms = 30_000;
    let router = std::sync::Arc::new(turnpike_core::db::Router::new(&settings).unwrap());

    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let router = std::sync::Arc::clone(&router);
        readers.spawn(async move { backend_of_a_strong_read(&router).await });
    }
    let mut lanes = HashSet::new();
    while let Some(pid) = readers.join_next().await {
        lanes.insert(pid.unwrap());
    }
    assert!(
        !lanes.is_empty() && lanes.len() <= 2,
        "64 reads ran on {} server connections",
        lanes.len()
    );

    // A table locked the way a migration's DDL locks it: a read of it waits.
    let table = format!("pipeline_lock_{}", uuid::Uuid::new_v4().simple());
    let holder = stack.superuser("primary").await;
    sqlx::query(&format!("CREATE TABLE {table} (n int)"))
        .execute(&holder)
        .await
        .unwrap();
    sqlx::query(&format!("GRANT SELECT ON {table} TO turnpike"))
        .execute(&holder)
        .await
        .unwrap();
    let mut lock = holder.begin().await.unwrap();
    sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *lock)
        .await
        .unwrap();
    let waiting = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(format!("%{table}%"))
        .fetch_one(&holder)
        .await
        .unwrap()
    };
    // Each stuck read waits on the lock with a statement in flight: once it
    // has gone `pipeline_stalled_after_ms` without an answer (a time, so
    // waited out), its connection takes no new reads, and the next read
    // goes to the other one; with both stalled, a read takes a pooled one.
    let mut stuck = Vec::new();
    for n in 1..=2 {
        let (router, sql) = (
            std::sync::Arc::clone(&router),
            format!("SELECT count(*) FROM {table}"),
        );
        stuck.push(tokio::spawn(async move {
            router
                .read_one_message(Consistency::Strong, move |db| {
                    let sql = sql.clone();
                    Box::pin(async move {
                        let rows: Vec<(i64,)> = statement::fetch_all(db, &sql, &[]).await?;
                        Ok(rows[0].0)
                    })
                })
                .await
        }));
        eventually(
            "the read to wait on the lock",
            Duration::from_secs(10),
            || async { (waiting().await == n).then_some(()) },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let pid = tokio::time::timeout(Duration::from_secs(10), backend_of_a_strong_read(&router))
        .await
        .expect("a read queued behind the stuck statements");
    assert!(!lanes.contains(&pid), "the read ran on a stuck connection");

    lock.rollback().await.unwrap();
    for read in stuck {
        assert_eq!(read.await.unwrap().unwrap(), 0);
    }
    let pid = backend_of_a_strong_read(&router).await;
    assert!(
        lanes.contains(&pid),
        "reads went back to the pipelined connections"
    );
    sqlx::query(&format!("DROP TABLE {table}"))
        .execute(&holder)
        .await
        .unwrap();
}

/// A pipelined connection the server cuts (a restart, an operator's
/// `pg_terminate_backend`) fails the reads on it over to the other
/// replica; the node is read again once it is back, on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_connection_cut_by_the_server_fails_over_and_is_replaced() {
    use turnpike_core::db::Consistency;
    use turnpike_core::db::statement;

    let stack = Stack::shared().await;
    let settings = stack.settings(Paths::DIRECT).database;
    let router = std::sync::Arc::new(turnpike_core::db::Router::new(&settings).unwrap());
    router.spawn_monitor().await;
    let read = || async {
        router
            .read_one_message(Consistency::Eventual, |db| {
                Box::pin(async move {
                    let node = db.node().to_owned();
                    let rows: Vec<(i32,)> =
                        statement::fetch_all(db, "SELECT pg_backend_pid()", &[]).await?;
                    Ok((node, rows[0].0))
                })
            })
            .await
            .unwrap()
    };
    let (node, pid) = eventually("a read on replica1", Duration::from_secs(10), || async {
        let (node, pid) = read().await;
        (node == "replica1").then_some((node, pid))
    })
    .await;

    let replica = stack.superuser(&node).await;
    let cut: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(&replica)
        .await
        .unwrap();
    assert!(cut);
    // Every read answers (the first on the cut connection is retried on replica2).
    for _ in 0..50 {
        read().await;
    }
    let (_, again) = eventually("replica1 read again", Duration::from_secs(30), || async {
        let (node, pid) = read().await;
        (node == "replica1").then_some((node, pid))
    })
    .await;
    assert_ne!(again, pid, "replica1 is read on a new connection");
}

/// A pipelined connection whose server process stops answering without
/// closing it (a frozen process, a peer gone without a reset): the read
/// on it times out alone, the next reads take pooled connections, and once
/// it has owed an answer past the statement timeout plus 10 s it is closed
/// and a new one takes reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_connection_that_stops_answering_is_replaced() {
    use std::collections::HashSet;

    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT).database;
    settings.pipelined_connections_per_node = 1;
    settings.statement_timeout_ms = 500;
    settings.read_attempt_timeout_ms = 1_000;
    let router = std::sync::Arc::new(turnpike_core::db::Router::new(&settings).unwrap());
    let frozen = backend_of_a_strong_read(&router).await;

    // Our own connection's server process, frozen: it neither answers nor
    // closes the connection (and its statement timeout cannot fire). It is
    // let go however the test ends.
    struct Frozen(i32);
    impl Frozen {
        fn signal(&self, sig: &str) {
            let status = std::process::Command::new("kill")
                .args([sig, &self.0.to_string()])
                .status()
                .unwrap();
            assert!(status.success(), "kill {sig} {}", self.0);
        }
    }
    impl Drop for Frozen {
        fn drop(&mut self) {
            self.signal("-CONT");
        }
    }
    let process = Frozen(frozen);
    process.signal("-STOP");
    let stuck = {
        let router = std::sync::Arc::clone(&router);
        tokio::spawn(async move { try_backend_of_a_strong_read(&router).await })
    };
    let timed_out = stuck.await.unwrap();
    assert!(
        matches!(timed_out, Err(turnpike_core::db::DbError::Timeout { .. })),
        "the read on the frozen connection times out alone: {timed_out:?}"
    );

    // Meanwhile reads answer on pooled connections; past 10.5 s without an
    // answer the frozen one is closed and a new pipelined one opened.
    let mut pooled = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let replacement = loop {
        let pid = backend_of_a_strong_read(&router).await;
        assert_ne!(pid, frozen, "a read reached the frozen connection");
        if !pooled.is_empty() && !pooled.contains(&pid) {
            break pid;
        }
        pooled.insert(pid);
        assert!(
            std::time::Instant::now() < deadline,
            "no new pipelined connection within 30 s"
        );
        // Polled: the replacement is due at a time, not on an event.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(process);
    assert!(!pooled.contains(&replacement));
    let again = backend_of_a_strong_read(&router).await;
    assert_eq!(
        again, replacement,
        "reads stay on the new pipelined connection"
    );
}
