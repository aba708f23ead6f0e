#!/usr/bin/env python3
"""bench_summary.py - issue 7's goals table from one run of scripts/bench-vs-llama.sh.

    python3 scripts/bench_summary.py RESULTS.jsonl --pp 128 --tg 64 --batch 8 --threads 2

RESULTS.jsonl holds one JSON object a line, each tagged by "bench": llama-bench's and
llama-batched-bench's own JSON rows, wisp bench's table rows, serve_bench.py's levels
(--jsonl, "server": wisp | llama-server) and turn_bench.py's lengths ("reuse": true|false).
Prints the engine and serving detail, then one row per goal: both sides, the ratio, the
goal and whether it is met (or by how much it misses).
"""
import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--pp", type=int, required=True)
    ap.add_argument("--tg", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    by = lambda bench: [r for r in rows if r["bench"] == bench]  # noqa: E731

    llama = {}
    for r in by("llama-bench"):
        test = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
        llama[test] = r["avg_ts"]
    for r in by("llama-batched-bench"):
        llama[f"tg{r['tg']}x{r['pl']}"] = r["speed_tg"]
    wisp = {r["test"]: r["tps"] for r in by("wisp-bench")}
    serve = {(r["server"], r["conc"]): r for r in by("serve")}
    turns = {(r["reuse"], r["history"]): r["after_ms"] for r in by("turn")}
    pp, tg, b = f"pp{args.pp}", f"tg{args.tg}", args.batch
    wisp.setdefault(f"{tg}x1", wisp.get(tg))

    print(f"engine, {args.threads} threads (t/s; tg{args.tg}x{b}: {b} sequences decoding together, aggregate)")
    print("| test | llama.cpp | wisp | wisp / llama.cpp |")
    print("|---|---:|---:|---:|")
    for test in (pp, tg, f"{tg}x1", f"{tg}x{b}"):
        l, w = llama.get(test), wisp.get(test)
        if l and w:
            print(f"| {test} | {l:.1f} | {w:.1f} | {w / l:.2f} |")
    print()
    print(f"serving, {args.threads} threads, ~{args.pp}-token prompts, {args.tg} new tokens, streaming")
    print("| server | conc | TTFT p50 ms | ITL p50 ms | stream tok/s | aggregate tok/s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (server, conc), r in sorted(serve.items()):
        print(f"| {server} | {conc} | {r['ttft50']:.0f} | {r['itl50']:.1f} | {r['stream']:.1f} | {r['agg']:.1f} | {r['errors']} |")
    print()

    goals = []

    def ratio_goal(name, l, w, want, higher=True, fmt="{:.1f}"):
        if l is None or w is None:
            goals.append((name, "—", "—", "—", f"{'≥' if higher else '≤'} {want}", "not measured"))
            return
        x = w / l
        met = x >= want if higher else x <= want
        verdict = "yes" if met else f"**no**: {abs(x / want - 1) * 100:.0f} % short"
        goals.append((name, fmt.format(l), fmt.format(w), f"{x:.2f}", f"{'≥' if higher else '≤'} {want} ×", verdict))

    ratio_goal(f"decode t/s, one stream ({tg})", llama.get(tg), wisp.get(tg), 1.0)
    ratio_goal(f"prompt t/s ({pp})", llama.get(pp), wisp.get(pp), 0.8)
    l1, l8 = serve.get(("llama-server", 1)), serve.get(("llama-server", b))
    w1, w8 = serve.get(("wisp", 1)), serve.get(("wisp", b))
    if l1 and l8 and w1 and w8:
        lr, wr = l8["agg"] / l1["agg"], w8["agg"] / w1["agg"]
        met = wr >= 3 and wr >= lr
        short = []
        if wr < 3:
            short.append(f"{(1 - wr / 3) * 100:.0f} % short of 3 ×")
        if wr < lr:
            short.append(f"{(1 - wr / lr) * 100:.0f} % below llama-server's")
        goals.append((f"serving aggregate t/s, {b} streams ÷ 1 stream", f"{lr:.2f} ×", f"{wr:.2f} ×", "—",
                      "≥ 3 × and ≥ llama-server's", "yes" if met else "**no**: " + "; ".join(short)))
    else:
        goals.append((f"serving aggregate, {b} ÷ 1", "—", "—", "—", "≥ 3 ×", "not measured"))
    le, we = llama.get(f"{tg}x{b}"), wisp.get(f"{tg}x{b}")
    if le and we and llama.get(f"{tg}x1") and wisp.get(f"{tg}x1"):
        lr, wr = le / llama[f"{tg}x1"], we / wisp[f"{tg}x1"]
        goals.append((f"(engine, decode only) {b} sequences ÷ 1", f"{lr:.2f} ×", f"{wr:.2f} ×", "—",
                      "(context for the row above)", "—"))
    if l1 and w1:
        ratio_goal("time to first token, 1 stream (ms)", l1["ttft50"], w1["ttft50"], 1.1, higher=False, fmt="{:.0f}")
    hist = sorted({h for (_, h) in turns})
    if hist and (True, hist[0]) in turns and (True, hist[-1]) in turns:
        reuse = [f"{turns[(True, h)]:.0f}" for h in hist]
        none = [f"{turns[(False, h)]:.0f}" for h in hist if (False, h) in turns]
        grow = turns[(True, hist[-1])] - turns[(True, hist[0])]
        grow_none = turns.get((False, hist[-1]), 0) - turns.get((False, hist[0]), 0)
        # "Independent of history" read as: what the history adds is under a tenth of what
        # prefilling it again would add.
        met = grow_none > 0 and grow < 0.1 * grow_none
        goals.append((f"turn N TTFT (ms) after {' / '.join(map(str, hist))} history tokens",
                      "without reuse: " + " / ".join(none), " / ".join(reuse), "—",
                      "independent of history (grows < 10 % of a re-prefill)",
                      "yes" if met else f"**no**: +{grow:.0f} ms vs +{grow_none:.0f} ms without reuse"))

    print(f"goals (issue 7), {args.threads} threads, this run")
    print("| measure | llama.cpp | wisp | wisp / llama.cpp | goal | met? |")
    print("|---|---:|---:|---:|---|---|")
    for g in goals:
        print("| " + " | ".join(g) + " |")


if __name__ == "__main__":
    main()
