#!/usr/bin/env python3
"""serve_bench.py - streaming load test for any OpenAI-compatible server (copied from shared/bench).

README: python3 serve_bench.py --base-url http://127.0.0.1:18080 --model MODEL \
            [--api-key KEY] --concurrency 1,4,8 --max-tokens 64 --prompt-tokens 128
        Needs only httpx (`pip install httpx`). Run one benchmark at a time on a quiet machine.

For each concurrency level C it keeps C streaming /v1/chat/completions requests
in flight until --requests (default max(8, 2*C)) have finished, then prints one row:
  TTFT      time from sending the request to the first non-empty content delta
  ITL p50   median gap between consecutive content chunks (all streams pooled)
  stream    per-stream decode speed, mean of (tokens-1)/(last_chunk - first_chunk)
  aggregate all completion tokens of the level / wall time of the level
Tokens come from `usage.completion_tokens` (stream_options.include_usage) when
the server sends it, else from the number of content chunks. Requests use
temperature 0 and one fixed prompt text behind a tag unique to the run and the
request, so no server can reuse a cached prefix (not even across runs).
ignore_eos is not sent (pass it with --extra if the server supports it), so a
request may end before --max-tokens: `out tok` shows the mean actually produced.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import statistics
import time

import httpx

FILLER = (
    "The old lighthouse keeper climbed the stairs every evening, counted the ships "
    "on the horizon, wrote their names in a worn notebook and listened to the wind. "
)
_req_ids = itertools.count()
_RUN = secrets.token_hex(3)  # differs per run: defeats prompt caches across runs


def make_prompt(approx_tokens: int) -> str:
    # ~1.3 tokens per English word for common tokenizers; good enough for "approx".
    words = FILLER.split()
    n_words = max(1, int(approx_tokens / 1.3) - 12)
    body = " ".join(itertools.islice(itertools.cycle(words), n_words))
    return f"[run {_RUN} request {next(_req_ids)}] {body}\nContinue the story:"


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def one_request(client: httpx.AsyncClient, args) -> dict:
    body = {
        "model": args.model,
        "messages": [{"role": "user", "content": make_prompt(args.prompt_tokens)}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if not args.no_usage:
        body["stream_options"] = {"include_usage": True}
    body.update(args.extra)
    t0 = time.perf_counter()
    stamps: list[float] = []  # arrival time of each content chunk
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for ch in chunk.get("choices") or []:
                if (ch.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("stream carried no content")
    n_tok = usage["completion_tokens"] if usage and usage.get("completion_tokens") else len(stamps)
    decode = stamps[-1] - stamps[0]
    return {
        "ttft": stamps[0] - t0,
        "gaps": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens": n_tok,
        "prompt_tokens": (usage or {}).get("prompt_tokens"),
        "stream_tps": (n_tok - 1) / decode if n_tok > 1 and decode > 0 else None,
    }


async def run_level(args, conc: int) -> dict:
    n_req = args.requests or max(8, 2 * conc)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n_req):
        queue.put_nowait(i)
    results, errors = [], []
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=conc + 2)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=args.timeout) as client:

        async def worker():
            while not queue.empty():
                queue.get_nowait()
                try:
                    results.append(await one_request(client, args))
                except Exception as e:  # counted, first few printed
                    errors.append(repr(e))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conc)))
        wall = time.perf_counter() - t0
    for e in errors[:3]:
        print(f"  error (c={conc}): {e}")
    ttft = [r["ttft"] * 1000 for r in results]
    gaps = [g * 1000 for r in results for g in r["gaps"]]
    tps = [r["stream_tps"] for r in results if r["stream_tps"]]
    toks = sum(r["tokens"] for r in results)
    ptoks = [r["prompt_tokens"] for r in results if r["prompt_tokens"]]
    return {
        "conc": conc, "reqs": n_req, "ttft50": pct(ttft, 50), "ttft95": pct(ttft, 95),
        "itl50": pct(gaps, 50), "stream": statistics.mean(tps) if tps else float("nan"),
        "agg": toks / wall, "out": toks / len(results) if results else 0,
        "inp": statistics.mean(ptoks) if ptoks else float("nan"), "errors": len(errors),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8080")
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default="")
    ap.add_argument("--concurrency", default="1,4,8", help="comma-separated levels")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default max(8, 2*C))")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128, help="approximate prompt length")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--no-usage", action="store_true", help="do not send stream_options")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--extra", type=json.loads, default={}, help='JSON merged into each body, e.g. \'{"ignore_eos": true}\'')
    ap.add_argument("--jsonl", default="", help="also append each level's numbers to this file, one JSON object a line")
    ap.add_argument("--label", default="", help="a name for the server in --jsonl rows")
    args = ap.parse_args()
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    if not args.no_warmup:  # load weights / warm caches outside the measurement
        asyncio.run(run_level(argparse.Namespace(**{**vars(args), "requests": 1}), 1))
    print(f"# {args.base_url} model={args.model} max_tokens={args.max_tokens} "
          f"prompt~{args.prompt_tokens} tok, temperature 0, streaming")
    print("| conc | reqs | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | stream tok/s "
          "| aggregate tok/s | in tok | out tok | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in levels:
        s = asyncio.run(run_level(args, c))
        print(f"| {s['conc']} | {s['reqs']} | {s['ttft50']:.0f} | {s['ttft95']:.0f} | {s['itl50']:.1f} "
              f"| {s['stream']:.1f} | {s['agg']:.1f} | {s['inp']:.0f} | {s['out']:.1f} | {s['errors']} |",
              flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"bench": "serve", "server": args.label, **s}) + "\n")


if __name__ == "__main__":
    main()
