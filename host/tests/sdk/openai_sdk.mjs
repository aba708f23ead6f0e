// Drives a running wisp with the official OpenAI JavaScript SDK, unchanged.
//
// Usage: node openai_sdk.mjs BASE_URL   (after `npm ci` in this folder)
// Run by host/tests/e2e.rs against the real binary and the default model.

import assert from "node:assert/strict";
import OpenAI from "openai";

const base = process.argv[2];
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "x", maxRetries: 0 });

const models = await client.models.list();
const model = models.data[0].id;
const messages = [{ role: "user", content: "Write one sentence about the sea." }];

const r = await client.chat.completions.create({ model, messages, max_tokens: 24, temperature: 0 });
const text = r.choices[0].message.content;
assert.ok(text && text.trim().length > 0, JSON.stringify(r));
assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens);

const stream = await client.chat.completions.create({
  model, messages, max_tokens: 24, temperature: 0, stream: true, stream_options: { include_usage: true },
});
let streamed = "";
let usage = null;
let first = true;
for await (const chunk of stream) {
  if (first) {
    assert.equal(chunk.choices[0].delta.role, "assistant");
    first = false;
  }
  if (chunk.choices.length) streamed += chunk.choices[0].delta.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}
assert.equal(streamed, text);
assert.equal(usage.completion_tokens, r.usage.completion_tokens);

// Aborting a stream mid-way is a client hang-up; the server must go on serving.
const controller = new AbortController();
const long = await client.chat.completions.create(
  { model, messages, max_tokens: 200, temperature: 0, stream: true },
  { signal: controller.signal },
);
let n = 0;
try {
  for await (const _ of long) {
    if (++n === 3) controller.abort();
  }
} catch (e) {
  assert.ok(e.name === "APIUserAbortError" || e.name === "AbortError", e.name);
}

const c = await client.completions.create({ model, prompt: "1, 2, 3, 4, 5,", max_tokens: 8, temperature: 0 });
assert.ok(c.choices[0].text.includes("6"), c.choices[0].text);

await assert.rejects(
  client.chat.completions.create({ model: "no-such-model", messages }),
  (e) => e.status === 404 && e.code === "model_not_found",
);

console.log("javascript openai SDK: ok");
