"""Lints and renders the Helm chart (defaults, and one primary with fifty
replicas and every option on), checks the values against the chart's
schema, and validates every manifest: Kubernetes kinds with
kubernetes-validate (strict), the CRD kinds (ScaledObject, ServiceMonitor,
CloudNativePG's Cluster) against their published schemas vendored in
tests/helm/schemas. A warning
is not a pass. Prints what each values set renders."""

import json
import pathlib
import sys
from collections import Counter

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "turnpike"
SCHEMAS = pathlib.Path(__file__).resolve().parent / "schemas"
KUBERNETES = "1.33.0"
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("postgresql.cnpg.io/v1", "Cluster"): "cluster-postgresql.cnpg.io-v1.json",
}

failures = []


def fail(message):
    failures.append(message)
    print("FAIL:", message)


def check_values(name, values):
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        rendered = chart.render(values, name="turnpike", namespace="turnpike")
    docs = [
        doc
        for text in rendered.values()
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    for doc in docs:
        where = f"{name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        schema_file = CRDS.get((doc.get("apiVersion"), doc.get("kind")))
        if schema_file:
            schema = json.loads((SCHEMAS / schema_file).read_text())
            errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
            for error in errors:
                fail(f"{where}: {error.message} at {list(error.path)}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        except Exception as error:  # noqa: BLE001 - every finding is a failure
            fail(f"{where}: {error}")
    kinds = Counter(doc["kind"] for doc in docs)
    print(f"{name}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    return docs


def deployments(docs):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def main():
    lint = helm.lint(str(CHART))
    for message in lint["messages"]:
        # 1 is INFO (e.g. "icon is recommended"); warnings and errors fail.
        if message["severity"] > 1:
            fail(f"lint: {message}")
    for error in lint["errors"]:
        fail(f"lint: {error}")

    defaults = check_values("defaults", {})
    found = deployments(defaults)
    for component in ("api", "worker", "pgbouncer-primary", "pgbouncer-replica1", "pgbouncer-replica2"):
        if f"turnpike-{component}" not in found:
            fail(f"defaults: no {component} Deployment")
    for name, deployment in found.items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if "resources" not in container:
                fail(f"defaults: {name} has no resources")
    # Termination waits out each process's own drain.
    api = found["turnpike-api"]["spec"]["template"]["spec"]
    worker = found["turnpike-worker"]["spec"]["template"]["spec"]
    if api["terminationGracePeriodSeconds"] <= 10 or worker["terminationGracePeriodSeconds"] <= 60:
        fail("defaults: termination grace shorter than the drain")

    example = yaml.safe_load((CHART / "examples" / "50-replicas.yaml").read_text())
    docs = check_values("50 replicas", example)
    kinds = Counter(d["kind"] for d in docs)
    pgbouncers = [n for n in deployments(docs) if n.startswith("turnpike-pgbouncer-")]
    if len(pgbouncers) != 51:
        fail(f"50 replicas: {len(pgbouncers)} PgBouncers, not 51")
    for kind in ("HorizontalPodAutoscaler", "ScaledObject", "NetworkPolicy"):
        if kinds[kind] != 1:
            fail(f"50 replicas: {kinds[kind]} {kind}")
    # Turnpike's own metrics, and the database tier's exporters: a
    # postgres_exporter per node, a pgbouncer exporter beside each PgBouncer,
    # each behind a Service labelled with its node.
    if kinds["ServiceMonitor"] != 2:
        fail(f"50 replicas: {kinds['ServiceMonitor']} ServiceMonitors, not 2")
    exporters = [n for n in deployments(docs) if n.startswith("turnpike-postgres-exporter-")]
    if len(exporters) != 51:
        fail(f"50 replicas: {len(exporters)} postgres exporters, not 51")
    for name in pgbouncers:
        containers = [c["name"] for c in deployments(docs)[name]["spec"]["template"]["spec"]["containers"]]
        if containers != ["pgbouncer", "exporter"]:
            fail(f"50 replicas: {name} runs {containers}")
    labelled = {
        d["metadata"]["labels"].get("turnpike.io/node")
        for d in docs
        if d["kind"] == "Service" and d["metadata"]["labels"].get("turnpike.io/db-metrics") == "true"
    }
    if len(labelled) != 51:
        fail(f"50 replicas: exporter Services for {len(labelled)} nodes, not 51")
    if kinds["PodDisruptionBudget"] != 2:
        fail("50 replicas: the api and worker disruption budgets are missing")
    api = deployments(docs)["turnpike-api"]
    env = [e["name"] for e in api["spec"]["template"]["spec"]["containers"][0]["env"]]
    if len(env) != len(set(env)):
        fail("50 replicas: duplicate environment variables")
    urls = [n for n in env if n.endswith("__POOLED_URL")]
    if len(urls) != 51:
        fail(f"50 replicas: {len(urls)} pooled URLs, not 51")

    # The database tier on CloudNativePG: a Cluster, and a Service and a
    # PgBouncer per instance beside the read-write one.
    docs = check_values("cloudnative-pg", {
        "cnpg": {"enabled": True, "instances": 3},
        "secrets": {"databasePassword": "not-a-real-password"},
    })
    kinds = Counter(d["kind"] for d in docs)
    if kinds["Cluster"] != 1:
        fail("cloudnative-pg: no Cluster")
    instances = [d for d in docs if d["kind"] == "Service" and "-db-instance-" in d["metadata"]["name"]]
    if len(instances) != 3:
        fail(f"cloudnative-pg: {len(instances)} instance Services, not 3")
    pgbouncers = [n for n in deployments(docs) if n.startswith("turnpike-pgbouncer-")]
    if len(pgbouncers) != 4:
        fail(f"cloudnative-pg: {len(pgbouncers)} PgBouncers, not 4")

    # Values the schema refuses.
    for bad in ({"database": {"nodes": []}}, {"api": {"replicas": "three"}}, {"nonsense": 1}):
        with helm.Chart.load(str(CHART)) as chart:
            try:
                chart.validate_schema(bad)
            except helm.HelmValuesError:
                continue
        fail(f"schema: accepted {bad}")

    if failures:
        print(f"{len(failures)} failures")
        sys.exit(1)
    print("helm chart: ok")


main()
