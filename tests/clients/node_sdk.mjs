// The official openai Node SDK, unmodified, against Turnpike: responses
// (waited and streamed), conversations, a client-side function call
// continued with previous_response_id, chat completions (plain, streamed
// with usage, a tool round trip) and the model list. Exits non-zero on the
// first flow that does not behave as it does against OpenAI.
// Env: OPENAI_BASE_URL (…/v1), OPENAI_API_KEY, TURNPIKE_MODEL.
import OpenAI from 'openai';
import assert from 'node:assert/strict';

const client = new OpenAI();
const model = process.env.TURNPIKE_MODEL ?? 'mock-1';
const weather = { type: 'function', name: 'get_weather', description: 'Weather by city',
  parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] } };

async function flow(name, body) {
  await body();
  console.log(`ok ${name}`);
}

await flow('responses.create waits for the answer', async () => {
  const r = await client.responses.create({ model, input: '/echo hello from node' });
  assert.equal(r.status, 'completed');
  assert.equal(r.output_text, 'hello from node');
});

await flow('responses.create streams deltas that add up to the answer', async () => {
  const stream = await client.responses.create({ model, input: '/echo streamed from node', stream: true });
  let text = '';
  let last;
  for await (const event of stream) {
    if (event.type === 'response.output_text.delta') text += event.delta;
    last = event;
  }
  assert.equal(text, 'streamed from node');
  assert.equal(last.type, 'response.completed');
  assert.equal(last.response.output_text ?? last.response.output[0].content[0].text, 'streamed from node');
});

await flow('conversations keep the turns', async () => {
  const conversation = await client.conversations.create({ items: [{ role: 'user', content: 'remember tolls' }] });
  await client.responses.create({ model, conversation: conversation.id, input: '/echo noted' });
  const items = [];
  for await (const item of client.conversations.items.list(conversation.id, { order: 'asc' })) items.push(item);
  assert.deepEqual(items.map((i) => i.type), ['message', 'message', 'message']);
  assert.equal(items[2].content[0].text, 'noted');
});

await flow('a function call continued with previous_response_id', async () => {
  const first = await client.responses.create({ model, tools: [weather], input: '/call get_weather {"city":"Oslo"}' });
  const call = first.output.find((i) => i.type === 'function_call');
  assert.equal(call.name, 'get_weather');
  assert.deepEqual(JSON.parse(call.arguments), { city: 'Oslo' });
  const second = await client.responses.create({ model, tools: [weather], previous_response_id: first.id,
    input: [{ type: 'function_call_output', call_id: call.call_id, output: 'sunny' }] });
  assert.equal(second.output_text, 'tool said: sunny');
  assert.equal(second.previous_response_id, first.id);
});

await flow('chat.completions.create', async () => {
  const c = await client.chat.completions.create({ model, messages: [
    { role: 'system', content: 'Be brief.' }, { role: 'user', content: '/echo hi from chat' }] });
  assert.equal(c.object, 'chat.completion');
  assert.equal(c.choices[0].message.content, 'hi from chat');
  assert.equal(c.choices[0].finish_reason, 'stop');
  assert.ok(c.usage.prompt_tokens > 0);
});

await flow('chat.completions streamed with usage', async () => {
  const stream = await client.chat.completions.create({ model, stream: true, stream_options: { include_usage: true },
    messages: [{ role: 'user', content: '/echo chunks add up' }] });
  let text = '';
  let usage = null;
  let finish = null;
  for await (const chunk of stream) {
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices) {
      text += choice.delta.content ?? '';
      finish = choice.finish_reason ?? finish;
    }
  }
  assert.equal(text, 'chunks add up');
  assert.equal(finish, 'stop');
  assert.ok(usage && usage.total_tokens > 0);
});

await flow('chat.completions tool round trip', async () => {
  const tools = [{ type: 'function', function: { name: 'get_weather', parameters: weather.parameters } }];
  const messages = [{ role: 'user', content: '/call get_weather {"city":"Bergen"}' }];
  const first = await client.chat.completions.create({ model, tools, messages });
  assert.equal(first.choices[0].finish_reason, 'tool_calls');
  const call = first.choices[0].message.tool_calls[0];
  assert.equal(call.function.name, 'get_weather');
  messages.push(first.choices[0].message, { role: 'tool', tool_call_id: call.id, content: 'rainy' });
  const second = await client.chat.completions.create({ model, tools, messages });
  assert.equal(second.choices[0].message.content, 'tool said: rainy');
});

await flow('models.list', async () => {
  const models = [];
  for await (const m of client.models.list()) models.push(m.id);
  assert.ok(models.includes(model), JSON.stringify(models));
});
