//! The Helm chart: linted and rendered with Helm's own SDK, for the
//! defaults and for one primary with fifty replicas and every option on;
//! every manifest validated against the Kubernetes schemas and the
//! published CRD schemas (tests/helm/check.py).

use std::process::Command;

#[test]
fn the_helm_chart_lints_renders_and_validates() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/helm/check.py");
    let output = Command::new("python3")
        .arg(script)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "chart check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
