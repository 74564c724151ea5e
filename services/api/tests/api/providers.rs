//! Provider conformance: recorded-shape transcripts of OpenAI's Responses
//! and Chat Completions streams, and of vLLM's and Ollama's, each checked
//! against the official `openai` SDK's pydantic types, played to a real
//! worker by a replaying provider. For each: what is stored, what the
//! client streamed (itself checked against the SDK's types, and equal to
//! what is stored), and what the next prompt sends back to the provider.

use std::process::Command;

use serde_json::{Value, json};
use turnpike_core::config::ProviderKind;
use turnpike_testkit::{Agents, Paths, Replay, SseEvent, Stack, TestApp, User};

const TRANSCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/providers");

fn transcript(name: &str) -> String {
    std::fs::read_to_string(format!("{TRANSCRIPTS}/{name}")).expect("read a transcript")
}

/// Runs the SDK-type validator over files; panics with its report.
fn validate(paths: &[String]) {
    let output = Command::new("python3")
        .arg(format!("{TRANSCRIPTS}/validate.py"))
        .args(paths)
        .output()
        .expect("run python3");
    assert!(
        output.status.success(),
        "not the openai SDK's shape:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One turn played from transcripts, and what came of it.
struct Played {
    replay: Replay,
    user: User,
    events: Vec<SseEvent>,
    stored: Value,
    _app: TestApp,
    _agents: Agents,
}

impl Played {
    /// Streams one turn whose model calls are answered by `transcripts` in
    /// order, through a worker speaking `provider`.
    async fn run(provider: ProviderKind, transcripts: &[&str], body: Value) -> Played {
        let files: Vec<String> = transcripts
            .iter()
            .map(|t| format!("{TRANSCRIPTS}/{t}"))
            .collect();
        // The fixtures are OpenAI's shape, not a guess.
        tokio::task::spawn_blocking(move || validate(&files))
            .await
            .unwrap();
        let stack = Stack::shared().await;
        let replay = Replay::start(transcripts.iter().map(|t| transcript(t)).collect()).await;
        let mut settings = stack.settings(Paths::DIRECT);
        settings.model.provider = provider;
        settings.model.base_url = replay.url.clone();
        settings.model.retry_base_ms = 10;
        let agents = Agents::workers(&settings).await;
        let app = TestApp::spawn_with(settings).await;
        let user = app.new_user().await;
        let mut body = body;
        body["stream"] = json!(true);
        let (status, events) = user.stream("POST", "/v1/responses", Some(body), &[]).await;
        assert_eq!(status, 200);
        let id = events[0].data["response"]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let stored = user
            .call("GET", &format!("/v1/responses/{id}"), None)
            .await
            .ok()
            .clone();
        // What the client received is OpenAI's shape too.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/provider-streams");
        std::fs::create_dir_all(dir).unwrap();
        let path = format!("{dir}/{}.json", transcripts[0].trim_end_matches(".sse"));
        let data: Vec<&Value> = events.iter().map(|e| &e.data).collect();
        std::fs::write(&path, serde_json::to_vec(&data).unwrap()).unwrap();
        tokio::task::spawn_blocking(move || validate(&[path]))
            .await
            .unwrap();
        Played {
            replay,
            user,
            events,
            stored,
            _app: app,
            _agents: agents,
        }
    }

    fn kinds(&self) -> Vec<&str> {
        self.events
            .iter()
            .map(|e| e.data["type"].as_str().unwrap())
            .collect()
    }

    /// The deltas of one event type for the item with this id, joined.
    fn streamed(&self, kind: &str, item_id: &Value) -> String {
        self.events
            .iter()
            .filter(|e| e.data["type"] == kind && &e.data["item_id"] == item_id)
            .map(|e| e.data["delta"].as_str().unwrap())
            .collect()
    }

    /// Every stored item's streamed text equals its stored text, and the
    /// output items the client saw done are the stored ones.
    fn streamed_is_stored(&self) {
        let done: Vec<&Value> = self
            .events
            .iter()
            .filter(|e| e.data["type"] == "response.output_item.done")
            .map(|e| &e.data["item"])
            .collect();
        let stored: Vec<&Value> = self.stored["output"].as_array().unwrap().iter().collect();
        assert_eq!(
            done, stored,
            "the items the client saw done are the stored ones"
        );
        for item in &stored {
            let id = &item["id"];
            for part in item["content"].as_array().into_iter().flatten() {
                let (kind, text) = match part["type"].as_str().unwrap() {
                    "output_text" => ("response.output_text.delta", &part["text"]),
                    "refusal" => ("response.refusal.delta", &part["refusal"]),
                    "reasoning_text" => ("response.reasoning_text.delta", &part["text"]),
                    _ => continue,
                };
                assert_eq!(&json!(self.streamed(kind, id)), text, "{item}");
            }
            if item["type"] == "function_call" {
                assert_eq!(
                    json!(self.streamed("response.function_call_arguments.delta", id)),
                    item["arguments"]
                );
            }
        }
    }

    /// Runs a second turn in the same conversation and returns the input
    /// the provider was sent for it.
    async fn next_prompt(&self) -> Vec<Value> {
        let conversation = self.stored["conversation"]["id"].clone();
        let reply = self
            .user
            .call(
                "POST",
                "/v1/responses",
                Some(json!({"conversation": conversation, "input": "and then?"})),
            )
            .await;
        reply.ok();
        let requests = self.replay.requests();
        let last = requests.last().unwrap();
        last.get("input")
            .or_else(|| last.get("messages"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap()
    }
}

fn functions(names: &[&str]) -> Value {
    json!(
        names
            .iter()
            .map(|n| json!({"type": "function", "name": n, "parameters": {"type": "object"}}))
            .collect::<Vec<_>>()
    )
}

/// The item of `items` of this type, without Turnpike's id.
fn of_type<'a>(items: &'a [Value], kind: &str) -> &'a Value {
    items
        .iter()
        .find(|i| i["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {items:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_text_keeps_logprobs_and_streams_what_it_stores() {
    let played = Played::run(
        ProviderKind::Responses,
        &["openai_responses_text.sse", "openai_responses_text.sse"],
        json!({"input": "why tolls?"}),
    )
    .await;
    assert_eq!(played.stored["status"], "completed");
    assert_eq!(
        played.stored["output"][0]["content"],
        json!([{"type": "output_text", "text": "Toll roads charge drivers.", "annotations": [], "logprobs": []}])
    );
    assert_eq!(
        played.stored["usage"]["input_tokens_details"],
        json!({"cached_tokens": 96, "cache_write_tokens": 24})
    );
    played.streamed_is_stored();
    // Obfuscation padding reaches clients, as OpenAI sends it.
    assert!(played.events.iter().any(
        |e| e.data["type"] == "response.output_text.delta" && e.data["obfuscation"].is_string()
    ));
    let next = played.next_prompt().await;
    // The provider gets its own item back exactly as it sent it.
    let answer = next.iter().find(|i| i["role"] == "assistant").unwrap();
    assert_eq!(
        answer,
        &json!({"id": "msg_0198c0de22227000800000000000aa01", "type": "message", "status": "completed",
                "role": "assistant", "content": [{"type": "output_text", "annotations": [], "logprobs": [],
                "text": "Toll roads charge drivers."}]})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_parallel_calls_end_the_turn_for_the_client() {
    let played = Played::run(
        ProviderKind::Responses,
        &["openai_responses_parallel_calls.sse"],
        json!({"input": "weather and time in Oslo?", "tools": functions(&["get_time", "get_weather"])}),
    )
    .await;
    assert_eq!(played.stored["status"], "completed");
    let calls: Vec<(&str, &str)> = played.stored["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap(),
                i["arguments"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        calls,
        [
            ("get_weather", r#"{"city":"Oslo"}"#),
            ("get_time", r#"{"zone":"Europe/Oslo"}"#)
        ]
    );
    played.streamed_is_stored();
    assert_eq!(played.replay.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_reasoning_streams_its_summary_and_goes_back_encrypted() {
    let played = Played::run(
        ProviderKind::Responses,
        &[
            "openai_responses_reasoning.sse",
            "openai_responses_text.sse",
        ],
        json!({"input": "why tolls?", "reasoning": {"effort": "medium", "summary": "auto"}}),
    )
    .await;
    let reasoning = &played.stored["output"][0];
    let summary = "**Weighing tolls**\n\nThe user asks why roads charge; answer briefly.";
    assert_eq!(
        reasoning["summary"],
        json!([{"type": "summary_text", "text": summary}])
    );
    assert_eq!(
        reasoning["encrypted_content"],
        "gAAAAABoEncryptedReasoningBlob0123456789abcdef=="
    );
    assert_eq!(
        played.streamed("response.reasoning_summary_text.delta", &reasoning["id"]),
        summary
    );
    assert!(
        played
            .kinds()
            .contains(&"response.reasoning_summary_part.done")
    );
    played.streamed_is_stored();
    let next = played.next_prompt().await;
    let sent = of_type(&next, "reasoning");
    assert_eq!(sent["encrypted_content"], reasoning["encrypted_content"]);
    assert_eq!(sent["summary"], reasoning["summary"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_refusal_is_stored_and_streamed() {
    let played = Played::run(
        ProviderKind::Responses,
        &["openai_responses_refusal.sse"],
        json!({"input": "something bad"}),
    )
    .await;
    assert_eq!(
        played.stored["output"][0]["content"],
        json!([{"type": "refusal", "refusal": "I can't help with that."}])
    );
    assert!(played.kinds().contains(&"response.refusal.done"));
    played.streamed_is_stored();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_incomplete_ends_incomplete() {
    let played = Played::run(
        ProviderKind::Responses,
        &["openai_responses_incomplete.sse"],
        json!({"input": "a long story", "max_output_tokens": 3}),
    )
    .await;
    assert_eq!(played.stored["status"], "incomplete");
    assert_eq!(
        played.stored["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(played.stored["output"][0]["status"], "incomplete");
    assert_eq!(played.kinds().last(), Some(&"response.incomplete"));
    played.streamed_is_stored();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_failed_for_an_invalid_prompt_is_not_retried() {
    let played = Played::run(
        ProviderKind::Responses,
        &["openai_responses_failed.sse"],
        json!({"input": "flagged"}),
    )
    .await;
    assert_eq!(played.stored["status"], "failed");
    // OpenAI's own code reaches the client.
    assert_eq!(played.stored["error"]["code"], "invalid_prompt");
    assert!(
        played.stored["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid_prompt"),
        "{}",
        played.stored["error"]
    );
    assert_eq!(played.replay.requests().len(), 1, "no retry can fix it");
    assert_eq!(played.kinds().last(), Some(&"response.failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_responses_hosted_web_search_is_kept_verbatim() {
    let played = Played::run(
        ProviderKind::Responses,
        &[
            "openai_responses_web_search.sse",
            "openai_responses_text.sse",
        ],
        json!({"input": "oldest toll road?", "tools": [{"type": "web_search"}]}),
    )
    .await;
    let search = &played.stored["output"][0];
    assert_eq!(search["type"], "web_search_call");
    assert_eq!(
        search["action"],
        json!({"type": "search", "query": "oldest toll road",
               "sources": [{"type": "url", "url": "https://example.org/tolls"}]})
    );
    assert_eq!(
        played.stored["output"][1]["content"][0]["annotations"][0]["type"],
        "url_citation"
    );
    for kind in [
        "response.web_search_call.searching",
        "response.web_search_call.completed",
        "response.output_text.annotation.added",
    ] {
        assert!(played.kinds().contains(&kind), "{kind}");
    }
    played.streamed_is_stored();
    // The provider gets its own item back as it sent it.
    let next = played.next_prompt().await;
    let sent = of_type(&next, "web_search_call");
    assert_eq!(sent["action"], search["action"]);
    assert_eq!(sent["status"], "completed");
    assert_eq!(sent["id"], "ws_0198c0de77777000800000000000ff01");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_responses_reasoning_text_is_kept() {
    let played = Played::run(
        ProviderKind::Responses,
        &["vllm_responses_reasoning.sse", "openai_responses_text.sse"],
        json!({"input": "why tolls?", "model": "Qwen/Qwen3-8B"}),
    )
    .await;
    let reasoning = &played.stored["output"][0];
    assert_eq!(
        reasoning["content"],
        json!([{"type": "reasoning_text", "text": "User wants a reason."}])
    );
    assert_eq!(
        played.stored["output"][1]["content"][0]["text"],
        "Tolls fund the road."
    );
    played.streamed_is_stored();
    let next = played.next_prompt().await;
    assert_eq!(of_type(&next, "reasoning")["content"], reasoning["content"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_responses_call_without_event_names() {
    let played = Played::run(
        ProviderKind::Responses,
        &["ollama_responses_call.sse"],
        json!({"input": "weather in Bergen?", "model": "qwen3:8b", "tools": functions(&["get_weather"])}),
    )
    .await;
    assert_eq!(played.stored["status"], "completed");
    assert_eq!(
        played.stored["output"][0]["arguments"],
        r#"{"city":"Bergen"}"#
    );
    played.streamed_is_stored();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_tool_call_deltas_and_usage_chunk() {
    let played = Played::run(
        ProviderKind::ChatCompletions,
        &["openai_chat_tool_calls.sse"],
        json!({"input": "weather and time?", "tools": functions(&["get_time", "get_weather"])}),
    )
    .await;
    let output = played.stored["output"].as_array().unwrap();
    assert_eq!(output.len(), 2);
    assert_eq!(output[0]["call_id"], "call_ChatWeather1");
    assert_eq!(output[0]["arguments"], r#"{"city":"Oslo"}"#);
    assert_eq!(output[1]["name"], "get_time");
    assert_eq!(
        played.stored["usage"]["input_tokens_details"]["cached_tokens"],
        128
    );
    played.streamed_is_stored();
    let request = &played.replay.requests()[0];
    assert_eq!(request["stream_options"], json!({"include_usage": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_text_with_usage() {
    let played = Played::run(
        ProviderKind::ChatCompletions,
        &["openai_chat_text_usage.sse", "openai_chat_text_usage.sse"],
        json!({"input": "why tolls?"}),
    )
    .await;
    assert_eq!(
        played.stored["output"][0]["content"][0]["text"],
        "Tolls pay for roads."
    );
    assert_eq!(played.stored["usage"]["input_tokens"], 90);
    played.streamed_is_stored();
    let next = played.next_prompt().await;
    assert!(
        next.iter()
            .any(|m| m["role"] == "assistant" && m["content"] == "Tolls pay for roads."),
        "{next:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_refusal_becomes_a_refusal_part() {
    let played = Played::run(
        ProviderKind::ChatCompletions,
        &["openai_chat_refusal.sse"],
        json!({"input": "something bad"}),
    )
    .await;
    assert_eq!(
        played.stored["output"][0]["content"],
        json!([{"type": "refusal", "refusal": "I can't help with that."}])
    );
    played.streamed_is_stored();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_finish_reason_length_ends_incomplete() {
    let played = Played::run(
        ProviderKind::ChatCompletions,
        &["openai_chat_length.sse"],
        json!({"input": "a long story", "max_output_tokens": 3}),
    )
    .await;
    assert_eq!(played.stored["status"], "incomplete");
    assert_eq!(
        played.stored["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(played.kinds().last(), Some(&"response.incomplete"));
    played.streamed_is_stored();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_chat_reasoning_content_and_a_whole_tool_call() {
    let played = Played::run(
        ProviderKind::ChatCompletions,
        &["vllm_chat_reasoning_call.sse"],
        json!({"input": "weather in Oslo?", "tools": functions(&["get_weather"])}),
    )
    .await;
    let output = played.stored["output"].as_array().unwrap();
    assert_eq!(
        of_type(output, "reasoning")["content"],
        json!([{"type": "reasoning_text", "text": "Need the weather in Oslo."}])
    );
    let call = of_type(output, "function_call");
    assert_eq!(call["call_id"], "chatcmpl-tool-8f1e2d3c4b5a");
    assert_eq!(call["arguments"], r#"{"city": "Oslo"}"#);
    played.streamed_is_stored();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_chat_text() {
    let played = Played::run(
        ProviderKind::ChatCompletions,
        &["ollama_chat_text.sse"],
        json!({"input": "why tolls?", "model": "qwen3:8b"}),
    )
    .await;
    assert_eq!(
        played.stored["output"][0]["content"][0]["text"],
        "Tolls keep roads open."
    );
    assert_eq!(played.stored["usage"]["total_tokens"], 30);
    played.streamed_is_stored();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_answer_with_a_nul_character_is_stored_escaped() {
    let played = Played::run(
        ProviderKind::Responses,
        &["openai_responses_text_nul.sse"],
        json!({"input": "say something odd"}),
    )
    .await;
    assert_eq!(played.stored["status"], "completed");
    // Escaped, not lost: PostgreSQL cannot hold U+0000 itself.
    assert_eq!(
        played.stored["output"][0]["content"][0]["text"],
        "Nul\\u0000byte"
    );
    played.streamed_is_stored();
}
