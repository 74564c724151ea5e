//! The web demo, driven in headless Chromium by tests/web/demo.mjs.

use std::process::Command;

use turnpike_testkit::{Agents, Paths, Stack, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_demo_streams_resumes_after_reload_and_shows_tool_calls() {
    let stack = Stack::shared().await;
    let mut settings = stack.settings(Paths::DIRECT);
    // Slow enough to reload in the middle of an answer.
    let _agents = Agents::spawn_slow(&mut settings, 25, 60).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let screenshot = format!("{root}/target/web-demo.png");
    let url = app.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(format!("{root}/tests/web/demo.mjs"))
            .current_dir(format!("{root}/tests/web"))
            .env("TURNPIKE_URL", url)
            .env("TURNPIKE_API_KEY", user.key)
            .env("SCREENSHOT", &screenshot)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "web demo test failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
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
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let screenshot = format!("{root}/target/ops-page.png");
    let url = app.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(format!("{root}/tests/web/ops.mjs"))
            .current_dir(format!("{root}/tests/web"))
            .env("TURNPIKE_URL", url)
            .env("TURNPIKE_ADMIN_KEY", admin.key)
            .env("SCREENSHOT", &screenshot)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "ops page test failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
