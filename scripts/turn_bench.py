#!/usr/bin/env python3
"""turn_bench.py - time to first token of a conversation's next turn, by history length.

    python scripts/turn_bench.py --base-url http://127.0.0.1:18080 --model ID [--history 0,512,1024,2048]
    python scripts/turn_bench.py --base-url URL --model ID --responses 8


For each history length H (approximate tokens of earlier turns) it sends the conversation
once (the server answers turn N-1), then sends turn N = the same history + that reply + a
short new question, streaming, and reports turn N's time to first token. With prefix reuse
the second request's prefill covers only the new tokens, so TTFT stays flat as H grows.
With `--responses N` it instead follows one Responses API chain for N turns (each turn
~200 new tokens, continued by `previous_response_id`) and reports each turn's TTFT: with
prefix reuse it stays flat as the chain grows. Needs httpx.
"""
import argparse
import json
import secrets
import statistics
import time

import httpx

FILLER = ("The harbour master kept a log of every ship, its cargo, its crew and the weather it "
          "brought. Years later the log was the only record of the town's trade. ")


def history(tokens: int, tag: str) -> list[dict]:
    words = FILLER.split()
    n = max(1, int(tokens / 1.3))
    text = " ".join((words * (n // len(words) + 1))[:n])
    return [{"role": "user", "content": f"[{tag}] {text}\nSummarise this."}] if tokens else []


def ttft(client: httpx.Client, model: str, messages: list[dict]) -> tuple[float, str]:
    body = {"model": model, "messages": messages, "max_tokens": 16, "temperature": 0, "stream": True}
    start = time.perf_counter()
    first, text = None, ""
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta and first is None:
                first = time.perf_counter() - start
            text += delta
    return (first if first is not None else time.perf_counter() - start), text


def response_ttft(client: httpx.Client, model: str, text: str, previous: str | None) -> tuple[float, str, int]:
    """Streams one response; returns its TTFT, id and input tokens."""
    body = {"model": model, "input": text, "max_output_tokens": 16, "temperature": 0, "stream": True}
    if previous:
        body["previous_response_id"] = previous
    start = time.perf_counter()
    first, done = None, None
    with client.stream("POST", "/v1/responses", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "response.output_text.delta" and first is None:
                first = time.perf_counter() - start
            if event["type"] == "response.completed":
                done = event["response"]
    assert done, "no response.completed event"
    return (first if first is not None else time.perf_counter() - start), done["id"], done["usage"]["input_tokens"]


def chain(client: httpx.Client, model: str, turns: int) -> None:
    print(f"# Responses chain of {turns} turns, ~200 new tokens each: TTFT of turn N (ms)")
    print("| turn | input tokens | TTFT |")
    print("|---:|---:|---:|")
    previous = None
    for turn in range(1, turns + 1):
        text = history(200, secrets.token_hex(4))[0]["content"]
        t, previous, tokens = response_ttft(client, model, text, previous)
        print(f"| {turn} | {tokens} | {t * 1000:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--history", default="0,512,1024,2048")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--jsonl", default="", help="also append each length's numbers to this file, one JSON object a line")
    ap.add_argument("--responses", type=int, default=0, help="follow a Responses API chain of this many turns instead")
    args = ap.parse_args()
    client = httpx.Client(base_url=args.base_url, timeout=600)
    if args.responses:
        chain(client, args.model, args.responses)
        return
    print(f"# {args.base_url} model={args.model}: TTFT of turn N (ms), by the history before it")
    print("| history tokens | turn N-1 TTFT p50 | turn N TTFT p50 |")
    print("|---:|---:|---:|")
    for h in [int(x) for x in args.history.split(",")]:
        before, after = [], []
        for _ in range(args.reps):
            earlier = history(h, secrets.token_hex(4))
            if not earlier:
                earlier = [{"role": "user", "content": f"[{secrets.token_hex(4)}] Hello."}]
            t1, reply = ttft(client, args.model, earlier)
            t2, _ = ttft(client, args.model, earlier + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}])
            before.append(t1 * 1000)
            after.append(t2 * 1000)
        print(f"| {h} | {statistics.median(before):.0f} | {statistics.median(after):.0f} |", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                row = {"bench": "turn", "history": h, "before_ms": statistics.median(before), "after_ms": statistics.median(after)}
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
