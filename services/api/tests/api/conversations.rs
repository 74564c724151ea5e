//! Conversation, item and response CRUD and pagination.

use serde_json::{Value, json};
use turnpike_testkit::{Paths, Stack, TestApp};

both_paths!(
    conversation_lifecycle,
    item_pagination,
    responses_are_stored_queued
);

async fn conversation_lifecycle(paths: Paths) {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, paths).await;
    let user = app.new_user().await;

    let created = user
        .create_conversation(json!({
            "metadata": {"topic": "trains"},
            "items": [
                {"type": "message", "role": "user", "content": "Hello"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]}
            ]
        }))
        .await;
    let conversation = created.ok().clone();
    assert!(
        created.token().is_some(),
        "a write carries a consistency token"
    );
    let id = conversation["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("conv_"));
    assert_eq!(conversation["object"], "conversation");
    assert_eq!(conversation["metadata"], json!({"topic": "trains"}));

    let fetched = user
        .call("GET", &format!("/v1/conversations/{id}"), None)
        .await;
    assert_eq!(fetched.ok(), &conversation);

    let updated = user
        .call(
            "POST",
            &format!("/v1/conversations/{id}"),
            Some(json!({"metadata": {"topic": "boats"}})),
        )
        .await;
    assert_eq!(updated.ok()["metadata"], json!({"topic": "boats"}));
    let fetched = user
        .call("GET", &format!("/v1/conversations/{id}"), None)
        .await;
    assert_eq!(fetched.ok()["metadata"], json!({"topic": "boats"}));

    let items = user.list_items(&id, "?order=asc").await;
    let items = items.ok();
    assert_eq!(items["object"], "list");
    assert_eq!(items["has_more"], false);
    let data = items["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(
        data[0],
        json!({"type": "message", "id": data[0]["id"], "status": "completed", "role": "user",
               "content": [{"type": "input_text", "text": "Hello"}]})
    );
    assert_eq!(
        data[1]["content"],
        json!([{"type": "output_text", "text": "Hi!", "annotations": []}])
    );

    let listed = user.call("GET", "/v1/conversations?limit=100", None).await;
    assert!(
        listed.ok()["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == id.as_str())
    );

    let deleted = user
        .call("DELETE", &format!("/v1/conversations/{id}"), None)
        .await;
    assert_eq!(
        deleted.ok(),
        &json!({"id": id, "object": "conversation.deleted", "deleted": true})
    );
    user.call("GET", &format!("/v1/conversations/{id}"), None)
        .await
        .error(404);
    user.list_items(&id, "").await.error(404);
    user.call("DELETE", &format!("/v1/conversations/{id}"), None)
        .await
        .error(404);
    let listed = user.call("GET", "/v1/conversations?limit=100", None).await;
    assert!(
        !listed.ok()["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == id.as_str())
    );
}

fn texts(page: &Value) -> Vec<String> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["content"][0]["text"].as_str().unwrap().to_owned())
        .collect()
}

async fn item_pagination(paths: Paths) {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, paths).await;
    let user = app.new_user().await;
    let id = user.create_conversation(json!({})).await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for batch in 0..3 {
        let items: Vec<Value> = (0..(if batch < 2 { 10 } else { 5 }))
            .map(|i| json!({"role": "user", "content": format!("m{:02}", batch * 10 + i)}))
            .collect();
        let added = user.add_items(&id, json!(items)).await;
        assert_eq!(added.ok()["data"].as_array().unwrap().len(), items.len());
    }
    let expected: Vec<String> = (0..25).map(|i| format!("m{i:02}")).collect();

    // Ascending, in pages of 10, following `after`.
    let mut seen = Vec::new();
    let mut after = String::new();
    for page_no in 0.. {
        let page = user
            .list_items(&id, &format!("?order=asc&limit=10{after}"))
            .await;
        let page = page.ok().clone();
        seen.extend(texts(&page));
        assert_eq!(page["first_id"], page["data"][0]["id"]);
        if page["has_more"] == false {
            assert_eq!(page_no, 2);
            break;
        }
        after = format!("&after={}", page["last_id"].as_str().unwrap());
    }
    assert_eq!(seen, expected);

    // Descending is the default.
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let page = user.list_items(&id, &format!("?limit=7{after}")).await;
        let page = page.ok().clone();
        seen.extend(texts(&page));
        if page["has_more"] == false {
            break;
        }
        after = format!("&after={}", page["last_id"].as_str().unwrap());
    }
    let mut reversed = expected.clone();
    reversed.reverse();
    assert_eq!(seen, reversed);

    // One item, then delete it.
    let first = user.list_items(&id, "?order=asc&limit=1").await.ok()["data"][0].clone();
    let item_id = first["id"].as_str().unwrap();
    let fetched = user
        .call(
            "GET",
            &format!("/v1/conversations/{id}/items/{item_id}"),
            None,
        )
        .await;
    assert_eq!(fetched.ok(), &first);
    let after_delete = user
        .call(
            "DELETE",
            &format!("/v1/conversations/{id}/items/{item_id}"),
            None,
        )
        .await;
    assert_eq!(after_delete.ok()["id"], id.as_str());
    user.call(
        "GET",
        &format!("/v1/conversations/{id}/items/{item_id}"),
        None,
    )
    .await
    .error(404);
    let all = user.list_items(&id, "?order=asc&limit=100").await;
    assert_eq!(texts(all.ok()), expected[1..].to_vec());

    // More than 20 items in one call is refused, and nothing is added.
    let too_many: Vec<Value> = (0..21)
        .map(|i| json!({"role": "user", "content": i.to_string()}))
        .collect();
    let refused = user.add_items(&id, json!(too_many)).await;
    assert_eq!(refused.error(400)["param"], "items");
    let all = user.list_items(&id, "?order=asc&limit=100").await;
    assert_eq!(all.ok()["data"].as_array().unwrap().len(), 24);
}

async fn responses_are_stored_queued(paths: Paths) {
    let stack = Stack::shared().await;
    let app = TestApp::spawn(&stack, paths).await;
    let user = app.new_user().await;
    let conversation = user.create_conversation(json!({})).await.ok()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let created = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({
                "model": "mock-1",
                "conversation": conversation,
                "input": "What is a turnpike?",
                "instructions": "Be brief.",
                "background": true,
                "metadata": {"k": "v"}
            })),
        )
        .await;
    let response = created.ok().clone();
    let id = response["id"].as_str().unwrap();
    assert!(id.starts_with("resp_"));
    assert_eq!(response["object"], "response");
    assert_eq!(response["status"], "queued");
    assert_eq!(response["conversation"], json!({"id": conversation}));
    assert_eq!(response["instructions"], "Be brief.");
    assert_eq!(response["output"], json!([]));
    assert_eq!(response["metadata"], json!({"k": "v"}));

    let fetched = user.call("GET", &format!("/v1/responses/{id}"), None).await;
    assert_eq!(fetched.ok(), &response);

    let inputs = user
        .call("GET", &format!("/v1/responses/{id}/input_items"), None)
        .await;
    let inputs = inputs.ok();
    assert_eq!(inputs["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        inputs["data"][0]["content"][0]["text"],
        "What is a turnpike?"
    );
    let items = user.list_items(&conversation, "").await;
    assert_eq!(items.ok()["data"][0], inputs["data"][0]);

    // One active turn per conversation: `reject` refuses a second.
    let rejected = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({
                "conversation": {"id": conversation}, "input": "again", "multitask": "reject"
            })),
        )
        .await;
    rejected.error(409);

    let cancelled = user
        .call("POST", &format!("/v1/responses/{id}/cancel"), None)
        .await;
    assert_eq!(cancelled.ok()["status"], "cancelled");
    let again = user
        .call("POST", &format!("/v1/responses/{id}/cancel"), None)
        .await;
    assert_eq!(again.ok()["status"], "cancelled");

    // Without a conversation, one is created.
    let solo = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": [{"role": "user", "content": "hi"}], "background": true})),
        )
        .await;
    let solo_conversation = solo.ok()["conversation"]["id"].as_str().unwrap();
    assert!(solo_conversation.starts_with("conv_"));
    assert_ne!(solo_conversation, conversation);
}
