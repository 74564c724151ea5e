//! Load shedding and workload isolation: load above a node's budget gets
//! fast 503s while admitted reads keep a bounded p99; interactive and
//! background reads stay in their replica groups; an operator's kill
//! switch reaches every api process within a second, and survives a Redis
//! outage.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use turnpike_core::config::NodeGroup;
use turnpike_testkit::{NODES, Paths, Stack, TestApp, User, eventually};

/// The item-page statement, as pg_stat_statements records it.
const ITEM_PAGE: &str = "LEFT JOIN LATERAL (SELECT id, kind, body FROM items";
/// The conversation-list statement.
const CONVERSATION_LIST: &str = "FROM conversations WHERE user_id = $1 AND deleted_at IS NULL";

/// The `q` quantile of `samples` (nearest rank), in milliseconds.
fn quantile_ms(samples: &mut [Duration], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort();
    let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1].as_secs_f64() * 1000.0
}

/// Sum of a Prometheus counter's samples whose labels include every one of `labels`.
async fn metric(app: &TestApp, name: &str, labels: &[&str]) -> f64 {
    let text = app.metrics().await;
    text.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter(|line| labels.iter().all(|l| line.contains(l)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn id(reply: &Value) -> String {
    reply["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_over_the_budget_is_shed_fast_and_admitted_reads_keep_a_bounded_p99() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    // One interactive query per replica at a time, two waiting at most, 50 ms
    // each: on pooled connections and, in a budget of their own, on the
    // replicas' pipelined connections (where these reads go).
    settings.database.max_in_flight_per_node = 1;
    settings.database.pipelined_connections_per_node = 1;
    settings.database.pipeline_depth = 1;
    settings.database.background_share_percent = 0;
    settings.database.max_queued_per_node = 2;
    settings.database.queue_timeout_ms = 50;
    let app = TestApp::spawn_with(settings).await;
    // A few callers, so that no per-key rate limit is what refuses them.
    let mut targets: Vec<(User, String)> = Vec::new();
    for _ in 0..4 {
        let user = app.new_user().await;
        let conversation = user
            .create_conversation(json!({"items": [{"role": "user", "content": "hello"}]}))
            .await;
        let conversation = id(conversation.ok());
        let items = user.list_items(&conversation, "?consistency=strong").await;
        let item = id(&items.ok()["data"][0]);
        // One item, read by id: a primary-key lookup on a replica, not cached.
        let path = format!("/v1/conversations/{conversation}/items/{item}?consistency=eventual");
        targets.push((user, path));
    }
    stack.wait_replicated().await;
    for (user, path) in &targets {
        user.call("GET", path, None).await.ok();
    }

    // Open loop: bursts of 25 requests every 50 ms for 2 s (500 requests a
    // second, 25 at once against 2 slots and 4 places in the queues), sent
    // on schedule whatever the answers take.
    let shed_before = metric(&app, "turnpike_db_shed_total", &["class=\"interactive\""]).await;
    let (bursts, burst) = (40, 25);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut requests = Vec::with_capacity(bursts * burst);
    for b in 0..bursts {
        tick.tick().await;
        for i in 0..burst {
            let (user, path) = targets[(b * burst + i) % targets.len()].clone();
            requests.push(tokio::spawn(async move {
                let started = Instant::now();
                let reply = user.call("GET", &path, None).await;
                (reply, started.elapsed())
            }));
        }
    }
    let (mut admitted, mut shed, mut other) = (Vec::new(), Vec::new(), Vec::new());
    for request in requests {
        let (reply, took) = request.await.unwrap();
        match reply.status {
            200 => admitted.push(took),
            503 => {
                let error = reply.error(503);
                assert_eq!(error["code"], "overloaded", "{}", reply.body);
                assert_eq!(error["type"], "service_unavailable");
                let retry_after = reply
                    .headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok());
                assert_eq!(retry_after, Some("1"), "a shed request says when to retry");
                shed.push(took);
            }
            _ => other.push(format!("{} {}", reply.status, reply.body)),
        }
    }
    let (admitted_n, shed_n) = (admitted.len(), shed.len());
    let admitted_p50 = quantile_ms(&mut admitted, 0.50);
    let admitted_p99 = quantile_ms(&mut admitted, 0.99);
    let shed_p50 = quantile_ms(&mut shed, 0.50);
    let shed_p99 = quantile_ms(&mut shed, 0.99);
    println!(
        "overload: {} requests in 2 s open loop, budget 1/replica: admitted {admitted_n} \
         (p50 {admitted_p50:.1} ms, p99 {admitted_p99:.1} ms), shed {shed_n} with 503 \
         (p50 {shed_p50:.1} ms, p99 {shed_p99:.1} ms)",
        bursts * burst
    );
    assert!(other.is_empty(), "only 200s and 503s: {other:?}");
    assert!(shed_n > 0, "load above the budget is shed");
    assert!(admitted_n > 0, "requests within the budget are served");
    // Shedding is fast: a shed request waited at most the 50 ms queue; the
    // rest is HTTP and this machine's CPU, shared with the other tests.
    assert!(shed_p99 < 1_000.0, "503s come fast: p99 {shed_p99:.1} ms");
    // Admitted requests never wait long: at most the queue wait plus the read.
    assert!(
        admitted_p99 < 2_000.0,
        "admitted p99 stays bounded: {admitted_p99:.1} ms"
    );
    let shed_metric = metric(&app, "turnpike_db_shed_total", &["class=\"interactive\""]).await;
    assert!(
        shed_metric - shed_before >= shed_n as f64,
        "every shed query is counted: {shed_metric} - {shed_before} < {shed_n}"
    );
    let in_flight = metric(&app, "turnpike_db_in_flight", &["class=\"interactive\""]).await;
    assert_eq!(in_flight, 0.0, "every admitted query left the budget");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_and_background_reads_stay_in_their_replica_groups() {
    let stack = Stack::private().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.database.nodes.get_mut("replica1").unwrap().group = NodeGroup::Interactive;
    settings.database.nodes.get_mut("replica2").unwrap().group = NodeGroup::Background;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let admin = app.new_admin().await;
    let reads: i64 = 20;
    let mut conversations = Vec::new();
    for _ in 0..reads {
        let created = user
            .create_conversation(json!({"items": [{"role": "user", "content": "hello"}]}))
            .await;
        conversations.push(id(created.ok()));
    }
    stack.wait_replicated().await;

    let topology = admin.call("GET", "/v1/admin/topology", None).await;
    let nodes = topology.ok()["nodes"].as_array().unwrap().clone();
    let node = |name: &str| nodes.iter().find(|n| n["name"] == name).unwrap().clone();
    assert_eq!(node("replica1")["group"], "interactive");
    assert!(node("replica1")["budget"]["background"].is_null());
    assert_eq!(node("replica2")["group"], "background");
    assert!(node("replica2")["budget"]["interactive"].is_null());
    assert_eq!(node("primary")["group"], "both");

    let counts = |pattern: &'static str| {
        let stack = &stack;
        async move {
            let mut calls = Vec::new();
            for node in NODES {
                calls.push(stack.statement_calls(node, pattern).await);
            }
            calls
        }
    };
    let (pages_before, lists_before) = (counts(ITEM_PAGE).await, counts(CONVERSATION_LIST).await);
    // Item pages are interactive; the conversation list is background by default.
    for conversation in &conversations {
        let page = user.list_items(conversation, "?consistency=eventual").await;
        assert_eq!(page.ok()["data"].as_array().unwrap().len(), 1);
        let list = user
            .call(
                "GET",
                "/v1/conversations?consistency=eventual&limit=1",
                None,
            )
            .await;
        assert_eq!(list.ok()["data"].as_array().unwrap().len(), 1);
    }
    let (pages_after, lists_after) = (counts(ITEM_PAGE).await, counts(CONVERSATION_LIST).await);
    let delta = |after: &[i64], before: &[i64]| -> Vec<i64> {
        after.iter().zip(before).map(|(a, b)| a - b).collect()
    };
    let pages = delta(&pages_after, &pages_before);
    let lists = delta(&lists_after, &lists_before);
    println!(
        "classes: item pages per [primary, replica1, replica2] {pages:?}, conversation lists {lists:?}"
    );
    assert!(
        pages[0] == 0 && pages[2] == 0 && pages[1] >= 1,
        "interactive reads ran on replica1 only: {pages:?}"
    );
    assert_eq!(
        lists,
        [0, 0, reads],
        "background reads ran on replica2 only"
    );
}

/// Two api processes sharing Redis, with a switch hash of their own (the
/// shared stack's other tests never see these switches).
async fn two_apps(stack: &Stack) -> (TestApp, TestApp) {
    let mut settings = stack.settings(Paths::DIRECT);
    settings.overload.switches_key = format!("tp:switches:test:{}", uuid::Uuid::now_v7().simple());
    let a = TestApp::spawn_with(settings.clone()).await;
    let b = TestApp::spawn_with(settings).await;
    (a, b)
}

/// Waits until `path` answers `status` on every one of `users` (one per
/// process), and returns how long after `since` that took.
async fn answered_everywhere(users: &[&User], path: &str, status: u16, since: Instant) -> Duration {
    for user in users {
        eventually(
            &format!("{path} to answer {status} on {}", user.base),
            Duration::from_secs(5),
            || async move { (user.call("GET", path, None).await.status == status).then_some(()) },
        )
        .await;
    }
    since.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_switch_takes_effect_on_every_process_within_a_second() {
    let stack = Stack::shared().await;
    let (a, b) = two_apps(&stack).await;
    let user_a = a.new_user().await;
    let user_b = user_a.on(&b);
    let admin = a.new_admin().await;
    let admin_b = admin.on(&b);
    let conversation = id(user_a.create_conversation(json!({})).await.ok());
    let retrieve = format!("/v1/conversations/{conversation}?consistency=strong");
    for user in [&user_a, &user_b] {
        user.call("GET", "/v1/conversations", None).await.ok();
    }

    // Block the conversation list.
    let block = json!({"route": "GET /v1/conversations", "action": "block",
        "retry_after_s": 7, "reason": "listing storm"});
    let set_at = Instant::now();
    let set = admin
        .call("PUT", "/v1/admin/switches/no-listing", Some(block))
        .await;
    let switch = set.ok();
    assert_eq!(switch["name"], "no-listing");
    assert_eq!(switch["object"], "switch");
    assert_eq!(switch["action"], "block");
    let took = answered_everywhere(&[&user_a, &user_b], "/v1/conversations", 503, set_at).await;
    println!(
        "kill switch: block in force on both processes {} ms after it was set",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(1), "block took {took:?}");
    let refused = user_b.call("GET", "/v1/conversations", None).await;
    assert_eq!(refused.error(503)["code"], "blocked_by_operator");
    assert_eq!(refused.headers["retry-after"], "7");
    assert!(
        !refused.body.to_string().contains("listing storm"),
        "the reason stays internal"
    );
    // Other routes, and the admin API, are not switched off.
    user_b.call("GET", &retrieve, None).await.ok();
    let listed = admin_b.call("GET", "/v1/admin/switches", None).await;
    assert_eq!(listed.ok()["data"][0]["reason"], "listing storm");
    let shown = admin_b
        .call("GET", "/v1/admin/switches/no-listing", None)
        .await;
    assert_eq!(shown.ok()["retry_after_s"], 7);

    // Lifting it reaches both processes too.
    let lifted_at = Instant::now();
    let lifted = admin_b
        .call("DELETE", "/v1/admin/switches/no-listing", None)
        .await;
    assert_eq!(lifted.ok()["deleted"], true);
    let took = answered_everywhere(&[&user_a, &user_b], "/v1/conversations", 200, lifted_at).await;
    println!(
        "kill switch: lifted on both processes {} ms after it was deleted",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(1), "lifting took {took:?}");
    let gone = admin
        .call("DELETE", "/v1/admin/switches/no-listing", None)
        .await;
    gone.error(404);

    // Throttle a whole class to nothing: background routes get 429s, interactive ones go on.
    let throttle = json!({"class": "background", "action": "throttle", "share_percent": 0});
    let set_at = Instant::now();
    admin
        .call("PUT", "/v1/admin/switches/quiet", Some(throttle))
        .await
        .ok();
    let took = answered_everywhere(&[&user_a, &user_b], "/v1/conversations", 429, set_at).await;
    println!(
        "kill switch: class throttle in force on both processes {} ms after it was set",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(1), "throttle took {took:?}");
    let throttled = user_a.call("GET", "/v1/conversations", None).await;
    assert_eq!(throttled.error(429)["code"], "throttled_by_operator");
    assert_eq!(throttled.error(429)["type"], "rate_limit_error");
    assert_eq!(throttled.headers["retry-after"], "1");
    user_a.call("GET", &retrieve, None).await.ok();
    let after = metric(
        &a,
        "turnpike_switch_rejections_total",
        &["switch=\"quiet\""],
    )
    .await;
    assert!(after >= 2.0, "rejections are counted per switch: {after}");
    admin
        .call("DELETE", "/v1/admin/switches/quiet", None)
        .await
        .ok();
    answered_everywhere(
        &[&user_a, &user_b],
        "/v1/conversations",
        200,
        Instant::now(),
    )
    .await;

    // A route is named as it is declared, its parameters as templates.
    let block = json!({"route": "GET /v1/conversations/{conversation_id}", "action": "block"});
    admin
        .call("PUT", "/v1/admin/switches/no-retrieve", Some(block))
        .await
        .ok();
    answered_everywhere(&[&user_a, &user_b], &retrieve, 503, Instant::now()).await;
    user_b.call("GET", "/v1/conversations", None).await.ok();
    let items = format!("/v1/conversations/{conversation}/items");
    user_b.call("GET", &items, None).await.ok();
    admin
        .call("DELETE", "/v1/admin/switches/no-retrieve", None)
        .await
        .ok();
    answered_everywhere(&[&user_a, &user_b], &retrieve, 200, Instant::now()).await;
}

#[tokio::test]
async fn a_malformed_switch_is_refused_and_only_admins_may_set_one() {
    let stack = Stack::shared().await;
    let (a, _b) = two_apps(&stack).await;
    let admin = a.new_admin().await;
    let user = a.new_user().await;
    for (body, param) in [
        (
            json!({"route": "GET /v1/conversations", "class": "background", "action": "block"}),
            "route",
        ),
        (json!({"action": "block"}), "route"),
        (
            json!({"route": "conversations", "action": "block"}),
            "route",
        ),
        (json!({"route": "*", "action": "throttle"}), "rate_per_s"),
        (
            json!({"route": "*", "action": "throttle", "rate_per_s": -1}),
            "rate_per_s",
        ),
        (
            json!({"route": "*", "action": "throttle", "share_percent": 101}),
            "share_percent",
        ),
        (
            json!({"route": "*", "action": "block", "rate_per_s": 5}),
            "action",
        ),
        (
            json!({"route": "*", "action": "block", "retry_after_s": 0}),
            "retry_after_s",
        ),
    ] {
        let reply = admin
            .call("PUT", "/v1/admin/switches/bad", Some(body.clone()))
            .await;
        assert_eq!(reply.error(400)["param"], param, "{body}");
    }
    let reply = admin
        .call(
            "PUT",
            "/v1/admin/switches/bad",
            Some(json!({"route": "*", "action": "pause"})),
        )
        .await;
    reply.error(400);
    let reply = admin
        .call(
            "PUT",
            "/v1/admin/switches/has%20space",
            Some(json!({"route": "*", "action": "block"})),
        )
        .await;
    assert_eq!(reply.error(400)["param"], "name");
    let reply = user
        .call(
            "PUT",
            "/v1/admin/switches/mine",
            Some(json!({"route": "*", "action": "block"})),
        )
        .await;
    reply.error(403);
    let listed = admin.call("GET", "/v1/admin/switches", None).await;
    assert_eq!(listed.ok()["data"], json!([]), "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switches_stay_in_force_while_redis_is_down_and_follow_again_when_it_returns() {
    let stack = Stack::private().await;
    let (a, b) = two_apps(&stack).await;
    let user_a = a.new_user().await;
    let user_b = user_a.on(&b);
    let admin = a.new_admin().await;
    let admin_b = admin.on(&b);
    // The key lookups are cached before Redis goes (auth does not need Redis; this keeps the test about switches).
    for user in [&user_a, &user_b, &admin, &admin_b] {
        user.call("GET", "/v1/conversations", None).await.ok();
    }
    let block = json!({"route": "GET /v1/conversations", "action": "block"});
    admin
        .call("PUT", "/v1/admin/switches/no-listing", Some(block))
        .await
        .ok();
    answered_everywhere(
        &[&user_a, &user_b],
        "/v1/conversations",
        503,
        Instant::now(),
    )
    .await;

    stack.stop("redis").await;
    // Both processes have tried to re-read the switches, and failed.
    let failed = metric(
        &a,
        "turnpike_switch_refreshes_total",
        &["outcome=\"failed\""],
    )
    .await;
    eventually(
        "both processes to fail a re-read",
        Duration::from_secs(10),
        || async {
            let now = metric(
                &a,
                "turnpike_switch_refreshes_total",
                &["outcome=\"failed\""],
            )
            .await;
            (now >= failed + 4.0).then_some(())
        },
    )
    .await;
    for user in [&user_a, &user_b] {
        let refused = user.call("GET", "/v1/conversations", None).await;
        assert_eq!(
            refused.error(503)["code"],
            "blocked_by_operator",
            "the last known switch holds"
        );
    }
    admin
        .call("GET", "/v1/admin/switches", None)
        .await
        .error(503);

    // Redis returns empty (no persistence in the dev stack): the processes
    // restore the switch they have in force, and follow changes again.
    stack.start("redis").await;
    eventually(
        "the switch to be restored in Redis",
        Duration::from_secs(10),
        || async {
            let listed = admin_b.call("GET", "/v1/admin/switches", None).await;
            (listed.status == 200 && listed.body["data"][0]["name"] == "no-listing").then_some(())
        },
    )
    .await;
    let lifted_at = Instant::now();
    admin
        .call("DELETE", "/v1/admin/switches/no-listing", None)
        .await
        .ok();
    let took = answered_everywhere(&[&user_a, &user_b], "/v1/conversations", 200, lifted_at).await;
    println!(
        "kill switch after a Redis restart: lifted on both processes in {} ms",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(1), "lifting took {took:?}");
}
