"""Validates provider transcripts and Turnpike's own streams against the
official `openai` SDK's pydantic types, so that a fixture is OpenAI's shape
and not a guess.

    python3 validate.py FILE...

A `.sse` file is a provider's stream as it was sent: the events of a
Responses stream (`responses` in the name) are each validated as a
`ResponseStreamEvent`; the chunks of a Chat Completions stream (`chat` in the
name) as `ChatCompletionChunk`s. A `.json` file holds a list of events a
Turnpike client received, validated as `ResponseStreamEvent`s, with every
`response` inside checked as a whole `Response`.
Exits non-zero, naming the file, the event and the field, on the first
event that does not fit.
"""

import json
import sys
import typing

from openai.types.chat import ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent

# The SDK's streaming event models, by their `type`.
_UNION = typing.get_args(ResponseStreamEvent)[0]
EVENT_MODELS = {
    typing.get_args(model.model_fields["type"].annotation)[0]: model
    for model in typing.get_args(_UNION)
}


def sse_events(text):
    """The JSON payloads of an SSE stream, `[DONE]` left out."""
    for block in text.replace("\r\n", "\n").split("\n\n"):
        data = "\n".join(
            line[len("data:"):].lstrip()
            for line in block.split("\n")
            if line.startswith("data:")
        )
        if data and data.strip() != "[DONE]":
            yield json.loads(data)


def check_event(event):
    model = EVENT_MODELS.get(event.get("type"))
    if model is None:
        raise ValueError(f"no such event type in the openai SDK: {event.get('type')!r}")
    model.model_validate(event)
    if isinstance(event.get("response"), dict):
        Response.model_validate(event["response"])


def main(paths):
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if path.endswith(".json"):
            events, check = json.loads(text), check_event
        elif "chat" in path.rsplit("/", 1)[-1]:
            events, check = list(sse_events(text)), ChatCompletionChunk.model_validate
        else:
            events, check = list(sse_events(text)), check_event
        if not events:
            sys.exit(f"{path}: no events")
        for n, event in enumerate(events):
            try:
                check(event)
            except Exception as e:  # noqa: BLE001 - the report is the point
                sys.exit(f"{path}: event {n} ({event.get('type') or event.get('object')}): {e}")
        print(f"{path}: {len(events)} events fit the openai SDK's types")


if __name__ == "__main__":
    main(sys.argv[1:])
