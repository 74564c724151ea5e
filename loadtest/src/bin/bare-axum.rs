//! The HTTP ceiling: a bare axum handler answering `GET /` with a JSON body
//! read once from a file, no auth, no database. `make bench` points wrk at it
//! with the same body as Turnpike's item page.
//!
//! Usage: bare-axum PORT BODY_FILE
#![allow(clippy::print_stdout)]

use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use axum::routing::get;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let port = args.next().unwrap_or_else(|| "0".into());
    let file = args.next().unwrap_or_default();
    let body = if file.is_empty() {
        Bytes::from_static(b"{}")
    } else {
        Bytes::from(std::fs::read(&file)?)
    };
    let app = Router::new().route(
        "/",
        get(move || {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}")).await?;
    println!("{}", listener.local_addr()?.port());
    // The same socket setting as Turnpike's api.
    axum::serve(
        turnpike_core::net::nodelay(listener),
        app.into_make_service(),
    )
    .await
}
