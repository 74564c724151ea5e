//! The OpenAPI 3.1 document, generated from the handlers' annotations and
//! the protocol types, served at `/openapi.json`.

use std::sync::OnceLock;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::AppState;
use crate::limits::RateLimitedResponses;

#[derive(OpenApi)]
#[openapi(
    info(title = "Turnpike", description = "OpenAI-compatible Conversations and Responses API, served from a replicated Postgres."),
    paths(
        crate::conversations::create,
        crate::conversations::list,
        crate::conversations::retrieve,
        crate::conversations::update,
        crate::conversations::delete,
        crate::items::list,
        crate::items::create,
        crate::items::retrieve,
        crate::items::delete,
        crate::responses::create,
        crate::responses::retrieve,
        crate::responses::input_items,
        crate::responses::cancel,
        crate::responses::delete,
        crate::responses::input_tokens,
        crate::responses::compact,
        crate::chat::create,
        crate::chat::models,
        crate::chat::model,
        crate::admin::topology,
        crate::admin::metrics,
        crate::admin::list_switches,
        crate::admin::get_switch,
        crate::admin::set_switch,
        crate::admin::delete_switch,
        crate::health::healthz,
        crate::health::readyz,
        crate::health::metrics,
    ),
    components(schemas(turnpike_protocol::ErrorBody, crate::items::Order, crate::events::SseEvent)),
    modifiers(&BearerAuth, &RateLimitedResponses),
    security(("bearer" = [])),
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(document))
}

/// The document, rendered once.
pub fn json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi().to_json().unwrap_or_else(|e| {
            tracing::error!(error = %e, "could not render the OpenAPI document");
            "{}".to_owned()
        })
    })
}

async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json())
}
