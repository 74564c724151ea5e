//! The Grafana dashboards shipped in the chart: their JSON has the shape
//! Grafana loads, and every panel's query, run by a real Prometheus (2.42)
//! scraping a running Turnpike under load and the database tier's
//! exporters (postgres_exporter 0.11.1 from Debian, spreaker's
//! prometheus-pgbouncer-exporter 2.1.2 from PyPI), parses and returns data.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use turnpike_testkit::{Agents, Paths, Stack, TestApp, eventually};

fn dashboards() -> Vec<(String, Value)> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../helm/turnpike/dashboards"
    ));
    let mut found: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            (
                path.display().to_string(),
                serde_json::from_str(&text).unwrap(),
            )
        })
        .collect();
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Load that moves every metric the dashboards plot.
async fn load(user: &turnpike_testkit::User) {
    let tools = json!([{"type": "conversation_search"}]);
    let reply = user
        .call(
            "POST",
            "/v1/responses",
            Some(
                json!({"input": "/call conversation_search {\"query\":\"toll\"}", "tools": tools}),
            ),
        )
        .await;
    let conversation = reply.ok()["conversation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let long = "The toll road runs north past quiet fields. ".repeat(30);
    for input in [format!("/echo {long}"), "and then?".to_owned()] {
        user.call(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "input": input,
                        "context_management": [{"type": "compaction", "compact_threshold": 300}]})),
        )
        .await
        .ok();
    }
    let (_, events) = user
        .stream(
            "POST",
            "/v1/responses",
            Some(json!({"conversation": conversation, "input": "/echo streamed", "stream": true})),
            &[],
        )
        .await;
    assert_eq!(events.last().unwrap().data["type"], "response.completed");
    for _ in 0..5 {
        user.list_items(&conversation, "?limit=5").await.ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_query_returns_data_from_prometheus() {
    // The JSON first: what Grafana needs of each dashboard and panel.
    let boards = dashboards();
    assert_eq!(boards.len(), 3);
    let mut queries = Vec::new();
    for (path, board) in &boards {
        assert!(
            board["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{path}"
        );
        assert!(
            board["title"].is_string() && board["schemaVersion"].is_number(),
            "{path}"
        );
        let variables: Vec<&str> = board["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(variables.contains(&"datasource"), "{path}");
        let panels = board["panels"].as_array().unwrap();
        let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
        ids.dedup();
        assert_eq!(ids.len(), panels.len(), "{path}: panel ids are unique");
        for panel in panels {
            let title = panel["title"].as_str().unwrap();
            assert!(panel["type"].is_string(), "{path}: {title}");
            for key in ["x", "y", "w", "h"] {
                assert!(panel["gridPos"][key].is_u64(), "{path}: {title}");
            }
            assert_eq!(
                panel["datasource"]["uid"], "${datasource}",
                "{path}: {title}"
            );
            for target in panel["targets"].as_array().unwrap() {
                assert!(target["refId"].is_string(), "{path}: {title}");
                queries.push((
                    format!("{path}: {title}"),
                    target["expr"].as_str().unwrap().to_owned(),
                ));
            }
        }
    }

    // A running Turnpike under load, its reads and writes through PgBouncer…
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::PGBOUNCER);
    let _agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    load(&user).await;

    // …the database tier's exporters, as the chart runs them: a
    // postgres_exporter per node and a pgbouncer exporter per PgBouncer…
    let dir = std::env::temp_dir().join(format!(
        "turnpike-prometheus-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let mut exporters = Vec::new();
    let mut database_targets = String::new();
    for node in ["primary", "replica1"] {
        let postgres = free_port();
        exporters.push(
            tokio::process::Command::new("prometheus-postgres-exporter")
                .arg(format!("--web.listen-address=127.0.0.1:{postgres}"))
                .env(
                    "DATA_SOURCE_NAME",
                    format!(
                        "postgresql://postgres@127.0.0.1:{}/turnpike?sslmode=disable",
                        stack.port(node)
                    ),
                )
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start postgres_exporter (Debian's prometheus-postgres-exporter)"),
        );
        let pgbouncer = free_port();
        let config = dir.join(format!("pgbouncer-exporter-{node}.yml"));
        std::fs::write(
            &config,
            format!(
                "exporter_host: 127.0.0.1\nexporter_port: {pgbouncer}\npgbouncers:\n  \
                 - dsn: postgresql://postgres@127.0.0.1:{}/pgbouncer\n",
                stack.bouncer_port(node)
            ),
        )
        .unwrap();
        exporters.push(
            tokio::process::Command::new("python3")
                .args(["-m", "prometheus_pgbouncer_exporter.cli", "--config"])
                .arg(&config)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("start prometheus-pgbouncer-exporter"),
        );
        database_targets.push_str(&format!(
            "      - {{targets: ['127.0.0.1:{postgres}', '127.0.0.1:{pgbouncer}'], labels: {{node: {node}}}}}\n"
        ));
    }

    // …all scraped every second by Prometheus on loopback.
    let target = app.url.trim_start_matches("http://");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n  - job_name: turnpike\n    static_configs: [{{targets: ['{target}']}}]\n\
             \x20 - job_name: database\n    static_configs:\n{database_targets}"
        ),
    )
    .unwrap();
    let port = free_port();
    let _prometheus = tokio::process::Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus (Debian's prometheus package)");
    let http = reqwest::Client::new();
    let query = |expr: String| {
        let http = http.clone();
        async move {
            let reply: Value = http
                .get(format!("http://127.0.0.1:{port}/api/v1/query"))
                .query(&[("query", expr)])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            Some(reply)
        }
    };
    // Enough samples for a rate over the dashboards' window, with load
    // going on meanwhile.
    eventually(
        "Prometheus has scraped Turnpike and the exporters a few times",
        Duration::from_secs(60),
        || async {
            load(&user).await;
            // Every target up, each scraped a few times.
            let reply = query("min(count_over_time(up[1m]) * up)".into()).await?;
            let samples = reply["data"]["result"][0]["value"][1]
                .as_str()?
                .parse::<f64>()
                .ok()?;
            (samples >= 4.0).then_some(())
        },
    )
    .await;

    for (panel, expr) in &queries {
        // Grafana's variables, as Grafana would substitute them.
        let expr = expr.replace("$__rate_interval", "15s");
        let reply = query(expr.clone()).await.expect("Prometheus answers");
        assert_eq!(reply["status"], "success", "{panel}: {expr}: {reply}");
        let result = reply["data"]["result"].as_array().unwrap();
        assert!(!result.is_empty(), "{panel}: {expr} returned no data");
    }
    println!("{} panel queries checked against Prometheus", queries.len());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_served_on_ports_of_their_own() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.api.metrics_port = free_port();
    settings.worker.metrics_port = free_port();
    let _agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings.clone()).await;
    let user = app.new_user().await;
    user.call(
        "POST",
        "/v1/responses",
        Some(json!({"input": "/echo counted"})),
    )
    .await
    .ok();
    let http = reqwest::Client::new();
    // Not on the public port…
    let public = http
        .get(format!("{}/metrics", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    // …but on the api's and the worker's own.
    for port in [settings.api.metrics_port, settings.worker.metrics_port] {
        let body = eventually(
            "the metrics listener answers",
            Duration::from_secs(5),
            || {
                let http = http.clone();
                async move {
                    let reply = http
                        .get(format!("http://127.0.0.1:{port}/metrics"))
                        .send()
                        .await
                        .ok()?;
                    reply.text().await.ok()
                }
            },
        )
        .await;
        assert!(body.contains("turnpike_turns_total"), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_share_one_metric_label() {
    let stack = Stack::shared().await;
    let app = TestApp::spawn_with(stack.settings(Paths::DIRECT)).await;
    let http = reqwest::Client::new();
    for method in ["FROB", "QUUX", "get"] {
        let reply = http
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
                format!("{}/v1/conversations", app.url),
            )
            .send()
            .await
            .unwrap();
        assert!(
            reply.status().is_client_error(),
            "{method}: {}",
            reply.status()
        );
    }
    let text = app.metrics().await;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("turnpike_http_requests_total{"))
        .collect();
    assert!(
        series.iter().any(|l| l.contains("method=\"_OTHER\"")),
        "{series:#?}"
    );
    for method in ["FROB", "QUUX", "method=\"get\""] {
        assert!(!text.contains(method), "{method} has a series: {series:#?}");
    }
}
