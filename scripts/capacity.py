#!/usr/bin/env python3
"""The capacity model: from one load run's per-request costs (make loadtest's
accounting.json and goose's report.json), what serving QPS requests per
second at the same mix takes; and, with --check, the model's prediction for
other runs (more api processes, fewer replicas) beside their measurement.

Usage: scripts/capacity.py RUN_DIR [--qps N] [--check RUN_DIR...]
  RUN_DIR holds accounting.json and report.json (target/loadtest by default).

Every input is a measured figure of RUN_DIR or a named assumption below
(--help lists them); docs/capacity.md explains each step."""

import argparse
import json
import math
import pathlib
import sys

WRITES = {"turn (stream)", "turn (background)", "cancel"}


def load(run):
    run = pathlib.Path(run)
    acc = json.loads((run / "accounting.json").read_text())
    report = json.loads((run / "report.json").read_text())
    counts = {
        f"{m['method']} {m['name']}": m["number_of_requests"]
        for m in report["raw_request_metrics"]
    }
    return acc, counts


def units(acc, counts):
    """Per-request costs of a run."""
    a = acc["accounting"]
    n = max(a["requests"], 1)
    seconds = a["seconds"]
    cpu = {k: v * 1000 / n for k, v in a["cpu_seconds"].items()}  # ms per request
    group = lambda prefix: sum(v for k, v in cpu.items() if k.startswith(prefix))
    writes = sum(v for k, v in counts.items() if k.split(" ", 1)[1] in WRITES)
    return {
        "requests": n,
        "seconds": seconds,
        "qps": n / seconds,
        "write_share": writes / n,
        "writes_per_s": writes / seconds,
        "ms": {
            "api": cpu.get("api", 0.0),
            "worker": cpu.get("worker", 0.0),
            "postgres primary": cpu.get("postgres-primary", 0.0),
            "postgres replicas": group("postgres-replica"),
            "pgbouncer": group("pgbouncer-"),
            "redis": cpu.get("redis", 0.0),
        },
        "loadgen_ms": cpu.get("loadgen", 0.0),
        "mock_ms": cpu.get("mock-model", 0.0),
        "primary_queries": a["queries_per_request"].get("primary", 0.0),
        "replica_queries": sum(v for k, v in a["queries_per_request"].items() if k != "primary"),
        "node_queries": a["queries_per_request"],
        "redis_commands": a["redis_commands_per_request"],
        "wal_per_write": a.get("wal_bytes", 0) / max(writes, 1),
        "cache_hit": a["cache_hit_ratio_by_level"]["total"],
        "api_processes": acc.get("api_processes", 1),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default="target/loadtest")
    p.add_argument("--qps", type=float, default=1_000_000)
    p.add_argument("--pod-cores", type=float, default=8, help="vCPU of an api or worker pod (8)")
    p.add_argument("--db-cores", type=float, default=64, help="vCPU of a replica server (64)")
    p.add_argument("--primary-cores", type=float, default=96, help="vCPU of the largest primary (96)")
    p.add_argument("--utilization", type=float, default=0.6, help="target CPU utilization of pods and replicas (0.6)")
    p.add_argument("--single-thread-utilization", type=float, default=0.7,
                   help="target utilization of one PgBouncer or Redis core (0.7)")
    p.add_argument("--max-connections", type=int, default=5000, help="connections per Postgres server (5000)")
    p.add_argument("--pool-per-node", type=int, default=16, help="database.max_connections_per_node (16)")
    p.add_argument("--bouncer-pool", type=int, default=40, help="PgBouncer default_pool_size (40)")
    p.add_argument("--egress-gbit", type=float, default=10, help="primary NIC for WAL to replicas, Gbit/s (10)")
    p.add_argument("--host-cores", type=float, default=2, help="cores of the machine the runs were measured on (2)")
    p.add_argument("--check", nargs="*", default=[], help="runs to predict from RUN's per-request costs")
    p.add_argument("--write-share", type=float, default=None,
                   help="size for this share of writes instead of the run's: the worker's and the "
                        "primary's CPU (turn work) scale with it, the rest stays per request")
    args = p.parse_args()

    acc, counts = load(args.run)
    u = units(acc, counts)
    q = args.qps
    measured_share = u["write_share"]
    print(f"# per-request costs, measured ({args.run}: {u['requests']} requests, {u['qps']:.0f} req/s, "
          f"{u['api_processes']} api process(es))")
    print(f"write share {u['write_share']:.2%} ({u['writes_per_s']:.0f} writes/s), "
          f"read cache hit ratio {u['cache_hit']:.3f}")
    for kind, ms in u["ms"].items():
        print(f"  {kind:<18} {ms * 1000:8.1f} µs CPU per request")
    total = sum(u["ms"].values())
    print(f"  {'serving total':<18} {total * 1000:8.1f} µs  (load generator {u['loadgen_ms'] * 1000:.1f} µs, "
          f"mock model {u['mock_ms'] * 1000:.1f} µs, not counted)")
    print(f"  queries per request: primary {u['primary_queries']:.2f}, replicas {u['replica_queries']:.2f}; "
          f"Redis commands per request {u['redis_commands']:.1f}; WAL {u['wal_per_write']:.0f} bytes per write")

    if args.write_share is not None:
        scale = args.write_share / max(measured_share, 1e-9)
        u["ms"]["worker"] *= scale
        u["ms"]["postgres primary"] *= scale
        u["write_share"] = args.write_share
        print(f"\n(sized for a write share of {args.write_share:.2%} instead of {measured_share:.2%}: "
              f"worker and primary CPU per request × {scale:.2f})")
    print(f"\n# {q:,.0f} requests/s at a write share of {u['write_share']:.2%}")
    cores = {k: v * q / 1000 for k, v in u["ms"].items()}
    api_pods = math.ceil(cores["api"] / (args.pod_cores * args.utilization))
    worker_pods = math.ceil(cores["worker"] / (args.pod_cores * args.utilization))
    replicas = max(1, math.ceil(cores["postgres replicas"] / (args.db_cores * args.utilization)))
    bouncers = math.ceil(cores["pgbouncer"] / args.single_thread_utilization)
    redis_shards = math.ceil(cores["redis"] / args.single_thread_utilization)
    primary_util = cores["postgres primary"] / args.primary_cores
    print(f"  api pods ({args.pod_cores:g} vCPU at {args.utilization:.0%}): {api_pods}  ({cores['api']:,.0f} cores)")
    print(f"  worker pods: {worker_pods}  ({cores['worker']:,.0f} cores)")
    print(f"  replicas ({args.db_cores:g} vCPU at {args.utilization:.0%}): {replicas}  "
          f"({cores['postgres replicas']:,.0f} cores)")
    print(f"  PgBouncer processes (one core each at {args.single_thread_utilization:.0%}): {bouncers}, "
          f"{math.ceil(bouncers / (replicas + 1))} per node")
    print(f"  Redis shards (one core each at {args.single_thread_utilization:.0%}): {redis_shards}  "
          f"({u['redis_commands'] * q:,.0f} commands/s)")
    ceiling_qps = args.primary_cores * 0.7 * 1000 / max(u["ms"]["postgres primary"], 1e-9)
    print(f"  primary: {cores['postgres primary']:,.0f} cores needed of {args.primary_cores:g} "
          f"({primary_util:.0%}); at 70% it takes {ceiling_qps:,.0f} req/s at this mix, "
          f"{ceiling_qps * u['write_share']:,.0f} writes/s; the mix's {q * u['write_share']:,.0f} writes/s "
          f"use {q * u['write_share'] / max(ceiling_qps * u['write_share'], 1e-9):.0%} of that ceiling")
    print(f"    the write share one primary holds at {q:,.0f} req/s: "
          f"{min(1.0, ceiling_qps * u['write_share'] / q):.2%}")
    # Connections: every api pod keeps up to pool-per-node to each node it
    # reads (through PgBouncer: to the node's PgBouncers), every worker pod
    # to the primary.
    direct = api_pods * args.pool_per_node
    per_node_bouncers = max(1, math.ceil(bouncers / (replicas + 1)))
    print(f"  connections: {direct:,} client connections per node from the api pods "
          f"({'over' if direct > args.max_connections else 'within'} {args.max_connections:,} direct); "
          f"through {per_node_bouncers} PgBouncer(s) per node, "
          f"{per_node_bouncers * args.bouncer_pool:,} server connections per replica and "
          f"{per_node_bouncers * args.bouncer_pool + worker_pods * args.pool_per_node:,} on the primary "
          f"(workers {worker_pods * args.pool_per_node:,} of them)")
    wal = u["wal_per_write"] * q * u["write_share"]
    egress = wal * replicas * 8 / 1e9
    print(f"  WAL: {wal / 1e6:,.1f} MB/s, to {replicas} replicas {egress:,.1f} Gbit/s from the primary "
          f"({egress / args.egress_gbit:.0%} of {args.egress_gbit:g} Gbit/s); cascading replication past "
          f"~100 replicas or when that passes ~50%: "
          f"{'needed' if replicas > 100 or egress > args.egress_gbit / 2 else 'not needed'}")

    if args.check:
        print(f"\n# prediction from {args.run} beside measurement (host of {args.host_cores:g} cores)")
        print(f"  {'run':<28} {'pred req/s':>10} {'meas req/s':>10} {'err':>6}   per-request CPU µs: predicted → measured")
        if args.write_share is not None:
            sys.exit("--check compares runs at their own mix; leave out --write-share")
        predicted_qps = args.host_cores * 1000 / (total + u["loadgen_ms"] + u["mock_ms"])
        for run in args.check:
            acc2, counts2 = load(run)
            m = units(acc2, counts2)
            total2 = sum(m["ms"].values())
            err = (m["qps"] - predicted_qps) / predicted_qps
            print(f"  {pathlib.Path(run).name:<28} {predicted_qps:>10,.0f} {m['qps']:>10,.0f} {err:>+6.0%}   "
                  f"api {u['ms']['api'] * 1000:.0f} → {m['ms']['api'] * 1000:.0f}, "
                  f"serving {total * 1000:.0f} → {total2 * 1000:.0f}, "
                  f"replica queries/request {u['replica_queries']:.2f} → {m['replica_queries']:.2f}, "
                  f"primary {u['primary_queries']:.2f} → {m['primary_queries']:.2f}")
            print("      queries per request by node: "
                  + ", ".join(f"{node} {v:.2f}" for node, v in sorted(m["node_queries"].items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
