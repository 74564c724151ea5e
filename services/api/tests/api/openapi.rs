//! The OpenAPI document covers every route and its errors.

use turnpike_testkit::{Paths, Stack, TestApp, raw};

#[tokio::test]
async fn openapi_covers_every_route_with_error_responses() {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, Paths::DIRECT).await;
    let doc = raw(
        &app.http,
        "GET",
        &format!("{}/openapi.json", app.url),
        &[],
        None,
    )
    .await;
    let doc = doc.ok();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/v1/conversations", &["get", "post"][..]),
        (
            "/v1/conversations/{conversation_id}",
            &["get", "post", "delete"][..],
        ),
        (
            "/v1/conversations/{conversation_id}/items",
            &["get", "post"][..],
        ),
        (
            "/v1/conversations/{conversation_id}/items/{item_id}",
            &["get", "delete"][..],
        ),
        ("/v1/responses", &["post"][..]),
        ("/v1/responses/{response_id}", &["get"][..]),
        ("/v1/responses/{response_id}/input_items", &["get"][..]),
        ("/v1/responses/{response_id}/cancel", &["post"][..]),
        ("/v1/admin/topology", &["get"][..]),
        ("/v1/admin/switches", &["get"][..]),
        ("/v1/admin/switches/{name}", &["get", "put", "delete"][..]),
        ("/healthz", &["get"][..]),
        ("/readyz", &["get"][..]),
    ] {
        for method in methods {
            let op = &paths[path][*method];
            assert!(op.is_object(), "{method} {path} missing");
            if path.starts_with("/v1/") {
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.contains_key("401"),
                    "{method} {path} documents no 401"
                );
            }
        }
    }
}
