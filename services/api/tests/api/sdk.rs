//! The official `openai` Python SDK, unmodified, against Turnpike.

use std::process::Command;

use turnpike_testkit::{Paths, Stack, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_python_sdk_round_trip() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::PGBOUNCER).await;
    let user = app.new_user().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/sdk/openai_sdk.py");
    let base_url = format!("{}/v1", app.url);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .env("OPENAI_BASE_URL", base_url)
            .env("OPENAI_API_KEY", user.key)
            .output()
            .expect("run python3")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "SDK script failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
