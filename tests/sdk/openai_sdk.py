"""The official openai SDK, pointed at Turnpike, does what a web developer would:
create a conversation with items, add items, page through them with the SDK's
auto-pagination, update metadata, create a response, and delete.

Reads OPENAI_BASE_URL and OPENAI_API_KEY like any OpenAI program.
"""

import openai
from openai import OpenAI

client = OpenAI(max_retries=0)

conversation = client.conversations.create(
    items=[{"type": "message", "role": "user", "content": "first"}],
    metadata={"source": "sdk"},
)
assert conversation.id.startswith("conv_"), conversation
assert conversation.metadata == {"source": "sdk"}, conversation

added = client.conversations.items.create(
    conversation.id,
    items=[{"type": "message", "role": "user", "content": f"m{i}"} for i in range(1, 21)],
)
assert len(added.data) == 20, added
more = client.conversations.items.create(
    conversation.id,
    items=[{"type": "message", "role": "user", "content": f"m{i}"} for i in range(21, 25)],
)
assert [i.content[0].text for i in more.data] == ["m21", "m22", "m23", "m24"], more

# Auto-pagination follows `after` across pages of 5.
texts = [item.content[0].text for item in client.conversations.items.list(conversation.id, limit=5, order="asc")]
assert texts == ["first"] + [f"m{i}" for i in range(1, 25)], texts
newest_first = [item.content[0].text for item in client.conversations.items.list(conversation.id, limit=7)]
assert newest_first == list(reversed(texts)), newest_first

one = client.conversations.items.retrieve(added.data[0].id, conversation_id=conversation.id)
assert one.id == added.data[0].id

updated = client.conversations.update(conversation.id, metadata={"source": "sdk", "step": "2"})
assert updated.metadata == {"source": "sdk", "step": "2"}, updated
assert client.conversations.retrieve(conversation.id).metadata["step"] == "2"

response = client.responses.create(
    model="mock-1",
    conversation=conversation.id,
    input="What is a turnpike?",
    background=True,
)
assert response.id.startswith("resp_"), response
assert response.status == "queued", response
assert client.responses.retrieve(response.id).id == response.id
inputs = list(client.responses.input_items.list(response.id))
assert inputs[0].content[0].text == "What is a turnpike?", inputs

try:
    client.conversations.retrieve("conv_00000000000000000000000000000000")
    raise AssertionError("expected a 404")
except openai.NotFoundError as e:
    assert e.status_code == 404

try:
    client.conversations.create(metadata={"k": "v" * 600})
    raise AssertionError("expected a 400")
except openai.BadRequestError as e:
    assert e.status_code == 400

# Streaming: the SDK's own event models, then a resume with starting_after.
stream = client.responses.create(
    model="mock-1", conversation=conversation.id, input="/echo streamed by the SDK", stream=True
)
events = list(stream)
deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
assert deltas == "streamed by the SDK", deltas
final = events[-1]
assert final.type == "response.completed", final
assert final.response.output_text == "streamed by the SDK", final.response
assert [e.sequence_number for e in events] == list(range(len(events)))
resumed = client.responses.retrieve(final.response.id, stream=True, starting_after=3)
assert [e.sequence_number for e in resumed] == [e.sequence_number for e in events[4:]]

# Without stream or background, create waits for the answer.
waited = client.responses.create(model="mock-1", conversation=conversation.id, input="/echo waited")
assert waited.status == "completed" and waited.output_text == "waited", waited

# A client-side function call, round-tripped.
tools = [{
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}]
asked = client.responses.create(
    model="mock-1", conversation=conversation.id, tools=tools, input='/call get_weather {"city":"Oslo"}'
)
call = asked.output[0]
assert call.type == "function_call" and call.name == "get_weather", asked.output
assert call.arguments == '{"city":"Oslo"}', call
answered = client.responses.create(
    model="mock-1",
    conversation=conversation.id,
    tools=tools,
    input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
)
assert answered.output_text == "tool said: sunny", answered

# A server-side tool runs inside the turn (offered by type, like OpenAI's
# hosted tools): streamed and waited for, the SDK reads the whole loop.
searched = client.responses.create(
    model="mock-1",
    conversation=conversation.id,
    tools=tools + [{"type": "conversation_search"}],
    input='/call conversation_search {"query":"Oslo"}',
)
kinds = [item.type for item in searched.output]
assert kinds == ["function_call", "function_call_output", "message"], kinds
assert searched.output_text.startswith("tool said: "), searched.output_text
with client.responses.stream(
    model="mock-1",
    conversation=conversation.id,
    tools=tools + [{"type": "conversation_search"}],
    input='/call conversation_search {"query":"sunny"}',
) as streamed:
    for _ in streamed:
        pass
    final = streamed.get_final_response()
assert [item.type for item in final.output] == kinds, final.output
assert "sunny" in final.output_text, final.output_text

# Compaction (OpenAI's context_management): the second turn compacts first;
# the SDK parses the compaction item and the stream's announcement.
compacting = client.conversations.create()
long = "The toll road runs north past quiet fields. " * 40
client.responses.create(model="mock-1", conversation=compacting.id, input="/echo " + long)
events = list(client.responses.create(
    model="mock-1",
    conversation=compacting.id,
    input="and then?",
    stream=True,
    extra_body={"context_management": [{"type": "compaction", "compact_threshold": 300}]},
))
types = [event.type for event in events]
assert "response.compaction.compacting" in types, types
compacted = events[-1].response
assert [item.type for item in compacted.output] == ["compaction", "message"], compacted.output
assert compacted.output[0].encrypted_content, compacted.output[0]

# responses.compact: a stateless client's history, compacted; the window
# goes back as the next input.
history = [
    {"role": "user", "content": "/echo " + long},
    {"role": "assistant", "content": long},
    {"role": "user", "content": "and then?"},
]
window = client.responses.compact(model="mock-1", input=history)
assert window.object == "response.compaction", window
assert [item.type for item in window.output] == ["message", "message", "compaction"], window.output
assert window.usage.input_tokens > 0, window.usage
resumed = client.responses.create(
    model="mock-1",
    input=[item.model_dump(exclude_none=True) for item in window.output]
    + [{"role": "user", "content": "/echo resumed"}],
)
assert resumed.output_text == "resumed", resumed

deleted = client.conversations.delete(conversation.id)
assert deleted.deleted is True and deleted.id == conversation.id, deleted
print("openai sdk: ok")
