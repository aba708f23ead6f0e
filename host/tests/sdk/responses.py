"""OpenAI's Responses API through the official Python SDK (`client.responses.*`), unchanged.

Usage: python responses.py BASE_URL
Run by host/tests/e2e.rs against the instruct model: a stored chain continued with
`previous_response_id`, retrieve, input items, streaming with typed events, structured
output with `text.format`, a function call and its output in the next turn, as agent SDKs
send them (`include`, streamed calls, tools beside a structured answer), delete, and
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

# As agent SDKs send it: `include` (here `[]`), and a streamed call: the item (name first),
# its arguments in `function_call_arguments.delta` events, `.done` with the whole, one item id.
events = []
with client.responses.stream(model=MODEL, input="What is the weather in Paris?", tools=[weather], include=[],
                             tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
                             max_output_tokens=60, temperature=0) as stream:
    events = list(stream)
    final = stream.get_final_response()
kinds = [e.type for e in events]
added = next(e for e in events if e.type == "response.output_item.added")
assert added.item.type == "function_call" and added.item.name == "get_weather" and added.item.arguments == "", added
deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
done = next(e for e in events if e.type == "response.function_call_arguments.done")
assert kinds.index(added.type) < kinds.index(deltas[0].type) < kinds.index(done.type) < kinds.index("response.output_item.done"), kinds
assert {e.item_id for e in deltas} == {done.item_id} == {added.item.id} == {final.output[0].id}, (deltas, done, final.output)
if final.status == "completed":
    assert json.loads("".join(e.delta for e in deltas)) == json.loads(done.arguments) == json.loads(final.output[0].arguments)

# Tools beside a structured answer (an agent with a typed final output): either a call or
# an answer of the schema, from one grammar.
for seed_input in ["What is the weather in Paris?", "Invent a person."]:
    r = client.responses.create(model=MODEL, input=seed_input, tools=[weather], max_output_tokens=80, temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}})
    if r.status != "completed":
        continue
    if r.output[0].type == "function_call":
        json.loads(r.output[0].arguments)
    else:
        jsonschema.validate(json.loads(r.output_text), SCHEMA)

# A text answer under `tools` + `auto` streams as it generates, not in one piece at the end.
with client.responses.stream(model=MODEL, input="Say hello to Ada in a sentence.", tools=[weather], tool_choice="auto",
                             max_output_tokens=40, temperature=0) as stream:
    events = list(stream)
    final = stream.get_final_response()
if final.output[0].type == "message":
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == final.output_text, (deltas, final.output_text)
    if len(final.output_text) > 8:
        assert len(deltas) > 1, deltas

try:
    client.responses.create(model=MODEL, input="Hi", include=["message.output_text.logprobs"], max_output_tokens=4)
    raise AssertionError("logprobs in include were taken")
except openai.BadRequestError as e:
    assert e.param == "include[0]", e.body

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
