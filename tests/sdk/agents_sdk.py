"""The OpenAI Agents SDK (openai-agents), unmodified, against Turnpike:
Runner.run with a function tool, in a stored conversation (conversation_id),
continuing an earlier response (previous_response_id), and
Runner.run_streamed. The mock model's directives script the model: a
`/call` line makes it call the tool, and once the tool's output is back it
answers `tool said: …`.

Env: OPENAI_BASE_URL (…/v1), OPENAI_API_KEY, TURNPIKE_MODEL.
Exits non-zero on the first flow that does not behave.
"""

import asyncio
import os

from agents import (Agent, Runner, function_tool, set_default_openai_api,
                    set_default_openai_client, set_tracing_disabled)
from openai import AsyncOpenAI

MODEL = os.environ.get("TURNPIKE_MODEL", "mock-1")
ASKED: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    ASKED.append(city)
    return f"sunny in {city}"


def agent() -> Agent:
    return Agent(name="Assistant", instructions="Answer with the tools.", model=MODEL, tools=[get_weather])


def asked() -> list[str]:
    taken = ASKED[:]
    ASKED.clear()
    return taken


async def main() -> None:
    client = AsyncOpenAI()
    set_default_openai_client(client)
    set_default_openai_api("responses")
    set_tracing_disabled(True)

    result = await Runner.run(agent(), '/call get_weather {"city": "Paris"}')
    assert asked() == ["Paris"]
    assert result.final_output == "tool said: sunny in Paris", result.final_output
    print("ok Runner.run with a function tool")

    conversation = await client.conversations.create()
    result = await Runner.run(agent(), '/call get_weather {"city": "Oslo"}', conversation_id=conversation.id)
    assert asked() == ["Oslo"]
    assert result.final_output == "tool said: sunny in Oslo", result.final_output
    kinds = [item.type async for item in client.conversations.items.list(conversation.id, order="asc")]
    assert kinds == ["message", "function_call", "function_call_output", "message"], kinds
    print("ok Runner.run with conversation_id")

    first = await Runner.run(agent(), "/echo remember the toll")
    assert first.final_output == "remember the toll", first.final_output
    result = await Runner.run(agent(), '/call get_weather {"city": "Rome"}',
                              previous_response_id=first.last_response_id)
    assert asked() == ["Rome"]
    assert result.final_output == "tool said: sunny in Rome", result.final_output
    continued = await client.responses.retrieve(result.last_response_id)
    started = await client.responses.retrieve(first.last_response_id)
    assert continued.conversation.id == started.conversation.id, "continued in the same conversation"
    print("ok Runner.run with previous_response_id")

    streamed = Runner.run_streamed(agent(), '/call get_weather {"city": "Lima"}')
    deltas = []
    async for event in streamed.stream_events():
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            deltas.append(event.data.delta)
    assert asked() == ["Lima"]
    assert streamed.final_output == "tool said: sunny in Lima", streamed.final_output
    assert "".join(deltas) == streamed.final_output
    print("ok Runner.run_streamed")


asyncio.run(main())
