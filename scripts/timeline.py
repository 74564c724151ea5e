"""Where one streamed turn's time goes, hop by hop, read off the wire.

Runs TURNS streamed turns one after another against the stack described by
the environment (`scripts/dev env`), each read to its end, while `tcpdump`
records the loopback traffic; then finds each turn's messages in the
capture (the api's request and answer, the create and the start at
PgBouncer and at the primary, the queue hand-off, the history read on a
replica, the model call, the event-log appends) and prints, for each, the
median and 90th percentile of when it happened after the client sent its
request. A capture does not slow the processes it watches, as tracing
them would.

Usage: python3 scripts/timeline.py capture|analyse ...  (scripts/timeline
runs both; see there).
"""

import json
import os
import re
import statistics
import struct
import sys
import time
import http.client
import urllib.parse
import uuid


def port_of(url):
    return urllib.parse.urlsplit(url).port


def ports():
    """The stack's ports by role, from the environment `scripts/dev` writes."""
    env = os.environ
    nodes = {}
    for key, value in env.items():
        m = re.fullmatch(r"TURNPIKE__DATABASE__NODES__([A-Z0-9_]+)__(URL|POOLED_URL|ROLE)", key)
        if m:
            nodes.setdefault(m.group(1), {})[m.group(2)] = value
    primary = [n for n in nodes.values() if n.get("ROLE") == "primary"]
    replicas = [n for n in nodes.values() if n.get("ROLE") == "replica"]
    if len(primary) != 1:
        sys.exit("timeline: the environment names no single primary; source `scripts/dev env` first")
    return {
        "api": port_of(env["TURNPIKE_URL"]),
        "primary": port_of(primary[0]["URL"]),
        "primary_pooled": port_of(primary[0].get("POOLED_URL", primary[0]["URL"])),
        "replicas": {port_of(n[k]) for n in replicas for k in ("URL", "POOLED_URL") if k in n},
        "redis": port_of(env["TURNPIKE__REDIS__URL"]),
        "mock": port_of(env["TURNPIKE__MODEL__BASE_URL"]),
    }


def turn(api_port, key, model):
    """One streamed turn read to its end: (client port, sent at, first delta at)."""
    conn = http.client.HTTPConnection("127.0.0.1", api_port, timeout=30)
    conn.connect()
    client_port = conn.sock.getsockname()[1]
    body = json.dumps({"model": model, "input": "hello there", "stream": True})
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    sent = time.time()
    conn.request("POST", "/v1/responses", body, headers)
    response = conn.getresponse()
    if response.status != 200:
        sys.exit(f"timeline: the api answered {response.status}: {response.read()[:300]!r}")
    first_delta = None
    for line in response.fp:
        if first_delta is None and line.startswith(b"event: response.output_text.delta"):
            first_delta = time.time()
        if line.startswith((b"event: response.completed", b"event: response.failed")):
            break
    conn.close()
    return [client_port, sent, first_delta]


def capture(out, turns, warmup):
    env = os.environ
    api, key = ports()["api"], env["TURNPIKE_API_KEY"]
    model = env.get("TIMELINE_MODEL", "mock")
    for _ in range(warmup):
        turn(api, key, model)
    # Told to go on by the caller once tcpdump is listening.
    print("ready", flush=True)
    sys.stdin.readline()
    runs = [turn(api, key, model) for _ in range(turns)]
    # A few more, not counted: tcpdump, stopped after the client, loses
    # what it had not yet read, and that is theirs.
    for _ in range(5):
        turn(api, key, model)
    with open(out, "w") as f:
        json.dump(runs, f)


def segments(pcap):
    """(time, source port, destination port, payload) of every TCP segment
    with a payload in a loopback capture (Ethernet framing, IPv4)."""
    with open(pcap, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nanos = magic in (0xA1B23C4D, 0x4D3CB2A1)
    at = 24
    found = []
    while at + 16 <= len(data):
        sec, frac, caught, _ = struct.unpack(endian + "IIII", data[at:at + 16])
        frame = data[at + 16:at + 16 + caught]
        at += 16 + caught
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        if ip[9] != 6:
            continue
        total = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ihl:total]
        if len(tcp) < 20:
            continue
        src, dst = struct.unpack(">HH", tcp[:4])
        payload = tcp[(tcp[12] >> 4) * 4:]
        if payload:
            found.append((sec + frac / (1e9 if nanos else 1e6), src, dst, payload))
    return found


def analyse(pcap, turns_file):
    p = ports()
    turns = json.load(open(turns_file))
    segs = segments(pcap)
    marks = {}

    def mark(name, value):
        marks.setdefault(name, []).append(value)

    for client, sent, first_delta in turns:
        if first_delta is None:
            continue
        window = [s for s in segs if sent - 0.001 <= s[0] <= first_delta + 0.001]

        def first(test, after=0.0):
            return next((s for s in window if s[0] >= after and test(s)), None)

        def reply(request):
            """The first segment back on the connection a request went out on."""
            if request is None:
                return None
            return first(lambda s: s[1] == request[2] and s[2] == request[1], request[0])

        def at(segment):
            return None if segment is None else (segment[0] - sent) * 1000

        request = first(lambda s: s[1] == client and s[2] == p["api"])
        enqueue = first(lambda s: s[2] == p["redis"] and b"XADD" in s[3] and b"tp:turns" in s[3])
        if request is None or enqueue is None:
            continue
        found = re.search(rb"resp_([0-9a-f]{32})", enqueue[3])
        if not found:
            continue
        response = found.group(0)
        row = str(uuid.UUID(found.group(1).decode())).encode()
        limit = first(lambda s: s[2] == p["redis"] and b":gcra" in s[3], request[0])
        create = first(lambda s: s[2] == p["primary_pooled"] and b"turnpike_create_turn" in s[3])
        create_primary = first(lambda s: s[2] == p["primary"] and b"turnpike_create_turn" in s[3])
        head = first(lambda s: s[1] == p["api"] and s[2] == client)
        delivery = first(lambda s: s[1] == p["redis"] and b"tp:turns" in s[3] and response in s[3]
                         and s != enqueue, enqueue[0])
        start = first(lambda s: s[2] == p["primary_pooled"] and b"turnpike_start_turn" in s[3] and row in s[3])
        start_primary = first(lambda s: s[2] == p["primary"] and b"turnpike_start_turn" in s[3] and row in s[3])
        history = delivery and first(lambda s: s[2] in p["replicas"] and b"pg_is_in_recovery" not in s[3],
                                     delivery[0])
        model = first(lambda s: s[2] == p["mock"] and s[3].startswith(b"POST"), request[0])
        model_answer = model and first(lambda s: s[1] == p["mock"] and s[2] == model[1]
                                       and b"event:" in s[3], model[0])
        appends = [s for s in window if s[2] == p["redis"] and b"EVALSHA" in s[3]
                   and response + b"}:events" in s[3]]
        created = first(lambda s: s[1] == p["api"] and s[2] == client and b"response.created" in s[3])
        delta = first(lambda s: s[1] == p["api"] and s[2] == client
                      and b"response.output_text.delta" in s[3])
        for name, segment in [
            ("api has the request", request),
            ("rate limit sent to Redis", limit),
            ("rate limit: Redis's answer", reply(limit)),
            ("create sent to PgBouncer", create),
            ("create: at the primary", create_primary),
            ("create: the primary's answer (with its commit)", reply(create_primary)),
            ("create: back at the api", reply(create)),
            ("turn queued (XADD)", enqueue),
            ("response head sent to the client", head),
            ("worker has the turn", delivery),
            ("start sent to PgBouncer", start),
            ("start: at the primary", start_primary),
            ("start: the primary's answer (with its commit)", reply(start_primary)),
            ("start: back at the worker", reply(start)),
            ("history read sent to a replica", history),
            ("history: the replica's answer", reply(history)),
            ("model request sent", model),
            ("model: its first events in", model_answer),
            ("event log: first append", appends[0] if appends else None),
            ("event log: second append", appends[1] if len(appends) > 1 else None),
            ("event log: third append", appends[2] if len(appends) > 2 else None),
            ("response.created sent to the client", created),
            ("first delta sent to the client", delta),
        ]:
            if segment is not None:
                mark(name, at(segment))
        mark("the client has the first delta", (first_delta - sent) * 1000)

    counted = len(marks.get("the client has the first delta", []))
    print(f"{counted} streamed turns, one at a time; ms after the client sent its request")
    print(f"{'p50':>7} {'p90':>7}  event")
    for name, values in marks.items():
        values.sort()
        p90 = values[min(len(values) - 1, int(len(values) * 0.9))]
        note = "" if len(values) == counted else f"  ({len(values)} of {counted} turns)"
        print(f"{statistics.median(values):7.2f} {p90:7.2f}  {name}{note}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("capture", "analyse", "ports"):
        sys.exit("usage: timeline.py capture OUT TURNS WARMUP | analyse PCAP TURNS_JSON | ports")
    if sys.argv[1] == "capture":
        capture(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "analyse":
        analyse(sys.argv[2], sys.argv[3])
    else:
        p = ports()
        print(" ".join(str(v) for v in [p["api"], p["primary"], p["primary_pooled"], p["redis"], p["mock"],
                                        *sorted(p["replicas"])]))
