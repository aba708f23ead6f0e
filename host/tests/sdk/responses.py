"""OpenAI's Responses API through the official Python SDK (`client.responses.*`), unchanged.

Usage: python responses.py BASE_URL
Run by host/tests/e2e.rs against the instruct model: a stored chain continued with
`previous_response_id`, retrieve, input items, streaming with typed events, structured
output with `text.format`, a function call and its output in the next turn, delete, and
`store: false`.
"""

import json
import sys

import jsonschema
import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
MODEL = "smollm2-135m-instruct"

first = client.responses.create(model=MODEL, input="My name is Ada.", instructions="You are brief.", max_output_tokens=16, temperature=0)
assert first.id.startswith("resp_") and first.object == "response" and first.status in ("completed", "incomplete"), first
assert first.output[0].type == "message" and first.output_text, first.output
assert first.usage.input_tokens > 0 and 0 < first.usage.output_tokens <= 16, first.usage

second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=16, temperature=0)
assert second.previous_response_id == first.id, second
assert second.usage.input_tokens > first.usage.input_tokens, (first.usage, second.usage)

got = client.responses.retrieve(second.id)
assert got.id == second.id and got.output_text == second.output_text, got
items = client.responses.input_items.list(second.id)
assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "What is my name?", items

# Streamed: typed events in order; the final response is the deltas' text, and stored.
kinds, deltas = [], []
with client.responses.stream(model=MODEL, input="Say hi.", previous_response_id=second.id, max_output_tokens=12, temperature=0) as stream:
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    final = stream.get_final_response()
assert kinds[:2] == ["response.created", "response.in_progress"], kinds
assert "response.output_item.added" in kinds and "response.output_text.done" in kinds, kinds
assert kinds[-1] in ("response.completed", "response.incomplete"), kinds
assert final.output_text == "".join(deltas) and client.responses.retrieve(final.id).output_text == final.output_text

# Structured output: the reply validates against the schema.
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
r = client.responses.create(model=MODEL, input="Invent a person.", max_output_tokens=60, temperature=0.7,
                            text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}})
if r.status == "completed":
    jsonschema.validate(json.loads(r.output_text), SCHEMA)

# A function call, then its output in the next turn of the chain.
weather = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                                                                     "required": ["city"], "additionalProperties": False}}
r = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[weather],
                            tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False, max_output_tokens=60, temperature=0)
call = r.output[0]
assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_"), r.output
json.loads(call.arguments)
after = client.responses.create(model=MODEL, previous_response_id=r.id, tools=[weather], tool_choice="none", max_output_tokens=16, temperature=0,
                                input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 18}'}])
assert after.output[0].type == "message" and after.output_text, after.output

# Delete, and a response not stored.
assert client.responses.delete(first.id) is None or True
try:
    client.responses.retrieve(first.id)
    raise AssertionError("a deleted response was found")
except openai.NotFoundError:
    pass
unstored = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=4)
try:
    client.responses.retrieve(unstored.id)
    raise AssertionError("a response with store=false was kept")
except openai.NotFoundError:
    pass

print("responses: ok")
