//! Bad input gets a 4xx in the one error shape, and stores nothing.

use std::time::Duration;

use serde_json::json;
use turnpike_testkit::{Paths, Stack, TestApp, raw};

both_paths!(bad_bodies_are_refused_by_name, bad_ids_limits_and_keys);

async fn bad_bodies_are_refused_by_name(paths: Paths) {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, paths).await;
    let user = app.new_user().await;
    let id = user
        .new_conversation(json!([{"role": "user", "content": "keep me"}]))
        .await;
    let auth = format!("Bearer {}", user.key);
    let post = |path: String, body: &'static [u8], content_type: &'static str| {
        let http = app.http.clone();
        let url = format!("{}{path}", app.url);
        let auth = auth.clone();
        async move {
            raw(
                &http,
                "POST",
                &url,
                &[("authorization", &auth), ("content-type", content_type)],
                Some(body.to_vec()),
            )
            .await
        }
    };
    let items_path = format!("/v1/conversations/{id}/items");

    let malformed = post(items_path.clone(), b"{\"items\": [", "application/json").await;
    assert_eq!(malformed.error(400)["code"], "invalid_json");

    let trailing = post(items_path.clone(), b"{\"items\": []} x", "application/json").await;
    trailing.error(400);

    let wrong_type = user
        .call("POST", "/v1/conversations", Some(json!({"metadata": 5})))
        .await;
    assert_eq!(wrong_type.error(400)["param"], "metadata");

    let unknown = user
        .call("POST", "/v1/conversations", Some(json!({"metadta": {}})))
        .await;
    let error = unknown.error(400);
    assert!(
        error["message"].as_str().unwrap().contains("metadta"),
        "{error}"
    );

    let unknown_in_item = user
        .add_items(
            &id,
            json!([{"role": "user", "content": "x", "colour": "red"}]),
        )
        .await;
    let error = unknown_in_item.error(400);
    assert_eq!(error["param"], "items[0]");
    assert!(
        error["message"].as_str().unwrap().contains("colour"),
        "{error}"
    );

    let bad_role = user
        .add_items(&id, json!([{"role": "wizard", "content": "x"}]))
        .await;
    bad_role.error(400);

    // U+0000, which PostgreSQL text and jsonb cannot hold, is a 400 naming
    // the field, in items and metadata alike; nothing is stored.
    let nul = user
        .call(
            "POST",
            "/v1/conversations",
            Some(json!({"items": [{"role": "user", "content": "a\u{0}b"}]})),
        )
        .await;
    let error = nul.error(400);
    assert_eq!(error["param"], "items[0].content");
    assert!(
        error["message"].as_str().unwrap().contains("U+0000"),
        "{error}"
    );
    let nul_metadata = user
        .call(
            "POST",
            "/v1/conversations",
            Some(json!({"metadata": {"note": "a\u{0}b"}})),
        )
        .await;
    assert_eq!(nul_metadata.error(400)["param"], "metadata.note");
    let nul_item = user
        .add_items(
            &id,
            json!([{"role": "user", "content": [{"type": "input_text", "text": "\u{0}"}]}]),
        )
        .await;
    assert_eq!(nul_item.error(400)["param"], "items[0].content[0].text");
    let bad_type = user
        .add_items(&id, json!([{"type": "telegram", "text": "x"}]))
        .await;
    bad_type.error(400);
    let no_items = user.add_items(&id, json!([])).await;
    no_items.error(400);

    let too_much_metadata: serde_json::Map<String, serde_json::Value> =
        (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
    let refused = user
        .call(
            "POST",
            "/v1/conversations",
            Some(json!({"metadata": too_much_metadata})),
        )
        .await;
    assert_eq!(refused.error(400)["param"], "metadata");

    // A body over the limit is refused from its Content-Length, before it is read.
    let status_line = oversized_post(&app.url, &items_path, &auth).await;
    assert!(status_line.starts_with("HTTP/1.1 413"), "{status_line}");

    let xml = post(items_path.clone(), b"<items/>", "application/xml").await;
    xml.error(415);
    // A compressed body is refused as such, not read as malformed JSON.
    let gzipped = raw(
        &app.http,
        "POST",
        &format!("{}{items_path}", app.url),
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
        Some(vec![0x1f, 0x8b, 0x08, 0x00]),
    )
    .await;
    assert_eq!(gzipped.error(415)["param"], "Content-Encoding");

    let bad_response = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": id, "input": "x", "temprature": 1})),
        )
        .await;
    assert!(
        bad_response.error(400)["message"]
            .as_str()
            .unwrap()
            .contains("temprature")
    );
    let no_input = user
        .call("POST", "/v1/responses", Some(json!({"conversation": id})))
        .await;
    assert_eq!(no_input.error(400)["param"], "input");

    // Nothing above changed what is stored.
    let items = user.list_items(&id, "").await;
    let items = items.ok();
    assert_eq!(items["data"].as_array().unwrap().len(), 1);
    assert_eq!(items["data"][0]["content"][0]["text"], "keep me");
}

async fn bad_ids_limits_and_keys(paths: Paths) {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, paths).await;
    let user = app.new_user().await;
    let id = user.create_conversation(json!({})).await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    for bad in [
        "nope",
        "conv_123",
        "resp_0190a0b0c0d0e0f00000000000000000",
        "conv_zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    ] {
        user.call("GET", &format!("/v1/conversations/{bad}"), None)
            .await
            .error(404);
        user.list_items(bad, "").await.error(404);
    }
    user.call(
        "GET",
        "/v1/conversations/conv_0190a0b0c0d0e0f00000000000000000",
        None,
    )
    .await
    .error(404);
    user.call("GET", "/v1/responses/resp_nope", None)
        .await
        .error(404);
    user.call(
        "GET",
        &format!("/v1/conversations/{id}/items/msg_nope"),
        None,
    )
    .await
    .error(404);

    for query in [
        "?limit=0",
        "?limit=101",
        "?limit=-1",
        "?limit=ten",
        "?order=sideways",
        "?after=bogus",
        "?consistency=psychic",
    ] {
        let reply = user.list_items(&id, query).await;
        assert!(
            reply.error(400)["param"].is_string(),
            "{query}: {}",
            reply.body
        );
    }
    let bad_token = user
        .call_with(
            "GET",
            &format!("/v1/conversations/{id}/items"),
            None,
            &[("turnpike-consistency", "yesterday")],
        )
        .await;
    assert_eq!(bad_token.error(400)["param"], "Turnpike-Consistency");

    let url = format!("{}/v1/conversations", app.url);
    let missing = raw(&app.http, "GET", &url, &[], None).await;
    assert_eq!(missing.error(401)["type"], "authentication_error");
    let wrong = raw(
        &app.http,
        "GET",
        &url,
        &[("authorization", "Bearer tp_not_a_key")],
        None,
    )
    .await;
    wrong.error(401);
    let malformed = raw(
        &app.http,
        "GET",
        &url,
        &[("authorization", "Basic Zm9vOmJhcg==")],
        None,
    )
    .await;
    malformed.error(401);

    user.call("GET", "/v1/admin/topology", None)
        .await
        .error(403);
    user.call("GET", "/v1/no-such-route", None).await.error(404);
    user.call("PATCH", "/v1/conversations", None)
        .await
        .error(405);
}

/// Announces a 2 MiB body, sends a little of it, and returns the response's
/// head: the server answers without waiting for the rest. (Sending all of it
/// through an HTTP client races the server closing the unread connection.)
async fn oversized_post(base: &str, path: &str, auth: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut socket, addr) = connect(base).await;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        2 * 1024 * 1024
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&[b'a'; 4096]).await.unwrap();
    let mut buffer = vec![0u8; 4096];
    let n = socket.read(&mut buffer).await.unwrap();
    let text = String::from_utf8_lossy(&buffer[..n]).into_owned();
    assert!(text.contains("\"error\""), "413 in the error shape: {text}");
    text
}

/// The response fields passed through to the model are checked at the edge:
/// a bad one is a 400 naming it, and no turn is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_parameters_are_checked_before_a_turn_exists() {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let cases = [
        (json!({"reasoning": "high"}), "reasoning"),
        (
            json!({"reasoning": {"effort": "maximal"}}),
            "reasoning.effort",
        ),
        (json!({"reasoning": {"budget": 3}}), "reasoning.budget"),
        (json!({"text": "json"}), "text"),
        (json!({"tools": [{"type": "telepathy"}]}), "tools[0].type"),
        // A client's tool never shadows a server-side one.
        (
            json!({"tools": [{"type": "function", "name": "conversation_search"}]}),
            "tools[0].name",
        ),
        (json!({"service_tier": "turbo"}), "service_tier"),
        (json!({"temperature": -0.5}), "temperature"),
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"top_p": 1.5}), "top_p"),
        (json!({"tool_choice": "sometimes"}), "tool_choice"),
        (json!({"tool_choice": {"name": "x"}}), "tool_choice.type"),
        (
            json!({"tool_choice": {"type": "function", "name": "nowhere"}}),
            "tool_choice.name",
        ),
        (json!({"truncation": "maybe"}), "truncation"),
        (json!({"max_output_tokens": 0}), "max_output_tokens"),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "not a url"}]}]}),
            "input[0].content[0].image_url",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
            "input[0].content[0]",
        ),
        (json!({"top_logprobs": 21}), "top_logprobs"),
        (
            json!({"prompt_cache_retention": "forever"}),
            "prompt_cache_retention",
        ),
        (json!({"client_metadata": {"n": 1}}), "client_metadata"),
        (json!({"moderation": "strict"}), "moderation"),
        (
            json!({"store": false, "conversation": "conv_0198c0de000070008000000000000001"}),
            "store",
        ),
        (
            json!({"previous_response_id": "resp_0198c0de000070008000000000000001",
                   "conversation": "conv_0198c0de000070008000000000000001"}),
            "previous_response_id",
        ),
        (
            json!({"input": [{"role": "user", "content": [{"type": "input_hologram"}]}]}),
            "input[0].content[0].type",
        ),
        // PostgreSQL cannot store U+0000: named, not a 500.
        (json!({"input": "a\u{0}b"}), "input"),
        (json!({"metadata": {"k": "a\u{0}b"}}), "metadata.k"),
        (json!({"instructions": "be\u{0}brief"}), "instructions"),
        (json!({"tools": [{"type": "function"}]}), "tools[0].name"),
        (
            json!({"tools": [{"type": "conversation_search"}, {"type": "conversation_search"}]}),
            "tools[1]",
        ),
        (json!({"tools": [{"type": "http_fetch"}]}), "tools[0].type"),
        (
            json!({"context_management": [{"type": "truncate"}]}),
            "context_management[0].type",
        ),
        (
            json!({"context_management": [{"type": "compaction", "compact_threshold": 0}]}),
            "context_management[0].compact_threshold",
        ),
    ];
    for (extra, param) in cases {
        let mut body = json!({"input": "hello", "background": true});
        for (key, value) in extra.as_object().unwrap() {
            body[key] = value.clone();
        }
        let reply = user.call("POST", "/v1/responses", Some(body)).await;
        assert_eq!(reply.error(400)["param"], param, "{extra}");
    }
    let listed = user.call("GET", "/v1/conversations", None).await;
    assert_eq!(listed.ok()["data"], json!([]), "no turn, no conversation");
    // Good values pass.
    let ok = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "hello", "background": true,
                "reasoning": {"effort": "low", "summary": "auto"}, "text": {"format": {"type": "text"}},
                "temperature": 2, "top_p": 0, "truncation": "auto", "max_output_tokens": 1,
                "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
                "tool_choice": {"type": "function", "name": "get_weather"}})),
        )
        .await;
    assert_eq!(ok.ok()["status"], "queued");
}

/// A forced tool choice passes when it names what the request offers: a
/// namespace's function (qualified or bare), a server-side tool (which the
/// worker offers as a function), a chat's custom tool in the Chat
/// Completions shape; each turn then runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tool_choices_naming_offered_tools_pass() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    // A forced tool may be a namespace's function (qualified or bare) or a
    // server-side tool, which the worker offers as a function.
    let namespace = json!({"type": "namespace", "name": "crm", "description": "CRM",
        "tools": [{"type": "function", "name": "lookup_account", "parameters": {"type": "object"}}]});
    for (tools, name) in [
        (json!([namespace]), "crm.lookup_account"),
        (json!([namespace]), "lookup_account"),
        (
            json!([{"type": "conversation_search"}]),
            "conversation_search",
        ),
    ] {
        let forced = user
            .call(
                "POST",
                "/v1/responses",
                Some(json!({"input": "hello", "background": true, "tools": tools,
                    "tool_choice": {"type": "function", "name": name}})),
            )
            .await;
        assert_eq!(forced.ok()["status"], "queued", "{name}");
    }
    // A chat's named custom tool choice, in the Chat Completions shape.
    let chat = user
        .call(
            "POST",
            "/v1/chat/completions",
            Some(
                json!({"model": "mock-1", "messages": [{"role": "user", "content": "hi"}],
                "tools": [{"type": "custom", "custom": {"name": "grep"}}],
                "tool_choice": {"type": "custom", "custom": {"name": "grep"}}}),
            ),
        )
        .await;
    chat.ok();
}

/// A tool call's output in a request that starts a conversation must answer
/// a call in the same request (a chat's tool message, a call of an earlier
/// assistant message): an orphan is a 400 naming it, as OpenAI answers,
/// not a turn the provider fails. Answered calls pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_outputs_must_answer_a_call() {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let call = json!({"type": "function_call", "call_id": "call_1", "name": "get_weather",
        "arguments": "{}"});
    let output =
        |id: &str| json!({"type": "function_call_output", "call_id": id, "output": "rainy"});
    let orphan = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": [call, output("call_2")], "background": true})),
        )
        .await;
    assert_eq!(orphan.error(400)["param"], "input[1].call_id");
    let answered = user
        .call(
            "POST",
            "/v1/responses",
            Some(
                json!({"input": [{"role": "user", "content": "weather?"}, call, output("call_1")],
                "background": true}),
            ),
        )
        .await;
    assert_eq!(answered.ok()["status"], "queued");

    let asked = json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
        "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]});
    let tool = |id: &str| json!({"role": "tool", "tool_call_id": id, "content": "rainy"});
    let orphan = user
        .call(
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": "mock-1", "messages": [
                {"role": "user", "content": "weather?"}, asked, tool("call_2")]})),
        )
        .await;
    assert_eq!(orphan.error(400)["param"], "messages[2].tool_call_id");
    let orphan = user
        .call(
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": "mock-1", "messages": [
                {"role": "user", "content": "weather?"}, tool("call_1")]})),
        )
        .await;
    assert_eq!(orphan.error(400)["param"], "messages[1].tool_call_id");
    let capped = user
        .call(
            "POST",
            "/v1/chat/completions",
            Some(json!({"model": "mock-1", "max_tokens": 0,
                "messages": [{"role": "user", "content": "weather?"}]})),
        )
        .await;
    assert_eq!(capped.error(400)["param"], "max_tokens");
}

/// A number as large as a double goes in, is stored (PostgreSQL keeps it
/// as an exact decimal and prints every digit), and comes back: reading
/// it again rounds exactly instead of overflowing into a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_double_in_a_request_reads_back() {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let body = r#"{"input": "hello", "background": true,
        "prompt": {"id": "pmpt_1", "variables": {"n": 1.7976931348623157e308}}}"#;
    let created = user
        .http
        .post(format!("{}/v1/responses", app.url))
        .bearer_auth(&user.key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let created: serde_json::Value = created.json().await.unwrap();
    let id = created["id"].as_str().unwrap();
    // Stored with every digit…
    let uuid = uuid::Uuid::parse_str(id.trim_start_matches("resp_")).unwrap();
    let (request,): (String,) = sqlx::query_as("SELECT request::text FROM responses WHERE id = $1")
        .bind(uuid)
        .fetch_one(&stack.superuser("primary").await)
        .await
        .unwrap();
    assert!(request.contains("17976931348623157000"), "{request}");
    // …and read back.
    let stored = user.call("GET", &format!("/v1/responses/{id}"), None).await;
    assert_eq!(stored.ok()["id"], id);
}

/// `include` is accepted in every form clients send it (once, repeated, or
/// bracketed as the OpenAI SDKs do) and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn include_is_accepted_in_every_form() {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, Paths::DIRECT).await;
    let user = app.new_user().await;
    let conversation = user
        .new_conversation(json!([{"role": "user", "content": "hi"}]))
        .await;
    let response = user.create_background(json!({"input": "hello"})).await;
    let whole = user.list_items(&conversation, "").await.ok().clone();
    for include in [
        "include=message.output_text.logprobs",
        "include=a&include=b",
        "include[]=a&include[]=b",
        "include%5B%5D=a",
    ] {
        let listed = user.list_items(&conversation, &format!("?{include}")).await;
        assert_eq!(listed.ok(), &whole, "{include}");
        for path in [
            format!("/v1/responses/{response}?{include}"),
            format!("/v1/responses/{response}/input_items?{include}"),
        ] {
            user.call("GET", &path, None).await.ok();
        }
    }
}

/// A plain TCP connection to the api at `base` (`http://host:port`), for
/// requests an HTTP client would not send, and the `host:port` it went to.
async fn connect(base: &str) -> (tokio::net::TcpStream, String) {
    let addr = base.trim_start_matches("http://").to_owned();
    let socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    (socket, addr)
}

/// Reads from `socket` until the server closes it (bounded), and returns
/// everything it sent.
async fn read_to_close(socket: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buffer))
            .await
            .expect("the server closed the connection within 10 s");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
    }
    String::from_utf8_lossy(&received).into_owned()
}

/// A client that stops sending is not waited for: a body that stops
/// arriving is a 408 in the error shape (with or without an idempotency
/// key, which stays free for the retry), and a connection that never
/// finishes its request head, or sends nothing, is closed. A stream open
/// longer than either timeout is not cut: its keep-alive comments keep it
/// from being idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_is_not_waited_for() {
    use tokio::io::AsyncWriteExt;
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.api.idle_timeout_ms = 300;
    settings.api.request_body_timeout_ms = 300;
    settings.events.keepalive_ms = 100;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;

    for key in [None, Some("stalled-body")] {
        let (mut socket, addr) = connect(&app.url).await;
        let key = key.map_or(String::new(), |k| format!("Idempotency-Key: {k}\r\n"));
        let head = format!(
            "POST /v1/conversations HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n{key}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"me",
            user.key
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        let answer = read_to_close(&mut socket).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("connection: close"), "{answer}");
        assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    }
    // The key was not spent on the request that never arrived.
    let retried = user
        .call_with(
            "POST",
            "/v1/conversations",
            Some(json!({})),
            &[("Idempotency-Key", "stalled-body")],
        )
        .await;
    retried.ok();

    let (mut half_head, _) = connect(&app.url).await;
    half_head
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthor")
        .await
        .unwrap();
    let (mut silent, _) = connect(&app.url).await;
    // Open at first (a third of the timeout), closed once the timeout passes.
    let early = tokio::time::timeout(
        Duration::from_millis(100),
        tokio::io::AsyncReadExt::read(&mut half_head, &mut [0u8; 16]),
    )
    .await;
    assert!(early.is_err(), "closed early: {early:?}");
    assert_eq!(read_to_close(&mut half_head).await, "");
    assert_eq!(read_to_close(&mut silent).await, "");

    // No worker serves this queue: the response waits, and its stream with it.
    let response = user.create_background(json!({"input": "wait"})).await;
    let mut stream = user
        .open_stream(
            "GET",
            &format!("/v1/responses/{response}?stream=true"),
            None,
        )
        .await;
    // Nothing announces that a connection was not closed: wait out both
    // timeouts three times over, then end the response.
    tokio::time::sleep(Duration::from_millis(900)).await;
    user.call("POST", &format!("/v1/responses/{response}/cancel"), None)
        .await
        .ok();
    stream.read_until("response.cancelled", 1).await;
}

/// A body sent without a length is cut off where it passes its route's
/// limit: 413 in the error shape, and the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_is_refused_as_it_arrives() {
    use tokio::io::AsyncWriteExt;
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.api.body_limit_bytes = 4096;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let metadata = "x".repeat(6000);
    let body = format!("{{\"metadata\": {{\"note\": \"{metadata}\"}}}}");
    let (mut socket, addr) = connect(&app.url).await;
    let request = format!(
        "POST /v1/conversations HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        user.key,
        body.len()
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let answer = read_to_close(&mut socket).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"code\":\"body_too_large\""), "{answer}");
    assert!(answer.contains("limit of 4096 bytes"), "{answer}");
}
