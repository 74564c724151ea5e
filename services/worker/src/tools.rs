//! Server-side tools: the registry of tools the worker runs itself inside a
//! turn's loop (a request offers one with `{"type": "<name>"}`, as OpenAI's
//! hosted tools are offered), each call bounded in time and its output capped
//! with an explicit truncation marker. Client-side `function` tools are not
//! run here: the turn completes with their calls for the client to answer.
//!
//! - `conversation_search` looks for text in the conversation's own items,
//!   on a replica.
//! - `http_fetch` GETs a URL. Off by default; when on, it refuses targets
//!   that resolve to private, loopback, link-local or otherwise non-public
//!   addresses unless their host is allow-listed, pins the connection to the
//!   address it checked (no DNS rebinding), follows no redirects, and caps
//!   the body read and the time taken.
//! - MCP tools (`{"type": "mcp", "server_label": …}`) are run by [`crate::mcp`]
//!   through the same time bound and output cap.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};
use turnpike_core::config::{HttpFetchSettings, ToolSettings};
use turnpike_core::db::{Consistency, Lsn, Router};
use uuid::Uuid;

/// A tool the worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerTool {
    ConversationSearch,
    HttpFetch,
}

impl ServerTool {
    pub const ALL: [ServerTool; 2] = [Self::ConversationSearch, Self::HttpFetch];

    pub fn name(self) -> &'static str {
        match self {
            Self::ConversationSearch => "conversation_search",
            Self::HttpFetch => "http_fetch",
        }
    }

    /// The server-side tool a request's tool entry offers, if it is one.
    pub fn from_request(tool: &Value) -> Option<Self> {
        let kind = tool.get("type").and_then(Value::as_str)?;
        Self::ALL.into_iter().find(|t| t.name() == kind)
    }

    /// The server-side tool a model's call names, if it is one.
    pub fn from_call(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The function definition the model sees.
    pub fn definition(self) -> Value {
        match self {
            Self::ConversationSearch => json!({
                "type": "function",
                "name": "conversation_search",
                "description": "Search this conversation's earlier messages and tool outputs (before the current request) for a word or phrase (case-insensitive). Returns the newest matches first.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "query": {"type": "string", "description": "Text to look for."},
                        "limit": {"type": "integer", "minimum": 1, "maximum": 20, "description": "Most matches to return (default 5)."}
                    },
                    "required": ["query"],
                    "additionalProperties": false
                }
            }),
            Self::HttpFetch => json!({
                "type": "function",
                "name": "http_fetch",
                "description": "Fetch a public web page or API by URL (GET) and return its status, content type and the start of its body.",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "url": {"type": "string", "description": "An http or https URL."}
                    },
                    "required": ["url"],
                    "additionalProperties": false
                }
            }),
        }
    }
}

/// What a tool call may see of its turn.
pub(crate) struct CallScope<'a> {
    pub router: &'a Router,
    pub conversation: Uuid,
    /// Only items before this seq are searched: what came before the turn.
    pub before_seq: i64,
    /// Reads see at least this (the turn's input).
    pub lsn: Lsn,
}

/// Runs one call and returns its output text. Failures are outputs too (the
/// model reads them and can recover); only cancellation stops a call early.
pub(crate) async fn run(
    settings: &ToolSettings,
    tool: ServerTool,
    arguments: &str,
    scope: &CallScope<'_>,
) -> String {
    bounded(
        settings,
        tool.name(),
        dispatch(settings, tool, arguments, scope),
    )
    .await
}

/// Runs one call of the tool `name` within `tools.timeout_ms` and caps its
/// output; an error or a timeout becomes an `{"error": …}` output. Every
/// server-side call (built-in or MCP) goes through here, so all are bounded
/// alike.
pub(crate) async fn bounded(
    settings: &ToolSettings,
    name: &str,
    call: impl std::future::Future<Output = Result<String, String>>,
) -> String {
    let timeout = Duration::from_millis(settings.timeout_ms);
    let output = match tokio::time::timeout(timeout, call).await {
        Ok(Ok(output)) => output,
        Ok(Err(message)) => json!({"error": message}).to_string(),
        Err(_) => json!({"error": format!("{name} timed out after {} ms", settings.timeout_ms)})
            .to_string(),
    };
    cap(output, settings.max_output_bytes)
}

/// Cuts `text` to at most `max_bytes` (on a character boundary) and says so.
pub(crate) fn cap(text: String, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text;
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n[output truncated: {} of {} bytes shown]",
        &text[..end],
        end,
        text.len()
    )
}

async fn dispatch(
    settings: &ToolSettings,
    tool: ServerTool,
    arguments: &str,
    scope: &CallScope<'_>,
) -> Result<String, String> {
    match tool {
        ServerTool::ConversationSearch => search(arguments, scope).await,
        ServerTool::HttpFetch => fetch(&settings.http_fetch, arguments).await,
    }
}

#[derive(Deserialize)]
struct SearchArgs {
    query: String,
    #[serde(default)]
    limit: Option<i64>,
}

async fn search(arguments: &str, scope: &CallScope<'_>) -> Result<String, String> {
    let args: SearchArgs =
        serde_json::from_str(arguments).map_err(|e| format!("invalid arguments: {e}"))?;
    if args.query.trim().is_empty() {
        return Err("query must not be empty".into());
    }
    let limit = args.limit.unwrap_or(5).clamp(1, 20);
    let conversation = scope.conversation;
    let before_seq = scope.before_seq;
    let query = args.query;
    let rows = scope
        .router
        .read(Consistency::Session(Some(scope.lsn)), move |db| {
            let query = query.clone();
            Box::pin(async move { search_items(db, conversation, before_seq, &query, limit).await })
        })
        .await
        .map_err(|e| format!("search failed: {e}"))?;
    let matches: Vec<Value> = rows
        .into_iter()
        .map(|(body, text)| {
            let snippet: String = text.chars().take(400).collect();
            json!({"id": body.get("id"), "type": body.get("type"), "role": body.get("role"), "text": snippet})
        })
        .collect();
    Ok(json!({"matches": matches}).to_string())
}

/// Items of one conversation before `before_seq` whose text contains
/// `query`, newest first. Any node.
#[tracing::instrument(level = "debug", skip(db))]
async fn search_items(
    db: &mut impl turnpike_core::db::DbConn,
    conversation: Uuid,
    before_seq: i64,
    query: &str,
    limit: i64,
) -> Result<Vec<(Value, String)>, sqlx::Error> {
    let prepared = db.prepared();
    sqlx::query_as(
        "SELECT body, text FROM (
           SELECT seq, body, concat_ws(' ', body->>'output', body->>'arguments',
                    (SELECT string_agg(part->>'text', ' ') FROM jsonb_array_elements(
                       CASE WHEN jsonb_typeof(body->'content') = 'array' THEN body->'content' ELSE '[]'::jsonb END) part)) AS text
           FROM items WHERE conversation_id = $1 AND seq < $4 AND kind <> 'compaction') t
         WHERE strpos(lower(text), lower($2)) > 0
         ORDER BY seq DESC LIMIT $3",
    )
    .bind(conversation)
    .bind(query)
    .bind(limit)
    .bind(before_seq)
    .persistent(prepared)
    .fetch_all(db.conn())
    .await
}

#[derive(Deserialize)]
struct FetchArgs {
    url: String,
}

async fn fetch(settings: &HttpFetchSettings, arguments: &str) -> Result<String, String> {
    if !settings.enabled {
        return Err("http_fetch is turned off on this server".into());
    }
    let args: FetchArgs =
        serde_json::from_str(arguments).map_err(|e| format!("invalid arguments: {e}"))?;
    let url = reqwest::Url::parse(&args.url).map_err(|e| format!("invalid url: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("only http and https URLs can be fetched".into());
    }
    let host = url.host_str().ok_or("the url has no host")?.to_owned();
    let port = url.port_or_known_default().ok_or("the url has no port")?;
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    let allowed = settings
        .allow_hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(bare_host));
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((bare_host, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let Some(address) = addresses.first().copied() else {
        return Err(format!("{host} resolves to no address"));
    };
    if !allowed && let Some(blocked) = addresses.iter().find(|a| !is_public(a.ip())) {
        return Err(format!(
            "refused: {host} resolves to {}, which is not a public address",
            blocked.ip()
        ));
    }
    // Pinned to the checked address, so a second lookup cannot lead elsewhere.
    // No proxy either: the environment's HTTP(S)_PROXY would fetch the
    // URL from elsewhere, past the address check.
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .resolve(bare_host, address)
        .timeout(Duration::from_millis(settings.timeout_ms))
        .build()
        .map_err(|e| format!("http client: {e}"))?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("fetch failed: {e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers();
    let content_type = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let location = headers
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut body = Vec::new();
    let mut truncated = false;
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| format!("reading the body failed: {e}"))?;
        let room = settings.max_bytes.saturating_sub(body.len());
        if chunk.len() > room {
            body.extend_from_slice(&chunk[..room]);
            truncated = true;
            break;
        }
        body.extend_from_slice(&chunk);
    }
    let mut text = String::from_utf8_lossy(&body).into_owned();
    if truncated {
        text.push_str(&format!(
            "\n[body truncated at {} bytes]",
            settings.max_bytes
        ));
    }
    let mut output = json!({"status": status, "content_type": content_type, "body": text});
    if let Some(location) = location {
        // Redirects are not followed: the model may fetch the target itself, checked again.
        output["location"] = json!(location);
    }
    Ok(output.to_string())
}

/// Whether an address is on the public internet.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let segments = v6.segments();
            let embedded = |high: u16, low: u16| {
                let [a, b] = high.to_be_bytes();
                let [c, d] = low.to_be_bytes();
                IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d))
            };
            // Addresses that carry an IPv4 one and reach it: NAT64
            // (64:ff9b::/96) and 6to4 (2002::/16) are as public as the IPv4
            // address inside; IPv4-compatible (::/96), local-use NAT64
            // (64:ff9b:1::/48) and Teredo (2001::/32) are refused.
            if segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_public(embedded(segments[6], segments[7]));
            }
            if segments[0] == 0x2002 {
                return is_public(embedded(segments[1], segments[2]));
            }
            if segments[..6] == [0, 0, 0, 0, 0, 0]
                || segments[..3] == [0x64, 0xff9b, 1]
                || segments[..2] == [0x2001, 0]
            {
                return false;
            }
            let first = segments[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::8.8.8.8",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "::127.0.0.1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn outputs_are_capped_with_a_marker() {
        assert_eq!(cap("short".into(), 10), "short");
        let capped = cap("é".repeat(10), 5);
        assert!(
            capped.starts_with("éé\n[output truncated: 4 of 20 bytes shown]"),
            "{capped}"
        );
    }

    #[tokio::test]
    async fn fetch_refuses_private_targets_unless_allowed() {
        let mut settings = HttpFetchSettings {
            enabled: true,
            ..HttpFetchSettings::default()
        };
        let refused = fetch(&settings, r#"{"url":"http://127.0.0.1:9/"}"#)
            .await
            .unwrap_err();
        assert!(refused.contains("not a public address"), "{refused}");
        let refused = fetch(&settings, r#"{"url":"file:///etc/passwd"}"#)
            .await
            .unwrap_err();
        assert!(refused.contains("only http"), "{refused}");
        settings.enabled = false;
        let off = fetch(&settings, r#"{"url":"https://example.com/"}"#)
            .await
            .unwrap_err();
        assert!(off.contains("turned off"), "{off}");
    }
}
