#!/usr/bin/env python3
"""Soak a running wisp: N concurrent clients for a while, a share of them hanging up
mid-stream, then a table of what happened and whether the server is still healthy.

    .venv/bin/python scripts/soak.py --base-url http://127.0.0.1:8080 --pid PID \
        --concurrency 32 --minutes 10 --hangups 0.3 [--api-key sk-demo] [--sessions]

Standard library only. Each client loops: a chat completion (streamed 80 %, else JSON; with --sessions a third of
them are turns of the client's own server-side session), hanging up after a few chunks
with probability --hangups. Counted: statuses, streams that ended in an error event
instead of [DONE], and the server's RSS (from /proc/PID) sampled every 5 s. Exits 1 if
any response was a 5xx or a stream ended in an error, or the server is not healthy after.
"""

import argparse
import http.client
import json
import random
import threading
import time
import urllib.parse
from collections import Counter


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--hangups", type=float, default=0.3)
    ap.add_argument("--api-key", default="x")
    ap.add_argument("--model", default=None)
    ap.add_argument("--sessions", action="store_true")
    args = ap.parse_args()

    headers = {"authorization": f"Bearer {args.api_key}"}
    end = time.time() + args.minutes * 60
    lock = threading.Lock()
    statuses = Counter()
    outcomes = Counter()
    errors = Counter()
    rss = []

    def record(counter, key):
        with lock:
            counter[key] += 1

    url = urllib.parse.urlsplit(args.base_url)

    def connect():
        return http.client.HTTPConnection(url.hostname, url.port, timeout=600)

    def post(conn, path, body):
        conn.request("POST", path, body=json.dumps(body), headers={**headers, "content-type": "application/json"})
        return conn.getresponse()

    def client(i):
        rng = random.Random(i)
        conn = connect()
        session = None
        if args.sessions:
            r = post(conn, "/v1/sessions", {"title": f"soak {i}"})
            record(statuses, r.status)
            created = json.loads(r.read())
            session = created.get("id") if r.status == 200 else None
            if r.status >= 500:
                record(errors, created.get("error", {}).get("code"))
        n = 0
        while time.time() < end:
            n += 1
            body = {
                "messages": [{"role": "user", "content": f"Client {i}, request {n}: tell me about the sea."}],
                "max_tokens": rng.choice([8, 16, 32, 64]),
            }
            if args.model:
                body["model"] = args.model
            if session and n % 3 == 0:
                body["session_id"] = session
            stream = rng.random() < 0.8
            body["stream"] = stream
            hang_up = stream and rng.random() < args.hangups
            try:
                r = post(conn, "/v1/chat/completions", body)
                record(statuses, r.status)
                if r.status != 200 or not stream:
                    payload = r.read()
                    if r.status >= 500:
                        record(errors, json.loads(payload).get("error", {}).get("code"))
                    record(outcomes, "json" if r.status == 200 else f"refused {r.status}")
                    continue
                chunks, last, failed = 0, None, None
                cut = rng.randint(1, 6)
                while True:
                    line = r.readline()
                    if not line:
                        break
                    line = line.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    last = data
                    if data != "[DONE]" and '"error"' in data:
                        failed = json.loads(data)["error"].get("code")
                    chunks += 1
                    if hang_up and chunks >= cut:
                        break
                    if data == "[DONE]":
                        break
                if hang_up and chunks >= cut and last != "[DONE]":
                    record(outcomes, "hung up")
                    conn.close()
                    conn = connect()
                    continue
                r.read()
                if failed:
                    record(outcomes, "error event")
                    record(errors, failed)
                elif last == "[DONE]":
                    record(outcomes, "finished")
                else:
                    record(outcomes, "cut off")
            except (OSError, http.client.HTTPException) as e:
                record(outcomes, f"transport: {type(e).__name__}")
                conn.close()
                conn = connect()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.concurrency)]
    started = time.time()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        rss.append(rss_kb(args.pid))
        time.sleep(5)
    for t in threads:
        t.join()
    elapsed = time.time() - started
    time.sleep(2)
    def get(path):
        conn = connect()
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()

    health = get("/health")[0]
    ready = get("/ready")[0]
    metrics = get("/metrics")[1]
    gauges = {
        name: sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines() if l.startswith(name + "{"))
        for name in ("wisp_requests_running", "wisp_requests_waiting")
    }

    total = sum(statuses.values())
    five = sum(v for k, v in statuses.items() if k >= 500)
    print(f"| soak | {args.concurrency} clients, {elapsed / 60:.1f} min, hang-ups {args.hangups:.0%} |")
    print("|---|---|")
    print(f"| responses | {total} ({', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))}) |")
    print(f"| outcomes | {', '.join(f'{k}: {v}' for k, v in sorted(outcomes.items()))} |")
    print(f"| 5xx | {five} |")
    print(f"| error codes | {dict(errors) or 'none'} |")
    if rss:
        print(f"| RSS MB (first / max / last) | {rss[0] / 1024:.0f} / {max(rss) / 1024:.0f} / {rss[-1] / 1024:.0f} |")
    print(f"| after: health, ready, running, waiting | {health}, {ready}, {gauges['wisp_requests_running']:.0f}, {gauges['wisp_requests_waiting']:.0f} |")
    bad = five or outcomes["error event"] or outcomes["cut off"] or health != 200 or ready != 200
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
