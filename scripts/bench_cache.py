"""The prompt cache hit ratio of a 20-turn conversation with tools, as the
mock model measures it (cached_tokens = longest common prefix with the
previous request of the same prompt_cache_key). Each turn offers three
client-side function tools and the server-side conversation_search tool,
whose call the worker runs before the model answers: two model calls a turn.

Usage: bench_cache.py URL API_KEY [TURNS]
"""

import json
import sys
import urllib.request

url, key = sys.argv[1], sys.argv[2]
turns = int(sys.argv[3]) if len(sys.argv) > 3 else 20


def post(path, body):
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def function(name, description, properties):
    return {"type": "function", "name": name, "description": description,
            "parameters": {"type": "object", "properties": properties}}


tools = [
    function("search", "Search the web", {"q": {"type": "string"}}),
    function("calendar", "Read the calendar", {}),
    {"type": "conversation_search"},
    function("weather", "Weather by city", {"city": {"type": "string"}}),
]
conversation = post("/v1/conversations", {})["id"]
input_tokens = cached_tokens = calls = 0
for turn in range(turns):
    tools = tools[1:] + tools[:1]  # another order each turn: the prompt keeps them frozen
    query = f"question number {max(turn - 1, 0)}"
    reply = post("/v1/responses", {
        "conversation": conversation,
        "instructions": "You are a helpful assistant for travellers on toll roads. Answer briefly.",
        "tools": tools,
        "input": f"question number {turn}: what should I know about the road ahead?\n"
                 f"/call conversation_search {json.dumps({'query': query})}",
    })
    if reply.get("status") != "completed":
        sys.exit(f"turn {turn} ended {reply.get('status')}: {reply.get('error')}")
    usage = reply["usage"]
    input_tokens += usage["input_tokens"]
    cached_tokens += usage["input_tokens_details"]["cached_tokens"]
    calls += sum(1 for item in reply["output"] if item["type"] == "message") + \
        sum(1 for item in reply["output"] if item["type"] == "function_call")
print(f"prompt_cache_hit_ratio_20_turns: {cached_tokens / max(input_tokens, 1):.3f} "
      f"({cached_tokens} of {input_tokens} input tokens over {calls} model calls, {turns} turns)")
