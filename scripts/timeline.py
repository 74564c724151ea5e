"""Where one streamed turn's time goes, hop by hop, read off the wire.

Runs streamed turns one after another against the stack described by the
environment (`source "$(scripts/dev env)"`), each read to its end, while
`tcpdump` records the loopback traffic; then finds each turn's messages in
the capture and prints, for each, the median and 90th percentile of when
it happened after the client sent its request. A capture does not slow
the processes it watches, as tracing them would.

How a turn's messages are told apart: the client's own connection to the
api (its request, the response head, the SSE events); the response id the
api puts in the queue entry (`XADD tp:turns`), which names the turn in its
delivery to the worker and in the event log's keys (each append is one
script call, carrying every event queued since the last); the response's
row id in the create's and the start's calls, told apart by their
functions; the history read by the replay check before it; the model call
by the mock's port. The first message of each kind after the request
counts, and a turn missing one is counted without it.

Usage: python3 scripts/timeline.py capture OUT TURNS WARMUP | analyse PCAP TURNS_JSON | ports
(scripts/timeline runs them.)
"""

import json
import math
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


# The events that end a response's stream.
TERMINAL = tuple(b"event: response." + kind for kind in (b"completed", b"failed", b"incomplete", b"cancelled"))


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
    for line in response:
        if first_delta is None and line.startswith(b"event: response.output_text.delta"):
            first_delta = time.time()
        if line.startswith(TERMINAL):
            break
    conn.close()
    return [client_port, sent, first_delta]


def capture(out, turns, warmup):
    env = os.environ
    api, key = ports()["api"], env["TURNPIKE_API_KEY"]
    model = env.get("TIMELINE_MODEL", "mock")
    for _ in range(warmup):
        turn(api, key, model)
    # Told to go on by the caller once tcpdump is listening; anything else
    # (the caller gone) stops here.
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit(1)
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
    if len(data) < 24:
        sys.exit(f"timeline: {pcap} holds no capture")
    magic = struct.unpack("<I", data[:4])[0]
    if magic not in (0xA1B2C3D4, 0xA1B23C4D, 0xD4C3B2A1, 0x4D3CB2A1):
        sys.exit(f"timeline: {pcap} is not a pcap file")
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    nanos = magic in (0xA1B23C4D, 0x4D3CB2A1)
    if struct.unpack(endian + "I", data[20:24])[0] != 1:
        sys.exit(f"timeline: {pcap} is not an Ethernet-framed capture (tcpdump -i lo)")
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
    marks = {name: [] for name in MARKS}

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
        create = first(lambda s: s[2] == p["primary_pooled"] and b"turnpike_create_turn" in s[3]
                       and row in s[3])
        create_primary = first(lambda s: s[2] == p["primary"] and b"turnpike_create_turn" in s[3]
                               and row in s[3])
        head = first(lambda s: s[1] == p["api"] and s[2] == client)
        delivery = first(lambda s: s[1] == p["redis"] and b"tp:turns" in s[3] and response in s[3],
                         enqueue[0])
        start = first(lambda s: s[2] == p["primary_pooled"] and b"turnpike_start_turn" in s[3] and row in s[3])
        start_primary = first(lambda s: s[2] == p["primary"] and b"turnpike_start_turn" in s[3] and row in s[3])
        history = delivery and first(lambda s: s[2] in p["replicas"] and b"pg_last_wal_replay_lsn" in s[3],
                                     delivery[0])
        model = first(lambda s: s[2] == p["mock"] and s[3].startswith(b"POST"), request[0])
        model_answer = model and first(lambda s: s[1] == p["mock"] and s[2] == model[1]
                                       and b"event:" in s[3], model[0])
        appends = [s for s in window if s[2] == p["redis"] and b"EVALSHA" in s[3]
                   and response + b"}:events" in s[3]]
        created = first(lambda s: s[1] == p["api"] and s[2] == client and b"response.created" in s[3])
        delta = first(lambda s: s[1] == p["api"] and s[2] == client
                      and b"response.output_text.delta" in s[3])
        hops = [
            request, limit, reply(limit), create, create_primary, reply(create_primary), reply(create),
            enqueue, head, delivery, start, start_primary, reply(start_primary), reply(start),
            history, reply(history), model, model_answer,
            appends[0] if appends else None, appends[1] if len(appends) > 1 else None,
            appends[2] if len(appends) > 2 else None, created, delta,
        ]
        for name, segment in zip(MARKS, hops):
            if segment is not None:
                marks[name].append(at(segment))
        marks[MARKS[-1]].append((first_delta - sent) * 1000)

    counted = len(marks[MARKS[-1]])
    if counted == 0:
        sys.exit(f"timeline: none of the {len(turns)} turns could be found in {pcap}")
    print(f"{counted} of {len(turns)} streamed turns found, one at a time; "
          "ms after the client sent its request")
    print(f"{'p50':>7} {'p90':>7}  event")
    for name in MARKS:
        values = sorted(marks[name])
        if not values:
            continue
        p90 = values[max(0, math.ceil(len(values) * 0.9) - 1)]
        note = "" if len(values) == counted else f"  ({len(values)} of {counted} turns)"
        print(f"{statistics.median(values):7.2f} {p90:7.2f}  {name}{note}")


# What the analysis reports, in order; each turn's findings line up with it.
MARKS = [
    "api has the request",
    "rate limit sent to Redis",
    "rate limit: Redis's answer",
    "create sent to PgBouncer",
    "create: at the primary",
    "create: the primary's answer (with its commit)",
    "create: back at the api",
    "turn queued (XADD)",
    "response head sent to the client",
    "worker has the turn",
    "start sent to PgBouncer",
    "start: at the primary",
    "start: the primary's answer (with its commit)",
    "start: back at the worker",
    "history read sent to a replica",
    "history: the replica's answer",
    "model request sent",
    "model: its first events in",
    "event log: first append (one script call)",
    "event log: second append",
    "event log: third append",
    "response.created sent to the client",
    "first delta sent to the client",
    "the client has the first delta",
]


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
