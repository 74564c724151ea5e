//! Faults: a replica stopped under read load costs no failed reads; with
//! the primary stopped reads go on and writes fail fast with 503 +
//! Retry-After; both recover by themselves when the node returns.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use turnpike_testkit::{Paths, Stack, TestApp, User, eventually};

both_paths!(
    a_stopped_replica_costs_no_failed_reads,
    a_stopped_primary_keeps_reads_and_fails_writes_fast
);

/// A node's state from the topology endpoint; `unknown` if that request
/// itself was refused (logged: under CPU starvation it can time out).
async fn node_state(admin: &User, name: &str) -> String {
    let reply = admin.call("GET", "/v1/admin/topology", None).await;
    if reply.status != 200 {
        eprintln!("topology answered {}: {}", reply.status, reply.body);
        return "unknown".to_owned();
    }
    reply.body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .map(|n| n["state"].as_str().unwrap().to_owned())
        .unwrap()
}

/// The stack's settings with the request-rate limits off: these tests'
/// readers loop as fast as the api answers, and a cached read is fast
/// enough for eight of them to pass the default per-user rate, which is
/// not what they are about.
fn unthrottled(stack: &Stack, paths: Paths) -> turnpike_core::Settings {
    let mut settings = stack.settings(paths);
    settings.limits.key_requests_per_s = 0;
    settings.limits.user_requests_per_s = 0;
    settings
}

async fn a_stopped_replica_costs_no_failed_reads(paths: Paths) {
    let stack = Stack::private().await;
    let app = TestApp::spawn_with(unthrottled(&stack, paths)).await;
    let user = app.new_user().await;
    let admin = app.new_admin().await;
    let id = user
        .new_conversation(json!([{"role": "user", "content": "hello"}]))
        .await;
    // Every replica has the conversation before the load starts: eventual
    // reads may otherwise not find it yet, which is not what this test is about.
    stack.wait_replicated().await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..8 {
        let (user, id, stop, ok, failed) = (
            user.clone(),
            id.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let page = user.list_items(&id, "?consistency=eventual").await;
                if page.status == 200 && page.body["data"].as_array().is_some_and(|d| d.len() == 1)
                {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed read: {} {}", page.status, page.body);
                }
            }
        }));
    }
    eventually("reads to flow", Duration::from_secs(10), || async {
        (ok.load(Ordering::Relaxed) > 100).then_some(())
    })
    .await;

    stack.stop("replica1").await;
    eventually(
        "replica1 to be marked down",
        Duration::from_secs(10),
        || async { (node_state(&admin, "replica1").await != "up").then_some(()) },
    )
    .await;
    let during = ok.load(Ordering::Relaxed);
    eventually(
        "reads to go on without replica1",
        Duration::from_secs(10),
        || async { (ok.load(Ordering::Relaxed) > during + 100).then_some(()) },
    )
    .await;

    stack.start("replica1").await;
    eventually(
        "replica1 to return to up",
        Duration::from_secs(20),
        || async { (node_state(&admin, "replica1").await == "up").then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no read failed");
    assert!(ok.load(Ordering::Relaxed) > 200);
}

async fn a_stopped_primary_keeps_reads_and_fails_writes_fast(paths: Paths) {
    let stack = Stack::private().await;
    let app = TestApp::spawn_with(unthrottled(&stack, paths)).await;
    let user = app.new_user().await;
    let admin = app.new_admin().await;
    let id = user
        .new_conversation(json!([{"role": "user", "content": "hello"}]))
        .await;
    // The key and the conversation are on the replicas before the primary goes.
    eventually(
        "replicas to have the conversation",
        Duration::from_secs(10),
        || async {
            (user.list_items(&id, "?consistency=eventual").await.status == 200).then_some(())
        },
    )
    .await;

    stack.stop("primary").await;

    // The first write after the stop, before any health probe noticed, already fails within 1 s.
    let started = Instant::now();
    let refused = user
        .add_items(&id, json!([{"role": "user", "content": "lost?"}]))
        .await;
    let elapsed = started.elapsed();
    let error = refused.error(503);
    assert_eq!(error["type"], "service_unavailable");
    assert!(
        refused.headers.get("retry-after").is_some(),
        "503 carries Retry-After"
    );
    assert!(
        elapsed < Duration::from_millis(1_500),
        "write took {elapsed:?}"
    );

    eventually(
        "the primary to be marked down",
        Duration::from_secs(10),
        || async { (node_state(&admin, "primary").await == "down").then_some(()) },
    )
    .await;
    let started = Instant::now();
    user.call("POST", "/v1/conversations", Some(json!({})))
        .await
        .error(503);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a known-down primary fails writes at once"
    );

    for _ in 0..50 {
        let page = user.list_items(&id, "?order=asc").await;
        assert_eq!(
            page.ok()["data"].as_array().unwrap().len(),
            1,
            "reads go on from replicas"
        );
        user.call("GET", &format!("/v1/conversations/{id}"), None)
            .await
            .ok();
    }
    app.http
        .get(format!("{}/readyz", app.url))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();

    stack.start("primary").await;
    eventually("writes to work again", Duration::from_secs(20), || async {
        let added = user
            .add_items(&id, json!([{"role": "user", "content": "back"}]))
            .await;
        (added.status == 200).then_some(())
    })
    .await;
    let page = user.list_items(&id, "?order=asc").await;
    let texts: Vec<&str> = page.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["content"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["hello", "back"],
        "nothing was lost, the refused write was not stored"
    );
}

/// A strong read stuck behind a lock on the primary (as a migration's DDL
/// would hold) fails alone with a 504: the primary stays `up`, and writes
/// to other tables, running the whole time, all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_query_fails_alone_and_never_takes_the_primary_down() {
    let stack = Stack::private().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.database.read_attempt_timeout_ms = 500;
    settings.cache.enabled = false;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let admin = app.new_admin().await;
    let mut conversations = Vec::new();
    for _ in 0..4 {
        let reply = user
            .create_conversation(json!({"items": [{"role": "user", "content": "hello"}]}))
            .await;
        conversations.push(reply.ok()["id"].as_str().unwrap().to_owned());
    }

    // A session holds the items table exclusively for three seconds.
    let holder = stack.superuser("primary").await;
    let mut lock = holder.begin().await.unwrap();
    sqlx::query("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let held_until = Instant::now() + Duration::from_secs(3);

    let writer = {
        let (user, id) = (user.clone(), conversations[0].clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            let mut n = 0;
            while Instant::now() < held_until {
                n += 1;
                let reply = user
                    .call(
                        "POST",
                        &format!("/v1/conversations/{id}"),
                        Some(json!({"metadata": {"n": n.to_string()}})),
                    )
                    .await;
                if reply.status == 200 {
                    ok += 1;
                } else {
                    failed.push((reply.status, reply.body.clone()));
                }
            }
            (ok, failed)
        })
    };
    let mut readers = Vec::new();
    for id in &conversations {
        let (user, id) = (user.clone(), id.clone());
        readers.push(tokio::spawn(async move {
            user.call(
                "GET",
                &format!("/v1/conversations/{id}/items?consistency=strong"),
                None,
            )
            .await
        }));
    }
    for reader in readers {
        let reply = reader.await.unwrap();
        let error = reply.error(504);
        assert_eq!(error["code"], "query_timeout");
    }
    assert_eq!(node_state(&admin, "primary").await, "up");
    tokio::time::sleep_until(tokio::time::Instant::from_std(held_until)).await;
    lock.rollback().await.unwrap();
    let (ok, failed) = writer.await.unwrap();
    assert!(
        failed.is_empty(),
        "writes failed beside the slow reads: {failed:?}"
    );
    assert!(ok > 10, "only {ok} writes");
    assert_eq!(node_state(&admin, "primary").await, "up");
    // Once the lock is gone, the same reads answer.
    user.call(
        "GET",
        &format!(
            "/v1/conversations/{}/items?consistency=strong",
            conversations[0]
        ),
        None,
    )
    .await
    .ok();
}
