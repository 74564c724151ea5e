// The Vercel AI SDK (ai + @ai-sdk/openai), unmodified, against Turnpike:
// streamText, a tool loop with stopWhen, a tool loop in a stored
// conversation (providerOptions.openai.conversation), and the Chat
// Completions model (openai.chat) streamed and in a tool loop.
// Env: OPENAI_BASE_URL (…/v1), OPENAI_API_KEY, TURNPIKE_MODEL.
import { createOpenAI } from '@ai-sdk/openai';
import { generateText, stepCountIs, streamText, tool } from 'ai';
import { z } from 'zod';
import assert from 'node:assert/strict';

const baseURL = process.env.OPENAI_BASE_URL;
const apiKey = process.env.OPENAI_API_KEY;
const model = process.env.TURNPIKE_MODEL ?? 'mock-1';
const openai = createOpenAI({ baseURL, apiKey });
const asked = [];
const tools = {
  get_weather: tool({
    description: 'Weather by city',
    inputSchema: z.object({ city: z.string() }),
    execute: async ({ city }) => {
      asked.push(city);
      return `sunny in ${city}`;
    },
  }),
};

async function flow(name, body) {
  await body();
  console.log(`ok ${name}`);
}

async function streamed(result) {
  let text = '';
  for await (const part of result.fullStream) {
    if (part.type === 'error') throw part.error;
    if (part.type === 'text-delta') text += part.text;
  }
  return text;
}

await flow('streamText (Responses)', async () => {
  const result = streamText({ model: openai(model), prompt: '/echo hello from the ai sdk', onError: () => {} });
  assert.equal(await streamed(result), 'hello from the ai sdk');
  assert.equal(await result.finishReason, 'stop');
  const meta = await result.providerMetadata;
  assert.match(meta.openai.responseId, /^resp_/);
});

await flow('generateText tool loop with stopWhen', async () => {
  const r = await generateText({ model: openai(model), tools, stopWhen: stepCountIs(3),
    prompt: '/call get_weather {"city":"Paris"}' });
  assert.deepEqual(asked.splice(0), ['Paris']);
  assert.equal(r.steps.length, 2);
  assert.match(r.text, /^tool said: .*sunny in Paris/);
});

await flow('tool loop in a stored conversation', async () => {
  const created = await fetch(`${baseURL}/conversations`, { method: 'POST',
    headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' }, body: '{}' });
  const conversation = (await created.json()).id;
  const r = await generateText({ model: openai(model), tools, stopWhen: stepCountIs(3),
    prompt: '/call get_weather {"city":"Rome"}', providerOptions: { openai: { conversation } } });
  assert.deepEqual(asked.splice(0), ['Rome']);
  assert.match(r.text, /sunny in Rome/);
  const listed = await fetch(`${baseURL}/conversations/${conversation}/items?order=asc`, {
    headers: { authorization: `Bearer ${apiKey}` } });
  const kinds = (await listed.json()).data.map((i) => i.type);
  assert.ok(kinds.includes('function_call') && kinds.includes('function_call_output'), kinds.join());
});

await flow('openai.chat streamText (Chat Completions)', async () => {
  const result = streamText({ model: openai.chat(model), prompt: '/echo hello over chat', onError: () => {} });
  assert.equal(await streamed(result), 'hello over chat');
  const usage = await result.usage;
  assert.ok(usage.inputTokens > 0, JSON.stringify(usage));
});

await flow('openai.chat tool loop', async () => {
  const r = await generateText({ model: openai.chat(model), tools, stopWhen: stepCountIs(3),
    prompt: '/call get_weather {"city":"Lima"}' });
  assert.deepEqual(asked.splice(0), ['Lima']);
  assert.match(r.text, /sunny in Lima/);
});
