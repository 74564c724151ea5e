//! Admin routes (admin key required).

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Serialize;
use turnpike_core::db::NodeStatus;

use crate::AppState;
use crate::extract::Admin;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/admin/topology", get(topology))
}

/// The database topology as the router sees it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Topology {
    /// Primary first, then replicas, with role, state (`up`, `lagging`,
    /// `banned`, `down`), address, lag in bytes and ms, in-flight queries and
    /// pool statistics.
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
