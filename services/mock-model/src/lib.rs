//! `turnpike mock-model`: a real HTTP server speaking OpenAI's Responses
//! API (streaming SSE) and `/responses/compact`, and Chat Completions for
//! the older protocol, scripted and deterministic, so that everything
//! upstream of the model runs for real in development, tests and load tests.
//!
//! Directives in the latest user message:
//! - `/echo TEXT` answers exactly TEXT;
//! - `/fail 500`, `/fail 429`, `/fail disconnect` inject that fault;
//! - `/call NAME {json}` (one per line; several lines are parallel calls)
//!   calls the function tool NAME when the request offers it; once the
//!   calls' outputs follow in the input, it answers `tool said: …`; a
//!   `/then` line starts the next round of calls, made once the previous
//!   round's outputs came back (a multi-step tool loop);
//! - anything else gets a deterministic answer of `answer_tokens` words.
//!
//! `POST /mcp` is a small MCP server (tools `add` and `shout`) for the
//! worker's MCP client.
//!
//! A request with `reasoning.effort` gets a `reasoning` item first, whose
//! `encrypted_content` is derived from the prompt. `GET /v1/mock/requests
//! ?prompt_cache_key=K` lists the latest requests made with that key, so
//! tests can check exactly what the model was sent.
//!
//! Tokens are 4-byte chunks of the prompt's canonical text (instructions,
//! tools, input items as JSON). `usage.input_tokens_details.cached_tokens`
//! is the longest common prefix, in those tokens, with the previous request
//! that had the same `prompt_cache_key`: the prompt cache hit ratio of a
//! client's prompts is measured, not assumed.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use turnpike_core::config::MockSettings;

mod chat;
mod compact;
mod mcp;

/// Requests kept per prompt_cache_key for inspection.
const LOGGED_REQUESTS: usize = 64;

/// Bytes per token in the mock's tokenizer.
const TOKEN_BYTES: usize = 4;

const WORDS: [&str; 32] = [
    "the",
    "road",
    "runs",
    "north",
    "past",
    "quiet",
    "fields",
    "and",
    "every",
    "gate",
    "opens",
    "for",
    "a",
    "traveller",
    "who",
    "pays",
    "toll",
    "in",
    "time",
    "while",
    "rivers",
    "bend",
    "under",
    "old",
    "stone",
    "bridges",
    "towards",
    "harbours",
    "where",
    "ships",
    "wait",
    "patiently",
];

#[derive(Clone)]
struct MockState {
    settings: MockSettings,
    /// The last prompt's tokens per prompt_cache_key.
    prompts: Arc<Mutex<HashMap<String, Vec<u64>>>>,
    /// The latest requests per prompt_cache_key, for tests to inspect.
    requests: Arc<Mutex<HashMap<String, VecDeque<Value>>>>,
}

/// A bound mock model server.
pub struct MockModel {
    listener: TcpListener,
    port: u16,
    app: Router,
}

impl MockModel {
    pub async fn build(settings: MockSettings) -> std::io::Result<Self> {
        let listener = TcpListener::bind((settings.host.as_str(), settings.port)).await?;
        let port = listener.local_addr()?.port();
        let state = MockState {
            settings,
            prompts: Arc::new(Mutex::new(HashMap::new())),
            requests: Arc::new(Mutex::new(HashMap::new())),
        };
        let app = Router::new()
            .route("/v1/responses", post(responses))
            .route("/responses", post(responses))
            .route("/v1/responses/compact", post(compact::compact))
            .route("/responses/compact", post(compact::compact))
            .route("/v1/mock/requests", get(logged_requests))
            .route("/v1/chat/completions", post(chat::chat_completions))
            .route("/chat/completions", post(chat::chat_completions))
            .route("/mcp", post(mcp::mcp))
            .with_state(state);
        Ok(Self {
            listener,
            port,
            app,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn run_until(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(self.listener, self.app)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

/// What the mock answers with.
#[derive(Debug, PartialEq)]
enum Plan {
    /// Text, as tokens.
    Text(Vec<String>),
    /// Function calls: (name, JSON arguments).
    Calls(Vec<(String, String)>),
}

/// Decides the answer: `/call NAME {json}` lines become calls of the tools
/// the request offers, unless their outputs are already in the input (the
/// client continued the turn), in which case the mock reports the outputs.
fn plan(body: &Value, text: &str, answer_tokens: usize) -> Plan {
    let input = body
        .get("input")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let last_user = input
        .iter()
        .rposition(|i| i.get("role").and_then(Value::as_str) == Some("user"));
    // The calls answered since the user spoke, in rounds (one per model call).
    let mut rounds: Vec<Vec<String>> = Vec::new();
    let mut in_round = false;
    for item in input.iter().skip(last_user.map_or(0, |i| i + 1)) {
        let is_output = item.get("type").and_then(Value::as_str) == Some("function_call_output");
        if is_output {
            if !in_round {
                rounds.push(Vec::new());
            }
            if let (Some(round), Some(output)) = (
                rounds.last_mut(),
                item.get("output").and_then(Value::as_str),
            ) {
                round.push(output.to_owned());
            }
        }
        in_round = is_output;
    }
    // `/then` lines split the directives into rounds: round k's calls are
    // made once k rounds of outputs came back.
    let groups: Vec<&str> = text.split("\n/then\n").collect();
    let Some(group) = groups.get(rounds.len()) else {
        let last = rounds.last().map(|r| r.join("; ")).unwrap_or_default();
        return Plan::Text(answer(&format!("/echo tool said: {last}"), answer_tokens));
    };
    let text = *group;
    let offered: Vec<&str> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| t.get("name").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    let calls: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("/call "))
        .filter_map(|rest| {
            let (name, args) = rest
                .trim()
                .split_once(char::is_whitespace)
                .unwrap_or((rest.trim(), "{}"));
            offered
                .contains(&name)
                .then(|| (name.to_owned(), args.trim().to_owned()))
        })
        .collect();
    if calls.is_empty() && !rounds.is_empty() {
        let last = rounds.last().map(|r| r.join("; ")).unwrap_or_default();
        Plan::Text(answer(&format!("/echo tool said: {last}"), answer_tokens))
    } else if calls.is_empty() {
        Plan::Text(answer(text, answer_tokens))
    } else {
        Plan::Calls(calls)
    }
}

/// The text of the latest user message in `input`.
fn latest_user_text(input: &Value) -> String {
    let items = match input {
        Value::String(text) => return text.clone(),
        Value::Array(items) => items,
        _ => return String::new(),
    };
    for item in items.iter().rev() {
        if item.get("role").and_then(Value::as_str) != Some("user") {
            continue;
        }
        return match item.get("content") {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        };
    }
    String::new()
}

/// The prompt as the mock tokenizes it.
fn prompt_tokens(body: &Value) -> Vec<u64> {
    let mut text = String::new();
    if let Some(instructions) = body.get("instructions").and_then(Value::as_str) {
        text.push_str(instructions);
        text.push('\n');
    }
    if let Some(tools) = body.get("tools") {
        text.push_str(&tools.to_string());
        text.push('\n');
    }
    match body.get("input") {
        Some(Value::Array(items)) => {
            for item in items {
                text.push_str(&item.to_string());
                text.push('\n');
            }
        }
        Some(other) => text.push_str(&other.to_string()),
        None => {}
    }
    text.as_bytes()
        .chunks(TOKEN_BYTES)
        .map(|chunk| chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
        .collect()
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The deterministic answer to `text`, as tokens (words with their spaces).
fn answer(text: &str, tokens: usize) -> Vec<String> {
    if let Some(echo) = text.strip_prefix("/echo ") {
        // Exactly the text, cut in 4-character pieces.
        let chars: Vec<char> = echo.chars().collect();
        return chars
            .chunks(TOKEN_BYTES)
            .map(|c| c.iter().collect())
            .collect();
    }
    let mut seed = fnv(text);
    (0..tokens.max(1))
        .map(|i| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let word = WORDS[usize::try_from(seed >> 59).unwrap_or(0) % WORDS.len()];
            if i == 0 {
                word.to_owned()
            } else {
                format!(" {word}")
            }
        })
        .collect()
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    (
        status,
        axum::Json(
            json!({"error": {"message": message, "type": kind, "param": null, "code": null}}),
        ),
    )
        .into_response()
}

async fn responses(State(state): State<MockState>, body: axum::body::Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid JSON",
            "invalid_request_error",
        );
    };
    let text = latest_user_text(body.get("input").unwrap_or(&Value::Null));
    let directive = text.trim();
    if let Some(fault) = injected_fault(directive) {
        return fault;
    }
    let disconnect = directive == "/fail disconnect";

    let tokens = prompt_tokens(&body);
    let key = body
        .get("prompt_cache_key")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let cached = key
        .as_deref()
        .map_or(0, |key| cached_tokens(&state, key, tokens.clone()));
    if let Some(key) = &key {
        let mut requests = state.requests.lock().unwrap_or_else(|p| p.into_inner());
        let log = requests.entry(key.clone()).or_default();
        if log.len() == LOGGED_REQUESTS {
            log.pop_front();
        }
        log.push_back(body.clone());
    }
    let lead = reasoning_item(&body, &tokens);
    let plan = plan(&body, directive, state.settings.answer_tokens);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-1")
        .to_owned();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let settings = state.settings.clone();
    tokio::spawn(async move {
        let usage = Usage {
            input_tokens: tokens.len(),
            cached_tokens: cached,
        };
        match plan {
            Plan::Text(pieces) => {
                stream_answer(tx, &settings, &model, &pieces, &usage, disconnect, lead).await;
            }
            Plan::Calls(calls) => stream_calls(tx, &model, &calls, &usage, lead).await,
        }
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}

/// The answer to a `/fail 500` or `/fail 429` directive (a disconnect is
/// injected mid-stream by the streaming code).
pub(crate) fn injected_fault(directive: &str) -> Option<Response> {
    match directive {
        "/fail 500" => Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "injected failure",
            "server_error",
        )),
        "/fail 429" => {
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "injected rate limit",
                "rate_limit_error",
            );
            response
                .headers_mut()
                .insert("retry-after-ms", axum::http::HeaderValue::from_static("50"));
            Some(response)
        }
        _ => None,
    }
}

/// Tokens of `tokens` cached by the previous request with the same key (the
/// longest common prefix), remembering this prompt for the next.
pub(crate) fn cached_tokens(state: &MockState, key: &str, tokens: Vec<u64>) -> usize {
    let mut prompts = state.prompts.lock().unwrap_or_else(|p| p.into_inner());
    let cached = prompts.get(key).map_or(0, |previous| {
        previous
            .iter()
            .zip(&tokens)
            .take_while(|(a, b)| a == b)
            .count()
    });
    prompts.insert(key.to_owned(), tokens);
    cached
}

/// Waits the configured time to first token, then returns the pause to
/// keep between tokens (`None`: as fast as possible).
pub(crate) async fn first_token_wait(settings: &MockSettings) -> Option<Duration> {
    if settings.ttft_ms > 0 {
        tokio::time::sleep(Duration::from_millis(settings.ttft_ms)).await;
    }
    (settings.tokens_per_s > 0).then(|| Duration::from_micros(1_000_000 / settings.tokens_per_s))
}

/// Prompt-side usage of a request.
struct Usage {
    input_tokens: usize,
    cached_tokens: usize,
}

impl Usage {
    fn json(&self, output_tokens: usize) -> Value {
        json!({
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached_tokens},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + output_tokens,
        })
    }
}

fn sse(value: &Value) -> Event {
    let kind = value["type"].as_str().unwrap_or("message").to_owned();
    Event::default().event(kind).data(value.to_string())
}

/// A reasoning item, when the request asks for reasoning (`reasoning.effort`
/// other than `none`): its `encrypted_content` is derived from the prompt, so
/// a test can check that it comes back unchanged in later requests.
fn reasoning_item(body: &Value, tokens: &[u64]) -> Option<Value> {
    let effort = body.pointer("/reasoning/effort")?.as_str()?;
    if effort == "none" {
        return None;
    }
    let digest = tokens.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, t| {
        (h ^ t).wrapping_mul(0x100_0000_01b3)
    });
    Some(
        json!({"type": "reasoning", "id": format!("rs_mock{}", uuid::Uuid::now_v7().simple()),
        "summary": [], "encrypted_content": format!("mock-reasoning-{digest:016x}")}),
    )
}

/// The events announcing a finished reasoning item at output index 0.
fn lead_events(item: &Value) -> [Value; 2] {
    [
        json!({"type": "response.output_item.added", "output_index": 0, "item": item}),
        json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
    ]
}

/// `GET /v1/mock/requests?prompt_cache_key=K`: the latest requests made
/// with that key, oldest first.
async fn logged_requests(
    State(state): State<MockState>,
    axum::extract::Query(query): axum::extract::Query<HashMap<String, String>>,
) -> axum::Json<Value> {
    let key = query.get("prompt_cache_key").cloned().unwrap_or_default();
    let requests = state.requests.lock().unwrap_or_else(|p| p.into_inner());
    let data: Vec<Value> = requests
        .get(&key)
        .map(|log| log.iter().cloned().collect())
        .unwrap_or_default();
    axum::Json(json!({"object": "list", "data": data}))
}

/// A mock response object with no output yet.
fn skeleton(id: &str, model: &str, status: &str) -> Value {
    json!({"id": id, "object": "response", "created_at": 0, "status": status,
           "model": model, "output": [], "usage": null})
}

/// Streams function calls: one output item per call, arguments in one delta.
async fn stream_calls(
    tx: tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
    model: &str,
    calls: &[(String, String)],
    usage: &Usage,
    lead: Option<Value>,
) {
    let response_id = format!("resp_mock{}", uuid::Uuid::now_v7().simple());
    let base = |status: &str| skeleton(&response_id, model, status);
    let mut events = vec![
        json!({"type": "response.created", "response": base("in_progress")}),
        json!({"type": "response.in_progress", "response": base("in_progress")}),
    ];
    let mut items = Vec::new();
    if let Some(lead) = lead {
        events.extend(lead_events(&lead));
        items.push(lead);
    }
    let first = items.len();
    for (index, (name, arguments)) in calls.iter().enumerate() {
        let index = index + first;
        let item_id = format!("fc_mock{}", uuid::Uuid::now_v7().simple());
        let call_id = format!(
            "call_{:016x}",
            fnv(&format!("{response_id}/{index}/{name}"))
        );
        let item = json!({"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
                          "arguments": arguments, "status": "completed"});
        let mut added = item.clone();
        added["arguments"] = json!("");
        added["status"] = json!("in_progress");
        events.push(
            json!({"type": "response.output_item.added", "output_index": index, "item": added}),
        );
        events.push(
            json!({"type": "response.function_call_arguments.delta", "item_id": item_id,
                           "output_index": index, "delta": arguments}),
        );
        events.push(
            json!({"type": "response.function_call_arguments.done", "item_id": item_id,
                           "output_index": index, "arguments": arguments}),
        );
        events.push(
            json!({"type": "response.output_item.done", "output_index": index, "item": item}),
        );
        items.push(item);
    }
    let mut done = base("completed");
    done["output"] = json!(items);
    done["usage"] = usage.json(
        calls
            .iter()
            .map(|(_, a)| a.len().div_ceil(TOKEN_BYTES))
            .sum(),
    );
    events.push(json!({"type": "response.completed", "response": done}));
    for (seq, mut event) in (0u64..).zip(events) {
        event["sequence_number"] = json!(seq);
        if tx.send(Ok(sse(&event))).await.is_err() {
            return;
        }
    }
}

async fn stream_answer(
    tx: tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
    settings: &MockSettings,
    model: &str,
    pieces: &[String],
    usage: &Usage,
    disconnect: bool,
    lead: Option<Value>,
) {
    let response_id = format!("resp_mock{}", uuid::Uuid::now_v7().simple());
    let item_id = format!("msg_mock{}", uuid::Uuid::now_v7().simple());
    let mut seq = 0u64;
    let send = |value: Value| sse(&value);
    let base = |status: &str| skeleton(&response_id, model, status);
    let at = usize::from(lead.is_some());
    let mut events = vec![
        json!({"type": "response.created", "response": base("in_progress")}),
        json!({"type": "response.in_progress", "response": base("in_progress")}),
    ];
    if let Some(lead) = &lead {
        events.extend(lead_events(lead));
    }
    events.extend([
        json!({"type": "response.output_item.added", "output_index": at,
               "item": {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
        json!({"type": "response.content_part.added", "item_id": item_id, "output_index": at, "content_index": 0,
               "part": {"type": "output_text", "text": "", "annotations": []}}),
    ]);
    for mut event in events.drain(..) {
        event["sequence_number"] = json!(seq);
        seq += 1;
        if tx.send(Ok(send(event))).await.is_err() {
            return;
        }
    }
    let gap = first_token_wait(settings).await;
    for (i, piece) in pieces.iter().enumerate() {
        if disconnect && i == pieces.len() / 2 {
            // Drop the connection mid-stream, without the completion event.
            return;
        }
        let event = json!({"type": "response.output_text.delta", "item_id": item_id, "output_index": at,
                           "content_index": 0, "delta": piece, "sequence_number": seq});
        seq += 1;
        if tx.send(Ok(send(event))).await.is_err() {
            return;
        }
        if let Some(gap) = gap {
            tokio::time::sleep(gap).await;
        }
    }
    let text: String = pieces.concat();
    let output_tokens = pieces.len();
    let item = json!({"id": item_id, "type": "message", "status": "completed", "role": "assistant",
                      "content": [{"type": "output_text", "text": text, "annotations": []}]});
    let mut done = base("completed");
    done["output"] = json!(lead.into_iter().chain([item.clone()]).collect::<Vec<_>>());
    done["usage"] = usage.json(output_tokens);
    let tail = vec![
        json!({"type": "response.output_text.done", "item_id": item_id, "output_index": at, "content_index": 0, "text": text}),
        json!({"type": "response.content_part.done", "item_id": item_id, "output_index": at, "content_index": 0,
               "part": {"type": "output_text", "text": text, "annotations": []}}),
        json!({"type": "response.output_item.done", "output_index": at, "item": item}),
        json!({"type": "response.completed", "response": done}),
    ];
    for mut event in tail {
        event["sequence_number"] = json!(seq);
        seq += 1;
        if tx.send(Ok(send(event))).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_is_exact_and_answers_are_deterministic() {
        assert_eq!(answer("/echo hello, world", 5).concat(), "hello, world");
        assert_eq!(
            answer("what is a toll road?", 8),
            answer("what is a toll road?", 8)
        );
        assert_eq!(answer("what is a toll road?", 8).len(), 8);
        assert_ne!(answer("a", 8), answer("b", 8));
    }

    #[test]
    fn calls_need_the_tool_and_stop_once_answered() {
        let tools = json!([{"type": "function", "name": "weather"}]);
        let ask = json!({"tools": tools, "input": [{"role": "user", "content": "/call weather {\"city\":\"Oslo\"}"}]});
        assert_eq!(
            plan(&ask, "/call weather {\"city\":\"Oslo\"}\n/call nope {}", 4),
            Plan::Calls(vec![("weather".into(), "{\"city\":\"Oslo\"}".into())])
        );
        let answered = json!({"tools": tools, "input": [
            {"role": "user", "content": "/call weather {}"},
            {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"}
        ]});
        assert_eq!(
            plan(&answered, "/call weather {}", 4),
            Plan::Text(answer("/echo tool said: sunny", 4))
        );
    }

    #[test]
    fn latest_user_text_reads_strings_and_parts() {
        let input = json!([
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "x"}]},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "second"}]}
        ]);
        assert_eq!(latest_user_text(&input), "second");
        assert_eq!(latest_user_text(&json!("plain")), "plain");
    }
}
