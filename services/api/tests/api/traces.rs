//! OpenTelemetry: one turn run across an api process and a worker process
//! is one trace — the api's request, the enqueue, the worker's turn, its
//! model call (with token counts) and persists — received by an OTLP/HTTP
//! endpoint in this test (protobuf, decoded with the OTLP types).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::json;
use turnpike_testkit::{Agents, Paths, Process, Stack, TestApp, eventually};

/// A received span: its service, name, trace id, id and parent id (hex).
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace: String,
    id: String,
    parent: String,
    attributes: Vec<String>,
}

async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
    let sink = Arc::clone(&spans);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                let request = ExportTraceServiceRequest::decode(body).expect("an OTLP request");
                let mut sink = sink.lock().unwrap();
                for resource in request.resource_spans {
                    let service = resource
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|a| a.key == "service.name")
                        .and_then(|a| a.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            sink.push(Received {
                                service: service.clone(),
                                name: span.name.clone(),
                                trace: hex(&span.trace_id),
                                id: hex(&span.span_id),
                                parent: hex(&span.parent_span_id),
                                attributes: span.attributes.iter().map(|a| a.key.clone()).collect(),
                            });
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_turn_is_one_trace_across_the_api_and_the_worker() {
    let (endpoint, spans) = receiver().await;
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    // The mock model in this process; api and worker as processes.
    let mut agents = Agents::spawn(&mut settings).await;
    agents.kill_workers();
    let otel = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ];
    let _worker = Process::worker_logged(&stack, &settings, &otel);
    let api = Process::api_with(&stack, &settings, &otel).await;
    // Keys are made through the database, as `turnpike keys` does.
    let app = TestApp::spawn_with(settings).await;
    let user = api.user(&app.new_user().await);
    let done = user
        .call(
            "POST",
            "/v1/responses",
            Some(
                json!({"input": "/call conversation_search {\"query\":\"toll\"}",
                        "tools": [{"type": "conversation_search"}]}),
            ),
        )
        .await;
    assert_eq!(done.ok()["status"], "completed");

    let trace = eventually(
        "the turn's spans arrive",
        Duration::from_secs(20),
        || async {
            let spans = spans.lock().unwrap().clone();
            let request = spans
                .iter()
                .find(|s| s.name == "POST /v1/responses" && s.service.contains("turnpike-api"))?;
            let of_trace: Vec<Received> = spans
                .iter()
                .filter(|s| s.trace == request.trace)
                .cloned()
                .collect();
            let names: Vec<&str> = of_trace.iter().map(|s| s.name.as_str()).collect();
            ["enqueue", "turn", "model call", "tool call", "persist"]
                .iter()
                .all(|n| names.contains(n))
                .then_some(of_trace)
        },
    )
    .await;
    let find = |name: &str| trace.iter().find(|s| s.name == name).unwrap();
    let (request, enqueue, turn) = (find("POST /v1/responses"), find("enqueue"), find("turn"));
    // Parents: request → enqueue → (the queue) → turn → model call, tool call, persist.
    assert!(
        request.parent.is_empty(),
        "the request is the root: {request:?}"
    );
    assert_eq!(enqueue.parent, request.id);
    assert_eq!(turn.parent, enqueue.id);
    assert!(turn.service.contains("turnpike-worker"), "{turn:?}");
    for name in ["model call", "tool call", "persist"] {
        let children: Vec<&Received> = trace.iter().filter(|s| s.name == name).collect();
        assert!(
            children.iter().all(|s| s.parent == turn.id),
            "{name}: {children:?}"
        );
    }
    // The model call carries its token counts.
    let model = find("model call");
    for attribute in ["input_tokens", "output_tokens"] {
        assert!(model.attributes.iter().any(|a| a == attribute), "{model:?}");
    }
}
