//! Test harness: a real topology (Postgres primary + two streaming replicas,
//! a PgBouncer per node, Redis) booted by `scripts/dev` on free loopback
//! ports, and api instances started in process on port 0.
//!
//! `make test` boots one shared stack and exports `TURNPIKE_TEST_STACK`;
//! tests that only read and write their own tenant's data use it. Tests that
//! stop nodes, pause replay or count queries per node boot a private stack
//! ([`Stack::private`]), torn down when dropped.
// A harness fails loudly: panicking on a broken fixture is the right report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use serde_json::Value;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use tokio::sync::{OnceCell, oneshot};
use turnpike_core::Settings;
use turnpike_core::config::ConnectPath;

/// The Postgres nodes, as `scripts/dev` names them.
pub const NODES: [&str; 3] = ["primary", "replica1", "replica2"];
pub const REPLICAS: [&str; 2] = ["replica1", "replica2"];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A running topology.
pub struct Stack {
    pub dir: PathBuf,
    pub env: BTreeMap<String, String>,
    owned: bool,
    migrated: OnceCell<()>,
}

impl Stack {
    /// The stack `make test` booted, or a private one when run outside it.
    pub async fn shared() -> Arc<Stack> {
        match std::env::var("TURNPIKE_TEST_STACK") {
            Ok(dir) => {
                let stack = Stack::load(PathBuf::from(dir), false);
                // One migrator at a time across test processes: concurrent
                // migrators deadlock on CREATE INDEX CONCURRENTLY, as two
                // migration jobs would in production.
                let lock =
                    std::fs::File::create(stack.dir.join("migrate.lock")).expect("lock file");
                lock.lock().expect("take the migration lock");
                stack.migrate().await;
                drop(lock);
                Arc::new(stack)
            }
            Err(_) => Arc::new(Stack::private().await),
        }
    }

    /// Boots a fresh topology on free ports; dropping it stops and deletes it.
    pub async fn private() -> Stack {
        let mut last_error = String::new();
        for _ in 0..8 {
            let base = free_port_base();
            let dir =
                std::env::temp_dir().join(format!("turnpike-test-{}-{base}", std::process::id()));
            let output = tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || {
                    Command::new(repo_root().join("scripts/dev"))
                        .args(["up", "-d", "--infra"])
                        .env("TURNPIKE_DEV_DIR", &dir)
                        .env("TURNPIKE_DEV_PORT_BASE", base.to_string())
                        // A Redis restart is a Redis loss here (tests plant it).
                        .env("TURNPIKE_DEV_REDIS_APPENDONLY", "no")
                        .output()
                        .expect("run scripts/dev")
                }
            })
            .await
            .unwrap();
            if output.status.success() {
                let stack = Stack::load(dir, true);
                stack.migrate().await;
                return stack;
            }
            last_error = String::from_utf8_lossy(&output.stderr).into_owned();
            let _ = Command::new(repo_root().join("scripts/dev"))
                .args(["down", "--purge"])
                .env("TURNPIKE_DEV_DIR", &dir)
                .env("TURNPIKE_DEV_PORT_BASE", base.to_string())
                .output();
        }
        panic!("could not boot a test topology: {last_error}");
    }

    fn load(dir: PathBuf, owned: bool) -> Stack {
        let text = std::fs::read_to_string(dir.join("env"))
            .unwrap_or_else(|e| panic!("read {}/env: {e}", dir.display()));
        let env = text
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Stack {
            dir,
            env,
            owned,
            migrated: OnceCell::new(),
        }
    }

    async fn migrate(&self) {
        self.migrated
            .get_or_init(|| async {
                let settings = self.settings(Paths::DIRECT);
                turnpike_core::db::migrate::run(&settings.database)
                    .await
                    .expect("migrate the test stack");
                self.wait_replicated().await;
            })
            .await;
    }

    /// Waits until both replicas have replayed everything the primary has
    /// written so far (replication is asynchronous: a test that reads a
    /// replica right after a write must wait for this, as a client would
    /// with `consistency=session`).
    pub async fn wait_replicated(&self) {
        let primary = self.superuser("primary").await;
        let target: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8")
            .fetch_one(&primary)
            .await
            .unwrap();
        primary.close().await;
        for replica in REPLICAS {
            let pool = self.superuser(replica).await;
            eventually(
                &format!("{replica} to replay the primary's writes"),
                Duration::from_secs(30),
                || async {
                    let replayed: Option<i64> = sqlx::query_scalar(
                        "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8",
                    )
                    .fetch_one(&pool)
                    .await
                    .ok()
                    .flatten();
                    replayed.filter(|r| *r >= target).map(|_| ())
                },
            )
            .await;
            pool.close().await;
        }
    }

    /// Settings that point at this stack, with an api on port 0 and quick
    /// health checks, reaching nodes by `paths`.
    pub fn settings(&self, paths: Paths) -> Settings {
        let mut settings = Settings::default();
        for (key, value) in &self.env {
            let Some(rest) = key.strip_prefix("TURNPIKE__DATABASE__NODES__") else {
                continue;
            };
            let (node, field) = rest.split_once("__").unwrap();
            let node = node.to_lowercase();
            let entry = settings.database.nodes.entry(node).or_insert_with(|| {
                turnpike_core::config::NodeSettings {
                    role: turnpike_core::config::NodeRole::Replica,
                    url: String::new().into(),
                    pooled_url: None,
                    group: turnpike_core::config::NodeGroup::default(),
                }
            });
            match field {
                "ROLE" if value == "primary" => {
                    entry.role = turnpike_core::config::NodeRole::Primary;
                }
                "URL" => entry.url = value.clone().into(),
                "POOLED_URL" => entry.pooled_url = Some(value.clone().into()),
                _ => {}
            }
        }
        settings.redis.url = self.env["TURNPIKE__REDIS__URL"].clone().into();
        settings.api.port = 0;
        settings.api.shutdown_grace_ms = 1_000;
        settings.database.primary_path = paths.primary;
        settings.database.replica_path = paths.replica;
        settings.database.health_interval_ms = 100;
        settings.database.max_connections_per_node = 8;
        settings.log.filter = std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into());
        // A queue of its own: turns never reach another test's workers.
        settings.worker.queue = format!("tp:turns:test:{}", uuid::Uuid::now_v7().simple());
        settings.worker.block_ms = 200;
        settings.worker.heartbeat_ms = 500;
        settings.worker.reclaim_idle_ms = 3_000;
        settings.worker.concurrency = 16;
        settings.worker.shutdown_grace_ms = 2_000;
        // Tests share one database: a worker's reconciler would otherwise
        // run another test's deliberately queued turns. The reconciler's
        // own test runs on a topology of its own.
        settings.worker.stranded_after_ms = 600_000;
        settings.model.retry_base_ms = 10;
        // A turn that never ends shows up as a test failure in seconds.
        settings.api.response_wait_ms = 20_000;
        settings.mock.port = 0;
        settings
    }

    /// The direct port of a node.
    pub fn port(&self, node: &str) -> u16 {
        let base: u16 = self.env["TURNPIKE_DEV_PORT_BASE"].parse().unwrap();
        match node {
            "primary" => base,
            "replica1" => base + 1,
            "replica2" => base + 2,
            other => panic!("unknown node {other}"),
        }
    }

    /// The port of a node's PgBouncer.
    pub fn bouncer_port(&self, node: &str) -> u16 {
        self.port(node) + 10
    }

    /// A superuser pool straight to one node's `turnpike` database.
    pub async fn superuser(&self, node: &str) -> PgPool {
        PgPoolOptions::new()
            .max_connections(2)
            .connect(&format!(
                "postgres://postgres@127.0.0.1:{}/turnpike",
                self.port(node)
            ))
            .await
            .unwrap_or_else(|e| panic!("connect to {node} as superuser: {e}"))
    }

    /// `scripts/dev stop NODE` (`primary`, `replica1`, `replica2`, `redis`).
    pub async fn stop(&self, node: &str) {
        self.dev(&["stop", node]).await;
    }

    /// `scripts/dev start NODE`.
    pub async fn start(&self, node: &str) {
        self.dev(&["start", node]).await;
    }

    async fn dev(&self, args: &[&str]) {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let dir = self.dir.clone();
        let base = self.env["TURNPIKE_DEV_PORT_BASE"].clone();
        let output = tokio::task::spawn_blocking(move || {
            Command::new(repo_root().join("scripts/dev"))
                .args(&args)
                .env("TURNPIKE_DEV_DIR", &dir)
                .env("TURNPIKE_DEV_PORT_BASE", base)
                .env("TURNPIKE_DEV_REDIS_APPENDONLY", "no")
                .output()
                .expect("run scripts/dev")
        })
        .await
        .unwrap();
        assert!(
            output.status.success(),
            "scripts/dev failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Calls of statements whose text contains `pattern` on one node, from
    /// `pg_stat_statements` (which counts at once, on replicas too).
    pub async fn statement_calls(&self, node: &str, pattern: &str) -> i64 {
        let pool = self.superuser(node).await;
        let row = sqlx::query(
            "SELECT COALESCE(sum(calls), 0)::int8 FROM pg_stat_statements WHERE query LIKE '%' || $1 || '%'
             AND query NOT LIKE '%pg_stat_statements%'",
        )
        .bind(pattern)
        .fetch_one(&pool)
        .await
        .unwrap();
        pool.close().await;
        row.get(0)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new(repo_root().join("scripts/dev"))
            .args(["down", "--purge"])
            .env("TURNPIKE_DEV_DIR", &self.dir)
            .env(
                "TURNPIKE_DEV_PORT_BASE",
                self.env
                    .get("TURNPIKE_DEV_PORT_BASE")
                    .cloned()
                    .unwrap_or_default(),
            )
            .output();
    }
}

/// A port base whose topology ports (base+0..2, +10..12, +20) are free now.
fn free_port_base() -> u16 {
    loop {
        // Below the ephemeral port range (32768+) so no outgoing connection holds one.
        let base = 20_000 + (rand_u16() % 120) * 100;
        let ports = [0, 1, 2, 10, 11, 12, 20].map(|o| base + o);
        if ports
            .iter()
            .all(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        {
            return base;
        }
    }
}

fn rand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    ((nanos ^ std::process::id().wrapping_mul(2_654_435_761)) % 65_521) as u16
}

/// How the api reaches each node class.
#[derive(Debug, Clone, Copy)]
pub struct Paths {
    pub primary: ConnectPath,
    pub replica: ConnectPath,
}

impl Paths {
    pub const DIRECT: Paths = Paths {
        primary: ConnectPath::Direct,
        replica: ConnectPath::Direct,
    };
    pub const PGBOUNCER: Paths = Paths {
        primary: ConnectPath::Pgbouncer,
        replica: ConnectPath::Pgbouncer,
    };
}

/// A mock model and a worker running in this test process, on the
/// settings' private queue.
pub struct Agents {
    pub mock_url: String,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Agents {
    /// As [`Agents::spawn`] with a mock model that streams `tokens_per_s`
    /// tokens a second and answers with `answer_tokens` tokens: slow enough
    /// to act in the middle of an answer.
    pub async fn spawn_slow(
        settings: &mut Settings,
        tokens_per_s: u64,
        answer_tokens: usize,
    ) -> Agents {
        settings.mock.tokens_per_s = tokens_per_s;
        settings.mock.answer_tokens = answer_tokens;
        Self::spawn(settings).await
    }

    /// Starts the mock model, points `settings.model` at it, and starts one worker.
    pub async fn spawn(settings: &mut Settings) -> Agents {
        Self::spawn_configured(settings, |_, _| {}).await
    }

    /// As [`Agents::spawn`], letting `configure` change the settings once
    /// the mock model's URL (`…/v1`) is known and before the worker starts:
    /// for settings that point at the mock's other endpoints.
    pub async fn spawn_configured(
        settings: &mut Settings,
        configure: impl FnOnce(&mut Settings, &str),
    ) -> Agents {
        let mock = turnpike_mock_model::MockModel::build(settings.mock.clone())
            .await
            .expect("bind the mock model");
        let mock_url = format!("http://127.0.0.1:{}/v1", mock.port());
        settings.model.base_url = mock_url.clone();
        configure(settings, &mock_url);
        let (mock_stop, mock_stopped) = oneshot::channel::<()>();
        let mock_task = tokio::spawn(async move {
            let _ = mock
                .run_until(async move {
                    let _ = mock_stopped.await;
                })
                .await;
        });
        let mut agents = Agents {
            mock_url,
            stops: vec![mock_stop],
            tasks: vec![mock_task],
            workers: Vec::new(),
        };
        agents.add_worker(settings).await;
        agents
    }

    /// Workers only, on `settings` as they are (their model provider
    /// included): for tests that bring their own provider.
    pub async fn workers(settings: &Settings) -> Agents {
        // `stop_workers` takes the first stop to be the mock model's.
        let (placeholder, _) = oneshot::channel::<()>();
        let mut agents = Agents {
            mock_url: String::new(),
            stops: vec![placeholder],
            tasks: Vec::new(),
            workers: Vec::new(),
        };
        agents.add_worker(settings).await;
        agents
    }

    /// The mock model's latest requests made with `prompt_cache_key`
    /// (a conversation id), oldest first.
    pub async fn model_requests(&self, prompt_cache_key: &str) -> Vec<Value> {
        let body: Value = reqwest::get(format!(
            "{}/mock/requests?prompt_cache_key={prompt_cache_key}",
            self.mock_url
        ))
        .await
        .expect("ask the mock model")
        .json()
        .await
        .expect("the mock's request log");
        body["data"].as_array().cloned().unwrap_or_default()
    }

    /// Starts one more worker.
    pub async fn add_worker(&mut self, settings: &Settings) {
        let worker = turnpike_worker::Worker::build(settings.clone())
            .await
            .expect("build a worker");
        let (stop, stopped) = oneshot::channel::<()>();
        self.workers.push(tokio::spawn(async move {
            worker
                .run_until(async move {
                    let _ = stopped.await;
                })
                .await;
        }));
        self.stops.push(stop);
    }

    /// Asks every worker to stop, as SIGTERM does, and waits for them.
    pub async fn stop_workers(&mut self) {
        // The mock model's stop is the first; the workers' follow.
        for stop in self.stops.drain(1..) {
            let _ = stop.send(());
        }
        for worker in self.workers.drain(..) {
            let _ = worker.await;
        }
    }

    /// Kills every worker at once, as SIGKILL would: running turns stop
    /// mid-stream, unacknowledged, and their heartbeats stop.
    pub fn kill_workers(&mut self) {
        for worker in self.workers.drain(..) {
            worker.abort();
        }
    }

    /// Stops everything and waits for it.
    pub async fn shutdown(mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for task in self.tasks.drain(..).chain(self.workers.drain(..)) {
            let _ = task.await;
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for task in self.tasks.iter().chain(&self.workers) {
            task.abort();
        }
    }
}

/// A model provider that plays recorded transcripts: each request, to
/// `/responses` or `/chat/completions`, gets the next transcript's body as
/// the provider sent it (SSE); a request past the last one gets a 500.
/// Every request's body is kept for the test to read.
pub struct Replay {
    /// The provider's base URL (`…/v1`).
    pub url: String,
    requests: Arc<std::sync::Mutex<Vec<Value>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Replay {
    pub async fn start(transcripts: Vec<String>) -> Replay {
        use axum::response::IntoResponse;
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let queue = Arc::new(std::sync::Mutex::new(
            transcripts
                .into_iter()
                .collect::<std::collections::VecDeque<_>>(),
        ));
        let log = requests.clone();
        let answer = move |body: axum::Json<Value>| {
            let log = log.clone();
            let queue = queue.clone();
            async move {
                log.lock().unwrap().push(body.0);
                match queue.lock().unwrap().pop_front() {
                    Some(transcript) => (
                        [(axum::http::header::CONTENT_TYPE, "text/event-stream")],
                        transcript,
                    )
                        .into_response(),
                    None => (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        axum::Json(
                            serde_json::json!({"error": {"message": "no more transcripts",
                            "type": "server_error", "code": "server_error", "param": null}}),
                        ),
                    )
                        .into_response(),
                }
            }
        };
        let app = axum::Router::new()
            .route("/v1/responses", axum::routing::post(answer.clone()))
            .route("/v1/chat/completions", axum::routing::post(answer));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Replay {
            url,
            requests,
            task,
        }
    }

    /// The request bodies received so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An api instance running in this test process.
pub struct TestApp {
    pub url: String,
    pub http: reqwest::Client,
    pub settings: Settings,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestApp {
    /// Starts an api against `stack` on a free port.
    pub async fn spawn(stack: &Stack, paths: Paths) -> TestApp {
        Self::spawn_with(stack.settings(paths)).await
    }

    /// Starts an api, a mock model and a worker sharing one private queue.
    pub async fn spawn_with_agents(stack: &Stack, paths: Paths) -> (TestApp, Agents) {
        let mut settings = stack.settings(paths);
        let agents = Agents::spawn(&mut settings).await;
        (TestApp::spawn_with(settings).await, agents)
    }

    /// Starts an api with the given settings.
    pub async fn spawn_with(settings: Settings) -> TestApp {
        turnpike_core::telemetry::init(&settings.log, "turnpike-test");
        let app = turnpike_api::Application::build(settings.clone())
            .await
            .expect("build the api");
        let url = format!("http://127.0.0.1:{}", app.port());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = app
                .run_until(async move {
                    let _ = stopped.await;
                })
                .await;
        });
        TestApp {
            url,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
            settings,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops serving and waits for the server to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// What the api's `/metrics` serves now, in Prometheus' text format.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("the metrics' text")
    }

    /// A new user with a fresh key.
    pub async fn new_user(&self) -> User {
        self.new_key(false).await
    }

    /// A new admin user.
    pub async fn new_admin(&self) -> User {
        self.new_key(true).await
    }

    async fn new_key(&self, admin: bool) -> User {
        let router = turnpike_core::db::Router::new(&self.settings.database).unwrap();
        let name = format!("user-{}", uuid::Uuid::now_v7().simple());
        let mut tx = router.write().await.expect("primary");
        let key = turnpike_core::auth::create_key(&mut tx, &name, admin)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        User {
            key: key.secret,
            name,
            base: self.url.clone(),
            http: self.http.clone(),
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A caller with a key, speaking HTTP to one api.
#[derive(Clone)]
pub struct User {
    pub key: String,
    pub name: String,
    pub base: String,
    pub http: reqwest::Client,
}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The `Turnpike-Consistency` token of a write.
    pub fn token(&self) -> Option<String> {
        self.headers
            .get("turnpike-consistency")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Asserts the status and returns the body.
    #[track_caller]
    pub fn ok(&self) -> &Value {
        assert!(
            (200..300).contains(&self.status),
            "expected success, got {}: {}",
            self.status,
            self.body
        );
        &self.body
    }

    /// Asserts an error in the one error shape with this status.
    #[track_caller]
    pub fn error(&self, status: u16) -> &Value {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.body
        );
        let error = &self.body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "no message: {}",
            self.body
        );
        assert!(error["type"].is_string(), "no type: {}", self.body);
        assert!(
            error.get("param").is_some() && error.get("code").is_some(),
            "shape: {}",
            self.body
        );
        error
    }
}

impl User {
    /// Sends a request with this user's key; `body` is sent as JSON when given.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Reply {
        self.call_with(method, path, body, &[]).await
    }

    /// As [`User::call`] with extra headers.
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(
                AUTHORIZATION,
                HeaderValue::from_str(&format!("Bearer {}", self.key)).unwrap(),
            );
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("send request");
        read_reply(response).await
    }

    /// Same user, another api instance.
    pub fn on(&self, app: &TestApp) -> User {
        User {
            base: app.url.clone(),
            http: app.http.clone(),
            ..self.clone()
        }
    }

    pub async fn create_conversation(&self, body: Value) -> Reply {
        self.call("POST", "/v1/conversations", Some(body)).await
    }

    /// Creates a conversation holding `items` and returns its id.
    pub async fn new_conversation(&self, items: Value) -> String {
        self.create_conversation(serde_json::json!({ "items": items }))
            .await
            .ok()["id"]
            .as_str()
            .expect("a conversation id")
            .to_owned()
    }

    pub async fn add_items(&self, conversation: &str, items: Value) -> Reply {
        self.call(
            "POST",
            &format!("/v1/conversations/{conversation}/items"),
            Some(serde_json::json!({ "items": items })),
        )
        .await
    }

    pub async fn list_items(&self, conversation: &str, query: &str) -> Reply {
        self.call(
            "GET",
            &format!("/v1/conversations/{conversation}/items{query}"),
            None,
        )
        .await
    }
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: Value,
}

/// Checks that a response's stream shows exactly what was stored: its
/// sequence numbers unbroken, each output item announced once (under its
/// stored id) and done once (as stored), and each item's text deltas adding
/// up to its stored text — nothing lost, nothing repeated.
pub fn assert_stream_matches(events: &[SseEvent], output: &[Value]) {
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.data["sequence_number"], i as u64, "{:?}", event.data);
    }
    let of_type = |kind: &str| -> Vec<&Value> {
        events
            .iter()
            .map(|e| &e.data)
            .filter(|e| e["type"] == kind)
            .collect()
    };
    let added = of_type("response.output_item.added");
    let done = of_type("response.output_item.done");
    assert_eq!(added.len(), output.len(), "announced: {added:?}");
    assert_eq!(done.len(), output.len(), "done: {done:?}");
    let deltas = of_type("response.output_text.delta");
    for (index, item) in output.iter().enumerate() {
        assert_eq!(added[index]["item"]["id"], item["id"]);
        assert_eq!(added[index]["output_index"], index as u64);
        assert_eq!(done[index]["item"], *item);
        if item["type"] == "message" {
            let streamed: String = deltas
                .iter()
                .filter(|d| d["item_id"] == item["id"])
                .filter_map(|d| d["delta"].as_str())
                .collect();
            let stored: String = item["content"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|part| part["text"].as_str())
                .collect();
            assert_eq!(streamed, stored, "item {index}");
        }
    }
}

/// Parses a whole SSE body (comments and keepalives skipped).
pub fn parse_sse(text: &str) -> Vec<SseEvent> {
    text.split("\n\n")
        .filter_map(|block| {
            let (mut event, mut id, mut data) = (None, None, String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            (!data.is_empty()).then(|| SseEvent {
                event,
                id,
                data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
            })
        })
        .collect()
}

/// An event stream being read as it arrives.
pub struct LiveStream {
    response: reqwest::Response,
    /// Everything received so far.
    pub body: String,
}

impl LiveStream {
    /// Reads until the received text contains `needle` `count` times.
    pub async fn read_until(&mut self, needle: &str, count: usize) {
        while self.body.matches(needle).count() < count {
            let chunk = tokio::time::timeout(Duration::from_secs(20), self.response.chunk())
                .await
                .expect("the stream went quiet for 20 s")
                .expect("read the stream")
                .expect("the stream ended early");
            self.body.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Reads to the end and parses every event received.
    pub async fn read_to_end(mut self) -> Vec<SseEvent> {
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), self.response.chunk())
            .await
            .expect("the stream ended within 30 s")
            .expect("read the stream")
        {
            self.body.push_str(&String::from_utf8_lossy(&chunk));
        }
        parse_sse(&self.body)
    }

    /// The whole events received so far (a cut-off last one is left out).
    pub fn events_so_far(&self) -> Vec<SseEvent> {
        parse_sse(&self.body[..self.body.rfind("\n\n").map_or(0, |i| i + 2)])
    }
}

impl User {
    /// Opens an event stream to read as it arrives.
    pub async fn open_stream(&self, method: &str, path: &str, body: Option<Value>) -> LiveStream {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(AUTHORIZATION, format!("Bearer {}", self.key));
        if let Some(body) = body {
            request = request.json(&body);
        }
        LiveStream {
            response: request.send().await.expect("send request"),
            body: String::new(),
        }
    }

    /// Creates a background response and returns its id.
    pub async fn create_background(&self, body: Value) -> String {
        let mut body = body;
        body["background"] = Value::Bool(true);
        let created = self.call("POST", "/v1/responses", Some(body)).await;
        created.ok()["id"]
            .as_str()
            .expect("a response id")
            .to_owned()
    }

    /// Opens a response's event stream and reads it until the model has
    /// started answering (the first text delta).
    pub async fn follow_until_answering(&self, response: &str) -> LiveStream {
        let mut stream = self
            .open_stream(
                "GET",
                &format!("/v1/responses/{response}?stream=true"),
                None,
            )
            .await;
        stream.read_until("response.output_text.delta", 1).await;
        stream
    }

    /// Sends a request answered with an event stream and reads it to its end.
    pub async fn stream(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Vec<SseEvent>) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(AUTHORIZATION, format!("Bearer {}", self.key));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("send request");
        let status = response.status().as_u16();
        let text = tokio::time::timeout(Duration::from_secs(60), response.text())
            .await
            .expect("the stream ended within 60 s")
            .expect("read the stream");
        (status, parse_sse(&text))
    }
}

/// Sends a raw request (no key unless given in `headers`) and reads the reply.
pub async fn raw(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Reply {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = http.request(method, url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(body) = body {
        request = request.body(body);
    }
    read_reply(request.send().await.expect("send request")).await
}

async fn read_reply(response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("read body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// Polls `check` every few milliseconds until it returns `Some`, or panics
/// with `what` after `timeout`. For conditions no event announces (a
/// replica's state, a counter settling).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `turnpike` process (the real binary, as deployed), for faults that
/// only a process shows: SIGKILL mid-stream. `make test` builds the binary
/// and names it in `TURNPIKE_BIN`; otherwise `target/debug/turnpike` is used.
pub struct Process {
    child: tokio::process::Child,
    /// `http://127.0.0.1:<port>` for an api.
    pub url: String,
    /// Where its output goes, when kept.
    log: Option<PathBuf>,
}

impl Process {
    fn binary() -> PathBuf {
        std::env::var("TURNPIKE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join("target/debug/turnpike"))
    }

    /// The environment that gives a process `settings` (the parts tests vary).
    fn env(stack: &Stack, settings: &Settings) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = stack
            .env
            .iter()
            .filter(|(k, _)| {
                k.starts_with("TURNPIKE__DATABASE__") || k.as_str() == "TURNPIKE__REDIS__URL"
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let path = |p: ConnectPath| match p {
            ConnectPath::Direct => "direct",
            ConnectPath::Pgbouncer => "pgbouncer",
        };
        for (key, value) in [
            (
                "DATABASE__PRIMARY_PATH",
                path(settings.database.primary_path).to_owned(),
            ),
            (
                "DATABASE__REPLICA_PATH",
                path(settings.database.replica_path).to_owned(),
            ),
            (
                "DATABASE__HEALTH_INTERVAL_MS",
                settings.database.health_interval_ms.to_string(),
            ),
            ("WORKER__QUEUE", settings.worker.queue.clone()),
            ("WORKER__BLOCK_MS", settings.worker.block_ms.to_string()),
            (
                "WORKER__HEARTBEAT_MS",
                settings.worker.heartbeat_ms.to_string(),
            ),
            (
                "WORKER__RECLAIM_IDLE_MS",
                settings.worker.reclaim_idle_ms.to_string(),
            ),
            // As in-process workers: not another test's queued turns.
            (
                "WORKER__STRANDED_AFTER_MS",
                settings.worker.stranded_after_ms.to_string(),
            ),
            ("MODEL__BASE_URL", settings.model.base_url.clone()),
            (
                "MODEL__RETRY_BASE_MS",
                settings.model.retry_base_ms.to_string(),
            ),
            ("LOG__FILTER", settings.log.filter.clone()),
        ] {
            env.push((format!("TURNPIKE__{key}"), value));
        }
        env
    }

    fn spawn(stack: &Stack, settings: &Settings, command: &str, port: u16) -> Process {
        Self::spawn_with(stack, settings, command, port, &[])
    }

    fn spawn_with(
        stack: &Stack,
        settings: &Settings,
        command: &str,
        port: u16,
        extra: &[(String, String)],
    ) -> Process {
        let binary = Self::binary();
        let child = tokio::process::Command::new(&binary)
            .arg(command)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(Self::env(stack, settings))
            .envs(extra.iter().cloned())
            .env("TURNPIKE__API__PORT", port.to_string())
            .env("TURNPIKE_CONFIG", "/nonexistent/turnpike.toml")
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} {command}: {e}", binary.display()));
        Process {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log: None,
        }
    }

    /// Starts `turnpike worker` with `extra` environment on top of
    /// `settings`, its output (logs included) kept for [`Process::output`].
    pub fn worker_logged(
        stack: &Stack,
        settings: &Settings,
        extra: &[(String, String)],
    ) -> Process {
        let binary = Self::binary();
        let log = std::env::temp_dir().join(format!(
            "turnpike-worker-{}-{}.log",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        let file = std::fs::File::create(&log).expect("create the worker's log file");
        let child = tokio::process::Command::new(&binary)
            .arg("worker")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(Self::env(stack, settings))
            .envs(extra.iter().cloned())
            .env("TURNPIKE_CONFIG", "/nonexistent/turnpike.toml")
            .stdout(std::process::Stdio::from(
                file.try_clone().expect("clone the log file"),
            ))
            .stderr(std::process::Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} worker: {e}", binary.display()));
        Process {
            child,
            url: String::new(),
            log: Some(log),
        }
    }

    /// Everything the process has written so far (for a process started
    /// with its output kept).
    pub fn output(&self) -> String {
        self.log
            .as_ref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .unwrap_or_default()
    }

    /// Starts `turnpike api` on a free port and waits until it is ready.
    pub async fn api(stack: &Stack, settings: &Settings) -> Process {
        Self::api_with(stack, settings, &[]).await
    }

    /// `api`, with `extra` environment on top of `settings`.
    pub async fn api_with(
        stack: &Stack,
        settings: &Settings,
        extra: &[(String, String)],
    ) -> Process {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let process = Self::spawn_with(stack, settings, "api", port, extra);
        let http = reqwest::Client::new();
        let ready = format!("{}/readyz", process.url);
        eventually(
            "the api process to be ready",
            Duration::from_secs(30),
            || {
                let http = http.clone();
                let ready = ready.clone();
                async move {
                    let response = http.get(&ready).send().await.ok()?;
                    response.status().is_success().then_some(())
                }
            },
        )
        .await;
        process
    }

    /// Starts `turnpike worker`.
    pub fn worker(stack: &Stack, settings: &Settings) -> Process {
        Self::spawn(stack, settings, "worker", 0)
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// `user`, speaking to this api process.
    pub fn user(&self, user: &User) -> User {
        User {
            base: self.url.clone(),
            http: reqwest::Client::new(),
            ..user.clone()
        }
    }
}
