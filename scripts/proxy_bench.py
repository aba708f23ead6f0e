#!/usr/bin/env python3
"""What wisp's proxy mode adds to an upstream's latency: the same streamed chat requests,
rotating between the upstream itself and wisps in front of it, one at a time.

Every prompt starts with a unique tag, so no prompt cache answers any side, and the rounds
rotate which side goes first. Prints, per side, time to first token (TTFT) and the time
between streamed chunks (medians and means), and the difference: the proxy's cost.

    python3 scripts/proxy_bench.py --direct http://127.0.0.1:18091 --proxy chain=http://127.0.0.1:18090 \
        [--proxy bare=http://127.0.0.1:18092] --model MODEL_ID_ON_WISP [--pairs 40] [--max-tokens 32]

Standard library only.
"""
import argparse
import http.client
import json
import os
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


def first_event_seconds(base):
    """Sum and count of wisp's wisp_upstream_first_event_seconds (the upstream's own time to
    its first event, as wisp saw it)."""
    url = urllib.parse.urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("wisp_upstream_first_event_seconds_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("wisp_upstream_first_event_seconds_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def cpu_seconds(pid):
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--direct", required=True)
    p.add_argument("--proxy", required=True, action="append",
                   help="NAME=URL[@PID] of a wisp in front of --direct (repeatable); with its PID, its CPU time per chunk is measured")
    p.add_argument("--model", required=True, help="the model id on wisp (the upstream ignores it)")
    p.add_argument("--direct-model", default="any")
    p.add_argument("--pairs", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of the table")
    a = p.parse_args()
    sides = {"direct": (a.direct, a.direct_model)}
    pids = {}
    for spec in a.proxy:
        name, url = spec.split("=", 1)
        if "@" in url:
            url, pid = url.rsplit("@", 1)
            pids[name] = int(pid)
        sides[name] = (url, a.model)
    # Warm both (connections, first-request costs).
    for name, (base, model) in sides.items():
        stream(base, model, f"warm-{name}-{time.time()}", 4)
    ttft = {k: [] for k in sides}
    gaps = {k: [] for k in sides}
    chunks = {k: [] for k in sides}
    names = list(sides)
    # wisp's own share of each request's TTFT, free of the upstream's variance: the client's
    # TTFT through wisp minus the upstream's time to its first event, which wisp measured on
    # that same request (read from its /metrics after each request, outside the timing).
    own = {name: [] for name in names[1:]}
    cpu_used = {name: 0.0 for name in pids}
    for i in range(a.pairs):
        # Rotate which side goes first.
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            base, model = sides[name]
            before = first_event_seconds(base) if name in own else None
            cpu0 = cpu_seconds(pids[name]) if name in pids else None
            t, g, n = stream(base, model, f"{name}-{i}-{time.time()}", a.max_tokens)
            if cpu0 is not None:
                cpu_used[name] += cpu_seconds(pids[name]) - cpu0
            if before is not None:
                after = first_event_seconds(base)
                if after[1] == before[1] + 1:
                    own[name].append(t - (after[0] - before[0]))
            ttft[name].append(t)
            gaps[name].extend(g)
            chunks[name].append(n)
    cpu = cpu_used
    own_all = {name: sorted(v) for name, v in own.items() if v}
    own = {name: statistics.median(v) for name, v in own_all.items()}
    ms = lambda s: s * 1000
    row = {}
    for name in sides:
        row[name] = {
            "ttft_p50_ms": ms(statistics.median(ttft[name])),
            "ttft_mean_ms": ms(statistics.mean(ttft[name])),
            "chunk_gap_p50_ms": ms(statistics.median(gaps[name])),
            "chunk_gap_mean_ms": ms(statistics.mean(gaps[name])),
            "chunks": statistics.mean(chunks[name]),
            # The proxy's own CPU per chunk it relayed (the upstream's chunks: max_tokens each).
            "cpu_per_chunk_ms": ms(cpu[name] / (a.pairs * a.max_tokens)) if name in cpu else None,
        }
    timing = ["ttft_p50_ms", "ttft_mean_ms", "chunk_gap_p50_ms", "chunk_gap_mean_ms"]
    added = {name: {k: row[name][k] - row["direct"][k] for k in timing} for name in names[1:]}
    for name in names[1:]:
        # Each round's difference to the direct request of the same round, then the median:
        # a slow minute moves both sides of a round alike.
        added[name]["ttft_paired_p50_ms"] = ms(statistics.median(p - d for p, d in zip(ttft[name], ttft["direct"])))
    if a.json:
        print(json.dumps({"rounds": a.pairs, "max_tokens": a.max_tokens, **row, "added": added, "own_ttft_ms": {k: ms(v) for k, v in own.items()}}))
        return
    print(f"{a.pairs} rounds, {a.max_tokens} tokens each, one request at a time, sides in rotating order")
    for name in names[1:]:
        print(f"added by {name}: TTFT {added[name]['ttft_paired_p50_ms']:+.2f} ms (median of the rounds' paired differences)")
        if name in own:
            v = own_all[name]
            print(f"  {name}'s own time in TTFT: {ms(own[name]):.2f} ms (median over requests of the client's TTFT minus the upstream's first event on that request; "
                  f"p90 {ms(v[int(len(v) * 0.9)]):.2f}, mean {ms(statistics.mean(v)):.2f}, max {ms(v[-1]):.2f})")
    print("| side | TTFT p50 ms | TTFT mean ms | chunk gap p50 ms | chunk gap mean ms | chunks per reply | proxy CPU per upstream chunk ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        r = row[name]
        cpu_ms = "" if r["cpu_per_chunk_ms"] is None else f"{r['cpu_per_chunk_ms']:.3f}"
        print(f"| {name} | {r['ttft_p50_ms']:.2f} | {r['ttft_mean_ms']:.2f} | {r['chunk_gap_p50_ms']:.3f} | {r['chunk_gap_mean_ms']:.3f} | {r['chunks']:.1f} | {cpu_ms} |")
    for name in names[1:]:
        d = added[name]
        print(f"| added by {name} | {d['ttft_p50_ms']:+.2f} | {d['ttft_mean_ms']:+.2f} | {d['chunk_gap_p50_ms']:+.3f} | {d['chunk_gap_mean_ms']:+.3f} | | |")


if __name__ == "__main__":
    main()
