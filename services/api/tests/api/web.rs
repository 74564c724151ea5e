//! The web pages, driven in headless Chromium: the demo by
//! tests/web/demo.mjs, the ops page by tests/web/ops.mjs.

use std::process::Command;

use turnpike_testkit::{Agents, Paths, Stack, TestApp};

/// Runs `tests/web/<script>` with node and `env` (plus SCREENSHOT, at
/// `target/<screenshot>`); its output when it fails.
async fn drive(script: &str, screenshot: &str, env: Vec<(&'static str, String)>) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let script = format!("{root}/tests/web/{script}");
    let screenshot = format!("{root}/target/{screenshot}");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .current_dir(format!("{root}/tests/web"))
            .envs(env)
            .env("SCREENSHOT", &screenshot)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "browser test failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_demo_streams_resumes_after_reload_and_shows_tool_calls() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    // Slow enough to reload in the middle of an answer.
    let _agents = Agents::spawn_slow(&mut settings, 25, 60).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    drive(
        "demo.mjs",
        "web-demo.png",
        vec![
            ("TURNPIKE_URL", app.url.clone()),
            ("TURNPIKE_API_KEY", user.key),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ops_page_plots_the_live_service_for_an_admin() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    let _agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let admin = app.new_admin().await;
    let user = app.new_user().await;
    // Something to plot.
    for n in 0..5 {
        user.call(
            "POST",
            "/v1/responses",
            Some(serde_json::json!({"input": format!("/echo {n}")})),
        )
        .await
        .ok();
    }
    // The data routes need an admin key.
    user.call("GET", "/v1/admin/metrics", None).await.error(403);
    drive(
        "ops.mjs",
        "ops-page.png",
        vec![
            ("TURNPIKE_URL", app.url.clone()),
            ("TURNPIKE_ADMIN_KEY", admin.key),
        ],
    )
    .await;
}

/// A web page of another origin calls the API from Chromium with its key
/// (`api.cors_allowed_origins`): the preflight, the answer, an error and the
/// rate-limit state are all readable by the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_origin_calls_the_api_from_a_browser() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.api.cors_allowed_origins = vec!["*".into()];
    let _agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    drive(
        "cors.mjs",
        "cors.png",
        vec![
            ("TURNPIKE_URL", app.url.clone()),
            ("TURNPIKE_API_KEY", user.key),
        ],
    )
    .await;
}

/// CORS headers go only to the configured origins, and not at all by
/// default: a preflight from another origin is answered for an allowed one
/// (the headers it asks for, `Authorization` among them), an answer carries
/// the origin and the headers a page may read, and an origin not listed
/// gets nothing a browser would accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_only_the_configured_origins() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    // Written as an operator might; a browser sends `https://app.example`.
    settings.api.cors_allowed_origins = vec!["https://App.Example:443".into()];
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let http = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        http.request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/responses", app.url),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
    };
    let allowed = preflight("https://app.example").await.unwrap();
    assert!(allowed.status().is_success(), "{}", allowed.status());
    let header = |r: &reqwest::Response, name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase)
    };
    assert_eq!(
        header(&allowed, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert!(
        header(&allowed, "access-control-allow-headers")
            .is_some_and(|h| h.contains("authorization"))
    );
    assert!(header(&allowed, "access-control-allow-methods").is_some_and(|m| m.contains("post")));
    let other = preflight("https://evil.example").await.unwrap();
    assert_eq!(header(&other, "access-control-allow-origin"), None);

    let answer = http
        .get(format!("{}/v1/models", app.url))
        .header("origin", "https://app.example")
        .bearer_auth(&user.key)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        header(&answer, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert!(
        header(&answer, "access-control-expose-headers")
            .is_some_and(|h| h.contains("ratelimit") && h.contains("retry-after"))
    );

    // Off by default: no CORS headers, and a preflight is not answered.
    let plain = TestApp::spawn(&stack, Paths::DIRECT).await;
    let refused = http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/responses", plain.url),
        )
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(header(&refused, "access-control-allow-origin"), None);
}
