//! `Idempotency-Key`: a retry returns the first answer; another body is a 422.

use serde_json::json;
use turnpike_testkit::{Paths, Stack, TestApp};

both_paths!(retries_return_the_first_answer);

async fn retries_return_the_first_answer(paths: Paths) {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, paths).await;
    let user = app.new_user().await;
    let body = json!({"metadata": {"attempt": "1"}});
    let key = [("idempotency-key", "create-once")];

    let first = user
        .call_with("POST", "/v1/conversations", Some(body.clone()), &key)
        .await;
    let retry = user
        .call_with("POST", "/v1/conversations", Some(body.clone()), &key)
        .await;
    assert_eq!(retry.ok(), first.ok());
    assert_eq!(retry.token(), first.token());
    assert_eq!(retry.headers.get("idempotent-replayed").unwrap(), "true");

    let listed = user.call("GET", "/v1/conversations", None).await;
    assert_eq!(
        listed.ok()["data"].as_array().unwrap().len(),
        1,
        "the retry created nothing"
    );

    let other = user
        .call_with(
            "POST",
            "/v1/conversations",
            Some(json!({"metadata": {"attempt": "2"}})),
            &key,
        )
        .await;
    assert_eq!(other.error(422)["param"], "Idempotency-Key");

    // Keys are per user: another user may use the same key.
    let someone = app.new_user().await;
    let theirs = someone
        .call_with("POST", "/v1/conversations", Some(body), &key)
        .await;
    assert_ne!(theirs.ok()["id"], first.ok()["id"]);

    // A refused request is stored too: retrying it gives the same 4xx.
    let bad = json!({"metadata": 1});
    let k2 = [("idempotency-key", "bad-once")];
    let refused = user
        .call_with("POST", "/v1/conversations", Some(bad.clone()), &k2)
        .await;
    refused.error(400);
    let again = user
        .call_with("POST", "/v1/conversations", Some(bad), &k2)
        .await;
    assert_eq!(again.error(400), refused.error(400));
}
