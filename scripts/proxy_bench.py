#!/usr/bin/env python3
"""What wisp's proxy mode adds to an upstream's latency: the same streamed chat requests,
alternating between the upstream itself and wisp in front of it, one at a time.

Every prompt starts with a unique tag, so no prompt cache answers either side, and the pairs
alternate which side goes first. Prints, per side, time to first token (TTFT) and the time
between streamed chunks (medians and means), and the difference: the proxy's cost.

    python3 scripts/proxy_bench.py --direct http://127.0.0.1:18091 --proxy http://127.0.0.1:18090 \
        --model MODEL_ID_ON_WISP [--pairs 40] [--max-tokens 32]

Standard library only.
"""
import argparse
import http.client
import json
import statistics
import time
import urllib.parse

TEXT = ("Describe in plain words how a river carries sand from the mountains to the sea, "
        "and why its course bends over the years. ") * 2


def stream(base, model, tag, max_tokens):
    """One streamed chat; returns (ttft_s, [gaps between chunks, s], chunks)."""
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=300)
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": f"[{tag}] {TEXT}"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    })
    start = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"{base}: HTTP {response.status}: {response.read()[:300]!r}")
    stamps = []
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            stamps.append(time.perf_counter())
    conn.close()
    if not stamps:
        raise SystemExit(f"{base}: no content chunks")
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])], len(stamps)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--direct", required=True)
    p.add_argument("--proxy", required=True)
    p.add_argument("--model", required=True, help="the model id on wisp (the upstream ignores it)")
    p.add_argument("--direct-model", default="any")
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    a = p.parse_args()
    sides = {"direct": (a.direct, a.direct_model), "proxy": (a.proxy, a.model)}
    # Warm both (connections, first-request costs).
    for name, (base, model) in sides.items():
        stream(base, model, f"warm-{name}-{time.time()}", 4)
    ttft = {k: [] for k in sides}
    gaps = {k: [] for k in sides}
    for i in range(a.pairs):
        order = ["direct", "proxy"] if i % 2 == 0 else ["proxy", "direct"]
        for name in order:
            base, model = sides[name]
            t, g, _ = stream(base, model, f"{name}-{i}-{time.time()}", a.max_tokens)
            ttft[name].append(t)
            gaps[name].extend(g)
    ms = lambda s: s * 1000
    row = {}
    for name in sides:
        row[name] = {
            "ttft_p50_ms": ms(statistics.median(ttft[name])),
            "ttft_mean_ms": ms(statistics.mean(ttft[name])),
            "chunk_gap_p50_ms": ms(statistics.median(gaps[name])),
            "chunk_gap_mean_ms": ms(statistics.mean(gaps[name])),
        }
    added = {k: row["proxy"][k] - row["direct"][k] for k in row["direct"]}
    if a.json:
        print(json.dumps({"pairs": a.pairs, "max_tokens": a.max_tokens, **row, "added": added}))
        return
    print(f"{a.pairs} pairs, {a.max_tokens} tokens each, one request at a time, alternating")
    print(f"| side | TTFT p50 ms | TTFT mean ms | chunk gap p50 ms | chunk gap mean ms |")
    print(f"|---|---:|---:|---:|---:|")
    for name in ["direct", "proxy"]:
        r = row[name]
        print(f"| {name} | {r['ttft_p50_ms']:.2f} | {r['ttft_mean_ms']:.2f} | {r['chunk_gap_p50_ms']:.3f} | {r['chunk_gap_mean_ms']:.3f} |")
    print(f"| added by wisp | {added['ttft_p50_ms']:+.2f} | {added['ttft_mean_ms']:+.2f} | {added['chunk_gap_p50_ms']:+.3f} | {added['chunk_gap_mean_ms']:+.3f} |")


if __name__ == "__main__":
    main()
