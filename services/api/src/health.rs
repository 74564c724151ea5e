//! Liveness, readiness and Prometheus metrics.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::json;
use turnpike_core::db::NodeState;

use crate::AppState;
use crate::error::ApiError;

/// `/metrics` is served here unless it has a port of its own.
pub fn router(with_metrics: bool) -> Router<AppState> {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    if with_metrics {
        router.route("/metrics", get(metrics))
    } else {
        router
    }
}

/// Prometheus metrics of this process (text exposition format).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics() -> impl axum::response::IntoResponse {
    turnpike_core::telemetry::exposition()
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "alive")))]
pub async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(json!({"status": "ok"}))
}

/// The process can serve: at least one database node answers. With the
/// primary down it stays ready (reads work; writes answer 503).
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses((status = 200, description = "ready"), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn readyz(
    State(app): State<AppState>,
) -> Result<(StatusCode, axum::Json<serde_json::Value>), ApiError> {
    let nodes = app.router.topology();
    let serving = nodes.iter().any(|n| n.state != NodeState::Down);
    if !serving {
        return Err(ApiError::unavailable("No database node is reachable.", 1));
    }
    let primary_up = nodes.first().is_some_and(|p| p.state != NodeState::Down);
    Ok((
        StatusCode::OK,
        axum::Json(
            json!({"status": "ready", "writes": if primary_up { "available" } else { "unavailable" }}),
        ),
    ))
}
