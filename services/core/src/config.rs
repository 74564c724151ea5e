//! Layered configuration: built-in defaults, then an optional TOML file
//! (`TURNPIKE_CONFIG`, or `turnpike.toml` in the working directory), then
//! `TURNPIKE__SECTION__KEY` environment variables, which is what a Helm
//! ConfigMap and Secret provide. Secrets are `SecretString`s and never logged.

use std::collections::BTreeMap;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Everything a Turnpike process can be told.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub api: ApiSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub model: ModelSettings,
    pub worker: WorkerSettings,
    pub events: EventSettings,
    pub tools: ToolSettings,
    pub cache: CacheSettings,
    pub limits: LimitSettings,
    pub overload: OverloadSettings,
    pub mock: MockSettings,
    pub log: LogSettings,
}

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong type; fix the file or variable named.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// The values parse but do not make a usable deployment.
    #[error("configuration: {0}")]
    Invalid(String),
}

impl Settings {
    /// Loads defaults → file → environment, and checks the result.
    pub fn load() -> Result<Self, ConfigError> {
        let file = std::env::var("TURNPIKE_CONFIG").unwrap_or_else(|_| "turnpike.toml".into());
        let settings: Settings = config::Config::builder()
            .add_source(config::File::with_name(&file).required(false))
            .add_source(
                config::Environment::with_prefix("TURNPIKE")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("tools.http_fetch.allow_hosts")
                    .with_list_parse_key("api.cors_allowed_origins")
                    .with_list_parse_key("overload.background_routes"),
            )
            .build()?
            .try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde cannot: exactly one primary, sane numbers.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let primaries = self
            .database
            .nodes
            .values()
            .filter(|n| n.role == NodeRole::Primary)
            .count();
        if primaries != 1 {
            return Err(ConfigError::Invalid(format!(
                "database.nodes must name exactly one node with role = \"primary\" (found {primaries}); \
                 set TURNPIKE__DATABASE__NODES__<NAME>__ROLE and __URL"
            )));
        }
        if self.database.max_connections_per_node == 0 {
            return Err(ConfigError::Invalid(
                "database.max_connections_per_node must be at least 1".into(),
            ));
        }
        self.database.validate_budgets()?;
        if self.api.request_body_timeout_ms == 0 || self.api.idle_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "api.request_body_timeout_ms and api.idle_timeout_ms must be at least 1".into(),
            ));
        }
        if self.events.keepalive_ms >= self.api.idle_timeout_ms {
            return Err(ConfigError::Invalid(format!(
                "events.keepalive_ms ({}) must be below api.idle_timeout_ms ({}): a stream \
                 that sends nothing for that long is closed as idle",
                self.events.keepalive_ms, self.api.idle_timeout_ms
            )));
        }
        for origin in &self.api.cors_allowed_origins {
            if !is_origin(origin) {
                return Err(ConfigError::Invalid(format!(
                    "api.cors_allowed_origins: '{origin}' is not an origin; \
                     write scheme://host[:port] with no path, or * for any"
                )));
            }
        }
        self.overload.validate()?;
        self.tools.validate()?;
        Ok(())
    }
}

/// `*`, or what a browser sends as `Origin`: `http(s)://host[:port]`,
/// nothing after it.
fn is_origin(origin: &str) -> bool {
    if origin == "*" {
        return true;
    }
    let Some(rest) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return false;
    };
    !rest.is_empty()
        && rest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
}

/// The HTTP API process.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// Address to bind; `0.0.0.0` in a container.
    pub host: String,
    /// Port to bind; 0 picks a free one (tests).
    pub port: u16,
    /// Largest accepted request body; larger bodies get 413.
    pub body_limit_bytes: usize,
    /// Largest accepted body of a request that carries a model's input
    /// (`/v1/responses…`, `/v1/chat/completions`): a stateless client
    /// resends its whole history, as long as the model's context.
    pub input_body_limit_bytes: usize,
    /// Model used when a request names none.
    pub default_model: String,
    /// How long an authenticated API key stays cached in process.
    pub auth_cache_ttl_ms: u64,
    /// Grace period for in-flight requests on SIGTERM.
    pub shutdown_grace_ms: u64,
    /// How long `POST /v1/responses` without `stream` or `background` waits
    /// for the turn to finish before answering with its current status.
    pub response_wait_ms: u64,
    /// How long an `Idempotency-Key`'s record is kept; after it the key may
    /// be used again.
    pub idempotency_retention_ms: u64,
    /// How long a key claimed by a request that never answered (its
    /// process died) holds: after it a retry runs again.
    pub idempotency_claim_ms: u64,
    /// Database look-ups of API keys that no cache level knows, per second
    /// and process: a flood of made-up keys is shed past it, and never
    /// takes the place of real keys in the caches.
    pub key_lookups_per_s: u32,
    /// Port of a separate listener for `/metrics` (on `host`), so that the
    /// metrics are not public; the main port then does not serve them.
    /// 0: `/metrics` on the main port.
    pub metrics_port: u16,
    /// Origins whose web pages may call the API from a browser (CORS):
    /// `https://app.example.com`, or `*` for any (keys travel in the
    /// `Authorization` header, never in cookies). Empty: no CORS headers,
    /// for an API only servers call.
    pub cors_allowed_origins: Vec<String>,
    /// How long a connection may be idle before it is closed (within a
    /// quarter more): idle while none of its requests is being handled, no
    /// new request begins and nothing is sent on it. So a connection that
    /// sends nothing, an idle keep-alive one, one that sends its request
    /// head byte by byte (a head counts once it is whole), and one whose
    /// client stopped reading its answer (a stream's, once the socket's
    /// buffers are full) are closed. A stream is not idle: its keep-alive
    /// comments go out every `events.keepalive_ms`, which must be shorter.
    /// Keep it above the idle timeout of a load balancer in front (60 s is
    /// common), so that the balancer, not the api, closes an idle
    /// connection.
    pub idle_timeout_ms: u64,
    /// How long a request's body may take to arrive, counted from its head,
    /// plus a second for every 16 KiB received (a large body sent slowly
    /// but steadily gets through): a body still arriving after it is
    /// refused with 408 and, over HTTP/1.1, its connection closed, so a
    /// client that stops sending does not hold its request open.
    pub request_body_timeout_ms: u64,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            body_limit_bytes: 1024 * 1024,
            input_body_limit_bytes: 32 * 1024 * 1024,
            default_model: "mock-1".into(),
            auth_cache_ttl_ms: 30_000,
            shutdown_grace_ms: 10_000,
            response_wait_ms: 120_000,
            idempotency_retention_ms: 86_400_000,
            idempotency_claim_ms: 180_000,
            key_lookups_per_s: 1_000,
            metrics_port: 0,
            cors_allowed_origins: Vec::new(),
            idle_timeout_ms: 75_000,
            request_body_timeout_ms: 60_000,
        }
    }
}

/// Whether a node class is reached through its PgBouncer or directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectPath {
    /// Straight to Postgres: prepared statements are cached per connection.
    Direct,
    /// Through PgBouncer in transaction mode: unnamed statements inside
    /// explicit transactions, no statement cache.
    Pgbouncer,
}

/// A node's role in the replication topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    Primary,
    Replica,
}

/// One Postgres node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    pub role: NodeRole,
    /// Direct connection URL, e.g. `postgres://turnpike@10.0.0.5:5432/turnpike`.
    pub url: SecretString,
    /// The node's PgBouncer URL; required when the node class's path is `pgbouncer`.
    #[serde(default)]
    pub pooled_url: Option<SecretString>,
    /// Which query classes it serves (see [`NodeGroup`]).
    #[serde(default)]
    pub group: NodeGroup,
}

/// The replica group a node belongs to: which query classes it serves.
/// Interactive and background reads go only to replicas of their own group
/// (or `both`), each class within its own concurrency budget; the primary
/// is their last resort if its group admits the class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeGroup {
    /// Both classes, each in its share of the node's budget.
    #[default]
    Both,
    /// Interactive queries only (on the primary: background reads never fall back to it).
    Interactive,
    /// Background queries only (not allowed on the primary, which takes the writes).
    Background,
}

impl NodeGroup {
    /// Whether queries of `class` may run on a node of this group.
    pub fn serves(self, class: turnpike_protocol::QueryClass) -> bool {
        use turnpike_protocol::QueryClass;
        match self {
            Self::Both => true,
            Self::Interactive => class == QueryClass::Interactive,
            Self::Background => class == QueryClass::Background,
        }
    }
}

/// The database nodes and the router's behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// Nodes by name (`primary`, `replica1`, …); exactly one has role `primary`.
    pub nodes: BTreeMap<String, NodeSettings>,
    /// How writes (and last-resort reads) reach the primary.
    pub primary_path: ConnectPath,
    /// How reads reach replicas.
    pub replica_path: ConnectPath,
    /// Pool size per node and process. Every pod counts against the server's `max_connections`.
    pub max_connections_per_node: u32,
    /// Shared, pipelined connections per node and process, on which
    /// single-statement reads go out together instead of one per pooled
    /// connection; 0 sends every read through the pool.
    pub pipelined_connections_per_node: u32,
    /// Whether nodes reached through PgBouncer get pipelined connections
    /// too (each statement one simple-protocol Query message). PgBouncer
    /// keeps a client's server until every Query it has read is answered;
    /// turn this off for a pooler that hands the server back at the first
    /// answer.
    pub pipeline_through_pgbouncer: bool,
    /// Statements one pipelined connection carries at once before reads
    /// go to the next; pipelined reads have a budget of their own, this
    /// many per connection (`max_in_flight_per_node` is the pool's).
    pub pipeline_depth: u32,
    /// A pipelined connection with statements in flight and no answer for
    /// this long (a statement waiting on a lock ahead of them) takes no new
    /// reads; with every one like that, reads take pooled connections.
    pub pipeline_stalled_after_ms: u64,
    /// How long a query waits for a pooled connection before the node counts as failing.
    pub acquire_timeout_ms: u64,
    /// Server-side `statement_timeout` on direct connections (set it on the role for PgBouncer).
    pub statement_timeout_ms: u64,
    /// How often every node's health and lag are probed.
    pub health_interval_ms: u64,
    /// A probe slower than this counts as a failure.
    pub probe_timeout_ms: u64,
    /// A replica further behind than this (ms) is `lagging`: only eventual reads use it, and only when no replica is `up`.
    pub max_lag_ms: u64,
    /// The same threshold in WAL bytes.
    pub max_lag_bytes: u64,
    /// First ban after a failure; doubles on each failure in a row.
    pub ban_base_ms: u64,
    /// Longest ban.
    pub ban_max_ms: u64,
    /// Staleness allowed for `bounded` reads.
    pub bounded_staleness_ms: u64,
    /// How long a `session` read waits for a replica to replay the client's last write before it reads the primary.
    pub session_wait_ms: u64,
    /// How long a user's last-write LSN is remembered for clients that send no consistency token.
    pub last_write_window_ms: u64,
    /// Upper bound on one read attempt on one node; past it the read is retried on another node.
    pub read_attempt_timeout_ms: u64,
    /// Queries one process runs at once on one node (its concurrency
    /// budget); 0 means the pool size less one. Never more than that: an
    /// admitted query does not queue behind a saturated pool, and the
    /// health probe always finds a connection (a busy node is not taken
    /// for a dead one).
    pub max_in_flight_per_node: u32,
    /// On a node that serves both classes, the share of its budget
    /// background queries may use; the rest is kept for interactive ones
    /// (which may also borrow idle background slots, never the reverse).
    pub background_share_percent: u32,
    /// How long a query waits for a slot in its node's budget before it is
    /// shed with 503 `overloaded`.
    pub queue_timeout_ms: u64,
    /// Queries of one class that may wait for a slot on one node; past it
    /// the next one is shed at once.
    pub max_queued_per_node: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            nodes: BTreeMap::new(),
            primary_path: ConnectPath::Pgbouncer,
            replica_path: ConnectPath::Direct,
            max_connections_per_node: 16,
            pipelined_connections_per_node: 2,
            pipeline_through_pgbouncer: true,
            pipeline_depth: 32,
            pipeline_stalled_after_ms: 20,
            acquire_timeout_ms: 500,
            statement_timeout_ms: 5_000,
            health_interval_ms: 250,
            probe_timeout_ms: 500,
            max_lag_ms: 1_000,
            max_lag_bytes: 16 * 1024 * 1024,
            ban_base_ms: 1_000,
            ban_max_ms: 30_000,
            bounded_staleness_ms: 1_000,
            session_wait_ms: 100,
            last_write_window_ms: 10_000,
            read_attempt_timeout_ms: 2_000,
            max_in_flight_per_node: 0,
            background_share_percent: 25,
            queue_timeout_ms: 500,
            max_queued_per_node: 1_024,
        }
    }
}

impl DatabaseSettings {
    pub fn health_interval(&self) -> Duration {
        Duration::from_millis(self.health_interval_ms)
    }

    /// The budget of a node's pipelined reads per process: their
    /// connections' depth in all.
    pub fn pipeline_budget(&self) -> u32 {
        self.pipelined_connections_per_node
            .saturating_mul(self.pipeline_depth.max(1))
    }

    /// A node's concurrency budget per process: `max_in_flight_per_node`,
    /// at most the pool size less the connection kept for probes (0: that).
    pub fn node_budget(&self) -> u32 {
        let most = self.max_connections_per_node.saturating_sub(1).max(1);
        match self.max_in_flight_per_node {
            0 => most,
            n => n.min(most),
        }
    }

    fn validate_budgets(&self) -> Result<(), ConfigError> {
        if self.background_share_percent > 100 {
            return Err(ConfigError::Invalid(
                "database.background_share_percent must be between 0 and 100".into(),
            ));
        }
        for (name, node) in &self.nodes {
            if node.role == NodeRole::Primary && node.group == NodeGroup::Background {
                return Err(ConfigError::Invalid(format!(
                    "database.nodes.{name}: the primary takes the writes (interactive); its group must be `both` or `interactive`"
                )));
            }
        }
        Ok(())
    }
}

/// Redis: the session window, and later caches, limits and queues.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    pub url: SecretString,
    /// Multiplexed connections per process; every command is pipelined on
    /// one of them.
    pub connections: usize,
    /// Budget for one Redis command; past it the caller degrades as documented.
    pub timeout_ms: u64,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("redis://127.0.0.1:6379"),
            connections: 4,
            timeout_ms: 250,
        }
    }
}

impl RedisSettings {
    pub fn url(&self) -> &str {
        self.url.expose_secret()
    }
}

/// Which wire protocol the model provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI's Responses API (`POST {base_url}/responses`, streaming): OpenAI,
    /// Ollama ≥ 0.13.4, vLLM, LM Studio, and `turnpike mock-model`.
    Responses,
    /// Chat Completions (`POST {base_url}/chat/completions`, streaming), for
    /// older OpenAI-compatible servers; `turnpike mock-model` speaks it too.
    ChatCompletions,
}

/// The model provider the workers call.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    pub provider: ProviderKind,
    /// e.g. `https://api.openai.com/v1`, `http://localhost:11434/v1`.
    pub base_url: String,
    /// Sent as a bearer token when set.
    pub api_key: Option<SecretString>,
    /// A stream that sends nothing for this long is an error (retried).
    pub idle_timeout_ms: u64,
    pub connect_timeout_ms: u64,
    /// Retries after a 5xx, a 429, a transport error or a stream cut short.
    pub max_retries: u32,
    /// First retry delay; doubles each retry, with jitter. A 429's own delay wins.
    pub retry_base_ms: u64,
    /// The model's context window, in tokens. A turn compacts its context
    /// before a model call whose prompt would pass `auto_compact_percent` of
    /// it, unless the request sets its own `compact_threshold`.
    pub context_window_tokens: u64,
    pub auto_compact_percent: u64,
    /// How context is compacted: `auto` uses the provider's
    /// `/responses/compact` and falls back to a summary by the model when the
    /// provider has none; `endpoint` and `summary` force one of them.
    pub compaction: CompactionMode,
    /// A summary compaction keeps this many of the latest user messages verbatim.
    pub compaction_keep_user_messages: usize,
    /// Ask for `reasoning.encrypted_content` so reasoning can be passed back
    /// to a provider that stores nothing (`store: false`). Turn off for
    /// servers that refuse the `include` parameter.
    pub include_encrypted_reasoning: bool,
}

/// How a turn compacts its context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompactionMode {
    Auto,
    Endpoint,
    Summary,
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            provider: ProviderKind::Responses,
            base_url: "http://127.0.0.1:15470/v1".into(),
            api_key: None,
            idle_timeout_ms: 60_000,
            connect_timeout_ms: 5_000,
            max_retries: 3,
            retry_base_ms: 200,
            context_window_tokens: 128_000,
            auto_compact_percent: 90,
            compaction: CompactionMode::Auto,
            compaction_keep_user_messages: 2,
            include_encrypted_reasoning: true,
        }
    }
}

/// The agent-loop workers.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerSettings {
    /// The Redis Stream turns are queued on (api and workers must agree).
    pub queue: String,
    /// Turns one worker process runs at once.
    pub concurrency: usize,
    /// How long one queue read blocks.
    pub block_ms: u64,
    /// A claimed turn whose worker has not heartbeated for this long is reclaimed.
    pub reclaim_idle_ms: u64,
    pub heartbeat_ms: u64,
    /// Deliveries after which a turn fails instead of running again.
    pub max_deliveries: u64,
    /// On SIGTERM: stop claiming, and give running turns this long to finish.
    pub shutdown_grace_ms: u64,
    /// Model calls one turn may make (tool loops end here with an error).
    pub max_steps: u32,
    /// Port of the worker's Prometheus `/metrics` (on `api.host`); 0: none.
    pub metrics_port: u16,
    /// The most items a turn's history is read with (the newest since the
    /// latest compaction; a longer prompt is compacted long before).
    pub history_max_items: i64,
    /// The most bytes (as stored) a turn's history is read with.
    pub history_max_bytes: i64,
    /// A turn queued this long, first in its conversation with none
    /// running, counts as stranded (its enqueue was lost) and is queued again.
    pub stranded_after_ms: u64,
    /// How often each worker looks for stranded turns.
    pub reconcile_every_ms: u64,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            queue: "tp:turns".into(),
            concurrency: 64,
            block_ms: 1_000,
            reclaim_idle_ms: 15_000,
            heartbeat_ms: 3_000,
            max_deliveries: 5,
            shutdown_grace_ms: 30_000,
            max_steps: 16,
            metrics_port: 0,
            history_max_items: 20_000,
            history_max_bytes: 64 * 1024 * 1024,
            stranded_after_ms: 20_000,
            reconcile_every_ms: 10_000,
        }
    }
}

/// Turn event logs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// How long a response's event log is kept in Redis after its last
    /// event; later replays are rebuilt from the stored items.
    pub retention_ms: u64,
    /// SSE keepalive comment period.
    pub keepalive_ms: u64,
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            retention_ms: 3_600_000,
            keepalive_ms: 15_000,
        }
    }
}

/// The read cache: L1 in process, L2 in Redis, leases against miss storms.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    /// Off: every read goes to Postgres.
    pub enabled: bool,
    /// L1 size per process (keys and bodies).
    pub l1_max_bytes: u64,
    /// L1 lifetime: bounds staleness should an invalidation broadcast be lost.
    pub l1_ttl_ms: u64,
    /// L2 lifetime of an answer.
    pub l2_ttl_ms: u64,
    /// L1 and L2 lifetime of a "does not exist" answer.
    pub negative_ttl_ms: u64,
    /// How long a miss's lease lets one reader fill the key before another may.
    pub lease_ms: u64,
    /// How long readers wait for the lease holder's fill before reading Postgres.
    pub lease_wait_ms: u64,
    /// How long a conversation's last write position is kept for fills.
    pub floor_ttl_ms: u64,
    /// After a Redis error, how long reads bypass the cache.
    pub breaker_ms: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            l1_max_bytes: 64 * 1024 * 1024,
            l1_ttl_ms: 5_000,
            l2_ttl_ms: 300_000,
            negative_ttl_ms: 5_000,
            lease_ms: 2_000,
            lease_wait_ms: 500,
            floor_ttl_ms: 3_600_000,
            breaker_ms: 1_000,
        }
    }
}

/// Server-side tools, run by the workers inside a turn's loop.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ToolSettings {
    /// A tool call running longer than this ends with an error output.
    pub timeout_ms: u64,
    /// Tool outputs are cut to this many bytes, with a marker saying so.
    pub max_output_bytes: usize,
    pub http_fetch: HttpFetchSettings,
    /// MCP servers whose tools a request may offer with
    /// `{"type": "mcp", "server_label": LABEL}`, by label. Only the operator
    /// names servers: a request cannot point the worker at a URL of its own.
    pub mcp_servers: BTreeMap<String, McpServerSettings>,
}

impl Default for ToolSettings {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            max_output_bytes: 16 * 1024,
            http_fetch: HttpFetchSettings::default(),
            mcp_servers: BTreeMap::new(),
        }
    }
}

/// One MCP server reached over streamable HTTP. Its tools reach the model
/// as functions named `<label>__<tool>`; calls are bounded by
/// `tools.timeout_ms` and capped by `tools.max_output_bytes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerSettings {
    /// The server's MCP endpoint (`http` or `https`).
    pub url: String,
    /// Headers sent with every request, e.g. `Authorization`; secrets, never logged.
    #[serde(default)]
    pub headers: BTreeMap<String, SecretString>,
    /// The only tools of the server a request may use; all of them when unset.
    #[serde(default)]
    pub allowed_tools: Option<Vec<String>>,
}

impl ToolSettings {
    /// Labels become tool-name prefixes, so they must be usable in a
    /// function name and unambiguous before the `__` separator.
    fn validate(&self) -> Result<(), ConfigError> {
        for (label, server) in &self.mcp_servers {
            let usable = !label.is_empty()
                && label.len() <= 32
                && !label.contains("__")
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !usable {
                return Err(ConfigError::Invalid(format!(
                    "tools.mcp_servers: the label '{label}' must be 1 to 32 letters, digits, '_' or '-', without '__'"
                )));
            }
            if !(server.url.starts_with("http://") || server.url.starts_with("https://")) {
                return Err(ConfigError::Invalid(format!(
                    "tools.mcp_servers.{label}.url must be an http or https URL"
                )));
            }
        }
        Ok(())
    }
}

/// The `http_fetch` tool: off by default. When on, it refuses private,
/// loopback, link-local and other non-public addresses unless the host is
/// allow-listed, follows no redirects, and caps size and time.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpFetchSettings {
    pub enabled: bool,
    /// Hosts (exact names or IP literals) that may resolve to non-public addresses.
    pub allow_hosts: Vec<String>,
    /// Bytes of a body read at most; the rest is cut with a marker.
    pub max_bytes: usize,
    pub timeout_ms: u64,
}

impl Default for HttpFetchSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            allow_hosts: Vec::new(),
            max_bytes: 64 * 1024,
            timeout_ms: 5_000,
        }
    }
}

/// Rate limits and quotas, checked by the api (`0` turns a limit off). The
/// per-key limit lives in each api process; the per-user request rate and
/// the daily token budget live in Redis and follow `redis_failure_policy`
/// while Redis is unreachable; the active-turn cap is counted on the primary.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Sustained requests per second one API key may make to one api
    /// process. Per process: a runaway client cannot starve a pod, whatever
    /// Redis does; the fleet-wide quota is the per-user one.
    pub key_requests_per_s: u32,
    /// Requests one API key may make at once, before the per-second rate applies.
    pub key_burst: u32,
    /// Sustained requests per second one user (all keys, all api
    /// processes) may make; a GCRA whose state is one Redis key per user.
    pub user_requests_per_s: u32,
    /// Requests one user may make at once across all processes.
    pub user_burst: u32,
    /// Turns (queued and in progress) one user may have at once; a
    /// `POST /v1/responses` past it gets a 429.
    pub active_turns_per_user: u32,
    /// Model tokens (`usage.total_tokens`) one user's turns may use per UTC
    /// day; once spent, `POST /v1/responses` gets a 429 until midnight UTC.
    pub daily_tokens_per_user: u64,
    /// Bytes of items (as stored) one user may keep in live conversations;
    /// a request that would add items past it gets a 403
    /// `storage_quota_exceeded`. Model and tool output of a running turn
    /// is stored regardless (the check comes before the turn).
    pub storage_bytes_per_user: u64,
    /// The largest item a client may send, as JSON; larger is a 413
    /// `item_too_large` naming it.
    pub max_item_bytes: usize,
    /// The most bytes of items one page of a list carries (fewer items,
    /// with `has_more`), so no answer grows with the items' size.
    pub max_page_bytes: usize,
    /// Event streams (SSE) one user may hold open at once on one api
    /// process; one more gets a 429. Counted in process: each pod bounds
    /// the connections and memory one user can tie up there.
    pub open_streams_per_user: u32,
    /// What the Redis-backed limits do while Redis is unreachable.
    pub redis_failure_policy: RedisFailurePolicy,
    /// After a Redis error, how long the Redis-backed limits apply the
    /// failure policy without asking Redis: a dead Redis then costs one
    /// timeout per period instead of one per request.
    pub redis_breaker_ms: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            key_requests_per_s: 5_000,
            key_burst: 10_000,
            user_requests_per_s: 10_000,
            user_burst: 20_000,
            active_turns_per_user: 256,
            daily_tokens_per_user: 10_000_000,
            open_streams_per_user: 64,
            max_item_bytes: 4 * 1024 * 1024,
            max_page_bytes: 4 * 1024 * 1024,
            storage_bytes_per_user: 10 * 1024 * 1024 * 1024,
            redis_failure_policy: RedisFailurePolicy::FailOpen,
            redis_breaker_ms: 1_000,
        }
    }
}

/// What a Redis-backed limit decides when Redis does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RedisFailurePolicy {
    /// Let the request through (only the in-process per-key limit applies):
    /// a Redis outage costs no availability.
    FailOpen,
    /// Refuse the request with 503 and `Retry-After`: no request escapes
    /// the per-user limits, at the price of availability.
    FailClosed,
}

/// Load shedding and workload isolation in the api: which routes' reads
/// are background work, and where the operators' kill switches live. The
/// per-node concurrency budgets are in [`DatabaseSettings`].
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OverloadSettings {
    /// Routes whose database work is `background`; every other route is
    /// `interactive`. Each entry is `METHOD /path/{param}` as the route is
    /// declared, a path alone (any method), or a prefix ending in `*`.
    pub background_routes: Vec<String>,
    /// The Redis hash holding the kill switches; changes are announced on
    /// the channel `<key>:changed`. Processes sharing it share switches.
    pub switches_key: String,
    /// How often each process re-reads the switches in case a change
    /// announcement was lost (a reconnect, a Redis failover).
    pub switch_refresh_ms: u64,
}

impl Default for OverloadSettings {
    fn default() -> Self {
        Self {
            background_routes: vec![
                "GET /v1/conversations".into(),
                "GET /v1/responses/{response_id}/input_items".into(),
                "/v1/admin/*".into(),
            ],
            switches_key: "tp:switches".into(),
            switch_refresh_ms: 1_000,
        }
    }
}

impl OverloadSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.switch_refresh_ms == 0 {
            return Err(ConfigError::Invalid(
                "overload.switch_refresh_ms must be at least 1".into(),
            ));
        }
        for route in &self.background_routes {
            crate::switches::RoutePattern::parse(route)
                .map_err(|e| ConfigError::Invalid(format!("overload.background_routes: {e}")))?;
        }
        Ok(())
    }
}

/// `turnpike mock-model`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MockSettings {
    pub host: String,
    pub port: u16,
    /// Delay before the first token of an answer, or before a tool call.
    pub ttft_ms: u64,
    /// Streaming speed; 0 streams as fast as possible.
    pub tokens_per_s: u64,
    /// Length of the deterministic answer to text without a directive.
    pub answer_tokens: usize,
}

impl Default for MockSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 15470,
            ttft_ms: 0,
            tokens_per_s: 0,
            answer_tokens: 24,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` for people, `json` for log pipelines.
    pub format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info,turnpike_core=debug`; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::is_origin;

    /// A stream sends a keep-alive comment only every `events.keepalive_ms`:
    /// at or above the idle timeout, a quiet stream would be closed as idle.
    #[test]
    fn a_keepalive_period_past_the_idle_timeout_is_refused() {
        let mut settings = super::Settings::default();
        settings.database.nodes.insert(
            "primary".into(),
            super::NodeSettings {
                role: super::NodeRole::Primary,
                url: "postgres://turnpike@127.0.0.1:5432/turnpike"
                    .to_owned()
                    .into(),
                pooled_url: Some(
                    "postgres://turnpike@127.0.0.1:6432/turnpike"
                        .to_owned()
                        .into(),
                ),
                group: super::NodeGroup::default(),
            },
        );
        assert!(settings.validate().is_ok());
        settings.events.keepalive_ms = settings.api.idle_timeout_ms;
        let refused = settings.validate().unwrap_err().to_string();
        assert!(refused.contains("events.keepalive_ms"), "{refused}");
    }

    #[test]
    fn cors_origins_are_origins_and_nothing_more() {
        for good in [
            "*",
            "https://app.example.com",
            "http://localhost:3000",
            "http://[::1]:8080",
        ] {
            assert!(is_origin(good), "{good}");
        }
        for bad in [
            "",
            "app.example.com",
            "https://",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://*.example.com",
            "ftp://files.example.com",
            "https://app.example.com ",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
    }
}
