//! Faults of whole processes, with the real `turnpike` binary: an api
//! process SIGKILLed while it streams a response, and a worker process
//! SIGKILLed mid-turn. Clients lose nothing and see nothing twice.

use serde_json::json;
use turnpike_testkit::{Agents, Paths, Process, Stack, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_process_killed_mid_stream_loses_nothing_on_resume_elsewhere() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let _agents = Agents::spawn_slow(&mut settings, 40, 60).await;
    let mut first = Process::api(&stack, &settings).await;
    let second = Process::api(&stack, &settings).await;
    let keys = TestApp::spawn_with(settings.clone()).await;
    let user = keys.new_user().await;

    let mut stream = first
        .user(&user)
        .open_stream(
            "POST",
            "/v1/responses",
            Some(json!({"input": "tell me a long story", "stream": true})),
        )
        .await;
    stream.read_until("response.output_text.delta", 5).await;
    first.kill().await;
    // Only whole events count: the last one may have been cut by the kill.
    let before = stream.events_so_far();
    let id = before[0].data["response"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let last_id = before.last().unwrap().id.clone().unwrap();

    let (status, after) = second
        .user(&user)
        .stream(
            "GET",
            &format!("/v1/responses/{id}?stream=true"),
            None,
            &[("last-event-id", &last_id)],
        )
        .await;
    assert_eq!(status, 200);
    let all: Vec<_> = before.iter().chain(&after).collect();
    for (i, event) in all.iter().enumerate() {
        assert_eq!(event.data["sequence_number"], i as u64, "{:?}", event.data);
    }
    let last = &all.last().unwrap().data;
    assert_eq!(last["type"], "response.completed");
    let streamed: String = all
        .iter()
        .filter(|e| e.data["type"] == "response.output_text.delta")
        .map(|e| e.data["delta"].as_str().unwrap())
        .collect();
    assert_eq!(
        streamed,
        last["response"]["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_killed_mid_turn_is_replaced_without_duplicates() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    // The mock model in process; the workers as processes.
    let mut agents = Agents::spawn_slow(&mut settings, 20, 40).await;
    agents.kill_workers();
    let mut doomed = Process::worker(&stack, &settings);
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

    let stream = user.follow_until_answering(&id).await;
    doomed.kill().await;
    let _replacement = Process::worker(&stack, &settings);
    let events = stream.read_to_end().await;
    for (i, event) in events.iter().enumerate() {
        assert_eq!(event.data["sequence_number"], i as u64);
    }
    let last = &events.last().unwrap().data;
    assert_eq!(last["type"], "response.completed", "{last}");
    let items = user.list_items(&conversation, "?order=asc").await;
    let items = items.ok()["data"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2, "{items:?}");
    assert_eq!(items[1], last["response"]["output"][0]);
    // The replacement ran the model call again; the client saw it once.
    turnpike_testkit::assert_stream_matches(&events, &items[1..]);
}
