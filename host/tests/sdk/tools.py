"""Tool calling through the official OpenAI Python SDK, on every model wisp serves.

Usage: python tools.py BASE_URL
Run by host/tests/e2e.rs with both models of `make run`. `required` and a named tool must
yield calls whose arguments validate against the tool's parameters (the grammar allows
nothing else); `none` never yields a call; `auto` yields either, well formed.
"""

import json
import sys

import urllib.request

import jsonschema
import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
models = [m.id for m in client.models.list().data]

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}}, "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def http(method, path, body=None):
    """A wisp route outside OpenAI's API (sessions), as JSON."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{base}{path}", data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def check_calls(calls, allowed):
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_"), call
        assert call.function.name in allowed, (call.function.name, allowed)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


for model in models:
    def ask(**kw):
        return client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, max_tokens=120, temperature=1.0, **kw)

    # required: always calls, never prose.
    for seed in range(3):
        r = ask(tool_choice="required", seed=seed)
        choice = r.choices[0]
        if choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "tool_calls", (model, choice)
        assert choice.message.content is None, choice.message
        check_calls(choice.message.tool_calls, SCHEMAS)

    # named: that tool and no other, one call without parallel calls.
    r = ask(tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False, seed=1)
    assert r.choices[0].finish_reason == "tool_calls", (model, r.choices[0])
    check_calls(r.choices[0].message.tool_calls, {"get_time"})
    assert len(r.choices[0].message.tool_calls) == 1

    # none: text, never a call.
    r = ask(tool_choice="none", max_completion_tokens=16, seed=2)
    assert not r.choices[0].message.tool_calls, (model, r.choices[0].message)
    assert r.choices[0].message.content, r.choices[0].message

    # auto: a call or an answer, either well formed.
    r = ask(tool_choice="auto", seed=3)
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":
        check_calls(choice.message.tool_calls, SCHEMAS)
    else:
        assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None, choice

    # Streamed: the SDK assembles the tool-call deltas.
    with client.chat.completions.stream(
        model=model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120, temperature=1.0, seed=4
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    if final.choices[0].finish_reason != "length":
        assert final.choices[0].finish_reason == "tool_calls", final.choices[0]
        check_calls(final.choices[0].message.tool_calls, SCHEMAS)

    # auto, streamed: an answer's text goes out as it generates (not whole at the end), the
    # same text as unstreamed; a reply cut by max_tokens never shows the grammar's JSON.
    hello = [{"role": "user", "content": "Say hello to Ada in one sentence."}]
    kw = dict(model=model, messages=hello, tools=TOOLS, tool_choice="auto", max_tokens=40, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0]
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].delta.content]
    if whole.message.content:
        assert "".join(pieces) == whole.message.content, (pieces, whole.message.content)
        assert len(whole.message.content) < 8 or len(pieces) > 1, pieces
    for choice in ["auto", "required"]:
        cut = client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=5, temperature=0).choices[0]
        assert cut.finish_reason == "length" and not (cut.message.content or "").lstrip().startswith('{"'), cut

    # The next turn: the call and its result go back in; the model answers.
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "sky": "sunny"}'},
    ]
    r = client.chat.completions.create(model=model, messages=history, tools=TOOLS, tool_choice="none", max_tokens=24, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls, r.choices[0]

    # In a session: the server keeps the call and its result, with the ids the client got.
    session = http("POST", "/v1/sessions", {"model": model})
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=named, parallel_tool_calls=False, max_tokens=120, temperature=0,
        extra_body={"session_id": session["id"]},
    )
    assert r.choices[0].finish_reason == "tool_calls", (model, r.choices[0])
    call = r.choices[0].message.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "sunny"}'}
    r = client.chat.completions.create(
        model=model, messages=[result], tools=TOOLS, tool_choice="none", max_tokens=16, temperature=0,
        extra_body={"session_id": session["id"]},
    )
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls, r.choices[0]
    stored = http("GET", f"/v1/sessions/{session['id']}")["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"], stored
    assert stored[1]["tool_calls"] == [call.model_dump(exclude_none=True)] and stored[1]["finish_reason"] == "tool_calls", stored[1]
    assert stored[2]["tool_call_id"] == call.id and stored[3]["content"] == r.choices[0].message.content, stored

print("tools: ok on", ", ".join(models))
