//! MCP tools over streamable HTTP: a minimal client for the servers the
//! operator configured under `tools.mcp_servers` (a request only names a
//! configured label, so it cannot send the worker anywhere else).
//!
//! Each request is a JSON-RPC 2.0 POST to the server's URL; the answer is a
//! JSON body or an SSE stream carrying the JSON-RPC response. A session is
//! opened with `initialize` + `notifications/initialized` and its
//! `Mcp-Session-Id` sent on every later request; a server that forgot the
//! session (404) gets a new one, once. A server's tool list is cached per
//! process for [`LIST_TTL`], so a turn's start rarely waits on it. Its tools
//! reach the model as functions named `<label>__<tool>`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use reqwest::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use turnpike_core::config::{McpServerSettings, ToolSettings};

/// The protocol revision this client speaks.
const PROTOCOL_VERSION: &str = "2025-06-18";

/// How long a server's tool list is reused before it is asked again.
const LIST_TTL: Duration = Duration::from_secs(60);

/// Pages of `tools/list` read at most: a server that keeps paging is cut off.
const MAX_LIST_PAGES: usize = 10;

/// Between a server's label and its tool's name in the model's tool name.
const SEPARATOR: &str = "__";

const SESSION_HEADER: &str = "mcp-session-id";

/// Why an MCP request failed. All of them become an error output the model
/// reads (or, at a turn's start, leave the server's tools out); the next
/// turn tries again.
#[derive(Debug, thiserror::Error)]
pub(crate) enum McpError {
    /// The server could not be reached or its answer could not be read:
    /// what went wrong, never the URL (it may carry a token).
    #[error("MCP server unreachable: {0}")]
    Transport(String),
    /// The server answered with an HTTP error status. Its body is not kept:
    /// it may echo the request, token included.
    #[error("MCP server answered HTTP {status}")]
    Status { status: u16 },
    /// The server answered with a JSON-RPC error.
    #[error("MCP error {code}: {message}")]
    Rpc { code: i64, message: String },
    /// The answer was not the JSON-RPC response asked for.
    #[error("MCP server sent a malformed answer: {0}")]
    Malformed(String),
    /// A configured header name or value cannot be sent; fix the configuration.
    #[error("tools.mcp_servers: the header '{0}' is not a valid HTTP header")]
    InvalidHeader(String),
}

impl From<reqwest::Error> for McpError {
    fn from(e: reqwest::Error) -> Self {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "connection failed"
        } else if e.is_decode() || e.is_body() {
            "its answer could not be read"
        } else {
            "the request failed"
        };
        Self::Transport(what.to_owned())
    }
}

/// The MCP servers' sessions and tool lists of this worker process.
pub(crate) struct Registry {
    http: reqwest::Client,
    next_id: AtomicU64,
    /// Open sessions by server label, with the id the server gave (none
    /// for a server that keeps no sessions).
    sessions: Mutex<HashMap<String, Option<String>>>,
    /// Tool lists by server label, with when they were read.
    listed: Mutex<HashMap<String, (Instant, Vec<Value>)>>,
}

impl Registry {
    pub fn new() -> Result<Self, reqwest::Error> {
        // Configured endpoints are called as configured: no redirects.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            http,
            next_id: AtomicU64::new(1),
            sessions: Mutex::new(HashMap::new()),
            listed: Mutex::new(HashMap::new()),
        })
    }

    /// The function definitions of the MCP tools a request offers, each
    /// listing bounded by `tools.timeout_ms`. A server that cannot be listed
    /// is left out (logged): the turn runs without its tools.
    pub async fn definitions(
        &self,
        settings: &ToolSettings,
        request_tools: &[Value],
    ) -> Vec<Value> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let mut definitions = Vec::new();
        for entry in request_tools {
            if entry.get("type").and_then(Value::as_str) != Some("mcp") {
                continue;
            }
            let Some(label) = entry.get("server_label").and_then(Value::as_str) else {
                continue;
            };
            let Some(server) = settings.mcp_servers.get(label) else {
                tracing::warn!(
                    label,
                    "a request offers an MCP server that is not configured"
                );
                continue;
            };
            let tools = match tokio::time::timeout(timeout, self.tools(label, server)).await {
                Ok(Ok(tools)) => tools,
                Ok(Err(e)) => {
                    tracing::warn!(label, error = %e, "cannot list an MCP server's tools; the turn runs without them");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(
                        label,
                        timeout_ms = settings.timeout_ms,
                        "listing an MCP server's tools timed out; the turn runs without them"
                    );
                    continue;
                }
            };
            let requested: Option<BTreeSet<&str>> = entry
                .get("allowed_tools")
                .and_then(Value::as_array)
                .map(|names| names.iter().filter_map(Value::as_str).collect());
            for tool in tools {
                let Some(name) = tool.get("name").and_then(Value::as_str) else {
                    continue;
                };
                let allowed = server
                    .allowed_tools
                    .as_ref()
                    .is_none_or(|names| names.iter().any(|n| n == name))
                    && requested.as_ref().is_none_or(|names| names.contains(name));
                if allowed && let Some(definition) = definition(label, &tool) {
                    definitions.push(definition);
                }
            }
        }
        definitions
    }

    /// Calls `<label>__<tool>` with the model's JSON arguments and returns
    /// the tool's text; a tool's own failure (`isError`) is an error too.
    pub async fn call(
        &self,
        settings: &ToolSettings,
        name: &str,
        arguments: &str,
    ) -> Result<String, String> {
        let Some((label, tool)) = name.split_once(SEPARATOR) else {
            return Err(format!("{name} is not an MCP tool"));
        };
        let Some(server) = settings.mcp_servers.get(label) else {
            return Err(format!("no MCP server labelled '{label}' is configured"));
        };
        let arguments: Value = if arguments.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(arguments).map_err(|e| format!("invalid arguments: {e}"))?
        };
        let result = self
            .request(
                label,
                server,
                "tools/call",
                json!({"name": tool, "arguments": arguments}),
            )
            .await
            .map_err(|e| e.to_string())?;
        let text = result_text(&result);
        if result.get("isError").and_then(Value::as_bool) == Some(true) {
            return Err(text);
        }
        Ok(text)
    }

    /// A server's tools, from the cache while it is fresh.
    async fn tools(&self, label: &str, server: &McpServerSettings) -> Result<Vec<Value>, McpError> {
        if let Ok(listed) = self.listed.lock()
            && let Some((at, tools)) = listed.get(label)
            && at.elapsed() < LIST_TTL
        {
            return Ok(tools.clone());
        }
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let params = match &cursor {
                Some(cursor) => json!({"cursor": cursor}),
                None => json!({}),
            };
            let page = self.request(label, server, "tools/list", params).await?;
            tools.extend(
                page.get("tools")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            );
            cursor = page
                .get("nextCursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if cursor.is_none() {
                break;
            }
        }
        if let Ok(mut listed) = self.listed.lock() {
            listed.insert(label.to_owned(), (Instant::now(), tools.clone()));
        }
        Ok(tools)
    }

    /// One JSON-RPC request in the server's session, opening one first if
    /// there is none, and once more if the server forgot it.
    async fn request(
        &self,
        label: &str,
        server: &McpServerSettings,
        method: &str,
        params: Value,
    ) -> Result<Value, McpError> {
        let mut reopened = false;
        loop {
            let session = match self.session(label) {
                Some(session) => session,
                None => {
                    reopened = true;
                    self.open(label, server).await?
                }
            };
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
            match self.post(server, session.as_deref(), &body).await {
                Err(McpError::Status { status: 404, .. }) if session.is_some() && !reopened => {
                    // The server ended the session: open a new one and ask again.
                    if let Ok(mut sessions) = self.sessions.lock() {
                        sessions.remove(label);
                    }
                    reopened = true;
                    self.open(label, server).await?;
                }
                Err(e) => return Err(e),
                Ok((_, answer)) => return rpc_result(answer, id),
            }
        }
    }

    /// The server's open session, if one is open.
    fn session(&self, label: &str) -> Option<Option<String>> {
        self.sessions.lock().ok()?.get(label).cloned()
    }

    /// `initialize`, then `notifications/initialized`; remembers the
    /// session id the server gave, if any.
    async fn open(
        &self,
        label: &str,
        server: &McpServerSettings,
    ) -> Result<Option<String>, McpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let initialize = json!({"jsonrpc": "2.0", "id": id, "method": "initialize", "params": {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "turnpike-worker", "version": env!("CARGO_PKG_VERSION")},
        }});
        let (session, answer) = self.post(server, None, &initialize).await?;
        rpc_result(answer, id)?;
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.post(server, session.as_deref(), &initialized).await?;
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(label.to_owned(), session.clone());
        }
        Ok(session)
    }

    /// POSTs one message; returns the session id header and the JSON-RPC
    /// response the answer carries (none for an accepted notification).
    async fn post(
        &self,
        server: &McpServerSettings,
        session: Option<&str>,
        body: &Value,
    ) -> Result<(Option<String>, Option<Value>), McpError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, value) in &server.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| McpError::InvalidHeader(name.clone()))?;
            let mut value = HeaderValue::from_str(value.expose_secret())
                .map_err(|_| McpError::InvalidHeader(name.to_string()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        if let Some(session) = session {
            headers.insert(
                SESSION_HEADER,
                HeaderValue::from_str(session)
                    .map_err(|_| McpError::Malformed("an unusable session id".into()))?,
            );
            headers.insert(
                "mcp-protocol-version",
                HeaderValue::from_static(PROTOCOL_VERSION),
            );
        }
        let response = self
            .http
            .post(&server.url)
            .headers(headers)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        if !status.is_success() {
            return Err(McpError::Status {
                status: status.as_u16(),
            });
        }
        let session = response
            .headers()
            .get(SESSION_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let is_stream = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let id = body.get("id").cloned();
        if is_stream {
            // The stream may carry the server's own requests and
            // notifications first; the answer is the message with our id.
            let mut events = response.bytes_stream().eventsource();
            while let Some(event) = events.next().await {
                let event = event.map_err(|e| McpError::Malformed(format!("SSE: {e}")))?;
                let Ok(message) = serde_json::from_str::<Value>(&event.data) else {
                    continue;
                };
                if id.is_some()
                    && message.get("id") == id.as_ref()
                    && message.get("method").is_none()
                {
                    return Ok((session, Some(message)));
                }
            }
            return Ok((session, None));
        }
        let bytes = response.bytes().await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok((session, None));
        }
        let message: Value = serde_json::from_slice(&bytes)
            .map_err(|e| McpError::Malformed(format!("not JSON: {e}")))?;
        Ok((session, Some(message)))
    }
}

/// The `result` of the JSON-RPC response to request `id`.
fn rpc_result(answer: Option<Value>, id: u64) -> Result<Value, McpError> {
    let Some(mut answer) = answer else {
        return Err(McpError::Malformed(format!("no response to request {id}")));
    };
    if let Some(error) = answer.get("error") {
        return Err(McpError::Rpc {
            code: error.get("code").and_then(Value::as_i64).unwrap_or(0),
            message: error
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        });
    }
    match answer.get_mut("result") {
        Some(result) => Ok(result.take()),
        None => Err(McpError::Malformed(format!(
            "the response to request {id} has no result"
        ))),
    }
}

/// The function definition the model sees for one of a server's tools;
/// none when the combined name is not a usable function name.
fn definition(label: &str, tool: &Value) -> Option<Value> {
    let name = format!("{label}{SEPARATOR}{}", tool.get("name")?.as_str()?);
    let usable = name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !usable {
        tracing::warn!(%name, "skipping an MCP tool whose name cannot be a function name");
        return None;
    }
    Some(json!({
        "type": "function",
        "name": name,
        "description": tool.get("description").and_then(Value::as_str).unwrap_or(""),
        "parameters": tool.get("inputSchema").cloned().unwrap_or_else(|| json!({"type": "object"})),
    }))
}

/// A `tools/call` result as text: its text content, in order; other
/// content is named but not inlined; structured content when there is no text.
fn result_text(result: &Value) -> String {
    let parts: Vec<String> = result
        .get("content")
        .and_then(Value::as_array)
        .map(|content| {
            content
                .iter()
                .map(|part| match part.get("type").and_then(Value::as_str) {
                    Some("text") => part
                        .get("text")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                    Some("resource") => part
                        .pointer("/resource/text")
                        .and_then(Value::as_str)
                        .map_or_else(|| "[resource content omitted]".to_owned(), str::to_owned),
                    other => format!("[{} content omitted]", other.unwrap_or("unknown")),
                })
                .collect()
        })
        .unwrap_or_default();
    if parts.is_empty()
        && let Some(structured) = result.get("structuredContent")
    {
        return structured.to_string();
    }
    parts.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_transport_error_names_no_url() {
        // A port nothing listens on, and a token in the URL.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(9);
        let url = format!("http://user:pw-secret@127.0.0.1:{port}/mcp?token=tok-secret");
        let Err(error) = reqwest::Client::new().post(&url).send().await else {
            panic!("nothing listens on port {port}");
        };
        let shown = McpError::from(error).to_string();
        assert_eq!(shown, "MCP server unreachable: connection failed");
        assert!(!shown.contains("secret") && !shown.contains("127.0.0.1"));
    }

    #[test]
    fn results_become_text() {
        let result = json!({"content": [{"type": "text", "text": "a"}, {"type": "image", "data": "…"}, {"type": "text", "text": "b"}]});
        assert_eq!(result_text(&result), "a\n[image content omitted]\nb");
        assert_eq!(
            result_text(&json!({"content": [], "structuredContent": {"n": 1}})),
            "{\"n\":1}"
        );
    }

    #[test]
    fn tools_become_prefixed_functions() {
        let tool =
            json!({"name": "add", "description": "Adds.", "inputSchema": {"type": "object"}});
        assert_eq!(
            definition("calc", &tool),
            Some(
                json!({"type": "function", "name": "calc__add", "description": "Adds.", "parameters": {"type": "object"}})
            )
        );
        assert_eq!(definition("calc", &json!({"name": "a b"})), None);
    }
}
