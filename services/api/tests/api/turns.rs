//! Turns run by a worker against the mock model: streamed events, stored
//! output, resume, waiting, failures, replay after the log expired.

use std::time::Duration;

use serde_json::{Value, json};
use turnpike_testkit::{Paths, SseEvent, Stack, TestApp, eventually};

both_paths!(
    a_streamed_turn_is_stored_and_resumable,
    failures_surface_as_failed_responses,
    client_function_calls_round_trip,
);

fn types(events: &[SseEvent]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e.data["type"].as_str().unwrap())
        .collect()
}

fn text_of(events: &[SseEvent]) -> String {
    events
        .iter()
        .filter(|e| e.data["type"] == "response.output_text.delta")
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect()
}

async fn a_streamed_turn_is_stored_and_resumable(paths: Paths) {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, paths).await;
    let user = app.new_user().await;
    let conversation = user.create_conversation(json!({})).await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let (status, events) = user
        .stream("POST", "/v1/responses", Some(json!({
            "conversation": conversation, "input": "/echo Turnpikes charge tolls.", "stream": true
        })), &[])
        .await;
    assert_eq!(status, 200);
    // Every event carries its sequence number, which is also the SSE id, with no gaps.
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.data["sequence_number"], i as u64, "{event:?}");
        assert_eq!(event.id.as_deref(), Some(i.to_string().as_str()));
        assert_eq!(event.event.as_deref(), event.data["type"].as_str());
    }
    let kinds = types(&events);
    assert_eq!(
        &kinds[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert_eq!(
        &kinds[kinds.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert_eq!(text_of(&events), "Turnpikes charge tolls.");
    let completed = &events.last().unwrap().data["response"];
    assert_eq!(completed["status"], "completed");
    let id = completed["id"].as_str().unwrap().to_owned();
    let usage = &completed["usage"];
    assert!(
        usage["input_tokens"].as_u64().unwrap() > 0 && usage["output_tokens"].as_u64().unwrap() > 0,
        "{usage}"
    );

    // Stored: the response and the conversation's items.
    let stored = user.call("GET", &format!("/v1/responses/{id}"), None).await;
    let stored = stored.ok();
    assert_eq!(stored["status"], "completed");
    assert_eq!(stored["output"], completed["output"]);
    assert_eq!(
        stored["output"][0]["content"][0]["text"],
        "Turnpikes charge tolls."
    );
    let items = user.list_items(&conversation, "?order=asc").await;
    let items = items.ok()["data"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2);
    assert_eq!(items[1], stored["output"][0]);

    // Resume after event 3, by query and by Last-Event-ID: exactly the rest.
    let (_, resumed) = user
        .stream(
            "GET",
            &format!("/v1/responses/{id}?stream=true&starting_after=3"),
            None,
            &[],
        )
        .await;
    assert_eq!(resumed, events[4..].to_vec());
    let (_, resumed) = user
        .stream(
            "GET",
            &format!("/v1/responses/{id}?stream=true"),
            None,
            &[("last-event-id", "5")],
        )
        .await;
    assert_eq!(resumed, events[6..].to_vec());

    // Resuming after the terminal event ends at once, with nothing.
    let last = events.len() - 1;
    let (_, nothing) = user
        .stream(
            "GET",
            &format!("/v1/responses/{id}?stream=true&starting_after={last}"),
            None,
            &[],
        )
        .await;
    assert!(nothing.is_empty(), "{nothing:?}");

    // Once the log has expired, the events are rebuilt from what is stored.
    let redis_port = stack.env["TURNPIKE__REDIS__URL"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let deleted = std::process::Command::new("redis-cli")
        .args(["-p", &redis_port, "DEL", &format!("tp:{{{id}}}:events")])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&deleted.stdout).trim() == "1");
    let (_, rebuilt) = user
        .stream("GET", &format!("/v1/responses/{id}?stream=true"), None, &[])
        .await;
    assert_eq!(text_of(&rebuilt), "Turnpikes charge tolls.");
    assert_eq!(
        rebuilt.last().unwrap().data["response"]["status"],
        "completed"
    );
    // A client resuming from its cursor after the log expired gets the
    // terminal event, with the whole response, next, and the stream ends.
    let (_, ended) = user
        .stream(
            "GET",
            &format!("/v1/responses/{id}?stream=true"),
            None,
            &[("last-event-id", "3")],
        )
        .await;
    assert_eq!(types(&ended), ["response.completed"]);
    assert_eq!(ended[0].data["sequence_number"], 4);
    assert_eq!(
        ended[0].data["response"]["output"][0]["content"][0]["text"],
        "Turnpikes charge tolls."
    );

    // Without stream or background the request waits for the answer.
    let waited = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "input": "/echo second"})),
        )
        .await;
    assert_eq!(waited.ok()["status"], "completed");
    assert_eq!(waited.ok()["output"][0]["content"][0]["text"], "second");

    // In the background it is queued, then completes.
    let queued = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "input": "hello", "background": true})),
        )
        .await;
    assert_eq!(queued.ok()["status"], "queued");
    let id = queued.ok()["id"].as_str().unwrap().to_owned();
    let done: Value = eventually(
        "the background turn to complete",
        Duration::from_secs(20),
        || async {
            let r = user.call("GET", &format!("/v1/responses/{id}"), None).await;
            (r.body["status"] == "completed").then(|| r.body.clone())
        },
    )
    .await;
    assert!(
        !done["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .is_empty()
    );
}

async fn failures_surface_as_failed_responses(paths: Paths) {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, paths).await;
    let user = app.new_user().await;
    for directive in ["/fail 500", "/fail 429", "/fail disconnect"] {
        let (_, events) = user
            .stream(
                "POST",
                "/v1/responses",
                Some(json!({"input": directive, "stream": true})),
                &[],
            )
            .await;
        let last = &events.last().unwrap().data;
        assert_eq!(last["type"], "response.failed", "{directive}: {last}");
        assert_eq!(last["response"]["status"], "failed");
        // OpenAI's code; what went wrong is in the message.
        assert_eq!(
            last["response"]["error"]["code"], "server_error",
            "{directive}"
        );
        let id = last["response"]["id"].as_str().unwrap();
        let stored = user.call("GET", &format!("/v1/responses/{id}"), None).await;
        assert_eq!(stored.ok()["status"], "failed");
    }
}

async fn client_function_calls_round_trip(paths: Paths) {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, paths).await;
    let user = app.new_user().await;
    let conversation = user.create_conversation(json!({})).await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tools = json!([
        {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
    ]);

    // Two /call lines: parallel calls, in call order, streamed with their arguments.
    let (_, events) = user
        .stream(
            "POST",
            "/v1/responses",
            Some(json!({
                "conversation": conversation, "tools": tools, "stream": true,
                "input": "/call get_weather {\"city\":\"Oslo\"}\n/call get_time {}"
            })),
            &[],
        )
        .await;
    let kinds = types(&events);
    assert!(
        kinds.contains(&"response.function_call_arguments.delta"),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&"response.function_call_arguments.done"),
        "{kinds:?}"
    );
    let response = &events.last().unwrap().data["response"];
    assert_eq!(response["status"], "completed");
    let calls = response["output"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0]["type"], "function_call");
    assert_eq!(calls[0]["name"], "get_weather");
    assert_eq!(calls[0]["arguments"], "{\"city\":\"Oslo\"}");
    assert_eq!(calls[1]["name"], "get_time");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("fc_"));

    // The client answers with function_call_output items in a new response.
    let outputs: Vec<Value> = calls
        .iter()
        .zip(["sunny", "noon"])
        .map(|(call, output)| json!({"type": "function_call_output", "call_id": call["call_id"], "output": output}))
        .collect();
    let answered = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "tools": tools, "input": outputs})),
        )
        .await;
    assert_eq!(answered.ok()["status"], "completed");
    assert_eq!(
        answered.ok()["output"][0]["content"][0]["text"],
        "tool said: sunny; noon"
    );

    // The conversation holds it all, in order.
    let items = user.list_items(&conversation, "?order=asc").await;
    let kinds: Vec<&str> = items.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "message",
            "function_call",
            "function_call",
            "function_call_output",
            "function_call_output",
            "message"
        ]
    );

    // A later turn without tools: the frozen tool list stays (the prompt
    // prefix is kept), the model is told they are gone, and a call to one
    // is answered with an error instead of reaching the client.
    let plain = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "input": "/call get_weather {}"})),
        )
        .await;
    let output = plain.ok()["output"].as_array().unwrap();
    let kinds: Vec<&str> = output.iter().map(|i| i["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["function_call", "function_call_output", "message"]);
    assert!(
        output[1]["output"]
            .as_str()
            .unwrap()
            .contains("the tool get_weather is not available"),
        "{}",
        output[1]
    );
}

/// An api, a worker and a mock model streaming 20 tokens per second.
async fn slow_agents(stack: &Stack, paths: Paths) -> (TestApp, turnpike_testkit::Agents) {
    let mut settings = stack.settings(paths);
    let agents = turnpike_testkit::Agents::spawn_slow(&mut settings, 20, 200).await;
    (TestApp::spawn_with(settings).await, agents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_terminal_event_never_came_ends_from_the_stored_response() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let (_, events) = user
        .stream(
            "POST",
            "/v1/responses",
            Some(json!({"input": "/echo the end", "stream": true})),
            &[],
        )
        .await;
    let id = events[0].data["response"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The log loses its terminal event, as when a worker dies between
    // storing the outcome and logging it.
    let redis_port = stack.env["TURNPIKE__REDIS__URL"]
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let terminal = format!("{}-0", events.len());
    let deleted = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis_port,
            "XDEL",
            &format!("tp:{{{id}}}:events"),
            &terminal,
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&deleted.stdout).trim(), "1");
    // Followed again, the stream replays what is logged, then, idle, finds
    // the response ended and ends with its terminal event.
    let (_, again) = user
        .stream("GET", &format!("/v1/responses/{id}?stream=true"), None, &[])
        .await;
    assert_eq!(again.len(), events.len());
    let last = &again.last().unwrap().data;
    assert_eq!(last["type"], "response.completed");
    assert_eq!(last["sequence_number"], events.len() as u64 - 1);
    assert_eq!(
        last["response"]["output"],
        events.last().unwrap().data["response"]["output"]
    );
}

async fn status_of(user: &turnpike_testkit::User, id: &str) -> String {
    user.call("GET", &format!("/v1/responses/{id}"), None)
        .await
        .body["status"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_turn_within_a_second() {
    let stack = Stack::shared().await;
    let (app, _agents) = slow_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let id = user
        .create_background(json!({"input": "talk for a while"}))
        .await;
    // Read the stream until the first text delta, cancel, then read it to its end.
    let stream = user.follow_until_answering(&id).await;
    let started = std::time::Instant::now();
    let cancelled = user
        .call("POST", &format!("/v1/responses/{id}/cancel"), None)
        .await;
    assert_eq!(cancelled.ok()["status"], "cancelled");
    let events = stream.read_to_end().await;
    let elapsed = started.elapsed();
    assert_eq!(events.last().unwrap().data["type"], "response.cancelled");
    assert!(
        elapsed < Duration::from_secs(1),
        "the stream ended {elapsed:?} after the cancel"
    );
    let text = text_of(&events);
    assert!(text.split(' ').count() < 200, "the model was stopped early");
    assert_eq!(status_of(&user, &id).await, "cancelled");
    // Idempotent.
    let again = user
        .call("POST", &format!("/v1/responses/{id}/cancel"), None)
        .await;
    assert_eq!(again.ok()["status"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_active_turn_per_conversation_with_each_multitask_strategy() {
    let stack = Stack::shared().await;
    let (app, _agents) = slow_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let conversation = user.create_conversation(json!({})).await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let create = |input: &str, multitask: &str| json!({"conversation": conversation, "input": input, "background": true, "multitask": multitask});

    // enqueue (the default): the second waits for the first, then runs.
    let first = user
        .call(
            "POST",
            "/v1/responses",
            Some(create("/echo one", "enqueue")),
        )
        .await;
    let first = first.ok()["id"].as_str().unwrap().to_owned();
    let second = user
        .call(
            "POST",
            "/v1/responses",
            Some(create("/echo two", "enqueue")),
        )
        .await;
    let second = second.ok()["id"].as_str().unwrap().to_owned();
    // reject: refused while a turn is active.
    let rejected = user
        .call(
            "POST",
            "/v1/responses",
            Some(create("/echo three", "reject")),
        )
        .await;
    assert_eq!(rejected.error(409)["code"], "conversation_busy");
    eventually(
        "both queued turns to complete in order",
        Duration::from_secs(30),
        || async {
            let (a, b) = (
                status_of(&user, &first).await,
                status_of(&user, &second).await,
            );
            assert!(
                !(b == "completed" && a != "completed"),
                "the second turn finished before the first"
            );
            (a == "completed" && b == "completed").then_some(())
        },
    )
    .await;
    let items = user.list_items(&conversation, "?order=asc").await;
    let texts: Vec<String> = items.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["content"][0]["text"].as_str().unwrap().to_owned())
        .collect();
    // The waiting turn's input joined the conversation after the first answer.
    assert_eq!(texts, ["/echo one", "one", "/echo two", "two"]);
    let first_reply = user
        .call("GET", &format!("/v1/responses/{first}"), None)
        .await;
    assert_eq!(first_reply.ok()["output"][0]["content"][0]["text"], "one");
    let second_reply = user
        .call("GET", &format!("/v1/responses/{second}"), None)
        .await;
    assert_eq!(second_reply.ok()["output"][0]["content"][0]["text"], "two");

    // interrupt: the running turn is cancelled and the new one runs.
    let long = user
        .call(
            "POST",
            "/v1/responses",
            Some(create("talk for a while", "enqueue")),
        )
        .await;
    let long = long.ok()["id"].as_str().unwrap().to_owned();
    eventually(
        "the long turn to start",
        Duration::from_secs(20),
        || async { (status_of(&user, &long).await == "in_progress").then_some(()) },
    )
    .await;
    let urgent = user
        .call(
            "POST",
            "/v1/responses",
            Some(create("/echo now", "interrupt")),
        )
        .await;
    let urgent = urgent.ok()["id"].as_str().unwrap().to_owned();
    eventually(
        "the interrupting turn to complete",
        Duration::from_secs(20),
        || async { (status_of(&user, &urgent).await == "completed").then_some(()) },
    )
    .await;
    assert_eq!(status_of(&user, &long).await, "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompts_stay_cache_friendly_over_twenty_turns() {
    let stack = Stack::shared().await;
    let (app, agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let conversation = user.create_conversation(json!({})).await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Tools in a different order each turn: the prompt keeps them frozen.
    let mut tools = vec![
        json!({"type": "function", "name": "search", "description": "Search the web", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}),
        json!({"type": "function", "name": "calendar", "description": "Read the calendar", "parameters": {"type": "object", "properties": {}}}),
        json!({"type": "conversation_search"}),
        json!({"type": "function", "name": "weather", "description": "Weather by city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}),
    ];
    let (mut input_tokens, mut cached_tokens) = (0u64, 0u64);
    for turn in 0..20 {
        tools.rotate_left(1);
        // Each turn looks something up with a server-side tool, then answers.
        let reply = user
            .call("POST", "/v1/responses", Some(json!({
                "conversation": conversation,
                "instructions": "You are a helpful assistant for travellers on toll roads. Answer briefly.",
                "tools": tools,
                "input": format!("question number {turn}: what should I know about the road ahead?\n/call conversation_search {{\"query\":\"question number {}\"}}", turn.max(1) - 1),
            })))
            .await;
        assert_eq!(
            reply.ok()["output"].as_array().unwrap().len(),
            3,
            "{}",
            reply.body
        );
        let usage = &reply.ok()["usage"];
        input_tokens += usage["input_tokens"].as_u64().unwrap();
        cached_tokens += usage["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap();
    }
    // Every request's prompt is an exact prefix of the next one's.
    let requests = agents.model_requests(&conversation).await;
    assert_eq!(requests.len(), 40);
    for pair in requests.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert_eq!(a["instructions"], b["instructions"]);
        assert_eq!(a["tools"], b["tools"]);
        let (ai, bi) = (
            a["input"].as_array().unwrap(),
            b["input"].as_array().unwrap(),
        );
        assert!(bi.len() > ai.len() && bi[..ai.len()] == ai[..]);
    }
    let ratio = cached_tokens as f64 / input_tokens as f64;
    println!(
        "prompt_cache_hit_ratio_20_turns: {ratio:.3} ({cached_tokens} of {input_tokens} input tokens over {} model calls)",
        requests.len()
    );
    assert!(ratio >= 0.95, "prompt cache hit ratio {ratio:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_conversation_cancels_its_turns_and_hides_its_responses() {
    let stack = Stack::shared().await;
    let (app, _agents) = slow_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let running = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "a long answer, please", "background": true})),
        )
        .await;
    let running = running.ok().clone();
    let conversation = running["conversation"]["id"].as_str().unwrap().to_owned();
    let queued = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "input": "and then?", "background": true})),
        )
        .await;
    let queued = queued.ok()["id"].as_str().unwrap().to_owned();
    let running = running["id"].as_str().unwrap().to_owned();
    let stream = user.follow_until_answering(&running).await;
    user.call("DELETE", &format!("/v1/conversations/{conversation}"), None)
        .await
        .ok();
    // The running turn stops and its stream ends cancelled.
    let events = stream.read_to_end().await;
    assert_eq!(
        events.last().unwrap().data["type"],
        "response.cancelled",
        "{:?}",
        events.last()
    );
    // Its responses are gone with it, and cannot be continued.
    for id in [&running, &queued] {
        let gone = user
            .call(
                "GET",
                &format!("/v1/responses/{id}?consistency=strong"),
                None,
            )
            .await;
        gone.error(404);
    }
    let refused = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"previous_response_id": running, "input": "hi"})),
        )
        .await;
    refused.error(404);
}

/// A worker starting a turn with pending input and an interrupting create
/// take the conversation's and the responses' locks in one order, so they
/// wait for each other instead of deadlocking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_start_and_an_interrupt_do_not_deadlock() {
    use turnpike_core::turns;
    let stack = Stack::shared().await;
    let settings = stack.settings(Paths::DIRECT);
    // No workers: both turns stay queued, the second with pending input.
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let first = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "one", "background": true})),
        )
        .await;
    let first = first.ok().clone();
    let conversation = first["conversation"]["id"].as_str().unwrap().to_owned();
    let second = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "input": "two", "background": true})),
        )
        .await;
    let second = turnpike_core::ids::parse("resp", second.ok()["id"].as_str().unwrap()).unwrap();
    let conversation = turnpike_core::ids::parse("conv", &conversation).unwrap();
    let router = std::sync::Arc::new(turnpike_core::db::Router::new(&settings.database).unwrap());
    let owner: (uuid::Uuid,) = {
        let mut tx = router.write().await.unwrap();
        sqlx::query_as("SELECT user_id FROM conversations WHERE id = $1")
            .bind(conversation)
            .fetch_one(turnpike_core::db::DbConn::conn(&mut tx))
            .await
            .unwrap()
    };

    // The interrupting create holds the conversation…
    let mut interrupt = router.write().await.unwrap();
    turns::reserve_seqs(&mut interrupt, conversation, owner.0, 0)
        .await
        .unwrap()
        .unwrap();
    // …while a worker starts the pending turn, and waits for it.
    let worker = {
        let router = std::sync::Arc::clone(&router);
        tokio::spawn(async move {
            let mut tx = router.write().await.unwrap();
            let started = turns::start(&mut tx, second, false).await;
            let started = started.map(|s| s.is_some());
            tx.commit().await.map(|_| started)
        })
    };
    let admin = stack.superuser("primary").await;
    eventually(
        "the worker waits on a lock",
        Duration::from_secs(5),
        || async {
            let (waiting,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM pg_stat_activity
              WHERE wait_event_type = 'Lock' AND datname = 'turnpike'",
            )
            .fetch_one(&admin)
            .await
            .unwrap();
            (waiting > 0).then_some(())
        },
    )
    .await;
    // The interrupt now cancels the conversation's turns: no deadlock.
    let cancelled = turns::cancel_active(&mut interrupt, conversation)
        .await
        .unwrap();
    assert_eq!(cancelled.len(), 2);
    interrupt.commit().await.unwrap();
    // The worker then finds its turn cancelled, and starts nothing.
    let started = worker.await.unwrap().unwrap().unwrap();
    assert!(!started);
}
