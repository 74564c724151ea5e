//! Turns run through the worker's `chat_completions` provider against the
//! mock model's `/chat/completions`: to a client of the API, a turn looks
//! exactly as it does with the Responses provider.

use serde_json::{Value, json};
use turnpike_core::config::ProviderKind;
use turnpike_testkit::{Agents, Paths, SseEvent, Stack, TestApp};

/// An api, a mock model and a worker that speaks Chat Completions to it.
async fn chat_agents(stack: &Stack) -> (TestApp, Agents) {
    let mut settings = stack.settings(Paths::DIRECT);
    // The worker is built from these settings inside `Agents::spawn`.
    settings.model.provider = ProviderKind::ChatCompletions;
    let agents = Agents::spawn(&mut settings).await;
    (TestApp::spawn_with(settings).await, agents)
}

fn types(events: &[SseEvent]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e.data["type"].as_str().unwrap())
        .collect()
}

/// The deltas of one kind, for one output index, joined.
fn deltas(events: &[SseEvent], kind: &str, output_index: u64) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.data["type"] == kind && e.data["output_index"] == output_index)
        .map(|e| e.data["delta"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_echo_arrives_exactly_and_is_stored() {
    let stack = Stack::shared().await;
    let (app, _agents) = chat_agents(&stack).await;
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
    assert_eq!(
        deltas(&events, "response.output_text.delta", 0).concat(),
        "Turnpikes charge tolls."
    );
    let completed = &events.last().unwrap().data["response"];
    assert_eq!(completed["status"], "completed");
    let usage = &completed["usage"];
    assert!(
        usage["input_tokens"].as_u64().unwrap() > 0
            && usage["output_tokens"].as_u64().unwrap() > 0
            && usage["total_tokens"].as_u64().unwrap()
                == usage["input_tokens"].as_u64().unwrap()
                    + usage["output_tokens"].as_u64().unwrap(),
        "{usage}"
    );

    let id = completed["id"].as_str().unwrap();
    let stored = user.call("GET", &format!("/v1/responses/{id}"), None).await;
    let stored = stored.ok();
    assert_eq!(stored["status"], "completed");
    assert_eq!(stored["output"], completed["output"]);
    assert_eq!(
        stored["output"][0],
        json!({
            "type": "message", "id": stored["output"][0]["id"], "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": "Turnpikes charge tolls.", "annotations": [], "logprobs": []}]
        })
    );
    let items = user.list_items(&conversation, "?order=asc").await;
    let items = items.ok()["data"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2);
    assert_eq!(items[1], stored["output"][0]);

    // The next turn's prompt starts with this one's: the cache key reached the mock.
    let again = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "input": "/echo again"})),
        )
        .await;
    let usage = &again.ok()["usage"];
    assert!(
        usage["input_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{usage}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_client_function_calls_round_trip() {
    let stack = Stack::shared().await;
    let (app, _agents) = chat_agents(&stack).await;
    let user = app.new_user().await;
    let conversation = user.create_conversation(json!({})).await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let tools = json!([
        {"type": "function", "name": "get_weather", "description": "Weather by city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
        {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
    ]);

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

    // Arguments arrive in the fragments Chat Completions streams them in,
    // each call under its own output index.
    let weather = deltas(&events, "response.function_call_arguments.delta", 0);
    assert!(weather.len() > 1, "{weather:?}");
    assert_eq!(weather.concat(), "{\"city\":\"Oslo\"}");
    assert_eq!(
        deltas(&events, "response.function_call_arguments.delta", 1).concat(),
        "{}"
    );
    let added: Vec<&Value> = events
        .iter()
        .filter(|e| e.data["type"] == "response.output_item.added")
        .map(|e| &e.data["item"])
        .collect();
    assert_eq!(added.len(), 2);
    assert_eq!(added[0]["name"], "get_weather");
    assert_eq!(added[1]["name"], "get_time");
    let response = &events.last().unwrap().data["response"];
    assert_eq!(response["status"], "completed");
    let calls = response["output"].as_array().unwrap().clone();
    assert_eq!(calls.len(), 2);
    for (call, (name, arguments)) in calls
        .iter()
        .zip([("get_weather", "{\"city\":\"Oslo\"}"), ("get_time", "{}")])
    {
        assert_eq!(call["type"], "function_call");
        assert_eq!(call["status"], "completed");
        assert_eq!(call["name"], name);
        assert_eq!(call["arguments"], arguments);
        assert!(call["id"].as_str().unwrap().starts_with("fc_"));
        assert!(call["call_id"].as_str().unwrap().starts_with("call_"));
    }
    assert_ne!(calls[0]["call_id"], calls[1]["call_id"]);

    // The outputs go back as `tool` messages answering the assistant's tool calls.
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_failures_end_as_failed_responses() {
    let stack = Stack::shared().await;
    let (app, _agents) = chat_agents(&stack).await;
    let user = app.new_user().await;
    // 500 and 429 are retried, then surface; a stream cut before its
    // finish_reason and [DONE] is a failure too, not a short answer.
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
