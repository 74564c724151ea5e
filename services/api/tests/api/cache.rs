//! The read cache against the real topology: a miss storm over two api
//! processes costs Postgres one query, negative answers are cached, a write
//! is never hidden by a cached page on another process, a stale fill cannot
//! land after an invalidation, and a Redis outage degrades to Postgres and
//! recovers without a restart. pg_stat_statements counts a statement when
//! it ends, so counts read after the requests returned are final.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use turnpike_core::cache::{Cache, Lookup};
use turnpike_core::db::Lsn;
use turnpike_testkit::{NODES, Paths, Stack, TestApp, User, eventually};

/// The item-page statement and the conversation lookup, as pg_stat_statements records them.
const ITEM_PAGE: &str = "LEFT JOIN LATERAL (SELECT id, kind, body FROM items";
const CONVERSATION: &str = "FROM conversations WHERE id = $1 AND user_id = $2";
const KEY_LOOKUP: &str = "FROM api_keys WHERE key_hash = $1";

async fn calls(stack: &Stack, pattern: &str) -> i64 {
    let mut total = 0;
    for node in NODES {
        total += stack.statement_calls(node, pattern).await;
    }
    total
}

/// `n` concurrent GETs of `path`, spread over `users` (one per api
/// process); returns every (status, body).
async fn storm(users: &[User], path: &str, n: usize) -> Vec<(u16, Value)> {
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let user = users[i % users.len()].clone();
        let path = path.to_owned();
        tasks.push(tokio::spawn(async move {
            let reply = user.call("GET", &path, None).await;
            (reply.status, reply.body)
        }));
    }
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_storm_reaches_postgres_once_and_redis_outages_degrade_to_postgres() {
    let stack = Stack::private().await;
    let mut settings = stack.settings(Paths::DIRECT);
    // Generous lease times: on a busy 2-core machine the one fill may take
    // longer than the defaults allow, and the point here is that it is one.
    settings.cache.lease_ms = 20_000;
    settings.cache.lease_wait_ms = 15_000;
    // Likewise Redis round trips: one that timed out under the storm would
    // fall back to Postgres by design, which is not what is measured here.
    settings.redis.timeout_ms = 5_000;
    let first = TestApp::spawn_with(settings.clone()).await;
    let second = TestApp::spawn_with(settings.clone()).await;
    let user = first.new_user().await;
    let users = [user.clone(), user.on(&second)];
    let conversation = user
        .create_conversation(json!({"items": [
            {"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]}))
        .await
        .ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    stack.wait_replicated().await;
    let page = format!("/v1/conversations/{conversation}/items?limit=20");

    // 1,000 concurrent reads of a cold page over two processes: one query.
    // The second process has never seen the key: it finds it in Redis.
    let (pages_before, lookups_before, keys_before) = (
        calls(&stack, ITEM_PAGE).await,
        calls(&stack, CONVERSATION).await,
        calls(&stack, KEY_LOOKUP).await,
    );
    let replies = storm(&users, &page, 1_000).await;
    assert!(replies.iter().all(|(status, _)| *status == 200));
    assert!(replies.iter().all(|(_, body)| *body == replies[0].1));
    assert_eq!(replies[0].1["data"].as_array().unwrap().len(), 2);
    let pages = calls(&stack, ITEM_PAGE).await - pages_before;
    let lookups = calls(&stack, CONVERSATION).await - lookups_before;
    let keys = calls(&stack, KEY_LOOKUP).await - keys_before;
    println!(
        "miss_storm_two_processes: 1000 reads, {pages} item-page queries, {lookups} conversation lookups, {keys} key lookups"
    );
    assert_eq!(pages, 1, "item-page queries for 1,000 cold reads");
    assert!(lookups <= 1);
    assert_eq!(keys, 0, "the key was cached in Redis by the first process");

    // The same through one process.
    let single = format!("/v1/conversations/{conversation}/items?limit=5&order=asc");
    let before = calls(&stack, ITEM_PAGE).await;
    let replies = storm(&users[..1], &single, 1_000).await;
    assert!(
        replies
            .iter()
            .all(|(status, body)| *status == 200 && *body == replies[0].1)
    );
    assert_eq!(calls(&stack, ITEM_PAGE).await - before, 1);

    // Not found is cached too: 500 reads of a conversation that does not exist.
    let missing = "/v1/conversations/conv_01a2000000007000800000000000beef/items";
    let before = calls(&stack, ITEM_PAGE).await;
    let replies = storm(&users, missing, 500).await;
    assert!(replies.iter().all(|(status, _)| *status == 404));
    assert_eq!(calls(&stack, ITEM_PAGE).await - before, 1);

    // Redis goes away: reads and writes go on from Postgres, uncached.
    stack.stop("redis").await;
    let added = users[0]
        .add_items(&conversation, json!([{"role": "user", "content": "three"}]))
        .await;
    added.ok();
    for u in &users {
        let reply = u.call("GET", &page, None).await;
        assert_eq!(
            reply.ok()["data"].as_array().unwrap().len(),
            3,
            "{}",
            reply.body
        );
    }
    let before = calls(&stack, ITEM_PAGE).await;
    for u in &users {
        u.call("GET", &page, None).await.ok();
    }
    assert_eq!(
        calls(&stack, ITEM_PAGE).await - before,
        2,
        "uncached while Redis is down"
    );

    // Redis is back: the cache works again, without a restart, and holds
    // the new page.
    stack.start("redis").await;
    eventually(
        "the cache to serve again",
        Duration::from_secs(30),
        || async {
            let before = calls(&stack, ITEM_PAGE).await;
            for _ in 0..3 {
                let reply = users[1].call("GET", &page, None).await;
                assert_eq!(reply.ok()["data"].as_array().unwrap().len(), 3);
            }
            (calls(&stack, ITEM_PAGE).await - before <= 1).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_never_hidden_by_another_processs_cached_page() {
    let stack = Stack::shared().await;
    let settings = stack.settings(Paths::DIRECT);
    let first = TestApp::spawn_with(settings.clone()).await;
    let second = TestApp::spawn_with(settings).await;
    let writer = first.new_user().await;
    let reader = writer.on(&second);
    let conversation = writer.create_conversation(json!({})).await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let page = format!("/v1/conversations/{conversation}/items?order=asc&limit=100");
    for i in 0..20 {
        // The other process has the page cached (L1 and L2)...
        let cached = reader.call("GET", &page, None).await;
        assert_eq!(cached.ok()["data"].as_array().unwrap().len(), i);
        // ...a write lands through this one...
        let written = writer
            .add_items(
                &conversation,
                json!([{"role": "user", "content": format!("message {i}")}]),
            )
            .await;
        let token = written.token().unwrap();
        // ...and the other process shows it at once: with the token, and
        // without it (the writer's session window).
        let with_token = reader
            .call_with("GET", &page, None, &[("turnpike-consistency", &token)])
            .await;
        let data = with_token.ok()["data"].as_array().unwrap().clone();
        assert_eq!(data.len(), i + 1, "round {i}, with the token");
        assert_eq!(data[i]["content"][0]["text"], format!("message {i}"));
        let without = reader.call("GET", &page, None).await;
        assert_eq!(
            without.ok()["data"].as_array().unwrap().len(),
            i + 1,
            "round {i}"
        );
        // The conversation object is cached too, and follows its writes.
        let meta = json!({"round": i.to_string()});
        writer
            .call(
                "POST",
                &format!("/v1/conversations/{conversation}"),
                Some(json!({"metadata": meta})),
            )
            .await
            .ok();
        let seen = reader
            .call("GET", &format!("/v1/conversations/{conversation}"), None)
            .await;
        assert_eq!(seen.ok()["metadata"], meta);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_that_read_before_a_write_cannot_land_after_it() {
    let stack = Stack::shared().await;
    let settings = stack.settings(Paths::DIRECT);
    let kv = turnpike_core::kv::Kv::new(&settings.redis).unwrap();
    let slow = Cache::start(settings.cache.clone(), kv.clone(), settings.redis.url()).unwrap();
    let other = Cache::start(settings.cache.clone(), kv.clone(), settings.redis.url()).unwrap();
    let conversation = uuid::Uuid::now_v7();
    let lookup = move || Lookup {
        conversation,
        field: "page",
        session: None,
    };

    // A slow filler takes the lease and reads the old rows...
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let filler = {
        let slow = slow.clone();
        tokio::spawn(async move {
            slow.get(lookup(), |_floor| async move {
                let _ = released.await;
                Ok::<_, std::io::Error>(Some(bytes::Bytes::from_static(b"old")))
            })
            .await
            .unwrap()
        })
    };
    let leases = format!("tp:{{conv_{}}}:leases", conversation.simple());
    eventually(
        "the filler to hold the lease",
        Duration::from_secs(5),
        || {
            let kv = kv.clone();
            let leases = leases.clone();
            async move {
                let held: i64 = kv
                    .run(|mut conn| async move {
                        redis::cmd("HLEN").arg(leases).query_async(&mut conn).await
                    })
                    .await
                    .unwrap();
                (held == 1).then_some(())
            }
        },
    )
    .await;
    // ...a write is committed and invalidates...
    other.invalidate(conversation, Lsn(100)).await;
    // ...then the old rows arrive: the filler's own caller gets them (it
    // asked before the write), but they do not land in the cache.
    release.send(()).unwrap();
    assert_eq!(filler.await.unwrap().body.as_deref(), Some(&b"old"[..]));
    let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let fresh = {
        let loads = Arc::clone(&loads);
        other
            .get(lookup(), move |floor| async move {
                loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // The fill reads at least at the write's position.
                assert_eq!(floor, Lsn(100));
                Ok::<_, std::io::Error>(Some(bytes::Bytes::from_static(b"new")))
            })
            .await
            .unwrap()
    };
    assert_eq!(fresh.body.as_deref(), Some(&b"new"[..]));
    assert_eq!(loads.load(std::sync::atomic::Ordering::SeqCst), 1);
    // And the slow process, once told (pub/sub), reads the new value from L2.
    eventually(
        "the slow process to drop its old entry",
        Duration::from_secs(5),
        || async {
            let seen = slow
                .get(lookup(), |_| async {
                    Ok::<_, std::io::Error>(Some(bytes::Bytes::from_static(b"wrong")))
                })
                .await
                .unwrap();
            assert_ne!(seen.body.as_deref(), Some(&b"wrong"[..]));
            (seen.body.as_deref() == Some(&b"new"[..])).then_some(())
        },
    )
    .await;
}
