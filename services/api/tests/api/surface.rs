//! The `responses.create` surface beyond the basics: continuing with
//! `previous_response_id` (and forking from an earlier turn), `store:
//! false`, `max_tool_calls`, client-executed custom tools and their outputs,
//! provider-hosted tools, deleting a response, counting input tokens and
//! compacting a context.

use serde_json::{Value, json};
use turnpike_testkit::{Paths, Stack, TestApp, User};

async fn create(user: &User, body: Value) -> Value {
    user.call("POST", "/v1/responses", Some(body))
        .await
        .ok()
        .clone()
}

async fn texts_of(user: &User, conversation: &Value) -> Vec<String> {
    let conversation = conversation.as_str().unwrap();
    let page = user
        .call(
            "GET",
            &format!("/v1/conversations/{conversation}/items?order=asc&consistency=strong"),
            None,
        )
        .await;
    page.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["content"][0]["text"].as_str().unwrap_or("").to_owned())
        .collect()
}

fn output_text(response: &Value) -> String {
    response["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "message")
        .flat_map(|i| i["content"].as_array().unwrap().iter())
        .filter_map(|p| p["text"].as_str())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_response_id_continues_the_latest_turn_and_forks_an_earlier_one() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let one = create(&user, json!({"input": "/echo one"})).await;
    let two = create(
        &user,
        json!({"previous_response_id": one["id"], "input": "/echo two"}),
    )
    .await;
    assert_eq!(two["conversation"], one["conversation"]);
    assert_eq!(two["previous_response_id"], one["id"]);
    // `one` is no longer its conversation's latest turn: a new conversation
    // holds what `one` saw and answered, then this turn.
    let three = create(
        &user,
        json!({"previous_response_id": one["id"], "input": "/echo three"}),
    )
    .await;
    assert_ne!(three["conversation"], one["conversation"]);
    assert_eq!(
        texts_of(&user, &three["conversation"]["id"]).await,
        ["/echo one", "one", "/echo three", "three"]
    );
    assert_eq!(
        texts_of(&user, &one["conversation"]["id"]).await,
        ["/echo one", "one", "/echo two", "two"]
    );
    // Another user's response is not there to continue.
    let other = app.new_user().await;
    let refused = other
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"previous_response_id": one["id"], "input": "hi"})),
        )
        .await;
    assert_eq!(refused.error(404)["param"], "previous_response_id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item_references_resolve_to_the_callers_stored_items() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let one = create(&user, json!({"input": "/echo one"})).await;
    let answer = one["output"][0]["id"].as_str().unwrap();
    let question = user
        .call(
            "GET",
            &format!("/v1/responses/{}/input_items", one["id"].as_str().unwrap()),
            None,
        )
        .await;
    let question = question.ok()["data"][0]["id"].as_str().unwrap().to_owned();
    // A client replaying its history by reference (as the AI SDK does with
    // `store: true`), the type left out once as OpenAI allows.
    let two = create(
        &user,
        json!({"input": [{"type": "item_reference", "id": question}, {"id": answer},
                         {"role": "user", "content": "/echo two"}]}),
    )
    .await;
    assert_eq!(output_text(&two), "two");
    assert_ne!(two["conversation"], one["conversation"]);
    assert_eq!(
        texts_of(&user, &two["conversation"]["id"]).await,
        ["/echo one", "one", "/echo two", "two"]
    );
    // An item that is not the caller's, or not there, is a 404 naming it.
    let other = app.new_user().await;
    let refused = other
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": [{"type": "item_reference", "id": answer}]})),
        )
        .await;
    assert_eq!(refused.error(404)["param"], "input[0].id");
    let refused = user
        .call(
            "POST",
            "/v1/conversations",
            Some(json!({"items": [{"role": "user", "content": "hi"},
                                  {"type": "item_reference", "id": "msg_nothere"}]})),
        )
        .await;
    assert_eq!(refused.error(404)["param"], "items[1].id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stateless_clients_long_history_is_taken_whole() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    // About 4 MiB in 4,000 items: more than other requests may send.
    let line = "The toll road runs north past quiet fields. ".repeat(23);
    let mut input: Vec<Value> = (0..3_999)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            json!({"role": role, "content": format!("{i}: {line}")})
        })
        .collect();
    input.push(json!({"role": "user", "content": "/echo all of it"}));
    let body = json!({"input": input, "store": false});
    assert!(body.to_string().len() > 4_000_000);
    let done = create(&user, body).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(output_text(&done), "all of it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_false_runs_the_turn_and_keeps_nothing() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let done = create(&user, json!({"input": "/echo not kept", "store": false})).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["store"], false);
    assert_eq!(output_text(&done), "not kept");
    let id = done["id"].as_str().unwrap();
    let gone = user
        .call(
            "GET",
            &format!("/v1/responses/{id}?consistency=strong"),
            None,
        )
        .await;
    gone.error(404);
    let listed = user
        .call("GET", "/v1/conversations?consistency=strong", None)
        .await;
    assert_eq!(listed.ok()["data"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_answers_the_window_to_send_next_and_keeps_nothing() {
    let stack = Stack::shared().await;
    let (app, agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let one = create(&user, json!({"input": "/echo one"})).await;
    let two = create(
        &user,
        json!({"previous_response_id": one["id"], "input": "/echo two"}),
    )
    .await;
    let compacted = user
        .call(
            "POST",
            "/v1/responses/compact",
            Some(
                json!({"model": "mock-1", "previous_response_id": two["id"], "input": "and now?"}),
            ),
        )
        .await;
    let compacted = compacted.ok().clone();
    assert_eq!(compacted["object"], "response.compaction");
    let output = compacted["output"].as_array().unwrap();
    // Every user message, then the provider's compaction item.
    let texts: Vec<&str> = output[..3]
        .iter()
        .map(|i| i["content"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["/echo one", "/echo two", "and now?"]);
    assert!(output[..3].iter().all(|i| i["role"] == "user"));
    assert_eq!(output[3]["type"], "compaction");
    assert!(output[3]["id"].as_str().unwrap().starts_with("cmp_"));
    assert!(
        output[3]["encrypted_content"]
            .as_str()
            .unwrap()
            .starts_with("mock-compaction-")
    );
    assert!(compacted["usage"]["input_tokens"].as_u64().unwrap() > 0);

    // Nothing of it is stored, and the compacted conversation is unchanged.
    let id = compacted["id"].as_str().unwrap();
    user.call(
        "GET",
        &format!("/v1/responses/{id}?consistency=strong"),
        None,
    )
    .await
    .error(404);
    let listed = user
        .call("GET", "/v1/conversations?consistency=strong", None)
        .await;
    assert_eq!(listed.ok()["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        texts_of(&user, &two["conversation"]["id"]).await,
        ["/echo one", "one", "/echo two", "two"]
    );

    // The window goes back as the next input, as a stateless client sends it.
    let mut input = output.clone();
    input.push(json!({"role": "user", "content": "/echo onwards"}));
    let next = create(&user, json!({"input": input})).await;
    assert_eq!(output_text(&next), "onwards");
    // The model sees that window as the client sent it, nothing cut.
    let requests = agents
        .model_requests(next["conversation"]["id"].as_str().unwrap())
        .await;
    let prompt = requests[0]["input"].as_array().unwrap();
    assert_eq!(prompt.len(), 5);
    assert_eq!(
        prompt[3],
        json!({"type": "compaction", "encrypted_content": output[3]["encrypted_content"]})
    );
    assert_eq!(prompt[4]["content"][0]["text"], "/echo onwards");

    // Bad requests are refused by name.
    let refused = user
        .call(
            "POST",
            "/v1/responses/compact",
            Some(json!({"model": "mock-1"})),
        )
        .await;
    assert_eq!(refused.error(400)["param"], "input");
    let refused = user
        .call(
            "POST",
            "/v1/responses/compact",
            Some(json!({"model": "mock-1", "input": "x", "stream": true})),
        )
        .await;
    refused.error(400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tool_calls_bounds_the_server_side_calls() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let calls = "/call conversation_search {\"query\": \"a\"}\n/call conversation_search {\"query\": \"b\"}\n/call conversation_search {\"query\": \"c\"}";
    let done = create(
        &user,
        json!({"input": calls, "tools": [{"type": "conversation_search"}], "max_tool_calls": 1}),
    )
    .await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["max_tool_calls"], 1);
    let outputs: Vec<&str> = done["output"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "function_call_output")
        .map(|i| i["output"].as_str().unwrap())
        .collect();
    assert_eq!(outputs.len(), 3);
    let refused = outputs
        .iter()
        .filter(|o| o.contains("max_tool_calls reached"))
        .count();
    assert_eq!(refused, 2, "{outputs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_tool_call_ends_the_turn_and_its_output_continues_it() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let tools = json!([{"type": "custom", "name": "apply_patch", "description": "Apply a patch."}]);
    let first = create(
        &user,
        json!({"input": "/call apply_patch *** Begin Patch", "tools": tools}),
    )
    .await;
    assert_eq!(first["status"], "completed");
    let call = &first["output"][0];
    assert_eq!(call["type"], "custom_tool_call");
    assert_eq!(call["input"], "*** Begin Patch");
    let second = create(
        &user,
        json!({"previous_response_id": first["id"], "tools": tools,
               "input": [{"type": "custom_tool_call_output", "call_id": call["call_id"], "output": "Patched."}]}),
    )
    .await;
    assert_eq!(output_text(&second), "tool said: Patched.");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_and_patch_calls_end_the_turn_and_their_outputs_continue_it() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let tools = json!([{"type": "local_shell"}, {"type": "shell", "environment": {"type": "local"}},
                       {"type": "apply_patch"}, {"type": "function", "name": "noop", "parameters": {}},
                       {"type": "computer_use_preview", "display_width": 1024, "display_height": 768,
                        "environment": "browser"}]);
    let cases = [
        (
            r#"/call local_shell {"command": ["echo", "hi"]}"#,
            "local_shell_call",
            json!({"type": "local_shell_call_output", "output": "hi from local shell"}),
            "hi from local shell",
        ),
        (
            r#"/call shell {"commands": ["echo hi"]}"#,
            "shell_call",
            json!({"type": "shell_call_output", "output": [{"stdout": "hi from shell", "stderr": "",
                   "outcome": {"type": "exit", "exit_code": 0}}]}),
            "hi from shell",
        ),
        (
            r#"/call apply_patch {"type": "create_file", "path": "a.txt", "diff": "+a"}"#,
            "apply_patch_call",
            json!({"type": "apply_patch_call_output", "status": "completed", "output": "created a.txt"}),
            "created a.txt",
        ),
        (
            r#"/call computer {"type": "click", "button": "left", "x": 10, "y": 20}"#,
            "computer_call",
            json!({"type": "computer_call_output",
                   "output": {"type": "computer_screenshot", "image_url": "data:image/png;base64,AAAA"}}),
            r#"{"image_url":"data:image/png;base64,AAAA","type":"computer_screenshot"}"#,
        ),
    ];
    for (directive, kind, mut output, said) in cases {
        let first = create(&user, json!({"input": directive, "tools": tools})).await;
        assert_eq!(first["status"], "completed", "{first}");
        let call = &first["output"][0];
        assert_eq!(call["type"], kind, "{first}");
        assert_eq!(first["output"].as_array().unwrap().len(), 1);
        // Local shell outputs name the call by `id` (OpenAI's shape), the others by `call_id`.
        if kind == "local_shell_call" {
            output["id"] = call["call_id"].clone();
        } else {
            output["call_id"] = call["call_id"].clone();
        }
        let second = create(
            &user,
            json!({"previous_response_id": first["id"], "tools": tools, "input": [output]}),
        )
        .await;
        assert_eq!(output_text(&second), format!("tool said: {said}"));
        // Call and output are kept as sent, in the conversation.
        let conversation = second["conversation"]["id"].as_str().unwrap();
        let items = user
            .call(
                "GET",
                &format!("/v1/conversations/{conversation}/items?order=asc&consistency=strong"),
                None,
            )
            .await;
        let items = items.ok()["data"].as_array().unwrap().clone();
        assert_eq!(items[1]["type"], kind);
        assert_eq!(items[1]["call_id"], call["call_id"]);
        assert_eq!(items[2]["type"], format!("{kind}_output"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hosted_tool_runs_at_the_provider_and_its_item_is_kept() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let done = create(
        &user,
        json!({"input": "/call web_search toll roads", "tools": [{"type": "web_search"}]}),
    )
    .await;
    let kinds: Vec<&str> = done["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["web_search_call", "message"]);
    assert_eq!(done["output"][0]["action"]["query"], "toll roads");
    // Code interpreter and image generation, in one turn, kept verbatim.
    let done = create(
        &user,
        json!({"input": "/call code_interpreter print(1)\n/call image_generation a toll gate",
               "tools": [{"type": "code_interpreter", "container": {"type": "auto"}},
                         {"type": "image_generation"}]}),
    )
    .await;
    let output = done["output"].as_array().unwrap();
    assert_eq!(output[0]["type"], "code_interpreter_call");
    assert_eq!(output[0]["code"], "print(1)");
    assert_eq!(output[1]["type"], "image_generation_call");
    assert!(output[1]["result"].as_str().unwrap().starts_with("iVBOR"));
    assert_eq!(output[2]["type"], "message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_a_response_and_input_tokens_counts_a_prompt() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let done = create(&user, json!({"input": "/echo short-lived"})).await;
    let id = done["id"].as_str().unwrap();
    let deleted = user
        .call("DELETE", &format!("/v1/responses/{id}"), None)
        .await;
    assert_eq!(
        deleted.ok(),
        &json!({"id": id, "object": "response.deleted", "deleted": true})
    );
    user.call(
        "GET",
        &format!("/v1/responses/{id}?consistency=strong"),
        None,
    )
    .await
    .error(404);
    user.call("DELETE", &format!("/v1/responses/{id}"), None)
        .await
        .error(404);

    let count = |body: Value| {
        let user = &user;
        async move {
            user.call("POST", "/v1/responses/input_tokens", Some(body))
                .await
                .ok()
                .clone()
        }
    };
    let short = count(json!({"input": "hello", "instructions": "Be brief."})).await;
    assert_eq!(short["object"], "response.input_tokens");
    let short = short["input_tokens"].as_u64().unwrap();
    let long = count(json!({"input": "hello ".repeat(200), "instructions": "Be brief."})).await;
    assert!(
        long["input_tokens"].as_u64().unwrap() > short + 150,
        "{long}"
    );
    // With a conversation, its history counts too.
    let conversation = done["conversation"]["id"].clone();
    let with_history =
        count(json!({"input": "hello", "instructions": "Be brief.", "conversation": conversation}))
            .await;
    assert!(with_history["input_tokens"].as_u64().unwrap() > short);
}

/// A proxy in front of the api may multiplex its clients' event streams
/// over HTTP/2 (cleartext, prior knowledge): a streamed turn over it shows
/// exactly what is stored, as over HTTP/1.1, and several streams share one
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_cleartext_http2_show_what_is_stored() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let http2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let turn = |n: usize| {
        let http2 = http2.clone();
        let user = &user;
        async move {
            let response = http2
                .post(format!("{}/v1/responses", user.base))
                .bearer_auth(&user.key)
                .json(&json!({"input": format!("question {n}"), "stream": true}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.version(), reqwest::Version::HTTP_2);
            assert_eq!(response.status(), 200);
            turnpike_testkit::parse_sse(&response.text().await.unwrap())
        }
    };
    let streams = futures_util::future::join_all((0..4).map(turn)).await;
    for events in streams {
        let last = events.last().unwrap();
        assert_eq!(last.event.as_deref(), Some("response.completed"));
        let id = last.data["response"]["id"].as_str().unwrap();
        let stored = user
            .call("GET", &format!("/v1/responses/{id}"), None)
            .await
            .ok()
            .clone();
        turnpike_testkit::assert_stream_matches(&events, stored["output"].as_array().unwrap());
    }
}
