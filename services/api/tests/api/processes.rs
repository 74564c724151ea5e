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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_provider_and_mcp_urls_reach_no_user_model_or_log() {
    const PROVIDER_SECRET: &str = "sk-planted-provider-0e1f";
    const MCP_SECRET: &str = "mcp-planted-token-7a2b";
    const DEAD_SECRET: &str = "mcp-planted-dead-9c3d";
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    // The mock model in process; the worker as a process whose output is kept.
    let mut agents = Agents::spawn(&mut settings).await;
    agents.kill_workers();
    let mock = settings.model.base_url.trim_end_matches("/v1").to_owned();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let docs_url = format!("{mock}/mcp?token={MCP_SECRET}");
    let dead_url = format!("http://127.0.0.1:{closed_port}/mcp?token={DEAD_SECRET}");
    for (label, url) in [("docs", &docs_url), ("dead", &dead_url)] {
        let server = serde_json::from_value(json!({ "url": url })).unwrap();
        settings.tools.mcp_servers.insert(label.into(), server);
    }
    settings.log.filter = "info,turnpike_worker=debug,turnpike_core=debug".into();
    let provider = settings.model.base_url.replacen(
        "http://",
        &format!("http://turnpike:{PROVIDER_SECRET}@"),
        1,
    );
    let worker = Process::worker_logged(
        &stack,
        &settings,
        &[
            ("TURNPIKE__MODEL__BASE_URL".into(), provider),
            ("TURNPIKE__MODEL__API_KEY".into(), PROVIDER_SECRET.into()),
            ("TURNPIKE__MODEL__MAX_RETRIES".into(), "1".into()),
            ("TURNPIKE__TOOLS__MCP_SERVERS__DOCS__URL".into(), docs_url),
            ("TURNPIKE__TOOLS__MCP_SERVERS__DEAD__URL".into(), dead_url),
        ],
    );
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;

    let mut seen = Vec::new();
    let added = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"tools": [{"type": "mcp", "server_label": "docs"}],
                        "input": "/call docs__add {\"a\":2,\"b\":3}"})),
        )
        .await;
    assert_eq!(added.ok()["output"][1]["output"], "5", "{}", added.body);
    seen.push(added.body.to_string());
    // A server that cannot be reached, a provider that fails.
    let unreachable = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"tools": [{"type": "mcp", "server_label": "dead"}],
                        "input": "/call dead__add {}"})),
        )
        .await;
    seen.push(unreachable.body.to_string());
    let failed = user
        .call("POST", "/v1/responses", Some(json!({"input": "/fail 500"})))
        .await;
    assert_eq!(failed.ok()["status"], "failed");
    seen.push(failed.body.to_string());
    let (_, events) = user
        .stream(
            "POST",
            "/v1/responses",
            Some(
                json!({"tools": [{"type": "mcp", "server_label": "docs"}], "stream": true,
                        "input": "/call docs__shout {\"text\":\"hi\"}"}),
            ),
            &[],
        )
        .await;
    assert_eq!(events.last().unwrap().data["type"], "response.completed");
    seen.extend(events.iter().map(|e| e.data.to_string()));
    let listed = user
        .call("GET", "/v1/conversations?consistency=strong", None)
        .await;
    for conversation in listed.ok()["data"].as_array().unwrap() {
        let id = conversation["id"].as_str().unwrap();
        let items = user.list_items(id, "?order=asc&limit=100").await;
        seen.push(items.body.to_string());
        // What the model was sent.
        seen.push(json!(agents.model_requests(id).await).to_string());
    }
    // The worker logged what went wrong (so its log was read)...
    let log = worker.output();
    assert!(
        log.contains("cannot list an MCP server's tools"),
        "worker log:\n{log}"
    );
    seen.push(log);
    // ...and no secret is in anything a user, the model or the log sees.
    for text in &seen {
        for secret in [PROVIDER_SECRET, MCP_SECRET, DEAD_SECRET] {
            assert!(!text.contains(secret), "{secret} leaked into:\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_fetch_goes_direct_whatever_proxy_the_environment_names() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let mut agents = Agents::spawn(&mut settings).await;
    agents.kill_workers();
    // A "proxy" that counts the connections it gets.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let proxied = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&proxied);
    tokio::spawn(async move {
        while let Ok((_socket, _)) = proxy.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let port = settings
        .model
        .base_url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/v1")
        .to_owned();
    settings.tools.http_fetch.enabled = true;
    let worker = Process::worker_logged(
        &stack,
        &settings,
        &[
            ("TURNPIKE__TOOLS__HTTP_FETCH__ENABLED".into(), "true".into()),
            (
                "TURNPIKE__TOOLS__HTTP_FETCH__ALLOW_HOSTS".into(),
                "localhost".into(),
            ),
            ("HTTP_PROXY".into(), proxy_url.clone()),
            ("http_proxy".into(), proxy_url.clone()),
            ("ALL_PROXY".into(), proxy_url),
            // The model is reached directly; the fetched URL names another host.
            ("NO_PROXY".into(), "127.0.0.1".into()),
        ],
    );
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let url = format!("http://localhost:{port}/v1/mock/requests?prompt_cache_key=none");
    let reply = user
        .call(
            "POST",
            "/v1/responses",
            Some(json!({"tools": [{"type": "http_fetch"}],
                        "input": format!("/call http_fetch {{\"url\":\"{url}\"}}")})),
        )
        .await;
    let response = reply.ok();
    assert_eq!(
        response["status"],
        "completed",
        "{response}\n{}",
        worker.output()
    );
    let fetched: serde_json::Value =
        serde_json::from_str(response["output"][1]["output"].as_str().unwrap()).unwrap();
    assert_eq!(fetched["status"], 200, "{fetched}");
    assert_eq!(proxied.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_stops_working_within_the_auth_cache_ttl() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.api.auth_cache_ttl_ms = 1_000;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    // Known, and cached in process and in Redis.
    user.call("GET", "/v1/conversations", None).await.ok();
    let binary = std::env::var("TURNPIKE_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/debug/turnpike").to_owned()
    });
    let revoked = std::process::Command::new(binary)
        .args(["keys", "revoke", "--key", &user.key])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(stack.env.iter().filter(|(k, _)| {
            k.starts_with("TURNPIKE__DATABASE__") || k.as_str() == "TURNPIKE__REDIS__URL"
        }))
        .env("TURNPIKE__API__AUTH_CACHE_TTL_MS", "1000")
        .env("TURNPIKE_CONFIG", "/nonexistent/turnpike.toml")
        .output()
        .unwrap();
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    assert!(String::from_utf8_lossy(&revoked.stdout).contains("within 1000 ms"));
    // An api process that has not cached it refuses it at once…
    let fresh = TestApp::spawn_with(settings).await;
    let elsewhere = turnpike_testkit::User {
        base: fresh.url.clone(),
        ..user.clone()
    };
    elsewhere
        .call("GET", "/v1/conversations", None)
        .await
        .error(401);
    // …and the one that had cached it, once its cache entry expires.
    let started = std::time::Instant::now();
    turnpike_testkit::eventually(
        "the revoked key is refused",
        std::time::Duration::from_secs(5),
        || async {
            (user.call("GET", "/v1/conversations", None).await.status == 401).then_some(())
        },
    )
    .await;
    assert!(started.elapsed() < std::time::Duration::from_millis(2_500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_streams_through_a_sigkilled_worker_show_exactly_what_is_stored() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    // The mock model in process; the workers as processes.
    let mut agents = Agents::spawn_slow(&mut settings, 24, 60).await;
    agents.kill_workers();
    let mut doomed = Process::worker(&stack, &settings);
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    let mut turns = Vec::new();
    for n in 0..40 {
        let created = user
            .call(
                "POST",
                "/v1/responses",
                Some(json!({"input": format!("tell me story number {n}"), "background": true})),
            )
            .await;
        let created = created.ok();
        turns.push((
            created["id"].as_str().unwrap().to_owned(),
            created["conversation"]["id"].as_str().unwrap().to_owned(),
        ));
    }
    // Every turn is answering when the worker dies.
    let mut streams = Vec::new();
    for (id, _) in &turns {
        streams.push(user.follow_until_answering(id).await);
    }
    doomed.kill().await;
    let replacement = Process::worker_logged(&stack, &settings, &[]);
    for ((_, conversation), stream) in turns.iter().zip(streams) {
        let events = stream.read_to_end().await;
        let last = &events.last().unwrap().data;
        assert_eq!(last["type"], "response.completed", "{last}");
        // Each conversation holds exactly its question and its answer, and
        // the client saw exactly the answer stored.
        let items = user.list_items(conversation, "?order=asc").await;
        let items = items.ok()["data"].as_array().unwrap().clone();
        assert_eq!(items.len(), 2, "{items:?}");
        turnpike_testkit::assert_stream_matches(&events, &items[1..]);
    }
    assert!(
        !replacement.output().contains("ERROR"),
        "{}",
        replacement.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_logs_nothing() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.worker.block_ms = 300;
    settings.log.filter = "info".into();
    let worker = Process::worker_logged(&stack, &settings, &[]);
    // Ten empty blocking reads, and more.
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let log = worker.output();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .collect();
    assert!(noisy.is_empty(), "{log}");
    assert!(log.lines().count() <= 2, "{log}");
}
