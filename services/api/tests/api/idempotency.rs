//! `Idempotency-Key`: a retry returns the first answer; another body is a 422.

use std::time::Duration;

use serde_json::json;
use turnpike_testkit::{Agents, Paths, Stack, TestApp, eventually};

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

/// A streamed create retried with its key attaches to the first response's
/// stream, from the start; a waiting create whose client left is attached to
/// the same way: no second turn either time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_create_attaches_to_the_response_it_made() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let _agents = Agents::spawn_slow(&mut settings, 10, 100).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;

    let key = [("idempotency-key", "stream-once")];
    let body = json!({"input": "a long answer, please", "stream": true});
    let (_, first) = user
        .stream("POST", "/v1/responses", Some(body.clone()), &key)
        .await;
    let (status, again) = user.stream("POST", "/v1/responses", Some(body), &key).await;
    assert_eq!(status, 200);
    assert_eq!(
        again, first,
        "the retry replays the first response's stream"
    );

    // The client of a waiting create leaves; its retry gets that response.
    let key = [("idempotency-key", "wait-once")];
    let body = json!({"input": "another long answer"});
    let gone = tokio::time::timeout(
        Duration::from_millis(300),
        user.call_with("POST", "/v1/responses", Some(body.clone()), &key),
    )
    .await;
    assert!(
        gone.is_err(),
        "the first request was cut off while it waited"
    );
    let retried = eventually("the retry attaches", Duration::from_secs(10), || async {
        let reply = user
            .call_with("POST", "/v1/responses", Some(body.clone()), &key)
            .await;
        (reply.status == 200).then_some(reply)
    })
    .await;
    assert_eq!(retried.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(retried.body["status"], "completed");
    let listed = user
        .call("GET", "/v1/conversations?consistency=strong", None)
        .await;
    assert_eq!(
        listed.ok()["data"].as_array().unwrap().len(),
        2,
        "one turn per key"
    );
}

/// A claim whose request never answered lapses; records expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_lapse_and_records_expire() {
    // A stack of its own: its api sweeps every record older than 1.5 s,
    // and on the shared stack that would include other tests' records.
    let stack = Stack::private().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.api.idempotency_claim_ms = 300;
    settings.api.idempotency_retention_ms = 1_500;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let body = json!({"metadata": {"n": "1"}});

    // A claim left by a process that died before it answered.
    let router = turnpike_core::db::Router::new(&settings.database).unwrap();
    let mut tx = router.write().await.unwrap();
    let (user_id,): (uuid::Uuid,) = sqlx::query_as("SELECT id FROM users WHERE name = $1")
        .bind(&user.name)
        .fetch_one(turnpike_core::db::DbConn::conn(&mut tx))
        .await
        .unwrap();
    // Its fingerprint is this request's: method, path and body.
    let fingerprint = {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        hash.update(b"POST /v1/conversations\n");
        hash.update(serde_json::to_vec(&body).unwrap());
        hash.finalize().to_vec()
    };
    sqlx::query(
        "INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES ($1, 'orphan', $2)",
    )
    .bind(user_id)
    .bind(fingerprint)
    .execute(turnpike_core::db::DbConn::conn(&mut tx))
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let key = [("idempotency-key", "orphan")];
    let held = user
        .call_with("POST", "/v1/conversations", Some(body.clone()), &key)
        .await;
    held.error(409);
    let ran = eventually("the claim lapses", Duration::from_secs(5), || async {
        let reply = user
            .call_with("POST", "/v1/conversations", Some(body.clone()), &key)
            .await;
        (reply.status == 200).then_some(reply)
    })
    .await;
    assert!(ran.headers.get("idempotent-replayed").is_none());

    // After the retention the key may be used again, and the record is gone.
    let other = json!({"metadata": {"n": "2"}});
    let reused = eventually("the record expires", Duration::from_secs(10), || async {
        let reply = user
            .call_with("POST", "/v1/conversations", Some(other.clone()), &key)
            .await;
        (reply.status == 200).then_some(reply)
    })
    .await;
    assert_ne!(reused.body["id"], ran.body["id"]);
    eventually(
        "expired records are deleted",
        Duration::from_secs(10),
        || async {
            let mut tx = router.write().await.unwrap();
            let (left,): (i64,) =
                sqlx::query_as("SELECT count(*) FROM idempotency_keys WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_one(turnpike_core::db::DbConn::conn(&mut tx))
                    .await
                    .unwrap();
            (left == 0).then_some(())
        },
    )
    .await;
}
