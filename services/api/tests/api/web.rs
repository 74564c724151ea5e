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
