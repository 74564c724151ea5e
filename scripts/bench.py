"""The measuring half of `make bench` (scripts/bench boots the stack, seeds
the page and calls this with the environment it exported).

Each pair (Turnpike, its baseline) runs interleaved, round after round, so
a noisy neighbour slows both sides of a round alike; a line gives the median
of the per-round ratios and their range. Beside every throughput the CPU
each process spent per request, from /proc: on shared cores this is the
figure that does not move with the neighbours.

Everything is also written as JSON to target/bench/report.json.
"""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg2

ROOT = Path(os.environ["ROOT"])
DEV = Path(os.environ["TURNPIKE_DEV_DIR"])
BIN = os.environ["TURNPIKE_BIN"]
BASE = int(os.environ["TURNPIKE_DEV_PORT_BASE"])
URL = os.environ["TURNPIKE_URL"]
KEY = os.environ["TURNPIKE_API_KEY"]
URL_PATH = os.environ["BENCH_URL_PATH"]
BODY = os.environ["BENCH_BODY"]
SQL = os.environ["BENCH_SQL"]
PGBIN = os.environ["BENCH_PGBIN"]
SSE_BENCH = str(ROOT / "target/release/sse-bench")

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "5"))
CONNS = int(os.environ.get("BENCH_CONNECTIONS", "64"))
PG_CLIENTS = int(os.environ.get("BENCH_PG_CLIENTS", "16"))
TURN_ROUNDS = int(os.environ.get("BENCH_TURN_ROUNDS", "3"))
TURNS = int(os.environ.get("BENCH_TURNS", "1000"))
FIRST_TOKEN_TURNS = int(os.environ.get("BENCH_FIRST_TOKEN_TURNS", "300"))
FIRST_TOKEN_CONCURRENCY = int(os.environ.get("BENCH_FIRST_TOKEN_CONCURRENCY", "50"))
# The paced line: the mock streams its answer (ANSWER_TOKENS tokens, the
# mock's default) at this many tokens a second, as a model does.
PACED_TOKENS_PER_S = int(os.environ.get("BENCH_PACED_TOKENS_PER_S", "50"))
ANSWER_TOKENS = 24
# The chat line: each client goes on from its last response
# (previous_response_id) for this many turns before a new conversation.
CHAT_TURNS = int(os.environ.get("BENCH_CHAT_TURNS", "10"))
SSE_STREAMS = int(os.environ.get("BENCH_SSE_STREAMS", "1000"))
SSE_RATE = int(os.environ.get("BENCH_SSE_RATE", "3000"))
SSE_ROUNDS = int(os.environ.get("BENCH_SSE_ROUNDS", "3"))
IDLE_STREAMS = int(os.environ.get("BENCH_SSE_IDLE_STREAMS", "10000"))

TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")
REPLICA_PORT = BASE + 1
REPLICA_BOUNCER = BASE + 11
PRIMARY_PORT = BASE


def say(text):
    print(f"\033[1;34m==>\033[0m {text}", file=sys.stderr, flush=True)


# --- CPU accounting from /proc ------------------------------------------


def _stat(pid):
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw.rsplit(")", 1)[1].split()
    # After the command name: state is field 3, ppid 4, utime 14, stime 15,
    # cutime 16, cstime 17 (1-based, as in proc(5)).
    return {
        "ppid": int(fields[1]),
        "own": int(fields[11]) + int(fields[12]),
        "children": int(fields[13]) + int(fields[14]),
    }


def process_ticks(pid):
    stat = _stat(pid)
    return stat["own"] if stat else 0


def tree_ticks(pid):
    """A server that forks a process per connection (PostgreSQL): its own
    time, its reaped children's, and its live children's. A child reaped
    between reading the parent and listing the children would be counted in
    neither (pgbench's backends exit as it ends): the parent is read again
    after the listing, and the count taken again if its reaped children's
    time moved in between."""
    while True:
        stat = _stat(pid)
        if stat is None:
            return 0
        live = 0
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                child = _stat(entry)
                if child and child["ppid"] == pid:
                    live += child["own"]
        again = _stat(pid)
        if again is None or again["children"] == stat["children"]:
            return stat["own"] + stat["children"] + live


def pidfile(path):
    return int(Path(path).read_text().split()[0])


def postmaster(node):
    return pidfile(DEV / "pg" / node / "postmaster.pid")


class Meter:
    """CPU ticks of named processes between start() and stop()."""

    def __init__(self, **sources):
        self.sources = sources  # name -> callable returning ticks

    def start(self):
        self.before = {name: read() for name, read in self.sources.items()}

    def stop(self, units):
        after = {name: read() for name, read in self.sources.items()}
        units = max(units, 1)
        return {name: (after[name] - self.before[name]) * TICK_US / units for name in after}


def sources(*names, api_pid=None, bare_pid=None):
    table = {
        "api": lambda: process_ticks(api_pid),
        "bare_axum": lambda: process_ticks(bare_pid),
        "worker": lambda: process_ticks(pidfile(DEV / "run/worker.pid")),
        "mock_model": lambda: process_ticks(pidfile(DEV / "run/mock-model.pid")),
        "redis": lambda: process_ticks(pidfile(DEV / "run/redis.pid")),
        "primary": lambda: tree_ticks(postmaster("primary")),
        "replica": lambda: tree_ticks(postmaster("replica1")),
        "replicas": lambda: tree_ticks(postmaster("replica1")) + tree_ticks(postmaster("replica2")),
        "pgbouncer": lambda: process_ticks(pidfile(DEV / "pg/pgbouncer/replica1.pid")),
        "pgbouncer_primary": lambda: process_ticks(pidfile(DEV / "pg/pgbouncer/primary.pid")),
    }
    return {name: table[name] for name in names}


# --- load generators -----------------------------------------------------


def wrk(url, *args):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{CONNS}", f"-d{SECONDS}s", "--latency", *args, url],
        capture_output=True, text=True, check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    p99 = re.search(r"^\s*99%\s+(\S+)", out, re.M).group(1)
    return {
        "rps": float(re.search(r"Requests/sec:\s+(\S+)", out).group(1)),
        "requests": requests,
        "p99_ms": to_ms(p99),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": errors.group(1) if errors else None,
    }


def to_ms(text):
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def pgbench(mode, port):
    out = subprocess.run(
        [f"{PGBIN}/pgbench", "-n", "-M", mode, "-c", str(PG_CLIENTS), "-j", "2", "-T", str(SECONDS),
         "-f", SQL, "-h", "127.0.0.1", "-p", str(port), "-U", "turnpike", "turnpike"],
        capture_output=True, text=True, check=True,
    ).stdout
    transactions = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    return {
        "rps": float(re.search(r"^tps = ([\d.]+)", out, re.M).group(1)),
        "requests": transactions,
    }


def measured(run, meter):
    meter.start()
    result = run()
    result["cpu_us"] = meter.stop(result["requests"])
    return result


def wait_ok(url, headers=()):
    args = ["curl", "-sf", "-o", "/dev/null", url]
    for header in headers:
        args += ["-H", header]
    for _ in range(200):
        if subprocess.run(args).returncode == 0:
            return
        time.sleep(0.05)
    raise SystemExit(f"{url} never answered")


def start_api(port, name, only_replica=None, **settings):
    env = dict(os.environ, TURNPIKE__API__PORT=str(port), **settings)
    if only_replica:
        # The other replicas left out of the api's configuration.
        for key in list(env):
            if (key.startswith("TURNPIKE__DATABASE__NODES__REPLICA")
                    and not key.startswith(f"TURNPIKE__DATABASE__NODES__{only_replica.upper()}__")):
                del env[key]
    log = open(DEV / "logs" / f"{name}.log", "ab")
    process = subprocess.Popen([BIN, "api"], env=env, stdout=log, stderr=log)
    wait_ok(f"http://127.0.0.1:{port}{URL_PATH}", [f"Authorization: Bearer {KEY}"])
    return process


def dev(*args, **settings):
    subprocess.run([str(ROOT / "scripts/dev"), *args], check=True, env=dict(os.environ, **settings),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# --- statistics -----------------------------------------------------------


def median(values):
    return statistics.median(values)


def spread(values, fmt="{:.2f}"):
    return f"{fmt.format(min(values))}–{fmt.format(max(values))}"


def machine():
    """The CPU model, its cores and clock: what a core does per second moves
    with the host (and its neighbours), so a run says what it ran on."""
    model, mhz = "unknown", None
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model == "unknown":
            model = value
        elif key == "cpu MHz" and mhz is None:
            mhz = float(value)
    return {"model": model, "cores": os.cpu_count(), "mhz": mhz}


def stack_cpu_ms(rounds, names):
    """The servers' CPU per unit of work, all of them together (ms)."""
    return sum(median([r["cpu_us"][name] for r in rounds]) for name in names) / 1000


def cpu_text(rounds, names):
    parts = []
    for name in names:
        values = [r["cpu_us"][name] for r in rounds]
        parts.append(f"{name} {median(values):.0f} µs")
    return ", ".join(parts)


# --- the reads: pairs over rounds ---------------------------------------


def reads():
    header = f"Authorization: Bearer {KEY}"
    page = URL_PATH
    bare_port, direct_port, pooled_port = BASE + 31, BASE + 32, BASE + 33
    bare = subprocess.Popen([str(ROOT / "target/release/bare-axum"), str(bare_port), BODY],
                            stdout=subprocess.DEVNULL)
    wait_ok(f"http://127.0.0.1:{bare_port}/")
    l1_pid = pidfile(DEV / "run/api.pid")
    wait_ok(f"{URL}{page}", [header])
    # The uncached apis read from replica1 alone, the replica pgbench reads:
    # the same SELECT on the same server, so that the pair compares the api
    # with the driver, not one PostgreSQL server with two sharing the cores.
    direct = start_api(direct_port, "api-uncached", only_replica="replica1",
                       TURNPIKE__CACHE__ENABLED="false")
    pooled = start_api(pooled_port, "api-uncached-pgbouncer", only_replica="replica1",
                       TURNPIKE__CACHE__ENABLED="false", TURNPIKE__DATABASE__REPLICA_PATH="pgbouncer")
    writes_lua = write_script()
    plan = [
        ("bare_axum", lambda: wrk(f"http://127.0.0.1:{bare_port}/"),
         sources("bare_axum", bare_pid=bare.pid)),
        ("read_l1_items", lambda: wrk(f"{URL}{page}", "-H", header),
         sources("api", "redis", api_pid=l1_pid)),
        ("read_replica_items", lambda: wrk(f"http://127.0.0.1:{direct_port}{page}", "-H", header),
         sources("api", "replica", "redis", api_pid=direct.pid)),
        ("pgbench_prepared", lambda: pgbench("prepared", REPLICA_PORT), sources("replica")),
        ("read_replica_items_pgbouncer",
         lambda: wrk(f"http://127.0.0.1:{pooled_port}{page}", "-H", header),
         sources("api", "replica", "pgbouncer", "redis", api_pid=pooled.pid)),
        ("pgbench_simple_pgbouncer", lambda: pgbench("simple", REPLICA_BOUNCER),
         sources("replica", "pgbouncer")),
        ("write_items", lambda: wrk(URL, "-H", header, "-s", writes_lua),
         sources("api", "primary", "pgbouncer_primary", "replicas", "redis", api_pid=l1_pid)),
    ]
    results = {name: [] for name, _, _ in plan}
    writes = [step for step in plan if step[0] == "write_items"]
    try:
        for round_no in range(ROUNDS):
            say(f"reads, round {round_no + 1} of {ROUNDS} ({SECONDS} s each)")
            # Each pair's two sides take turns going first, so that what one
            # run leaves behind weighs on both alike.
            pairs = [plan[i:i + 2] for i in range(0, len(plan) - len(writes), 2)]
            order = [run for pair in pairs for run in (pair if round_no % 2 == 0 else pair[::-1])]
            for name, run, cpu in order:
                results[name].append(measured(run, Meter(**cpu)))
        # The writes after every read round: what they leave the replicas
        # to do (replaying them, the primary's autovacuum of the table
        # they grew) would be charged to the reads after them.
        for round_no in range(ROUNDS):
            say(f"writes, round {round_no + 1} of {ROUNDS} ({SECONDS} s)")
            for name, run, cpu in writes:
                results[name].append(measured(run, Meter(**cpu)))
    finally:
        for process in (bare, direct, pooled):
            process.terminate()
            process.wait()
    return results


def write_script():
    """A wrk script appending one message to one of 64 conversations."""
    ids = []
    body = json.dumps({"items": [{"role": "user", "content": "a write for the bench"}]})
    for i in range(64):
        out = subprocess.run(
            ["curl", "-sf", f"{URL}/v1/conversations", "-H", f"Authorization: Bearer {KEY}",
             "-H", "Content-Type: application/json", "-d", body],
            capture_output=True, text=True, check=True,
        ).stdout
        ids.append(json.loads(out)["id"])
    paths = ",".join(f'"/v1/conversations/{c}/items"' for c in ids)
    script = DEV / "writes.lua"
    script.write_text(
        f"local paths = {{{paths}}}\n"
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        "request = function() return wrk.format(nil, paths[math.random(#paths)]) end\n"
    )
    return str(script)


def ratio_line(name, rounds, base_name, base_rounds, names, base_names, label):
    ratios = [a["rps"] / b["rps"] for a, b in zip(rounds, base_rounds)]
    rps = median([r["rps"] for r in rounds])
    base_rps = median([r["rps"] for r in base_rounds])
    p99 = median([r.get("p99_ms", 0) for r in rounds])
    line = (f"{name}: ratio {median(ratios):.2f} (range {spread(ratios)}, {len(ratios)} rounds) "
            f"of {label}: {rps:.0f} req/s vs {base_rps:.0f}; p99 {p99:.2f} ms; "
            f"CPU per request {cpu_text(rounds, names)}")
    if base_names:
        line += f" ({base_name}: {cpu_text(base_rounds, base_names)})"
    errors = sum(r.get("non_2xx", 0) for r in rounds)
    if errors:
        line += f"; {errors} non-2xx answers"
    return line, {"ratio": median(ratios), "ratio_range": [min(ratios), max(ratios)],
                  "rps": rps, "baseline_rps": base_rps}


# --- turns through one worker ---------------------------------------------


def turns(**worker_settings):
    """Rounds of TURNS background turns queued while the worker is stopped,
    then drained by one worker started with `worker_settings`."""
    out = []
    db = psycopg2.connect(host="127.0.0.1", port=PRIMARY_PORT, user="postgres", dbname="turnpike")
    db.autocommit = True
    try:
        for round_no in range(TURN_ROUNDS):
            say(f"turns through one worker{' ' if worker_settings else ''}{' '.join(worker_settings.values())}, "
                f"round {round_no + 1} of {TURN_ROUNDS} ({TURNS} turns)")
            dev("stop", "worker")
            ids = subprocess.run([SSE_BENCH, "create", str(TURNS)], capture_output=True, text=True,
                                 check=True).stdout.split()
            uuids = [f"{i[5:13]}-{i[13:17]}-{i[17:21]}-{i[21:25]}-{i[25:]}" for i in ids]
            meter = Meter(**sources("worker", "primary", "pgbouncer_primary", "replicas", "redis",
                                    "mock_model", api_pid=None))
            dev("start", "worker", **worker_settings)
            meter.start()
            deadline = time.monotonic() + 300
            with db.cursor() as cur:
                while True:
                    cur.execute(
                        "SELECT count(*) FILTER (WHERE status = 'completed'), "
                        "count(*) FILTER (WHERE status IN ('failed', 'incomplete', 'cancelled')), "
                        "extract(epoch FROM max(updated_at) - min(updated_at)) "
                        "FROM responses WHERE id = ANY(%s::uuid[])", (uuids,))
                    done, failed, span = cur.fetchone()
                    if done + failed >= TURNS or time.monotonic() > deadline:
                        break
                    # The rate comes from the rows' own timestamps; polling
                    # seldom keeps this query's cost off the primary.
                    time.sleep(0.25)
            cpu = meter.stop(done)
            rate = (done - 1) / float(span) if done > 1 and span else 0.0
            out.append({"turns_per_s": rate, "done": done, "failed": failed, "cpu_us": cpu})
    finally:
        db.close()
        # Back to the default worker for what follows.
        dev("stop", "worker")
        dev("start", "worker")
    return out


def first_token(concurrency, tokens_per_s=0, chain=1):
    """Streamed turns, `concurrency` clients back to back. With
    `tokens_per_s`, the mock streams its answer at that pace, so each turn
    stays in flight for a while, as with a real model, and the clients join
    spread over one turn's length. With `chain`, each client continues its
    conversation for that many turns, as a chat does."""
    stagger_ms = 0
    if tokens_per_s:
        dev("stop", "mock-model")
        dev("start", "mock-model", TURNPIKE__MOCK__TOKENS_PER_S=str(tokens_per_s))
        stagger_ms = round(1000 * ANSWER_TOKENS / tokens_per_s / concurrency)
    out = []
    try:
        for round_no in range(TURN_ROUNDS):
            say(f"time to first token, {concurrency} concurrent"
                + (f", the mock at {tokens_per_s} tokens/s" if tokens_per_s else "")
                + f", round {round_no + 1} of {TURN_ROUNDS}")
            meter = Meter(**sources("api", "worker", "primary", "pgbouncer_primary", "replicas", "redis",
                                    "mock_model", api_pid=pidfile(DEV / "run/api.pid")))
            meter.start()
            result = json.loads(subprocess.run(
                [SSE_BENCH, "first-token", str(FIRST_TOKEN_TURNS), str(concurrency), str(stagger_ms),
                 str(chain)],
                capture_output=True, text=True, check=True).stdout)
            result["cpu_us"] = meter.stop(result["turns"])
            out.append(result)
    finally:
        if tokens_per_s:
            # Back to the default mock for what follows.
            dev("stop", "mock-model")
            dev("start", "mock-model")
    return out


def sse_latency():
    out = []
    for round_no in range(SSE_ROUNDS):
        say(f"SSE delta latency over {SSE_STREAMS} streams, round {round_no + 1} of {SSE_ROUNDS}")
        ids = DEV / "sse-ids.txt"
        ids.write_text(subprocess.run([SSE_BENCH, "create", str(SSE_STREAMS)], capture_output=True,
                                      text=True, check=True).stdout)
        meter = Meter(**sources("api", "redis", api_pid=pidfile(DEV / "run/api.pid")))
        meter.start()
        result = json.loads(subprocess.run(
            [SSE_BENCH, "latency", str(ids), str(SSE_RATE), str(SECONDS * 2)],
            capture_output=True, text=True, check=True).stdout)
        result["cpu_us"] = meter.stop(result["received"])
        out.append(result)
    return out


def sse_idle():
    """A fresh api's memory per idle stream: each stream on its own HTTP/1.1
    connection (a browser straight to the api), then multiplexed 100 to an
    HTTP/2 connection (a proxy in front of the api)."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE_STREAMS + 1024:
        return [], f"skipped (ulimit -n is {soft})"
    ids = DEV / "idle-ids.txt"
    ids.write_text(subprocess.run([SSE_BENCH, "create", str(IDLE_STREAMS)], capture_output=True,
                                  text=True, check=True).stdout)
    out = []
    for per_connection in ([], ["100"]):
        say(f"SSE: api memory with {IDLE_STREAMS} idle streams"
            + (f", {per_connection[0]} per HTTP/2 connection" if per_connection else ", HTTP/1.1"))
        # A fresh api: memory freed by the earlier runs would otherwise be
        # reused by the streams without showing in its RSS.
        dev("stop", "api")
        dev("start", "api")
        out.append(json.loads(subprocess.run(
            [SSE_BENCH, "idle", str(ids), str(pidfile(DEV / "run/api.pid")), *per_connection],
            capture_output=True, text=True, check=True).stdout))
    return out, None


TURN_SERVERS = ["worker", "primary", "pgbouncer_primary", "replicas", "redis", "mock_model"]
STREAM_SERVERS = ["api"] + TURN_SERVERS


def cpu_bound(rounds, names, own):
    """Where drained turns are bounded by the cores: every server's CPU per
    turn over the machine's cores, and the one process's own over one core."""
    cores = os.cpu_count() or 1
    total = stack_cpu_ms(rounds, names)
    mine = stack_cpu_ms(rounds, [own])
    return (f"the servers' {total:.1f} ms of CPU per turn bound {cores} cores at "
            f"{1000 * cores / total:.0f} turns/s; the {own}'s own {mine:.2f} ms, "
            f"{1000 / mine:.0f} turns/s on a core of its own")


def busy(rounds, names):
    """How many of the machine's cores the servers kept busy: CPU per turn
    times turns per second (the clients' own CPU not counted)."""
    used = stack_cpu_ms(rounds, names) * median([x["turns_per_s"] for x in rounds]) / 1000
    return f"the servers kept {used:.2f} of {os.cpu_count()} cores busy"


def turn_lines(report, lines):
    """Turns drained by one worker (both paths), then the first token."""
    # The default (the worker reaches the primary through PgBouncer, as the
    # api does), then the worker connecting to the primary directly.
    for suffix, settings, how in [
        ("", {}, "through PgBouncer"),
        ("_direct", {"TURNPIKE__DATABASE__PRIMARY_PATH": "direct"}, "direct, prepared statements"),
    ]:
        t = turns(**settings)
        report["turns" + suffix] = t
        rates = [x["turns_per_s"] for x in t]
        failed = sum(x["failed"] for x in t)
        lines.append(
            f"turns_per_worker{suffix}: {median(rates):.0f} turns/s (range {spread(rates, '{:.0f}')}, "
            f"{TURN_ROUNDS} rounds of {TURNS} queued background turns drained by 1 worker process, "
            f"zero-latency mock, primary {how}; {sum(x['done'] for x in t)} completed, {failed} failed); "
            f"CPU per turn {cpu_text(t, TURN_SERVERS)}; {cpu_bound(t, TURN_SERVERS, 'worker')}")

    paced = f"the mock streaming {ANSWER_TOKENS} tokens at {PACED_TOKENS_PER_S}/s after its first"
    for suffix, concurrency, tokens_per_s, chain, how in [
        ("", FIRST_TOKEN_CONCURRENCY, 0, 1, "back to back, the mock answering at once"),
        ("_paced", FIRST_TOKEN_CONCURRENCY, PACED_TOKENS_PER_S, 1, paced),
        ("_paced_chat", FIRST_TOKEN_CONCURRENCY, PACED_TOKENS_PER_S, CHAT_TURNS,
         f"{paced}, each client going on from its last response for {CHAT_TURNS} turns"),
        ("_sequential", 1, 0, 1, "the mock answering at once"),
    ]:
        f = first_token(concurrency, tokens_per_s, chain)
        report["first_token" + suffix] = f
        p50 = [x["first_delta"]["p50_ms"] for x in f]
        p99 = [x["first_delta"]["p99_ms"] for x in f]
        bad = sum(x["failed"] for x in f)
        checked = sum(x["checked"] for x in f)
        lines.append(
            f"first_token_latency{suffix}: "
            f"p50 {median(p50):.1f} ms p99 {median(p99):.1f} ms (ranges {spread(p50, '{:.1f}')}, "
            f"{spread(p99, '{:.1f}')}; {concurrency} concurrent streamed turns, {how}; {TURN_ROUNDS} rounds of "
            f"{FIRST_TOKEN_TURNS}; first event p50 {median([x['first_event']['p50_ms'] for x in f]):.1f} ms; "
            f"done p50 {median([x['done']['p50_ms'] for x in f]):.1f} ms; "
            f"{median([x['turns_per_s'] for x in f]):.0f} turns/s; {checked} streams checked: sequence "
            f"and text exact, {bad} failed; CPU per turn {cpu_text(f, STREAM_SERVERS)}; "
            f"{busy(f, STREAM_SERVERS)})")

    # Back to back from one client to FIRST_TOKEN_CONCURRENCY: where the
    # throughput stops growing, the time in the system is clients over
    # throughput (Little's law), and the first token moves with it.
    by_clients = {1: report["first_token_sequential"],
                  FIRST_TOKEN_CONCURRENCY: report["first_token"]}
    for clients in (5, 10, 25):
        if clients < FIRST_TOKEN_CONCURRENCY:
            by_clients[clients] = first_token(clients)
    report["first_token_by_clients"] = {str(c): r for c, r in by_clients.items()}
    cells = []
    for clients in sorted(by_clients):
        f = by_clients[clients]
        rate = median([x["turns_per_s"] for x in f])
        cells.append(
            f"{clients}: {rate:.0f} turns/s, clients/throughput {1000 * clients / rate:.1f} ms, "
            f"done p50 {median([x['done']['p50_ms'] for x in f]):.1f} ms, "
            f"first delta p50 {median([x['first_delta']['p50_ms'] for x in f]):.1f} ms")
    lines.append("first_token_by_clients (back to back, the mock answering at once; medians of "
                 f"{TURN_ROUNDS} rounds): " + "; ".join(cells))


def main():
    host = machine()
    report = {"rounds": ROUNDS, "seconds": SECONDS, "connections": CONNS, "machine": host}
    lines = [f"machine: {host['model']}, {host['cores']} cores"
             + (f" at {host['mhz']:.0f} MHz" if host["mhz"] else "")
             + " (absolute figures move with the host and its neighbours; ratios much less)"]
    only = os.environ.get("BENCH_ONLY")
    if only == "turns":
        turn_lines(report, lines)
        write_report(report)
        print("\n".join(lines), flush=True)
        return

    r = reads()
    report["reads"] = r
    bare = r["bare_axum"]
    bare_rps = [x["rps"] for x in bare]
    lines.append(
        f"bare_axum: {median(bare_rps):.0f} req/s (range {spread(bare_rps, '{:.0f}')}, {ROUNDS} rounds); "
        f"p99 {median([x['p99_ms'] for x in bare]):.2f} ms; "
        f"CPU per request {cpu_text(bare, ['bare_axum'])}")
    for name, base, base_label, names, base_names in [
        ("read_l1_items", "bare_axum", "bare_axum", ["api", "redis"], ["bare_axum"]),
        ("read_replica_items", "pgbench_prepared", "pgbench -M prepared (same SELECT, a replica)",
         ["api", "replica", "redis"], ["replica"]),
        ("read_replica_items_pgbouncer", "pgbench_simple_pgbouncer",
         "pgbench -M simple through a replica's PgBouncer", ["api", "replica", "pgbouncer", "redis"],
         ["replica", "pgbouncer"]),
    ]:
        line, summary = ratio_line(name, r[name], base, r[base], names, base_names, base_label)
        report.setdefault("summary", {})[name] = summary
        lines.append(line)
    if only == "reads":
        write_report(report)
        print("\n".join(lines), flush=True)
        return
    w = r["write_items"]
    lines.append(
        f"write_items: {median([x['rps'] for x in w]):.0f} writes/s "
        f"(range {spread([x['rps'] for x in w], '{:.0f}')}, {ROUNDS} rounds; one message appended "
        f"to one of 64 conversations); p99 {median([x['p99_ms'] for x in w]):.2f} ms; "
        f"CPU per write {cpu_text(w, ['api', 'primary', 'pgbouncer_primary', 'replicas', 'redis'])}"
        + (f"; {sum(x['non_2xx'] for x in w)} non-2xx answers" if any(x["non_2xx"] for x in w) else ""))

    turn_lines(report, lines)

    dev("stop", "worker")
    s = sse_latency()
    report["sse_latency"] = s
    lost = sum(x["lost"] + x["appends_failed"] + x["out_of_order"] + x["unfinished"] for x in s)
    lines.append(
        f"sse_delta_latency_{SSE_STREAMS}_streams: p50 {median([x['p50_ms'] for x in s]):.2f} ms "
        f"p99 {median([x['p99_ms'] for x in s]):.2f} ms (ranges {spread([x['p50_ms'] for x in s])}, "
        f"{spread([x['p99_ms'] for x in s])}; {SSE_ROUNDS} rounds at {SSE_RATE} deltas/s; "
        f"{sum(x['received'] for x in s)} of {sum(x['sent'] for x in s)} deltas received, "
        f"{lost} lost, repeated or out of order; CPU per delta {cpu_text(s, ['api', 'redis'])})")

    idle, skipped = sse_idle()
    report["sse_idle"] = idle
    if skipped:
        lines.append(f"sse_idle_memory_{IDLE_STREAMS}_streams: {skipped}")
    else:
        h1, h2 = idle
        lines.append(
            f"sse_idle_memory_{IDLE_STREAMS}_streams: {h1['per_connection_kib']:.1f} KiB per stream "
            f"over HTTP/1.1, one connection each (api RSS {h1['rss_before_mib']:.1f} → "
            f"{h1['rss_after_mib']:.1f} MiB); {h2['per_connection_kib']:.1f} KiB per stream over "
            f"HTTP/2, 100 streams per connection ({h2['rss_before_mib']:.1f} → {h2['rss_after_mib']:.1f} MiB); "
            f"one run each; {h1['open']} and {h2['open']} of {h1['streams']} open; "
            f"idle api CPU {h1['idle_cpu_percent']:.0f}% and {h2['idle_cpu_percent']:.0f}% of one core")
    dev("start", "worker")

    write_report(report)
    print("\n".join(lines), flush=True)


def write_report(report):
    out = ROOT / "target/bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
