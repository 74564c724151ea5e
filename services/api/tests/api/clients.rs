//! Real clients, unmodified, installed from their registries, against
//! Turnpike and the mock model: the official openai Node SDK, the Vercel AI
//! SDK, the OpenAI Agents SDK for Python, and the Codex CLI. Each script
//! asserts what its client got, flow by flow.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use serde_json::json;
use turnpike_testkit::{Paths, Stack, TestApp, User};

fn tests_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests")
}

/// Runs a client against a fresh api and worker, as `user`.
async fn run_client(program: &str, args: &[&str]) -> (Output, TestApp, User) {
    let stack = Stack::shared().await;
    let (app, agents) = TestApp::spawn_with_agents(&stack, Paths::PGBOUNCER).await;
    let user = app.new_user().await;
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(tests_dir())
        .env("OPENAI_BASE_URL", format!("{}/v1", app.url))
        .env("OPENAI_API_KEY", &user.key)
        .env("TURNPIKE_MODEL", "mock-1")
        .stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output().expect("run the client"))
        .await
        .unwrap();
    drop(agents);
    (output, app, user)
}

fn assert_ran(output: &Output) {
    print!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(
        output.status.success(),
        "the client failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_node_sdk() {
    let (output, _app, _user) = run_client("node", &["clients/node_sdk.mjs"]).await;
    assert_ran(&output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vercel_ai_sdk() {
    let (output, _app, _user) = run_client("node", &["clients/ai_sdk.mjs"]).await;
    assert_ran(&output);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_agents_sdk() {
    let (output, _app, _user) = run_client("python3", &["sdk/agents_sdk.py"]).await;
    assert_ran(&output);
}

/// `codex exec` with Turnpike as a `model_providers` entry: the mock
/// scripts an `exec_command` call, Codex runs it locally and sends the
/// output back (its whole history, `store: false`), and the final answer
/// carries the command's output. Nothing of the two turns is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_cli_runs_a_command_the_model_asks_for() {
    let stack = Stack::shared().await;
    let (app, _agents) = TestApp::spawn_with_agents(&stack, Paths::PGBOUNCER).await;
    let user = app.new_user().await;
    let home = std::env::temp_dir().join(format!("turnpike-codex-{}", uuid::Uuid::now_v7()));
    let work = home.join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(
        home.join("config.toml"),
        format!(
            r#"model = "mock-1"
model_provider = "turnpike"
approval_policy = "never"
sandbox_mode = "danger-full-access"
check_for_update_on_startup = false

[analytics]
enabled = false

[features]
plugins = false

[model_providers.turnpike]
name = "Turnpike"
base_url = "{}/v1"
wire_api = "responses"
env_key = "TURNPIKE_API_KEY"
request_max_retries = 0
stream_max_retries = 0
"#,
            app.url
        ),
    )
    .unwrap();
    let codex = tests_dir().join("clients/node_modules/.bin/codex");
    let mut command = Command::new(codex);
    command
        .args([
            "exec",
            "--skip-git-repo-check",
            "-m",
            "mock-1",
            r#"/call exec_command {"cmd":"echo hello-from-codex"}"#,
        ])
        .current_dir(&work)
        .env("CODEX_HOME", &home)
        .env("TURNPIKE_API_KEY", &user.key)
        .stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output().expect("run codex"))
        .await
        .unwrap();
    assert_ran(&output);
    let answer = String::from_utf8_lossy(&output.stdout);
    assert!(
        answer.contains("tool said:") && answer.contains("hello-from-codex"),
        "{answer}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // Codex sends `store: false`: its turns ran and nothing of them is kept.
    let listed = user.call("GET", "/v1/conversations", None).await;
    assert_eq!(listed.ok()["data"], json!([]));
    let _ = std::fs::remove_dir_all(&home);
}
