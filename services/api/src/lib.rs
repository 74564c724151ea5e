//! The stateless HTTP API. Each feature module owns its routes; they are
//! merged here, behind one error edge, a body limit, the rate limits and
//! the idempotency layer. [`Application::build`] binds the listener first,
//! so tests can ask for port 0 and read the real port.

pub mod admin;
mod body;
pub mod chat;
pub mod conversations;
pub mod error;
pub mod events;
pub mod extract;
pub mod health;
pub mod idempotency;
pub mod ids;
pub mod items;
pub mod limits;
pub mod openapi;
pub mod responses;
pub mod shed;
pub mod stored_json;
pub mod web;

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRequestParts, OriginalUri};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use turnpike_core::Settings;
use turnpike_core::auth::{Authenticator, Principal};
use turnpike_core::cache::Cache;
use turnpike_core::config::ConfigError;
use turnpike_core::db::{Consistency, Lsn, Router};
use turnpike_core::events::Hub;
use turnpike_core::kv::{Kv, KvError};
use turnpike_core::last_write::LastWrites;
use turnpike_core::switches::Switches;

use crate::error::ApiError;
use crate::extract::{CONSISTENCY_HEADER, ReadConsistency, ReadMode};

/// Shared state of one api process.
#[derive(Clone)]
pub struct AppState(Arc<AppInner>);

pub struct AppInner {
    pub settings: Settings,
    pub router: Arc<Router>,
    pub auth: Authenticator,
    pub last_writes: LastWrites,
    pub kv: Kv,
    pub hub: Hub,
    pub cache: Cache,
    pub limits: limits::Limits,
    /// The operators' kill switches in force.
    pub switches: Switches,
    /// Which routes are background work.
    pub classes: shed::RouteClasses,
}

impl Deref for AppState {
    type Target = AppInner;

    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl AppState {
    /// Builds the state: pools (lazy), Redis pool (lazy), caches, and the
    /// router's health monitor.
    pub async fn new(settings: Settings) -> Result<Self, StartError> {
        // Installs the metrics recorder before anything records.
        turnpike_core::telemetry::metrics();
        let router = Router::new(&settings.database)?;
        router.spawn_monitor().await;
        let kv = Kv::new(&settings.redis)?;
        let auth = Authenticator::new(
            Arc::clone(&router),
            Duration::from_millis(settings.api.auth_cache_ttl_ms),
            Some(kv.clone()),
            settings.api.key_lookups_per_s,
        );
        let last_writes = LastWrites::new(
            kv.clone(),
            Duration::from_millis(settings.database.last_write_window_ms),
        );
        let hub = Hub::start(settings.redis.url())?;
        let cache = Cache::start(settings.cache.clone(), kv.clone(), settings.redis.url())?;
        let limits = limits::Limits::new(
            &settings.limits,
            kv.clone(),
            Duration::from_millis(settings.redis.timeout_ms),
        );
        let switches =
            Switches::start(kv.clone(), settings.redis.url(), &settings.overload).await?;
        let classes = shed::RouteClasses::new(&settings.overload)?;
        Ok(Self(Arc::new(AppInner {
            settings,
            router,
            auth,
            last_writes,
            kv,
            hub,
            cache,
            limits,
            switches,
            classes,
        })))
    }

    /// Resolves a read's consistency. `session` without a token uses the
    /// caller's last write within the window.
    pub async fn consistency(&self, principal: &Principal, read: ReadConsistency) -> Consistency {
        match read.mode {
            ReadMode::Eventual => Consistency::Eventual,
            ReadMode::Bounded => Consistency::Bounded,
            ReadMode::Strong => Consistency::Strong,
            ReadMode::Session => match read.token {
                Some(token) => Consistency::Session(Some(token)),
                // Boxed: the Redis call's state would weigh on every read's future.
                None => {
                    Consistency::Session(Box::pin(self.last_writes.get(principal.user_id)).await)
                }
            },
        }
    }

    /// Records a committed write for the caller's session window.
    pub async fn wrote(&self, principal: &Principal, lsn: Lsn) {
        self.last_writes.record(principal.user_id, lsn).await;
    }

    /// A read of something in `conversation` through the cache: `field`
    /// names the answer (with everything it depends on, the caller
    /// included), `load` reads it with the consistency it is given and
    /// answers `None` for "not found". Strong reads bypass the cache.
    pub async fn cached<F, Fut>(
        &self,
        conversation: uuid::Uuid,
        field: &str,
        consistency: Consistency,
        load: F,
    ) -> Result<Option<bytes::Bytes>, ApiError>
    where
        F: FnOnce(Consistency) -> Fut + Send,
        Fut: Future<Output = Result<Option<bytes::Bytes>, turnpike_core::db::DbError>> + Send,
    {
        if consistency == Consistency::Strong {
            // Boxed, as the cache's own loads are: the query's state would
            // otherwise be copied whole with every cached read's future.
            return Ok(Box::pin(load(consistency)).await?);
        }
        let session = match consistency {
            Consistency::Session(token) => token,
            _ => None,
        };
        let lookup = turnpike_core::cache::Lookup {
            conversation,
            field,
            session,
        };
        let entry = self
            .cache
            .get(lookup, move |floor: Lsn| {
                // A fill reads at least what the conversation's last write
                // left, whatever the caller asked for.
                let at = match consistency {
                    Consistency::Session(token) => {
                        Consistency::Session(Some(token.unwrap_or_default().max(floor)))
                    }
                    _ if floor > Lsn(0) => Consistency::Session(Some(floor)),
                    other => other,
                };
                load(at)
            })
            .await
            .map_err(|shared| match std::sync::Arc::try_unwrap(shared) {
                Ok(e) => ApiError::from(e),
                Err(shared) if shared.is_retryable() => ApiError::unavailable(
                    "The database is temporarily unavailable. Retry shortly.",
                    1,
                ),
                Err(shared) => ApiError::internal(&shared),
            })?;
        Ok(entry.body.clone())
    }

    /// A committed write by the caller that changed `conversation`: the
    /// caller's session window records it and the conversation's cached
    /// answers go (here at once, in every other process through Redis),
    /// both before the write is answered, in parallel (different keys).
    pub async fn wrote_to(&self, principal: &Principal, conversation: uuid::Uuid, lsn: Lsn) {
        tokio::join!(
            self.last_writes.record(principal.user_id, lsn),
            self.cache.invalidate(conversation, lsn),
        );
    }

    /// Commits `tx`, a write by the caller that changed `conversation`,
    /// and has the caller's session window and the conversation's caches
    /// learn of it ([`AppState::wrote_to`]), past the caller's cancellation
    /// ([`past_the_commit`]).
    pub(crate) async fn commit_and_record(
        &self,
        principal: &Principal,
        conversation: uuid::Uuid,
        tx: turnpike_core::db::Writer,
    ) -> Result<Lsn, turnpike_core::db::DbError> {
        let (app, principal) = (self.clone(), *principal);
        past_the_commit(async move {
            let lsn = tx.commit().await?;
            app.wrote_to(&principal, conversation, lsn).await;
            Ok(lsn)
        })
        .await
    }
}

/// Runs `work` (a commit and what must follow it) on a task of its own,
/// and waits for it. Once a commit is on the wire its write may stand:
/// what follows it (a turn queued, the caches' invalidation) runs whether
/// or not the caller stays to hear the answer. Dropped with a client that
/// went away, a committed turn would wait for the reconciler
/// (`worker.stranded_after_ms`) to be queued, and a cached answer the write
/// changed would be served until it expired.
pub(crate) async fn past_the_commit<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    use tracing::Instrument;
    match tokio::spawn(work.instrument(tracing::Span::current())).await {
        Ok(done) => done,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Why the api could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Redis(#[from] KvError),
    /// The address is taken or not ours.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// A write's answer: the body plus the `Turnpike-Consistency` token.
pub fn written<T: Serialize>(lsn: Lsn, status: StatusCode, body: &T) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&lsn.to_string()) {
        response.headers_mut().insert(CONSISTENCY_HEADER, value);
    }
    response
}

/// Path parameters, with rejections in the error shape.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| {
                ApiError::with_status(StatusCode::BAD_REQUEST, e.body_text(), "invalid_path")
            })
    }
}

/// Every route, merged, with the shared layers.
pub fn routes(state: AppState) -> axum::Router {
    let cors = cors(&state.settings.api.cors_allowed_origins);
    let router = axum::Router::new()
        .merge(conversations::router())
        .merge(items::router())
        .merge(responses::router())
        .merge(chat::router())
        .merge(admin::router())
        .merge(health::router(state.settings.api.metrics_port == 0))
        .merge(openapi::router())
        .merge(web::router())
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        // One layer of two (outermost first): `Router::layer` wraps each
        // route in a box of its own per layer, which every request then
        // allocates, copies its future into, and clones the route for.
        .layer(
            tower::ServiceBuilder::new()
                .layer(tower_http::catch_panic::CatchPanicLayer::custom(on_panic))
                .layer(EdgeLayer(state.clone())),
        )
        .with_state(state);
    // Outermost: a browser's preflight is answered before the edge (it
    // carries no key), and every answer, errors included, is readable.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// CORS for the configured origins (`*`: any), or none. Requests carry
/// their key in `Authorization`, never in cookies, so no credentials are
/// allowed; preflights are answered with the headers the page asks for
/// (a wildcard would not cover `Authorization`), and a page can read the
/// rate-limit state, `Retry-After`, the consistency token and whether an
/// answer was an idempotent replay.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // As a browser sends it: lowercase, without the scheme's default port.
        AllowOrigin::list(origins.iter().filter_map(|origin| {
            let origin = origin.to_ascii_lowercase();
            let origin = origin
                .strip_suffix(":443")
                .filter(|o| o.starts_with("https://"))
                .or_else(|| {
                    origin
                        .strip_suffix(":80")
                        .filter(|o| o.starts_with("http://"))
                })
                .unwrap_or(&origin);
            HeaderValue::from_str(origin).ok()
        }))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                axum::http::Method::GET,
                axum::http::Method::POST,
                axum::http::Method::DELETE,
            ])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([
                crate::limits::POLICY_HEADER,
                crate::limits::STATE_HEADER,
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderName::from_static(CONSISTENCY_HEADER),
                axum::http::HeaderName::from_static("idempotent-replayed"),
            ])
            .max_age(Duration::from_secs(3600)),
    )
}

/// Per-route request counts and latencies, labelled by the route's
/// template (a bounded set; `-` for no route), method and status class,
/// around `next`: every answer is counted, refusals by the edge included.
async fn http_metrics<F, Fut>(
    matched: Option<&axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: F,
) -> Response
where
    F: FnOnce(axum::extract::Request) -> Fut,
    Fut: Future<Output = Response>,
{
    use tracing::Instrument;
    let route = matched.map_or("-", axum::extract::MatchedPath::as_str);
    let method = method_label(request.method());
    let started = std::time::Instant::now();
    // The request's span (a trace's root, or a child of the caller's
    // `traceparent`); its trace id goes into the log lines inside it.
    // Without traces it is a debug span: at the default log level it then
    // costs nothing, where formatting its fields for the log took about an
    // eighth of the api's CPU on a cached read.
    let span = if turnpike_core::telemetry::traces_exported() {
        // A method OpenTelemetry does not know is `_OTHER`, with the
        // method as sent beside it, and names no span.
        let other = method == "_OTHER";
        let name = format!("{} {route}", if other { "HTTP" } else { method });
        let span = tracing::info_span!("request", otel.name = %name,
            http.request.method = %method, http.route = %route, trace_id = tracing::field::Empty,
            http.request.method_original = tracing::field::Empty);
        if other {
            span.record("http.request.method_original", request.method().as_str());
        }
        span
    } else {
        tracing::debug_span!("request", http.request.method = %request.method(), http.route = %route)
    };
    turnpike_core::telemetry::continue_trace(
        &span,
        request
            .headers()
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
    );
    let response = next(request).instrument(span).await;
    let class = match response.status().as_u16() / 100 {
        1 => 0,
        2 => 1,
        3 => 2,
        4 => 3,
        _ => 4,
    };
    let handles = route_metrics(route, method);
    turnpike_core::telemetry::kept(&handles.requests[class], || {
        metrics::counter!("turnpike_http_requests_total", "route" => route.to_owned(),
            "method" => method, "status" => STATUS_CLASSES[class])
    })
    .increment(1);
    turnpike_core::telemetry::kept(&handles.duration, || {
        metrics::histogram!("turnpike_http_request_duration_seconds",
            "route" => route.to_owned(), "method" => method)
    })
    .record(started.elapsed().as_secs_f64());
    response
}

/// A request's method as a metric label: the standard methods by name and
/// any other as `_OTHER` (as OpenTelemetry names it), so that made-up methods cannot grow the series
/// (or the table of their handles) without bound.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// The W3C trace context header, as a name (a `&str` is parsed per look-up).
static TRACEPARENT: axum::http::HeaderName = axum::http::HeaderName::from_static("traceparent");

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A route's request counters (one per status class) and latency
/// histogram, each registered when first recorded.
#[derive(Default)]
struct RouteMetrics {
    requests: [std::sync::OnceLock<metrics::Counter>; 5],
    duration: std::sync::OnceLock<metrics::Histogram>,
}

/// The handles of `route` and `method`, registered once: registering
/// builds the labels and hashes them into the registry on every call, more
/// than a cached read spends on anything else of its own.
fn route_metrics(route: &str, method: &'static str) -> std::sync::Arc<RouteMetrics> {
    use std::collections::HashMap;
    use std::sync::{Arc, LazyLock, PoisonError, RwLock};
    // foldhash, seeded per process: the keys are the routes' templates and
    // the method labels, a bounded set, and SipHash over them was a
    // measurable part of a cached read.
    type Methods = HashMap<&'static str, Arc<RouteMetrics>, foldhash::fast::RandomState>;
    type Table = RwLock<HashMap<String, Methods, foldhash::fast::RandomState>>;
    static TABLE: LazyLock<Table> = LazyLock::new(Table::default);
    if let Some(found) = TABLE
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(route)
        .and_then(|methods| methods.get(method))
    {
        return Arc::clone(found);
    }
    let made = Arc::new(RouteMetrics::default());
    Arc::clone(
        TABLE
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(route.to_owned())
            .or_default()
            .entry(method)
            .or_insert(made),
    )
}

/// What every request passes before its route's handler, in order: its
/// metrics and span ([`http_metrics`]); its body ([`body::guard`]: one
/// declared over the limit is refused before any of it is read, any other
/// is cut off past the limit, or once it is late);
/// kill switches and load shedding
/// ([`shed`]); rate limits ([`limits`]); idempotency keys
/// ([`idempotency`]). One layer, not five, and a tower service of its own
/// rather than `axum::middleware::from_fn`, which per request also boxes
/// the route behind it again and runs extractors for its state and route:
/// a cached read's own work is a few microseconds, and each of those was a
/// measurable part of it.
#[derive(Clone)]
struct EdgeLayer(AppState);

impl<S> tower::Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            app: self.0.clone(),
            inner,
        }
    }
}

/// [`EdgeLayer`] around one route.
#[derive(Clone)]
struct Edge<S> {
    app: AppState,
    inner: S,
}

impl<S> tower::Service<axum::extract::Request> for Edge<S>
where
    S: tower::Service<
            axum::extract::Request,
            Response = Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        // The service polled ready goes with the request; a clone stays.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        // Boxed as it is, not inside another `async` block: a future is
        // copied whole into its box, and every layer that holds the one
        // inside it makes every request copy it once more.
        Box::pin(edge(self.app.clone(), request, inner))
    }
}

async fn edge<S>(
    app: AppState,
    request: axum::extract::Request,
    mut inner: S,
) -> Result<Response, std::convert::Infallible>
where
    S: tower::Service<
            axum::extract::Request,
            Response = Response,
            Error = std::convert::Infallible,
        >,
{
    let matched = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let app = &app;
    let response = http_metrics(matched.as_ref(), request, move |request| async move {
        let request = match body::guard(request, &app.settings.api) {
            Ok(request) => request,
            Err(refusal) => return refusal.into_response(),
        };
        shed::around(app, request, move |request| {
            limits::around(app, request, move |request| {
                idempotency::around(app, request, move |request| async move {
                    match inner.call(request).await {
                        Ok(response) => response,
                        Err(never) => match never {},
                    }
                })
            })
        })
        .await
    })
    .await;
    Ok(response)
}

async fn no_route(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

async fn wrong_method(method: Method, OriginalUri(uri): OriginalUri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}

fn on_panic(cause: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = cause
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| cause.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    ApiError::internal(&format!("handler panicked: {what}")).into_response()
}

/// A bound, ready-to-run api server.
pub struct Application {
    listener: TcpListener,
    port: u16,
    app: axum::Router,
    state: AppState,
}

impl Application {
    /// Builds the state and binds `api.host:api.port` (port 0: any free port).
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let addr = format!("{}:{}", settings.api.host, settings.api.port);
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: addr.clone(),
                source,
            })?;
        let port = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr, source })?
            .port();
        let state = AppState::new(settings).await?;
        tokio::spawn(idempotency::sweep(state.clone()));
        if state.settings.api.metrics_port != 0 {
            tokio::spawn(turnpike_core::telemetry::serve_metrics(
                state.settings.api.host.clone(),
                state.settings.api.metrics_port,
            ));
        }
        let app = routes(state.clone());
        Ok(Self {
            listener,
            port,
            app,
            state,
        })
    }

    /// The port actually bound.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests for
    /// up to `api.shutdown_grace_ms`.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let grace = Duration::from_millis(self.state.settings.api.shutdown_grace_ms);
        let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
        let idle_timeout = Duration::from_millis(self.state.settings.api.idle_timeout_ms);
        let serve = turnpike_core::net::serve(self.listener, self.app, idle_timeout, async move {
            shutdown.await;
            let _ = stopped_tx.send(());
        });
        tokio::select! {
            result = serve => result,
            () = async {
                let _ = stopped_rx.await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!("grace period over; dropping the requests still in flight");
                Ok(())
            }
        }
    }

    /// Serves until SIGTERM or Ctrl-C.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.run_until(shutdown_signal()).await
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received; draining");
}
