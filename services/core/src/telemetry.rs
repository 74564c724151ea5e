//! Process-wide logging set-up.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber; `RUST_LOG` overrides the configured filter.
/// Safe to call more than once (later calls are no-ops), which tests rely on.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(settings.filter.as_str()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
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

/// Registers the counters whose label values are known up front, at zero:
/// a rate over a counter that has not moved yet is 0, not missing, so
/// dashboards and alerts see quiet as quiet.
pub fn init_counters() {
    for limit in ["key", "user", "turns", "tokens", "streams", "storage"] {
        metrics::counter!("turnpike_rate_limited_total", "limit" => limit).increment(0);
    }
    for result in [
        "bypass",
        "l1_hit",
        "l2_hit",
        "miss",
        "lease_hit",
        "lease_timeout",
    ] {
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

/// Serves the process's Prometheus metrics at `/metrics` on `host:port`
/// (a worker's, or an api's admin port), until the task is dropped.
pub async fn serve_metrics(host: String, port: u16) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4",
                )],
                metrics().render(),
            )
        }),
    );
    match tokio::net::TcpListener::bind((host.as_str(), port)).await {
        Ok(listener) => {
            tracing::info!(port, "metrics listening");
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "the metrics listener stopped");
            }
        }
        Err(e) => tracing::warn!(error = %e, port, "cannot serve metrics"),
    }
}
