//! Tenant isolation: another user's resources are a plain 404.

use serde_json::json;
use turnpike_testkit::{Paths, Stack, TestApp};

both_paths!(another_users_data_is_invisible);

async fn another_users_data_is_invisible(paths: Paths) {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, paths).await;
    let alice = app.new_user().await;
    let mallory = app.new_user().await;

    let conversation = alice
        .new_conversation(json!([{"role": "user", "content": "secret"}]))
        .await;
    let item = alice.list_items(&conversation, "").await.ok()["data"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = alice
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "input": "hi", "background": true})),
        )
        .await
        .ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let c = format!("/v1/conversations/{conversation}");
    for (method, path, body) in [
        ("GET", c.clone(), None),
        (
            "POST",
            c.clone(),
            Some(json!({"metadata": {"owned": "yes"}})),
        ),
        ("DELETE", c.clone(), None),
        ("GET", format!("{c}/items"), None),
        (
            "POST",
            format!("{c}/items"),
            Some(json!({"items": [{"role": "user", "content": "injected"}]})),
        ),
        ("GET", format!("{c}/items/{item}"), None),
        ("DELETE", format!("{c}/items/{item}"), None),
        ("GET", format!("/v1/responses/{response}"), None),
        ("GET", format!("/v1/responses/{response}/input_items"), None),
        ("POST", format!("/v1/responses/{response}/cancel"), None),
        (
            "POST",
            "/v1/responses".to_owned(),
            Some(json!({"conversation": conversation, "input": "x"})),
        ),
    ] {
        let reply = mallory.call(method, &path, body).await;
        assert_eq!(reply.error(404)["code"], "not_found", "{method} {path}");
    }
    let listed = mallory.call("GET", "/v1/conversations", None).await;
    assert_eq!(listed.ok()["data"], json!([]));

    // Alice's data is untouched.
    let items = alice.list_items(&conversation, "?order=asc").await;
    let texts: Vec<&str> = items.ok()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["content"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["secret", "hi"]);
    let fetched = alice.call("GET", &c, None).await;
    assert_eq!(fetched.ok()["metadata"], json!({}));
    let turn = alice
        .call("GET", &format!("/v1/responses/{response}"), None)
        .await;
    assert_eq!(turn.ok()["status"], "queued");
}
