"""Structured output through the official OpenAI Python SDK, on every model wisp serves.

Usage: python structured_output.py BASE_URL
Run by host/tests/e2e.rs against the real binary with both models of `make run` (the base
Gemma and the instruct SmolLM2). Every reply is sampled at temperature > 0, several times,
and must parse and validate against its schema, or end with finish_reason "length".
"""

import json
import sys
from typing import List, Literal

import jsonschema
import openai
import pydantic

base = sys.argv[1]
client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
models = [m.id for m in client.models.list().data]
assert len(models) >= 2, models

SCHEMAS = {
    "nested_required": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"mood": {"enum": ["happy", "sad", "calm"]}, "color": {"type": "string", "enum": ["red", "green"]}},
        "required": ["mood", "color"],
        "additionalProperties": False,
    },
    "array_bounds": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 2, "maxItems": 4}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    "integer_bounds": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99}, "score": {"type": "number"}},
        "required": ["age", "score"],
        "additionalProperties": False,
    },
    "string_max_length": {
        "type": "object",
        "properties": {"title": {"type": "string", "maxLength": 10}, "done": {"type": "boolean"}},
        "required": ["title", "done"],
        "additionalProperties": False,
    },
}
TRIES = 3
MAX_TOKENS = 120


def ask(model, prompt, response_format, **kw):
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        response_format=response_format,
        **kw,
    )


for model in models:
    # json_object: any JSON object.
    for seed in range(TRIES):
        r = ask(model, "Describe a cat as JSON.", {"type": "json_object"}, seed=seed)
        choice = r.choices[0]
        if choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "stop", (model, choice)
        assert isinstance(json.loads(choice.message.content), dict), (model, choice.message.content)

    # json_schema: every reply validates.
    for name, schema in SCHEMAS.items():
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
        complete = 0
        for seed in range(TRIES):
            r = ask(model, f"Reply with a {name.replace('_', ' ')} example as JSON.", fmt, seed=seed)
            choice = r.choices[0]
            if choice.finish_reason == "length":
                continue
            assert choice.finish_reason == "stop", (model, name, choice)
            value = json.loads(choice.message.content)
            jsonschema.validate(value, schema)
            complete += 1
        # Cut replies are allowed, but not only those: the grammar must let values end.
        assert complete > 0, (model, name, "no reply completed")

    # Streamed: the deltas join into a valid value.
    fmt = {"type": "json_schema", "json_schema": {"name": "enum", "schema": SCHEMAS["enum"]}}
    stream = ask(model, "Pick a mood and a color.", fmt, stream=True, seed=7)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS["enum"])


# The SDK's parse helper with a pydantic model.
class Step(pydantic.BaseModel):
    explanation: str = pydantic.Field(max_length=40)
    output: str = pydantic.Field(max_length=20)


class Solution(pydantic.BaseModel):
    steps: List[Step] = pydantic.Field(min_length=1, max_length=3)
    final_answer: str = pydantic.Field(max_length=20)
    confidence: Literal["low", "medium", "high"]


for model in models:
    parsed = 0
    for seed in range(TRIES):
        r = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": "Solve 8x + 7 = -23 step by step."}],
            response_format=Solution,
            max_tokens=300,
            temperature=1.0,
            seed=seed,
        )
        choice = r.choices[0]
        if choice.finish_reason == "length":
            continue
        assert isinstance(choice.message.parsed, Solution), (model, choice.message)
        parsed += 1
    assert parsed > 0, (model, "no parsed reply completed")

# A schema the grammar cannot enforce is a 400 that names it, never an unchecked reply.
try:
    ask(models[0], "hi", {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {"a": {"$ref": "http://example.com/x.json"}}}}})
    raise AssertionError("an unenforceable schema was accepted")
except openai.BadRequestError as e:
    assert e.code == "unsupported_schema", e
    assert e.param == "response_format", e

print("structured output: ok on", ", ".join(models))
