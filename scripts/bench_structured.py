#!/usr/bin/env python3
"""Structured output's cost on a running wisp: per model, decode tokens/s at batch 1 with
and without a JSON schema, and the grammar mask's time per token (from the server's
`wisp_grammar_mask_seconds` histogram). Prints a markdown table. Standard library only.

Usage: python3 scripts/bench_structured.py [--base-url http://127.0.0.1:8080] [--runs 5]
Run it on a quiet machine against a server started with `make run` (both models).
"""

import argparse
import json
import re
import time
import urllib.request

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 6},
        "bio": {"type": "string", "maxLength": 300},
    },
    "required": ["name", "age", "tags", "bio"],
    "additionalProperties": False,
}
PROMPT = "Invent a person and describe them as JSON with a long bio."


def post_stream(base, body):
    """Streams a chat completion; returns (completion tokens, seconds from first to last token)."""
    request = urllib.request.Request(
        f"{base}/v1/chat/completions",
        data=json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode(),
        headers={"content-type": "application/json"},
    )
    first = last = None
    tokens = 0
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
    return tokens, (last - first) if first and last else 0.0


def mask_stats(base, model):
    """(sum of seconds, count) of the model's mask histogram."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    values = {}
    for kind in ("sum", "count"):
        m = re.search(rf'^wisp_grammar_mask_seconds_{kind}{{model="{re.escape(model)}"}} (\S+)$', text, re.M)
        values[kind] = float(m.group(1)) if m else 0.0
    return values["sum"], values["count"]


def decode_rate(base, model, runs, response_format=None):
    tokens = seconds = 0.0
    for seed in range(runs):
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 160, "temperature": 0.7, "seed": seed}
        if response_format:
            body["response_format"] = response_format
        n, s = post_stream(base, body)
        tokens += max(n - 1, 0)
        seconds += s
    return tokens / seconds if seconds else 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8080")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    base = args.base_url.rstrip("/")
    models = [m["id"] for m in json.load(urllib.request.urlopen(f"{base}/v1/models", timeout=30))["data"]]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    rows = []
    for model in models:
        decode_rate(base, model, 1, fmt)  # warm: the vocabulary's trie, the caches
        plain = decode_rate(base, model, args.runs)
        before = mask_stats(base, model)
        constrained = decode_rate(base, model, args.runs, fmt)
        after = mask_stats(base, model)
        count = after[1] - before[1]
        mask_ms = (after[0] - before[0]) / count * 1000 if count else float("nan")
        step_ms = 1000 / plain if plain else float("nan")
        rows.append((model, plain, constrained, mask_ms, mask_ms / step_ms * 100))
    print("| model | decode tok/s, free text | decode tok/s, JSON schema | mask ms/token | mask / decode step |")
    print("|---|---|---|---|---|")
    for model, plain, constrained, mask_ms, share in rows:
        print(f"| {model} | {plain:.1f} | {constrained:.1f} | {mask_ms:.3f} | {share:.1f} % |")


if __name__ == "__main__":
    main()
