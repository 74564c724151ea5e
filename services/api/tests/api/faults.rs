//! Faults during turns: a worker killed mid-turn, a client cut off
//! mid-stream resuming on another api process. Nothing is lost and nothing
//! is repeated.

use std::time::Duration;

use serde_json::json;
use turnpike_testkit::{Agents, Paths, Stack, TestApp, parse_sse};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_turn_is_finished_by_another() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.mock.tokens_per_s = 20;
    settings.mock.answer_tokens = 30;
    let mut agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let created = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"input": "a long answer, please", "background": true})),
        )
        .await;
    let id = created.ok()["id"].as_str().unwrap().to_owned();
    let conversation = created.ok()["conversation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut stream = app
        .http
        .get(format!("{}/v1/responses/{id}?stream=true", app.url))
        .header("authorization", format!("Bearer {}", user.key))
        .send()
        .await
        .unwrap();
    let mut body = String::new();
    while !body.contains("response.output_text.delta") {
        let chunk = tokio::time::timeout(Duration::from_secs(20), stream.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    agents.kill_workers();
    agents.add_worker(&settings).await;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.chunk())
        .await
        .unwrap()
        .unwrap()
    {
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events = parse_sse(&body);
    // The same stream went on to the end, its sequence numbers unbroken.
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.data["sequence_number"], i as u64);
    }
    let last = &events.last().unwrap().data;
    assert_eq!(last["type"], "response.completed", "{last}");
    // One input, one output: the interrupted attempt stored nothing twice.
    let items = user.list_items(&conversation, "?order=asc").await;
    let items = items.ok()["data"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[1], last["response"]["output"][0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cut_off_mid_stream_resumes_on_another_api_process_without_loss_or_repeats() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.mock.tokens_per_s = 40;
    settings.mock.answer_tokens = 40;
    let _agents = Agents::spawn(&mut settings).await;
    let first = TestApp::spawn_with(settings.clone()).await;
    let second = TestApp::spawn_with(settings).await;
    let user = first.new_user().await;

    let mut stream = first
        .http
        .post(format!("{}/v1/responses", first.url))
        .header("authorization", format!("Bearer {}", user.key))
        .json(&json!({"input": "tell me a story", "stream": true}))
        .send()
        .await
        .unwrap();
    let mut body = String::new();
    while body.matches("response.output_text.delta").count() < 3 {
        let chunk = tokio::time::timeout(Duration::from_secs(20), stream.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        body.push_str(&String::from_utf8_lossy(&chunk));
    }
    // The connection drops mid-stream (the client's network, or its api process).
    drop(stream);
    // Only whole events count (the last one may have been cut).
    let complete = &body[..body.rfind("\n\n").map_or(0, |i| i + 2)];
    let before = parse_sse(complete);
    let id = before[0].data["response"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let last_id = before.last().unwrap().id.clone().unwrap();

    let resumed = user.on(&second);
    let (_, after) = resumed
        .stream(
            "GET",
            &format!("/v1/responses/{id}?stream=true"),
            None,
            &[("last-event-id", &last_id)],
        )
        .await;
    let mut all = before.clone();
    all.extend(after);
    for (i, event) in all.iter().enumerate() {
        assert_eq!(
            event.data["sequence_number"], i as u64,
            "no event lost or repeated"
        );
    }
    assert_eq!(all.last().unwrap().data["type"], "response.completed");
    // The same as a full replay of the finished response.
    let (_, replay) = resumed
        .stream("GET", &format!("/v1/responses/{id}?stream=true"), None, &[])
        .await;
    assert_eq!(all, replay);
}
