//! The web pages: the demo at `/` and the operators' page at `/ops`. Plain
//! HTML and JS, no build step; the ops page's chart library (uPlot, from
//! npm) is vendored under `web/vendor` and served from here, no CDN.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::AppState;

const INDEX: &str = include_str!("../../../web/index.html");
const OPS: &str = include_str!("../../../web/ops.html");
const UPLOT_JS: &str = include_str!("../../../web/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../../web/vendor/uplot/uPlot.min.css");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| page(INDEX)))
        // The page holds no data: it asks for an admin key and reads the
        // admin routes with it.
        .route("/ops", get(|| page(OPS)))
        .route("/ops/uplot.js", get(|| asset("text/javascript", UPLOT_JS)))
        .route("/ops/uplot.css", get(|| asset("text/css", UPLOT_CSS)))
}

async fn page(html: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        html,
    )
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
}
