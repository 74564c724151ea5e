//! The agent loop against the mock model: server-side tool loops, parallel
//! calls, per-tool limits, compaction, reasoning passed back, prompt
//! settings frozen per conversation, and a redelivered turn resuming after
//! its last stored step.

use serde_json::{Value, json};
use turnpike_testkit::{Agents, Paths, SseEvent, Stack, TestApp};

fn types(events: &[SseEvent]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e.data["type"].as_str().unwrap())
        .collect()
}

fn kinds(items: &[Value]) -> Vec<&str> {
    items.iter().map(|i| i["type"].as_str().unwrap()).collect()
}

async fn items_of(user: &turnpike_testkit::User, conversation: &str) -> Vec<Value> {
    user.list_items(conversation, "?order=asc&limit=100")
        .await
        .ok()["data"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_side_tools_loop_until_the_model_answers() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let conversation = user.new_conversation(json!([{"role": "user", "content": "Remember: the toll on the north bridge is 4 coins."},
               {"role": "assistant", "content": "Noted."}]),
    )
    .await;
    stack.wait_replicated().await;

    // Two rounds of tool calls, then the answer: three model calls in one turn.
    let (status, events) = user
        .stream("POST", "/v1/responses", Some(json!({
            "conversation": conversation, "stream": true,
            "tools": [{"type": "conversation_search"}],
            "input": "/call conversation_search {\"query\":\"north bridge\"}\n/then\n/call conversation_search {\"query\":\"nothing like this\"}"
        })), &[])
        .await;
    assert_eq!(status, 200);
    let last = &events.last().unwrap().data;
    assert_eq!(last["type"], "response.completed", "{last}");
    let output = last["response"]["output"].as_array().unwrap().clone();
    assert_eq!(
        kinds(&output),
        [
            "function_call",
            "function_call_output",
            "function_call",
            "function_call_output",
            "message"
        ]
    );
    assert_eq!(output[0]["call_id"], output[1]["call_id"]);
    let found: Value = serde_json::from_str(output[1]["output"].as_str().unwrap()).unwrap();
    assert!(
        found["matches"][0]["text"]
            .as_str()
            .unwrap()
            .contains("4 coins"),
        "{found}"
    );
    let nothing: Value = serde_json::from_str(output[3]["output"].as_str().unwrap()).unwrap();
    assert_eq!(nothing["matches"], json!([]));
    assert_eq!(
        output[4]["content"][0]["text"],
        format!("tool said: {}", output[3]["output"].as_str().unwrap())
    );
    // Every output item was announced and closed in the stream, in order.
    let done: Vec<u64> = events
        .iter()
        .filter(|e| e.data["type"] == "response.output_item.done")
        .map(|e| e.data["output_index"].as_u64().unwrap())
        .collect();
    assert_eq!(done, [0, 1, 2, 3, 4]);
    // Every step is stored: each before the loop acted on it, in a
    // transaction of its own; the last in the one that records the outcome.
    let id = last["response"]["id"].as_str().unwrap();
    let id = turnpike_core::ids::parse(turnpike_protocol::ids::RESPONSE, id).unwrap();
    let steps: Vec<(i64, String, bool)> = sqlx::query_as(
        "SELECT s.step, s.kind, s.xmin = r.xmin FROM response_steps s
         JOIN responses r ON r.id = s.response_id WHERE s.response_id = $1 ORDER BY s.step",
    )
    .bind(id)
    .fetch_all(&stack.superuser("primary").await)
    .await
    .unwrap();
    let expected = [
        (0, "model", false),
        (1, "tools", false),
        (2, "model", false),
        (3, "tools", false),
        (4, "model", true),
    ];
    assert_eq!(
        steps,
        expected.map(|(step, kind, with_outcome)| (step, kind.to_owned(), with_outcome))
    );
    // Usage sums the three model calls.
    let usage = &last["response"]["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0);
    // The conversation holds the whole loop after the input.
    let items = items_of(&user, &conversation).await;
    assert_eq!(items.len(), 2 + 1 + 5);
    assert_eq!(&items[3..], &output[..]);

    // Parallel calls: both run, outputs in call order.
    let reply = user
        .call("POST", "/v1/responses", Some(json!({
            "conversation": conversation,
            "tools": [{"type": "conversation_search"}],
            "input": "/call conversation_search {\"query\":\"toll\"}\n/call conversation_search {\"query\":\"zzz-no-match\"}"
        })))
        .await;
    let output = reply.ok()["output"].as_array().unwrap().clone();
    assert_eq!(
        kinds(&output),
        [
            "function_call",
            "function_call",
            "function_call_output",
            "function_call_output",
            "message"
        ]
    );
    assert_eq!(output[2]["call_id"], output[0]["call_id"]);
    assert_eq!(output[3]["call_id"], output[1]["call_id"]);
    assert!(output[2]["output"].as_str().unwrap().contains("toll"));
    assert!(
        output[3]["output"]
            .as_str()
            .unwrap()
            .contains("\"matches\":[]")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_are_bounded_in_time_and_size_and_fetch_refuses_private_targets() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.tools.timeout_ms = 500;
    settings.tools.max_output_bytes = 400;
    settings.tools.http_fetch.enabled = true;
    settings.tools.http_fetch.allow_hosts = vec!["127.0.0.1".into()];
    settings.tools.http_fetch.max_bytes = 4_000;
    let _agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    // A server that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let port = app.url.rsplit(':').next().unwrap().to_owned();

    let calls = [
        // Allow-listed loopback: fetched, the body cut at 4,000 bytes, the output at 400.
        format!("/call http_fetch {{\"url\":\"http://127.0.0.1:{port}/openapi.json\"}}"),
        // Not allow-listed: refused before connecting.
        format!("/call http_fetch {{\"url\":\"http://localhost:{port}/healthz\"}}"),
        // Never answers: the per-tool timeout ends it.
        format!("/call http_fetch {{\"url\":\"http://127.0.0.1:{silent_port}/\"}}"),
    ];
    let started = std::time::Instant::now();
    let reply = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"tools": [{"type": "http_fetch"}], "input": calls.join("\n")})),
        )
        .await;
    let elapsed = started.elapsed();
    let output = reply.ok()["output"].as_array().unwrap().clone();
    assert_eq!(kinds(&output)[3..6], ["function_call_output"; 3]);
    let fetched = output[3]["output"].as_str().unwrap();
    // The fetched document, cut to the output cap (the status comes after the body).
    assert!(fetched.contains("\\\"openapi\\\":\\\"3.1.0"), "{fetched}");
    assert!(
        fetched.contains("\n[output truncated: 400 of ") && fetched.len() < 480,
        "{fetched}"
    );
    let refused = output[4]["output"].as_str().unwrap();
    assert!(refused.contains("not a public address"), "{refused}");
    let timed_out = output[5]["output"].as_str().unwrap();
    assert!(timed_out.contains("timed out after 500 ms"), "{timed_out}");
    // The turn waited for the one slow call's timeout, not longer.
    assert!(elapsed < std::time::Duration::from_secs(5), "{elapsed:?}");
    drop(silent);

    // A tool type no provider or server knows is refused by name.
    let refused = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"tools": [{"type": "telepathy"}], "input": "hi"})),
        )
        .await;
    assert_eq!(refused.error(400)["param"], "tools[0].type");
}

/// Runs three turns with a low compaction threshold and returns the
/// mock's requests and the conversation's items.
async fn compaction_run(
    mode: turnpike_core::config::CompactionMode,
) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.model.compaction = mode;
    let agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let conversation = user.new_conversation(json!([])).await;
    let long = "The toll road runs north past quiet fields and every gate opens for a traveller. "
        .repeat(16);
    let turn = |input: String| {
        json!({"conversation": conversation, "input": input, "stream": true,
               "context_management": [{"type": "compaction", "compact_threshold": 520}]})
    };
    let mut streams = Vec::new();
    for input in [format!("/echo {long}"), "hello".into(), "and now?".into()] {
        let (_, events) = user
            .stream("POST", "/v1/responses", Some(turn(input)), &[])
            .await;
        assert_eq!(events.last().unwrap().data["type"], "response.completed");
        streams.push(events);
    }
    // The first turn has nothing to compact; the second compacts first;
    // the third starts from the compaction.
    assert!(!types(&streams[0]).contains(&"response.compaction.compacting"));
    assert!(types(&streams[1]).contains(&"response.compaction.compacting"));
    assert!(!types(&streams[2]).contains(&"response.compaction.compacting"));
    let second = streams[1].last().unwrap().data["response"]["output"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(kinds(&second), ["compaction", "message"]);
    let requests = agents.model_requests(&conversation).await;
    (requests, items_of(&user, &conversation).await, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_by_the_provider_starts_the_next_prompts_from_its_item() {
    let (requests, items, second) =
        compaction_run(turnpike_core::config::CompactionMode::Auto).await;
    let compaction = &second[0];
    let opaque = compaction["encrypted_content"].as_str().unwrap();
    assert!(opaque.starts_with("mock-compaction-"), "{compaction}");
    // Requests: turn 1, turn 2 (after compacting), turn 3.
    assert_eq!(requests.len(), 3);
    let window = [
        json!({"type": "message", "role": "user", "content": requests[0]["input"][0]["content"].clone()}),
        json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}),
        json!({"type": "compaction", "encrypted_content": opaque}),
    ];
    // The provider's window (the user messages, then the compaction item,
    // its content as received) replaced the history, and the next turn's
    // prompt starts from it: the assistant's long answer is gone.
    assert_eq!(requests[1]["input"].as_array().unwrap()[..], window[..]);
    let third = requests[2]["input"].as_array().unwrap();
    assert_eq!(third[..3], window[..]);
    assert_eq!(third[3]["role"], "assistant");
    assert_eq!(third[4]["content"][0]["text"], "and now?");
    // The items users see keep everything, the compaction item included.
    assert_eq!(
        kinds(&items),
        [
            "message",
            "message",
            "message",
            "compaction",
            "message",
            "message",
            "message"
        ]
    );
    assert_eq!(items[3], *compaction);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_falls_back_to_a_summary_that_keeps_recent_user_messages() {
    let (requests, items, second) =
        compaction_run(turnpike_core::config::CompactionMode::Summary).await;
    // Turn 1, the summary request, turn 2, turn 3.
    assert_eq!(requests.len(), 4);
    let asked = requests[1]["input"].as_array().unwrap();
    // The summary request keeps the prompt's prefix (a cache hit) and asks last.
    assert_eq!(asked.len(), 4);
    assert_eq!(asked[0], requests[0]["input"][0]);
    assert!(
        asked.last().unwrap()["content"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Context checkpoint")
    );
    let summary = second[0]["encrypted_content"].as_str().unwrap();
    let summary = summary.strip_prefix("turnpike-summary-v1:").unwrap();
    let turn2 = requests[2]["input"].as_array().unwrap();
    assert_eq!(turn2.len(), 3, "two user messages and the summary");
    assert_eq!(turn2[1]["content"][0]["text"], "hello");
    assert_eq!(turn2[2]["role"], "developer");
    assert!(
        turn2[2]["content"][0]["text"]
            .as_str()
            .unwrap()
            .ends_with(summary)
    );
    assert_eq!(requests[3]["input"].as_array().unwrap()[..3], turn2[..]);
    assert_eq!(items.len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_summary_compaction_sent_back_stands_for_its_summary() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.model.compaction = turnpike_core::config::CompactionMode::Summary;
    settings.model.compaction_keep_user_messages = 1;
    let agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let history = json!([
        {"role": "user", "content": "plan the route north"},
        {"role": "assistant", "content": "Take the toll road past the fields."},
        {"role": "user", "content": "and the gates?"},
    ]);
    let compacted = user
        .call(
            "POST",
            "/v1/responses/compact",
            Some(json!({"model": "mock-1", "input": history})),
        )
        .await;
    let compacted = compacted.ok();
    assert_eq!(compacted["object"], "response.compaction");
    let output = compacted["output"].as_array().unwrap();
    // The latest user message kept, then the summary's compaction item.
    assert_eq!(kinds(output), ["message", "compaction"]);
    assert_eq!(output[0]["content"][0]["text"], "and the gates?");
    let opaque = output[1]["encrypted_content"].as_str().unwrap();
    let summary = opaque.strip_prefix("turnpike-summary-v1:").unwrap();
    assert!(!summary.is_empty());
    assert!(compacted["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // Sent back as the next input, the item reaches the model as its summary.
    let mut input = output.clone();
    input.push(json!({"role": "user", "content": "/echo onwards"}));
    let next = user
        .call("POST", "/v1/responses", Some(json!({"input": input})))
        .await;
    let next = next.ok();
    assert_eq!(next["status"], "completed");
    let conversation = next["conversation"]["id"].as_str().unwrap();
    let requests = agents.model_requests(conversation).await;
    let prompt = requests[0]["input"].as_array().unwrap();
    assert_eq!(prompt.len(), 3);
    assert_eq!(prompt[1]["role"], "developer");
    assert!(
        prompt[1]["content"][0]["text"]
            .as_str()
            .unwrap()
            .ends_with(summary)
    );
    assert_eq!(prompt[2]["content"][0]["text"], "/echo onwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reasoning_and_frozen_prompt_settings_are_passed_back_unchanged() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let conversation = user.new_conversation(json!([])).await;
    let function = |name: &str| json!({"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}});

    let first = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({
                "conversation": conversation, "input": "/echo thinking done",
                "instructions": "Answer briefly.", "reasoning": {"effort": "low"},
                "tools": [function("zeta"), function("alpha")],
            })),
        )
        .await;
    let output = first.ok()["output"].as_array().unwrap().clone();
    assert_eq!(kinds(&output), ["reasoning", "message"]);
    let encrypted = output[0]["encrypted_content"].as_str().unwrap().to_owned();
    assert!(encrypted.starts_with("mock-reasoning-"));
    assert!(output[0]["id"].as_str().unwrap().starts_with("rs_"));

    // New instructions, a tool dropped and one added.
    let second = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({
                "conversation": conversation, "input": "/echo ok",
                "instructions": "Answer in French.", "reasoning": {"effort": "low"},
                "tools": [function("beta"), function("alpha")],
            })),
        )
        .await;
    assert_eq!(second.ok()["status"], "completed");

    let requests = agents.model_requests(&conversation).await;
    assert_eq!(requests.len(), 2);
    let (a, b) = (&requests[0], &requests[1]);
    assert_eq!(a["include"], json!(["reasoning.encrypted_content"]));
    assert_eq!(a["store"], false);
    // Instructions stay frozen; tools keep their order, the new one appended.
    assert_eq!(a["instructions"], "Answer briefly.");
    assert_eq!(b["instructions"], "Answer briefly.");
    let names = |r: &Value| -> Vec<String> {
        r["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(a), ["alpha", "zeta"]);
    assert_eq!(names(b), ["alpha", "zeta", "beta"]);
    // The first prompt's input is a prefix of the second's, which carries the
    // reasoning exactly as received, then the change as a developer message.
    let (ai, bi) = (
        a["input"].as_array().unwrap(),
        b["input"].as_array().unwrap(),
    );
    assert_eq!(bi[..ai.len()], ai[..]);
    // As the mock sent it: its own id included.
    let reasoning = &bi[ai.len()];
    assert_eq!(
        (
            &reasoning["type"],
            &reasoning["summary"],
            &reasoning["encrypted_content"]
        ),
        (&json!("reasoning"), &json!([]), &json!(encrypted))
    );
    assert!(
        reasoning["id"].as_str().unwrap().starts_with("rs_mock"),
        "{reasoning}"
    );
    assert_eq!(bi[ai.len() + 2]["content"][0]["text"], "/echo ok");
    let note = bi[ai.len() + 3]["content"][0]["text"].as_str().unwrap();
    assert_eq!(bi[ai.len() + 3]["role"], "developer");
    assert!(
        note.contains("Answer in French.") && note.contains("do not call them: zeta"),
        "{note}"
    );
}

/// A first turn's prompt settings are stored by its finish: one interrupted
/// before it ended froze nothing, and the turn that replaced it is the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_first_turn_leaves_the_prompt_settings_to_its_successor() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let agents = Agents::spawn_slow(&mut settings, 20, 40).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let conversation = user.new_conversation(json!([])).await;
    let first = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({
                "conversation": conversation, "background": true,
                "input": "tell me a long story", "instructions": "Answer briefly.",
            })),
        )
        .await;
    let first = first.ok()["id"].as_str().unwrap().to_owned();
    let stream = user.follow_until_answering(&first).await;
    let replace = |input: &str| {
        json!({
            "conversation": conversation, "multitask": "interrupt",
            "input": input, "instructions": "Answer in French.",
        })
    };
    let second = user
        .call("POST", "/v1/responses", Some(replace("/echo oui")))
        .await;
    assert_eq!(second.ok()["status"], "completed");
    let last = stream.read_to_end().await.pop().unwrap().data;
    assert_eq!(last["type"], "response.cancelled", "{last}");
    let third = user
        .call("POST", "/v1/responses", Some(replace("/echo encore")))
        .await;
    assert_eq!(third.ok()["status"], "completed");

    let requests = agents.model_requests(&conversation).await;
    assert_eq!(requests.len(), 3);
    for request in &requests[1..] {
        assert_eq!(request["instructions"], "Answer in French.", "{request}");
        let notes = request["input"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|item| item["role"] == "developer")
            .count();
        assert_eq!(notes, 0, "{request}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_turn_resumes_after_its_last_stored_step() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let mut agents = Agents::spawn_slow(&mut settings, 20, 40).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let conversation = user.new_conversation(json!([])).await;
    let created = user
        .call("POST", "/v1/responses", Some(json!({
            "conversation": conversation, "background": true,
            "tools": [{"type": "conversation_search"}],
            "input": "/call conversation_search {\"query\":\"anything\"}\n/then\nnow tell me a long story"
        })))
        .await;
    let id = created.ok()["id"].as_str().unwrap().to_owned();
    // The tool ran and the final answer is streaming: kill the worker.
    let stream = user.follow_until_answering(&id).await;
    agents.kill_workers();
    agents.add_worker(&settings).await;
    let events = stream.read_to_end().await;
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.data["sequence_number"], i as u64);
    }
    let last = &events.last().unwrap().data;
    assert_eq!(last["type"], "response.completed", "{last}");
    let output = last["response"]["output"].as_array().unwrap();
    assert_eq!(
        kinds(output),
        ["function_call", "function_call_output", "message"]
    );
    // The model was asked for the tool call once; only the interrupted
    // answer was asked for again.
    let requests = agents.model_requests(&conversation).await;
    let lengths: Vec<usize> = requests
        .iter()
        .map(|r| r["input"].as_array().unwrap().len())
        .collect();
    assert_eq!(lengths, [1, 3, 3]);
    // Nothing stored twice.
    let items = items_of(&user, &conversation).await;
    assert_eq!(
        kinds(&items),
        [
            "message",
            "function_call",
            "function_call_output",
            "message"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_tools_of_a_configured_server_run_in_the_loop() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let agents = Agents::spawn_configured(&mut settings, |settings, mock_url| {
        let server: turnpike_core::config::McpServerSettings = serde_json::from_value(
            json!({"url": format!("{}/mcp", mock_url.trim_end_matches("/v1"))}),
        )
        .unwrap();
        settings.tools.mcp_servers.insert("calc".into(), server);
    })
    .await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let conversation = user.new_conversation(json!([])).await;

    let reply = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({
                "conversation": conversation,
                "tools": [{"type": "mcp", "server_label": "calc", "require_approval": "never"}],
                "input": "/call calc__add {\"a\":2,\"b\":3}"
            })),
        )
        .await;
    let response = reply.ok();
    assert_eq!(response["status"], "completed", "{response}");
    let output = response["output"].as_array().unwrap().clone();
    assert_eq!(
        kinds(&output),
        ["function_call", "function_call_output", "message"]
    );
    assert_eq!(output[0]["name"], "calc__add");
    assert_eq!(output[1]["call_id"], output[0]["call_id"]);
    assert_eq!(output[1]["output"], "5");
    assert_eq!(output[2]["content"][0]["text"], "tool said: 5");
    // The model was offered the server's tools, as functions, sorted.
    let requests = agents.model_requests(&conversation).await;
    let offered: Vec<&str> = requests[0]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(offered, ["calc__add", "calc__shout"]);
    assert_eq!(
        requests[0]["tools"][0]["parameters"]["required"],
        json!(["a", "b"])
    );

    // Only configured servers can be offered, and only as configured.
    let refused = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"tools": [{"type": "mcp", "server_label": "elsewhere"}], "input": "hi"})),
        )
        .await;
    assert_eq!(refused.error(400)["param"], "tools[0].server_label");
    let refused = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"tools": [{"type": "mcp", "server_label": "calc",
                "server_url": "http://169.254.169.254/"}], "input": "hi"})),
        )
        .await;
    assert_eq!(refused.error(400)["param"], "tools[0].server_url");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turns_history_is_read_within_its_bounds() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.worker.history_max_items = 4;
    let agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let conversation = user.new_conversation(json!([])).await;
    for n in 0..4 {
        let reply = user
            .call(
                "POST",
                "/v1/responses",
                Some(json!({"conversation": conversation, "input": format!("/echo answer {n}")})),
            )
            .await;
        assert_eq!(reply.ok()["status"], "completed");
    }
    // The fourth turn's prompt: the newest items within four, from a user
    // message on (the cut never leaves an answer without its question).
    let requests = agents.model_requests(&conversation).await;
    let prompt = requests.last().unwrap()["input"].as_array().unwrap();
    let texts: Vec<&str> = prompt
        .iter()
        .map(|i| i["content"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["/echo answer 2", "answer 2", "/echo answer 3"],
        "{prompt:?}"
    );
    // Everything is still stored and listed.
    assert_eq!(items_of(&user, &conversation).await.len(), 8);
}
