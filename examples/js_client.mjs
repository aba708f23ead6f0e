// wisp with the official OpenAI JavaScript SDK (npm install openai), against `make run`.
//
//   node examples/js_client.mjs        # WISP_URL / WISP_KEY override the defaults
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: `${process.env.WISP_URL ?? "http://127.0.0.1:8080"}/v1`,
  apiKey: process.env.WISP_KEY ?? "none",
});

const models = await client.models.list();
console.log(models.data.map((m) => m.id));

const reply = await client.chat.completions.create({
  model: "gemma-3-270m",
  messages: [{ role: "user", content: "Name three colours." }],
  max_tokens: 24,
});
console.log(reply.choices[0].message.content, reply.usage);

const stream = await client.chat.completions.create({
  model: "gemma-3-270m",
  messages: [{ role: "user", content: "Count to five." }],
  max_tokens: 24,
  stream: true,
});
for await (const chunk of stream) process.stdout.write(chunk.choices[0]?.delta?.content ?? "");
console.log();
