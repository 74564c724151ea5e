//! Admin routes (admin key required): the database topology, and the
//! kill switches that throttle or block a route or a query class on every
//! api process.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde::Serialize;
use turnpike_core::db::NodeStatus;
use turnpike_core::switches::SwitchError;
use turnpike_protocol::{List, SetSwitch, Switch, SwitchDeleted};

use crate::error::ApiError;
use crate::extract::{Admin, Json};
use crate::{AppState, Path};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/topology", get(topology))
        .route("/v1/admin/metrics", get(metrics))
        .route("/v1/admin/switches", get(list_switches))
        .route(
            "/v1/admin/switches/{name}",
            get(get_switch).put(set_switch).delete(delete_switch),
        )
}

/// The database topology as the router sees it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Topology {
    /// Primary first, then replicas, with role, state (`up`, `lagging`,
    /// `banned`, `down`), address, lag in bytes and ms, in-flight queries,
    /// the query classes it serves (`group`), each class's concurrency
    /// budget (`limit`, `in_use`, `queued`) and pool statistics.
    #[schema(value_type = Vec<Object>)]
    pub nodes: Vec<NodeStatus>,
}

/// Each database node's role, state, lag, in-flight queries and pool.
#[utoipa::path(get, path = "/v1/admin/topology", tag = "admin",
    responses((status = 200, body = Topology), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 403, body = turnpike_protocol::ErrorBody)))]
pub async fn topology(State(app): State<AppState>, _admin: Admin) -> axum::Json<Topology> {
    axum::Json(Topology {
        nodes: app.router.topology(),
    })
}

/// This api process's metrics (Prometheus text format), with the turn
/// queue's depth read now: what the ops page plots.
#[utoipa::path(get, path = "/v1/admin/metrics", tag = "admin",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain"),
        (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 403, body = turnpike_protocol::ErrorBody)))]
pub async fn metrics(
    State(app): State<AppState>,
    _admin: Admin,
) -> impl axum::response::IntoResponse {
    if let Ok(depth) = turnpike_core::queue::depth(&app.kv, &app.settings.worker.queue).await {
        depth.record();
    }
    turnpike_core::telemetry::exposition()
}

impl From<SwitchError> for ApiError {
    fn from(e: SwitchError) -> Self {
        match e {
            SwitchError::Invalid { param, message } => ApiError::invalid(param, message),
            SwitchError::Store(e) => {
                tracing::warn!(error = %e, "kill switches: Redis unavailable");
                ApiError::unavailable(
                    "The kill switches cannot be reached right now (Redis). Retry shortly.",
                    1,
                )
            }
        }
    }
}

/// Every kill switch, by name.
#[utoipa::path(get, path = "/v1/admin/switches", tag = "admin",
    responses((status = 200, body = List<Switch>), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 403, body = turnpike_protocol::ErrorBody), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn list_switches(
    State(app): State<AppState>,
    _admin: Admin,
) -> Result<axum::Json<List<Switch>>, ApiError> {
    let switches = app.switches.list().await?;
    Ok(axum::Json(List::new(switches, false, |s| s.name.clone())))
}

/// One kill switch.
#[utoipa::path(get, path = "/v1/admin/switches/{name}", tag = "admin",
    params(("name" = String, Path)),
    responses((status = 200, body = Switch), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 403, body = turnpike_protocol::ErrorBody), (status = 404, body = turnpike_protocol::ErrorBody),
        (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn get_switch(
    State(app): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
) -> Result<axum::Json<Switch>, ApiError> {
    app.switches
        .get(&name)
        .await?
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found("switch", &name))
}

/// Sets (creates or replaces) a kill switch. It is in force on this
/// process when the call returns, and on every other api process within a
/// second.
#[utoipa::path(put, path = "/v1/admin/switches/{name}", tag = "admin",
    params(("name" = String, Path)), request_body = SetSwitch,
    responses((status = 200, body = Switch), (status = 400, body = turnpike_protocol::ErrorBody),
        (status = 401, body = turnpike_protocol::ErrorBody), (status = 403, body = turnpike_protocol::ErrorBody),
        (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn set_switch(
    State(app): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
    Json(body): Json<SetSwitch>,
) -> Result<axum::Json<Switch>, ApiError> {
    Ok(axum::Json(app.switches.set(&name, body).await?))
}

/// Lifts a kill switch, everywhere within a second.
#[utoipa::path(delete, path = "/v1/admin/switches/{name}", tag = "admin",
    params(("name" = String, Path)),
    responses((status = 200, body = SwitchDeleted), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 403, body = turnpike_protocol::ErrorBody), (status = 404, body = turnpike_protocol::ErrorBody),
        (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn delete_switch(
    State(app): State<AppState>,
    _admin: Admin,
    Path(name): Path<String>,
) -> Result<(StatusCode, axum::Json<SwitchDeleted>), ApiError> {
    if !app.switches.delete(&name).await? {
        return Err(ApiError::not_found("switch", &name));
    }
    Ok((
        StatusCode::OK,
        axum::Json(SwitchDeleted {
            name,
            object: "switch.deleted".into(),
            deleted: true,
        }),
    ))
}
