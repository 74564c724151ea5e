//! `turnpike mock-model`: a real HTTP server speaking OpenAI's Responses
//! API (streaming SSE) and `/responses/compact`, and Chat Completions for
//! the older protocol, scripted and deterministic, so that everything
//! upstream of the model runs for real in development, tests and load tests.
//!
//! Directives in the latest user message:
//! - `/echo TEXT` answers exactly TEXT;
//! - `/fail 500`, `/fail 429`, `/fail disconnect` inject that fault;
//!   `/fail disconnect once` cuts the stream mid-answer the first time an
//!   input is seen and answers it in full the next;
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
    /// Digests of the inputs a `/fail disconnect once` already failed.
    failed_once: Arc<Mutex<std::collections::HashSet<u64>>>,
}

impl MockState {
    /// Whether this is the first request with this input (a `/fail …
    /// once` fault fails only that one; the retry goes through).
    fn first_time(&self, body: &Value) -> bool {
        let digest = fnv(&body.get("input").unwrap_or(&Value::Null).to_string());
        self.failed_once
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest)
    }
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
            failed_once: Arc::default(),
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
            // Prompts as long as a large context window, as a provider takes.
            .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
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
        axum::serve(
            turnpike_core::net::nodelay(self.listener),
            self.app.into_make_service(),
        )
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
        let is_output = item
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|kind| kind.ends_with("_call_output"));
        if is_output {
            if !in_round {
                rounds.push(Vec::new());
            }
            if let Some(round) = rounds.last_mut() {
                round.push(output_text(item.get("output")));
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
    let offered = callable_tools(body);
    let calls: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.trim().strip_prefix("/call "))
        .filter_map(|rest| {
            let (name, args) = rest
                .trim()
                .split_once(char::is_whitespace)
                .unwrap_or((rest.trim(), "{}"));
            offered
                .contains_key(name)
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

/// A `local_shell_call`, `shell_call`, `apply_patch_call` or
/// `computer_call` item for a directive's JSON (the call's `action`, or the
/// patch's `operation`); `None` for other kinds.
fn shell_call(kind: &str, call_id: &str, arguments: &str) -> Option<Value> {
    let given: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
    let id = uuid::Uuid::now_v7().simple();
    Some(match kind {
        "local_shell" => {
            let mut action = json!({"type": "exec", "command": [], "env": {}});
            if let (Some(action), Some(given)) = (action.as_object_mut(), given.as_object()) {
                action.extend(given.clone());
            }
            json!({"type": "local_shell_call", "id": format!("lsh_mock{id}"), "call_id": call_id,
                   "action": action, "status": "completed"})
        }
        "shell" => json!({"type": "shell_call", "id": format!("sh_mock{id}"), "call_id": call_id,
                          "action": given, "status": "completed"}),
        "apply_patch" => json!({"type": "apply_patch_call", "id": format!("apc_mock{id}"),
                                "call_id": call_id, "operation": given, "status": "completed"}),
        "computer" => json!({"type": "computer_call", "id": format!("cu_mock{id}"),
                             "call_id": call_id, "action": given, "pending_safety_checks": [],
                             "status": "completed"}),
        _ => return None,
    })
}

/// A tool output's text: a string, or the text of its parts.
fn output_text(output: Option<&Value>) -> String {
    match output {
        Some(Value::String(text)) => text.clone(),
        // Text parts, or a shell call's outputs (their stdout).
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").or_else(|| p.get("stdout")))
            .filter_map(Value::as_str)
            .collect(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// The tools a `/call` directive can call, by name, with their type:
/// functions (also those inside a `namespace` tool) and custom tools by
/// their names; `local_shell`, `shell`, `apply_patch` and `computer` by
/// their type.
fn callable_tools(body: &Value) -> HashMap<String, String> {
    let mut named = HashMap::new();
    let tools = body.get("tools").and_then(Value::as_array);
    for tool in tools.into_iter().flatten() {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("");
        let nested = tool.get("tools").and_then(Value::as_array);
        let (kind, tools): (&str, Vec<&Value>) = if kind == "namespace" {
            ("function", nested.into_iter().flatten().collect())
        } else {
            (kind, vec![tool])
        };
        if matches!(kind, "local_shell" | "shell" | "apply_patch") {
            named.insert(kind.to_owned(), kind.to_owned());
            continue;
        }
        if matches!(kind, "computer" | "computer_use_preview") {
            named.insert("computer".to_owned(), "computer".to_owned());
            continue;
        }
        if !matches!(kind, "function" | "custom") {
            continue;
        }
        for tool in tools {
            if let Some(name) = tool.get("name").and_then(Value::as_str) {
                named.insert(name.to_owned(), kind.to_owned());
            }
        }
    }
    named
}

/// Calls of the provider-hosted tools the request offers (`/call web_search
/// QUERY`, `/call file_search QUERY`): as a provider hosting them would, the
/// mock runs them itself and reports each as a finished call item.
fn hosted_calls(body: &Value, directive: &str) -> Vec<Value> {
    let offered: Vec<&str> = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|t| t.get("type").and_then(Value::as_str))
        .collect();
    directive
        .lines()
        .filter_map(|line| line.trim().strip_prefix("/call "))
        .filter_map(|rest| {
            let (name, query) = rest
                .trim()
                .split_once(char::is_whitespace)
                .unwrap_or((rest.trim(), ""));
            let id = uuid::Uuid::now_v7().simple();
            match name {
                "web_search" if offered.iter().any(|t| t.starts_with("web_search")) => {
                    Some(json!({
                    "type": "web_search_call", "id": format!("ws_mock{id}"), "status": "completed",
                    "action": {"type": "search", "query": query, "sources": []}}))
                }
                "file_search" if offered.contains(&"file_search") => Some(json!({
                    "type": "file_search_call", "id": format!("fs_mock{id}"), "status": "completed",
                    "queries": [query], "results": null})),
                "code_interpreter" if offered.contains(&"code_interpreter") => Some(json!({
                    "type": "code_interpreter_call", "id": format!("ci_mock{id}"), "status": "completed",
                    "code": query, "container_id": format!("cntr_mock{id}"),
                    "outputs": [{"type": "logs", "logs": format!("ran: {query}")}]})),
                "image_generation" if offered.contains(&"image_generation") => Some(json!({
                    "type": "image_generation_call", "id": format!("ig_mock{id}"), "status": "completed",
                    // A 1x1 transparent PNG.
                    "result": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mNkYAAAAAYAAjCB0C8AAAAASUVORK5CYII="})),
                _ => None,
            }
        })
        .collect()
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
    let disconnect = directive == "/fail disconnect"
        || (directive == "/fail disconnect once" && state.first_time(&body));

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
    let hosted = hosted_calls(&body, directive);
    let lead: Vec<Value> = reasoning_item(&body, &tokens)
        .into_iter()
        .chain(hosted.iter().cloned())
        .collect();
    let plan = if hosted.is_empty() {
        plan(&body, directive, state.settings.answer_tokens)
    } else {
        let calls: Vec<String> = hosted.iter().map(|c| c["type"].to_string()).collect();
        Plan::Text(answer(&format!("/echo hosted: {}", calls.join(", ")), 0))
    };
    let kinds = callable_tools(&body);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-1")
        .to_owned();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let settings = state.settings.clone();
    let echo = echoed(&body);
    tokio::spawn(async move {
        let usage = Usage {
            input_tokens: tokens.len(),
            cached_tokens: cached,
        };
        let answer = Answer {
            model: &model,
            echo: &echo,
            usage: &usage,
            lead,
        };
        match plan {
            Plan::Text(pieces) => {
                stream_answer(tx, &settings, answer, &pieces, disconnect).await;
            }
            Plan::Calls(calls) => {
                // A provider takes its time before a tool call too (sent
                // whole, so the pace between tokens does not apply).
                first_token_wait(&settings).await;
                stream_calls(tx, answer, &calls, &kinds).await;
            }
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
pub(crate) struct Usage {
    pub(crate) input_tokens: usize,
    pub(crate) cached_tokens: usize,
}

impl Usage {
    /// OpenAI's usage object; what was not read from the cache was written to it.
    fn json(&self, output_tokens: usize) -> Value {
        json!({
            "input_tokens": self.input_tokens,
            "input_tokens_details": {
                "cached_tokens": self.cached_tokens,
                "cache_write_tokens": self.input_tokens.saturating_sub(self.cached_tokens),
            },
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

/// The events announcing finished items (reasoning, hosted tool calls) at
/// the first output indexes.
fn lead_events(lead: &[Value]) -> Vec<Value> {
    (0usize..)
        .zip(lead)
        .flat_map(|(index, item)| {
            [
                json!({"type": "response.output_item.added", "output_index": index, "item": item}),
                json!({"type": "response.output_item.done", "output_index": index, "item": item}),
            ]
        })
        .collect()
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

/// The request's settings as OpenAI's response object echoes them.
fn echoed(body: &Value) -> Value {
    let field = |key: &str, default: Value| body.get(key).cloned().unwrap_or(default);
    json!({
        "background": field("background", json!(false)),
        "error": null,
        "incomplete_details": null,
        "instructions": field("instructions", Value::Null),
        "max_output_tokens": field("max_output_tokens", Value::Null),
        "max_tool_calls": field("max_tool_calls", Value::Null),
        "metadata": field("metadata", json!({})),
        "parallel_tool_calls": field("parallel_tool_calls", json!(true)),
        "previous_response_id": null,
        "prompt_cache_key": field("prompt_cache_key", Value::Null),
        "prompt_cache_retention": field("prompt_cache_retention", Value::Null),
        "reasoning": {"effort": body.pointer("/reasoning/effort").cloned().unwrap_or(Value::Null),
                      "summary": body.pointer("/reasoning/summary").cloned().unwrap_or(Value::Null)},
        "safety_identifier": field("safety_identifier", Value::Null),
        "service_tier": field("service_tier", json!("default")),
        "store": field("store", json!(true)),
        "temperature": field("temperature", json!(1.0)),
        "text": field("text", json!({"format": {"type": "text"}, "verbosity": "medium"})),
        "tool_choice": field("tool_choice", json!("auto")),
        "tools": field("tools", json!([])),
        "top_logprobs": field("top_logprobs", json!(0)),
        "top_p": field("top_p", json!(1.0)),
        "truncation": field("truncation", json!("disabled")),
        "user": field("user", Value::Null),
    })
}

/// What every answer shares: the model, the request's echoed settings,
/// the prompt's usage and the finished items that come first.
struct Answer<'a> {
    model: &'a str,
    echo: &'a Value,
    usage: &'a Usage,
    lead: Vec<Value>,
}

impl Answer<'_> {
    /// The whole response object, as OpenAI's events carry it.
    fn response(&self, id: &str, status: &str, output: &[Value], usage: Option<Value>) -> Value {
        let mut response = self.echo.clone();
        response["id"] = json!(id);
        response["object"] = json!("response");
        response["created_at"] = json!(0);
        response["status"] = json!(status);
        response["model"] = json!(self.model);
        response["output"] = json!(output);
        response["usage"] = usage.unwrap_or(Value::Null);
        response
    }
}

/// Padding OpenAI adds to each delta so that its length says nothing about
/// the token's.
fn obfuscation(delta: &str) -> String {
    let pad = 16usize.saturating_sub(delta.len()).max(1);
    "x".repeat(pad)
}

/// Sends events numbered from `*seq`; false when the client has gone.
async fn send_all(
    tx: &tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
    seq: &mut u64,
    events: Vec<Value>,
) -> bool {
    for mut event in events {
        event["sequence_number"] = json!(*seq);
        *seq += 1;
        if tx.send(Ok(sse(&event))).await.is_err() {
            return false;
        }
    }
    true
}

/// Streams tool calls: one output item per call (a function call, or a
/// custom tool call for a custom tool, its arguments in one delta; a shell
/// or patch call whose action is the directive's JSON).
async fn stream_calls(
    tx: tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
    answer: Answer<'_>,
    calls: &[(String, String)],
    kinds: &HashMap<String, String>,
) {
    let response_id = format!("resp_mock{}", uuid::Uuid::now_v7().simple());
    let mut events = vec![
        json!({"type": "response.created", "response": answer.response(&response_id, "in_progress", &[], None)}),
        json!({"type": "response.in_progress", "response": answer.response(&response_id, "in_progress", &[], None)}),
    ];
    events.extend(lead_events(&answer.lead));
    let mut items = answer.lead.clone();
    let first = items.len();
    for (index, (name, arguments)) in calls.iter().enumerate() {
        let index = index + first;
        let call_id = format!(
            "call_{:016x}",
            fnv(&format!("{response_id}/{index}/{name}"))
        );
        let kind = kinds.get(name).map_or("function", String::as_str);
        let item = if let Some(item) = shell_call(kind, &call_id, arguments) {
            let mut added = item.clone();
            added["status"] = json!("in_progress");
            events.push(
                json!({"type": "response.output_item.added", "output_index": index, "item": added}),
            );
            item
        } else if kind == "custom" {
            let item_id = format!("ctc_mock{}", uuid::Uuid::now_v7().simple());
            let item = json!({"type": "custom_tool_call", "id": item_id, "call_id": call_id, "name": name,
                              "input": arguments, "status": "completed"});
            let mut added = item.clone();
            added["input"] = json!("");
            added["status"] = json!("in_progress");
            events.push(
                json!({"type": "response.output_item.added", "output_index": index, "item": added}),
            );
            events.push(json!({"type": "response.custom_tool_call_input.delta", "item_id": item_id,
                               "output_index": index, "delta": arguments, "obfuscation": obfuscation(arguments)}));
            events.push(
                json!({"type": "response.custom_tool_call_input.done", "item_id": item_id,
                               "output_index": index, "input": arguments}),
            );
            item
        } else {
            let item_id = format!("fc_mock{}", uuid::Uuid::now_v7().simple());
            let item = json!({"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
                              "arguments": arguments, "status": "completed"});
            let mut added = item.clone();
            added["arguments"] = json!("");
            added["status"] = json!("in_progress");
            events.push(
                json!({"type": "response.output_item.added", "output_index": index, "item": added}),
            );
            events.push(json!({"type": "response.function_call_arguments.delta", "item_id": item_id,
                               "output_index": index, "delta": arguments, "obfuscation": obfuscation(arguments)}));
            events.push(
                json!({"type": "response.function_call_arguments.done", "item_id": item_id,
                               "output_index": index, "name": name, "arguments": arguments}),
            );
            item
        };
        events.push(
            json!({"type": "response.output_item.done", "output_index": index, "item": item}),
        );
        items.push(item);
    }
    let output_tokens = calls
        .iter()
        .map(|(_, a)| a.len().div_ceil(TOKEN_BYTES))
        .sum();
    let done = answer.response(
        &response_id,
        "completed",
        &items,
        Some(answer.usage.json(output_tokens)),
    );
    events.push(json!({"type": "response.completed", "response": done}));
    let mut seq = 0;
    send_all(&tx, &mut seq, events).await;
}

async fn stream_answer(
    tx: tokio::sync::mpsc::Sender<Result<Event, Infallible>>,
    settings: &MockSettings,
    answer: Answer<'_>,
    pieces: &[String],
    disconnect: bool,
) {
    let response_id = format!("resp_mock{}", uuid::Uuid::now_v7().simple());
    let item_id = format!("msg_mock{}", uuid::Uuid::now_v7().simple());
    let mut seq = 0u64;
    let at = answer.lead.len();
    let mut events = vec![
        json!({"type": "response.created", "response": answer.response(&response_id, "in_progress", &[], None)}),
        json!({"type": "response.in_progress", "response": answer.response(&response_id, "in_progress", &[], None)}),
    ];
    events.extend(lead_events(&answer.lead));
    events.extend([
        json!({"type": "response.output_item.added", "output_index": at,
               "item": {"id": item_id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}}),
        json!({"type": "response.content_part.added", "item_id": item_id, "output_index": at, "content_index": 0,
               "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
    ]);
    if !send_all(&tx, &mut seq, events).await {
        return;
    }
    let gap = first_token_wait(settings).await;
    for (i, piece) in pieces.iter().enumerate() {
        if disconnect && i == pieces.len() / 2 {
            // Drop the connection mid-stream, without the completion event.
            return;
        }
        let event = json!({"type": "response.output_text.delta", "item_id": item_id, "output_index": at,
                           "content_index": 0, "delta": piece, "logprobs": [], "obfuscation": obfuscation(piece)});
        if !send_all(&tx, &mut seq, vec![event]).await {
            return;
        }
        if let Some(gap) = gap {
            tokio::time::sleep(gap).await;
        }
    }
    let text: String = pieces.concat();
    let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
    let item = json!({"id": item_id, "type": "message", "status": "completed", "role": "assistant",
                      "content": [part]});
    let output: Vec<Value> = answer.lead.iter().cloned().chain([item.clone()]).collect();
    let done = answer.response(
        &response_id,
        "completed",
        &output,
        Some(answer.usage.json(pieces.len())),
    );
    let tail = vec![
        json!({"type": "response.output_text.done", "item_id": item_id, "output_index": at, "content_index": 0,
               "text": text, "logprobs": []}),
        json!({"type": "response.content_part.done", "item_id": item_id, "output_index": at, "content_index": 0,
               "part": part}),
        json!({"type": "response.output_item.done", "output_index": at, "item": item}),
        json!({"type": "response.completed", "response": done}),
    ];
    send_all(&tx, &mut seq, tail).await;
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
