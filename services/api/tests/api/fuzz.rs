//! Schemathesis, driven by `/openapi.json`, against a running Turnpike with
//! a user key and an admin key: every phase (examples, coverage, fuzzing,
//! stateful), no server error, every answer as documented.

use std::process::Command;
use std::time::Duration;

use turnpike_testkit::{Agents, Paths, Stack, TestApp};

/// Runs schemathesis on the operations matching `include` (a path regex)
/// with `key`, for at most `seconds`; its output on failure.
fn schemathesis(url: &str, key: &str, include: &str, exclude: &str, seconds: u64) {
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fuzz/schemathesis.toml"
    );
    let output = Command::new("schemathesis")
        .args(["--config-file", config, "run"])
        .arg(format!("{url}/openapi.json"))
        .args(["--url", url])
        .args(["-H", &format!("Authorization: Bearer {key}")])
        .args(["--include-path-regex", include])
        .args(["--exclude-path-regex", exclude])
        .args(["--phases", "examples,coverage,fuzzing,stateful"])
        .args(["--max-time", &seconds.to_string()])
        .args(["--request-timeout", "10"])
        .args(["--workers", "2"])
        .args(["--suppress-health-check", "all"])
        .output()
        .expect("run schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    let summary = stdout.rsplit("= SUMMARY =").next().unwrap_or_default();
    // A failed check, or an error reaching the API (a connection refused
    // or reset, a timeout), fails the test. Schemathesis's own generator
    // errors ("Runtime Error": its Hypothesis strategies failing to draw
    // from a deep schema) say nothing about the API and are reported only.
    let errors: Vec<&str> = summary
        .lines()
        .skip_while(|line| line.trim() != "Errors:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter(|line| !line.contains("Runtime Error"))
        .collect();
    assert!(
        output.status.success() || (!summary.contains("Failures:") && errors.is_empty()),
        "schemathesis found failures:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        summary.contains("Tested:") && summary.contains(" passed"),
        "schemathesis ran no test:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_undocumented_answer() {
    // A topology of its own: the admin run flips kill switches.
    let stack = Stack::private().await;
    let mut settings = stack.settings(Paths::DIRECT);
    settings.limits.user_requests_per_s = 100_000;
    settings.limits.user_burst = 100_000;
    settings.limits.key_requests_per_s = 100_000;
    settings.limits.key_burst = 100_000;
    settings.api.response_wait_ms = 5_000;
    let _agents = Agents::spawn(&mut settings).await;
    let app = TestApp::spawn_with(settings).await;
    let user = app.new_user().await;
    let admin = app.new_admin().await;
    let url = app.url.clone();
    tokio::time::timeout(
        Duration::from_secs(400),
        tokio::task::spawn_blocking(move || {
            schemathesis(
                &url,
                &user.key,
                "^/(v1|healthz|readyz|openapi)",
                "^/v1/admin/",
                120,
            );
            schemathesis(&url, &admin.key, "^/v1/admin/", "^$", 40);
        }),
    )
    .await
    .expect("schemathesis within its time")
    .unwrap();
}
