//! Rate limits at every layer, each lowered for the test: a key's burst in
//! one process, a user's rate across two api processes sharing Redis, the
//! cap on a user's active turns, the daily token budget fed by turn usage,
//! and a Redis outage under both failure policies. Each limit answers 429
//! with `Retry-After` and the RateLimit fields at its threshold, then
//! recovers.

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use turnpike_core::Settings;
use turnpike_core::config::RedisFailurePolicy;
use turnpike_core::limits::{UtcDay, tokens_key};
use turnpike_testkit::{Agents, Paths, Reply, Stack, TestApp, User, eventually};
use uuid::Uuid;

both_paths!(active_turns_are_capped_per_user_exactly);
both_paths!(turns_that_start_conversations_are_capped_past_the_headroom);

/// A header's field lines joined into one list, as Structured Fields reads them.
fn field(headers: &HeaderMap, name: &str) -> String {
    headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect::<Vec<_>>()
        .join(", ")
}

fn retry_after(reply: &Reply) -> u64 {
    reply
        .headers
        .get("retry-after")
        .expect("a 429 carries Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Asserts a 429 in the one error shape with `code`.
#[track_caller]
fn assert_refused(reply: &Reply, code: &str) {
    let error = reply.error(429);
    assert_eq!(error["type"], "rate_limit_error", "{}", reply.body);
    assert_eq!(error["code"], code, "{}", reply.body);
    assert!(retry_after(reply) >= 1);
}

/// Another key for the same user, and the user's id.
async fn another_key(app: &TestApp, user: &User) -> (User, Uuid) {
    let router = turnpike_core::db::Router::new(&app.settings.database).unwrap();
    let mut tx = router.write().await.unwrap();
    let key = turnpike_core::auth::create_key(&mut tx, &user.name, false)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    (
        User {
            key: key.secret,
            ..user.clone()
        },
        key.user_id,
    )
}

/// `redis-cli` against the stack's Redis; its answer, trimmed.
fn redis_cli(stack: &Stack, args: &[&str]) -> String {
    let port = stack.env["TURNPIKE__REDIS__URL"]
        .rsplit(':')
        .next()
        .unwrap();
    let output = std::process::Command::new("redis-cli")
        .args(["-p", port])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Settings with every limit off, for a test to turn on the one it is about.
fn without_limits(mut settings: Settings) -> Settings {
    settings.limits.key_requests_per_s = 0;
    settings.limits.user_requests_per_s = 0;
    settings.limits.active_turns_per_user = 0;
    settings.limits.daily_tokens_per_user = 0;
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_gets_its_burst_then_429_then_recovers() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    // One request a second, three at once; the per-user rate keeps its default.
    settings.limits.key_requests_per_s = 1;
    settings.limits.key_burst = 3;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;

    let mut remaining = Vec::new();
    for _ in 0..3 {
        let reply = user.call("GET", "/v1/conversations", None).await;
        reply.ok();
        assert_eq!(
            field(&reply.headers, "ratelimit-policy"),
            r#""key";q=3;w=3, "user";q=20000;w=2"#
        );
        let state = field(&reply.headers, "ratelimit");
        remaining.push(state.split(", ").next().unwrap().to_owned());
        assert!(state.contains(r#""user";r="#), "{state}");
    }
    assert_eq!(
        remaining,
        [r#""key";r=2;t=1"#, r#""key";r=1;t=1"#, r#""key";r=0;t=1"#]
    );

    let refused = user.call("GET", "/v1/conversations", None).await;
    assert_refused(&refused, "rate_limited");
    assert_eq!(retry_after(&refused), 1);
    assert_eq!(
        field(&refused.headers, "ratelimit-policy"),
        r#""key";q=3;w=3"#
    );
    assert_eq!(field(&refused.headers, "ratelimit"), r#""key";r=0;t=1"#);

    // Per key: the same user's other key is not held back.
    let (other, _) = another_key(&app, &user).await;
    other.call("GET", "/v1/conversations", None).await.ok();
    // Only authenticated callers are counted; a bad key is still a 401.
    let stranger = User {
        key: "tp_unknown".into(),
        ..user.clone()
    };
    stranger
        .call("GET", "/v1/conversations", None)
        .await
        .error(401);

    // The emission interval later, one more request goes through.
    let recovered = eventually(
        "the key's limit to let a request through again",
        Duration::from_secs(5),
        || async {
            let reply = user.call("GET", "/v1/conversations", None).await;
            (reply.status == 200).then_some(reply)
        },
    )
    .await;
    assert!(field(&recovered.headers, "ratelimit").starts_with(r#""key";r="#));
    assert!(
        app.metrics()
            .await
            .contains(r#"turnpike_rate_limited_total{limit="key"}"#)
    );

    // Every /v1/ operation documents its 429.
    let doc: serde_json::Value = app
        .http
        .get(format!("{}/openapi.json", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let refused =
        &doc["paths"]["/v1/conversations/{conversation_id}/items"]["get"]["responses"]["429"];
    for header in ["Retry-After", "RateLimit-Policy", "RateLimit"] {
        assert!(refused["headers"][header].is_object(), "{refused}");
    }
}

/// Two api processes sharing Redis, with only the per-user rate on.
async fn two_apps_with_user_rate(per_s: u32, burst: u32) -> (TestApp, TestApp) {
    let stack = Stack::shared().await;
    let mut settings = without_limits(stack.settings(Paths::DIRECT));
    settings.limits.user_requests_per_s = per_s;
    settings.limits.user_burst = burst;
    let first = TestApp::spawn_with(settings.clone()).await;
    let second = TestApp::spawn_with(settings).await;
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_is_limited_across_two_api_processes_then_recovers() {
    let (first, second) = two_apps_with_user_rate(1, 4).await;
    let user = first.new_user().await;
    let (other_key, _) = another_key(&first, &user).await;
    let on_second = other_key.on(&second);

    // Four requests in all, alternating processes and keys, share one quota.
    let mut states = Vec::new();
    for caller in [&user, &on_second, &user, &on_second] {
        let reply = caller.call("GET", "/v1/conversations", None).await;
        reply.ok();
        assert_eq!(
            field(&reply.headers, "ratelimit-policy"),
            r#""user";q=4;w=4"#
        );
        states.push(field(&reply.headers, "ratelimit"));
    }
    assert_eq!(
        states,
        [
            r#""user";r=3;t=1"#,
            r#""user";r=2;t=1"#,
            r#""user";r=1;t=1"#,
            r#""user";r=0;t=1"#
        ]
    );

    for caller in [&user, &on_second] {
        let refused = caller.call("GET", "/v1/conversations", None).await;
        assert_refused(&refused, "rate_limited");
        assert_eq!(retry_after(&refused), 1);
        assert_eq!(
            field(&refused.headers, "ratelimit-policy"),
            r#""user";q=4;w=4"#
        );
        assert_eq!(field(&refused.headers, "ratelimit"), r#""user";r=0;t=1"#);
    }
    // Another user is not affected.
    first
        .new_user()
        .await
        .on(&second)
        .call("GET", "/v1/conversations", None)
        .await
        .ok();

    // One emission interval later the user may send one more, on either process.
    eventually(
        "the user's limit to let a request through again",
        Duration::from_secs(5),
        || async {
            (on_second
                .call("GET", "/v1/conversations", None)
                .await
                .status
                == 200)
                .then_some(())
        },
    )
    .await;
    assert_refused(
        &user.call("GET", "/v1/conversations", None).await,
        "rate_limited",
    );
    assert!(
        first
            .metrics()
            .await
            .contains(r#"turnpike_rate_limited_total{limit="user"}"#)
    );

    // Concurrent requests are checked in batches per process: still exact.
    // 40 at once over both processes, with a burst of 4: 4 pass (plus one
    // per second the storm lasts).
    let storm = first.new_user().await;
    let started = std::time::Instant::now();
    let mut racing = tokio::task::JoinSet::new();
    for i in 0..40 {
        let caller = if i % 2 == 0 {
            storm.clone()
        } else {
            storm.on(&second)
        };
        racing.spawn(async move { caller.call("GET", "/v1/conversations", None).await });
    }
    let mut admitted = 0;
    while let Some(reply) = racing.join_next().await {
        let reply = reply.unwrap();
        if reply.status == 200 {
            admitted += 1;
        } else {
            assert_refused(&reply, "rate_limited");
        }
    }
    let refilled = started.elapsed().as_secs();
    assert!(
        (4..=4 + refilled).contains(&admitted),
        "{admitted} admitted in {:?}",
        started.elapsed()
    );
}

/// The quota a process takes ahead for a busy user follows what the user
/// spends there, not the user's rate: a process taking a fixed share of the
/// rate every few milliseconds, used or not, left too little for the other
/// processes serving the same user, which then refused it far under its
/// limit. Two processes, each serving the user at a fifth of its rate for
/// two seconds: nothing is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_well_under_its_rate_on_two_processes_is_never_refused() {
    let (first, second) = two_apps_with_user_rate(1_000, 100).await;
    let user = first.new_user().await;
    // Four callers per process, each a request every 20 ms: 200 a second per process.
    let mut callers = tokio::task::JoinSet::new();
    for i in 0..8 {
        let caller = if i % 2 == 0 {
            user.clone()
        } else {
            user.on(&second)
        };
        callers.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut refused = Vec::new();
            for _ in 0..100 {
                tick.tick().await;
                let reply = caller.call("GET", "/v1/conversations", None).await;
                if reply.status != 200 {
                    refused.push(format!("{} {}", reply.status, reply.body));
                }
            }
            refused
        });
    }
    let mut refused = Vec::new();
    while let Some(found) = callers.join_next().await {
        refused.extend(found.unwrap());
    }
    assert!(
        refused.is_empty(),
        "{} of 800 refused: {:?}",
        refused.len(),
        refused.first()
    );
}

async fn active_turns_are_capped_per_user_exactly(paths: Paths) {
    let stack = Stack::shared().await;
    let mut settings = without_limits(stack.settings(paths));
    settings.limits.active_turns_per_user = 2;
    // Answers that take minutes: turns stay in progress until cancelled.
    let _agents = Agents::spawn_slow(&mut settings, 5, 1_000).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let turn = json!({"input": "tell me a long story", "background": true});

    let first = user.create_background(turn.clone()).await;
    let second = user.create_background(turn.clone()).await;
    for id in [&first, &second] {
        eventually(
            "the turn to be in progress",
            Duration::from_secs(20),
            || async {
                let reply = user.call("GET", &format!("/v1/responses/{id}"), None).await;
                (reply.body["status"] == "in_progress").then_some(())
            },
        )
        .await;
    }

    let refused = user.call("POST", "/v1/responses", Some(turn.clone())).await;
    assert_refused(&refused, "too_many_active_turns");
    assert_eq!(retry_after(&refused), 1);
    assert_eq!(
        field(&refused.headers, "ratelimit-policy"),
        r#""turns";q=2;qu="concurrent-requests""#
    );
    assert_eq!(field(&refused.headers, "ratelimit"), r#""turns";r=0"#);
    // A refusal is not kept for an Idempotency-Key: the retry runs again.
    let keyed = [("idempotency-key", "turn-after-cancel")];
    let refused = user
        .call_with("POST", "/v1/responses", Some(turn.clone()), &keyed)
        .await;
    assert_refused(&refused, "too_many_active_turns");

    // One slot frees up; of six racing creates exactly one gets it.
    user.call("POST", &format!("/v1/responses/{first}/cancel"), None)
        .await
        .ok();
    let mut racing = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (user, turn) = (user.clone(), turn.clone());
        racing.spawn(async move { user.call("POST", "/v1/responses", Some(turn)).await });
    }
    let mut created = Vec::new();
    while let Some(reply) = racing.join_next().await {
        let reply = reply.unwrap();
        if reply.status == 200 {
            created.push(reply.body["id"].as_str().unwrap().to_owned());
        } else {
            assert_refused(&reply, "too_many_active_turns");
        }
    }
    assert_eq!(created.len(), 1, "exactly one create fits under the cap");

    // A finished turn frees its slot as well: the keyed retry now runs.
    user.call("POST", &format!("/v1/responses/{second}/cancel"), None)
        .await
        .ok();
    let third = user
        .call_with("POST", "/v1/responses", Some(turn), &keyed)
        .await;
    assert_eq!(third.ok()["status"], "queued");
    for id in created
        .iter()
        .chain([third.body["id"].as_str().unwrap().to_owned()].iter())
    {
        user.call("POST", &format!("/v1/responses/{id}/cancel"), None)
            .await
            .ok();
    }
    assert!(
        app.metrics()
            .await
            .contains(r#"turnpike_rate_limited_total{limit="turns"}"#)
    );
}

/// A turn that starts a conversation is created in one call while its user
/// is clear of the limits by the headroom; past that it is counted in full,
/// and the cap holds exactly.
async fn turns_that_start_conversations_are_capped_past_the_headroom(paths: Paths) {
    let stack = Stack::shared().await;
    let mut settings = without_limits(stack.settings(paths));
    // Headroom 2: six turns at a glance, the seventh and eighth counted.
    settings.limits.active_turns_per_user = 8;
    // No worker: every turn stays queued, and active.
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let turn = json!({"input": "hello", "background": true});
    let mut created = Vec::new();
    for _ in 0..8 {
        created.push(user.create_background(turn.clone()).await);
    }
    let refused = user.call("POST", "/v1/responses", Some(turn.clone())).await;
    assert_refused(&refused, "too_many_active_turns");
    // Each created turn holds its own new conversation and its input.
    let mut conversations = std::collections::HashSet::new();
    for id in &created {
        let reply = user.call("GET", &format!("/v1/responses/{id}"), None).await;
        let response = reply.ok();
        assert_eq!(response["status"], "queued");
        conversations.insert(response["conversation"]["id"].as_str().unwrap().to_owned());
        let input = user
            .call("GET", &format!("/v1/responses/{id}/input_items"), None)
            .await;
        assert_eq!(input.ok()["data"][0]["content"][0]["text"], "hello");
    }
    assert_eq!(conversations.len(), 8);
    // A cancelled turn frees its slot; the cap holds again after the next.
    user.call(
        "POST",
        &format!("/v1/responses/{}/cancel", created[0]),
        None,
    )
    .await
    .ok();
    user.create_background(turn.clone()).await;
    let refused = user.call("POST", "/v1/responses", Some(turn)).await;
    assert_refused(&refused, "too_many_active_turns");
}

/// A user's active turns as their striped count has them, and as the
/// responses themselves say.
async fn active_counts(settings: &Settings, user: &User) -> (i64, i64) {
    let router = turnpike_core::db::Router::new(&settings.database).unwrap();
    let mut tx = router.write().await.unwrap();
    let counts: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT coalesce(sum(a.turns), 0)::int8 FROM user_active_turns a
                   JOIN users u ON u.id = a.user_id WHERE u.name = $1),
                (SELECT count(*) FROM responses r JOIN users u ON u.id = r.user_id
                  WHERE u.name = $1 AND r.status IN ('queued', 'in_progress'))",
    )
    .bind(&user.name)
    .persistent(false)
    .fetch_one(turnpike_core::db::DbConn::conn(&mut tx))
    .await
    .unwrap();
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_count_of_active_turns_follows_every_start_and_end() {
    let stack = Stack::shared().await;
    let mut settings = without_limits(stack.settings(Paths::PGBOUNCER));
    settings.limits.active_turns_per_user = 100;
    // No worker at first: every turn stays queued.
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let turn = json!({"input": "/echo hi", "background": true});
    let mut fresh = Vec::new();
    for _ in 0..3 {
        fresh.push(user.create_background(turn.clone()).await);
    }
    let conversation = user.create_conversation(json!({})).await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let in_conversation =
        json!({"conversation": conversation, "input": "/echo again", "background": true});
    let running = user.create_background(in_conversation.clone()).await;
    let waiting = user.create_background(in_conversation.clone()).await;
    assert_eq!(active_counts(&settings, &user).await, (5, 5));
    // A cancelled turn and a deleted one end.
    user.call("POST", &format!("/v1/responses/{}/cancel", fresh[0]), None)
        .await
        .ok();
    user.call("DELETE", &format!("/v1/responses/{}", fresh[1]), None)
        .await
        .ok();
    assert_eq!(active_counts(&settings, &user).await, (3, 3));
    // An interrupt ends the turns it replaces and adds itself.
    let interrupt = json!({"conversation": conversation, "input": "/echo now", "background": true, "multitask": "interrupt"});
    let urgent = user.create_background(interrupt).await;
    for id in [&running, &waiting] {
        let reply = user.call("GET", &format!("/v1/responses/{id}"), None).await;
        assert_eq!(reply.ok()["status"], "cancelled");
    }
    assert_eq!(active_counts(&settings, &user).await, (2, 2));
    // Workers run what is left to its end.
    let _agents = Agents::spawn(&mut settings).await;
    for id in [&fresh[2], &urgent] {
        eventually("the turn to complete", Duration::from_secs(20), || async {
            let reply = user.call("GET", &format!("/v1/responses/{id}"), None).await;
            (reply.body["status"] == "completed").then_some(())
        })
        .await;
    }
    assert_eq!(active_counts(&settings, &user).await, (0, 0));
}

/// Whether a conversation has an active turn, and which of its turns runs
/// next, are asked on every create, start and finish. With one user's
/// turns queued in 300 conversations, the plans a session caches for those
/// questions (generic ones) read that conversation's entries only, on an
/// index keyed on it, and every partial index over active turns is keyed
/// on the conversation. (The plan that read all of a busy user's active
/// turns came from the statistics of a table after thousands of one user's
/// turns, which a test database does not reach; the index it used, keyed
/// on the user, is gone.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversations_active_turns_are_read_without_the_users_others() {
    let stack = Stack::shared().await;
    let settings = without_limits(stack.settings(Paths::DIRECT));
    // No worker: every turn stays queued.
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let pool = stack.superuser("primary").await;
    let turn = json!({"input": "/echo hi", "background": true});
    let mut last = String::new();
    for _ in 0..300 {
        last = user.create_background(turn.clone()).await;
    }
    let reply = user
        .call("GET", &format!("/v1/responses/{last}"), None)
        .await;
    let conversation = reply.ok()["conversation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let conversation = turnpike_core::ids::parse("conv", &conversation).unwrap();
    // No partial index over active turns that a plan could read for one
    // conversation without its key: each is keyed on the conversation.
    let partial: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.relname::text, pg_get_indexdef(i.indexrelid, 1, true)
           FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
          WHERE i.indrelid = 'responses'::regclass AND i.indpred IS NOT NULL",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(!partial.is_empty());
    for (index, first_key) in &partial {
        assert_eq!(
            first_key, "conversation_id",
            "{index} is keyed on {first_key}"
        );
    }
    let mut db = pool.acquire().await.unwrap();
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *db)
        .await
        .unwrap();
    for (name, question) in [
        (
            "active",
            "SELECT 1 FROM responses WHERE conversation_id = $1 AND status IN ('queued', 'in_progress') LIMIT 1",
        ),
        (
            "next",
            "SELECT q.id FROM responses q WHERE q.conversation_id = $1 AND q.status = 'queued'
               AND NOT EXISTS (SELECT 1 FROM responses a WHERE a.conversation_id = $1 AND a.status = 'in_progress')
             ORDER BY q.id LIMIT 1",
        ),
    ] {
        let statement = format!("q_{name}_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(&format!("PREPARE {statement}(uuid) AS {question}"))
            .execute(&mut *db)
            .await
            .unwrap();
        let plan: Vec<(String,)> = sqlx::query_as(&format!(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) EXECUTE {statement}('{conversation}')"
        ))
        .fetch_all(&mut *db)
        .await
        .unwrap();
        let plan: Vec<String> = plan.into_iter().map(|(line,)| line).collect();
        let removed: u64 = plan
            .iter()
            .filter_map(|line| line.split("Rows Removed by Filter: ").nth(1))
            .map(|n| n.trim().parse::<u64>().unwrap())
            .sum();
        assert!(removed <= 5, "{name} read the user's other turns:\n{}", plan.join("\n"));
        assert!(
            plan.iter().any(|line| line.contains("Index Cond: (conversation_id = $1)")),
            "{name}:\n{}",
            plan.join("\n")
        );
    }
}

/// An interrupt cancels the turns it replaces before it appends its input;
/// a create in an idle conversation appends its input before it inserts
/// its response. In two conversations of one user whose counts share a
/// stripe, the two run side by side without a deadlock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupts_and_creates_sharing_a_stripe_never_deadlock() {
    let stack = Stack::shared().await;
    let settings = without_limits(stack.settings(Paths::PGBOUNCER));
    // No worker: an interrupted conversation always has a turn to cancel.
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let stripe = |id: &str| {
        let id = turnpike_core::ids::parse("conv", id).unwrap();
        id.as_bytes()[15] % 16
    };
    let mut seen: std::collections::HashMap<u8, String> = Default::default();
    let (a, b) = loop {
        let id = user.create_conversation(json!({})).await.ok()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        if let Some(other) = seen.insert(stripe(&id), id.clone()) {
            break (other, id);
        }
    };
    let interrupts = {
        let user = user.clone();
        tokio::spawn(async move {
            let turn = json!({"conversation": a, "input": "now", "background": true, "multitask": "interrupt"});
            let mut failed = Vec::new();
            for _ in 0..60 {
                let reply = user.call("POST", "/v1/responses", Some(turn.clone())).await;
                if reply.status != 200 {
                    failed.push(format!("{} {}", reply.status, reply.body));
                }
            }
            failed
        })
    };
    let turn = json!({"conversation": b, "input": "hello", "background": true});
    let mut failed = Vec::new();
    for _ in 0..60 {
        let reply = user.call("POST", "/v1/responses", Some(turn.clone())).await;
        if reply.status != 200 {
            failed.push(format!("{} {}", reply.status, reply.body));
            continue;
        }
        // Idle again for the next create.
        let id = reply.body["id"].as_str().unwrap_or_default().to_owned();
        let cancelled = user
            .call("POST", &format!("/v1/responses/{id}/cancel"), None)
            .await;
        if cancelled.status != 200 {
            failed.push(format!("{} {}", cancelled.status, cancelled.body));
        }
    }
    failed.extend(interrupts.await.unwrap());
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        failed.first()
    );
}

/// A create that PostgreSQL picks to break a deadlock is rolled back and
/// answered 503 with Retry-After, in the one error shape; its retry runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_chosen_to_break_a_deadlock_is_answered_503_to_retry() {
    let stack = Stack::shared().await;
    let settings = without_limits(stack.settings(Paths::DIRECT));
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let conversation = user.create_conversation(json!({})).await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = turnpike_core::ids::parse("conv", &conversation).unwrap();
    let router = turnpike_core::db::Router::new(&settings.database).unwrap();
    // Whichever waiter checks first after `deadlock_timeout` (1 s) is
    // rolled back: the create, which waits first, unless the machine was
    // so slow that its check ran before this side closed the cycle.
    let mut refused = None;
    for _ in 0..3 {
        // Hold the stripe of the user's stored bytes the create adds to.
        let mut mine = router.write().await.unwrap();
        sqlx::query(
            "INSERT INTO user_stored_bytes AS s (user_id, stripe, bytes)
             SELECT user_id, turnpike_storage_stripe(id), 0 FROM conversations WHERE id = $1
             ON CONFLICT (user_id, stripe) DO UPDATE SET bytes = s.bytes",
        )
        .bind(id)
        .execute(turnpike_core::db::DbConn::conn(&mut mine))
        .await
        .unwrap();
        // The create locks the conversation, then waits for the stripe.
        let create = {
            let user = user.clone();
            let turn = json!({"conversation": conversation, "input": "hi", "background": true});
            tokio::spawn(async move { user.call("POST", "/v1/responses", Some(turn)).await })
        };
        eventually(
            "the create to wait for the stripe",
            Duration::from_secs(10),
            || async {
                let mut probe = router.write().await.ok()?;
                let (waiting,): (i64,) = sqlx::query_as(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE wait_event_type = 'Lock' AND query LIKE '%turnpike_create_turn%'",
                )
                .fetch_one(turnpike_core::db::DbConn::conn(&mut probe))
                .await
                .ok()?;
                (waiting > 0).then_some(())
            },
        )
        .await;
        // This side now waits for the conversation: a deadlock.
        let closed = sqlx::query("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE")
            .bind(id)
            .execute(turnpike_core::db::DbConn::conn(&mut mine))
            .await;
        drop(mine);
        let reply = create.await.unwrap();
        if closed.is_ok() {
            refused = Some(reply);
            break;
        }
        // This side was rolled back instead, and the create went through:
        // cancelled, the conversation is idle for the next try.
        let id = reply.ok()["id"].as_str().unwrap_or_default().to_owned();
        user.call("POST", &format!("/v1/responses/{id}/cancel"), None)
            .await
            .ok();
    }
    let refused = refused.expect("the create was chosen once in three tries");
    assert_eq!(
        refused.error(503)["code"],
        "conflict_retry",
        "{}",
        refused.body
    );
    assert_eq!(retry_after(&refused), 1);
    let retried = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "input": "hi", "background": true})),
        )
        .await;
    assert_eq!(retried.ok()["status"], "queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_are_capped_per_user_in_each_process() {
    let stack = Stack::shared().await;
    let mut settings = without_limits(stack.settings(Paths::DIRECT));
    settings.limits.open_streams_per_user = 2;
    let _agents = Agents::spawn_slow(&mut settings, 40, 50).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let created = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "a long answer, please", "background": true})),
        )
        .await;
    let id = created.ok()["id"].as_str().unwrap().to_owned();
    let first = user.follow_until_answering(&id).await;
    let second = user.follow_until_answering(&id).await;
    let refused = user
        .call("GET", &format!("/v1/responses/{id}?stream=true"), None)
        .await;
    assert_refused(&refused, "too_many_streams");
    // A streamed create is refused before it creates a turn.
    let refused = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "hi", "stream": true})),
        )
        .await;
    assert_refused(&refused, "too_many_streams");
    let listed = user
        .call("GET", "/v1/conversations?consistency=strong", None)
        .await;
    assert_eq!(listed.ok()["data"].as_array().unwrap().len(), 1);
    // Another user is not held back.
    let other = app.new_user().await;
    let (status, events) = other
        .stream(
            "POST",
            "/v1/responses",
            Some(json!({"input": "/echo mine", "stream": true})),
            &[],
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(events.last().unwrap().data["type"], "response.completed");
    // Streams that end give their slots back.
    first.read_to_end().await;
    second.read_to_end().await;
    eventually(
        "a stream slot is free again",
        Duration::from_secs(5),
        || async {
            let (status, events) = user
                .stream("GET", &format!("/v1/responses/{id}?stream=true"), None, &[])
                .await;
            (status == 200 && !events.is_empty()).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_budget_stops_a_turn_between_model_calls_and_a_failed_turn_counts() {
    let stack = Stack::shared().await;
    let mut settings = without_limits(stack.settings(Paths::DIRECT));
    settings.limits.daily_tokens_per_user = 10;
    let _agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let (user, user_id) = another_key(&app, &app.new_user().await).await;
    // A tool loop: the first model call spends the whole budget, so the
    // turn stops before its second.
    let done = user
        .call(
            "POST",
            "/v1/responses",
            Some(
                json!({"input": "/call conversation_search {\"query\": \"toll\"}",
                        "tools": [{"type": "conversation_search"}]}),
            ),
        )
        .await;
    let body = done.ok();
    assert_eq!(body["status"], "failed", "{body}");
    assert_eq!(body["error"]["code"], "token_budget_exhausted");
    // What it spent is on the failed response and counted against the budget.
    let spent = body["usage"]["total_tokens"].as_u64().unwrap();
    assert!(spent >= 10, "{body}");
    let key = tokens_key(user_id, &UtcDay::of(SystemTime::now()).date());
    assert_eq!(redis_cli(&stack, &["GET", &key]), spent.to_string());
    let refused = user
        .call("POST", "/v1/responses", Some(json!({"input": "hi"})))
        .await;
    assert_refused(&refused, "token_budget_exhausted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_token_budget_is_fed_by_turn_usage() {
    let stack = Stack::shared().await;
    let mut settings = without_limits(stack.settings(Paths::DIRECT));
    settings.limits.daily_tokens_per_user = 50;
    let _agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let (user, user_id) = another_key(&app, &app.new_user().await).await;

    let done = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "/echo a budget is a plan"})),
        )
        .await;
    assert_eq!(done.ok()["status"], "completed");
    assert_eq!(
        field(&done.headers, "ratelimit-policy"),
        r#""tokens";q=50;qu="tokens";w=86400"#
    );
    let state = field(&done.headers, "ratelimit");
    assert!(state.starts_with(r#""tokens";r=50;t="#), "{state}");
    let spent = done.body["usage"]["total_tokens"].as_u64().unwrap();
    assert!(spent > 0);

    // The worker counted the turn's tokens before it announced the end.
    let key = tokens_key(user_id, &UtcDay::of(SystemTime::now()).date());
    assert_eq!(redis_cli(&stack, &["GET", &key]), spent.to_string());

    // Spend the rest: turns go on until the budget is used up, then 429.
    let mut used = spent;
    while used < 50 {
        let reply = user
            .call(
                "POST",
                "/v1/responses",
                Some(json!({"input": "/echo more words to count"})),
            )
            .await;
        let state = field(&reply.headers, "ratelimit");
        assert!(
            state.starts_with(&format!(r#""tokens";r={};"#, 50 - used)),
            "{state}"
        );
        used += reply.ok()["usage"]["total_tokens"].as_u64().unwrap();
    }
    let refused = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "/echo one more"})),
        )
        .await;
    assert_refused(&refused, "token_budget_exhausted");
    let until_midnight = UtcDay::of(SystemTime::now()).left().as_secs();
    assert!(retry_after(&refused).abs_diff(until_midnight) <= 2);
    assert_eq!(
        field(&refused.headers, "ratelimit"),
        format!(r#""tokens";r=0;t={}"#, retry_after(&refused))
    );
    // Only new turns are refused: reading goes on.
    user.call("GET", "/v1/conversations", None).await.ok();

    // A new day starts with a fresh counter.
    assert_eq!(redis_cli(&stack, &["DEL", &key]), "1");
    let again = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "/echo tomorrow"})),
        )
        .await;
    assert_eq!(again.ok()["status"], "completed");
    assert!(
        app.metrics()
            .await
            .contains(r#"turnpike_rate_limited_total{limit="tokens"}"#)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_follows_the_failure_policy_and_recovers() {
    let stack = Stack::private().await;
    let mut settings = without_limits(stack.settings(Paths::DIRECT));
    settings.limits.user_requests_per_s = 1;
    settings.limits.user_burst = 1;
    settings.limits.redis_breaker_ms = 200;
    // Fail closed, with the per-user limit only.
    let mut closed_settings = settings.clone();
    closed_settings.limits.redis_failure_policy = RedisFailurePolicy::FailClosed;
    let closed = TestApp::spawn_with(closed_settings).await;
    // Fail open (the default), with a per-key limit looser than the per-user one.
    settings.limits.key_requests_per_s = 1;
    settings.limits.key_burst = 3;
    let open = TestApp::spawn_with(settings).await;
    let user = open.new_user().await;
    let closed_user = open.new_user().await.on(&closed);
    let list = |user: &User| {
        let user = user.clone();
        async move { user.call("GET", "/v1/conversations", None).await }
    };
    // Both keys are known to their process before Redis goes.
    let before = list(&user).await;
    assert_eq!(
        field(&before.headers, "ratelimit-policy"),
        r#""key";q=3;w=3, "user";q=1;w=1"#
    );
    assert_eq!(
        field(&before.headers, "ratelimit"),
        r#""key";r=2;t=1, "user";r=0;t=1"#
    );
    list(&closed_user).await.ok();

    stack.stop("redis").await;

    // Fail open: the per-user limit is not applied (it would refuse a
    // second request within its one-second interval), and the per-key
    // limit goes on in process until its burst is spent.
    let mut admitted = 0;
    let refused = loop {
        let reply = list(&user).await;
        if reply.status != 200 {
            break reply;
        }
        assert!(!field(&reply.headers, "ratelimit").contains("user"));
        admitted += 1;
        assert!(admitted <= 6, "the per-key limit holds while Redis is down");
    };
    assert!(admitted >= 2, "{admitted} requests admitted");
    assert_refused(&refused, "rate_limited");
    assert_eq!(field(&refused.headers, "ratelimit"), r#""key";r=0;t=1"#);

    // Fail closed: a fast 503 with Retry-After, in the one error shape.
    let started = std::time::Instant::now();
    let unavailable = list(&closed_user).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let error = unavailable.error(503);
    assert_eq!(error["code"], "rate_limits_unavailable");
    assert_eq!(retry_after(&unavailable), 1);
    let seen = open.metrics().await;
    for decision in ["fail_open", "fail_closed"] {
        assert!(
            seen.contains(&format!(
                r#"turnpike_rate_limit_redis_failures_total{{decision="{decision}"}}"#
            )),
            "{seen}"
        );
    }

    stack.start("redis").await;

    // No restart: the fail-closed process admits requests again, and the
    // per-user limit counts (and refuses) again in both.
    eventually(
        "the fail-closed process to admit requests again",
        Duration::from_secs(20),
        || async { (list(&closed_user).await.status == 200).then_some(()) },
    )
    .await;
    let refused = list(&closed_user).await;
    assert_refused(&refused, "rate_limited");
    assert_eq!(field(&refused.headers, "ratelimit"), r#""user";r=0;t=1"#);
    eventually(
        "the fail-open process to count the user in Redis again",
        Duration::from_secs(20),
        || async {
            field(&list(&user).await.headers, "ratelimit")
                .contains(r#""user";r="#)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_made_up_keys_is_shed_and_real_keys_keep_working() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.api.key_lookups_per_s = 20;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    user.call("GET", "/v1/conversations", None).await.ok();
    // 400 made-up keys at once: the first are looked up (401), the rest
    // shed without touching the database (503); none is a server error.
    let strangers: Vec<User> = (0..400)
        .map(|i| User {
            key: format!("tp_{i:064x}"),
            ..user.clone()
        })
        .collect();
    let replies = futures_util::future::join_all(
        strangers
            .iter()
            .map(|s| s.call("GET", "/v1/conversations", None)),
    )
    .await;
    let count = |status: u16| replies.iter().filter(|r| r.status == status).count();
    assert_eq!(count(401) + count(503), 400, "only 401s and 503s");
    assert!(count(503) > 0, "the flood was shed");
    assert!(count(401) >= 20, "keys within the budget were looked up");
    let shed = replies.iter().find(|r| r.status == 503).unwrap();
    assert_eq!(shed.body["error"]["code"], "overloaded");
    assert!(shed.headers.get("retry-after").is_some());
    // The real key was never displaced, nor held back.
    user.call("GET", "/v1/conversations", None).await.ok();
    // A made-up key found unknown, seen again, is refused from memory.
    let (seen, _) = strangers
        .iter()
        .zip(&replies)
        .find(|(_, reply)| reply.status == 401)
        .unwrap();
    let again = seen.call("GET", "/v1/conversations", None).await;
    again.error(401);
}

async fn stored_bytes(settings: &Settings, user: &User) -> i64 {
    let router = turnpike_core::db::Router::new(&settings.database).unwrap();
    let mut tx = router.write().await.unwrap();
    let (bytes,): (i64,) = sqlx::query_as("SELECT coalesce(sum(s.bytes), 0)::int8 FROM user_stored_bytes s JOIN users u ON u.id = s.user_id WHERE u.name = $1")
        .bind(&user.name)
        .fetch_one(turnpike_core::db::DbConn::conn(&mut tx))
        .await
        .unwrap();
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_stores_up_to_a_quota_and_deleting_makes_room() {
    let stack = Stack::shared().await;
    let mut settings = without_limits(stack.settings(Paths::DIRECT));
    settings.limits.storage_bytes_per_user = 200_000;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let item = |n: usize| json!({"role": "user", "content": format!("{n} {}", "x".repeat(50_000))});
    let created = user.create_conversation(json!({"items": [item(0)]})).await;
    let conversation = created.ok()["id"].as_str().unwrap().to_owned();
    let one = stored_bytes(&settings, &user).await;
    assert!(one > 0, "stored bytes are counted");
    let mut added = Vec::new();
    let refused = loop {
        let reply = user
            .add_items(&conversation, json!([item(added.len() + 1)]))
            .await;
        if reply.status != 200 {
            break reply;
        }
        added.push(reply.ok()["data"][0]["id"].as_str().unwrap().to_owned());
        assert!(added.len() < 10, "the quota held");
    };
    assert_eq!(refused.error(403)["code"], "storage_quota_exceeded");
    let full = stored_bytes(&settings, &user).await;
    assert!(full <= 200_000 && full > 100_000, "{full}");
    // A turn's input counts too.
    let turn = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "input": [item(99)], "background": true})),
        )
        .await;
    assert_eq!(turn.error(403)["code"], "storage_quota_exceeded");
    // So does the input of a turn that starts a conversation.
    let turn = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": [item(98)], "background": true})),
        )
        .await;
    assert_eq!(turn.error(403)["code"], "storage_quota_exceeded");
    // Deleting an item makes room for one.
    user.call(
        "DELETE",
        &format!("/v1/conversations/{conversation}/items/{}", added[0]),
        None,
    )
    .await
    .ok();
    assert!(stored_bytes(&settings, &user).await < full);
    user.add_items(&conversation, json!([item(100)])).await.ok();
    // Deleting the conversation frees all of it.
    user.call("DELETE", &format!("/v1/conversations/{conversation}"), None)
        .await
        .ok();
    assert_eq!(stored_bytes(&settings, &user).await, 0);
}

/// A user's concurrent writes to many conversations are counted exactly
/// (the count is striped by conversation, so they do not queue on one
/// row), and deleting some of the conversations subtracts exactly theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_of_one_user_are_counted_exactly() {
    let stack = Stack::shared().await;
    let mut settings = without_limits(stack.settings(Paths::DIRECT));
    settings.limits.storage_bytes_per_user = 100_000_000;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let conversations: Vec<String> = futures_util::future::join_all((0..40).map(|n| {
        let user = &user;
        async move {
            let body = json!({"items": [{"role": "user", "content": "y".repeat(100 + n)}]});
            let created = user.create_conversation(body).await;
            let id = created.ok()["id"].as_str().unwrap().to_owned();
            user.add_items(
                &id,
                json!([{"role": "assistant", "content": "z".repeat(n)}]),
            )
            .await
            .ok();
            id
        }
    }))
    .await;
    assert_eq!(
        stored_bytes(&settings, &user).await,
        counted(&settings, &user).await
    );
    for id in &conversations[..15] {
        user.call("DELETE", &format!("/v1/conversations/{id}"), None)
            .await
            .ok();
    }
    let left = counted(&settings, &user).await;
    assert!(left > 0);
    assert_eq!(stored_bytes(&settings, &user).await, left);
}

/// The bytes of a user's live conversations' items, added up from the items.
async fn counted(settings: &Settings, user: &User) -> i64 {
    let router = turnpike_core::db::Router::new(&settings.database).unwrap();
    let mut tx = router.write().await.unwrap();
    let (bytes,): (i64,) = sqlx::query_as(
        "SELECT coalesce(sum(octet_length(i.body::text) + coalesce(octet_length(i.prompt::text), 0)), 0)::int8
           FROM items i JOIN conversations c ON c.id = i.conversation_id JOIN users u ON u.id = c.user_id
          WHERE u.name = $1 AND c.deleted_at IS NULL",
    )
    .bind(&user.name)
    .fetch_one(turnpike_core::db::DbConn::conn(&mut tx))
    .await
    .unwrap();
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_and_pages_are_bounded_in_bytes() {
    let stack = Stack::shared().await;
    let mut settings = without_limits(stack.settings(Paths::DIRECT));
    settings.limits.storage_bytes_per_user = 0;
    let _agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    // One item over 4 MiB is refused, naming it.
    let huge = json!({"role": "user", "content": "x".repeat(4 * 1024 * 1024 + 1)});
    let refused = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": [{"role": "user", "content": "hi"}, huge]})),
        )
        .await;
    let error = refused.error(413);
    assert_eq!(error["param"], "input[1]");
    assert_eq!(error["code"], "item_too_large");
    // Four items of 1.5 MiB: a page carries at most 4 MiB of them.
    let big =
        |n: usize| json!({"role": "user", "content": format!("{n}{}", "y".repeat(1_572_864))});
    let mut input: Vec<Value> = (0..4).map(big).collect();
    input.push(json!({"role": "user", "content": "/echo ok"}));
    let done = user
        .call("POST", "/v1/responses", Some(json!({"input": input})))
        .await;
    let conversation = done.ok()["conversation"]["id"].as_str().unwrap().to_owned();
    let page = user
        .list_items(&conversation, "?order=asc&limit=100&consistency=strong")
        .await;
    let page = page.ok();
    assert_eq!(page["data"].as_array().unwrap().len(), 2);
    assert_eq!(page["has_more"], true);
    let after = page["last_id"].as_str().unwrap();
    let rest = user
        .list_items(
            &conversation,
            &format!("?order=asc&limit=100&after={after}&consistency=strong"),
        )
        .await;
    // The rest (two more large ones, the question, the answer) fits a page.
    let rest = rest.ok();
    assert_eq!(rest["has_more"], false);
    let texts: Vec<&str> = rest["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["content"][0]["text"].as_str().unwrap_or(""))
        .collect();
    assert!(texts[0].starts_with("2y") && texts[1].starts_with("3y"));
    assert_eq!(texts[texts.len() - 1], "ok");
}
