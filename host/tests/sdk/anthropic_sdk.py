"""Anthropic's Messages API through the official `anthropic` Python SDK, unchanged.

Usage: python anthropic_sdk.py API_KEY BASE_URL
Run by host/tests/e2e.rs against a server with the api-key-auth plugin and the instruct
model: the SDK's `x-api-key` is the credential the plugin checks; replies, streams, token
counts, a tool loop and errors come back in Anthropic's shapes, as the SDK's own types.
"""

import sys

import anthropic

key, base = sys.argv[1], sys.argv[2]
MODEL = "smollm2-135m-instruct"
client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
ASK = [{"role": "user", "content": "Say hello to the reader."}]

# The key is the plugin's to judge.
try:
    anthropic.Anthropic(base_url=base, api_key="sk-wrong", max_retries=0).messages.create(model=MODEL, max_tokens=8, messages=ASK)
    raise AssertionError("a wrong key was accepted")
except anthropic.AuthenticationError as e:
    assert e.status_code == 401 and e.body["type"] == "error", e.body
    assert e.body["error"]["type"] == "authentication_error", e.body

# A message, whole.
r = client.messages.create(model=MODEL, max_tokens=24, system="You are brief.", messages=ASK, temperature=0)
assert r.type == "message" and r.role == "assistant" and r.model == MODEL and r.id.startswith("msg_"), r
assert r.content[0].type == "text" and r.content[0].text.strip(), r.content
assert r.stop_reason in ("end_turn", "max_tokens") and 0 < r.usage.output_tokens <= 24 and r.usage.input_tokens > 0, r

# The same prompt counted: the tokens the model sees.
count = client.messages.count_tokens(model=MODEL, system="You are brief.", messages=ASK)
assert count.input_tokens == r.usage.input_tokens, (count, r.usage)

# Text blocks, a cut at max_tokens, and a conversation.
r = client.messages.create(
    model=MODEL,
    max_tokens=3,
    system=[{"type": "text", "text": "You are brief."}],
    messages=[{"role": "user", "content": [{"type": "text", "text": "Count from one to ten."}]}],
)
assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 3, r

# Streamed: the SDK's event accumulator gives the same text as the deltas.
with client.messages.stream(model=MODEL, max_tokens=24, messages=ASK, temperature=0) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
assert text and final.content[0].text == text, (text, final)
assert final.stop_reason in ("end_turn", "max_tokens") and final.usage.output_tokens > 0, final

# Raw events, in Anthropic's order.
events = [e.type for e in client.messages.create(model=MODEL, max_tokens=4, messages=ASK, stream=True)]
assert events[:2] == ["message_start", "content_block_start"] and events[-3:] == ["content_block_stop", "message_delta", "message_stop"], events
assert "content_block_delta" in events, events

# A tool loop: a forced call comes back as a `tool_use` block (input valid for the schema),
# streamed as `input_json` deltas the SDK assembles into the same input; its `tool_result`
# goes back in and the model answers in text.
WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"], "additionalProperties": False}}
WHERE = [{"role": "user", "content": "What is the weather in Paris?"}]
forced = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}
r = client.messages.create(model=MODEL, max_tokens=60, messages=WHERE, tools=[WEATHER], tool_choice=forced, temperature=0)
assert r.stop_reason == "tool_use", r
use = next(b for b in r.content if b.type == "tool_use")
assert use.name == "get_weather" and isinstance(use.input.get("city"), str), use
with client.messages.stream(model=MODEL, max_tokens=60, messages=WHERE, tools=[WEATHER], tool_choice=forced, temperature=0) as stream:
    kinds = [e.type for e in stream]
    final = stream.get_final_message()
assert "input_json" in kinds and final.stop_reason == "tool_use", kinds
assert [b.input for b in final.content if b.type == "tool_use"] == [use.input], (final.content, use)
history = WHERE + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r.content]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C and sunny"}]}]
after = client.messages.create(model=MODEL, max_tokens=24, messages=history, tools=[WEATHER], tool_choice={"type": "none"}, temperature=0)
assert after.content[0].type == "text" and after.content[0].text and after.stop_reason in ("end_turn", "max_tokens"), after
# `auto` streams an answer's text as text deltas (the grammar's JSON never shows).
with client.messages.stream(model=MODEL, max_tokens=30, messages=ASK, tools=[WEATHER], temperature=0) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
if final.stop_reason != "tool_use":
    assert not text.lstrip().startswith('{"') and final.content[0].text == text, (text, final)

# Errors in Anthropic's shape, as the SDK's exception types.
try:
    client.messages.create(model="no-such-model", max_tokens=4, messages=ASK)
    raise AssertionError("an unknown model was accepted")
except anthropic.NotFoundError as e:
    assert e.body["error"]["type"] == "not_found_error", e.body
try:
    client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x"}}]}])
    raise AssertionError("an image was accepted")
except anthropic.BadRequestError as e:
    assert e.body["error"]["type"] == "invalid_request_error", e.body

print("anthropic sdk: ok")
