"""Turns per second through one worker process against a zero-latency mock
model: N background turns are created (each in a new conversation, from 32
threads), and the clock stops when the primary shows all N completed.

Usage: bench_turns.py URL API_KEY PSQL_PORT [N]
"""

import json
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

url, key, psql_port = sys.argv[1], sys.argv[2], sys.argv[3]
n = int(sys.argv[4]) if len(sys.argv) > 4 else 1000


def create(i):
    body = json.dumps({"input": f"question {i}", "background": True}).encode()
    request = urllib.request.Request(
        f"{url}/v1/responses",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:
        return json.load(response)["id"]


def completed(since):
    out = subprocess.run(
        ["psql", "-X", "-qtA", "-h", "127.0.0.1", "-p", psql_port, "-U", "postgres", "turnpike", "-c",
         f"SELECT count(*) FILTER (WHERE status = 'completed'), count(*) FILTER (WHERE status = 'failed') "
         f"FROM responses WHERE created_at >= to_timestamp({since})"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    done, failed = out.split("|")
    return int(done), int(failed)


started = time.time()
with ThreadPoolExecutor(32) as pool:
    ids = list(pool.map(create, range(n)))
created_s = time.time() - started
deadline = time.time() + 300
while True:
    done, failed = completed(started - 1)
    if done + failed >= n or time.time() > deadline:
        break
    time.sleep(0.05)
elapsed = time.time() - started
print(f"turns_per_worker: {done / elapsed:.0f} turns/s ({done} of {n} turns completed in {elapsed:.1f} s, "
      f"{failed} failed; creation alone {n / created_s:.0f}/s; 1 worker process, zero-latency mock)")
