"""Drives a running wisp with the official OpenAI Python SDK, unchanged.

Usage: python openai_sdk.py BASE_URL   (e.g. http://127.0.0.1:8080)
Run by host/tests/e2e.rs against the real binary and the default model; exits non-zero
with the failed assertion on any mismatch.
"""

import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)

models = client.models.list()
model = models.data[0].id
assert client.models.retrieve(model).id == model

messages = [{"role": "user", "content": "Write one sentence about the sea."}]

# Chat, non-streaming, greedy.
r = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
text = r.choices[0].message.content
assert r.object == "chat.completion", r
assert r.choices[0].message.role == "assistant"
assert text and text.strip(), r
assert r.choices[0].finish_reason in ("stop", "length"), r
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
assert 0 < r.usage.completion_tokens <= 24

# Chat, streaming: the same greedy text, role first, usage last.
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert streamed == text, (streamed, text)
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finishes == [r.choices[0].finish_reason], finishes
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens, chunks[-1]
assert all(c.usage is None for c in chunks[:-1])

# Seeds: same seed, same sampled text.
sampled = [
    client.chat.completions.create(model=model, messages=messages, max_tokens=16, temperature=1.0, seed=42)
    .choices[0].message.content
    for _ in range(2)
]
assert sampled[0] == sampled[1], sampled

# Stop sequences cut the text before the stop.
full = client.completions.create(model=model, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0).choices[0].text
assert " 7" in full, full
cut = client.completions.create(model=model, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0, stop=[" 7"])
assert cut.choices[0].text == full[: full.index(" 7")], (cut.choices[0].text, full)
assert cut.choices[0].finish_reason == "stop"

# Completions, streaming.
parts = list(client.completions.create(model=model, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0, stream=True))
assert "".join(p.choices[0].text for p in parts) == full
assert parts[-1].choices[0].finish_reason == "length"

# Logprobs.
r = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
lps = r.choices[0].logprobs.content
assert len(lps) == r.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in lps), lps
assert all(t.logprob <= 0 for t in lps)

# Errors arrive as the SDK's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=messages)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e.body
try:
    client.chat.completions.create(model=model, messages=messages, temperature=9)
    raise AssertionError("temperature 9 accepted")
except openai.BadRequestError as e:
    assert e.param == "temperature", e.body

print("python openai SDK: ok")
