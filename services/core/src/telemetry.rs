//! Process-wide logging, traces and metrics.
//!
//! Traces: when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, spans go to that
//! OTLP/HTTP (protobuf) endpoint through a batch processor on its own
//! thread; otherwise none are made at all. A turn is one trace: the api's
//! request, the enqueue, and (carried in the queue entry as W3C trace
//! context) the worker's claim, model calls, tool calls and persists.

use std::collections::HashMap;
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings};

static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber; `RUST_LOG` overrides the configured
/// filter. `service` names the process in traces (`OTEL_SERVICE_NAME`
/// wins). Safe to call more than once (later calls are no-ops), which
/// tests rely on.
pub fn init(settings: &LogSettings, service: &str) {
    use tracing_subscriber::Layer;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(settings.filter.as_str()));
    // Spans are traced at info whatever the log filter says (a quiet log
    // must not silence the traces).
    let traces = tracer(service).map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("turnpike", tracing::Level::INFO),
            )
    });
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = match settings.format {
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
        LogFormat::Text => fmt.with_filter(filter).boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(traces)
        .with(logs)
        .try_init();
}

/// The OTLP tracer, when an endpoint is configured.
fn tracer(service: &str) -> Option<opentelemetry_sdk::trace::Tracer> {
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .ok()
        .filter(|e| !e.is_empty())?;
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("traces off: cannot export to {endpoint}: {e}");
            return None;
        }
    };
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(name)
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("turnpike");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let _ = PROVIDER.set(provider);
    Some(tracer)
}

/// Sends the spans still buffered (at exit).
pub fn flush() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
    }
}

/// The current span's W3C `traceparent`, to carry the trace to another
/// process (a queue entry, a model request); `None` without traces.
pub fn traceparent() -> Option<String> {
    PROVIDER.get()?;
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn traces_exported() -> bool {
    PROVIDER.get().is_some()
}

/// Makes `span` a child of the trace a `traceparent` names (if any), and
/// records the trace id in its `trace_id` field, for the log lines inside
/// it. Nothing at all without traces.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if PROVIDER.get().is_none() {
        return;
    }
    if let Some(traceparent) = traceparent {
        let carrier: HashMap<String, String> =
            HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
        let _ = span.set_parent(TraceContextPropagator::new().extract(&carrier));
    }
    let span_context = span.context().span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", span_context.trace_id().to_string());
    }
}

/// The process's Prometheus recorder, installed on first use. Every
/// subsystem records through the `metrics` facade (`metrics::counter!` …);
/// `GET /metrics` renders what was recorded. Tests running several apps in
/// one process share it.
pub fn metrics() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        // Durations are histograms (not summaries), so quantiles aggregate
        // across pods in Prometheus.
        let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
        let builder = builder
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0, 300.0,
                ],
            )
            .unwrap_or_else(|_| metrics_exporter_prometheus::PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
        }
        init_counters();
        handle
    })
}

/// A metric handle registered once and kept in `cell`: the `counter!` and
/// `histogram!` macros build the labels and look them up in the registry on
/// every call, a measurable part of a cached read. The recorder is installed
/// first: a handle taken before it exists would record nothing for the life
/// of the process.
pub fn kept<T>(cell: &std::sync::OnceLock<T>, register: impl FnOnce() -> T) -> &T {
    cell.get_or_init(|| {
        metrics();
        register()
    })
}

/// Registers the counters whose label values are known up front, at zero:
/// a rate over a counter that has not moved yet is 0, not missing, so
/// dashboards and alerts see quiet as quiet.
pub fn init_counters() {
    for limit in ["key", "user", "turns", "tokens", "streams", "storage"] {
        metrics::counter!("turnpike_rate_limited_total", "limit" => limit).increment(0);
    }
    for result in crate::cache::RESULTS {
        metrics::counter!("turnpike_cache_requests_total", "result" => result).increment(0);
    }
    for outcome in ["completed", "incomplete", "failed", "cancelled"] {
        metrics::counter!("turnpike_turns_total", "outcome" => outcome).increment(0);
    }
    for outcome in ["ok", "error"] {
        metrics::counter!("turnpike_model_calls_total", "outcome" => outcome).increment(0);
    }
    for kind in ["input", "cached", "output"] {
        metrics::counter!("turnpike_model_tokens_total", "kind" => kind).increment(0);
    }
    metrics::counter!("turnpike_turn_redeliveries_total").increment(0);
    metrics::counter!("turnpike_compactions_total").increment(0);
    metrics::gauge!("turnpike_sse_streams_open").increment(0.0);
}

/// The process's metrics as an HTTP answer (Prometheus text format).
pub fn exposition() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        metrics().render(),
    )
}

/// Serves the process's Prometheus metrics at `/metrics` on `host:port`
/// (a worker's, or an api's admin port), until the task is dropped.
pub async fn serve_metrics(host: String, port: u16) {
    let app = axum::Router::new().route("/metrics", axum::routing::get(|| async { exposition() }));
    match tokio::net::TcpListener::bind((host.as_str(), port)).await {
        Ok(listener) => {
            tracing::info!(port, "metrics listening");
            if let Err(e) =
                axum::serve(crate::net::nodelay(listener), app.into_make_service()).await
            {
                tracing::warn!(error = %e, "the metrics listener stopped");
            }
        }
        Err(e) => tracing::warn!(error = %e, port, "cannot serve metrics"),
    }
}
