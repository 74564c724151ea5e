//! Faults during turns: a worker killed mid-turn, a client cut off
//! mid-stream resuming on another api process. Nothing is lost and nothing
//! is repeated.

use std::time::Duration;

use serde_json::json;
use turnpike_testkit::{Agents, Paths, Stack, TestApp, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_turn_is_finished_by_another() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let mut agents = Agents::spawn_slow(&mut settings, 20, 30).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let created = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "a long answer, please", "background": true})),
        )
        .await;
    let id = created.ok()["id"].as_str().unwrap().to_owned();
    let conversation = created.ok()["conversation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let stream = user.follow_until_answering(&id).await;
    agents.kill_workers();
    agents.add_worker(&settings).await;
    let events = stream.read_to_end().await;
    // The same stream went on to the end, its sequence numbers unbroken.
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.data["sequence_number"], i as u64);
    }
    let last = &events.last().unwrap().data;
    assert_eq!(last["type"], "response.completed", "{last}");
    // One input, one output: the interrupted attempt stored nothing twice.
    let items = user.list_items(&conversation, "?order=asc").await;
    let items = items.ok()["data"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[1], last["response"]["output"][0]);
    // What the client saw is what was stored: the model call the second
    // worker ran again announced nothing twice and repeated no text.
    turnpike_testkit::assert_stream_matches(&events, &items[1..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_model_call_shows_each_piece_of_text_once() {
    let stack = Stack::shared().await;
    let (app, agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    // The model's stream is cut mid-answer; the retry answers in full.
    let (_, events) = user
        .stream(
            "POST",
            "/v1/responses",
            Some(json!({"input": "/fail disconnect once", "stream": true})),
            &[],
        )
        .await;
    let last = &events.last().unwrap().data;
    assert_eq!(last["type"], "response.completed", "{last}");
    let output = last["response"]["output"].as_array().unwrap();
    assert_eq!(output.len(), 1);
    let text = output[0]["content"][0]["text"].as_str().unwrap();
    assert!(text.split(' ').count() > 4, "{text}");
    // One item announced, once, with the id it is stored under; its
    // deltas add up to the stored text exactly.
    turnpike_testkit::assert_stream_matches(&events, output);
    // The model was called twice: the cut attempt, then the retry.
    let conversation = last["response"]["conversation"]["id"].as_str().unwrap();
    assert_eq!(agents.model_requests(conversation).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_off_mid_stream_resumes_on_another_api_process_without_loss_or_repeats() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let _agents = Agents::spawn_slow(&mut settings, 40, 40).await;
    let first = TestApp::spawn_with(settings.clone()).await;
    let second = TestApp::spawn_with(settings).await;
    let user = first.new_user().await;

    let mut stream = user
        .open_stream(
            "POST",
            "/v1/responses",
            Some(json!({"input": "tell me a story", "stream": true})),
        )
        .await;
    stream.read_until("response.output_text.delta", 3).await;
    // The connection drops mid-stream (the client's network, or its api process);
    // only whole events count (the last one may have been cut).
    let before = stream.events_so_far();
    drop(stream);
    let id = before[0].data["response"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let last_id = before.last().unwrap().id.clone().unwrap();

    let resumed = user.on(&second);
    let (_, after) = resumed
        .stream(
            "GET",
            &format!("/v1/responses/{id}?stream=true"),
            None,
            &[("last-event-id", &last_id)],
        )
        .await;
    let mut all = before.clone();
    all.extend(after);
    for (i, event) in all.iter().enumerate() {
        assert_eq!(
            event.data["sequence_number"], i as u64,
            "no event lost or repeated"
        );
    }
    assert_eq!(all.last().unwrap().data["type"], "response.completed");
    // The same as a full replay of the finished response.
    let (_, replay) = resumed
        .stream("GET", &format!("/v1/responses/{id}?stream=true"), None, &[])
        .await;
    assert_eq!(all, replay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_finishes_its_turn_and_claims_no_more() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let mut agents = Agents::spawn_slow(&mut settings, 40, 40).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let running = user
        .create_background(json!({"input": "a long answer"}))
        .await;
    let stream = user.follow_until_answering(&running).await;

    // SIGTERM: the running turn finishes within the grace period...
    agents.stop_workers().await;
    let events = stream.read_to_end().await;
    assert_eq!(events.last().unwrap().data["type"], "response.completed");
    // ...and nothing new is claimed: a turn created now waits for a worker.
    let waiting = user
        .create_background(json!({"input": "/echo later"}))
        .await;
    let mut stream = user
        .open_stream("GET", &format!("/v1/responses/{waiting}?stream=true"), None)
        .await;
    let queued = user
        .call("GET", &format!("/v1/responses/{waiting}"), None)
        .await;
    assert_eq!(queued.ok()["status"], "queued");
    agents.add_worker(&settings).await;
    stream.read_until("response.completed", 1).await;
    let done = user
        .call("GET", &format!("/v1/responses/{waiting}"), None)
        .await;
    assert_eq!(done.ok()["output"][0]["content"][0]["text"], "later");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_delivered_too_often_fails_with_a_clear_error() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.worker.max_deliveries = 1;
    let mut agents = Agents::spawn_slow(&mut settings, 20, 30).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let id = user
        .create_background(json!({"input": "a long answer"}))
        .await;
    let stream = user.follow_until_answering(&id).await;
    agents.kill_workers();
    agents.add_worker(&settings).await;
    let events = stream.read_to_end().await;
    let last = &events.last().unwrap().data;
    assert_eq!(last["type"], "response.failed", "{last}");
    assert_eq!(last["response"]["error"]["code"], "server_error");
    assert!(
        last["response"]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("too_many_deliveries"),
        "{last}"
    );
    let stored = user.call("GET", &format!("/v1/responses/{id}"), None).await;
    assert_eq!(stored.ok()["status"], "failed");
}

/// An idle worker's blocking queue read lives within its own timeout: an
/// empty read of the whole block answers "nothing" instead of failing (and
/// reconnecting) when the Redis client's default response timeout passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_blocking_queue_read_is_not_an_error() {
    let stack = Stack::shared().await;
    let settings = stack.settings(Paths::DIRECT);
    let mut consumer = turnpike_core::queue::Consumer::connect(
        settings.redis.url(),
        &settings.worker.queue,
        "idle-test",
        1_500,
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let read = consumer.next_batch(1_500, 1).await;
    assert!(read.as_ref().is_ok_and(Vec::is_empty), "{read:?}");
    assert!(started.elapsed() >= std::time::Duration::from_millis(1_400));
}

/// A worker told to stop while its read of the queue waits finishes that
/// read instead of dropping it: a turn queued in that moment, which Redis
/// hands to the waiting read, is run by the stopping worker within its
/// grace period, not left claimed by a worker that is gone (for another to
/// reclaim after `reclaim_idle_ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_queued_as_its_worker_stops_is_run_not_stranded() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.worker.queue = format!("tp:test-stop-{}", uuid::Uuid::now_v7().simple());
    settings.worker.block_ms = 10_000;
    let mut agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let kv = turnpike_core::kv::Kv::new(&settings.redis).unwrap();
    let queue = settings.worker.queue.clone();
    // A first turn: the worker claims it, reads the queue again at once
    // (now waiting, for up to 10 s), and finishes it.
    let first = user
        .create_background(json!({"input": "/echo first"}))
        .await;
    let events = user
        .open_stream("GET", &format!("/v1/responses/{first}?stream=true"), None)
        .await
        .read_to_end()
        .await;
    assert_eq!(events.last().unwrap().data["type"], "response.completed");
    // SIGTERM, and a turn queued just after it.
    let (_, id) = tokio::join!(
        agents.stop_workers(),
        user.create_background(json!({"input": "/echo just in time"}))
    );
    let done = user.call("GET", &format!("/v1/responses/{id}"), None).await;
    assert_eq!(done.ok()["status"], "completed");
    // What a client streaming it sees: every event once, in order, to the end.
    let events = user
        .open_stream("GET", &format!("/v1/responses/{id}?stream=true"), None)
        .await
        .read_to_end()
        .await;
    for (i, event) in events.iter().enumerate() {
        assert_eq!(
            event.data["sequence_number"], i as u64,
            "no event lost or repeated"
        );
    }
    assert_eq!(events.last().unwrap().data["type"], "response.completed");
    let pending: (u64, redis::Value, redis::Value, redis::Value) = kv
        .run(|mut conn| async move {
            redis::cmd("XPENDING")
                .arg(&queue)
                .arg("workers")
                .query_async(&mut conn)
                .await
        })
        .await
        .unwrap();
    assert_eq!(pending.0, 0, "nothing left claimed and unacknowledged");
}

/// A first delivery starts its turn in one statement that commits on its
/// own; a turn whose prompt settings changed has the note that says so
/// written by a second transaction. A worker that dies between the two
/// leaves the turn started without its note: the redelivery takes the turn
/// over and writes the note, once, after the turn's input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dead_between_a_turns_start_and_the_rest_of_it_leaves_it_to_the_redelivery() {
    use turnpike_core::queue::Consumer;
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.worker.queue = format!("tp:test-split-start-{}", uuid::Uuid::now_v7().simple());
    // A stopping worker finishes the read it has in flight: a short one.
    settings.worker.block_ms = 100;
    settings.worker.reclaim_idle_ms = 300;
    let mut agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let first = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "/echo first", "instructions": "Answer briefly."})),
        )
        .await;
    assert_eq!(first.ok()["status"], "completed");
    let conversation = first.ok()["conversation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // No worker claims the next turn, which changes the instructions.
    agents.stop_workers().await;
    let second = user
        .create_background(
            json!({"conversation": conversation, "input": "/echo second",
            "instructions": "Answer in French."}),
        )
        .await;
    // A worker claims it and starts it with its one statement, then dies.
    let mut dead = Consumer::connect(settings.redis.url(), &settings.worker.queue, "dead", 100)
        .await
        .unwrap();
    let claimed = dead.next_batch(1_000, 16).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].response, second);
    assert!(
        claimed[0].input.is_some(),
        "a turn that starts in one statement"
    );
    let router = turnpike_core::db::Router::new(&settings.database).unwrap();
    let mut db = router.write_one_message().await.unwrap();
    let id = turnpike_core::ids::parse(turnpike_protocol::ids::RESPONSE, &second).unwrap();
    let started = turnpike_core::turns::start_alone(&mut db, id, false)
        .await
        .unwrap()
        .expect("the turn starts");
    db.done();
    assert_eq!(started.row.status, "in_progress");
    drop(dead);
    let waiting = user
        .call("GET", &format!("/v1/responses/{second}"), None)
        .await;
    assert_eq!(waiting.ok()["status"], "in_progress");
    // A client follows the turn from before it is taken over.
    let stream = user
        .open_stream("GET", &format!("/v1/responses/{second}?stream=true"), None)
        .await;

    // Another worker reclaims it and writes what the start left.
    agents.add_worker(&settings).await;
    let done = completed(
        &user,
        &second,
        "the second turn ran",
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(done["output"][0]["content"][0]["text"], "second");
    // The client saw every event once, in order, to the end, and the
    // deltas add up to the stored answer.
    let events = stream.read_to_end().await;
    assert_eq!(events[0].data["type"], "response.created");
    assert_eq!(events.last().unwrap().data["type"], "response.completed");
    turnpike_testkit::assert_stream_matches(&events, done["output"].as_array().unwrap());
    let items = user.list_items(&conversation, "?order=asc").await;
    let roles: Vec<(&str, &str)> = items.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                item["role"].as_str().unwrap_or(""),
                item["content"][0]["text"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(roles.len(), 5, "{roles:?}");
    assert_eq!(roles[0], ("user", "/echo first"));
    assert_eq!(roles[1], ("assistant", "first"));
    assert_eq!(roles[2], ("user", "/echo second"));
    assert_eq!(roles[3].0, "developer");
    assert!(roles[3].1.contains("Answer in French."), "{roles:?}");
    assert_eq!(roles[4], ("assistant", "second"));
    // The model was asked once for the second turn, with the note once.
    let requests = agents.model_requests(&conversation).await;
    assert_eq!(requests.len(), 2);
    let notes = requests[1]["input"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|item| item["role"] == "developer")
        .count();
    assert_eq!(notes, 1);
    agents.shutdown().await;
}

/// A worker claims queued turns in batches no larger than it asks for, in
/// queue order, each turn once: what one read leaves is there for the next
/// read, and nothing a read claimed goes to another consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_read_claims_a_batch_of_turns_in_order_and_no_more() {
    use turnpike_core::queue::{self, Consumer};
    let stack = Stack::shared().await;
    let settings = stack.settings(Paths::DIRECT);
    let kv = turnpike_core::kv::Kv::new(&settings.redis).unwrap();
    let url = settings.redis.url().to_owned();
    let stream = format!("tp:test-batch-{}", uuid::Uuid::now_v7().simple());
    let lsn: turnpike_core::db::Lsn = "0/0".parse().unwrap();
    let mut first = Consumer::connect(&url, &stream, "first", 100)
        .await
        .unwrap();
    let mut second = Consumer::connect(&url, &stream, "second", 100)
        .await
        .unwrap();
    for i in 0..5 {
        queue::enqueue(&kv, &stream, &format!("resp_{i}"), lsn)
            .await
            .unwrap();
    }
    let names = |batch: Vec<queue::Delivery>| -> Vec<String> {
        batch.into_iter().map(|d| d.response).collect()
    };
    let batch = first.next_batch(100, 3).await.unwrap();
    assert_eq!(names(batch), ["resp_0", "resp_1", "resp_2"]);
    let batch = second.next_batch(100, 16).await.unwrap();
    assert_eq!(names(batch), ["resp_3", "resp_4"]);
    assert!(first.next_batch(100, 16).await.unwrap().is_empty());
    let _: Result<u64, _> = kv
        .run(|mut conn| async move { redis::cmd("DEL").arg(&stream).query_async(&mut conn).await })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaiming_walks_past_claims_of_running_turns() {
    use turnpike_core::queue::{self, Consumer};
    let stack = Stack::shared().await;
    let settings = stack.settings(Paths::DIRECT);
    let kv = turnpike_core::kv::Kv::new(&settings.redis).unwrap();
    let url = settings.redis.url().to_owned();
    let stream = format!("tp:test-reclaim-{}", uuid::Uuid::now_v7().simple());
    let lsn: turnpike_core::db::Lsn = "0/0".parse().unwrap();
    // Twelve turns claimed by a worker that keeps them fresh (running),
    // then three claimed by one that died.
    let mut live = Consumer::connect(&url, &stream, "live", 100).await.unwrap();
    let mut dead = Consumer::connect(&url, &stream, "dead", 100).await.unwrap();
    let mut running = Vec::new();
    for i in 0..15 {
        queue::enqueue(&kv, &stream, &format!("resp_{i}"), lsn)
            .await
            .unwrap();
        let claimer = if i < 12 { &mut live } else { &mut dead };
        let delivery = claimer.next_batch(100, 1).await.unwrap().remove(0);
        if i < 12 {
            running.push(delivery.entry);
        }
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    for entry in &running {
        queue::heartbeat(&kv, &stream, "live", entry).await.unwrap();
    }
    // A third worker finds the dead one's turns within a few scans.
    let mut rescuer = Consumer::connect(&url, &stream, "rescuer", 100)
        .await
        .unwrap();
    let mut rescued = Vec::new();
    for _ in 0..10 {
        for delivery in rescuer.reclaim(50, 1).await.unwrap() {
            rescued.push(delivery.response);
        }
    }
    rescued.sort();
    assert_eq!(rescued, ["resp_12", "resp_13", "resp_14"]);

    // The rescuer dies too: a worker with free slots takes all three back
    // in one reclaim, each counted as delivered a third time.
    tokio::time::sleep(Duration::from_millis(60)).await;
    for entry in &running {
        queue::heartbeat(&kv, &stream, "live", entry).await.unwrap();
    }
    let mut second = Consumer::connect(&url, &stream, "second", 100)
        .await
        .unwrap();
    let mut again: Vec<(String, u64)> = second
        .reclaim(50, 16)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.response, d.deliveries))
        .collect();
    again.sort();
    assert_eq!(
        again,
        [
            ("resp_12".to_owned(), 3),
            ("resp_13".to_owned(), 3),
            ("resp_14".to_owned(), 3)
        ]
    );
    let _: Result<u64, _> = kv
        .run(|mut conn| async move { redis::cmd("DEL").arg(&stream).query_async(&mut conn).await })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_turns_leave_the_queue_empty() {
    // A topology of its own: this load would shed other tests' queries.
    let stack = Stack::private().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.limits.active_turns_per_user = 0;
    settings.limits.user_requests_per_s = 0;
    settings.limits.key_requests_per_s = 0;
    settings.worker.queue = format!("tp:test-turns-{}", uuid::Uuid::now_v7().simple());
    settings.worker.concurrency = 64;
    let _agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let mut ids = Vec::new();
    // Created 25 at a time; a create the busy stack sheds (503, with
    // Retry-After) is retried, as a client would.
    let create = |n: usize| {
        let user = &user;
        async move {
            loop {
                let reply = user
                    .call(
                        "POST",
                        "/v1/responses",
                        Some(json!({"input": format!("/echo {n}"), "background": true})),
                    )
                    .await;
                if reply.status != 503 {
                    return reply.ok()["id"].as_str().unwrap().to_owned();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    for chunk in 0..80 {
        let creates = (0..25).map(|i| create(chunk * 25 + i));
        ids.extend(futures_util::future::join_all(creates).await);
    }
    assert_eq!(ids.len(), 2_000);
    let kv = turnpike_core::kv::Kv::new(&settings.redis).unwrap();
    let queue = settings.worker.queue.clone();
    let length = || async {
        kv.run(|mut conn| {
            let queue = queue.clone();
            async move {
                redis::cmd("XLEN")
                    .arg(queue)
                    .query_async::<u64>(&mut conn)
                    .await
            }
        })
        .await
        .unwrap()
    };
    turnpike_testkit::eventually(
        "every turn ran and the queue emptied",
        Duration::from_secs(120),
        || async { (length().await == 0).then_some(()) },
    )
    .await;
    // Every turn ran once to completion.
    for id in ids.iter().step_by(97) {
        let done = user
            .call(
                "GET",
                &format!("/v1/responses/{id}?consistency=strong"),
                None,
            )
            .await;
        assert_eq!(done.ok()["status"], "completed", "{id}");
    }
}

/// A turn waiting behind another runs when the one ahead is cancelled
/// before any worker took it: the worker that finds it cancelled dispatches
/// the next (the reconciler, minutes away here, is not needed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_turn_lets_the_one_queued_behind_it_run() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    // No worker yet: both turns wait.
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let first = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "/echo first", "background": true})),
        )
        .await;
    let first_id = first.ok()["id"].as_str().unwrap().to_owned();
    let conversation = first.ok()["conversation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = user
        .create_background(json!({"conversation": conversation, "input": "/echo second"}))
        .await;
    let cancelled = user
        .call("POST", &format!("/v1/responses/{first_id}/cancel"), None)
        .await;
    assert_eq!(cancelled.ok()["status"], "cancelled");
    let _agents = Agents::spawn(&mut settings).await;
    let done = completed(
        &user,
        &second,
        "the second turn ran",
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(done["output"][0]["content"][0]["text"], "second");
    // What a client following it sees: every event of the stored answer.
    let (status, events) = user
        .stream(
            "GET",
            &format!("/v1/responses/{second}?stream=true"),
            None,
            &[],
        )
        .await;
    assert_eq!(status, 200);
    turnpike_testkit::assert_stream_matches(&events, done["output"].as_array().unwrap());
}

/// A turn whose queue entry was lost (Redis took the create, then lost the
/// entry) is found by the reconciler and queued again; it runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_whose_queue_entry_was_lost_is_queued_again() {
    // A topology of its own: the reconciler queues every stranded turn of
    // the database it finds.
    let stack = Stack::private().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.worker.stranded_after_ms = 300;
    settings.worker.reconcile_every_ms = 100;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let id = user
        .create_background(json!({"input": "/echo found again"}))
        .await;
    // The entry is gone from the stream before any worker read it.
    let kv = turnpike_core::kv::Kv::new(&settings.redis).unwrap();
    let queue = settings.worker.queue.clone();
    let trimmed: i64 = kv
        .run(|mut conn| {
            let queue = queue.clone();
            async move {
                redis::cmd("XTRIM")
                    .arg(&queue)
                    .arg("MAXLEN")
                    .arg(0)
                    .query_async(&mut conn)
                    .await
            }
        })
        .await
        .unwrap();
    assert_eq!(trimmed, 1);
    let agents = Agents::spawn(&mut settings).await;
    let done = completed(&user, &id, "the stranded turn ran", Duration::from_secs(20)).await;
    assert_eq!(done["output"][0]["content"][0]["text"], "found again");
    let conversation = done["conversation"]["id"].as_str().unwrap();
    let items = user.list_items(conversation, "?order=asc").await;
    let texts: Vec<&str> = items.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|item| item["content"][0]["text"].as_str())
        .collect();
    assert_eq!(texts, ["/echo found again", "found again"], "ran once");
    agents.shutdown().await;
}

/// A turn running when its worker died and Redis then lost its data (the
/// queue entry, and with it any reclaim, gone) is found by the reconciler,
/// queued again as a redelivery and finished; its answer is stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_turn_whose_queue_was_lost_with_redis_is_finished() {
    // A topology of its own: Redis is lost, and the reconciler queues every
    // stranded turn of the database it finds.
    let stack = Stack::private().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.worker.stranded_after_ms = 500;
    settings.worker.reconcile_every_ms = 100;
    let mut agents = Agents::spawn_slow(&mut settings, 40, 60).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let id = user
        .create_background(json!({"input": "a long answer, please"}))
        .await;
    drop(user.follow_until_answering(&id).await);
    // The worker dies mid-turn; then Redis restarts without its data.
    agents.kill_workers();
    stack.stop("redis").await;
    stack.start("redis").await;
    agents.add_worker(&settings).await;
    let done = eventually(
        "the lost running turn finished",
        Duration::from_secs(30),
        || async {
            let reply = user.call("GET", &format!("/v1/responses/{id}"), None).await;
            (reply.status == 200 && reply.body["status"] == "completed").then_some(reply.body)
        },
    )
    .await;
    let conversation = done["conversation"]["id"].as_str().unwrap();
    let items = user.list_items(conversation, "?order=asc").await;
    let roles: Vec<&str> = items.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|item| item["role"].as_str())
        .collect();
    assert_eq!(roles, ["user", "assistant"], "the answer is stored once");
    // A client resuming the stream sees exactly the stored answer, though
    // the event log went with Redis.
    let (status, events) = user
        .stream("GET", &format!("/v1/responses/{id}?stream=true"), None, &[])
        .await;
    assert_eq!(status, 200);
    turnpike_testkit::assert_stream_matches(&events, done["output"].as_array().unwrap());
    agents.shutdown().await;
}

/// Every worker's reconciler finds a running turn whose queue entry Redis
/// lost at about the same moment: however many queue it again at once, it
/// is queued once (two redeliveries would run it twice at once, their
/// events mixed in one log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_running_turn_queued_again_by_many_reconcilers_is_queued_once() {
    use turnpike_core::db::Lsn;
    use turnpike_core::queue;

    let stack = Stack::shared().await;
    let settings = stack.settings(Paths::DIRECT);
    let kv = turnpike_core::kv::Kv::new(&settings.redis).unwrap();
    let stream = format!("test-requeue-{}", uuid::Uuid::new_v4().simple());
    let response = format!("resp_{}", uuid::Uuid::now_v7().simple());
    let attempts = (0..8).map(|_| queue::enqueue_redelivery(&kv, &stream, &response, Lsn(1)));
    let queued: Vec<bool> = futures_util::future::join_all(attempts)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(queued.iter().filter(|q| **q).count(), 1, "{queued:?}");
    let entries: usize = kv
        .run(|mut conn| {
            let stream = stream.clone();
            async move { redis::cmd("XLEN").arg(stream).query_async(&mut conn).await }
        })
        .await
        .unwrap();
    assert_eq!(entries, 1, "entries in the queue");
}

/// A turn whose finish fails goes back for redelivery with its last step
/// kept on its own: the redelivered turn finishes without asking the model
/// again, and clients see one answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_whose_finish_failed_is_finished_without_asking_the_model_again() {
    let stack = Stack::private().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let conversation = user.create_conversation(json!({"items": []})).await;
    let conversation = conversation.ok()["id"].as_str().unwrap().to_owned();
    let uuid =
        turnpike_core::ids::parse(turnpike_protocol::ids::CONVERSATION, &conversation).unwrap();
    // The first finish of a turn in this conversation fails (a sequence
    // counts the tries outside the transaction the error rolls back).
    let admin = stack.superuser("primary").await;
    sqlx::raw_sql(&format!(
        "CREATE SEQUENCE planted_finish_failures;
         CREATE FUNCTION plant_finish_failure() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
         BEGIN
             IF NEW.conversation_id = '{uuid}' AND NEW.status = 'completed'
                AND nextval('planted_finish_failures') = 1 THEN
                 RAISE EXCEPTION 'planted finish failure';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER plant_finish_failure BEFORE UPDATE ON responses
             FOR EACH ROW EXECUTE FUNCTION plant_finish_failure();"
    ))
    .execute(&admin)
    .await
    .unwrap();

    let created = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({
                "conversation": conversation, "input": "/echo kept once", "background": true,
            })),
        )
        .await;
    let id = created.ok()["id"].as_str().unwrap().to_owned();
    let events = stream_to_completion(&user, &id).await;
    let tries: i64 = sqlx::query_scalar("SELECT last_value FROM planted_finish_failures")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(
        tries, 2,
        "the first finish failed, the redelivery's succeeded"
    );
    // The model was asked once: the redelivery found the step stored.
    assert_eq!(agents.model_requests(&conversation).await.len(), 1);
    // Stored once, and the stream shows exactly what was stored.
    let items = user.list_items(&conversation, "?order=asc").await;
    let items = items.ok()["data"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2, "{items:?}");
    turnpike_testkit::assert_stream_matches(&events, &items[1..]);
}

/// Every event of response `id`'s stream, read to its end, which must be
/// `response.completed`.
async fn stream_to_completion(
    user: &turnpike_testkit::User,
    id: &str,
) -> Vec<turnpike_testkit::SseEvent> {
    let (status, events) = user
        .stream("GET", &format!("/v1/responses/{id}?stream=true"), None, &[])
        .await;
    assert_eq!(status, 200);
    let last = &events.last().unwrap().data;
    assert_eq!(last["type"], "response.completed", "{last}");
    events
}

/// How long Redis holds writes in `hold_redis_writes_while_a_turn_runs`:
/// three times the time the slowed model takes to stream its answer.
const WRITES_HELD: Duration = Duration::from_secs(3);

/// Redis holds every write (`CLIENT PAUSE WRITE`) from the moment the
/// model is asked for `request`'s turn, for `WRITES_HELD`; meanwhile, every
/// 100 ms, every item of a stored model step must have its events in the
/// response's log (reads go on), and the turn must not have ended.
/// Then Redis takes writes again and the turn must end with its stream
/// exactly what is stored. What it shows: a step is stored only once the
/// events that streamed it are logged, so a worker lost in between never
/// leaves a stored step whose text its clients were not all sent.
async fn hold_redis_writes_while_a_turn_runs(request: serde_json::Value, ttft_ms: u64) {
    let stack = Stack::private().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.mock.ttft_ms = ttft_ms;
    // The turn's claim must not go stale while Redis holds its heartbeats.
    settings.worker.reclaim_idle_ms = 60_000;
    let agents = Agents::spawn_slow(&mut settings, 40, 40).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let conversation = user.create_conversation(json!({"items": []})).await;
    let conversation = conversation.ok()["id"].as_str().unwrap().to_owned();
    let mut body = request;
    body["conversation"] = json!(conversation);
    let id = user.create_background(body).await;
    let uuid = turnpike_core::ids::parse(turnpike_protocol::ids::RESPONSE, &id).unwrap();

    eventually("the model is asked", Duration::from_secs(20), || async {
        (!agents.model_requests(&conversation).await.is_empty()).then_some(())
    })
    .await;
    let kv = turnpike_core::kv::Kv::new(&settings.redis).unwrap();
    let client = |args: &'static [&'static str]| {
        let kv = kv.clone();
        async move {
            kv.run(|mut conn| async move {
                redis::cmd("CLIENT")
                    .arg(args)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
            .unwrap();
        }
    };
    client(&["PAUSE", "60000", "WRITE"]).await;
    let admin = stack.superuser("primary").await;
    let held = std::time::Instant::now();
    while held.elapsed() < WRITES_HELD {
        let (status, stored): (String, Vec<serde_json::Value>) = sqlx::query_as(
            "SELECT r.status, coalesce(array_agg(s.items) FILTER (WHERE s.kind = 'model'), '{}')
             FROM responses r LEFT JOIN response_steps s ON s.response_id = r.id
             WHERE r.id = $1 GROUP BY r.status",
        )
        .bind(uuid)
        .fetch_one(&admin)
        .await
        .unwrap();
        assert_eq!(
            status, "in_progress",
            "the turn went on while Redis held writes"
        );
        let logged: Vec<serde_json::Value> = turnpike_core::events::read_after(&kv, &id, None)
            .await
            .unwrap()
            .iter()
            .map(|(_, data)| serde_json::from_str(data).unwrap())
            .collect();
        for item in stored.iter().flat_map(|items| items.as_array().unwrap()) {
            let last = match item["type"].as_str().unwrap() {
                "function_call" => "response.function_call_arguments.done",
                "message" => "response.output_text.done",
                _ => continue,
            };
            assert!(
                logged
                    .iter()
                    .any(|e| e["type"] == last && e["item_id"] == item["id"]),
                "stored before its events were logged: {item}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client(&["UNPAUSE"]).await;

    let events = stream_to_completion(&user, &id).await;
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.data["sequence_number"], i as u64);
    }
    let items = user.list_items(&conversation, "?order=asc").await;
    let items = items.ok()["data"].as_array().unwrap().clone();
    turnpike_testkit::assert_stream_matches(&events, &items[1..]);
}

/// An answer (stored with the turn's outcome) streamed over about a second:
/// while Redis holds writes for three times that, the turn stays unfinished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_stored_only_after_its_events_are_logged() {
    hold_redis_writes_while_a_turn_runs(json!({"input": "tell me a story"}), 0).await;
}

/// A tool call (stored on its own before the tool runs) that the model
/// sends a second after it is asked, while Redis holds writes: it is not
/// stored until its events are logged, so the tool does not run and the
/// turn does not go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_is_stored_only_after_its_events_are_logged() {
    hold_redis_writes_while_a_turn_runs(
        json!({
            "tools": [{"type": "conversation_search"}],
            "input": "/call conversation_search {\"query\":\"anything\"}",
        }),
        1_000,
    )
    .await;
}

/// The response once it has completed, waiting up to `within` for it.
async fn completed(
    user: &turnpike_testkit::User,
    id: &str,
    what: &str,
    within: Duration,
) -> serde_json::Value {
    eventually(what, within, || async {
        let reply = user.call("GET", &format!("/v1/responses/{id}"), None).await;
        (reply.ok()["status"] == "completed").then_some(reply.body)
    })
    .await
}

/// A client that goes away while its create commits (the connection
/// closed, the request's future dropped in the api) does not leave the
/// turn it created waiting for the reconciler: what follows the commit (the
/// enqueue, the cache's invalidation) runs whether or not anyone stays to
/// hear the answer, and the turn runs at once. The commit is held up with
/// a deferred trigger that sleeps, for this test's marked request only, on
/// a topology of its own (adding a trigger locks the table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_whose_client_leaves_during_its_commit_runs_at_once() {
    let stack = Stack::private().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.worker.queue = format!("tp:test-leave-{}", uuid::Uuid::now_v7().simple());
    // The reconciler would queue a stranded turn only after ten minutes.
    assert!(settings.worker.stranded_after_ms >= 600_000);
    let agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let marker = uuid::Uuid::now_v7().simple().to_string();
    let superuser = stack.superuser("primary").await;
    let trigger = format!("slow_commit_{marker}");
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(2); RETURN NULL; END $$;
         CREATE CONSTRAINT TRIGGER {trigger} AFTER INSERT ON responses
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
           WHEN (NEW.request->'metadata'->>'slow_commit' = '{marker}')
           EXECUTE FUNCTION {trigger}();"
    ))
    .execute(&superuser)
    .await
    .unwrap();

    let caller = user.clone();
    let body = json!({"input": "/echo left early", "background": true,
        "metadata": {"slow_commit": marker}});
    let request =
        tokio::spawn(async move { caller.call("POST", "/v1/responses", Some(body)).await });
    // The commit is running (its trigger asleep): the client goes.
    eventually("the create's commit", Duration::from_secs(10), || {
        let superuser = superuser.clone();
        async move {
            let sleeping: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'
                   AND query LIKE '%turnpike_create_turn%'",
            )
            .fetch_one(&superuser)
            .await
            .ok()?;
            (sleeping > 0).then_some(())
        }
    })
    .await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());

    // The turn, once committed, runs: well before any reconciler would
    // queue it.
    let (id, status) = eventually("the turn's end", Duration::from_secs(15), || {
        let superuser = superuser.clone();
        let marker = marker.clone();
        async move {
            let (id, status): (uuid::Uuid, String) = sqlx::query_as(
                "SELECT id, status FROM responses WHERE request->'metadata'->>'slow_commit' = $1",
            )
            .bind(marker)
            .fetch_optional(&superuser)
            .await
            .ok()??;
            (status != "queued" && status != "in_progress").then_some((id, status))
        }
    })
    .await;
    assert_eq!(status, "completed");
    // What the client sees when it comes back for it: the answer, and its
    // whole stream from the start, every event once and in order.
    let id = format!("resp_{}", id.simple());
    let done = user.call("GET", &format!("/v1/responses/{id}"), None).await;
    let output = done.ok()["output"].as_array().unwrap().clone();
    assert_eq!(done.ok()["output"][0]["content"][0]["text"], "left early");
    let events = user
        .open_stream("GET", &format!("/v1/responses/{id}?stream=true"), None)
        .await
        .read_to_end()
        .await;
    assert_eq!(events.first().unwrap().data["type"], "response.created");
    assert_eq!(events.last().unwrap().data["type"], "response.completed");
    turnpike_testkit::assert_stream_matches(&events, &output);
    agents.shutdown().await;
}
